"""``tdamil-simulate`` runs end to end: digits sites (in-process Grid) with baselines, and a
dataset-as-site manifest simulation with a held-out cohort. Tiny sizes."""

from __future__ import annotations

import csv
import os

import pytest
import torch
import yaml

from tdamil.simulation.cli import main


def _simulate(path, cfg: dict) -> None:
    """Write ``cfg`` to ``path`` and run ``tdamil-simulate`` on it (it sets torch's thread count:
    the test's own setting is put back afterwards)."""
    path.write_text(yaml.safe_dump(cfg))
    threads = torch.get_num_threads()
    try:
        assert main(["--config", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)


def test_simulate_command_writes_comparison_and_plots(tmp_path):
    cfg = {
        "output_dir": str(tmp_path / "sim"),
        "model": {"name": "tdamil", "dim": 16, "depth": 1, "num_heads": 2},
        "data": {"source": "digits", "digits": {"num_sites": 2, "site_test_bags": 20, "bags": {
            "num_train_bags": 16, "num_val_bags": 8, "num_test_bags": 30, "mean_bag_size": 6}}},
        "federation": {"rounds": 2, "lr": 0.002, "min_sites": 2},
        "train": {"device": "cpu", "progress": False},
    }
    _simulate(tmp_path / "sim.yaml", cfg)
    out = tmp_path / "sim"
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert [r["evaluated_on"] for r in rows] == ["site_a", "site_b", "held-out:held_out"]
    for r in rows:
        assert 0.0 <= float(r["federated_auroc"]) <= 1.0 and 0.0 <= float(r["centralised_auroc"]) <= 1.0
    assert "| site_a |" in (out / "comparison.md").read_text()
    assert len(list((out / "plots").glob("comparison_*.png"))) == 3
    assert (out / "checkpoints" / "last.pt").exists() and (out / "audit.jsonl").exists()


def test_manifest_cohorts_become_sites_with_one_held_out(tmp_path, capsys):
    from tdamil.federation.demo import write_demo_federation

    write_demo_federation(tmp_path / "demo", num_sites=3, train_bags=6, val_bags=3, test_bags=3, heldout_bags=4)
    # one manifest over all cohorts: site_a and site_b train, site_c is held out at the server
    lines = []
    for i, site in enumerate(("site_a", "site_b", "site_c")):
        text = (tmp_path / "demo" / site / "manifest.csv").read_text().splitlines()
        lines += text[1:] if i else text
    feats = tmp_path / "all_features"
    feats.mkdir()
    for site in ("site_a", "site_b", "site_c"):
        for f in (tmp_path / "demo" / site / "features").glob("*.h5"):
            (feats / f.name).symlink_to(f)
    (tmp_path / "all.csv").write_text("\n".join(lines) + "\n")
    cfg = {
        "output_dir": str(tmp_path / "sim"), "baselines": False,
        "model": {"name": "tdamil", "dim": 16, "depth": 1, "num_heads": 2},
        "data": {"source": "manifest", "manifest": {
            "data": {"manifest": str(tmp_path / "all.csv"), "features_dir": str(feats)},
            "held_out": ["site_c"]}},
        "federation": {"rounds": 1, "lr": 0.002, "min_sites": 2},
        "train": {"device": "cpu", "progress": False},
    }
    _simulate(tmp_path / "sim.yaml", cfg)
    import json

    rows = [json.loads(x) for x in (tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()]
    assert {r["site"] for r in rows if r["phase"] == "train"} == {"site_a", "site_b"}
    assert {r["site"] for r in rows if r["phase"] == "heldout"} == {"site_c"}
    bad = dict(cfg)
    bad["data"] = {"source": "manifest", "manifest": dict(cfg["data"]["manifest"], held_out=["nowhere"])}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["--config", str(path)]) == 2  # an unknown cohort is a clear error, no traceback
    err = capsys.readouterr().err
    assert "nowhere" in err and "site_a" in err


@pytest.mark.slow
def test_ray_engine_runs_the_same_apps(tmp_path):
    """Flower's Ray simulation engine (the ``ray`` extra, installed with ``.[test]``)."""
    cfg = {
        "output_dir": str(tmp_path / "ray"), "engine": "ray", "baselines": False,
        "model": {"name": "tdamil", "dim": 16, "depth": 1, "num_heads": 2},
        "data": {"source": "digits", "digits": {"num_sites": 2, "site_test_bags": 6, "bags": {
            "num_train_bags": 6, "num_val_bags": 4, "num_test_bags": 8, "mean_bag_size": 5}}},
        "federation": {"rounds": 1, "lr": 0.002, "min_sites": 2},
        "train": {"device": "cpu", "progress": False},
    }
    env_before = dict(os.environ)
    _simulate(tmp_path / "ray.yaml", cfg)
    # Ray sets PYTHONPATH & co. in the calling process; later subprocesses must not inherit them.
    leaked = {k for k in set(os.environ) | set(env_before)
              if (k.startswith(("PYTHON", "RAY_")) and os.environ.get(k) != env_before.get(k))}
    assert not leaked, f"the Ray engine left these variables changed: {sorted(leaked)}"
    import json

    events = [json.loads(x) for x in (tmp_path / "ray" / "audit.jsonl").read_text().splitlines()]
    agg = [e for e in events if e["event"] == "aggregated"]
    assert agg and sorted(agg[0]["sites"]) == ["site_a", "site_b"]
