"""Thin task module shared by the ServerApp, the ClientApp and the simulation.

* :class:`ModelSpec`: what every party needs to build the same model (model config, input dim,
  number of classes); travels as JSON text inside the round's ConfigRecord.
* :func:`model_to_arrays` / :func:`load_arrays`: the full ``state_dict`` (TDA-MIL's task token T and
  channel matrix C included) <-> ``ArrayRecord``.
* :func:`local_train` / :func:`local_evaluate`: wrappers around ``tdamil.train.engine`` that
  always return the same metric keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord

logger = logging.getLogger(__name__)

__all__ = [
    "ModelSpec",
    "build_model",
    "model_to_arrays",
    "load_arrays",
    "site_train_config",
    "local_train",
    "local_evaluate",
]


@dataclass
class ModelSpec:
    """Everything needed to build the global model identically on every party."""

    model: dict[str, Any]
    in_dim: int
    num_classes: int = 2

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "in_dim": self.in_dim, "num_classes": self.num_classes},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        data = json.loads(text)
        return cls(model=dict(data["model"]), in_dim=int(data["in_dim"]), num_classes=int(data["num_classes"]))


def build_model(spec: ModelSpec, seed: int | None = 0) -> torch.nn.Module:
    """Build the model a spec describes (seeded, so every party starts from the same weights)."""
    from tdamil.models import create_model, model_config_from_dict  # noqa: PLC0415

    if seed is not None:
        torch.manual_seed(seed)
    cfg = model_config_from_dict(dict(spec.model), source="model-spec")
    return create_model(cfg, in_dim=spec.in_dim, num_classes=spec.num_classes)


def model_to_arrays(model: torch.nn.Module) -> ArrayRecord:
    """Full state dict -> ArrayRecord (parameters and buffers, in state_dict order)."""
    return ArrayRecord({k: v for k, v in model.state_dict().items()})  # type: ignore[arg-type]


def load_arrays(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """Load an ArrayRecord into ``model`` strictly (a key or shape mismatch is a clear error)."""
    state = arrays.to_torch_state_dict()
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(
            f"The global model does not match this site's model: missing {missing[:5]}, unexpected "
            f"{extra[:5]}. The coordinator and the sites must run the same tdamil-fl version and model "
            f"config."
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"Array '{key}' has shape {tuple(value.shape)}, the site's model expects "
                             f"{tuple(own[key].shape)}. Check the model config (dim, in_dim, num_classes).")
        state[key] = value.to(own[key].dtype)
    model.load_state_dict(state, strict=True)


def site_train_config(train_cfg: Any, *, lr: float, weight_decay: float) -> Any:
    """The site's TrainConfig with the federation's lr / weight decay (the coordinator decides those)."""
    from tdamil.train.engine import TrainConfig  # noqa: PLC0415

    base = train_cfg if train_cfg is not None else TrainConfig(progress=False)
    return dataclasses.replace(base, lr=float(lr), weight_decay=float(weight_decay))


def local_train(model: torch.nn.Module, dataset: Any, train_cfg: Any, *, epochs: int, lr: float,
                weight_decay: float = 1e-2, prox_mu: float = 0.0, server_round: int = 1) -> dict[str, float]:
    """Train ``epochs`` local epochs from the current (global) weights; returns loss and time.

    With ``prox_mu > 0`` the engine adds the FedProx term mu/2 * ||w - w_global||^2, the global
    weights being a frozen copy taken before the first step. The site's ``train:`` section gives
    device, gradient accumulation, clipping, patch subsampling and seed; lr and weight decay come
    from the coordinator so every site optimises the same objective.
    """
    from tdamil.train.engine import make_optimizer, resolve_device, train_one_epoch  # noqa: PLC0415

    cfg = site_train_config(train_cfg, lr=lr, weight_decay=weight_decay)
    model.to(resolve_device(cfg.device))
    optimizer = make_optimizer(model, cfg)
    prox_ref = None
    if prox_mu > 0:
        prox_ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = time.perf_counter()
    losses: list[float] = []
    for e in range(max(0, int(epochs))):
        stats = train_one_epoch(model, dataset, optimizer, cfg, prox_mu=prox_mu, prox_ref=prox_ref,
                                epoch=(server_round - 1) * int(epochs) + e)
        losses.append(float(stats.get("loss", float("nan"))))
    model.to("cpu")
    return {"train-loss": losses[-1] if losses else float("nan"), "train-seconds": time.perf_counter() - start}


def local_evaluate(model: torch.nn.Module, dataset: Any, device: Any = None) -> dict[str, float]:
    """Every METRIC_KEYS value on ``dataset`` (NaN where undefined; all NaN when it is empty)."""
    from tdamil.federation.records import metric_keys  # noqa: PLC0415

    keys = metric_keys()
    if dataset is None or len(dataset) == 0:
        out = {k: float("nan") for k in keys}
        if "n" in out:
            out["n"] = 0.0
        return out
    from tdamil.train.engine import evaluate  # noqa: PLC0415

    result = evaluate(model, dataset, device=device)
    return {k: float(result.metrics.get(k, float("nan"))) for k in keys}


@dataclass
class SiteData:
    """A site's datasets (BagDataset-like: ``len``, ``[i]``, ``labels``, ``in_dim``, ``num_classes``)."""

    name: str
    train: Any
    val: Any = None
    test: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
