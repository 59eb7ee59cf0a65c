"""Confidence intervals (patient-level stratified bootstrap), DeLong's test, paired comparisons."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tdamil.stats import bootstrap_ci, compare_predictions, delong_test, paired_bootstrap, verdict
from tdamil.stats.bootstrap import resample_weights, weighted_auroc, weighted_metrics
from tdamil.stats.delong import auroc_variance, midranks
from tdamil.train.metrics import classification_metrics


def _binormal(rng, n_pos, n_neg, auc):
    """Scores N(d, 1) for positives and N(0, 1) for negatives: true AUROC = Phi(d / sqrt 2)."""
    d = math.sqrt(2.0) * NormalDist().inv_cdf(auc)
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    s = np.r_[rng.normal(d, 1.0, n_pos), rng.normal(0.0, 1.0, n_neg)]
    return y, 1.0 / (1.0 + np.exp(-s))


@pytest.mark.parametrize("classes", [2, 3])
def test_unit_weights_reproduce_classification_metrics(classes):
    rng = np.random.default_rng(1)
    y = rng.integers(0, classes, 80)
    p = rng.dirichlet(np.ones(classes), 80)
    p[np.arange(80), y] += 0.3  # informative, with ties below from rounding
    p = np.round(p / p.sum(1, keepdims=True), 2)
    ref = classification_metrics(y, p / p.sum(1, keepdims=True))
    got = weighted_metrics(y, p / p.sum(1, keepdims=True), np.ones((1, 80)))
    for k in ("auroc", "balanced_accuracy", "f1"):
        assert got[k][0] == pytest.approx(ref[k], abs=1e-12), k


def test_weighted_auroc_matches_sklearn_sample_weight():
    rng = np.random.default_rng(2)
    s = np.round(rng.random(50), 1)  # many ties
    y = rng.integers(0, 2, 50)
    w = rng.integers(0, 4, (5, 50)).astype(float)
    got = weighted_auroc(s, y == 1, w)
    for row, g in zip(w, got):
        assert g == pytest.approx(roc_auc_score(y, s, sample_weight=row), abs=1e-12)


def test_resamples_move_a_patients_slides_together_and_keep_strata():
    # 6 patients: p0..p2 negative (p0 has 3 slides), p3..p5 positive (p5 has 2 slides)
    patients = ["p0", "p0", "p0", "p1", "p2", "p3", "p4", "p5", "p5"]
    labels = [0, 0, 0, 0, 0, 1, 1, 1, 1]
    w = np.concatenate(list(resample_weights(labels, patients, n_resamples=500, seed=3, chunk=128)))
    assert w.shape == (500, 9)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 0] == w[:, 2]).all() and (w[:, 7] == w[:, 8]).all()
    neg_patients = w[:, 0] + w[:, 3] + w[:, 4]
    pos_patients = w[:, 5] + w[:, 6] + w[:, 7]
    assert (neg_patients == 3).all() and (pos_patients == 3).all()  # 3 patients drawn per stratum
    again = np.concatenate(list(resample_weights(labels, patients, n_resamples=500, seed=3, chunk=64)))
    assert np.array_equal(w, again)  # seeded, and the block size does not change the draws


def test_interval_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(4)
    y, p = _binormal(rng, 60, 90, 0.8)
    a = bootstrap_ci(y, p, n_resamples=1000, seed=7)
    b = bootstrap_ci(y, p, n_resamples=1000, seed=7)
    assert a == b
    for k, iv in a.items():
        assert iv.low <= iv.estimate <= iv.high, k
        assert iv.high - iv.low < 0.4
    assert a["auroc"].estimate == pytest.approx(roc_auc_score(y, p))


def test_bootstrap_ci_covers_known_auroc_in_at_least_90_percent_of_200_trials():
    """Binormal scores with true AUROC 0.80, 40 positives and 60 negatives per trial, 1000 resamples."""
    rng = np.random.default_rng(2026)
    true_auc, covered = 0.80, 0
    for trial in range(200):
        y, p = _binormal(rng, 40, 60, true_auc)
        iv = bootstrap_ci(y, p, n_resamples=1000, seed=trial)["auroc"]
        covered += iv.low <= true_auc <= iv.high
    assert covered / 200 >= 0.90, f"coverage {covered / 200:.3f}"


def test_delong_variance_hand_computed_example():
    """Positives scored (0.9, 0.6), negatives (0.7, 0.2, 0.1); m = 2, n = 3.

    V10 (share of negatives below each positive): 0.9 -> 3/3 = 1; 0.6 -> 2/3.
    V01 (share of positives above each negative): 0.7 -> 1/2; 0.2 -> 1; 0.1 -> 1.
    AUROC = mean V10 = (1 + 2/3) / 2 = 5/6 = mean V01 = (1/2 + 1 + 1) / 3.
    S10 = sample var of (1, 2/3) = 2 * (1/6)^2 / 1 = 1/18.
    S01 = sample var of (1/2, 1, 1) = ((1/3)^2 + 2 (1/6)^2) / 2 = (1/6) / 2 = 1/12.
    Var = S10 / m + S01 / n = 1/36 + 1/36 = 1/18.

    Model B scores positives (0.8, 0.3), negatives (0.3, 0.5, 0.1) (a tie at 0.3):
    V10_B = (1, 1.5/3 = 1/2), V01_B = (1.5/2 = 3/4, 1/2, 1); AUROC_B = 3/4.
    S10_B = 2 (1/4)^2 = 1/8; S01_B = (0 + 2 (1/4)^2) / 2 = 1/16; Var_B = 1/16 + 1/48 = 1/12.
    Cov10 = ((1/6)(1/4) + (-1/6)(-1/4)) / 1 = 1/12; Cov01 = (0 - 1/24 + 1/24) / 2 = 0;
    Cov = (1/12) / 2 + 0 / 3 = 1/24.
    Var(A - B) = 1/18 + 1/12 - 2/24 = 1/18; A - B = 1/12; z = (1/12) / sqrt(1/18) = 0.35355.
    """
    y = np.array([1, 1, 0, 0, 0])
    a = np.array([0.9, 0.6, 0.7, 0.2, 0.1])
    b = np.array([0.8, 0.3, 0.3, 0.5, 0.1])
    auc, var = auroc_variance(y, a)
    assert auc == pytest.approx(5 / 6) and var == pytest.approx(1 / 18)
    auc_b, var_b = auroc_variance(y, b)
    assert auc_b == pytest.approx(3 / 4) and var_b == pytest.approx(1 / 12)
    r = delong_test(y, a, b)
    assert r.difference == pytest.approx(1 / 12)
    assert r.se == pytest.approx(math.sqrt(1 / 18))
    assert r.z == pytest.approx(0.353553, abs=1e-6)
    assert r.p_value == pytest.approx(2 * (1 - NormalDist().cdf(0.353553)), abs=1e-6)


def _delong_slow(y, a, b):
    """O(m n) structural components straight from the definition."""
    def comps(s):
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        return psi.mean(1), psi.mean(0)
    (xa, ya), (xb, yb) = comps(a), comps(b)
    s10, s01 = np.cov([xa, xb]), np.cov([ya, yb])
    s = s10 / len(xa) + s01 / len(ya)
    return xa.mean() - xb.mean(), s[0, 0] + s[1, 1] - 2 * s[0, 1]


def test_fast_delong_matches_definition_with_ties():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 300)
    a = np.round(rng.random(300) + 0.4 * y, 2)
    b = np.round(rng.random(300) + 0.2 * y + 0.3 * a, 2)
    diff, var = _delong_slow(y, a, b)
    r = delong_test(y, a, b)
    assert r.difference == pytest.approx(diff, abs=1e-12)
    assert r.se ** 2 == pytest.approx(var, rel=1e-9)
    assert midranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_paired_comparison_says_when_models_cannot_be_told_apart():
    rng = np.random.default_rng(6)
    y, good = _binormal(rng, 100, 100, 0.9)
    noise = good + rng.normal(0, 0.01, len(y))
    same = compare_predictions(y, good, noise, n_resamples=1000)
    assert same["auroc"].method == "DeLong"
    assert "cannot be told apart" in verdict("federated", "centralised", same["auroc"])
    bad = 1.0 / (1.0 + np.exp(-rng.normal(0, 1, len(y))))
    diff = compare_predictions(y, good, bad, n_resamples=1000)
    assert diff["auroc"].p_value < 0.001 and diff["auroc"].low > 0
    assert verdict("federated", "local", diff["auroc"]).endswith("federated is better.")
    # several slides per patient: AUROC falls back to the patient-level paired bootstrap
    patients = np.repeat(np.arange(len(y) // 2), 2)
    yy = np.repeat(y[::2], 2)
    clustered = compare_predictions(yy, good, bad, patients, n_resamples=500)
    assert clustered["auroc"].method == "paired patient-level bootstrap"
    boot = paired_bootstrap(y, good, good, n_resamples=200)
    assert boot["auroc"].estimate == 0 and boot["auroc"].p_value == 1.0


def test_datasets_carry_patient_ids_through_subsets():
    from tdamil.data.bags import InMemoryBagDataset

    ds = InMemoryBagDataset([np.zeros((2, 3))] * 4, [0, 1, 0, 1], ["s0", "s1", "s2", "s3"],
                            patient_ids=["a", "a", "b", "c"])
    assert ds.subset([1, 3]).patient_ids == ["a", "c"]
    assert InMemoryBagDataset([np.zeros((2, 3))], [1]).patient_ids == ["bag_0000"]
    with pytest.raises(ValueError, match="patient ids"):
        InMemoryBagDataset([np.zeros((2, 3))], [1], patient_ids=["a", "b"])


def test_holm_adjustment_by_hand():
    # sorted 0.01, 0.02, 0.04 -> 3 * 0.01 = 0.03, 2 * 0.02 = 0.04, 1 * 0.04 = 0.04 (monotone)
    from tdamil.stats import holm

    assert holm([0.04, 0.01, float("nan"), 0.02]) == pytest.approx([0.04, 0.03, float("nan"), 0.04], nan_ok=True)
