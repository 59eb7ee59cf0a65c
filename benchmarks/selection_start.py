"""Where TDA-MIL's selection starts: instance AUROC of ``s_i`` before any training step (run by hand; a few minutes on a CPU).

For each digits variant (``mnist_bags``, ``wsi_like``, ``distractor``; 100 training and 100
validation bags, the benchmark's seeds) a fresh model of the benchmark's size (dim 64, 4 heads,
depth 2) is started the way training starts it, with each ``task_init`` / ``proj_init``; the table
gives, on the validation bags, the pooled instance AUROC of the cosine ``cos(x_i, T)`` (``s_i``
before the clamp, so ties at 0 do not hide the ranking; "is a 9" vs every other digit) and the
share of ``s_i = 0``.

    python benchmarks/selection_start.py
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from tdamil.data.digits import DigitsBagsConfig, make_digits_bags
from tdamil.models import create_model

STARTS = {
    "contrast, centred (default)": {},
    "contrast, uncentred": {"task_init": "contrast", "proj_init": "random"},
    "contrast, 16 bags": {"task_init_bags": 16},
    "mean direction (earlier default)": {"task_init": "data", "proj_init": "random"},
    "centred + signed": {"task_init": "signed"},
    "random": {"task_init": "random", "proj_init": "random"},
}
VARIANTS = {"mnist_bags": DigitsBagsConfig, "wsi_like": DigitsBagsConfig.wsi_like, "distractor": DigitsBagsConfig.distractor}


def start_model(fields: dict, bags, seed: int):
    """A fresh model started as ``train_one_epoch`` starts it (labelled bags for "contrast", else the
    first training forward pass)."""
    torch.manual_seed(seed)
    model = create_model({"name": "tdamil", "dim": 64, "num_heads": 4, "depth": 2, **fields}, bags.train.in_dim, 2).train()
    if model.awaits_labelled_init:
        model.init_from_bags((b.features, b.label) for b in bags.train)
    else:
        with torch.no_grad():
            model(bags.train[0].features[None])
    return model.eval()


def measure(model, dataset) -> tuple[float, float]:
    cos, scores, labels = [], [], []
    with torch.no_grad():
        for bag in dataset:
            out = model(bag.features[None])
            cos.append(out.selection_cosine[0].numpy())
            scores.append(out.scores[0].numpy())
            labels.append(bag.instance_labels.numpy())
    return float(roc_auc_score(np.concatenate(labels), np.concatenate(cos))), float((np.concatenate(scores) == 0).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    logging.disable(logging.INFO)
    print("| variant | start | instance AUROC at step 0 (per seed) | share of s_i = 0 (per seed) |")
    print("|---|---|---|---|")
    for variant, make in VARIANTS.items():
        data = {s: make_digits_bags(make(num_train_bags=100, num_val_bags=100, num_test_bags=2, seed=s)) for s in args.seeds}
        for label, fields in STARTS.items():
            rows = [measure(start_model(fields, data[s], s), data[s].val) for s in args.seeds]
            print(f"| {variant} | {label} | {' / '.join(f'{a:.2f}' for a, _ in rows)} | {' / '.join(f'{z:.2f}' for _, z in rows)} |")


if __name__ == "__main__":
    main()
