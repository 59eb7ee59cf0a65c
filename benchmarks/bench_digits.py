"""Digits MIL benchmark (run by hand): every model, same budget, mean +- std over seeds.

MNIST-bags protocol (Ilse et al. 2018) on scikit-learn's digits (see ``tdamil.data.digits``):
positive bag iff it holds a 9, bag size ~N(10, 2), 100 training bags, 100 validation bags (for
early stopping), 1000 test bags; train / val / test bags come from disjoint image pools.

Every model gets the same budget: the same bags per seed, the same optimiser (AdamW, weight decay
1e-2), learning rate, epochs, early-stopping patience on validation AUROC, and token width ``dim``.
With ``--tune``, TDA-MIL's learning rate is first chosen from a small grid by mean VALIDATION AUROC
(test bags are never looked at), and the chosen value is then used for every model.

    python benchmarks/bench_digits.py                # ~10-20 min on 2 CPU cores
    python benchmarks/bench_digits.py --tune         # + the learning-rate selection
    python benchmarks/bench_digits.py --variant wsi_like --models tdamil abmil mean_pool
    python benchmarks/bench_digits.py --ablation     # TDA-MIL selection variants (issue #8)

Variants: ``mnist_bags`` (above), ``wsi_like`` (bags ~N(100, 10) with 1-3 positives) and
``distractor`` (bags ~N(20, 4) with 1-2 positives, 70 % of the other digits 3/5/8, look-alikes of 9).
Every row carries bag metrics and, for models with per-patch scores, the instance metrics of
:mod:`tdamil.train.instance_metrics` on validation and test bags (each model's score meaning:
:mod:`tdamil.models.output`).

Writes ``benchmarks/results/<tag>_runs.csv`` (one row per model and seed),
``benchmarks/results/<tag>_summary.csv`` and the markdown (``--md``).
"""

from __future__ import annotations

import argparse
import csv
import logging
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
MODELS = ("tdamil", "transformer_mil", "transmil", "abmil", "gated_abmil", "mean_pool")
INST_KEYS = ("inst_auroc", "inst_within_auroc", "inst_top1_hit", "all_zero_bags", "all_zero_pos_bags")

# TDA-MIL selection variants of the --ablation (issue #8). Every variant states how T and the
# projection start, so a name keeps its meaning when the defaults move; {} = the TDAMILConfig defaults.
MEAN_T = dict(task_init="data", proj_init="random")  # the default until the contrast start
ABLATION: dict[str, dict[str, Any]] = {
    "paper (random T, exact grad, no aux)": dict(task_init="random", proj_init="random", selection_grad="exact", selection_loss_weight=0.0,
                                                 selection_source="bottom_up"),
    "aux margin 0 (random T, exact grad)": dict(task_init="random", proj_init="random", selection_grad="exact", selection_margin=0.0,
                                                selection_source="bottom_up", selection_mil="max", selection_temperature=10.0),
    "bottom_up + max: data-init + leaky + aux (temperature 10)": dict(MEAN_T, selection_source="bottom_up", selection_mil="max",
                                                                    selection_temperature=10.0),
    "projected + max (temperature 10)": dict(MEAN_T, selection_mil="max", selection_temperature=10.0),
    "projected + soft (temperature 10)": dict(MEAN_T, selection_temperature=10.0),
    # Called "default: projected + soft (temperature 30) + data-init + leaky" in results recorded before the contrast start.
    "mean-direction T: projected + soft (temperature 30) + data-init + leaky": dict(MEAN_T),
    # Further options (digits_selection.md), measured against the mean-direction start.
    "sparsity 0.5": dict(MEAN_T, selection_sparsity_weight=0.5),
    "pre_last": dict(MEAN_T, selection_source="pre_last"),
    "instance": dict(MEAN_T, selection_mil="instance"),
    "centred + signed T": dict(task_init="signed", proj_init="data"),
    "signed T, uncentred": dict(task_init="signed", proj_init="random"),
    "contrast T, centred": {},  # the default
    "contrast T, uncentred": dict(task_init="contrast", proj_init="random"),
}


MONITOR_TEXT = {"auroc": "AUROC", "loss": "cross-entropy", "objective": "objective (cross-entropy + the model's auxiliary objective, if any)"}


def validation_score(row: dict[str, Any]) -> float:
    """How the ablation picks the default, on VALIDATION bags only (fixed before the run): bag AUROC +
    instance AUROC + top-1 hit rate - share of positive bags with a blank map."""
    return row["val_auroc"] + row["val_inst_auroc"] + row["val_inst_top1_hit"] - row["val_all_zero_pos_bags"]


def model_section(name: str, dim: int, heads: int, depth: int) -> dict[str, Any]:
    """The model config used for ``name`` (same width for all; attention models share heads/depth)."""
    cfg: dict[str, Any] = {"name": name, "dim": dim}
    if name in ("tdamil", "transformer_mil"):
        cfg.update(num_heads=heads, depth=depth)
    elif name == "transmil":
        cfg.update(num_heads=heads)
    return cfg


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one model on one seed's bags; returns a result row."""
    import torch

    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    from tdamil.data.digits import DigitsBagsConfig, make_digits_bags
    from tdamil.models import create_model
    from tdamil.train.engine import TrainConfig, evaluate, fit

    seed = job["seed"]
    base = dict(num_train_bags=job["train_bags"], num_val_bags=job["val_bags"], num_test_bags=job["test_bags"], seed=seed)
    make = {"wsi_like": DigitsBagsConfig.wsi_like, "distractor": DigitsBagsConfig.distractor}.get(job["variant"], DigitsBagsConfig)
    dcfg = make(**base)
    bags = make_digits_bags(dcfg)
    torch.manual_seed(seed)
    model = create_model(job["model"], in_dim=bags.train.in_dim, num_classes=2)
    tcfg = TrainConfig(
        epochs=job["epochs"], lr=job["lr"], weight_decay=1e-2, early_stopping_patience=job["patience"],
        monitor=job.get("monitor", "auroc"), progress=False, seed=seed, device="cpu",
    )
    t0 = time.perf_counter()
    res = fit(model, bags.train, bags.val, tcfg)
    val = evaluate(model, bags.val)
    row = {
        "model": job.get("label", job["model"]["name"]),
        "seed": seed,
        "lr": job["lr"],
        "params": sum(p.numel() for p in model.parameters()),
        "best_epoch": res.best_epoch,
        "epochs_run": len(res.history),
        "val_auroc": val.metrics["auroc"],  # of the kept epoch (res.best_value is the monitored value)
        "val_objective": val.metrics["objective"],
    }
    row.update({f"val_{k}": (val.instance_metrics or {}).get(k, float("nan")) for k in INST_KEYS})
    if not job.get("val_only"):
        test = evaluate(model, bags.test)
        row.update({f"test_{k}": test.metrics[k] for k in ("auroc", "balanced_accuracy", "f1", "accuracy", "loss")})
        row.update({f"test_{k}": (test.instance_metrics or {}).get(k, float("nan")) for k in INST_KEYS})
    row["seconds"] = time.perf_counter() - t0
    return row


def _run_all(jobs: list[dict[str, Any]], workers: int, partial: Path | None = None) -> list[dict[str, Any]]:
    """Run the jobs; each finished row is also appended to ``partial`` (a long run keeps what it did)."""
    from tqdm.auto import tqdm

    rows: list[dict[str, Any]] = []
    with mp.get_context("spawn").Pool(max(1, workers)) as pool:
        for row in tqdm(pool.imap_unordered(run_one, jobs), total=len(jobs), desc="runs"):
            rows.append(row)
            if partial is not None:
                with partial.open("a") as fh:
                    fh.write(repr(row) + "\n")
    return rows


def _fmt(vals: list[float]) -> str:
    a = np.asarray(vals, dtype=float)
    if np.all(np.isnan(a)):
        return "–"
    a = a[~np.isnan(a)]
    return f"{a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.3f}"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _summary(rows: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    out = []
    for m in names:
        rs = [r for r in rows if r["model"] == m]
        row: dict[str, Any] = {"model": m}
        for k in ("test_auroc", "test_balanced_accuracy", "val_auroc") + tuple(f"{p}_{k}" for p in ("val", "test") for k in INST_KEYS):
            row[k] = _fmt([r[k] for r in rs])
        row["min_test_inst_auroc"] = f"{np.min([r['test_inst_auroc'] for r in rs]):.3f}"
        row["min_test_inst_top1_hit"] = f"{np.min([r['test_inst_top1_hit'] for r in rs]):.3f}"
        row["best_epoch"] = _fmt([r["best_epoch"] for r in rs])
        row["params"] = rs[0]["params"]
        row["seconds_per_run"] = f"{np.mean([r['seconds'] for r in rs]):.1f}"
        row["auroc_mean"] = float(np.mean([r["test_auroc"] for r in rs]))
        out.append(row)
    return out


PROTOCOL = {
    "mnist_bags": "bag size ~N(10, 2), natural share of 9s in a positive bag",
    "wsi_like": "bag size ~N(100, 10) with 1-3 positives",
    "distractor": "bag size ~N(20, 4) with 1-2 positives, 70 % of the other digits drawn from 3/5/8 (look-alikes of 9)",
}


def _table(summary: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | test AUROC | val AUROC | test inst AUROC (min) | test within-bag AUROC | test top-1 hit (min) | "
        "all-0 bags: all / positive | val inst AUROC | val top-1 hit | best epoch | params | s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['model']} | {s['test_auroc']} | {s['val_auroc']} | {s['test_inst_auroc']} ({s['min_test_inst_auroc']}) | "
            f"{s['test_inst_within_auroc']} | {s['test_inst_top1_hit']} ({s['min_test_inst_top1_hit']}) | "
            f"{s['test_all_zero_bags']} / {s['test_all_zero_pos_bags']} | {s['val_inst_auroc']} | {s['val_inst_top1_hit']} | "
            f"{s['best_epoch']} | {s['params']:,} | {s['seconds_per_run']} |"
        )
    return [ln.replace("(nan)", "") for ln in lines]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variant", choices=tuple(PROTOCOL), default="mnist_bags")
    ap.add_argument("--train-bags", type=int, default=100)
    ap.add_argument("--val-bags", type=int, default=100)
    ap.add_argument("--test-bags", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--patience", type=int, default=15)
    ap.add_argument("--lr", type=float, default=3e-4, help="lr for every model (3e-4: chosen by --tune on the default protocol)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--monitor", default="auroc", choices=("auroc", "loss", "objective"),
                    help="validation value for early stopping and the kept epoch, the same for every model")
    ap.add_argument("--tune", action="store_true", help="choose the lr for TDA-MIL by validation AUROC first")
    ap.add_argument("--tune-lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3])
    ap.add_argument("--ablation", action="store_true", help="TDA-MIL selection variants instead of the model comparison")
    ap.add_argument("--variants", nargs="+", help="with --ablation: only the variants whose name starts with one of these")
    ap.add_argument("--workers", type=int, default=2, help="parallel runs (one torch thread each)")
    ap.add_argument("--tag", default="digits", help="output name prefix under benchmarks/results/")
    ap.add_argument("--md", type=Path, default=HERE / "digits.md")
    args = ap.parse_args()

    common = dict(variant=args.variant, train_bags=args.train_bags, val_bags=args.val_bags, test_bags=args.test_bags, epochs=args.epochs, patience=args.patience, monitor=args.monitor)
    t_start = time.perf_counter()
    tune_rows: list[dict[str, Any]] = []
    lr = args.lr
    if args.tune:
        jobs = [dict(common, model=model_section("tdamil", args.dim, args.heads, args.depth), seed=s, lr=g, val_only=True) for g in args.tune_lrs for s in args.seeds]
        tune_rows = _run_all(jobs, args.workers)
        by_lr = {g: np.mean([r["val_auroc"] for r in tune_rows if r["lr"] == g]) for g in args.tune_lrs}
        lr = max(by_lr, key=by_lr.get)
        print("lr selection (mean val AUROC):", {f"{g:g}": round(v, 4) for g, v in by_lr.items()}, "->", lr)

    if args.ablation:
        names = [v for v in ABLATION if not args.variants or any(v.startswith(p) for p in args.variants)]
        jobs = [dict(common, model=dict(model_section("tdamil", args.dim, args.heads, args.depth), **ABLATION[v]), label=v, seed=s, lr=lr)
                for v in names for s in args.seeds]
    else:
        names = list(args.models)
        jobs = [dict(common, model=model_section(m, args.dim, args.heads, args.depth), seed=s, lr=lr) for m in names for s in args.seeds]
    order = {(j.get("label", j["model"]["name"]), j["seed"]): i for i, j in enumerate(jobs)}
    rows = sorted(_run_all(jobs, args.workers, HERE / "results" / f"{args.tag}_runs.partial.txt"), key=lambda r: order[(r["model"], r["seed"])])
    total = time.perf_counter() - t_start

    out_dir = HERE / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_csv, sum_csv = out_dir / f"{args.tag}_runs.csv", out_dir / f"{args.tag}_summary.csv"
    _write_csv(runs_csv, rows)
    summary = _summary(rows, names)
    _write_csv(sum_csv, summary)

    title = "TDA-MIL selection ablation (issue #8)" if args.ablation else "Digits MIL benchmark"
    lines = [
        f"# {title}",
        "",
        f"Protocol: MNIST-bags on scikit-learn digits ({args.variant}), target digit 9, {PROTOCOL[args.variant]}, "
        f"{args.train_bags} training / {args.val_bags} validation / {args.test_bags} test bags from disjoint image pools, "
        f"balanced classes. Mean ± std (sample std) over seeds {args.seeds}; each seed draws new pools and bags and a new initialisation.",
        "",
        f"Budget (identical for every run): AdamW lr {lr:g}, weight decay 1e-2, one bag per step, up to {args.epochs} epochs, "
        f"early stopping with patience {args.patience} on validation {MONITOR_TEXT[args.monitor]} (ties broken by validation loss), best-validation weights "
        f"tested; token width dim={args.dim} (raw 8x8 pixels, D=64), {args.heads} heads and depth {args.depth} for the transformer "
        "models; CPU, one torch thread per run.",
        "",
        "Instance metrics (instance = one digit, positive = a 9; `tdamil.train.instance_metrics`): pooled AUROC of the per-patch "
        "scores over all test instances (min over seeds in brackets), mean within-bag AUROC over positive bags, top-1 hit rate "
        "(the top-scored instance of a positive bag is a 9; min over seeds), share of all / of positive bags whose scores are all 0. "
        "Scores: TDA-MIL's s_i; ABMIL's attention (pooled AUROC from its pre-softmax logits); transformer_mil, transmil and "
        "mean_pool give none (`tdamil/models/output.py`).",
        "",
    ] + _table(summary)
    if args.ablation:
        by_variant = {v: float(np.mean([validation_score(r) for r in rows if r["model"] == v])) for v in names}
        chosen = max(by_variant, key=by_variant.get)
        lines += ["", "Choice on VALIDATION bags only (`validation_score`: val bag AUROC + val instance AUROC + val top-1 hit "
                  "- val share of positive bags with all scores 0; mean over seeds): "
                  + ", ".join(f"{v}: {x:.3f}" for v, x in by_variant.items()) + f". Chosen: **{chosen}**."]
    if tune_rows:
        lines += ["", "Learning-rate selection for TDA-MIL (validation AUROC only, mean over the same seeds):", "",
                  "| lr | val AUROC |", "|---|---|"]
        for g in args.tune_lrs:
            lines.append(f"| {g:g} | {_fmt([r['val_auroc'] for r in tune_rows if r['lr'] == g])} |")
        lines.append(f"\nChosen: lr {lr:g}, then used for all models.")
    cmd = " ".join(["python benchmarks/bench_digits.py"] + sys.argv[1:])
    lines += ["", f"Run: `{cmd}` "
              f"({platform.processor() or platform.machine()}, {args.workers} parallel runs, {total / 60:.1f} min in total). "
              f"Per-run rows: `{runs_csv.relative_to(HERE.parent)}`, summary: `{sum_csv.relative_to(HERE.parent)}`.", ""]
    args.md.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
