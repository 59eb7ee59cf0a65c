"""TDA-MIL's restarts judged on the validation bags (``TDAMILConfig.start_candidates``, run by
``tdamil.train.engine.fit``): tiny bags, a few epochs, seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tdamil.data.bags import InMemoryBagDataset
from tdamil.models import create_model
from tdamil.train.engine import TrainConfig, evaluate, fit

SPEC = {"name": "tdamil", "dim": 8, "depth": 1, "num_heads": 2}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bags(n: int, seed: int) -> InMemoryBagDataset:
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for i in range(n):
        x = rng.standard_normal((int(rng.integers(10, 30)), 6)).astype(np.float32)
        if i % 2:
            x[rng.choice(len(x), size=2, replace=False), 0] += 4.0
        feats.append(x)
        labels.append(i % 2)
    return InMemoryBagDataset(feats, labels)


def test_a_candidate_is_a_fresh_model_of_its_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    model = create_model(SPEC, in_dim=6, num_classes=2)
    state = torch.random.get_rng_state()
    a, b, again = model.start_candidate(1), model.start_candidate(2), model.start_candidate(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.proj.weight, again.proj.weight) and not torch.equal(a.proj.weight, b.proj.weight)
    assert not a.task_token_started and a.cfg is model.cfg
    with pytest.raises(ValueError, match="start_candidates"):
        create_model({**SPEC, "start_candidates": 0}, in_dim=6, num_classes=2)


def test_fit_keeps_the_candidate_with_the_lowest_validation_objective_and_trains_it_on(tmp_path):
    train, val = _bags(16, 0), _bags(10, 1)
    torch.manual_seed(0)
    model = create_model({**SPEC, "start_candidates": 3, "start_candidate_epochs": 2}, in_dim=6, num_classes=2)
    res = fit(model, train, val, TrainConfig(epochs=4, lr=1e-3, progress=False, device="cpu", seed=3), out_dir=tmp_path)
    kept, objectives = model.start_candidate_choice
    assert len(objectives) == 3 and kept == int(np.argmin(objectives))
    assert len(res.history) == 4 and [r.get("start_candidate") for r in res.history] == [kept, kept, None, None]
    assert res.history[1]["val_objective"] == pytest.approx(objectives[kept], abs=1e-3)
    assert res.best_epoch >= 2 and (tmp_path / "best.pt").exists()
    # the model ends with the best epoch's weights; a candidate not kept left no trace in it
    assert evaluate(model, val).metrics["auroc"] == pytest.approx(res.best_metrics["auroc"])
    # the same seed gives the same choice (restarts are part of the seeded run)
    torch.manual_seed(0)
    again = create_model({**SPEC, "start_candidates": 3, "start_candidate_epochs": 2}, in_dim=6, num_classes=2)
    fit(again, train, val, TrainConfig(epochs=3, lr=1e-3, progress=False, device="cpu", seed=3))
    assert again.start_candidate_choice == (kept, objectives)


def test_restarts_are_the_default_and_skipped_without_validation_bags_one_candidate_or_epochs_to_continue():
    assert create_model(SPEC, in_dim=6, num_classes=2).cfg.start_candidates == 3
    train = _bags(8, 0)
    for spec, val, epochs in (({**SPEC}, None, 4), ({**SPEC, "start_candidates": 1}, _bags(6, 1), 4),
                              ({**SPEC}, _bags(6, 1), 3)):
        model = create_model(spec, in_dim=6, num_classes=2)
        res = fit(model, train, val, TrainConfig(epochs=epochs, lr=1e-3, progress=False, device="cpu"))
        assert not hasattr(model, "start_candidate_choice") and len(res.history) == epochs
