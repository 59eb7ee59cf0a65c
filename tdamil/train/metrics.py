"""Slide-level classification metrics with a fixed set of keys.

:func:`classification_metrics` always returns every key of :data:`METRIC_KEYS`, so that sites in a
federation report the same keys every round (Flower ends a run otherwise). A metric that is not
defined for the data (AUROC with one class present, F1 with no positive slide and no positive
prediction, anything on an empty split) is ``float('nan')``, never an exception.

Binary: AUROC of the positive-class probability, F1 of class 1. Multi-class: one-vs-rest macro
AUROC over the classes present (NaN if fewer than two), macro F1 over the classes present in labels
or predictions. Predictions are the arg-max class. ``loss`` is the mean cross-entropy of the
probabilities; ``objective`` is ``loss`` plus the model's own auxiliary objective on the same slides
(TDA-MIL's selection objective; :func:`tdamil.train.evaluate.evaluate` adds it), i.e. the training
objective measured on held-out slides, and equals ``loss`` for models without one.

Patch-level metrics of per-patch scores, where bags carry instance labels, are
:mod:`tdamil.train.instance_metrics` (reported next to these by ``evaluate``).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

__all__ = ["METRIC_KEYS", "classification_metrics", "nan_metrics", "higher_is_better"]

METRIC_KEYS: tuple[str, ...] = ("auroc", "balanced_accuracy", "f1", "accuracy", "loss", "objective", "n")

_EPS = 1e-7


def higher_is_better(key: str) -> bool:
    """Whether a larger value of metric ``key`` is better (all but ``loss`` and ``objective``)."""
    if key not in METRIC_KEYS or key == "n":
        raise ValueError(f"'{key}' is not a metric to optimise; choose one of {', '.join(k for k in METRIC_KEYS if k != 'n')}.")
    return key not in ("loss", "objective")


def nan_metrics(n: int = 0) -> dict[str, float]:
    """Every key NaN (``n`` as given): the result for an empty split."""
    out = {k: float("nan") for k in METRIC_KEYS}
    out["n"] = float(n)
    return out


def classification_metrics(labels: Sequence[int], probs: np.ndarray, num_classes: Optional[int] = None) -> dict[str, float]:
    """Metrics of slide-level predictions.

    Args:
        labels: true class index per slide, shape ``[n]``.
        probs: class probabilities, shape ``[n, C]`` (rows sum to 1). For binary tasks a ``[n]``
            vector of positive-class probabilities is accepted too.
        num_classes: C (default: ``probs.shape[1]``).

    Returns:
        ``{key: float}`` for every key of :data:`METRIC_KEYS`.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    if len(y) == 0:
        return nan_metrics(0)
    if p.shape[0] != len(y):
        raise ValueError(f"{len(y)} labels but {p.shape[0]} probability rows.")
    c = int(num_classes or p.shape[1])
    if p.shape[1] != c:
        raise ValueError(f"probs have {p.shape[1]} columns but num_classes is {c}.")
    if y.min() < 0 or y.max() >= c:
        raise ValueError(f"labels must lie in 0..{c - 1}, got {sorted(set(y.tolist()))}.")

    out = nan_metrics(len(y))
    pred = p.argmax(axis=1)
    out["accuracy"] = float(np.mean(pred == y))
    out["loss"] = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], _EPS, 1.0))))
    out["objective"] = out["loss"]  # plus the model's auxiliary objective where evaluate() knows the model
    present = np.unique(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on one-class inputs; we return NaN instead
        out["balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
        if c == 2:
            if len(present) == 2:
                out["auroc"] = float(roc_auc_score(y, p[:, 1]))
            f1 = f1_score(y, pred, pos_label=1, average="binary", zero_division=np.nan)
        else:
            if len(present) >= 2:
                aucs = [roc_auc_score((y == k).astype(int), p[:, k]) for k in present]
                out["auroc"] = float(np.mean(aucs))
            used = np.union1d(present, np.unique(pred))
            f1 = f1_score(y, pred, labels=used, average="macro", zero_division=np.nan)
    out["f1"] = float(f1) if f1 is not None and not math.isnan(float(f1)) else float("nan")
    return out
