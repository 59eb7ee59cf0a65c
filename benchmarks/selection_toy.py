"""The selection objective alone on a planted-signal MIL toy (run by hand; a few minutes on a CPU).

Bags of 8 patches with a shared feature offset (2.0 + N(0, 1) in 12 dimensions, as foundation-model
features have one); every positive bag has one evidence patch (+ 2 x a fixed random direction).
A fresh TDA-MIL (d = 16, depth 1) is trained on ``TDAMIL.auxiliary_loss`` only (Adam, lr 3e-3,
8 epochs, one bag per step), so this measures whether the selection objective alone ties ``s_i``
to the evidence from a given start. The same problem, 16 bags and 8 epochs, is the unit test
``tests/test_models_tdamil.py::test_selection_objective_ties_high_scores_to_the_positive_class``.

    python benchmarks/selection_toy.py
    python benchmarks/selection_toy.py --variants '{"signed": {"task_init": "signed"}}'

Per variant and bag count: top-1 hit (the evidence is its bag's top patch), instance AUROC of
``s_i`` (evidence vs every other patch), share of negative bags whose map is blank.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from tdamil.models import create_model

IN_DIM, DIM, HEADS = 12, 16, 4
VARIANTS = {
    "default (centred tokens + contrast T)": {},
    "mean-direction T (the earlier default)": {"task_init": "data", "proj_init": "random"},
    "centred tokens + signed T": {"task_init": "signed", "proj_init": "data"},
    "signed T, uncentred": {"task_init": "signed", "proj_init": "random"},
    "contrast T, uncentred": {"task_init": "contrast", "proj_init": "random"},
}


def toy_scores(fields: dict, n_bags: int, epochs: int = 8, seed: int = 0) -> tuple[list[tuple[torch.Tensor, int]], list[torch.Tensor]]:
    """Train a fresh TDA-MIL with ``fields`` on the selection objective alone over ``n_bags`` toy
    bags (odd bags positive, evidence at patch 0); returns the bags ``(x, y)`` and each bag's ``s_i``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(IN_DIM, generator=g)
    bags = []
    for i in range(n_bags):
        x = 2.0 + torch.randn(8, IN_DIM, generator=g)
        if i % 2:
            x[0] += 2.0 * signal
        bags.append((x, i % 2))
    model = create_model({"name": "tdamil", "dim": DIM, "depth": 1, "num_heads": HEADS, **fields}, IN_DIM, 2).train()
    if model.awaits_labelled_init:  # task_init "contrast": the training engine does this before step 1
        model.init_from_bags(bags)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for x, y in bags:
            out = model(x[None])
            opt.zero_grad()
            model.auxiliary_loss(out, torch.tensor([y])).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return bags, [model(x[None]).scores[0] for x, _ in bags]


def run(fields: dict, n_bags: int, epochs: int = 8, seed: int = 0) -> dict[str, float]:
    bags, scores = toy_scores(fields, n_bags, epochs, seed)
    pos = [s.numpy() for (_, y), s in zip(bags, scores) if y]
    neg = [s.numpy() for (_, y), s in zip(bags, scores) if not y]
    labels = np.concatenate([np.r_[1, np.zeros(7)] for _ in pos] + [np.zeros(8) for _ in neg])
    return {
        "top1_hit": float(np.mean([int(np.argmax(s)) == 0 and s[0] > 0 for s in pos])),
        "inst_auroc": float(roc_auc_score(labels, np.concatenate(pos + neg))),
        "blank_negative_bags": float(np.mean([np.all(s == 0) for s in neg])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", help="JSON {label: {TDAMILConfig field: value}} (default: the starts above)")
    ap.add_argument("--bags", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    variants = json.loads(args.variants) if args.variants else VARIANTS
    print("| variant | bags | top-1 hit (per seed) | instance AUROC (per seed) | blank negative bags |")
    print("|---|---|---|---|---|")
    for label, fields in variants.items():
        for n in args.bags:
            rows = [run(fields, n, seed=s) for s in args.seeds]
            col = lambda k: " / ".join(f"{r[k]:.2f}" for r in rows)  # noqa: E731
            print(f"| {label} | {n} | {col('top1_hit')} | {col('inst_auroc')} | {col('blank_negative_bags')} |")


if __name__ == "__main__":
    main()
