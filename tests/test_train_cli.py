"""tdamil-train end to end: digits and manifest datasets, --model override, k-fold, clear errors."""

import csv
import json

import numpy as np
import pytest

from tdamil.data.h5 import write_features
from tdamil.train.cli import main
from tdamil.train.instance_metrics import INSTANCE_METRIC_KEYS
from tdamil.train.metrics import METRIC_KEYS


pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = """
output_dir: out
dataset: digits
model: {{name: tdamil, dim: 16, depth: 1, num_heads: 2}}
train: {{epochs: 2, lr: 1.0e-3, progress: false, device: cpu}}
digits: {{num_train_bags: 16, num_val_bags: 8, num_test_bags: 20, mean_bag_size: 6}}
split: {{k_folds: {k}}}
"""


def test_cli_digits_writes_csv_png_json(tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(TINY.format(k=0))
    assert main(["--config", str(cfg)]) == 0
    out = tmp_path / "out" / "tdamil"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1.0", "2.0"] and "val_auroc" in rows[0]
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "test_metrics.json").read_text())
    ci_keys = {f"{k}_ci_{end}" for k in ("auroc", "balanced_accuracy", "f1") for end in ("low", "high")}
    # digits bags carry instance labels, so the patch-level metrics of s_i are reported too
    assert set(res["test"]) == set(METRIC_KEYS) | ci_keys | set(INSTANCE_METRIC_KEYS) and res["test"]["n"] == 20
    assert 0.0 <= res["test"]["inst_auroc"] <= 1.0
    assert res["test"]["auroc_ci_low"] <= res["test"]["auroc"] <= res["test"]["auroc_ci_high"]
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file() and (out / "config.yaml").is_file()
    assert len((out / "test_predictions.csv").read_text().splitlines()) == 21


def test_cli_model_override_and_kfold(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(TINY.format(k=2))
    # depth / num_heads are not mean_pool settings: dropped with a log line, not an error
    assert main(["--config", str(cfg), "--model", "mean_pool", "--epochs", "1"]) == 0
    root = tmp_path / "out" / "mean_pool"
    assert (root / "fold_0" / "metrics.csv").is_file() and (root / "fold_1" / "test_metrics.json").is_file()
    cv = json.loads((root / "cv_summary.json").read_text())
    assert cv["k_folds"] == 2 and len(cv["test"]["auroc"]["folds"]) == 2


def test_cli_manifest_dataset(tmp_path):
    rng = np.random.default_rng(0)
    feats_dir = tmp_path / "features"
    lines = ["slide_id,patient_id,label"]
    for i in range(24):
        y = i % 2
        x = rng.normal(size=(int(rng.integers(4, 12)), 8)).astype(np.float32) + y
        write_features(feats_dir / f"s{i:02d}.h5", x, np.zeros((len(x), 2), dtype=np.int64), {"name": f"s{i:02d}"})
        lines.append(f"s{i:02d},P{i // 2 if i < 12 else i},{'MSI' if y else 'MSS'}")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        "output_dir: out\ndataset: manifest\n"
        "data: {manifest: manifest.csv, features_dir: features, classes: [MSS, MSI]}\n"
        "model: {name: abmil, dim: 8, attn_dim: 4}\n"
        "train: {epochs: 2, lr: 1.0e-3, progress: false, device: cpu}\n"
        "split: {val_fraction: 0.25, test_fraction: 0.25, seed: 0}\n"
    )
    assert main(["--config", str(cfg)]) == 0
    res = json.loads((tmp_path / "out" / "abmil" / "test_metrics.json").read_text())
    assert res["relevance_map"]["verdict"] in ("faithful", "not faithful")  # ABMIL has attention to check
    assert 3 <= res["test"]["n"] <= 9


def test_cli_errors_are_clear(tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("train: {epochs: 2, lrr: 0.1}\n")
    assert main(["--config", str(cfg)]) == 2
    assert "train.lrr" in capsys.readouterr().err
    cfg.write_text(TINY.format(k=0))
    assert main(["--config", str(cfg), "--model", "resnet"]) == 2
    assert "choose one of" in capsys.readouterr().err
    cfg.write_text("dataset: manifest\ndata: {manifest: missing.csv, features_dir: f}\n")
    assert main(["--config", str(cfg)]) == 2
    assert "missing.csv" in capsys.readouterr().err


def test_shipped_configs_load():
    from pathlib import Path

    from tdamil.config import load_config
    from tdamil.models import model_config_from_dict
    from tdamil.train.cli import TrainRunConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    digits = load_config(root / "train_digits.yaml", TrainRunConfig)
    assert digits.dataset == "digits" and digits.digits.num_test_bags == 1000
    msi = load_config(root / "train_msi_example.yaml", TrainRunConfig)
    assert msi.dataset == "manifest" and msi.train.lr == 1e-5 and msi.data.classes == ["MSS", "MSI"]
    assert msi.data.manifest.is_absolute()  # resolved relative to the YAML
    for cfg in (digits, msi):
        model_config_from_dict(cfg.model, source="test")
