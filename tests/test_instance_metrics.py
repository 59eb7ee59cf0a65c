"""Instance-level metrics, and fit()'s model selection with ties (issue #8 items 1 and 5)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from tdamil.data.bags import InMemoryBagDataset
from tdamil.data.digits import DigitsBagsConfig, make_digits_bags
from tdamil.models import create_model
from tdamil.train.engine import TrainConfig, _improved, evaluate, fit
from tdamil.train.instance_metrics import INSTANCE_METRIC_KEYS, instance_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_instance_metrics_by_hand():
    scores = [np.array([0.9, 0.1, 0.0]), np.array([0.2, 0.8, 0.3]), np.zeros(3), np.zeros(2)]
    labels = [np.array([1, 0, 0]), np.array([1, 0, 0]), np.array([0, 1, 0]), np.array([0, 0])]
    m = instance_metrics(scores, labels, [1, 1, 1, 0])
    assert set(m) == set(INSTANCE_METRIC_KEYS)
    assert m["inst_top1_hit"] == pytest.approx(1 / 3)  # bag 2 hits; bag 3's all-zero tie is a miss
    # within-bag AUROC: 1.0, 0.0 (the 9 is ranked last), 0.5 (all tied)
    assert m["inst_within_auroc"] == pytest.approx(0.5)
    assert m["all_zero_bags"] == pytest.approx(0.5) and m["all_zero_pos_bags"] == pytest.approx(1 / 3)
    pooled_y = np.concatenate(labels)
    assert 0.0 < m["inst_auroc"] < 1.0 and len(pooled_y) == 11


def test_auroc_agrees_with_scikit_learn_with_ties_and_is_nan_when_undefined():
    from sklearn.metrics import roc_auc_score

    from tdamil.train.instance_metrics import _auroc

    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 40, 500):
        for _ in range(20):
            y = rng.integers(0, 2, n)
            if len(set(y)) < 2:
                continue
            s = rng.integers(0, 4, n).astype(float) if n > 3 else rng.normal(size=n)  # many ties
            assert _auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert math.isnan(_auroc(np.array([1, 1]), np.array([0.2, 0.3])))
    assert math.isnan(_auroc(np.array([1, 0]), np.array([np.nan, 0.3])))  # NaN scores: undefined, no exception


def test_ranking_scores_replace_the_plotted_ones_for_the_pooled_auroc():
    # softmax attention: bag sizes make the 9 of the large bag look weaker than a 0 of the small one
    plotted = [np.array([0.9, 0.1]), np.array([0.3] + [0.07] * 10)]
    logits = [np.array([1.0, -1.2]), np.array([1.5] + [0.0] * 10)]
    labels = [np.array([0, 0]), np.array([1] + [0] * 10)]
    assert instance_metrics(plotted, labels, [0, 1])["inst_auroc"] < 1.0
    assert instance_metrics(plotted, labels, [0, 1], logits)["inst_auroc"] == 1.0


def test_no_scores_or_no_labels_gives_none_and_lengths_are_checked():
    assert instance_metrics([None, None], [np.array([1]), np.array([0])], [1, 0]) is None
    assert instance_metrics([np.ones(2)], [None], [1]) is None
    with pytest.raises(ValueError, match="instance labels"):
        instance_metrics([np.ones(3)], [np.array([1, 0])], [1])


def test_evaluate_reports_instance_metrics_for_models_with_scores():
    bags = make_digits_bags(DigitsBagsConfig(num_train_bags=2, num_val_bags=2, num_test_bags=12, seed=0))
    for name, has in (("abmil", True), ("tdamil", True), ("transformer_mil", False)):
        torch.manual_seed(0)
        res = evaluate(create_model({"name": name, "dim": 16, **({"num_heads": 2} if "mil" in name and name != "abmil" else {})}, 64, 2), bags.test)
        assert (res.instance_metrics is not None) == has, name
        if has:
            assert not math.isnan(res.instance_metrics["inst_auroc"])


def test_improved_breaks_ties_by_validation_loss():
    assert _improved(1.0, 1.0, True, loss=0.2, best_loss=0.3)
    assert not _improved(1.0, 1.0, True, loss=0.3, best_loss=0.3)
    assert not _improved(0.9, 1.0, True, loss=0.01, best_loss=0.3)
    assert _improved(0.95, 0.9, True, loss=0.9, best_loss=0.1)
    assert not _improved(math.nan, 0.9, True)


class _Separable(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(1, 2)

    def forward(self, x, mask=None):
        return type("Out", (), {"logits": self.head(x.mean(1)), "scores": None})()


def test_fit_keeps_improving_after_val_auroc_saturates():
    """Val AUROC is 1.0 from the first epoch on; the loss keeps falling, so the best epoch must move on."""
    def bags(n):
        return InMemoryBagDataset([np.full((3, 1), 1.0 if i % 2 else -1.0, np.float32) for i in range(n)], [i % 2 for i in range(n)], num_classes=2)

    torch.manual_seed(0)
    model = _Separable()
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[-0.1], [0.1]]))
        model.head.bias.zero_()
    cfg = TrainConfig(epochs=6, lr=0.05, weight_decay=0.0, progress=False, mixed_precision=False, device="cpu", early_stopping_patience=2)
    res = fit(model, bags(6), bags(4), cfg)
    assert all(r["val_auroc"] == 1.0 for r in res.history)
    assert res.best_epoch == len(res.history) == 6 and not res.stopped_early


def _picture(tmp_path, name, scores, **kw):
    import matplotlib.image as mpimg

    from tdamil.wsi.heatmap import save_heatmap

    thumb = np.full((64, 64, 3), 230, np.uint8)
    coords = np.array([(x, y) for y in range(0, 64, 16) for x in range(0, 64, 16)])
    path = save_heatmap(tmp_path / f"{name}.png", thumb, coords, scores, 16, 1.0, title="slide", **kw)
    return mpimg.imread(path)


def test_relevance_heatmap_uses_a_fixed_unit_scale_and_says_when_all_scores_are_zero(tmp_path):
    tiny = _picture(tmp_path, "tiny", np.linspace(0, 1e-6, 16))  # a data-driven range would paint this red
    zero = _picture(tmp_path, "zero", np.zeros(16))
    full = _picture(tmp_path, "full", np.linspace(0, 1, 16))
    assert tiny.shape == zero.shape == full.shape
    top = slice(0, tiny.shape[0] // 2)  # the picture above the note at the bottom
    assert np.abs(tiny[top] - zero[top]).max() < 0.02  # scores of 1e-6 look like 0, not like 1
    assert np.abs(tiny[top] - full[top]).max() > 0.3  # while real relevance paints the scale
    assert np.abs(tiny - zero).max() > 0.3  # the all-zero slide carries its note


def test_distractor_bags_are_full_of_look_alikes_and_keep_instance_labels():
    bags = make_digits_bags(DigitsBagsConfig.distractor(num_train_bags=40, num_val_bags=0, num_test_bags=4, seed=1))
    from tdamil.data.digits import load_digit_images

    images, digits = load_digit_images()
    lookup = {images[i].tobytes(): int(digits[i]) for i in range(len(digits))}
    others = []
    for i in range(len(bags.train)):
        bag = bags.train[i]
        found = [lookup[row.numpy().tobytes()] for row in bag.features]
        assert [int(d == 9) for d in found] == bag.instance_labels.tolist()
        assert bag.label == 0 or 1 <= sum(d == 9 for d in found) <= 2
        others += [d for d in found if d != 9]
    assert np.isin(others, [3, 5, 8]).mean() > 0.6  # 70 % drawn from the look-alikes (+ their natural share)
