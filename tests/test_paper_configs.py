"""The paper's tasks as ready configs (configs/examples/sim_*.yaml), checked on synthetic features
with the paper's cohort names and sizes: the config loads unchanged from a copy of the repository
layout, sites and held-out cohorts resolve, a fold is patient-level and stratified (coverage of
all folds: tests/test_sim_crossval.py), and (CAMELYON17, the natural 5-centre federation) one very short run of one fold ends
with its comparison report. Features are tiny (4 patches x 8 dims), hard links to a few template files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tdamil.simulation.config import load_sim_config
from tdamil.simulation.folds import fold_datasets

REPO = Path(__file__).resolve().parents[1]

# config -> (data folder, classes, {cohort: slides}, slides per patient, positive share, held-out cohorts)
TASKS = {
    "sim_msi_tcga.yaml": ("msi", ["MSS", "MSI"], {"TCGA-CRC": 457, "TCGA-STAD": 361, "TCGA-UCEC": 545,
                                                  "CPTAC-COAD": 105}, 1, 0.15, ["CPTAC-COAD"]),
    "sim_camelyon17.yaml": ("camelyon17", ["negative", "tumor"], {f"centre_{i}": 100 for i in range(5)}, 5, 0.4, []),
    "sim_her2.yaml": ("her2", ["negative", "positive"], {"TCGA-BRCA": 693, "BCNB": 1058}, 1, 0.25, []),
}


def _write_task(root: Path, config: str) -> Path:
    """Copy the config to root/configs/examples and write its manifest and features under root/data."""
    folder, classes, cohorts, per_patient, pos_share, _ = TASKS[config]
    (root / "configs" / "examples").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "configs" / "examples" / config, root / "configs" / "examples" / config)
    data = root / "data" / folder
    feats = data / "features_uni"
    feats.mkdir(parents=True)
    rng = np.random.default_rng(0)
    templates = []
    for label in range(2):
        for v in range(2):
            path = data / f"template_{label}_{v}.h5"
            with h5py.File(path, "w") as f:
                f["features"] = (rng.normal(size=(4, 8)) + 1.5 * label).astype(np.float32)
                f["coords"] = np.arange(8, dtype=np.int64).reshape(4, 2)
            templates.append(path)
    lines = ["slide_id,patient_id,label,cohort"]
    for cohort, n in cohorts.items():
        n_patients = n // per_patient
        positive = rng.permutation(n_patients) < round(pos_share * n_patients)
        for s in range(n):
            p = s // per_patient
            label = int(positive[p])
            slide = f"{cohort}-{s:04d}"
            lines.append(f"{slide},{cohort}-P{p:04d},{classes[label]},{cohort}")
            os.link(templates[2 * label + s % 2], feats / f"{slide}.h5")
    (data / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "configs" / "examples" / config


@pytest.mark.parametrize("config", sorted(TASKS))
def test_paper_config_resolves_sites_held_out_and_patient_folds(tmp_path, config):
    _, _, cohorts, per_patient, _, held_out = TASKS[config]
    cfg = load_sim_config(_write_task(tmp_path, config))
    assert cfg.folds == 5 and cfg.data.source == "manifest"
    assert cfg.output_dir.is_relative_to(tmp_path)  # relative paths resolve against the config's folder
    sites_expected = [c for c in cohorts if c not in held_out]
    assert cfg.data.manifest.sites == sites_expected and cfg.data.manifest.held_out == held_out
    assert cfg.federation.min_sites == len(sites_expected)
    sites, held, in_dim = fold_datasets(cfg, 0)
    assert in_dim == 8 and list(sites) == sites_expected
    assert {k: len(v) for k, v in held.items()} == {c: cohorts[c] for c in held_out}  # never split
    for name, site in sites.items():
        parts = [site.train, site.val, site.test]
        assert sum(len(p) for p in parts) == cohorts[name]
        patients = [set(p.patient_ids) for p in parts]
        assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
        assert abs(len(site.test) - cohorts[name] / 5) <= per_patient * 2
        assert 0 < sum(site.test.labels) < len(site.test)  # stratified: both classes in the test fold


@pytest.mark.slow
def test_camelyon17_config_runs_a_short_cross_validation(tmp_path):
    """The CAMELYON17 config, unchanged but for size: tiny model, 1 round, fold 0 of 2 (the loop over
    folds and its summary are tested with a stand-in run in tests/test_sim_crossval.py)."""
    from tdamil.simulation.cli import main

    path = _write_task(tmp_path, "sim_camelyon17.yaml")
    text = path.read_text().replace("folds: 5", "folds: 2").replace("rounds: 30", "rounds: 1")
    text = text.replace("{name: tdamil, dim: 512, depth: 2, num_heads: 8}", "{name: tdamil, dim: 16, depth: 1, num_heads: 2}")
    path.write_text(text.replace("torch_threads: null", "torch_threads: 1").replace("lr: 1.0e-5", "lr: 1.0e-3"))
    threads = torch.get_num_threads()
    try:
        assert main(["--config", str(path), "--fold", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "runs" / "camelyon17_sim"
    doc = json.loads((out / "comparison.json").read_text())
    assert [r["evaluated_on"] for r in doc["rows"]] == [f"centre_{i}" for i in range(5)]
    assert sum(r["slides"] for r in doc["rows"]) == 250  # fold 0 of 2 tests half the patients of every centre
    assert all(r["slides"] == 5 * r["patients"] for r in doc["rows"])  # a patient's 5 slides stay together
    assert doc["pairs"][0]["auroc_method"] == "paired patient-level bootstrap"  # not DeLong: 5 slides per patient
