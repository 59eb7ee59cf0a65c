"""The simulation YAML (``configs/sim_*.yaml``): typed sections and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from tdamil.config import ConfigError, load_config
from tdamil.data.config import DataConfig
from tdamil.data.digits import DigitsBagsConfig
from tdamil.federation.config import CheckpointConfig, FederationConfig
from tdamil.security.config import PrivacyConfig
from tdamil.server.config import validate_model
from tdamil.train.engine import TrainConfig

__all__ = ["DigitsSitesConfig", "ManifestSitesConfig", "SimDataConfig", "SimConfig", "load_sim_config"]


@dataclass
class DigitsSitesConfig:
    """Digits bags split into non-IID sites (``tdamil.data.digits.make_digits_sites``).

    num_sites: number of sites; label_skew / size_skew: how much the sites' positive share and
    bag size differ; site_test_bags: test bags per site; held_out_fraction: share of the images
    kept for the held-out cohort; bags: the bag settings (DigitsBagsConfig).
    """

    num_sites: int = 3
    label_skew: float = 0.3
    size_skew: float = 0.4
    site_test_bags: int = 200
    held_out_fraction: float = 0.3
    bags: DigitsBagsConfig = field(default_factory=DigitsBagsConfig)


@dataclass
class ManifestSitesConfig:
    """Sites from a manifest's cohort column (dataset-as-site).

    data: manifest + feature cache; sites: the cohorts that become sites (null = all but
    held_out); held_out: cohorts evaluated at the server only; split: patient-level split of each
    site when the manifest has no ``split`` column.
    """

    data: DataConfig
    sites: Optional[list[str]] = None
    held_out: list[str] = field(default_factory=list)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0


@dataclass
class SimDataConfig:
    """``source: digits`` (embedded default) or ``source: manifest``."""

    source: Literal["digits", "manifest"] = "digits"
    digits: DigitsSitesConfig = field(default_factory=DigitsSitesConfig)
    manifest: Optional[ManifestSitesConfig] = None

    def __post_init__(self) -> None:
        if self.source == "manifest" and self.manifest is None:
            raise ValueError("data.source is 'manifest' but the data.manifest section is missing")


@dataclass
class SimConfig:
    """A simulation YAML (``configs/sim_digits.yaml``).

    model / num_classes: the model (tdamil.models config); output_dir: where everything goes;
    data: the sites; federation / checkpoint: as in server.yaml; train: the sites' TrainConfig
    (device, accumulation, ...; lr and epochs come from ``federation``); engine: inprocess | ray;
    baselines: also run centralised and local-only training at the same budget; privacy: DP;
    torch_threads: CPU threads for torch (1: small MIL models run fastest single-threaded, and
    oversubscribed cores slow multi-threaded torch down by orders of magnitude; null = torch's default).
    """

    model: dict[str, Any] = field(default_factory=lambda: {"name": "tdamil", "dim": 64, "depth": 1, "num_heads": 4})
    num_classes: int = 2
    output_dir: Path = Path("runs/sim")
    data: SimDataConfig = field(default_factory=SimDataConfig)
    federation: FederationConfig = field(default_factory=lambda: FederationConfig(rounds=10, lr=1e-3, min_sites=3))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(progress=False, device="cpu"))
    engine: Literal["inprocess", "ray"] = "inprocess"
    baselines: bool = True
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    torch_threads: Optional[int] = 1


def load_sim_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SimConfig:
    path = Path(path)
    cfg = load_config(path, SimConfig, overrides=overrides)
    validate_model(cfg.model, str(path))
    cfg.output_dir = Path(cfg.output_dir).resolve()  # logs show /work/runs/x, not /work/configs/../runs/x
    if cfg.data.source == "manifest" and not Path(cfg.data.manifest.data.manifest).is_file():
        raise ConfigError(f"{path}: 'data.manifest.data.manifest' file {cfg.data.manifest.data.manifest} not found.")
    return cfg
