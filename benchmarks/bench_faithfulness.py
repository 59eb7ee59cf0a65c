"""Relevance maps on bags the defaults were not tuned on, and whether the deletion check flags the
ones that point at the wrong patches (benchmarks/faithfulness.md; run by hand).

Per generator (``benchmarks/slide_bags.py``: tissue_mixture, latent_shift; and the digits
``wsi_like`` variant), seed and model: bag AUROC (test), instance AUROC and top-1 hit of the
per-patch scores (test, instance labels used for evaluation only), and the label-free deletion
check of :mod:`tdamil.train.faithfulness` on the VALIDATION bags (its verdict is what a user would
see), with seconds.

    .venv/bin/python benchmarks/bench_faithfulness.py --seeds 0 1 2 3 4 --out benchmarks/results/faithfulness.csv
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MODELS = {
    "tdamil": {"name": "tdamil", "dim": 32, "depth": 1, "num_heads": 4},
    "tdamil, no witness refinement": {"name": "tdamil", "dim": 32, "depth": 1, "num_heads": 4, "task_init_refine": 0},
    "tdamil, mean-direction T": {"name": "tdamil", "dim": 32, "depth": 1, "num_heads": 4, "task_init": "data",
                                 "proj_init": "random"},
    "abmil": {"name": "abmil", "dim": 32},
    "transformer_mil": {"name": "transformer_mil", "dim": 32, "depth": 1, "num_heads": 4},
}


def bags(generator: str, seed: int):
    if generator in ("wsi_like", "digits"):
        from tdamil.data.digits import DigitsBagsConfig, make_digits_bags

        make = DigitsBagsConfig.wsi_like if generator == "wsi_like" else DigitsBagsConfig
        b = make_digits_bags(make(num_train_bags=80, num_val_bags=80, num_test_bags=300, seed=seed))
        return b.train, b.val, b.test
    from benchmarks.slide_bags import make_slide_bags

    return make_slide_bags(generator, seed)


def run(generator: str, model_name: str, seed: int, epochs: int) -> dict:
    from tdamil.models import create_model
    from tdamil.train.engine import TrainConfig, evaluate, fit
    from tdamil.train.faithfulness import check_model

    train, val, test = bags(generator, seed)
    torch.manual_seed(seed)
    model = create_model(MODELS[model_name], in_dim=train.in_dim, num_classes=2)
    t0 = time.perf_counter()
    fit(model, train, val, TrainConfig(epochs=epochs, lr=1e-3, weight_decay=1e-2, early_stopping_patience=8,
                                       progress=False, seed=seed, device="cpu"))
    seconds = time.perf_counter() - t0
    res = evaluate(model, test)
    inst = res.instance_metrics or {}
    t1 = time.perf_counter()
    check = check_model(model, val)
    return {"generator": generator, "model": model_name, "seed": seed, "bag_auroc": res.metrics["auroc"],
            "inst_auroc": inst.get("inst_auroc", float("nan")), "top1": inst.get("inst_top1_hit", float("nan")),
            "deletion_gap": check.mean_gap, "deletion_p": check.p_value, "bags_checked": check.bags,
            "verdict": check.verdict, "train_seconds": seconds, "check_seconds": time.perf_counter() - t1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generators", nargs="+", default=["tissue_mixture", "latent_shift", "wsi_like"])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "faithfulness.csv")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for generator in args.generators:
        for model_name in args.models:
            for seed in args.seeds:
                row = run(generator, model_name, seed, args.epochs)
                rows.append(row)
                print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()), flush=True)
                with open(args.out, "w", newline="") as fh:
                    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
                    w.writeheader()
                    w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
