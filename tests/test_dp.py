"""Site-level DP: the RDP accountant against known values, the server wrapper and the client mods."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from tdamil.security.config import PrivacyConfig
from tdamil.security.dp import PrivacyAccountant, dp_client_mods, dp_server_strategy


def _cfg(**kw) -> PrivacyConfig:
    return PrivacyConfig(enabled=True, **kw)


# --------------------------------------------------------------------------------------------
# accountant: Flower's RdpAccountant (dp-accounting) checked against closed forms and quadrature
def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with sensitivity/sigma = mu (Balle & Wang 2018)."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    dlt = lambda e: phi(-e / mu + mu / 2) - math.exp(e) * phi(-e / mu - mu / 2)  # noqa: E731
    lo, hi = 0.0, 500.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if dlt(mid) > delta else (lo, mid)
    return hi


def _improved_conversion(rdp, orders, delta: float) -> float:
    """RDP curve -> epsilon (Canonne, Kamath, Steinke 2020, Prop. 12), the reference for the checks."""
    return max(0.0, min(r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1) for r, a in zip(rdp, orders)))


def _flower_poisson_epsilon(q_num: int, n: int, sigma: float, steps: int, delta: float, orders=None) -> float:
    from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, RdpAccountant, SamplingMethod
    from flwr.serverapp import PrivacyConfig as FlowerPrivacyConfig

    acc = RdpAccountant(FlowerPrivacyConfig(delta, n, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.POISSON),
                        orders=orders)
    acc.compose(GaussianPrivacyEvent(sigma, q_num, n), count=steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("sigma,rounds", [(1.0, 10), (0.8, 50), (2.0, 100), (5.0, 3)])
def test_full_participation_matches_closed_forms(sigma, rounds):
    delta = 1e-5
    eps = PrivacyAccountant(_cfg(noise_multiplier=sigma, delta=delta), 1.0, num_sites=3).epsilon(rounds)
    # T compositions of the Gaussian mechanism = one Gaussian with mu = sqrt(T)/sigma: exact value
    exact = _exact_gaussian_epsilon(math.sqrt(rounds) / sigma, delta)
    # classic RDP conversion optimised over a continuous order has a closed form (an upper bound)
    classic_closed = rounds / (2 * sigma**2) + math.sqrt(2 * rounds * math.log(1 / delta)) / sigma
    assert exact <= eps <= classic_closed
    assert eps <= 1.3 * exact  # RDP is a tight upper bound for the Gaussian mechanism
    # the Gaussian's RDP is T * a / (2 sigma^2) at every order a: the library's epsilon is its conversion
    orders = [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512]
    reference = _improved_conversion([rounds * a / (2 * sigma**2) for a in orders], orders, delta)
    assert eps == pytest.approx(reference, rel=1e-6)


def test_sampled_gaussian_rdp_matches_numerical_integration():
    """The library's sampled Gaussian = Renyi divergence of the mixture, computed by quadrature."""
    sigma, n, k, rounds, delta = 1.3, 100, 10, 20, 1e-5
    x = np.linspace(-40, 41, 400001)
    p0 = np.exp(-x**2 / (2 * sigma**2))
    p1 = np.exp(-(x - 1) ** 2 / (2 * sigma**2))
    mix = (1 - k / n) * p0 + k / n * p1
    orders = (2, 3, 8, 16)
    rdp = []
    for order in orders:
        integrand = p0 * (mix / p0) ** order / math.sqrt(2 * math.pi * sigma**2)
        rdp.append(rounds * math.log(np.trapezoid(integrand, x)) / (order - 1))
    library = _flower_poisson_epsilon(k, n, sigma, rounds, delta, orders=orders)
    assert library == pytest.approx(_improved_conversion(rdp, orders, delta), rel=1e-5)


def test_published_dpsgd_values_tf_privacy_mnist():
    """TF Privacy's MNIST DP-SGD tutorial (N=60000, batch 256, delta=1e-5, classic conversion over its
    orders): noise 1.1 for 60 epochs -> eps 3.01; noise 0.7 for 45 epochs -> eps 7.10. The library's
    RDP at each order (read back through its improved conversion) reproduces both."""
    delta, orders = 1e-5, [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))
    for sigma, epochs, published in ((1.1, 60, 3.01), (0.7, 45, 7.10)):
        steps = int(epochs * 60000 / 256)
        classic = []
        for a in orders[9::3]:
            eps_a = _flower_poisson_epsilon(256, 60000, sigma, steps, delta, orders=(a,))
            rdp_a = eps_a - math.log1p(-1 / a) + (math.log(delta) + math.log(a)) / (a - 1)
            classic.append(rdp_a + math.log(1 / delta) / (a - 1))
        assert min(classic) == pytest.approx(published, rel=0.02)
        assert _flower_poisson_epsilon(256, 60000, sigma, steps, delta) < published  # improved conversion


def test_sampling_without_replacement_follows_flowers_rule():
    cfg = _cfg(noise_multiplier=1.0)
    # min_train_nodes = num_sites (server_app passes min_sites): every site every round, no amplification
    assert PrivacyAccountant(cfg, 0.5, num_sites=4, min_sample=4).sample_size == 4
    assert PrivacyAccountant(cfg, 0.5, num_sites=4, min_sample=4).epsilon(10) == PrivacyAccountant(cfg).epsilon(10)
    few = PrivacyAccountant(cfg, 0.1, num_sites=100, min_sample=2)
    assert few.sample_size == 10  # int(100 * 0.1), as FedAvg.configure_train
    assert few.epsilon(10) < PrivacyAccountant(cfg, 1.0, num_sites=100).epsilon(10)
    assert PrivacyAccountant(cfg, 0.05, num_sites=100, min_sample=10).sample_size == 10
    with pytest.raises(ValueError, match="num_sites"):
        PrivacyAccountant(cfg, 0.5)


def test_epsilon_behaves_monotonically_and_edge_cases():
    acc = PrivacyAccountant(_cfg(noise_multiplier=1.0), 1.0)
    eps = [acc.epsilon(r) for r in (0, 1, 2, 5, 10, 50)]
    assert eps[0] == 0.0 and all(a < b for a, b in zip(eps, eps[1:]))
    assert PrivacyAccountant(_cfg(noise_multiplier=2.0), 1.0).epsilon(10) < acc.epsilon(10)
    assert math.isinf(PrivacyAccountant(_cfg(noise_multiplier=0.0), 1.0).epsilon(1))
    with pytest.raises(ValueError):
        PrivacyAccountant(_cfg(), 0.0)
    assert acc.report(3)["dp_epsilon"] == acc.epsilon(3)


# --------------------------------------------------------------------------------------------
# strategy and mods with real Flower messages (no processes)
class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


@pytest.fixture
def identity():
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _arrays(vec) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(vec, dtype=np.float32))})


def _site_app(new_weights, n_examples):
    def app(msg, ctx):
        content = RecordDict({"arrays": _arrays(new_weights), "metrics": MetricRecord({"num-examples": n_examples})})
        return Message(content, reply_to=msg)

    return app


def test_disabled_privacy_changes_nothing():
    strat = FedAvg()
    assert dp_server_strategy(strat, PrivacyConfig(enabled=False), 3) is strat
    assert dp_client_mods(PrivacyConfig(enabled=False)) == []


def test_round_clips_at_sites_weights_equally_and_adds_calibrated_noise(identity):
    dim, c, sigma = 20000, 2.0, 0.5
    cfg = _cfg(clipping_norm=c, noise_multiplier=sigma)
    strat = dp_server_strategy(FedAvg(min_available_nodes=2, min_train_nodes=2), cfg, 2)
    msgs = list(strat.configure_train(1, _arrays(np.zeros(dim)), ConfigRecord({}), _Grid([5, 6])))
    assert all(m.content.config_records["config"]["clipping_norm"] == c for m in msgs)
    mods = dp_client_mods(cfg)
    big = np.full(dim, 1.0)  # update norm sqrt(dim) >> c
    replies = [
        mods[0](msgs[0], None, _site_app(big, 1000)),   # large site
        mods[0](msgs[1], None, _site_app(-big, 10)),    # small site
    ]
    for r in replies:  # nothing leaves a site unclipped
        assert np.linalg.norm(r.content.array_records["arrays"].to_numpy_ndarrays()[0]) == pytest.approx(c, rel=1e-4)
    arrays, metrics = strat.aggregate_train(1, replies)
    out = arrays.to_numpy_ndarrays()[0].astype(np.float64)
    # equal weights: the two clipped updates cancel, what is left is the noise N(0, (sigma*c/m)^2)
    assert abs(out.mean()) < 5 * sigma * c / 2 / math.sqrt(dim)
    assert out.std() == pytest.approx(sigma * c / 2, rel=0.05)
    assert metrics["dp_noise_std"] == pytest.approx(sigma * c / 2)
    assert metrics["dp_epsilon"] == pytest.approx(PrivacyAccountant(cfg, 1.0).epsilon(1))
    # the sites' reported weights are left as they were (audit and history read them)
    assert replies[0].content.metric_records["metrics"]["num-examples"] == 1000


def test_unclipped_reply_is_dropped_and_failed_site_tolerated(identity, caplog):
    cfg = _cfg(clipping_norm=1.0, noise_multiplier=0.0)
    strat = dp_server_strategy(FedAvg(min_available_nodes=3, min_train_nodes=3), cfg, 3)
    msgs = list(strat.configure_train(2, _arrays(np.zeros(4)), ConfigRecord({}), _Grid([1, 2, 3])))
    mod = dp_client_mods(cfg)[0]
    clipped = mod(msgs[0], None, _site_app(np.full(4, 3.0), 5))          # clipped to norm 1
    unclipped = _site_app(np.full(4, 3.0), 5)(msgs[1], None)            # a site without the DP mods
    failed = Message(Error(code=0, reason="site crashed"), reply_to=msgs[2])
    arrays, metrics = strat.aggregate_train(2, [clipped, unclipped, failed])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(4, 0.5), rtol=1e-5)
    assert metrics["dp_sites_aggregated"] == 1
    assert "did not clip" in caplog.text


def test_site_refuses_to_train_without_coordinator_dp_and_uses_its_own_smaller_norm(identity):
    site_cfg = _cfg(clipping_norm=0.5)
    mod = dp_client_mods(site_cfg)[0]
    plain = FedAvg(min_available_nodes=1, min_train_nodes=1)
    msg = list(plain.configure_train(1, _arrays(np.zeros(4)), ConfigRecord({}), _Grid([1])))[0]
    called = []
    reply = mod(msg, None, lambda m, c: called.append(1))
    assert reply.has_error() and "requires differential privacy" in reply.error.reason and not called
    strat = dp_server_strategy(FedAvg(min_available_nodes=1, min_train_nodes=1), _cfg(clipping_norm=5.0), 1)
    msg = list(strat.configure_train(1, _arrays(np.zeros(4)), ConfigRecord({}), _Grid([1])))[0]
    reply = mod(msg, None, _site_app(np.full(4, 10.0), 3))
    assert np.linalg.norm(reply.content.array_records["arrays"].to_numpy_ndarrays()[0]) == pytest.approx(0.5, rel=1e-4)
