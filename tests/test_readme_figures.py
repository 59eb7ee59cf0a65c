"""The README's main-job figures are generated from the recorded run and a fresh run lands in them.

* the README block equals what benchmarks/readme_figures.py renders from
  benchmarks/results/sim_digits.json (fails when someone edits one without the other);
* the recorded run was made with the current configs/sim_digits.yaml (fails when the config changes
  and the figures were not regenerated: ``python benchmarks/readme_figures.py --run``);
* the simulation is deterministic for a seed: two tiny runs give identical comparison.json files;
* a fresh run of the main job's first seed lands inside the quoted spread, mean +- 2 sd over
  seeds, for federated, centralised and local-only (not the seed's recorded digits: CPUs differ in
  float order). One seed, not all three: the whole job was the suite's longest test (~130 s, 200 s
  of CPU); ``benchmarks/readme_figures.py --check`` checks a whole run by hand.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def _figures():
    spec = importlib.util.spec_from_file_location("readme_figures", REPO / "benchmarks" / "readme_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_figures_are_rendered_from_the_recorded_run():
    fig = _figures()
    doc = json.loads(fig.RESULTS.read_text())
    assert fig.readme_block(fig.README.read_text()) == fig.render(doc), (
        "README figures differ from benchmarks/results/sim_digits.json; regenerate with "
        "python benchmarks/readme_figures.py --run")
    assert doc["recorded"]["config_sha256"] == fig.config_sha256(), (
        "configs/sim_digits.yaml changed since the recorded run; regenerate with python benchmarks/readme_figures.py --run")


@pytest.mark.slow
def test_simulation_is_deterministic_for_a_seed(tmp_path):
    from tdamil.simulation.cli import main

    cfg = {
        "model": {"name": "tdamil", "dim": 16, "depth": 1, "num_heads": 2},
        "data": {"source": "digits", "digits": {"num_sites": 2, "site_test_bags": 16, "bags": {
            "num_train_bags": 12, "num_val_bags": 6, "num_test_bags": 16, "mean_bag_size": 5, "seed": 3}}},
        "federation": {"rounds": 2, "lr": 0.002, "min_sites": 2},
        "train": {"progress": False, "seed": 0},
    }
    docs = []
    threads = torch.get_num_threads()
    try:
        for run in ("a", "b"):
            (tmp_path / f"{run}.yaml").write_text(yaml.safe_dump(cfg | {"output_dir": str(tmp_path / run)}))
            assert main(["--config", str(tmp_path / f"{run}.yaml")]) == 0
            docs.append(json.loads((tmp_path / run / "comparison.json").read_text()))
    finally:
        torch.set_num_threads(threads)
    assert docs[0] == docs[1]
    assert docs[0]["rows"][0]["federated_auroc_ci_low"] is not None


def test_spread_check_flags_only_a_run_outside_mean_2sd():
    fig = _figures()
    ref = {"site_mean_auroc": {k: {"mean": 0.9, "sd": 0.01} for k in fig.MODELS}}
    fresh = {"site_mean_auroc": {k: {"mean": 0.9, "sd": 0.0} for k in fig.MODELS}}
    assert fig.outside_spread(ref, fresh) == []
    fresh["site_mean_auroc"]["centralised_auroc"]["mean"] = 0.919
    assert fig.outside_spread(ref, fresh) == []
    fresh["site_mean_auroc"]["local_own_auroc"]["mean"] = 0.875
    problems = fig.outside_spread(ref, fresh)
    assert len(problems) == 1 and problems[0].startswith("local-only: 0.875")


@pytest.mark.slow
def test_fresh_main_job_lands_inside_the_quoted_spread(tmp_path):
    """The main job's config as the README runs it, its first seed (~70 s of CPU), checked against the
    README's spread; a model's fresh figure outside the recorded mean +- 2 sd fails."""
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "tdamil-simulate"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tdamil.simulation.cli"]
    subprocess.run(cmd + ["--config", str(REPO / "configs" / "sim_digits.yaml"), "--output-dir", str(tmp_path),
                          "--seeds", "0"], check=True, cwd=REPO, capture_output=True)
    fig = _figures()
    fresh = json.loads((tmp_path / "seeds_summary.json").read_text())
    assert fresh["seeds"] == 1 and len(fresh["site_mean_auroc"]["federated_auroc"]["seeds"]) == 1
    assert fig.outside_spread(json.loads(fig.RESULTS.read_text()), fresh) == []
