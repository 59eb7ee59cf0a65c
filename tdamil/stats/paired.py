"""Two models on the same slides: the difference of each metric, its interval, p-value and verdict.

AUROC uses DeLong's test when it applies (binary labels, one slide per patient); otherwise, and
for balanced accuracy and F1, the paired patient-level bootstrap. :func:`verdict` turns a
difference into the plain sentence a report needs, including "cannot be told apart".
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from tdamil.stats.bootstrap import Difference, paired_bootstrap
from tdamil.stats.delong import delong_test

__all__ = ["compare_predictions", "short_verdict", "verdict", "holm"]


def _one_slide_per_patient(n: int, patients: Optional[Sequence]) -> bool:
    return patients is None or len({str(p) for p in patients}) == n


def compare_predictions(labels: Sequence[int], probs_a: np.ndarray, probs_b: np.ndarray,
                        patients: Optional[Sequence] = None, *, n_resamples: int = 2000, level: float = 0.95,
                        seed: int = 0) -> dict[str, Difference]:
    """``{auroc, balanced_accuracy, f1: Difference}`` of model A minus model B."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    out = paired_bootstrap(y, probs_a, probs_b, patients, n_resamples=n_resamples, level=level, seed=seed)
    pa, pb = np.asarray(probs_a), np.asarray(probs_b)
    binary = (pa.ndim == 1 or pa.shape[1] == 2) and set(np.unique(y).tolist()) == {0, 1}
    if binary and _one_slide_per_patient(len(y), patients):
        sa = pa if pa.ndim == 1 else pa[:, 1]
        sb = pb if pb.ndim == 1 else pb[:, 1]
        d = delong_test(y, sa, sb, level=level)
        out["auroc"] = Difference(d.difference, d.low, d.high, d.p_value, "DeLong")
    return out


def short_verdict(name_a: str, name_b: str, diff: Difference, *, level: float = 0.95) -> str:
    """``cannot be told apart``, ``<name> better`` or ``n/a`` (metric undefined)."""
    if not math.isfinite(diff.estimate) or not math.isfinite(diff.p_value):
        return "n/a"
    if diff.p_value >= 1.0 - level:
        return "cannot be told apart"
    return f"{name_a if diff.estimate > 0 else name_b} better"


def verdict(name_a: str, name_b: str, diff: Difference, *, level: float = 0.95, metric: str = "AUROC") -> str:
    """One sentence: which model is better, or that the two cannot be told apart at this sample size."""
    short = short_verdict(name_a, name_b, diff, level=level)
    if short == "n/a":
        return f"{metric}: {name_a} vs {name_b} not comparable here (metric undefined)."
    text = (f"{metric} {name_a} - {name_b} = {diff.estimate:+.3f} ({level:.0%} CI {diff.low:+.3f} to "
            f"{diff.high:+.3f}, p = {diff.p_value:.3g}, {diff.method})")
    return f"{text}: {short.replace(' better', ' is better')}."


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error rate) of ``p_values``; NaN stays NaN."""
    p = np.asarray(p_values, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(p))
    out = np.full(len(p), np.nan)
    order = finite[np.argsort(p[finite], kind="mergesort")]
    m = len(order)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))  # monotone: never below an earlier one
        out[i] = running
    return out.tolist()
