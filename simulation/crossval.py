"""Federated k-fold cross-validation: the whole simulation once per fold, then a summary over folds.

Fold ``f`` (sites from :mod:`tdamil.simulation.folds`) runs the federation and the same-budget
baselines into ``<output_dir>/fold_<f>/`` with its own comparison report (95 % CIs, paired tests).
The summary, in ``<output_dir>/``:

* ``cv_folds.csv``: every fold's comparison rows (with their CIs), a ``fold`` column first;
* ``cv_summary.json`` / ``cv_summary.md``: per target (each site's test fold, each held-out cohort)
  and model, the metric in every fold and its mean +- sd over folds (sample sd, ddof 1); the held-out
  cohorts are evaluated whole in every fold, so their per-fold values show how much the result
  moves with the training folds alone.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tdamil.config import json_safe
from tdamil.simulation.config import SimConfig
from tdamil.simulation.report import MODELS, site_means
from tdamil.stats import Interval, format_interval

logger = logging.getLogger(__name__)

__all__ = ["crossval", "summarise_folds"]

_METRICS = (("auroc", "AUROC"), ("balanced_accuracy", "Balanced accuracy"), ("f1", "F1"))
_LABEL = {"federated": "federated", "centralised": "centralised", "local_own": "local own"}


def _stats(values: list[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=float)
    fin = v[np.isfinite(v)]
    return {"mean": float(fin.mean()) if len(fin) else math.nan,
            "sd": float(fin.std(ddof=1)) if len(fin) > 1 else math.nan,
            "folds": [float(x) for x in v]}


def summarise_folds(fold_rows: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean +- sd over folds of every model's metrics per target, and of the site-mean AUROC."""
    targets = list(dict.fromkeys(r["evaluated_on"] for rows in fold_rows for r in rows))
    per_target: dict[str, Any] = {}
    for target in targets:
        found = [next((r for r in rows if r["evaluated_on"] == target), None) for rows in fold_rows]
        per_target[target] = {f"{m}_{k}": _stats([r[f"{m}_{k}"] if r else math.nan for r in found])
                              for m in MODELS for k, _ in _METRICS}
    means = [site_means(rows) for rows in fold_rows]
    site_mean = {k: _stats([m[k] for m in means]) for k in means[0]} if means else {}
    return {"folds": len(fold_rows), "per_target": per_target, "site_mean_auroc": site_mean}


def _pm(s: dict[str, Any]) -> str:
    if not math.isfinite(s["mean"]):
        return "n/a"
    return f"{s['mean']:.3f} ± {s['sd']:.3f}" if math.isfinite(s["sd"]) else f"{s['mean']:.3f}"


def _markdown(summary: dict[str, Any], fold_rows: list[list[dict[str, Any]]], budget: int) -> str:
    k = summary["folds"]
    lines = [f"# Federated {k}-fold cross-validation (same budget: {budget} epochs per model and fold)", "",
             f"Folds by patient, stratified by label within each site; held-out cohorts never split (evaluated whole "
             f"in every fold). Mean ± sd over the {k} folds (sample sd). Per-fold intervals are 95 % CIs from the "
             "patient-level bootstrap; paired tests per fold are in `fold_<f>/comparison.md`.", ""]
    for key, name in _METRICS:
        lines += [f"## {name}: mean ± sd over folds", "", "| evaluated on | federated | centralised | local own |",
                  "|---|---:|---:|---:|"]
        for target, stats in summary["per_target"].items():
            lines.append(f"| {target} | " + " | ".join(_pm(stats[f"{m}_{key}"]) for m in MODELS) + " |")
        lines.append("")
    sm = summary["site_mean_auroc"]
    if sm:
        lines += ["Mean AUROC over the sites' test folds, mean ± sd over folds: " + ", ".join(
            f"{k.replace('_auroc', '').replace('_', ' ')} {_pm(v)}" for k, v in sm.items()), ""]
    lines += ["## AUROC per fold (95 % CI)", "", "| fold | evaluated on | slides | federated | centralised | local own |",
              "|---:|---|---:|---:|---:|---:|"]
    for f, rows in enumerate(fold_rows):
        for r in rows:
            cells = [format_interval(Interval(r[f"{m}_auroc"], r[f"{m}_auroc_ci_low"], r[f"{m}_auroc_ci_high"]))
                     for m in MODELS]
            lines.append(f"| {f} | {r['evaluated_on']} | {r['slides']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _child_logging(level: int) -> None:
    from tdamil.logs import setup_logging  # noqa: PLC0415

    setup_logging(level=level)


def _run_folds(cfg: SimConfig, simulate_one: Callable[..., dict[str, Any]], out: Path, resume: bool) -> list[dict]:
    """Every fold's summary; ``fold_workers`` > 1 runs that many folds at once, each in a fresh
    process (spawned: no torch or Flower state is inherited), one per core."""
    k, workers = int(cfg.folds), int(cfg.fold_workers)
    jobs = [(replace(cfg, fold=f), out / f"fold_{f}") for f in range(k)]
    for f, (_, where) in enumerate(jobs):
        logger.info("Cross-validation fold %d/%d -> %s", f + 1, k, where)
    if workers <= 1:
        return [simulate_one(c, resume=resume, out_dir=o) for c, o in jobs]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, k), mp_context=ctx, initializer=_child_logging,
                             initargs=(logging.getLogger().getEffectiveLevel(),)) as pool:
        futures = [pool.submit(simulate_one, c, resume=resume, out_dir=o) for c, o in jobs]
        return [fut.result() for fut in futures]


def crossval(cfg: SimConfig, simulate_one: Callable[..., dict[str, Any]], *, out_dir: Path | None = None,
             resume: bool = False) -> dict[str, Any]:
    """Run ``simulate_one`` (``tdamil.simulation.cli.simulate``, picklable) for every fold; write the summary."""
    out = Path(out_dir or cfg.output_dir).resolve()
    k = int(cfg.folds)
    t0 = time.perf_counter()
    fold_summaries = _run_folds(cfg, simulate_one, out, resume)
    summary: dict[str, Any] = {"out_dir": str(out), "folds": fold_summaries, "seconds": time.perf_counter() - t0,
                               "federation_seconds": sum(s["federation_seconds"] for s in fold_summaries)}
    fold_rows = [s.get("comparison") or [] for s in fold_summaries]
    if not all(fold_rows):
        logger.info("No baselines (baselines: false): per-fold results are in each fold's metrics; no CV table.")
        return summary
    budget = cfg.federation.rounds * cfg.federation.local_epochs
    cv = summarise_folds(fold_rows)
    with open(out / "cv_folds.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["fold", *fold_rows[0][0]])
        writer.writeheader()
        for f, rows in enumerate(fold_rows):
            writer.writerows({"fold": f, **r} for r in rows)
    doc = {"protocol": {"folds": k, "unit": "patient", "stratified_within": "site", "held_out": "never split",
                        "budget_epochs": budget, "sd": "sample (ddof 1)"},
           "seconds": summary["seconds"], **cv}
    (out / "cv_summary.json").write_text(json.dumps(json_safe(doc), indent=2) + "\n", encoding="utf-8")
    (out / "cv_summary.md").write_text(_markdown(cv, fold_rows, budget), encoding="utf-8")
    summary["cv"] = cv
    sm = cv["site_mean_auroc"]
    logger.info("%d-fold CV, mean site AUROC over folds: %s", k, ", ".join(
        f"{_LABEL.get(key.replace('_auroc', ''), key)} {_pm(v)}" for key, v in sm.items()))
    return summary
