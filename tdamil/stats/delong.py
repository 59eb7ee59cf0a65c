"""DeLong's test for the AUROC of one model, or of two models on the same slides (binary labels).

DeLong, DeLong & Clarke-Pearson (1988) write the AUROC as the mean of *structural components*:
for a positive slide i, V10_i = share of negatives scored below it (ties 1/2); for a negative
slide j, V01_j = share of positives scored above it. Then

    AUROC = mean(V10) = mean(V01),
    Var(AUROC) = S10 / m + S01 / n,

with m positives, n negatives, and S10 / S01 the sample (co)variances of the components across
models. For two models A and B on the same slides, Var(A - B) = Var(A) + Var(B) - 2 Cov(A, B),
z = (A - B) / sqrt(Var), two-sided p from the normal distribution.

The components come from midranks (Sun & Xu 2014): with T_z the midrank of a score among all
slides, T_x among positives only and T_y among negatives only, V10 = (T_z - T_x) / n and
V01 = 1 - (T_z - T_y) / m. One sort per model: O(N log N), no m x n matrix.

DeLong assumes independent slides: with several slides per patient use the patient-level paired
bootstrap (:func:`tdamil.stats.bootstrap.paired_bootstrap`) instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["midranks", "auroc_variance", "delong_test", "DeLongResult"]


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties sharing the mean of their ranks (O(n log n))."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    _, starts, counts = np.unique(sx, return_index=True, return_counts=True)
    group_rank = starts + (counts + 1) / 2.0  # mean of ranks starts+1 .. starts+counts
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(group_rank, counts)
    return ranks


def _components(scores: np.ndarray, positive: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(AUROC, V10 over positives, V01 over negatives) of one model."""
    x, y = scores[positive], scores[~positive]
    m, n = len(x), len(y)
    tz = midranks(np.concatenate([x, y]))
    v10 = (tz[:m] - midranks(x)) / n
    v01 = 1.0 - (tz[m:] - midranks(y)) / m
    return float(v10.mean()), v10, v01


def _check(labels: Sequence[int], *score_sets: np.ndarray) -> np.ndarray:
    y = np.asarray(labels).reshape(-1)
    if set(np.unique(y).tolist()) != {0, 1}:
        raise ValueError(f"DeLong's test needs binary labels 0/1 with both present, got {sorted(set(y.tolist()))}.")
    for s in score_sets:
        if np.asarray(s).shape != y.shape:
            raise ValueError(f"scores have shape {np.asarray(s).shape}, labels {y.shape}: one score per slide.")
    return y == 1


def auroc_variance(labels: Sequence[int], scores: np.ndarray) -> tuple[float, float]:
    """(AUROC, DeLong variance) of one model's scores."""
    pos = _check(labels, scores)
    auc, v10, v01 = _components(np.asarray(scores, dtype=np.float64), pos)
    var = np.var(v10, ddof=1) / len(v10) if len(v10) > 1 else 0.0
    var += np.var(v01, ddof=1) / len(v01) if len(v01) > 1 else 0.0
    return auc, float(var)


@dataclass(frozen=True)
class DeLongResult:
    """A - B: both AUROCs, the difference, its standard error, interval, z and two-sided p."""

    auroc_a: float
    auroc_b: float
    difference: float
    se: float
    low: float
    high: float
    z: float
    p_value: float
    method: str = "DeLong"


def _normal_quantile(level: float) -> float:
    from statistics import NormalDist  # noqa: PLC0415

    return NormalDist().inv_cdf(0.5 + level / 2.0)


def delong_test(labels: Sequence[int], scores_a: np.ndarray, scores_b: np.ndarray, *,
                level: float = 0.95) -> DeLongResult:
    """Paired DeLong test of AUROC(A) = AUROC(B) on the same slides."""
    pos = _check(labels, scores_a, scores_b)
    auc_a, v10a, v01a = _components(np.asarray(scores_a, dtype=np.float64), pos)
    auc_b, v10b, v01b = _components(np.asarray(scores_b, dtype=np.float64), pos)
    m, n = len(v10a), len(v01a)
    s10 = np.cov(np.vstack([v10a, v10b]), ddof=1) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(np.vstack([v01a, v01b]), ddof=1) if n > 1 else np.zeros((2, 2))
    s = s10 / m + s01 / n
    var = float(s[0, 0] + s[1, 1] - 2.0 * s[0, 1])
    diff = auc_a - auc_b
    se = math.sqrt(max(var, 0.0))
    q = _normal_quantile(level)
    if se > 0:
        z = diff / se
        p = math.erfc(abs(z) / math.sqrt(2.0))  # = 2 * (1 - Phi(|z|))
    else:  # identical rankings: no evidence of a difference
        z, p = 0.0 if diff == 0 else math.copysign(math.inf, diff), 1.0 if diff == 0 else 0.0
    return DeLongResult(auc_a, auc_b, diff, se, diff - q * se, diff + q * se, z, p)
