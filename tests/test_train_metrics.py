"""Metrics match scikit-learn; undefined ones are NaN with every key present."""

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss, roc_auc_score

from tdamil.train.metrics import METRIC_KEYS, classification_metrics, higher_is_better


def test_binary_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(0.3 * y + 0.7 * rng.random(200), 0.01, 0.99)
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(y, probs)
    pred = probs.argmax(1)
    assert set(m) == set(METRIC_KEYS)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p1))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["loss"] == pytest.approx(log_loss(y, probs))
    assert m["n"] == 200
    assert classification_metrics(y, p1)["auroc"] == pytest.approx(m["auroc"])  # [n] vector accepted


def test_multiclass_matches_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 150)
    logits = rng.normal(size=(150, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(y, probs)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["f1"] == pytest.approx(f1_score(y, probs.argmax(1), average="macro"))
    assert m["loss"] == pytest.approx(log_loss(y, probs))


def test_one_class_gives_nan_not_crash():
    probs = np.array([[0.8, 0.2], [0.6, 0.4], [0.9, 0.1]])
    m = classification_metrics([0, 0, 0], probs)
    assert set(m) == set(METRIC_KEYS)
    assert math.isnan(m["auroc"]) and math.isnan(m["f1"])  # no positive slide, none predicted
    assert m["accuracy"] == 1.0 and m["n"] == 3
    m3 = classification_metrics([2, 2], np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]]))
    assert set(m3) == set(METRIC_KEYS) and math.isnan(m3["auroc"]) and m3["accuracy"] == 0.5
    empty = classification_metrics([], np.zeros((0, 2)))
    assert set(empty) == set(METRIC_KEYS) and empty["n"] == 0 and math.isnan(empty["loss"])


def test_direction_and_bad_input():
    assert higher_is_better("auroc") and not higher_is_better("loss")
    with pytest.raises(ValueError):
        higher_is_better("n")
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics([0, 2], np.array([[0.5, 0.5], [0.5, 0.5]]))


def test_json_safe_writes_undefined_values_as_null():
    import json
    from pathlib import Path

    import torch

    from tdamil.config import json_safe

    one_class = classification_metrics([1, 1, 1], np.array([[0.2, 0.8], [0.4, 0.6], [0.1, 0.9]]), num_classes=2)
    text = json.dumps(json_safe(one_class), allow_nan=False)  # NaN would make invalid JSON
    assert json.loads(text)["auroc"] is None
    assert json.loads(text)["n"] == 3
    nested = {"a": [np.float32(0.5), float("inf"), (np.int64(2), Path("/x"))], "t": torch.tensor(float("nan")), 3: -math.inf}
    assert json_safe(nested) == {"a": [0.5, None, [2, "/x"]], "t": None, "3": None}
