"""Patient-level, label-stratified splits (train/val/test and k-fold), seeded.

All slides of a patient always land in the same part, so no patient is seen in training and in
evaluation. Stratification keeps the class balance of each part close to the whole (scikit-learn's
``StratifiedGroupKFold`` with patients as groups). The same inputs and seed give the same split.

Inputs are per-slide sequences ``patients`` and ``labels``; outputs are arrays of slide indices.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

logger = logging.getLogger(__name__)

__all__ = ["SplitIndices", "patient_split", "patient_kfold", "split_from_column", "folds_from_column"]


@dataclass
class SplitIndices:
    """Slide indices of each part."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"train": self.train, "val": self.val, "test": self.test}


def _check(patients: Sequence, labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray([str(x) for x in patients])
    y = np.asarray(labels)
    if len(p) != len(y):
        raise ValueError(f"{len(p)} patient ids but {len(y)} labels; give one of each per slide.")
    if len(p) == 0:
        raise ValueError("no slides to split.")
    return p, y


def _one_fold(idx: np.ndarray, patients: np.ndarray, labels: np.ndarray, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (rest, held) where ``held`` is ~``fraction`` of the patients."""
    n_groups = len(np.unique(patients[idx]))
    n_splits = int(round(1.0 / fraction))
    n_splits = max(2, min(n_splits, n_groups))
    if n_groups < 2:
        raise ValueError(
            f"cannot make a {what} split: only {n_groups} patient(s) left. Add patients or set "
            f"{what}_fraction to 0."
        )
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        rest, held = next(cv.split(np.zeros(len(idx)), labels[idx], groups=patients[idx]))
    return idx[rest], idx[held]


def patient_split(
    patients: Sequence,
    labels: Sequence,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> SplitIndices:
    """Split slides into train/val/test by patient, stratified by label.

    ``test_fraction`` of the patients go to test, then ``val_fraction`` (of all patients) to
    validation; the fractions are approximate (whole patients, ``1/fraction`` folds). A fraction of 0
    gives an empty part.
    """
    p, y = _check(patients, labels)
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1.")
    idx = np.arange(len(p))
    empty = np.zeros(0, dtype=int)
    test = empty
    if test_fraction > 0:
        idx, test = _one_fold(idx, p, y, test_fraction, seed, "test")
    val = empty
    if val_fraction > 0:
        idx, val = _one_fold(idx, p, y, val_fraction / (1.0 - test_fraction), seed + 1, "val")
    out = SplitIndices(np.sort(idx), np.sort(val), np.sort(test))
    logger.info(
        "Patient-level split (seed %d): train %d / val %d / test %d slides", seed, len(out.train), len(out.val), len(out.test)
    )
    return out


def patient_kfold(patients: Sequence, labels: Sequence, k: int = 5, *, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` folds by patient, stratified by label: a list of ``(train_idx, held_out_idx)``.

    Every patient is held out exactly once across the folds.
    """
    p, y = _check(patients, labels)
    n_groups = len(np.unique(p))
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2, got {k}.")
    if n_groups < k:
        raise ValueError(f"{k}-fold CV needs at least {k} patients, found {n_groups}. Lower k.")
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return [(np.sort(tr), np.sort(te)) for tr, te in cv.split(np.zeros(len(p)), y, groups=p)]


def split_from_column(values: Sequence[str]) -> SplitIndices:
    """Use a manifest's fixed ``split`` column (``train``/``val``/``test``)."""
    v = np.asarray([str(s).lower() for s in values])
    return SplitIndices(*(np.flatnonzero(v == name) for name in ("train", "val", "test")))


def folds_from_column(folds: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Use a manifest's fixed ``fold`` column: fold ``f`` is held out in the ``f``-th split."""
    f = np.asarray(folds, dtype=int)
    return [(np.flatnonzero(f != k), np.flatnonzero(f == k)) for k in sorted(np.unique(f))]
