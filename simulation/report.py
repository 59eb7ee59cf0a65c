"""The comparison report of a simulation: every model on every target, with 95 % CIs and paired tests.

For each target (a site's test split, a held-out cohort) the federated, centralised and local-only
(the target site's own) models are evaluated on the same slides. Each metric gets a 95 % interval
from the patient-level stratified bootstrap (:mod:`tdamil.stats.bootstrap`); each pair of models
gets the difference of its metrics with interval and p-value (DeLong's test for AUROC where it
applies, else the paired bootstrap), Holm-adjusted over all pairs of the report, and a plain
verdict that says when two results cannot be told apart.

Each model's relevance map is checked too (label-free deletion check on its validation bags,
``compare.map_checks``): ``<model>_deletion_gap`` and ``<model>_map`` (the verdict) in every row, a
table in ``comparison.md``, the full records under ``relevance_maps`` in ``comparison.json``.

Written: ``comparison.csv`` (one row per target), ``comparison.json`` (rows, pairs, settings),
``comparison.md`` and ``plots/comparison_<target>.png`` (bars with CI error bars). A value that does
not exist (no local model of a held-out cohort, a one-class target) is an empty CSV cell, null in
JSON, "n/a" in the table and the plot (no bar).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

from tdamil.config import json_safe
from tdamil.stats import (CI_METRICS, Difference, Interval, bootstrap_ci, compare_predictions, format_interval, holm,
                          short_verdict)

__all__ = ["MODELS", "TargetPredictions", "CISettings", "comparison_row", "paired_rows", "write_comparison",
           "site_means", "comparison_figure"]

MODELS: tuple[str, ...] = ("federated", "centralised", "local_own")
_LABEL = {"federated": "federated", "centralised": "centralised", "local_own": "local own"}
_PAIRS = (("federated", "centralised"), ("federated", "local_own"), ("centralised", "local_own"))


@dataclass(frozen=True)
class CISettings:
    """Bootstrap settings, recorded in comparison.json."""

    n_resamples: int = 2000
    level: float = 0.95
    seed: int = 0


@dataclass
class TargetPredictions:
    """Every model's predictions on one target's slides (same slides, same order)."""

    name: str
    labels: np.ndarray
    patients: list[str]
    probs: dict[str, np.ndarray] = field(default_factory=dict)  # model name -> [n, C]
    local_mean_auroc: float = math.nan  # mean AUROC of all local-only models on this target
    maps: dict[str, dict[str, Any]] = field(default_factory=dict)  # model name -> its deletion check (compare.map_checks)


def comparison_row(t: TargetPredictions, ci: CISettings) -> dict[str, Any]:
    """One CSV row: ``<model>_<metric>`` with ``_ci_low`` / ``_ci_high`` for every model and metric."""
    row: dict[str, Any] = {"evaluated_on": t.name, "slides": int(len(t.labels)),
                           "patients": len(set(t.patients))}
    for model in MODELS:
        probs = t.probs.get(model)
        ivs = (bootstrap_ci(t.labels, probs, t.patients, n_resamples=ci.n_resamples, level=ci.level, seed=ci.seed)
               if probs is not None and len(t.labels) else {k: Interval(math.nan, math.nan, math.nan) for k in CI_METRICS})
        for metric, iv in ivs.items():
            row.update(iv.as_dict(f"{model}_{metric}"))
    row["local_mean_auroc"] = t.local_mean_auroc
    for model in MODELS:  # the relevance map's deletion check, on the model's validation bags (not this target's)
        check = t.maps.get(model) or {}
        row[f"{model}_deletion_gap"] = check.get("deletion_gap", math.nan)
        row[f"{model}_map"] = check.get("verdict")
    return row


def paired_rows(t: TargetPredictions, ci: CISettings) -> list[dict[str, Any]]:
    """A - B for each pair of models present on this target (Holm adjustment comes later)."""
    out = []
    for a, b in _PAIRS:
        if a not in t.probs or b not in t.probs or len(t.labels) == 0:
            continue
        diffs = compare_predictions(t.labels, t.probs[a], t.probs[b], t.patients, n_resamples=ci.n_resamples,
                                    level=ci.level, seed=ci.seed)
        row: dict[str, Any] = {"evaluated_on": t.name, "a": a, "b": b}
        for metric, d in diffs.items():
            row.update({f"{metric}_diff": d.estimate, f"{metric}_diff_ci_low": d.low, f"{metric}_diff_ci_high": d.high,
                        f"{metric}_p": d.p_value, f"{metric}_method": d.method})
        out.append(row)
    return out


def site_means(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean over the sites' own test splits (held-out cohorts excluded) of each model's AUROC."""
    sites = [r for r in rows if not str(r["evaluated_on"]).startswith("held-out:")]
    keys = [f"{m}_auroc" for m in MODELS] + ["local_mean_auroc"]
    return {k: float(np.mean([r[k] for r in sites])) if sites else math.nan for k in keys}


def _iv(row: dict[str, Any], key: str) -> Interval:
    return Interval(row[key], row[f"{key}_ci_low"], row[f"{key}_ci_high"])


def _markdown(rows: list[dict[str, Any]], pairs: list[dict[str, Any]], budget: int, ci: CISettings,
              title: str) -> str:
    level = f"{ci.level:.0%}"
    lines = [
        f"# {title} (same budget: {budget} epochs each)",
        "",
        f"Each cell: estimate ({level} CI). Intervals: stratified bootstrap over patients ({ci.n_resamples} "
        f"resamples, seed {ci.seed}; a patient's slides move together). *local own*: the model trained only on "
        "that site; *local mean*: mean AUROC of all local-only models evaluated there (no CI).",
        "",
    ]
    for metric, name in (("auroc", "AUROC"), ("balanced_accuracy", "Balanced accuracy"), ("f1", "F1")):
        extra = " | local mean" if metric == "auroc" else ""
        lines += [f"## {name}", "", f"| evaluated on | slides | patients | federated | centralised | local own{extra} |",
                  "|---|---:|---:|---:|---:|---:|" + ("---:|" if extra else "")]
        for r in rows:
            cells = [str(r["evaluated_on"]), str(r["slides"]), str(r["patients"])]
            cells += [format_interval(_iv(r, f"{m}_{metric}")) for m in MODELS]
            if extra:
                cells.append(format_interval(Interval(r["local_mean_auroc"], math.nan, math.nan)))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if any(f"{m}_map" in r for r in rows for m in MODELS):
        lines += ["## Relevance maps: are they faithful?", "",
                  "Label-free deletion check (as `tdamil-train` runs it) of each model's per-patch scores on its "
                  "validation bags (federated, centralised: every site's; local own: its site's), so the federated and "
                  "centralised cells repeat on every target. Each cell: mean deletion gap (how much more the positive "
                  "probability drops when the top-scored patches are removed than when as many random patches are) "
                  "and the verdict; NOT faithful: do not read that model's heatmaps as evidence. n/a: no per-patch "
                  "scores (TransMIL, transformer MIL, mean pooling), no slide predicted positive, or no such model.", "",
                  "| evaluated on | federated | centralised | local own |", "|---|---:|---:|---:|"]
        lines += ["| " + " | ".join([str(r["evaluated_on"])] + [_map_cell(r, m) for m in MODELS]) + " |" for r in rows]
        lines.append("")
    means = site_means(rows)
    if any(math.isfinite(v) for v in means.values()):
        lines += ["Mean AUROC over the sites' test splits: " + ", ".join(
            f"{k.replace('_auroc', '').replace('_', ' ')} {v:.3f}" for k, v in means.items() if math.isfinite(v)), ""]
    if pairs:
        lines += [
            "## Paired comparisons on the same slides",
            "",
            f"Difference A - B with its {level} CI and two-sided p-value (AUROC: DeLong's test when every "
            "patient has one slide, else the paired patient-level bootstrap; balanced accuracy: paired bootstrap). "
            f"*p (Holm)*: adjusted over the {len(pairs)} AUROC comparisons of this report; the verdict uses it. "
            "\"Cannot be told apart\" means no evidence of a difference at this sample size, not evidence of "
            "equality.",
            "",
            "| evaluated on | A vs B | AUROC A - B | p | p (Holm) | bal. acc A - B | p | verdict (AUROC) |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for p in pairs:
            auc = _diff(p, "auroc")
            bacc = _diff(p, "balanced_accuracy")
            held = p["auroc_p_holm"]
            said = short_verdict(_LABEL[p["a"]], _LABEL[p["b"]], replace(auc, p_value=held), level=ci.level)
            lines.append(f"| {p['evaluated_on']} | {_LABEL[p['a']]} vs {_LABEL[p['b']]} | {_fmt_diff(auc)} | "
                         f"{_fmt_p(auc.p_value)} | {_fmt_p(held)} | {_fmt_diff(bacc)} | {_fmt_p(bacc.p_value)} | "
                         f"{said} |")
        lines.append("")
    return "\n".join(lines)


def _map_cell(row: dict[str, Any], model: str) -> str:
    verdict, gap = row.get(f"{model}_map"), row.get(f"{model}_deletion_gap")
    if verdict in (None, "", "n/a"):
        return "n/a"
    said = "NOT faithful" if verdict == "not faithful" else verdict
    return f"{gap:.3f} {said}" if isinstance(gap, float) and math.isfinite(gap) else said


def _diff(pair: dict[str, Any], metric: str) -> Difference:
    return Difference(pair[f"{metric}_diff"], pair[f"{metric}_diff_ci_low"], pair[f"{metric}_diff_ci_high"],
                      pair[f"{metric}_p"], pair[f"{metric}_method"])


def _fmt_diff(d: Difference) -> str:
    if not math.isfinite(d.estimate):
        return "n/a"
    return f"{d.estimate:+.3f} ({d.low:+.3f} to {d.high:+.3f})"


def _fmt_p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def comparison_figure(row: dict[str, Any]) -> Figure:
    """AUROC bars of one target with their CIs. A missing value gets no bar, only "n/a" (never a bar
    of 0); a value without an interval (local mean) gets no error bar."""
    fig = Figure(figsize=(4.4, 3.3))
    ax = fig.subplots()
    names = [_LABEL[m] for m in MODELS] + ["local mean"]
    ivs = [_iv(row, f"{m}_auroc") for m in MODELS] + [Interval(row["local_mean_auroc"], math.nan, math.nan)]
    colours = ["tab:blue", "tab:gray", "tab:orange", "tab:olive"]
    for i, (iv, colour) in enumerate(zip(ivs, colours)):
        if not math.isfinite(iv.estimate):
            ax.text(i, 0.02, "n/a", ha="center", va="bottom", fontsize=9, color="dimgray")
            continue
        ax.bar(i, iv.estimate, color=colour)
        top = iv.estimate
        if math.isfinite(iv.low) and math.isfinite(iv.high):
            ax.errorbar(i, iv.estimate, yerr=[[iv.estimate - iv.low], [iv.high - iv.estimate]], fmt="none",
                        ecolor="black", capsize=4)
            top = iv.high
        ax.text(i, top + 0.01, f"{iv.estimate:.3f}", ha="center", va="bottom", fontsize=8)  # above the error bar
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylim(0.0, 1.12)
    ax.set_ylabel("AUROC (95% CI)")
    ax.set_title(str(row["evaluated_on"]))
    fig.tight_layout()
    return fig


def _csv_cell(value: Any) -> Any:
    """A missing number (NaN) is an empty CSV cell, never the text ``nan``."""
    return "" if isinstance(value, float) and not math.isfinite(value) else value


def write_comparison(rows: list[dict[str, Any]], pairs: list[dict[str, Any]], out_dir: Path, budget: int,
                     ci: CISettings, *, title: str = "Federated vs centralised vs local-only TDA-MIL",
                     extra: Optional[dict[str, Any]] = None) -> None:
    """Holm-adjust the pairs' AUROC p-values, then write the CSV, JSON, markdown and plots."""
    for p, adj in zip(pairs, holm([p["auroc_p"] for p in pairs])):
        p["auroc_p_holm"] = adj
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "comparison.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: _csv_cell(v) for k, v in r.items()} for r in rows)
    doc = {"budget_epochs": budget, "bootstrap": {"unit": "patient", "stratified_by": "class",
                                                  "resamples": ci.n_resamples, "level": ci.level, "seed": ci.seed},
           "site_mean_auroc": site_means(rows), "rows": rows, "pairs": pairs, **(extra or {})}
    (out_dir / "comparison.json").write_text(json.dumps(json_safe(doc), indent=2) + "\n", encoding="utf-8")
    (out_dir / "comparison.md").write_text(_markdown(rows, pairs, budget, ci, title), encoding="utf-8")
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    for r in rows:
        name = str(r["evaluated_on"]).replace(":", "_").replace("/", "_")
        comparison_figure(r).savefig(plots / f"comparison_{name}.png", dpi=100)
