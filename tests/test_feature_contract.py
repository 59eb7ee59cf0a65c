"""One federation, one feature space (issue 25): features of the same width from another encoder,
other weights, another magnification or another patch size are refused by name, in one line, with
the fix; files without these attrs only with the site's explicit override; sites on other software
versions are told what to install; checkpoints carry the contract and tdamil-predict enforces it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from tdamil.checkpoint import annotate_checkpoint, load_checkpoint, save_checkpoint
from tdamil.config import ConfigError
from tdamil.data.contract import (
    ContractError,
    FeatureContract,
    check_features,
    checkpoint_origin,
    contract_of_file,
    contract_of_files,
    coordinator_origin,
    feature_paths,
)
from tdamil.data.h5 import write_features
from tdamil.federation.versions import VersionsConfig, check_versions, required_versions, site_versions

REPO = Path(__file__).resolve().parents[1]
WIDTH = 16
SHA_A, SHA_B = "a" * 64, "b" * 64
#: what tdamil-extract records (tdamil/wsi/prepare.py), UNI2-h at 20x with 512 px patches
UNI2 = {"encoder": "uni2_h", "encoder_dim": WIDTH, "weights_sha256": SHA_A, "target_magnification": 20,
        "patch_size": 512, "patch_size_level0": 1024, "level0_magnification": 40, "mpp": 0.25, "read_level": 1}
CONTRACT = FeatureContract(feature_dim=WIDTH, encoder="uni2_h", weights_sha256=SHA_A, target_magnification=20,
                           patch_size=512)


def _h5(path: Path, attrs: dict | None = None, width: int = WIDTH, n: int = 5) -> Path:
    rng = np.random.default_rng(len(str(path)))
    coords = np.stack([np.arange(n) * 512, np.zeros(n)], axis=1).astype(np.int64)
    return write_features(path, rng.normal(size=(n, width)).astype(np.float32), coords, attrs)


def _clam(path: Path, width: int = WIDTH) -> Path:
    """A CLAM-style file: features and coords, no record of the extraction."""
    with h5py.File(path, "w") as f:
        f["features"] = np.zeros((4, width), dtype=np.float32)
        f["coords"] = np.zeros((4, 2), dtype=np.int64)
    return path


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# --------------------------------------------------------------------------------------------
# the contract and the files
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attr, other, shown_found, shown_expected, fix", [
    ("encoder", "gigapath", "'gigapath'", "'uni2_h'", "using encoder uni2_h"),
    ("encoder", "hoptimus0", "'hoptimus0'", "'uni2_h'", "using encoder uni2_h"),
    ("weights_sha256", SHA_B, repr(SHA_B), repr(SHA_A), f"whose sha256 is {SHA_A}"),
    ("target_magnification", 40, "40", "20", "extraction.target_magnification: 20"),
    ("patch_size", 256, "256", "512", "extraction.patch_size: 512"),
])
def test_same_width_other_extraction_is_refused_by_name(tmp_path, attr, other, shown_found, shown_expected, fix):
    good = [_h5(tmp_path / f"ok{i}.h5", UNI2) for i in range(3)]
    bad = _h5(tmp_path / "s1.h5", UNI2 | {attr: other})
    assert contract_of_file(bad).feature_dim == WIDTH  # the width alone cannot tell
    origin = coordinator_origin("configs/server.yaml")
    with pytest.raises(ContractError) as exc:
        check_features([*good, bad], CONTRACT, site="site_b", origin=origin)
    line = _one_line(exc)
    assert line.startswith(f"site site_b: {bad}: {attr} is {shown_found}, the federation expects {shown_expected} "
                           f"(configs/server.yaml contract.{attr}). Re-extract with tdamil-extract"), line
    assert fix in line and line.endswith("or ask the coordinator which extraction the federation uses."), line


def test_files_that_fit_pass_and_report_what_they_record(tmp_path, caplog):
    files = [_h5(tmp_path / f"s{i}.h5", UNI2 | {"encoder": "UNI2-h"}) for i in range(3)]  # the registry's spelling rule
    caplog.set_level(logging.INFO, logger="tdamil.data.contract")
    report = check_features(files, CONTRACT, site="site_a")
    assert report.n_files == 3 and report.observed == CONTRACT and not report.unlabelled
    assert "site site_a: 3 feature files fit the contract (encoder uni2_h" in caplog.text
    # a consortium pins what it knows: the width alone lets any encoder of that width through ...
    assert check_features(files, FeatureContract(feature_dim=WIDTH), site="site_a").observed == CONTRACT
    # ... but never another width
    wide = _h5(tmp_path / "wide.h5", UNI2, width=WIDTH * 2)
    with pytest.raises(ContractError, match=rf"feature_dim is {2 * WIDTH}, the federation expects {WIDTH}"):
        check_features([*files, wide], FeatureContract(feature_dim=WIDTH), site="site_a")


def test_one_site_one_extraction_even_where_the_contract_is_silent(tmp_path):
    a = _h5(tmp_path / "a.h5", UNI2 | {"encoder": "gigapath"})
    b = _h5(tmp_path / "b.h5", UNI2 | {"encoder": "hoptimus0"})  # 1536 wide both, in real life
    with pytest.raises(ContractError) as exc:
        check_features([a, b], FeatureContract(feature_dim=WIDTH), site="site_c")
    line = _one_line(exc)
    assert f"site site_c: {b}: encoder is 'hoptimus0', but {a} has 'gigapath'" in line and "Re-extract" in line
    with pytest.raises(ContractError, match="encoder is 'hoptimus0'"):
        contract_of_files([a, b])


def test_unlabelled_files_only_with_the_override(tmp_path, caplog):
    labelled = _h5(tmp_path / "ok.h5", UNI2)
    clam = [_clam(tmp_path / f"clam{i}.h5") for i in range(2)]
    with pytest.raises(ContractError) as exc:
        check_features([labelled, *clam], CONTRACT, site="site_b")
    line = _one_line(exc)
    assert line.startswith(f"site site_b: {clam[0]} (and 1 more files): records no encoder"), line
    assert "accept_unlabelled_features: true" in line and "Re-extract with tdamil-extract" in line
    caplog.set_level(logging.WARNING, logger="tdamil.data.contract")
    report = check_features([labelled, *clam], CONTRACT, site="site_b", allow_unlabelled_attrs=True)
    assert report.unlabelled["encoder"] == clam and report.observed == CONTRACT
    assert "ACCEPTED UNLABELLED FEATURES" in caplog.text and "encoder (2 files)" in caplog.text
    # the override takes missing records on trust, never a record that contradicts the contract
    other = _h5(tmp_path / "other.h5", UNI2 | {"patch_size": 256})
    with pytest.raises(ContractError, match="patch_size is 256"):
        check_features([*clam, other], CONTRACT, site="site_b", allow_unlabelled_attrs=True)
    # nothing pinned, nothing to take on trust: a width-only contract accepts CLAM files of that width
    assert check_features(clam, FeatureContract(feature_dim=WIDTH), site="site_b").n_files == 2


def test_clam_pt_files_are_read_for_their_width_only(tmp_path):
    pt = tmp_path / "s.pt"
    torch.save(torch.zeros(3, WIDTH), pt)
    assert contract_of_file(pt) == FeatureContract(feature_dim=WIDTH)
    with pytest.raises(ContractError, match="records no encoder"):
        check_features([pt], CONTRACT, site="site_a")


def test_missing_or_broken_files_are_one_line_too(tmp_path):
    with pytest.raises(ContractError) as exc:
        check_features([tmp_path / "gone.h5"], CONTRACT, site="site_a")
    assert _one_line(exc).startswith(f"site site_a: {tmp_path / 'gone.h5'}: feature file not found")
    bad = _h5(tmp_path / "bad.h5", UNI2 | {"target_magnification": "twenty"})
    with pytest.raises(ContractError, match="target_magnification holds 'twenty'"):
        check_features([bad], CONTRACT, site="site_a")


def test_contract_json_round_trip_and_strict_reading():
    assert FeatureContract.from_json(CONTRACT.to_json()) == CONTRACT
    assert FeatureContract.from_dict(CONTRACT.to_dict()) == CONTRACT
    assert json.loads(FeatureContract(feature_dim=8).to_json()) == {"feature_dim": 8}
    assert FeatureContract(encoder="UNI2-h", weights_sha256=SHA_A.upper()) == FeatureContract(encoder="uni2_h",
                                                                                              weights_sha256=SHA_A)
    with pytest.raises(ContractError, match="unknown field"):
        FeatureContract.from_json('{"encoder": "uni", "stain": "he"}')
    with pytest.raises(ContractError, match="not JSON"):
        FeatureContract.from_json("encoder=uni")
    with pytest.raises(ContractError, match="target_magnification must be a number > 0"):
        FeatureContract.from_dict({"target_magnification": -20})
    assert CONTRACT.differences(FeatureContract(encoder="gigapath", patch_size=512)) == [
        ("encoder", "uni2_h", "gigapath")]


def test_feature_paths_of_datasets(tmp_path):
    from tdamil.data.bags import FeatureBagDataset

    for s in ("a", "b", "c"):
        _h5(tmp_path / f"{s}.h5", UNI2)
    one = FeatureBagDataset(tmp_path, ["a", "b"], [0, 1], 2)
    two = FeatureBagDataset(tmp_path, ["b", "c"], [0, 1], 2)
    assert feature_paths([one, None, two]) == [tmp_path / f"{s}.h5" for s in "abc"]


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
def _server_yaml(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "server.yaml"
    path.write_text("model: {name: tdamil, dim: 16, depth: 1, num_heads: 2}\nin_dim: 1536\n" + extra)
    return path


def test_server_contract_section(tmp_path):
    from tdamil.server.config import load_server_config

    assert load_server_config(_server_yaml(tmp_path, "")).contract == FeatureContract(feature_dim=1536)
    cfg = load_server_config(_server_yaml(tmp_path, "contract: {encoder: gigapath, patch_size: 512}\n"))
    assert cfg.contract == FeatureContract(feature_dim=1536, encoder="gigapath", patch_size=512)
    assert cfg.versions == VersionsConfig()
    for extra, message in [
        ("contract: {feature_dim: 1024}\n", "contract.feature_dim is 1024 but in_dim is 1536"),
        ("contract: {encoder: uni}\n", "contract.encoder uni gives 1024 features per patch but in_dim is 1536"),
        ("contract: {encodr: uni}\n", "'contract.encodr' is not a known setting. Did you mean 'encoder'?"),
        ("versions: {tdamil_fl: 'version one'}\n", "versions.tdamil_fl must be a version specifier"),
    ]:
        with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("?", r"\?")):
            load_server_config(_server_yaml(tmp_path, extra))
    for path in (REPO / "configs" / "server.yaml", REPO / "configs" / "examples" / "server_msi.yaml"):
        assert load_server_config(path, check_files=False).contract.encoder == "uni"


def _demo_site(tmp_path: Path) -> tuple[Path, dict]:
    from tdamil.federation.demo import write_demo_federation

    paths = write_demo_federation(tmp_path / "demo", num_sites=2, train_bags=4, val_bags=2, test_bags=2,
                                  heldout_bags=4, secure=False)
    return paths["site_a"], yaml.safe_load(paths["site_a"].read_text())


def _site_check(config: Path, raw: dict, capsys) -> tuple[int, str, str]:
    from tdamil.client.site import main as client_main

    config.write_text(yaml.safe_dump(raw))
    rc = client_main(["--config", str(config), "--check", "--insecure", "--no-extract"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_site_check_refuses_features_outside_its_contract(tmp_path, capsys):
    config, raw = _demo_site(tmp_path)  # the demo's files record encoder 'digits-pixels', nothing else
    rc, out, err = _site_check(config, raw | {"contract": {"encoder": "digits-pixels", "feature_dim": 64}}, capsys)
    assert rc == 0 and "they fit the contract: encoder digits_pixels, 64 features per patch" in out, err
    rc, out, err = _site_check(config, raw | {"contract": {"encoder": "uni2_h"}}, capsys)
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and "Traceback" not in err
    assert "site site_a: " in line and "encoder is 'digits_pixels', this site's contract expects 'uni2_h'" in line
    rc, out, err = _site_check(config, raw | {"contract": {"patch_size": 512}}, capsys)
    assert rc == 2 and "records no patch_size" in err and "accept_unlabelled_features: true" in err
    rc, out, err = _site_check(config, raw | {"contract": {"patch_size": 512}, "accept_unlabelled_features": True},
                               capsys)
    assert rc == 0, err


def test_site_contract_must_fit_its_own_extraction(tmp_path):
    from tdamil.client.config import load_site_config

    (tmp_path / "m.csv").write_text("slide_id,patient_id,label\n")
    path = tmp_path / "site.yaml"
    path.write_text("site: site_a\ndata: {manifest: m.csv, features_dir: f}\n"
                    "extraction: {encoder: tiny, patch_size: 256}\ncontract: {encoder: tiny, patch_size: 512}\n")
    with pytest.raises(ConfigError, match=r"extraction.patch_size is 256, but contract.patch_size is 512"):
        load_site_config(path)
    for name in ("site_a", "site_b"):
        cfg, _ = load_site_config(REPO / "configs" / "sites" / f"{name}.yaml", check_files=False)
        assert cfg.contract.encoder == "uni" and cfg.accept_unlabelled_features is False


# --------------------------------------------------------------------------------------------
# versions
# --------------------------------------------------------------------------------------------
def test_versions_handshake_names_what_to_install():
    required = required_versions(VersionsConfig(torch_min="2.4"))
    assert required == {"tdamil-fl": "==0.1.*", "flwr": "==1.42.*", "torch": ">=2.4"}
    ours = site_versions(device="cpu")
    assert set(ours) == {"tdamil-fl", "flwr", "torch", "python", "device", "precision"}
    assert ours["device"] == "cpu" and ours["precision"] == "fp32"
    assert check_versions(ours, required, site="site_a") is None
    assert check_versions(ours | {"tdamil-fl": "0.0.9"}, required, site="site_b") == (
        "site site_b runs tdamil-fl 0.0.9, the coordinator requires 0.1.x (pip install -U 'tdamil-fl==0.1.*')")
    assert check_versions(ours | {"torch": "2.3.1"}, required, site="site_b") == (
        "site site_b runs torch 2.3.1, the coordinator requires >= 2.4 (pip install -U 'torch>=2.4')")
    assert "runs flwr 1.41.0" in check_versions(ours | {"flwr": "1.41.0"}, required, site="site_b")
    missing = check_versions({"tdamil-fl": "0.1.0"}, required, site="site_b")
    assert missing.startswith("site site_b does not report its flwr version") and "pip install -U 'flwr==1.42.*'" in missing
    assert check_versions(ours | {"torch": "2.6.0.dev20241001"}, required) is None  # nightlies pass a minimum
    assert required_versions(VersionsConfig(tdamil_fl=">=0.1,<0.3", torch_min=None)) == {
        "tdamil-fl": ">=0.1,<0.3", "flwr": "==1.42.*"}


# --------------------------------------------------------------------------------------------
# checkpoints, tdamil-train, tdamil-predict
# --------------------------------------------------------------------------------------------
def test_checkpoints_carry_the_contract(tmp_path):
    from flwr.app import ArrayRecord

    from tdamil.federation.checkpoint import CheckpointStore
    from tdamil.federation.task import ModelSpec

    model = torch.nn.Linear(WIDTH, 2)
    path = save_checkpoint(tmp_path / "best.pt", model.state_dict(), feature_contract=CONTRACT.to_dict())
    assert FeatureContract.from_dict(load_checkpoint(path)["feature_contract"]) == CONTRACT
    plain = save_checkpoint(tmp_path / "plain.pt", model.state_dict(), feature_contract=None)
    assert "feature_contract" not in load_checkpoint(plain)
    annotate_checkpoint(plain, feature_contract=CONTRACT.to_dict())
    again = load_checkpoint(plain)
    assert FeatureContract.from_dict(again["feature_contract"]) == CONTRACT
    assert torch.equal(again["model_state"]["weight"], model.weight)

    spec = ModelSpec({"name": "mean_pool"}, WIDTH, 2)
    arrays = ArrayRecord(model.state_dict())
    store = CheckpointStore(tmp_path / "fed")
    store.set_feature_contract(CONTRACT.to_json())  # the round loop may pass the object, a dict or JSON
    written = dict(store.save(1, arrays, spec.to_json(), metric_value=0.5))
    for kind in ("round", "last", "best"):
        assert FeatureContract.from_dict(load_checkpoint(written[kind])["feature_contract"]) == CONTRACT
    assert store.load_last()["round"] == 1
    other = CheckpointStore(tmp_path / "fed")
    other.set_feature_contract(FeatureContract(feature_dim=WIDTH, encoder="gigapath"))
    with pytest.raises(ValueError, match="feature contract changed .*encoder 'uni2_h' -> 'gigapath'"):
        other.load_last()


def _manifest_run(tmp_path: Path, attrs_of) -> Path:
    lines = ["slide_id,patient_id,label"]
    for i in range(12):
        _h5(tmp_path / "features" / f"s{i:02d}.h5", attrs_of(i), n=4 + i % 3)
        lines.append(f"s{i:02d},P{i},{'MSI' if i % 2 else 'MSS'}")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "train.yaml"
    cfg.write_text("output_dir: out\ndataset: manifest\n"
                   "data: {manifest: manifest.csv, features_dir: features, classes: [MSS, MSI]}\n"
                   "model: {name: mean_pool}\ntrain: {epochs: 1, lr: 1.0e-3, progress: false, device: cpu}\n"
                   "split: {val_fraction: 0.25, test_fraction: 0.25, seed: 0}\n")
    return cfg


@pytest.mark.usefixtures("one_torch_thread")
def test_train_records_the_contract_and_refuses_mixed_features(tmp_path, capsys):
    from tdamil.train.cli import main as train_main

    cfg = _manifest_run(tmp_path, lambda i: UNI2)
    assert train_main(["--config", str(cfg)]) == 0
    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(tmp_path / "out" / "mean_pool" / name)
        assert FeatureContract.from_dict(ckpt["feature_contract"]) == CONTRACT

    mixed = tmp_path / "mixed"
    cfg = _manifest_run(mixed, lambda i: UNI2 | ({"target_magnification": 40} if i == 7 else {}))
    assert train_main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert "s07.h5: target_magnification is 40, but" in line and "has 20" in line and "Traceback" not in err
    assert not (mixed / "out" / "mean_pool" / "last.pt").exists()  # refused before training


def test_predict_refuses_features_outside_the_checkpoint_contract(tmp_path):
    site = tmp_path / "site"
    for i, attrs in enumerate([UNI2, UNI2 | {"encoder": "gigapath"}]):
        _h5(site / "features" / f"s{i}.h5", attrs)
    (site / "manifest.csv").write_text("slide_id,patient_id,label\ns0,p0,MSS\ns1,p1,MSI\n")
    (site / "site.yaml").write_text("site: site_b\ndata: {manifest: manifest.csv, features_dir: features}\n"
                                    "extraction: {encoder: tiny}\n")
    from tdamil.models import create_model

    model = create_model({"name": "mean_pool"}, in_dim=WIDTH, num_classes=2)
    ckpt = save_checkpoint(tmp_path / "run" / "best.pt", model, feature_contract=CONTRACT.to_dict())
    run = subprocess.run([sys.executable, "-m", "tdamil.predict", "--checkpoint", str(ckpt), "--config",
                          str(site / "site.yaml"), "--out", str(tmp_path / "preds"), "--no-heatmaps"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    origin = checkpoint_origin(ckpt)
    assert (f"{site / 'features' / 's1.h5'}: encoder is 'gigapath', the model expects 'uni2_h' "
            f"({origin.where}.encoder)") in lines[0], lines[0]
    assert not (tmp_path / "preds" / "predictions.csv").exists()
