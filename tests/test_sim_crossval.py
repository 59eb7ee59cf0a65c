"""Federated k-fold CV: patient-level folds stratified within each site, held-out cohorts never
split, a manifest fold column honoured; the summary's mean +- sd over folds."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest

from tdamil.config import ConfigError
from tdamil.simulation.config import load_sim_config
from tdamil.simulation.crossval import summarise_folds
from tdamil.simulation.folds import fold_datasets


def _manifest_task(tmp_path, fold_column=False):
    """Two sites (A: 12 patients x 2 slides, B: 15 patients x 1 slide) and a held-out cohort H (6)."""
    feats = tmp_path / "features"
    feats.mkdir()
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f["features"] = np.ones((3, 4), np.float32)
    rows = ["slide_id,patient_id,label,cohort" + (",fold" if fold_column else "")]
    for cohort, patients, per in (("A", 12, 2), ("B", 15, 1), ("H", 6, 1)):
        for p in range(patients):
            for s in range(per):
                sid = f"{cohort}{p}_{s}"
                (feats / f"{sid}.h5").hardlink_to(tmp_path / "t.h5")
                rows.append(f"{sid},{cohort}{p},{'pos' if p % 3 == 0 else 'neg'},{cohort}" + (f",{p % 3}" if fold_column else ""))
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "sim.yaml"
    cfg.write_text(f"""
model: {{name: tdamil, dim: 16, depth: 1, num_heads: 2}}
folds: 3
data:
  source: manifest
  manifest:
    data: {{manifest: m.csv, features_dir: features}}
    sites: [A, B]
    held_out: [H]
    val_fraction: 0.25
federation: {{rounds: 1, min_sites: 2}}
""")
    return load_sim_config(cfg)


def test_manifest_folds_are_patient_level_stratified_and_cover_each_site_once(tmp_path):
    cfg = _manifest_task(tmp_path)
    tested = {"A": [], "B": []}
    for fold in range(3):
        sites, held, _ = fold_datasets(cfg, fold)
        assert list(held) == ["H"] and len(held["H"]) == 6  # never split
        for name, site in sites.items():
            sets = [set(site.train.patient_ids), set(site.val.patient_ids), set(site.test.patient_ids)]
            assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
            assert len(site.val) > 0 and 0 < sum(site.test.labels) < len(site.test)
            tested[name] += site.test.slide_ids
        a_test = sites["A"].test.slide_ids
        assert all(f"{s[:-1]}{1 - int(s[-1])}" in a_test for s in a_test)  # both slides of a patient together
    assert sorted(tested["A"]) == sorted(f"A{p}_{s}" for p in range(12) for s in range(2))
    assert sorted(tested["B"]) == sorted(f"B{p}_0" for p in range(15))
    with pytest.raises(ConfigError, match="fold 3 does not exist"):
        fold_datasets(cfg, 3)


def test_manifest_fold_column_fixes_the_folds(tmp_path):
    cfg = _manifest_task(tmp_path, fold_column=True)
    sites, _, _ = fold_datasets(cfg, 1)
    assert sorted(set(sites["B"].test.patient_ids)) == sorted(f"B{p}" for p in range(15) if p % 3 == 1)


def test_fold_setting_is_checked(tmp_path):
    (tmp_path / "bad.yaml").write_text("folds: 1\n")
    with pytest.raises(ConfigError, match="'folds' is 1"):
        load_sim_config(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("folds: 3\nfold: 3\n")
    with pytest.raises(ConfigError, match="'fold' is 3"):
        load_sim_config(tmp_path / "bad2.yaml")


def test_digits_folds_pool_each_sites_bags(tmp_path):
    (tmp_path / "d.yaml").write_text("""
folds: 4
data: {source: digits, digits: {num_sites: 2, site_test_bags: 8, bags: {num_train_bags: 12, num_val_bags: 4, num_test_bags: 10}}}
federation: {rounds: 1, min_sites: 2}
""")
    cfg = load_sim_config(tmp_path / "d.yaml")
    seen = []
    for fold in range(4):
        sites, held, _ = fold_datasets(cfg, fold)
        assert len(held["held_out"]) == 10
        site = sites["site_a"]
        assert len(site.train) + len(site.val) + len(site.test) == 24 and len(site.test) == 6
        seen += site.test.slide_ids
    assert len(set(seen)) == 24


def test_summary_mean_and_sample_sd_over_folds():
    def row(target, auc):
        r = {"evaluated_on": target, "slides": 10}
        for m in ("federated", "centralised", "local_own"):
            for k in ("auroc", "balanced_accuracy", "f1"):
                r[f"{m}_{k}"] = auc
        r["local_mean_auroc"] = auc
        return r
    s = summarise_folds([[row("a", 0.7), row("held-out:h", 0.6)], [row("a", 0.9), row("held-out:h", 0.8)]])
    fed = s["per_target"]["a"]["federated_auroc"]
    assert fed["mean"] == pytest.approx(0.8) and fed["sd"] == pytest.approx(math.sqrt(0.02))  # ddof 1
    assert s["per_target"]["held-out:h"]["local_own_f1"]["folds"] == [0.6, 0.8]
    assert s["site_mean_auroc"]["federated_auroc"]["mean"] == pytest.approx(0.8)  # held-out excluded


def test_crossval_runs_every_fold_and_writes_the_summary(tmp_path):
    """The loop over folds with a stand-in for the per-fold simulation (the real one is tested in
    tests/test_paper_configs.py and tests/test_simulation.py)."""
    import csv
    import json
    from dataclasses import replace as dc_replace

    from tdamil.simulation.config import SimConfig
    from tdamil.simulation.crossval import crossval

    calls = []

    def one_fold(cfg, *, resume, out_dir):
        calls.append((cfg.fold, out_dir))
        r = {"evaluated_on": "site_a", "slides": 10, "patients": 10}
        for m in ("federated", "centralised", "local_own"):
            for k in ("auroc", "balanced_accuracy", "f1"):
                r.update({f"{m}_{k}": 0.7 + 0.1 * cfg.fold, f"{m}_{k}_ci_low": 0.5, f"{m}_{k}_ci_high": 0.95})
        r["local_mean_auroc"] = 0.6
        return {"out_dir": str(out_dir), "federation_seconds": 1.0, "comparison": [r]}

    cfg = dc_replace(SimConfig(), folds=3, output_dir=tmp_path)
    summary = crossval(cfg, one_fold)
    assert [c[0] for c in calls] == [0, 1, 2] and calls[2][1] == tmp_path / "fold_2"
    doc = json.loads((tmp_path / "cv_summary.json").read_text())
    assert doc["per_target"]["site_a"]["federated_auroc"]["mean"] == pytest.approx(0.8)
    assert doc["per_target"]["site_a"]["federated_auroc"]["sd"] == pytest.approx(0.1)
    md = (tmp_path / "cv_summary.md").read_text()
    assert "| site_a | 0.800 ± 0.100 |" in md and "| 2 | site_a | 10 | 0.900 (0.500-0.950) |" in md
    assert [r["fold"] for r in csv.DictReader(open(tmp_path / "cv_folds.csv"))] == ["0", "1", "2"]
    assert summary["federation_seconds"] == 3.0


@pytest.mark.slow
def test_two_folds_run_at_once_in_their_own_processes(tmp_path):
    """fold_workers: 2 with the real per-fold simulation (tiny digits, 1 round): both folds run in
    spawned processes and their results come back into the summary; not allowed with Ray."""
    import json

    import torch
    import yaml

    from tdamil.simulation.cli import main

    cfg = {
        "output_dir": str(tmp_path / "cv"), "folds": 2, "fold_workers": 2,
        "model": {"name": "tdamil", "dim": 16, "depth": 1, "num_heads": 2},
        "data": {"source": "digits", "digits": {"num_sites": 2, "site_test_bags": 6, "bags": {
            "num_train_bags": 8, "num_val_bags": 4, "num_test_bags": 8, "mean_bag_size": 5}}},
        "federation": {"rounds": 1, "lr": 0.002, "min_sites": 2},
        "train": {"progress": False},
    }
    (tmp_path / "cv.yaml").write_text(yaml.safe_dump(cfg))
    threads = torch.get_num_threads()
    try:
        assert main(["--config", str(tmp_path / "cv.yaml")]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads((tmp_path / "cv" / "cv_summary.json").read_text())
    assert len(doc["per_target"]["site_a"]["federated_auroc"]["folds"]) == 2
    assert (tmp_path / "cv" / "fold_1" / "comparison.md").is_file()
    (tmp_path / "ray.yaml").write_text(yaml.safe_dump(cfg | {"engine": "ray"}))
    with pytest.raises(ConfigError, match="fold_workers"):
        load_sim_config(tmp_path / "ray.yaml")


def test_digits_folds_take_the_hospital_options_but_not_site_train_bags(tmp_path):
    """Shift, per-site label share, bag size and site_split shape the pooled bags in CV as in one run;
    site_train_bags is refused with the reason (the folds re-cut each site's whole pool)."""
    body = """
folds: 3
data: {{source: digits, digits: {{num_sites: 2, site_test_bags: 12, site_positive_fractions: [0.25, 0.5],
  site_mean_bag_sizes: [6, 12], feature_offset: 0.1, feature_scale: 0.2, site_split: [0.3, 0.3, 0.4],{extra}
  bags: {{num_train_bags: 12, num_val_bags: 4, num_test_bags: 10}}}}}}
federation: {{rounds: 1, min_sites: 2}}
"""
    (tmp_path / "ok.yaml").write_text(body.format(extra=""))
    cfg = load_sim_config(tmp_path / "ok.yaml")
    sites, held, _ = fold_datasets(cfg, 0)
    a, b = sites["site_a"], sites["site_b"]
    size = {k: np.mean([len(s.train[i].features) for i in range(len(s.train))]) for k, s in (("a", a), ("b", b))}
    assert size["a"] < size["b"]  # bag sizes 6 vs 12
    pooled = [s[i].features for s in (a.train, a.val, a.test) for i in range(len(s))]
    assert min(float(f.min()) for f in pooled) < 0.0 or max(float(f.max()) for f in pooled) > 1.0  # shifted pixels
    (tmp_path / "bad.yaml").write_text(body.format(extra=" site_train_bags: [8, 12],"))
    with pytest.raises(ConfigError, match="site_train_bags.*pools each site's train, val and test bags"):
        load_sim_config(tmp_path / "bad.yaml")
