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
is shared with) gets the DP guarantee. :class:`PrivacyAccountant` turns (sigma, sampling rate,
rounds, delta) into epsilon with the Renyi-DP accountant of the sampled Gaussian mechanism.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from tdamil.security.config import PrivacyConfig

logger = logging.getLogger(__name__)

__all__ = [
    "dp_server_strategy",
    "dp_client_mods",
    "PrivacyAccountant",
    "rdp_sampled_gaussian",
    "rdp_to_epsilon",
    "DEFAULT_ORDERS",
    "SiteLevelDPStrategy",
]

#: Renyi orders searched by the accountant (fractional ones are used only when every site takes
#: part in every round, where the RDP curve has a closed form for every order).
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1.1, 1.25, 1.5, 1.75] + [x / 2 for x in range(4, 41)] + list(range(21, 64)) + [64, 80, 96, 128, 192, 256, 512, 1024]
)


# ============================================================================================
# Accountant
def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def rdp_sampled_gaussian(q: float, noise_multiplier: float, order: float) -> float:
    """Renyi DP of one release of the (Poisson-)sampled Gaussian mechanism at ``order``.

    ``q = 1`` (every site every round): ``order / (2 sigma^2)`` for any order > 1.
    ``0 < q < 1``: integer orders only, from the binomial expansion (Mironov, Talwar, Zhang 2019,
    "Renyi Differential Privacy of the Sampled Gaussian Mechanism", Sec. 3.3):
    ``A = sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k) / (2 sigma^2))``, ``RDP = log(A) / (a-1)``.
    """
    if noise_multiplier <= 0:
        return math.inf
    if not 0 < q <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {q}")
    if order <= 1:
        raise ValueError("Renyi order must be > 1")
    s2 = noise_multiplier**2
    if q == 1.0:
        return order / (2 * s2)
    if float(order).is_integer():
        a = int(order)
        log_a = -math.inf
        for k in range(a + 1):
            log_coef = math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1)
            term = log_coef + (a - k) * math.log1p(-q) + (k * math.log(q) if k else 0.0) + (k * k - k) / (2 * s2)
            log_a = _log_add(log_a, term)
        return log_a / (a - 1)
    return math.inf  # fractional orders with subsampling: not used (would need the series form)


def rdp_to_epsilon(
    rdp: Sequence[float], orders: Sequence[float], delta: float, conversion: str = "improved"
) -> tuple[float, float]:
    """Best (epsilon, order) from an RDP curve at ``delta``.

    ``improved`` (default): Balle et al. 2020 / Canonne, Kamath, Steinke 2020 (as used by Opacus
    and Google's dp-accounting): ``eps = rdp + log((a-1)/a) - (log(delta) + log(a)) / (a-1)``.
    ``classic``: Mironov 2017, ``eps = rdp + log(1/delta)/(a-1)`` (looser; older papers report it).
    """
    if conversion not in ("improved", "classic"):
        raise ValueError("conversion must be 'improved' or 'classic'")
    if not 0 < delta < 1:
        raise ValueError("delta must be in (0, 1)")
    best, best_order = math.inf, float("nan")
    for r, a in zip(rdp, orders):
        if not math.isfinite(r):
            continue
        if conversion == "classic":
            eps = r + math.log(1 / delta) / (a - 1)
        else:
            eps = r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        if eps < best:
            best, best_order = eps, a
    return max(best, 0.0), best_order


@dataclass
class PrivacyAccountant:
    """(epsilon, delta) of the model released after each round.

    ``sampling_rate``: the fraction of sites asked to train in a round (1.0 when every site trains
    every round, the usual case for a few hospitals). Values below 1 assume Poisson sampling of
    sites; Flower samples a fixed number without replacement, for which the result is the usual
    approximation.

    >>> PrivacyAccountant(PrivacyConfig(enabled=True, noise_multiplier=1.0), 1.0).epsilon(10) > 0
    True
    """

    privacy_cfg: PrivacyConfig
    sampling_rate: float = 1.0
    orders: tuple[float, ...] = DEFAULT_ORDERS

    def __post_init__(self) -> None:
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")

    @property
    def delta(self) -> float:
        return self.privacy_cfg.delta

    def rdp(self, rounds: int) -> list[float]:
        """RDP curve after ``rounds`` releases (composition adds RDP at each order)."""
        q, sigma = self.sampling_rate, self.privacy_cfg.noise_multiplier
        return [rounds * rdp_sampled_gaussian(q, sigma, a) for a in self.orders]

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``privacy_cfg.delta`` after ``rounds`` rounds (0 rounds: 0; no noise: inf)."""
        if rounds < 0:
            raise ValueError("rounds must be >= 0")
        if rounds == 0:
            return 0.0
        if not self.privacy_cfg.enabled or self.privacy_cfg.noise_multiplier <= 0:
            return math.inf
        return rdp_to_epsilon(self.rdp(rounds), self.orders, self.delta)[0]

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
            self.accountant = None  # Flower's optional accountant (needs dp-accounting); ours below
            self.site_accountant = PrivacyAccountant(privacy_cfg, sampling_rate)
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
