"""Site-level differential privacy for the federation (client-side clipping + Gaussian noise).

What is protected: the participation of a whole site (all of its slides) in the model the
coordinator releases after each round ("client-level" / "site-level" DP, add/remove one site).

How (Flower 1.42 Message API, "central DP with client-side fixed clipping"):

1. The coordinator's strategy is wrapped by :func:`dp_server_strategy`. It sends the clipping norm C
   with every train message.
2. Each site's ClientApp runs :func:`dp_client_mods` on its **train** handler only: Flower's
   ``fixedclipping_mod`` scales the site's update (new weights - received weights) to an L2 norm
   of at most C before anything leaves the site. A site whose YAML asks for a smaller C clips to
   its own C; a site with ``privacy.enabled: true`` refuses to train for a coordinator that did
   not enable DP.
3. The wrapper checks every reply really is clipped (a reply exceeding C is dropped and logged),
   averages the clipped updates **with equal weights** (the DP guarantee needs each site's
   influence bounded by C/m; weighting by slide count would let a large site exceed it) and adds
   Gaussian noise N(0, (sigma * C / m)^2) to every coordinate of the average, where m is the number
   of sites actually aggregated that round.

The noise is added by the coordinator: the coordinator itself sees the clipped, un-noised updates
(it is trusted); everyone who receives the released model (the sites, anyone the final checkpoint
is shared with) gets the DP guarantee. :class:`PrivacyAccountant` turns (sigma, sites sampled,
rounds, delta) into epsilon with Flower's Renyi-DP accountant (``flwr.serverapp.RdpAccountant``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from tdamil.security.config import PrivacyConfig

logger = logging.getLogger(__name__)

__all__ = [
    "dp_server_strategy",
    "dp_client_mods",
    "PrivacyAccountant",
    "SiteLevelDPStrategy",
]

# ============================================================================================
# Accountant
@dataclass
class PrivacyAccountant:
    """(epsilon, delta) of the model released after each round, from Flower's ``RdpAccountant``
    (Google's dp-accounting behind it), as a function of the number of rounds.

    Each round is one sampled Gaussian release with noise multiplier sigma. How sites are sampled
    follows the coordinator's strategy: Flower samples ``max(int(num_sites * sampling_rate),
    min_sample)`` of the ``num_sites`` connected sites without replacement (``min_sample`` is the
    strategy's ``min_train_nodes``). When that is every site (the usual case for a few hospitals,
    and always when ``num_sites`` is the strategy's minimum) the release is the plain Gaussian
    mechanism for adding or removing one site, with no amplification claimed. When it is fewer,
    the accountant uses sampling without replacement, which Flower (and the bound behind it)
    pairs with the replace-one-site relation.

    >>> PrivacyAccountant(PrivacyConfig(enabled=True, noise_multiplier=1.0)).epsilon(10) > 0
    True
    """

    privacy_cfg: PrivacyConfig
    sampling_rate: float = 1.0
    num_sites: Optional[int] = None
    min_sample: int = 1
    # epsilon by rounds: the wrapper and the round loop both ask each round, and the bound for
    # sampling without replacement takes seconds
    _epsilon: dict[int, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if self.sampling_rate < 1 and not self.num_sites:
            raise ValueError("sampling_rate < 1 needs num_sites (the population the sites are sampled from)")

    @property
    def delta(self) -> float:
        return self.privacy_cfg.delta

    @property
    def sample_size(self) -> int:
        """Sites per round, by Flower's rule (``FedAvg.configure_train``)."""
        n = self.num_sites or 1
        return n if self.sampling_rate >= 1 else min(n, max(int(n * self.sampling_rate), self.min_sample))

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``privacy_cfg.delta`` after ``rounds`` rounds (0 rounds: 0; no noise: inf)."""
        if rounds < 0:
            raise ValueError("rounds must be >= 0")
        if rounds == 0:
            return 0.0
        if not self.privacy_cfg.enabled or self.privacy_cfg.noise_multiplier <= 0:
            return math.inf
        if rounds not in self._epsilon:
            self._epsilon[rounds] = self._compute(rounds)
        return self._epsilon[rounds]

    def _compute(self, rounds: int) -> float:
        from flwr.serverapp import (  # noqa: PLC0415 - loads dp-accounting (scipy), coordinator only
            GaussianPrivacyEvent,
            NeighboringRelation,
            RdpAccountant,
            SamplingMethod,
        )
        from flwr.serverapp import PrivacyConfig as FlowerPrivacyConfig  # noqa: PLC0415

        n, k = self.num_sites or 1, self.sample_size
        sampled = k < n
        accountant = RdpAccountant(FlowerPrivacyConfig(
            target_delta=self.delta, population_size=n,
            neighboring_relation=NeighboringRelation.REPLACE_ONE if sampled else NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.WITHOUT_REPLACEMENT if sampled else SamplingMethod.NO_AMPLIFICATION,
        ))
        accountant.compose(GaussianPrivacyEvent(self.privacy_cfg.noise_multiplier, k, n), count=rounds)
        return accountant.get_epsilon(self.delta)

    def report(self, rounds: int) -> dict[str, float]:
        """Numbers for logs and the audit trail."""
        return {
            "dp_epsilon": self.epsilon(rounds),
            "dp_delta": self.delta,
            "dp_noise_multiplier": self.privacy_cfg.noise_multiplier,
            "dp_clipping_norm": self.privacy_cfg.clipping_norm,
            "dp_sampling_rate": self.sampling_rate,
            "dp_rounds": float(rounds),
        }


# ============================================================================================
# Server side
def _update_norm(reply_arrays: list[np.ndarray], sent_arrays: list[np.ndarray]) -> float:
    total = 0.0
    for new, old in zip(reply_arrays, sent_arrays, strict=True):
        diff = np.asarray(new, dtype=np.float64) - np.asarray(old, dtype=np.float64)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def _make_strategy_class():
    """Build the wrapper class lazily so importing this module does not import Flower's server."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    class SiteLevelDPStrategy(DifferentialPrivacyClientSideFixedClipping):
        """Flower's client-side fixed-clipping DP wrapper with site-level safeguards.

        Differences from the stock wrapper: it verifies each reply is clipped, aggregates with
        equal site weights, tolerates failed sites (noise is calibrated to the sites actually
        aggregated) and reports epsilon in the round's train metrics (``dp_epsilon``).
        """

        def __init__(self, strategy, privacy_cfg: PrivacyConfig, num_sites: int, sampling_rate: float = 1.0):
            super().__init__(strategy, privacy_cfg.noise_multiplier, privacy_cfg.clipping_norm, num_sites)
            self.privacy_cfg = privacy_cfg
            # Flower's own accounting needs its FedAvg aggregation, which this wrapper replaces
            self.accountant = None
            self.site_accountant = PrivacyAccountant(privacy_cfg, sampling_rate, num_sites,
                                                     min_sample=getattr(strategy, "min_train_nodes", 1))
            self._sent: dict[int, list[np.ndarray]] = {}
            self.last_noise_std: Optional[float] = None
            self.dropped_unclipped: list[int] = []
            # weights the last aggregation gave each site (node id -> weight), for the audit log
            self.weighting = "equal (site-level DP)"
            self.last_weights: Optional[dict[int, float]] = None

        def __repr__(self) -> str:
            return (
                f"SiteLevelDP(clipping_norm={self.clipping_norm}, noise_multiplier={self.noise_multiplier}, "
                f"sites={self.num_sampled_clients}) around {self.strategy!r}"
            )

        def configure_train(self, server_round, arrays, config, grid):
            self._sent = {server_round: arrays.to_numpy_ndarrays()}
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round: int, replies: Iterable[Message]):
            replies_list = list(replies)
            self.last_weights = None
            sent = self._sent.get(server_round)
            ok: list[Message] = []
            tol = self.clipping_norm * (1 + 1e-4) + 1e-6
            for msg in replies_list:
                if msg.has_error():
                    logger.warning("Round %d: site node %s failed (%s); aggregating without it.",
                               server_round, msg.metadata.src_node_id, msg.error.reason)
                    continue
                if sent is not None:
                    records = list(msg.content.array_records.values())
                    norm = _update_norm(records[0].to_numpy_ndarrays(), sent) if len(records) == 1 else math.inf
                    if norm > tol:
                        self.dropped_unclipped.append(int(msg.metadata.src_node_id))
                        logger.error(
                            "Round %d: update from node %s has norm %.4g > clipping norm %.4g: the site did "
                            "not clip (its ClientApp lacks the DP mods or has privacy disabled). Dropped.",
                            server_round, msg.metadata.src_node_id, norm, self.clipping_norm,
                        )
                        continue
                ok.append(msg)
            if not ok:
                logger.error("Round %d: no usable site update; the global model is kept.", server_round)
                return None, None
            # equal weights: temporarily give every reply weight 1 for the inner aggregation
            self.last_weights = {int(msg.metadata.src_node_id): 1.0 for msg in ok}
            key = getattr(self.strategy, "weighted_by_key", "num-examples")
            saved = []
            for msg in ok:
                for rec in msg.content.metric_records.values():
                    if key in rec:
                        saved.append((rec, rec[key]))
                        rec[key] = 1
            try:
                arrays, metrics = self.strategy.aggregate_train(server_round, ok)
            finally:
                for rec, value in saved:
                    rec[key] = value
            if arrays is None:
                return None, metrics
            m = len(ok)
            std = self.noise_multiplier * self.clipping_norm / m
            rng = np.random.default_rng()
            noised = {}
            for name, arr in zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True):
                a = np.asarray(arr)
                if np.issubdtype(a.dtype, np.floating) and std > 0:
                    a = (a + rng.normal(0.0, std, size=a.shape)).astype(a.dtype)
                noised[name] = Array(np.ascontiguousarray(a))
            self.last_noise_std = std
            eps = self.site_accountant.epsilon(server_round)
            logger.info(
                "Round %d: %d site updates clipped to %.3g, Gaussian noise std %.3g added; privacy spent "
                "epsilon=%.3f at delta=%g.", server_round, m, self.clipping_norm, std, eps, self.privacy_cfg.delta,
            )
            metrics = MetricRecord(dict(metrics or {}))
            metrics["dp_epsilon"] = float(eps) if math.isfinite(eps) else 1e308
            metrics["dp_noise_std"] = float(std)
            metrics["dp_sites_aggregated"] = m
            self._sent.pop(server_round, None)
            return ArrayRecord(noised), metrics

    return SiteLevelDPStrategy


_STRATEGY_CLASS = None


def __getattr__(name: str):
    if name == "SiteLevelDPStrategy":
        return _strategy_class()
    raise AttributeError(name)


def _strategy_class():
    global _STRATEGY_CLASS  # cached class object, not state
    if _STRATEGY_CLASS is None:
        _STRATEGY_CLASS = _make_strategy_class()
    return _STRATEGY_CLASS


def dp_server_strategy(strategy, privacy_cfg: PrivacyConfig, num_sites: int, sampling_rate: float = 1.0):
    """Wrap ``strategy`` for site-level DP (client-side clipping + server-added Gaussian noise).

    Returns ``strategy`` unchanged when ``privacy_cfg.enabled`` is false. ``num_sites``: the
    number of sites asked to train each round (noise is calibrated to the sites actually
    aggregated). The wrapper keeps the inner strategy as ``.strategy``.
    """
    if not privacy_cfg.enabled:
        return strategy
    if num_sites < 1:
        raise ValueError("num_sites must be >= 1")
    wrapped = _strategy_class()(strategy, privacy_cfg, num_sites, sampling_rate)
    acc = wrapped.site_accountant
    logger.info(
        "Site-level DP on: clipping norm %.3g, noise multiplier %.3g, %d sites; epsilon after 1/10/50 rounds "
        "= %.2f/%.2f/%.2f at delta=%g.", privacy_cfg.clipping_norm, privacy_cfg.noise_multiplier, num_sites,
        acc.epsilon(1), acc.epsilon(10), acc.epsilon(50), privacy_cfg.delta,
    )
    return wrapped


# ============================================================================================
# Client side
def dp_client_mods(privacy_cfg: PrivacyConfig) -> list:
    """ClientApp mods for the **train** handler (``@app.train(mods=dp_client_mods(cfg))``).

    Disabled: ``[]``. Enabled: one mod that (1) refuses to train when the coordinator did not send
    a clipping norm (DP off at the coordinator), (2) clips to ``min(coordinator C, site C)`` with
    Flower's ``fixedclipping_mod`` before the reply leaves the site.
    """
    if not privacy_cfg.enabled:
        return []
    from flwr.app import ConfigRecord, Error, Message
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.common.constant import ErrorCode
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    site_c = float(privacy_cfg.clipping_norm)

    def site_dp_clipping_mod(msg, ctxt, call_next):
        configs = list(msg.content.config_records.items())
        if len(configs) != 1 or KEY_CLIPPING_NORM not in configs[0][1]:
            reason = (
                "this site requires differential privacy (privacy.enabled: true in its YAML) but the "
                "coordinator did not enable it; ask the coordinator to set privacy.enabled: true, or "
                "disable privacy in the site YAML."
            )
            logger.error("Refusing to train: %s", reason)
            return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
        name, cfg = configs[0]
        server_c = float(cfg[KEY_CLIPPING_NORM])
        if site_c < server_c:
            logger.info("Clipping to this site's norm %.3g (coordinator asked %.3g).", site_c, server_c)
            new_cfg = ConfigRecord(dict(cfg))
            new_cfg[KEY_CLIPPING_NORM] = site_c
            msg.content.config_records[name] = new_cfg
        return fixedclipping_mod(msg, ctxt, call_next)

    return [site_dp_clipping_mod]
