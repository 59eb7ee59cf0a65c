"""Same-budget baselines for a simulated federation and the comparison they are reported in.

At the same budget (rounds x local epochs epochs, same lr) a centralised model trains on the pooled
training sets and one local-only model per site; every model is evaluated on every site's test split
and on the held-out cohorts; ``comparison.md``, ``comparison.csv`` and one bar plot per target are
written next to the federation's own outputs.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

from tdamil.data.bags import InMemoryBagDataset
from tdamil.federation.task import ModelSpec, build_model, local_evaluate, local_train
from tdamil.simulation.config import SimConfig
from tdamil.simulation.sites import SimSites

logger = logging.getLogger(__name__)

__all__ = ["train_baseline", "compare"]


def _concat(datasets: list[Any]) -> Any:
    feats, labels, ids = [], [], []
    for ds in datasets:
        for i in range(len(ds)):
            bag = ds[i]
            feats.append(bag.features)
            labels.append(bag.label)
            ids.append(bag.slide_id)
    return InMemoryBagDataset(feats, labels, ids, num_classes=datasets[0].num_classes)


def train_baseline(cfg: SimConfig, spec: ModelSpec, dataset: Any, epochs: int) -> Any:
    """A model trained on ``dataset`` for ``epochs`` epochs from the same initial weights."""
    model = build_model(spec, seed=cfg.federation.seed)
    local_train(model, dataset, cfg.train, epochs=epochs, lr=cfg.federation.lr, weight_decay=cfg.federation.weight_decay)
    return model


def compare(cfg: SimConfig, sims: SimSites, global_model: Any, spec: ModelSpec, out_dir: Path) -> list[dict[str, Any]]:
    """Centralised and local-only baselines at the same budget; per-site comparison table + plots."""
    budget = cfg.federation.rounds * cfg.federation.local_epochs
    logger.info("Baselines at the same budget: %d epochs each (centralised + %d local-only).", budget, len(sims.sites))
    t0 = time.perf_counter()
    central = train_baseline(cfg, spec, _concat([s.train for s in sims.sites.values()]), budget)
    local = {name: train_baseline(cfg, spec, s.train, budget) for name, s in sims.sites.items()}
    logger.info("Baselines trained in %.1f s.", time.perf_counter() - t0)
    targets = {name: s.test for name, s in sims.sites.items()}
    targets.update({f"held-out:{k}": v for k, v in sims.held_out.items()})
    rows = []
    for target, ds in targets.items():
        fed = local_evaluate(global_model, ds)
        cen = local_evaluate(central, ds)
        loc = {name: local_evaluate(m, ds) for name, m in local.items()}
        own = loc.get(target)
        finite = [v["auroc"] for v in loc.values() if math.isfinite(v["auroc"])]
        rows.append({
            "evaluated_on": target,
            "slides": len(ds),
            "federated_auroc": fed["auroc"],
            "centralised_auroc": cen["auroc"],
            "local_own_auroc": own["auroc"] if own else float("nan"),
            "local_mean_auroc": sum(finite) / len(finite) if finite else float("nan"),
            "federated_bacc": fed["balanced_accuracy"],
            "centralised_bacc": cen["balanced_accuracy"],
            "local_own_bacc": own["balanced_accuracy"] if own else float("nan"),
        })
    _write_comparison(rows, out_dir, budget)
    return rows


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) and math.isfinite(v) else ("n/a" if isinstance(v, float) else str(v))


def _write_comparison(rows: list[dict[str, Any]], out_dir: Path, budget: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "comparison.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    site_rows = [r for r in rows if not r["evaluated_on"].startswith("held-out:")]
    mean = {k: sum(r[k] for r in site_rows) / len(site_rows) for k in
            ("federated_auroc", "centralised_auroc", "local_own_auroc", "local_mean_auroc")} if site_rows else {}
    lines = [
        f"# Federated vs centralised vs local-only TDA-MIL (same budget: {budget} epochs each)",
        "",
        "AUROC on each site's own test split (and on the held-out cohort). *local own*: the model trained only "
        "on that site; *local mean*: mean over all local-only models evaluated there.",
        "",
        "| evaluated on | slides | federated | centralised | local own | local mean | federated bal. acc | centralised bal. acc | local own bal. acc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[k]) for k in r) + " |")
    if mean:
        lines += ["", "Mean over sites: " + ", ".join(f"{k.replace('_auroc', '')} {_fmt(v)}" for k, v in mean.items())]
    (out_dir / "comparison.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    for r in rows:
        fig = Figure(figsize=(4.2, 3.2))
        ax = fig.subplots()
        labels = ["federated", "centralised", "local own", "local mean"]
        values = [r["federated_auroc"], r["centralised_auroc"], r["local_own_auroc"], r["local_mean_auroc"]]
        values = [v if math.isfinite(v) else 0.0 for v in values]
        ax.bar(labels, values, color=["tab:blue", "tab:gray", "tab:orange", "tab:olive"])
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("AUROC")
        ax.set_title(r["evaluated_on"])
        for i, v in enumerate(values):
            ax.text(i, v + 0.01, f"{v:.3f}", ha="center", fontsize=8)
        fig.tight_layout()
        fig.savefig(plots / f"comparison_{r['evaluated_on'].replace(':', '_').replace('/', '_')}.png", dpi=100)
