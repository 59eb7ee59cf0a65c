"""A short real training run: TDA-MIL learns the digits MIL task on held-out test bags."""

import pytest
import torch

from tdamil.data.digits import DigitsBagsConfig, make_digits_bags
from tdamil.models import create_model
from tdamil.train.engine import TrainConfig, evaluate, fit


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tdamil_learns_digits_bags():
    bags = make_digits_bags(DigitsBagsConfig(num_train_bags=100, num_val_bags=0, num_test_bags=300, seed=0))
    torch.manual_seed(0)
    model = create_model({"name": "tdamil", "dim": 32, "depth": 1, "num_heads": 4}, in_dim=64, num_classes=2)
    res = fit(model, bags.train, None, TrainConfig(epochs=10, lr=1e-3, progress=False, seed=0, device="cpu"))
    after = evaluate(model, bags.test)
    # Test bags come from images never seen in training; chance is 0.5, mean pooling reaches ~0.88.
    # Measured 0.94-0.95 over seeds 0-2 with these settings.
    assert after.metrics["auroc"] >= 0.90, after.metrics
    assert after.metrics["balanced_accuracy"] >= 0.80
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert all(s is not None and s.min() >= 0 and s.max() <= 1 for s in after.scores)  # s_i in [0, 1]
