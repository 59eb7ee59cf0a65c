"""The simulation's comparison report: CIs in CSV / JSON / markdown / plots, paired tests, verdicts."""

from __future__ import annotations

import csv
import json

import numpy as np

from tdamil.simulation.report import (CISettings, TargetPredictions, comparison_figure, comparison_row, paired_rows,
                                      write_comparison)


def _target(name, rng, n=120, strong=True, local=True):
    y = np.r_[np.ones(n // 2, int), np.zeros(n // 2, int)]
    good = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 2.5 * y)))
    close = np.clip(good + rng.normal(0, 0.02, n), 0, 1)
    weak = 1 / (1 + np.exp(-rng.normal(0, 1, n)))
    probs = {"federated": good, "centralised": close}
    if local:
        probs["local_own"] = weak if strong else close
    return TargetPredictions(name, y, [f"{name}-p{i}" for i in range(n)],
                             {k: np.stack([1 - v, v], 1) for k, v in probs.items()}, local_mean_auroc=0.6)


def test_report_has_intervals_everywhere_and_plain_verdicts(tmp_path):
    rng = np.random.default_rng(0)
    ci = CISettings(n_resamples=500, seed=1)
    targets = [_target("site_a", rng), _target("held-out:ext", rng, local=False)]
    rows = [comparison_row(t, ci) for t in targets]
    pairs = [p for t in targets for p in paired_rows(t, ci)]
    write_comparison(rows, pairs, tmp_path, budget=10, ci=ci)

    table = list(csv.DictReader(open(tmp_path / "comparison.csv")))
    a = table[0]
    assert float(a["federated_auroc_ci_low"]) < float(a["federated_auroc"]) < float(a["federated_auroc_ci_high"])
    assert {"centralised_f1_ci_high", "local_own_balanced_accuracy_ci_low"} <= set(a)
    assert table[1]["local_own_auroc"] == ""  # no local model of a held-out cohort: an empty cell
    assert "nan" not in (tmp_path / "comparison.csv").read_text().lower()
    doc = json.loads((tmp_path / "comparison.json").read_text())
    assert doc["bootstrap"] == {"unit": "patient", "stratified_by": "class", "resamples": 500, "level": 0.95, "seed": 1}
    assert [(p["a"], p["b"]) for p in doc["pairs"]] == [
        ("federated", "centralised"), ("federated", "local_own"), ("centralised", "local_own"),
        ("federated", "centralised")]
    assert doc["pairs"][0]["auroc_method"] == "DeLong" and doc["pairs"][0]["auroc_p_holm"] >= doc["pairs"][0]["auroc_p"]
    md = (tmp_path / "comparison.md").read_text()
    fed_vs_cen = next(line for line in md.splitlines() if line.startswith("| site_a | federated vs centralised"))
    assert fed_vs_cen.endswith("| cannot be told apart |")
    fed_vs_loc = next(line for line in md.splitlines() if line.startswith("| site_a | federated vs local own"))
    assert fed_vs_loc.endswith("| federated better |")
    lo, hi = float(a["federated_auroc_ci_low"]), float(a["federated_auroc_ci_high"])
    assert f"({lo:.3f}-{hi:.3f})" in md
    assert (tmp_path / "plots" / "comparison_held-out_ext.png").stat().st_size > 1000


def test_coordinator_heldout_evaluation_reports_intervals():
    import torch

    from tdamil.data.bags import InMemoryBagDataset
    from tdamil.federation.task import ModelSpec, build_model, model_to_arrays
    from tdamil.server.server_app import make_heldout_evaluate

    rng = np.random.default_rng(0)
    labels = [0, 1] * 10
    ds = InMemoryBagDataset([rng.normal(size=(3, 6)) + y for y in labels], labels)
    spec = ModelSpec({"name": "mean_pool"}, in_dim=6)
    with torch.no_grad():
        metrics = make_heldout_evaluate(spec, {"ext": ds})(1, model_to_arrays(build_model(spec)))["ext"]
    assert metrics["n"] == 20 and {"auroc_ci_low", "auroc_ci_high", "f1_ci_low"} <= set(metrics)
    assert metrics["auroc_ci_low"] <= metrics["auroc"] <= metrics["auroc_ci_high"]


def test_the_plot_draws_no_bar_for_a_missing_value_and_no_error_bar_without_an_interval():
    """Held-out cohort: no local model of its own (n/a in the table) and a local mean without a CI."""
    rng = np.random.default_rng(0)
    row = comparison_row(_target("held-out:ext", rng, local=False), CISettings(n_resamples=200, seed=1))
    ax = comparison_figure(row).axes[0]
    bars = {round(p.get_x() + p.get_width() / 2): p.get_height() for p in ax.patches}
    assert sorted(bars) == [0, 1, 3]  # federated, centralised, local mean; no bar at local own (index 2)
    assert bars[3] == 0.6 and all(h > 0 for h in bars.values())
    texts = {round(t.get_position()[0]): t.get_text() for t in ax.texts}
    assert texts[2] == "n/a" and texts[3] == "0.600"
    # error bars (with caps) only on the two models with a bootstrap interval
    caps_x = sorted({round(float(x)) for line in ax.lines for x in line.get_xdata()})
    assert caps_x == [0, 1]
