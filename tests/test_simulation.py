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
    # every compared model's relevance map checked on its validation bags (label-free), in every output
    import json

    maps = json.loads((out / "comparison.json").read_text())["relevance_maps"]
    assert set(maps["local_own"]) == {"site_a", "site_b"} and maps["federated"]["bags"] == "validation"
    for r in rows:
        assert r["federated_map"] in {"faithful", "not faithful", "n/a"} and r["federated_map"] == maps["federated"]["verdict"]
    assert rows[2]["local_own_map"] == ""  # no local model of a held-out cohort
    assert "## Relevance maps: are they faithful?" in (out / "comparison.md").read_text()
    assert "Relevance maps: the deletion check" in (out / "report.html").read_text()


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


def test_digits_sites_can_differ_like_hospitals():
    """Per-site training-set sizes, positive shares, bag sizes and a scanner / stain shift (an affine
    map of the features per hospital, the held-out cohort one more); off by default, the same bags."""
    import numpy as np

    from tdamil.data.digits import DigitsBagsConfig, make_digits_sites

    cfg = DigitsBagsConfig(num_train_bags=20, num_val_bags=10, num_test_bags=40, seed=2)
    plain = make_digits_sites(cfg, 3, site_test_bags=30)
    kw = dict(site_train_bags=[8, 20, 40], site_positive_fractions=[0.2, 0.5, 0.7], site_mean_bag_sizes=[6, 10, 16])
    same = make_digits_sites(cfg, 3, site_test_bags=30, **kw)
    shifted = make_digits_sites(cfg, 3, site_test_bags=30, feature_offset=0.2, feature_scale=0.3, **kw)
    assert [len(s.train) for s in same.values()] == [8, 20, 40]
    assert [round(np.mean(s.test.labels), 1) for s in same.values()] == [0.2, 0.5, 0.7]
    sizes = [np.mean(s.test.bag_sizes) for s in same.values()]
    assert sizes[0] < 8 < sizes[1] < 12 < sizes[2]
    # defaults keep the old sites bag for bag
    assert torch.equal(make_digits_sites(cfg, 3, site_test_bags=30)["site_b"].train[3].features,
                       plain["site_b"].train[3].features)
    maps = []
    for name in ("site_a", "site_c"):  # the shift changes the features only: same bags, same labels
        x0, x1 = same[name].test[0].features.numpy(), shifted[name].test[0].features.numpy()
        assert shifted[name].test.labels == same[name].test.labels and not np.allclose(x0, x1)
        both = np.vstack([same[name].test[i].features.numpy() for i in range(len(same[name].test))])
        seen = np.vstack([shifted[name].test[i].features.numpy() for i in range(len(shifted[name].test))])
        col = int(np.argmax(both.std(0)))  # one feature: x -> x * s + o with s > 0
        s, o = np.polyfit(both[:, col], seen[:, col], 1)
        assert s > 0 and np.allclose(both[:, col] * s + o, seen[:, col], atol=1e-5)
        maps.append((round(s, 4), round(o, 4)))
    assert maps[0] != maps[1]  # each hospital its own map
    held0, held1 = same.held_out[0].features.numpy(), shifted.held_out[0].features.numpy()
    assert held0.shape == held1.shape and not np.allclose(held0, held1)
    with pytest.raises(ValueError, match="one value per site"):
        make_digits_sites(cfg, 3, site_train_bags=[8, 20])


def test_seeds_run_the_simulation_once_per_seed_with_a_summary(tmp_path):
    import json

    cfg = {
        "output_dir": str(tmp_path / "sim"), "seeds": [0, 1],
        "model": {"name": "tdamil", "dim": 16, "depth": 1, "num_heads": 2},
        "data": {"source": "digits", "digits": {
            "num_sites": 2, "site_test_bags": 16, "site_train_bags": [6, 10], "site_positive_fractions": [0.3, 0.6],
            "feature_offset": 0.1, "feature_scale": 0.1,
            "bags": {"num_train_bags": 8, "num_val_bags": 4, "num_test_bags": 16, "mean_bag_size": 5}}},
        "federation": {"rounds": 1, "lr": 0.002, "min_sites": 2},
        "train": {"device": "cpu", "progress": False},
    }
    _simulate(tmp_path / "sim.yaml", cfg)
    out = tmp_path / "sim"
    runs = [json.loads((out / f"seed_{s}" / "comparison.json").read_text()) for s in (0, 1)]
    assert runs[0]["rows"][0]["federated_auroc"] != runs[1]["rows"][0]["federated_auroc"]  # another draw
    doc = json.loads((out / "seeds_summary.json").read_text())
    assert doc["seed_values"] == [0, 1] and [r["seed"] for r in doc["per_seed"]] == [0, 1]
    fed = doc["site_mean_auroc"]["federated_auroc"]
    assert fed["seeds"] == [r["site_mean_auroc"]["federated_auroc"] for r in runs]
    assert abs(fed["mean"] - sum(fed["seeds"]) / 2) < 1e-12 and fed["sd"] >= 0
    pooled = {(p["evaluated_on"], p["a"], p["b"]): p for p in doc["pooled_pairs"]}
    p = pooled[("site_a", "federated", "local_own")]
    assert len(p["auroc_diff_per_seed"]) == 2 and p["auroc_diff_p_holm"] >= p["auroc_diff_p"]
    assert "Paired tests over seeds and slides" in (out / "seeds_summary.md").read_text()
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(dict(cfg, seeds=[1, 1])))
    assert main(["--config", str(path)]) == 2  # repeated seeds: a clear error


def test_pooled_difference_widens_with_disagreeing_seeds():
    from tdamil.simulation.compare import pooled_difference

    agree = pooled_difference([0.10, 0.09, 0.11], [0.03, 0.03, 0.03])
    assert agree["tau2"] == 0 and abs(agree["estimate"] - 0.10) < 1e-9 and agree["p"] < 1e-6
    split = pooled_difference([0.10, -0.08, 0.12], [0.03, 0.03, 0.03])
    assert split["tau2"] > 0 and split["high"] - split["low"] > agree["high"] - agree["low"] and split["p"] > 0.05
