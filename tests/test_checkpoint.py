"""The one checkpoint format: tensors and plain data only, pickled code refused before it runs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from tdamil.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tdamil.federation.checkpoint import CheckpointStore
from tdamil.federation.task import ModelSpec, build_model, model_to_arrays
from tdamil.predict import PredictError, load_trained_model

SPEC = ModelSpec(model={"name": "tdamil", "dim": 16, "depth": 1, "num_heads": 2}, in_dim=8, num_classes=2)


class _Payload:
    """What an attacker would pickle: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _poisoned(path, marker, model: nn.Module):
    state = {k: v for k, v in model.state_dict().items()}
    torch.save({"format": 2, "kind": "federated", "model_state": state, "model_spec": SPEC.to_json(), "round": 3,
                "strategy_state": {"m_t": _Payload(marker)}}, path)


def test_a_pickled_object_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    model = build_model(SPEC)
    store = CheckpointStore(tmp_path / "checkpoints")
    store.folder.mkdir()
    _poisoned(store.last_path, marker, model)
    for load in (lambda: load_checkpoint(store.last_path), store.load_last):  # direct and --resume
        with pytest.raises(CheckpointError) as err:
            load()
        msg = str(err.value)
        assert "\n" not in msg and str(store.last_path) in msg and "pickled Python objects" in msg
        assert "system" in msg  # names what it refused
    with pytest.raises(PredictError, match="pickled Python objects"):  # tdamil-predict
        load_trained_model(store.last_path)
    assert not marker.exists()


def test_save_refuses_anything_but_tensors_and_plain_data(tmp_path):
    model = build_model(SPEC)
    with pytest.raises(TypeError, match=r"checkpoint.extra.thing: _Payload"):
        save_checkpoint(tmp_path / "x.pt", model, extra={"thing": _Payload(tmp_path / "m")})
    assert not (tmp_path / "x.pt").exists() and list(tmp_path.iterdir()) == []


def test_federated_and_training_checkpoints_share_one_layout(tmp_path):
    model = build_model(SPEC)
    store = CheckpointStore(tmp_path / "fed")
    state = {"m_t": {"w": torch.randn(3, 2)}, "v_t": {"w": torch.rand(3, 2)}}
    store.save(2, model_to_arrays(model), SPEC.to_json(), metric_value=0.5, strategy_state=state,
               metrics={"sites": {"auroc": np.float64(0.5), "f1": float("nan")}})
    fed = load_checkpoint(store.best_path)
    trained = load_checkpoint(save_checkpoint(tmp_path / "train.pt", model, metrics={"auroc": 0.6}, epoch=4))
    common = {"format", "kind", "tdamil_version", "model_state", "model_config", "in_dim", "num_classes", "metrics"}
    assert common <= set(fed) and common <= set(trained)
    assert (fed["kind"], fed["round"], trained["kind"], trained["epoch"]) == ("federated", 2, "training", 4)
    assert fed["model_config"] == SPEC.model and (fed["in_dim"], fed["num_classes"]) == (8, 2)
    assert trained["in_dim"] == 8 and trained["model_config"]["name"] == "tdamil"
    assert fed["best"] == {"round": 2, "metric": "auroc", "value": 0.5}
    assert type(fed["metrics"]["sites"]["auroc"]) is float and np.isnan(fed["metrics"]["sites"]["f1"])
    for name in state:
        assert torch.equal(fed["strategy_state"][name]["w"], state[name]["w"])
    for k, v in model.state_dict().items():
        assert torch.equal(fed["model_state"][k], v) and torch.equal(trained["model_state"][k], v)


def test_server_optimiser_moments_round_trip_exactly(tmp_path):
    from tdamil.federation.config import FederationConfig
    from tdamil.federation.strategies import build_strategy, restore_strategy_state, strategy_state

    rng = np.random.default_rng(0)
    src = build_strategy(FederationConfig(strategy="fedyogi", min_sites=1))
    src.m_t = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=5)}
    src.v_t = {"a": rng.random((4, 3)).astype(np.float32), "b": rng.random(5)}
    store = CheckpointStore(tmp_path)
    store.save(1, model_to_arrays(build_model(SPEC)), SPEC.to_json(), metric_value=None,
               strategy_state=strategy_state(src))
    dst = build_strategy(FederationConfig(strategy="fedyogi", min_sites=1))
    restore_strategy_state(dst, store.load_last()["strategy_state"])
    for name in ("m_t", "v_t"):
        for k, v in getattr(src, name).items():
            got = getattr(dst, name)[k]
            assert isinstance(got, np.ndarray) and got.dtype == v.dtype and np.array_equal(got, v)


def test_a_format_1_federated_checkpoint_still_loads(tmp_path):
    """Checkpoints written before the one format (FedAvg: no numpy inside) keep working."""
    model = build_model(SPEC)
    path = tmp_path / "old.pt"
    torch.save({"round": 5, "state_dict": model.state_dict(), "model_spec": SPEC.to_json(), "strategy_state": {},
                "best": None, "metrics": {}, "tdamil_version": "0.1.0"}, path)
    ck = load_checkpoint(path)
    assert (ck["kind"], ck["round"], ck["in_dim"], ck["model_config"]) == ("federated", 5, 8, SPEC.model)
    assert json.loads(ck["model_spec"]) == json.loads(SPEC.to_json())
    assert load_trained_model(path).origin == "federated round 5"


def test_missing_and_damaged_files_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="nothing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nothing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="bad.pt: cannot read checkpoint") as err:
        load_checkpoint(tmp_path / "bad.pt")
    assert "\n" not in str(err.value)


def test_equal_checkpoints_are_equal_bytes_whatever_the_file_name(tmp_path):
    """The audit log's sha256 of last.pt must match an intact round_N.pt copied over it."""
    model = build_model(SPEC)
    a = save_checkpoint(tmp_path / "round_0001.pt", model, epoch=1)
    b = save_checkpoint(tmp_path / "last.pt", model, epoch=1)
    assert a.read_bytes() == b.read_bytes()
