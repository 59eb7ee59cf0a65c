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

Writes ``benchmarks/results/digits_runs.csv`` (one row per model and seed),
``benchmarks/results/digits_summary.csv`` and ``benchmarks/digits.md``.
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
    dcfg = DigitsBagsConfig.wsi_like(**base) if job["variant"] == "wsi_like" else DigitsBagsConfig(**base)
    bags = make_digits_bags(dcfg)
    torch.manual_seed(seed)
    model = create_model(job["model"], in_dim=bags.train.in_dim, num_classes=2)
    tcfg = TrainConfig(
        epochs=job["epochs"], lr=job["lr"], weight_decay=1e-2, early_stopping_patience=job["patience"],
        monitor="auroc", progress=False, seed=seed, device="cpu",
    )
    t0 = time.perf_counter()
    res = fit(model, bags.train, bags.val, tcfg)
    row = {
        "model": job["model"]["name"],
        "seed": seed,
        "lr": job["lr"],
        "params": sum(p.numel() for p in model.parameters()),
        "best_epoch": res.best_epoch,
        "epochs_run": len(res.history),
        "val_auroc": res.best_value,
    }
    if not job.get("val_only"):
        m = evaluate(model, bags.test).metrics
        row.update({f"test_{k}": m[k] for k in ("auroc", "balanced_accuracy", "f1", "accuracy", "loss")})
    row["seconds"] = time.perf_counter() - t0
    return row


def _run_all(jobs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    if workers <= 1:
        return [run_one(j) for j in tqdm(jobs, desc="runs")]
    with mp.get_context("spawn").Pool(workers) as pool:
        return list(tqdm(pool.imap(run_one, jobs), total=len(jobs), desc="runs"))


def _fmt(vals: list[float]) -> str:
    a = np.asarray(vals, dtype=float)
    return f"{a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variant", choices=("mnist_bags", "wsi_like"), default="mnist_bags")
    ap.add_argument("--train-bags", type=int, default=100)
    ap.add_argument("--val-bags", type=int, default=100)
    ap.add_argument("--test-bags", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--patience", type=int, default=15)
    ap.add_argument("--lr", type=float, default=3e-4, help="lr for every model (3e-4: chosen by --tune on the default protocol)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--tune", action="store_true", help="choose the lr for TDA-MIL by validation AUROC first")
    ap.add_argument("--tune-lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3])
    ap.add_argument("--workers", type=int, default=2, help="parallel runs (one torch thread each)")
    ap.add_argument("--tag", default="digits", help="output name prefix under benchmarks/results/")
    ap.add_argument("--md", type=Path, default=HERE / "digits.md")
    args = ap.parse_args()

    common = dict(variant=args.variant, train_bags=args.train_bags, val_bags=args.val_bags, test_bags=args.test_bags, epochs=args.epochs, patience=args.patience)
    t_start = time.perf_counter()
    tune_rows: list[dict[str, Any]] = []
    lr = args.lr
    if args.tune:
        jobs = [dict(common, model=model_section("tdamil", args.dim, args.heads, args.depth), seed=s, lr=g, val_only=True) for g in args.tune_lrs for s in args.seeds]
        tune_rows = _run_all(jobs, args.workers)
        by_lr = {g: np.mean([r["val_auroc"] for r in tune_rows if r["lr"] == g]) for g in args.tune_lrs}
        lr = max(by_lr, key=by_lr.get)
        print("lr selection (mean val AUROC):", {f"{g:g}": round(v, 4) for g, v in by_lr.items()}, "->", lr)

    jobs = [dict(common, model=model_section(m, args.dim, args.heads, args.depth), seed=s, lr=lr) for m in args.models for s in args.seeds]
    rows = _run_all(jobs, args.workers)
    total = time.perf_counter() - t_start

    out_dir = HERE / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_csv = out_dir / f"{args.tag}_runs.csv"
    with runs_csv.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = []
    for m in args.models:
        rs = [r for r in rows if r["model"] == m]
        summary.append({
            "model": m,
            "test_auroc": _fmt([r["test_auroc"] for r in rs]),
            "test_balanced_accuracy": _fmt([r["test_balanced_accuracy"] for r in rs]),
            "test_f1": _fmt([r["test_f1"] for r in rs]),
            "val_auroc": _fmt([r["val_auroc"] for r in rs]),
            "best_epoch": _fmt([r["best_epoch"] for r in rs]).replace(".000", ""),
            "params": rs[0]["params"],
            "seconds_per_run": f"{np.mean([r['seconds'] for r in rs]):.1f}",
            "auroc_mean": float(np.mean([r["test_auroc"] for r in rs])),
        })
    sum_csv = out_dir / f"{args.tag}_summary.csv"
    with sum_csv.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)

    auc = {s["model"]: s["auroc_mean"] for s in summary}
    lines = [
        "# Digits MIL benchmark",
        "",
        f"Protocol: MNIST-bags on scikit-learn digits ({args.variant}), target digit 9, "
        + ("bag size ~N(10, 2)" if args.variant == "mnist_bags" else "bag size ~N(100, 10) with 1-3 positives")
        + f", {args.train_bags} training / {args.val_bags} validation / {args.test_bags} test bags from disjoint image pools, "
        f"balanced classes. Mean ± std (sample std) over seeds {args.seeds}; each seed draws new pools and bags and a new initialisation.",
        "",
        f"Budget (identical for every model): AdamW lr {lr:g}, weight decay 1e-2, one bag per step, up to {args.epochs} epochs, "
        f"early stopping with patience {args.patience} on validation AUROC, best-validation weights tested; token width dim={args.dim} "
        f"(raw 8x8 pixels, D=64), {args.heads} heads and depth {args.depth} for the transformer models; CPU, one torch thread per run.",
        "",
        "| model | test AUROC | test balanced acc. | test F1 | val AUROC | best epoch | params | s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(f"| {s['model']} | {s['test_auroc']} | {s['test_balanced_accuracy']} | {s['test_f1']} | {s['val_auroc']} | {s['best_epoch']} | {s['params']:,} | {s['seconds_per_run']} |")
    if tune_rows:
        lines += ["", "Learning-rate selection for TDA-MIL (validation AUROC only, mean over the same seeds):", "",
                  "| lr | val AUROC |", "|---|---|"]
        for g in args.tune_lrs:
            lines.append(f"| {g:g} | {_fmt([r['val_auroc'] for r in tune_rows if r['lr'] == g])} |")
        lines.append(f"\nChosen: lr {lr:g}, then used for all models.")
    if "tdamil" in auc and args.variant == "mnist_bags":
        ok = auc["tdamil"] >= 0.93 and ("mean_pool" not in auc or auc["tdamil"] > auc["mean_pool"])
        lines += ["", f"Requirement (TDA-MIL test AUROC >= 0.93 and above mean pooling): **{'met' if ok else 'NOT met'}** "
                  f"(TDA-MIL {auc['tdamil']:.3f}" + (f", mean pooling {auc['mean_pool']:.3f})" if "mean_pool" in auc else ")")]
    cmd = " ".join(["python benchmarks/bench_digits.py"] + sys.argv[1:])
    lines += ["", f"Run: `{cmd}` "
              f"({platform.processor() or platform.machine()}, {args.workers} parallel runs, {total / 60:.1f} min in total). "
              f"Per-run rows: `{runs_csv.relative_to(HERE.parent)}`, summary: `{sum_csv.relative_to(HERE.parent)}`.", ""]
    args.md.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
