"""Patient-level splits: no patient in two parts, stratified, seeded; k-fold covers each patient once."""

import numpy as np
import pytest

from tdamil.data.splits import folds_from_column, patient_kfold, patient_split


def _cohort(n_patients=60, seed=0):
    rng = np.random.default_rng(seed)
    patients, labels = [], []
    for p in range(n_patients):
        y = int(p % 3 == 0)  # one third positive
        for _ in range(rng.integers(1, 4)):  # 1-3 slides per patient
            patients.append(f"P{p:03d}")
            labels.append(y)
    return np.array(patients), np.array(labels)


def test_patient_split_never_leaks_and_is_stratified():
    patients, labels = _cohort()
    sp = patient_split(patients, labels, val_fraction=0.2, test_fraction=0.2, seed=3)
    parts = [set(patients[sp.train]), set(patients[sp.val]), set(patients[sp.test])]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert len(sp.train) + len(sp.val) + len(sp.test) == len(patients)
    overall = labels.mean()
    for idx in (sp.train, sp.val, sp.test):
        assert len(idx) > 0
        assert abs(labels[idx].mean() - overall) < 0.15
    assert 0.1 < len(parts[2]) / 60 < 0.3


def test_patient_split_is_seeded():
    patients, labels = _cohort()
    a = patient_split(patients, labels, seed=1)
    b = patient_split(patients, labels, seed=1)
    c = patient_split(patients, labels, seed=2)
    assert np.array_equal(a.test, b.test) and np.array_equal(a.val, b.val)
    assert not np.array_equal(a.test, c.test)


def test_kfold_covers_every_patient_once():
    patients, labels = _cohort()
    folds = patient_kfold(patients, labels, k=5, seed=0)
    assert len(folds) == 5
    held = np.concatenate([te for _, te in folds])
    assert sorted(held.tolist()) == list(range(len(patients)))  # every slide held out exactly once
    for tr, te in folds:
        assert not set(patients[tr]) & set(patients[te])
        assert 0.15 < labels[te].mean() < 0.5


def test_split_errors_and_fixed_folds():
    with pytest.raises(ValueError, match="at least 5 patients"):
        patient_kfold(["a", "a", "b"], [0, 0, 1], k=5)
    folds = folds_from_column([0, 1, 0, 1, 2])
    assert [te.tolist() for _, te in folds] == [[0, 2], [1, 3], [4]]
