"""Same-budget baselines for a simulated federation and the comparison they are reported in.

At the same budget (rounds x local epochs epochs, same lr) a centralised model trains on the pooled
training sets and one local-only model per site; every model is evaluated on every site's test split
and on the held-out cohorts, and the report (``tdamil.simulation.report``: 95 % CIs, paired tests;
``comparison.md`` / ``.csv`` / ``.json`` and one bar plot per target) is written next to the
federation's own outputs.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from tdamil.data.bags import ConcatBagDataset
from tdamil.federation.task import ModelSpec, build_model, local_train
from tdamil.simulation.config import SimConfig
from tdamil.simulation.report import CISettings, TargetPredictions, comparison_row, paired_rows, write_comparison
from tdamil.simulation.sites import SimSites
from tdamil.train.engine import evaluate

logger = logging.getLogger(__name__)

__all__ = ["train_baseline", "compare"]


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
    central = train_baseline(cfg, spec, ConcatBagDataset([s.train for s in sims.sites.values()]), budget)
    local = {name: train_baseline(cfg, spec, s.train, budget) for name, s in sims.sites.items()}
    logger.info("Baselines trained in %.1f s.", time.perf_counter() - t0)
    targets = {name: s.test for name, s in sims.sites.items()}
    targets.update({f"held-out:{k}": v for k, v in sims.held_out.items()})
    ci = CISettings(seed=cfg.federation.seed)
    rows, pairs = [], []
    for target, ds in targets.items():
        t = _predict_target(target, ds, global_model, central, local)
        rows.append(comparison_row(t, ci))
        pairs += paired_rows(t, ci)
    write_comparison(rows, pairs, out_dir, budget, ci)
    return rows


def _predict_target(target: str, ds: Any, global_model: Any, central: Any, local: dict[str, Any]) -> TargetPredictions:
    """Every model's probabilities on one target's slides (the site's own local model as local_own)."""
    fed = evaluate(global_model, ds)
    t = TargetPredictions(target, fed.labels, list(ds.patient_ids), {"federated": fed.probs})
    cen = evaluate(central, ds)
    t.probs["centralised"] = cen.probs
    for who, res in (("federated", fed), ("centralised", cen)):  # bags with instance labels (digits)
        if res.instance_metrics is not None:
            logger.info("%s on %s, instance level: %s", who, target, ", ".join(f"{k} {v:.3f}" for k, v in res.instance_metrics.items()))
    aucs = []
    for name, model in local.items():
        res = evaluate(model, ds)
        if name == target:
            t.probs["local_own"] = res.probs
        aucs.append(res.metrics["auroc"])
    finite = [a for a in aucs if math.isfinite(a)]
    t.local_mean_auroc = sum(finite) / len(finite) if finite else math.nan
    return t
