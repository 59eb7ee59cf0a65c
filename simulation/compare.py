"""Same-budget baselines for a simulated federation and the comparison they are reported in.

At the same budget (rounds x local epochs epochs, same lr) a centralised model trains on the pooled
training sets and one local-only model per site; every model is evaluated on every site's test split
and on the held-out cohorts, and the report (``tdamil.simulation.report``: 95 % CIs, paired tests;
``comparison.md`` / ``.csv`` / ``.json`` and one bar plot per target) is written next to the
federation's own outputs.

With ``seeds: [...]`` the whole simulation runs once per seed (``tdamil.simulation.cli``) and
:func:`summarise_seeds` reports over them (``seeds_summary.json`` / ``.md``): each model's AUROC per
target as mean +- sd over seeds (sample sd), the site-mean AUROC of every seed, and per target and
pair of models one paired test over seeds and slides: each seed's paired difference on its own
slides (DeLong's, as in that seed's ``comparison.json``) pooled by a random-effects meta-analysis
(DerSimonian-Laird), so its interval widens with the seeds' disagreement as well as with the
slides' sampling error; Holm-adjusted over all the pooled tests, like the per-seed reports.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from statistics import NormalDist
from typing import Any, Optional

import numpy as np

from tdamil.config import json_safe
from tdamil.stats import holm
from tdamil.data.bags import ConcatBagDataset
from tdamil.federation.task import ModelSpec, build_model, local_train
from tdamil.simulation.config import SimConfig
from tdamil.simulation.crossval import summarise_folds
from tdamil.simulation.report import MODELS, CISettings, TargetPredictions, comparison_row, paired_rows, write_comparison
from tdamil.simulation.sites import SimSites
from tdamil.train.engine import evaluate
from tdamil.train.faithfulness import Faithfulness, check_model

logger = logging.getLogger(__name__)

__all__ = ["train_baseline", "compare", "map_checks", "pooled_difference", "summarise_seeds", "write_seed_summary"]


def train_baseline(cfg: SimConfig, spec: ModelSpec, dataset: Any, epochs: int) -> Any:
    """A model trained on ``dataset`` for ``epochs`` epochs from the same initial weights."""
    model = build_model(spec, seed=cfg.federation.seed)
    local_train(model, dataset, cfg.train, epochs=epochs, lr=cfg.federation.lr, weight_decay=cfg.federation.weight_decay)
    return model


def _checked_bags(site: Any) -> tuple[Any, str]:
    """The bags a site's maps are checked on: its validation split (its training split where it has none)."""
    return (site.val, "validation") if site.val is not None and len(site.val) else (site.train, "training")


def _map_record(model: Any, bags: Any, kind: str, who: str, seed: int, indices: Optional[list[int]] = None) -> dict[str, Any]:
    """One model's deletion check (label-free) as comparison.json records it."""
    if int(bags.num_classes) != 2:
        check = Faithfulness(-1, math.nan, math.nan, math.nan, "n/a", note="not a two-class model")
    else:
        check = check_model(model, bags, seed=seed, indices=indices)
    return {"bags": kind, "checked": max(check.bags, 0), "deletion_gap": check.mean_gap,
            "positive_share": check.positive, "sign_test_p": check.p_value, "verdict": check.verdict,
            "sentence": check.sentence(f"the relevance map of {who}")}


def map_checks(sims: SimSites, global_model: Any, central: Any, local: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Is each compared model's relevance map faithful? The label-free deletion check
    (:mod:`tdamil.train.faithfulness`, as ``tdamil-train`` runs it) on the model's validation bags:
    the federated and centralised models on every site's validation bags (taken in turn from each
    site, so one site does not fill the quota), each local-only model on its own site's."""
    parts = [_checked_bags(s) for s in sims.sites.values()]
    pooled = ConcatBagDataset([bags for bags, _ in parts])
    starts = np.cumsum([0] + [len(b) for b, _ in parts])
    order = [int(starts[k] + i) for i in range(max(len(b) for b, _ in parts))
             for k, (b, _) in enumerate(parts) if i < len(b)]
    kind = "validation" if all(k == "validation" for _, k in parts) else "validation (training where a site has none)"
    t0 = time.perf_counter()
    out: dict[str, Any] = {"federated": _map_record(global_model, pooled, kind, "the federated model", seed, order),
                           "centralised": _map_record(central, pooled, kind, "the centralised model", seed, order),
                           "local_own": {name: _map_record(local[name], *_checked_bags(s), f"the local-only model of {name}", seed)
                                         for name, s in sims.sites.items()}}
    for rec in [out["federated"], out["centralised"], *out["local_own"].values()]:
        (logger.warning if rec["verdict"] == "not faithful" else logger.info)("%s.", rec["sentence"])
    logger.info("Relevance maps checked in %.1f s.", time.perf_counter() - t0)
    return out


def compare(cfg: SimConfig, sims: SimSites, global_model: Any, spec: ModelSpec, out_dir: Path) -> list[dict[str, Any]]:
    """Centralised and local-only baselines at the same budget; per-site comparison table + plots;
    every model's relevance map checked (:func:`map_checks`)."""
    budget = cfg.federation.rounds * cfg.federation.local_epochs
    logger.info("Baselines at the same budget: %d epochs each (centralised + %d local-only).", budget, len(sims.sites))
    t0 = time.perf_counter()
    central = train_baseline(cfg, spec, ConcatBagDataset([s.train for s in sims.sites.values()]), budget)
    local = {name: train_baseline(cfg, spec, s.train, budget) for name, s in sims.sites.items()}
    logger.info("Baselines trained in %.1f s.", time.perf_counter() - t0)
    maps = map_checks(sims, global_model, central, local, seed=cfg.federation.seed)
    targets = {name: s.test for name, s in sims.sites.items()}
    targets.update({f"held-out:{k}": v for k, v in sims.held_out.items()})
    ci = CISettings(seed=cfg.federation.seed)
    rows, pairs = [], []
    for target, ds in targets.items():
        t = _predict_target(target, ds, global_model, central, local)
        t.maps = {"federated": maps["federated"], "centralised": maps["centralised"]}
        if target in maps["local_own"]:
            t.maps["local_own"] = maps["local_own"][target]
        rows.append(comparison_row(t, ci))
        pairs += paired_rows(t, ci)
    write_comparison(rows, pairs, out_dir, budget, ci, extra={"relevance_maps": maps})
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


def pooled_difference(diffs: list[float], ses: list[float], level: float = 0.95) -> dict[str, float]:
    """Random-effects (DerSimonian-Laird) pool of per-seed differences with standard errors ``ses``:
    estimate, 95 % interval, two-sided p and the between-seed variance tau^2."""
    d, v = np.asarray(diffs, dtype=float), np.asarray(ses, dtype=float) ** 2
    keep = np.isfinite(d) & np.isfinite(v)
    d, v = d[keep], np.maximum(v[keep], 1e-12)  # a zero se (identical rankings) must not take all the weight
    if len(d) == 0:
        return {"estimate": math.nan, "low": math.nan, "high": math.nan, "p": math.nan, "tau2": math.nan, "seeds": 0}
    w = 1.0 / v
    fixed = float(np.sum(w * d) / np.sum(w))
    q = float(np.sum(w * (d - fixed) ** 2))
    denom = float(np.sum(w) - np.sum(w ** 2) / np.sum(w))
    tau2 = max(0.0, (q - (len(d) - 1)) / denom) if len(d) > 1 and denom > 0 else 0.0
    w = 1.0 / (v + tau2)
    est, se = float(np.sum(w * d) / np.sum(w)), float(math.sqrt(1.0 / np.sum(w)))
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    return {"estimate": est, "low": est - z * se, "high": est + z * se,
            "p": math.erfc(abs(est / se) / math.sqrt(2.0)), "tau2": tau2, "seeds": int(len(d))}


def _pair_se(pair: dict[str, Any], level: float) -> float:
    """The standard error behind a pair's AUROC interval (exact for DeLong's symmetric interval; the
    paired bootstrap's percentile interval read the same way)."""
    low, high = pair["auroc_diff_ci_low"], pair["auroc_diff_ci_high"]
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return math.nan
    return (high - low) / (2.0 * NormalDist().inv_cdf(0.5 + level / 2.0))


def _rename_runs(value: Any) -> Any:
    """summarise_folds lists each run's value under 'folds'; over seeds they are 'seeds'."""
    if isinstance(value, dict):
        return {("seeds" if k == "folds" else k): _rename_runs(v) for k, v in value.items()}
    return value


def summarise_seeds(seeds: list[int], docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Over seeds: per target and model mean +- sd (:func:`~tdamil.simulation.crossval.summarise_folds`),
    each seed's site means and per-seed verdicts, and the pooled paired tests (Holm-adjusted)."""
    level = float(docs[0]["bootstrap"]["level"])
    summary = _rename_runs(summarise_folds([d["rows"] for d in docs]))
    per_seed = []
    for seed, doc in zip(seeds, docs):
        m = doc["site_mean_auroc"]
        beats = [p["evaluated_on"] for p in doc["pairs"] if (p["a"], p["b"]) == ("federated", "local_own")
                 and p["auroc_diff"] is not None and p["auroc_diff"] > 0 and p["auroc_p_holm"] is not None
                 and p["auroc_p_holm"] < 1 - level]
        per_seed.append({"seed": seed, **m, "federated_minus_local_own": m["federated_auroc"] - m["local_own_auroc"],
                         "federated_minus_centralised": m["federated_auroc"] - m["centralised_auroc"],
                         "sites_federated_beats_local_own": beats})
    keys = list(dict.fromkeys((p["evaluated_on"], p["a"], p["b"]) for d in docs for p in d["pairs"]))
    pooled = []
    for target, a, b in keys:
        found = [next((p for p in d["pairs"] if (p["evaluated_on"], p["a"], p["b"]) == (target, a, b)), None)
                 for d in docs]
        diffs = [p["auroc_diff"] if p and p["auroc_diff"] is not None else math.nan for p in found]
        ses = [_pair_se(p, level) if p else math.nan for p in found]
        pooled.append({"evaluated_on": target, "a": a, "b": b, "auroc_diff_per_seed": diffs,
                       **{f"auroc_diff_{k}": v for k, v in pooled_difference(diffs, ses, level).items()}})
    for row, adj in zip(pooled, holm([r["auroc_diff_p"] for r in pooled])):
        row["auroc_diff_p_holm"] = adj
    summary.update({"seed_values": list(seeds), "level": level, "per_seed": per_seed, "pooled_pairs": pooled})
    return summary


def _pm(stats: dict[str, Any]) -> str:
    mean, sd = stats["mean"], stats["sd"]
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} ± {sd:.3f}" if sd is not None and math.isfinite(sd) else f"{mean:.3f}"


def _p(p: float) -> str:
    return "n/a" if p is None or not math.isfinite(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


_NAME = {"federated": "federated", "centralised": "centralised", "local_own": "local own"}


def _seed_markdown(s: dict[str, Any], budget: int) -> str:
    n = len(s["seed_values"])
    lines = [f"# Federated vs centralised vs local-only TDA-MIL over {n} seeds (same budget: {budget} epochs each)", "",
             f"Seeds {s['seed_values']}: each draws its own sites, bags and initial weights (`seed_<s>/comparison.md` "
             "has each seed's 95 % CIs and paired tests). Mean ± sd over seeds (sample sd).", "",
             "## AUROC per target: mean ± sd over seeds", "", "| evaluated on | federated | centralised | local own |",
             "|---|---:|---:|---:|"]
    for target, stats in s["per_target"].items():
        lines.append(f"| {target} | " + " | ".join(_pm(stats[f"{m}_auroc"]) for m in MODELS) + " |")
    sm = s["site_mean_auroc"]
    lines += ["", "Mean AUROC over the sites' test splits, mean ± sd over seeds: " + ", ".join(
        f"{_NAME.get(k.replace('_auroc', ''), k.replace('_auroc', '').replace('_', ' '))} {_pm(v)}"
        for k, v in sm.items()), "",
        "## Every seed: mean AUROC over the sites", "",
        "| seed | federated | centralised | local own | federated - local own | federated - centralised | "
        "sites where federated beats local own (per-seed Holm p < 0.05) |", "|---:|---:|---:|---:|---:|---:|---|"]
    for r in s["per_seed"]:
        lines.append(f"| {r['seed']} | {r['federated_auroc']:.3f} | {r['centralised_auroc']:.3f} | "
                     f"{r['local_own_auroc']:.3f} | {r['federated_minus_local_own']:+.3f} | "
                     f"{r['federated_minus_centralised']:+.3f} | {', '.join(r['sites_federated_beats_local_own']) or 'none'} |")
    lines += ["", "## Paired tests over seeds and slides", "",
              "AUROC A - B: each seed's paired DeLong difference on its own slides, pooled over seeds by a random-effects "
              f"meta-analysis (DerSimonian-Laird; tau² is the between-seed variance), {s['level']:.0%} CI, two-sided p; "
              f"*p (Holm)* adjusted over the {len(s['pooled_pairs'])} pooled tests.", "",
              "| evaluated on | A vs B | A - B per seed | pooled A - B | p | p (Holm) | tau² |",
              "|---|---|---|---:|---:|---:|---:|"]
    for r in s["pooled_pairs"]:
        per = ", ".join("n/a" if v is None or not math.isfinite(v) else f"{v:+.3f}" for v in r["auroc_diff_per_seed"])
        est = r["auroc_diff_estimate"]
        pooled = "n/a" if not math.isfinite(est) else (
            f"{est:+.3f} ({r['auroc_diff_low']:+.3f} to {r['auroc_diff_high']:+.3f})")
        lines.append(f"| {r['evaluated_on']} | {_NAME[r['a']]} vs {_NAME[r['b']]} | {per} | {pooled} | "
                     f"{_p(r['auroc_diff_p'])} | {_p(r['auroc_diff_p_holm'])} | {r['auroc_diff_tau2']:.5f} |")
    return "\n".join(lines) + "\n"


def write_seed_summary(seeds: list[int], run_dirs: list[Path], out_dir: Path, budget: int,
                       seconds: float) -> dict[str, Any]:
    """Read each seed's ``comparison.json``, write ``seeds_summary.json`` / ``.md`` in ``out_dir``."""
    docs = [json.loads((d / "comparison.json").read_text(encoding="utf-8")) for d in run_dirs]
    summary = summarise_seeds(seeds, json.loads(json.dumps(json_safe(docs))))
    doc = {"protocol": {"seeds": list(seeds), "budget_epochs": budget, "sd": "sample (ddof 1)",
                        "pooled_test": "random-effects (DerSimonian-Laird) pool of per-seed DeLong differences, Holm"},
           "seconds": seconds, **summary}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "seeds_summary.json").write_text(json.dumps(json_safe(doc), indent=2) + "\n", encoding="utf-8")
    (out_dir / "seeds_summary.md").write_text(_seed_markdown(summary, budget), encoding="utf-8")
    return doc
