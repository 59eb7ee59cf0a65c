"""FedProx / FedAdam / FedYogi and site-level DP run through the same round loop (in-process)."""

from __future__ import annotations

import json

import pytest
import torch

from tdamil.federation.config import FederationConfig
from tdamil.security.config import PrivacyConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(tmp_path, rounds=2, privacy=None, **fed):
    from tdamil.data.digits import DigitsBagsConfig, make_digits_sites
    from tdamil.simulation.config import SimConfig
    from tdamil.simulation.engines import run_federation
    from tdamil.simulation.sites import SimSites
    from tdamil.federation.task import SiteData

    made = make_digits_sites(DigitsBagsConfig(num_train_bags=6, num_val_bags=4, num_test_bags=10, mean_bag_size=5,
                                              seed=2), 2, site_test_bags=4)
    sims = SimSites({n: SiteData(n, s.train, s.val, s.test) for n, s in made.items()}, {"held_out": made.held_out},
                    int(made["site_a"].train.in_dim))
    cfg = SimConfig(model={"name": "tdamil", "dim": 16, "depth": 1, "num_heads": 2}, baselines=False)
    cfg.federation = FederationConfig(rounds=rounds, lr=1e-3, min_sites=2, round_timeout_s=60, wait_for_sites_s=5, **fed)
    if privacy is not None:
        cfg.privacy = privacy
    setup = run_federation(cfg, sims, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return setup, rows


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam", "fedyogi"])
def test_other_strategies_update_the_global_model(tmp_path, strategy):
    from tdamil.checkpoint import load_checkpoint

    setup, rows = _run(tmp_path, strategy=strategy, proximal_mu=0.1, server_lr=0.01)
    assert setup.result.failed_rounds == []
    r1 = load_checkpoint(tmp_path / "run" / "checkpoints" / "round_0001.pt")["model_state"]
    r2 = load_checkpoint(tmp_path / "run" / "checkpoints" / "round_0002.pt")
    assert any(not torch.equal(r1[k], r2["model_state"][k]) for k in r1)
    if strategy != "fedprox":  # the server optimiser's moments are saved for --resume
        assert set(r2["strategy_state"]) == {"m_t", "v_t"}


def test_differential_privacy_reports_epsilon_every_round(tmp_path):
    setup, rows = _run(tmp_path, privacy=PrivacyConfig(enabled=True, clipping_norm=1.0, noise_multiplier=1.0))
    assert setup.result.failed_rounds == []
    eps = [r["dp-epsilon"] for r in rows if r["phase"] == "aggregate" and r["site"] == "federation"]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    # the audit log records the weights the DP wrapper used (equal per site), not the slide counts
    from tdamil.federation.audit import read_audit

    events = read_audit(tmp_path / "run" / "audit.jsonl")
    slides = {e["site"]: e["metrics"]["num-examples"] for e in events if e["event"] == "reply" and e["phase"] == "train"}
    assert set(slides.values()) != {1}  # slide counts differ from the equal DP weights
    for agg in (e for e in events if e["event"] == "aggregated"):
        assert agg["weights"] == {"site_a": 1.0, "site_b": 1.0} and "equal" in agg["weighting"]


def test_fedavg_audit_weights_are_the_slide_counts(tmp_path):
    from tdamil.federation.audit import read_audit

    _run(tmp_path, rounds=1)
    events = read_audit(tmp_path / "run" / "audit.jsonl")
    slides = {e["site"]: e["metrics"]["num-examples"] for e in events if e["event"] == "reply" and e["phase"] == "train"}
    (agg,) = [e for e in events if e["event"] == "aggregated"]
    assert agg["weights"] == slides and agg["weighting"] == "num-examples"
