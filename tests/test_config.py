"""The typed YAML loader every command uses: clear errors before anything starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from tdamil.config import ConfigError, from_dict, load_config, to_dict
from tdamil.security.config import PrivacyConfig


@dataclass
class Inner:
    lr: float = 1e-4
    epochs: int = 2
    optimizer: Literal["adamw", "sgd"] = "adamw"


@dataclass
class Outer:
    name: str
    data_dir: Path
    weights: Optional[Path] = None
    train: Inner = field(default_factory=Inner)
    sites: list[str] = field(default_factory=list)
    extra: dict[str, int] = field(default_factory=dict)
    amp: bool = False


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_loads_nested_values_and_resolves_paths_next_to_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "name: a\ndata_dir: feats\ntrain: {lr: 1e-5, epochs: 3}\nsites: [x, y]\nextra: {k: 1}\n")
    cfg = load_config(p, Outer)
    assert cfg.train.lr == pytest.approx(1e-5)  # YAML reads "1e-5" as text; floats accept it
    assert cfg.train.epochs == 3 and cfg.train.optimizer == "adamw"
    assert cfg.data_dir == tmp_path / "feats"
    assert cfg.sites == ["x", "y"] and cfg.extra == {"k": 1}
    assert to_dict(cfg)["data_dir"] == str(tmp_path / "feats")


def test_absolute_paths_and_overrides(tmp_path: Path) -> None:
    p = write(tmp_path, "name: a\ndata_dir: /abs/feats\n")
    cfg = load_config(p, Outer, overrides={"train.epochs": 7, "weights": "w.bin"})
    assert cfg.data_dir == Path("/abs/feats")
    assert cfg.train.epochs == 7
    assert cfg.weights == tmp_path / "w.bin"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: a\ndata_dir: d\ntrain: {lrr: 1}\n", "'train.lrr' is not a known setting. Did you mean 'lr'?"),
        ("data_dir: d\n", "'name' is required but missing"),
        ("name: a\ndata_dir: d\ntrain: {epochs: two}\n", "'train.epochs' must be a whole number, got 'two'"),
        ("name: a\ndata_dir: d\ntrain: {epochs: 2.5}\n", "'train.epochs' must be a whole number"),
        ("name: a\ndata_dir: d\ntrain: {optimizer: adam}\n", "must be one of 'adamw', 'sgd', got 'adam'"),
        ("name: a\ndata_dir: d\namp: 'yes'\n", "'amp' must be true or false"),
        ("name: a\ndata_dir: d\nsites: x\n", "'sites' must be a list"),
        ("name: a\ndata_dir: 3\n", "'data_dir' must be a path"),
        ("name: a\ndata_dir: d\ntrain: 5\n", "'train' must be a mapping"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("name: [unclosed\n", "not valid YAML at line"),
    ],
)
def test_errors_name_the_file_the_key_and_the_fix(tmp_path: Path, text: str, expected: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p, Outer)
    msg = str(info.value)
    assert str(p) in msg
    assert expected in msg


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", Outer)


@dataclass
class WithPrivacy:
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


def test_post_init_checks_become_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"x.yaml: 'privacy': privacy.clipping_norm must be > 0"):
        from_dict(WithPrivacy, {"privacy": {"clipping_norm": -1}}, source="x.yaml")
    assert from_dict(WithPrivacy, {"privacy": {"enabled": True}}).privacy.noise_multiplier == 1.0


def test_every_unknown_key_is_named_with_its_closest_known_key(tmp_path: Path) -> None:
    p = write(tmp_path, "name: a\ndata_dir: d\ntrain: {lrr: 1, epoch: 2, zzz: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, Outer)
    msg = str(info.value)
    assert "'train.lrr' is not a known setting. Did you mean 'lr'?" in msg
    assert "'train.epoch' is not a known setting. Did you mean 'epochs'?" in msg
    assert "'train.zzz' is not a known setting. Known keys here: epochs, lr, optimizer." in msg


def test_a_misspelled_data_key_is_named_before_what_it_leaves_missing(tmp_path: Path) -> None:
    """tdamil-extract / tdamil-predict read the site YAML's data section by hand: `slide_dir` is named
    as unknown, not reported as a missing manifest or slides_dir."""
    from tdamil.wsi.cli import load_extraction_sections

    p = write(tmp_path, "site: site_a\ndata: {slide_dir: slides, features_dir: f}\n")
    with pytest.raises(ConfigError, match=r"'data\.slide_dir' is not a known setting\. Did you mean 'slides_dir'\?"):
        load_extraction_sections(p)
    p = write(tmp_path, "site: site_a\ndata: {slides_dir: slides, features_dir: f}\nextration: {encoder: tiny}\n")
    with pytest.raises(ConfigError, match=r"'extration' is not a known setting\. Did you mean 'extraction'\?"):
        load_extraction_sections(p)


def test_the_extraction_commands_know_every_site_section() -> None:
    import dataclasses

    from tdamil.client.config import SiteConfig
    from tdamil.wsi.cli import SITE_SECTIONS

    assert set(SITE_SECTIONS) == {f.name for f in dataclasses.fields(SiteConfig)}
