"""Confidence intervals for slide-level metrics: stratified bootstrap at the patient level.

Slides of one patient are not independent (same tissue, same scanner day), so the unit that is
resampled is the patient: a resample draws, within each class stratum, as many patients as the
stratum holds, with replacement, and a drawn patient brings all of their slides. Stratifying by
class keeps both classes in every resample, so AUROC is defined in each one.

A resample is represented by integer weights per slide (how often the slide was drawn); the
metrics are computed for all resamples at once as weighted metrics on ``[B, n]`` weight matrices
(numpy only, no Python loop over resamples). With all weights 1 each weighted metric equals
:func:`tdamil.train.metrics.classification_metrics`.

The interval is the percentile interval of the resampled metric (``level`` = 0.95 by default,
2000 resamples, seeded). :func:`paired_bootstrap` applies the same resamples to two models' scores
on the same slides and gives the interval and a two-sided p-value of their difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

__all__ = [
    "CI_METRICS",
    "Difference",
    "Interval",
    "resample_weights",
    "weighted_auroc",
    "weighted_metrics",
    "bootstrap_ci",
    "paired_bootstrap",
    "format_interval",
    "interval_columns",
]

CI_METRICS: tuple[str, ...] = ("auroc", "balanced_accuracy", "f1")
_CHUNK = 256  # resamples per block: bounds memory at _CHUNK x n_slides floats


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval (``nan`` where undefined)."""

    estimate: float
    low: float
    high: float

    def as_dict(self, key: str) -> dict[str, float]:
        """``{key, key_ci_low, key_ci_high}``: the flat form used in CSV and JSON files."""
        return {key: self.estimate, f"{key}_ci_low": self.low, f"{key}_ci_high": self.high}


def interval_columns(intervals: dict[str, Interval]) -> dict[str, float]:
    """``{auroc, auroc_ci_low, auroc_ci_high, balanced_accuracy, ...}`` from :func:`bootstrap_ci`."""
    out: dict[str, float] = {}
    for key, iv in intervals.items():
        out.update(iv.as_dict(key))
    return out


def format_interval(iv: Interval, digits: int = 3) -> str:
    """``0.912 (0.871-0.948)``, or ``n/a``."""
    if not math.isfinite(iv.estimate):
        return "n/a"
    if not (math.isfinite(iv.low) and math.isfinite(iv.high)):
        return f"{iv.estimate:.{digits}f}"
    return f"{iv.estimate:.{digits}f} ({iv.low:.{digits}f}-{iv.high:.{digits}f})"


# ------------------------------------------------------------------------------------------------
def _patient_groups(labels: np.ndarray, patients: Optional[Sequence]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(patient index per slide, list of patient-index arrays, one per class stratum).

    A patient's stratum is their slides' label; a patient whose slides disagree forms a stratum of
    their own kind ("mixed"), so they are still resampled as a whole.
    """
    if patients is None:
        patients = np.arange(len(labels))
    pid = np.asarray([str(p) for p in patients])
    if len(pid) != len(labels):
        raise ValueError(f"{len(pid)} patient ids but {len(labels)} labels; give one of each per slide.")
    names, slide_patient = np.unique(pid, return_inverse=True)
    stratum = np.full(len(names), -2, dtype=np.int64)
    for s, p in enumerate(slide_patient):
        stratum[p] = labels[s] if stratum[p] in (-2, labels[s]) else -1
    return slide_patient, [np.flatnonzero(stratum == k) for k in np.unique(stratum)]


def resample_weights(labels: Sequence[int], patients: Optional[Sequence] = None, *, n_resamples: int = 2000,
                     seed: int = 0, chunk: int = _CHUNK) -> Iterator[np.ndarray]:
    """Blocks of slide weights ``[b, n_slides]`` (b <= chunk), ``n_resamples`` rows in all.

    Each row is one stratified patient-level resample: the number of times each slide's patient
    was drawn. ``patients=None`` treats every slide as its own patient.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    slide_patient, strata = _patient_groups(y, patients)
    n_patients = int(slide_patient.max()) + 1 if len(y) else 0
    # one random stream per stratum: the draws do not depend on the block size
    rngs = [np.random.default_rng([seed, k]) for k in range(len(strata))]
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        counts = np.zeros((b, n_patients), dtype=np.float64)
        for rng, members in zip(rngs, strata):
            m = len(members)
            counts[:, members] = rng.multinomial(m, np.full(m, 1.0 / m), size=b)
        yield counts[:, slide_patient]
        done += b


# ------------------------------------------------------------------------------------------------
def weighted_auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC per row of ``weights`` ``[B, n]``: the weighted Mann-Whitney statistic, ties count 1/2.

    AUROC = sum over tie groups g of P_g (N_below_g + N_g / 2) / (P N), where P_g / N_g are the
    positive / negative weight at score value g. One sort serves every row.
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    order = np.argsort(s, kind="mergesort")
    _, starts = np.unique(s[order], return_index=True)
    w = weights[:, order]
    p_g = np.add.reduceat(w * pos[order], starts, axis=1)
    n_g = np.add.reduceat(w * ~pos[order], starts, axis=1)
    below = np.cumsum(n_g, axis=1) - n_g
    num = np.sum(p_g * (below + 0.5 * n_g), axis=1)
    den = p_g.sum(axis=1) * n_g.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _as_probs(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    return np.stack([1.0 - p, p], axis=1) if p.ndim == 1 else p


def weighted_metrics(labels: Sequence[int], probs: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """AUROC, balanced accuracy and F1 per row of ``weights`` ``[B, n]`` (each ``[B]``).

    Definitions as :mod:`tdamil.train.metrics`: binary AUROC of the positive-class probability and
    F1 of class 1; multi-class one-vs-rest macro AUROC over the classes present and macro F1 over
    the classes in labels or predictions; balanced accuracy = mean recall over the classes present.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = _as_probs(probs)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    pred = p.argmax(axis=1)
    present = np.unique(y)
    c = p.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        recalls = [(w * ((y == k) & (pred == k))).sum(1) / (w * (y == k)).sum(1) for k in present]
        out = {"balanced_accuracy": np.mean(recalls, axis=0)}
        if c == 2:
            aucs = [weighted_auroc(p[:, 1], y == 1, w)] if len(present) == 2 else []
            f1_classes = [1]
        else:
            aucs = [weighted_auroc(p[:, k], y == k, w) for k in present] if len(present) >= 2 else []
            f1_classes = list(np.union1d(present, np.unique(pred)))
        out["auroc"] = np.mean(aucs, axis=0) if aucs else np.full(len(w), np.nan)
        f1s = []
        for k in f1_classes:
            tp = (w * ((y == k) & (pred == k))).sum(1)
            wrong = (w * ((y == k) != (pred == k))).sum(1)
            f1s.append(np.where(2 * tp + wrong > 0, 2 * tp / (2 * tp + wrong), np.nan))
        f1 = np.asarray(f1s)
        # sklearn's macro F1 with zero_division=nan: nan if any class is undefined
        out["f1"] = f1[0] if c == 2 else (np.mean(f1, axis=0) if len(f1) else np.full(len(w), np.nan))
    return out


def _percentile(values: np.ndarray, level: float) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if len(v) < 0.5 * len(values) or len(v) == 0:  # metric undefined in most resamples
        return math.nan, math.nan
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(v, [a, 1.0 - a])
    return float(lo), float(hi)


def _collect(labels: np.ndarray, prob_sets: list[np.ndarray], patients: Optional[Sequence], n_resamples: int,
             seed: int) -> list[dict[str, np.ndarray]]:
    """Resampled metrics ``{key: [n_resamples]}`` for each probability matrix, same resamples for all."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    parts: list[dict[str, list[np.ndarray]]] = [{k: [] for k in CI_METRICS} for _ in prob_sets]
    for w in resample_weights(labels, patients, n_resamples=n_resamples, seed=seed):
        for store, p in zip(parts, prob_sets):
            for k, v in weighted_metrics(labels, p, w).items():
                store[k].append(v)
    return [{k: np.concatenate(v) for k, v in store.items()} for store in parts]


def _point(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    return {k: float(v[0]) for k, v in weighted_metrics(labels, probs, np.ones((1, len(labels)))).items()}


def bootstrap_ci(labels: Sequence[int], probs: np.ndarray, patients: Optional[Sequence] = None, *,
                 n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, Interval]:
    """``{auroc, balanced_accuracy, f1: Interval}`` for one model's predictions.

    Args:
        labels: true class per slide ``[n]``; probs: ``[n, C]`` probabilities (or ``[n]`` positive
            class); patients: patient id per slide (None: one patient per slide).
        n_resamples / level / seed: bootstrap size, interval level, random seed.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(y) == 0:
        return {k: Interval(math.nan, math.nan, math.nan) for k in CI_METRICS}
    p = _as_probs(probs)
    est = _point(y, p)
    boot = _collect(y, [p], patients, n_resamples, seed)[0]
    return {k: Interval(est[k], *(_percentile(boot[k], level) if math.isfinite(est[k]) else (math.nan, math.nan)))
            for k in CI_METRICS}


@dataclass(frozen=True)
class Difference:
    """Model A minus model B on the same slides: estimate, interval, two-sided p-value."""

    estimate: float
    low: float
    high: float
    p_value: float
    method: str


def paired_bootstrap(labels: Sequence[int], probs_a: np.ndarray, probs_b: np.ndarray,
                     patients: Optional[Sequence] = None, *, n_resamples: int = 2000, level: float = 0.95,
                     seed: int = 0) -> dict[str, Difference]:
    """``{metric: Difference}`` of A - B, both evaluated on every resample of the same patients.

    The p-value is twice the smaller share of resampled differences on either side of 0 (the
    percentile-interval test: p < 1 - level exactly when the interval excludes 0), floored at
    1 / n_resamples.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    pa, pb = _as_probs(probs_a), _as_probs(probs_b)
    if pa.shape != pb.shape or len(pa) != len(y):
        raise ValueError(f"paired comparison needs both models' predictions on the same {len(y)} slides; got "
                         f"shapes {pa.shape} and {pb.shape}.")
    ea, eb = _point(y, pa), _point(y, pb)
    ba, bb = _collect(y, [pa, pb], patients, n_resamples, seed)
    out = {}
    for k in CI_METRICS:
        d = ba[k] - bb[k]
        est = ea[k] - eb[k]
        lo, hi = _percentile(d, level) if math.isfinite(est) else (math.nan, math.nan)
        fin = d[np.isfinite(d)]
        p = (min(1.0, max(2.0 * min(np.mean(fin <= 0), np.mean(fin >= 0)), 1.0 / len(fin)))
             if math.isfinite(lo) else math.nan)
        out[k] = Difference(est, lo, hi, float(p), "paired patient-level bootstrap")
    return out
