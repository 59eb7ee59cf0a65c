"""Build the server strategy (Flower 1.42 Message API) from a :class:`FederationConfig`.

All strategies aggregate the FULL state dict (TDA-MIL's task token T and channel matrix C
included). FedAvg / FedProx / FedAdam / FedYogi weight each site by its number of training slides
(``num-examples``); the robust rules (FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan, from
``flwr.serverapp.strategy``) count every site the same (what each needs: FederationConfig's
docstring). Metrics are averaged with :func:`~tdamil.federation.records.nan_weighted_mean` (a
site's NaN does not poison the mean).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.serverapp import strategy as flwr_strategy

from tdamil.federation.config import FederationConfig
from tdamil.federation.records import ARRAYS, CONFIG, WEIGHT_KEY, nan_weighted_mean

__all__ = ["build_strategy", "strategy_state", "restore_strategy_state"]


def build_strategy(cfg: FederationConfig) -> flwr_strategy.Strategy:
    """The configured strategy with the project's record keys, sampling and metric averaging."""
    common: dict[str, Any] = dict(
        fraction_train=cfg.fraction_sites,
        fraction_evaluate=cfg.fraction_sites if cfg.evaluate_sites else 0.0,
        min_train_nodes=cfg.min_sites,
        min_evaluate_nodes=cfg.min_sites if cfg.evaluate_sites else 0,
        min_available_nodes=cfg.min_sites,
        weighted_by_key=WEIGHT_KEY,
        arrayrecord_key=ARRAYS,
        configrecord_key=CONFIG,
        train_metrics_aggr_fn=nan_weighted_mean,
        evaluate_metrics_aggr_fn=nan_weighted_mean,
    )
    if cfg.strategy == "fedavg":
        return flwr_strategy.FedAvg(**common)
    if cfg.strategy == "fedprox":
        return flwr_strategy.FedProx(**common, proximal_mu=cfg.proximal_mu)
    opt = dict(eta=cfg.server_lr, eta_l=cfg.lr, beta_1=cfg.server_beta_1, beta_2=cfg.server_beta_2,
               tau=cfg.server_tau)
    if cfg.strategy == "fedadam":
        return flwr_strategy.FedAdam(**common, **opt)
    if cfg.strategy == "fedyogi":
        return flwr_strategy.FedYogi(**common, **opt)
    if cfg.strategy == "fedmedian":
        return flwr_strategy.FedMedian(**common)
    if cfg.strategy == "fedtrimmedavg":
        return flwr_strategy.FedTrimmedAvg(**common, beta=cfg.trim_beta)
    if cfg.strategy == "krum":
        return flwr_strategy.Krum(**common, num_malicious_nodes=cfg.faulty_sites)
    if cfg.strategy == "multikrum":
        select = cfg.krum_select or max(1, cfg.required_replies - cfg.faulty_sites)
        return flwr_strategy.MultiKrum(**common, num_malicious_nodes=cfg.faulty_sites, num_nodes_to_select=select)
    if cfg.strategy == "bulyan":
        return flwr_strategy.Bulyan(**common, num_malicious_nodes=cfg.faulty_sites)
    raise ValueError(f"unknown strategy {cfg.strategy!r}")


def _inner(strategy: Any) -> Any:
    """The wrapped strategy of a DP wrapper (or the strategy itself)."""
    return getattr(strategy, "strategy", strategy)


def strategy_state(strategy: Any) -> dict[str, Any]:
    """Server-optimiser moments (FedAdam/FedYogi) as tensors, so a resumed run continues exactly
    and the checkpoint holds data only (:mod:`tdamil.checkpoint`)."""
    inner = _inner(strategy)
    state: dict[str, Any] = {}
    for name in ("m_t", "v_t"):
        value = getattr(inner, name, None)
        if value:
            state[name] = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in value.items()}
    return state


def restore_strategy_state(strategy: Any, state: dict[str, Any] | None) -> None:
    """Put moments saved by :func:`strategy_state` back as the numpy arrays Flower works with."""
    inner = _inner(strategy)
    for name, value in (state or {}).items():
        if hasattr(inner, name):
            setattr(inner, name, {k: v.numpy().copy() for k, v in value.items()})
