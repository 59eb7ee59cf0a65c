"""One message per site per round, the site evaluation of the previous round's model, and the
per-round timeline (issue #10), on the in-process grid with the real ClientApp and round loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tdamil.federation.audit import read_audit
from tdamil.federation.config import FederationConfig
from tdamil.federation.grids import InProcessGrid, PatientGrid
from tdamil.federation.loop import RoundLoop
from tdamil.federation.strategies import build_strategy
from tdamil.federation.task import ModelSpec, SiteData, build_model, model_to_arrays
from tdamil.federation.timeline import SEGMENTS, TABLE_COLUMNS, site_segments

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ModelSpec({"name": "tdamil", "dim": 16, "depth": 1, "num_heads": 2}, 8, 2)


def _runtimes():
    from tdamil.client.client_app import SiteRuntime
    from tdamil.data.bags import InMemoryBagDataset
    from tdamil.train.engine import TrainConfig

    gen = torch.Generator().manual_seed(0)
    out = {}
    for k, site in enumerate(("site_a", "site_b")):
        bags = [torch.randn(5 + i, 8, generator=gen) + (i % 2) for i in range(6 + k)]
        labels = [i % 2 for i in range(len(bags))]
        data = SiteData(site, InMemoryBagDataset(bags[:4], labels[:4], num_classes=2),
                        InMemoryBagDataset(bags[4:], labels[4:], num_classes=2))
        out[site] = SiteRuntime(site, data, TrainConfig(progress=False, device="cpu"))
    return out


def _run(out: Path, rounds: int, *, resume: bool = False, seen: list | None = None, **fed_kw):
    from tdamil.client.client_app import make_client_app

    runtimes = _runtimes()
    app = make_client_app(lambda ctx: runtimes[ctx.node_config["site"]])
    fed = FederationConfig(rounds=rounds, lr=1e-3, min_sites=2, round_timeout_s=60, wait_for_sites_s=5, **fed_kw)
    grid = InProcessGrid(app, {1: {"site": "site_a"}, 2: {"site": "site_b"}},
                         on_message=(lambda m, r: seen.append((m.metadata.message_type, r))) if seen is not None
                         else None)
    loop = RoundLoop(build_strategy(fed), fed, TINY.to_json(), out, plot=False)
    loop.run(PatientGrid(grid, 2, 5), model_to_arrays(build_model(TINY, seed=0)), resume=resume)


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_one_message_per_site_per_round_carries_the_previous_models_site_evaluation(tmp_path):
    seen: list = []
    _run(tmp_path, 3, seen=seen)
    kinds = [k for k, _ in seen]
    assert kinds.count("train") == 6 and kinds.count("evaluate") == 2  # evaluate: the last model only
    rows = _rows(tmp_path)
    evaluated = {(r["round"], r["site"]) for r in rows if r["phase"] == "evaluate"}
    assert evaluated == {(r, s) for r in (0, 1, 2, 3) for s in ("site_a", "site_b")}
    # round r's train reply evaluated the model it received: recorded as round r-1, same numbers
    trains = [r for k, r in seen if k == "train"]
    first_a = next(r for r in trains if r.content["site"]["name"] == "site_a")
    row = next(r for r in rows if r["phase"] == "evaluate" and r["round"] == 0 and r["site"] == "site_a")
    assert row["loss"] == pytest.approx(first_a.content["metrics"]["global-loss"])
    assert row["num-examples"] == 2  # site_a's validation bags, not its training bags
    assert not any(k.startswith(("global-", "time-")) for r in rows for k in r)  # stamps stay in the audit
    means = {r["round"] for r in rows if r["phase"] == "aggregate" and r["site"] == "site-evaluation"}
    assert means == {0, 1, 2, 3}
    audit = read_audit(tmp_path / "audit.jsonl")
    via = {(e["round"], e["via"]) for e in audit if e["event"] == "site_evaluation" and e["site"] == "site_b"}
    assert via == {(0, "train message of round 1"), (1, "train message of round 2"),
                   (2, "train message of round 3"), (3, "evaluate message")}


def test_the_older_two_message_path_stays_available(tmp_path):
    seen: list = []
    _run(tmp_path, 2, seen=seen, evaluate_with_train=False)
    kinds = [k for k, _ in seen]
    assert kinds.count("train") == 4 and kinds.count("evaluate") == 4
    assert all(math.isnan(r.content["metrics"]["global-auroc"]) for k, r in seen if k == "train")
    evaluated = {r["round"] for r in _rows(tmp_path) if r["phase"] == "evaluate"}
    assert evaluated == {1, 2}


def test_resume_records_each_site_evaluation_once(tmp_path):
    _run(tmp_path, 2)
    _run(tmp_path, 3, resume=True)
    rows = [(r["round"], r["site"]) for r in _rows(tmp_path) if r["phase"] == "evaluate"]
    assert sorted(rows) == sorted((r, s) for r in (0, 1, 2, 3) for s in ("site_a", "site_b"))


def test_every_round_has_a_timeline_whose_columns_sum_to_the_round_time(tmp_path):
    _run(tmp_path, 2)
    audit = read_audit(tmp_path / "audit.jsonl")
    lines = [e for e in audit if e["event"] == "round_timeline"]
    assert [e["round"] for e in lines] == [1, 2]
    for line in lines:
        cols = line["columns"]
        assert set(cols) == set(TABLE_COLUMNS)
        assert sum(cols.values()) == pytest.approx(line["seconds"], abs=1e-6)
        assert all(v >= 0 for k, v in cols.items() if k != "unaccounted")
        assert cols["train"] > 0 and line["critical_site"] in ("site_a", "site_b")
        for segments in line["sites"].values():
            assert set(segments) == {name for name, _ in SEGMENTS}
    finished = {e["round"]: e["seconds"] for e in audit if e["event"] == "round_finished"}
    assert finished == {e["round"]: e["seconds"] for e in lines}
    assert lines[-1]["columns"]["site evaluate message"] > 0  # the last model's evaluation


def test_site_segments_sum_to_sent_to_received_whatever_the_stamps():
    stamps = {"time-process-start": 50.0, "time-handler-start": 101.0, "time-trained": 104.0,
              "time-reply-built": 104.5, "time-model-built": float("nan")}
    seg = site_segments(100.0, 105.0, stamps)
    assert sum(seg.values()) == pytest.approx(5.0)
    assert seg["wait + spawn"] == 0.0  # a process started before the message (in-process, Ray)
    assert seg["flower -> handler"] == pytest.approx(1.0)
    assert seg["train"] == pytest.approx(3.0) and seg["build model"] == 0.0
    assert seg["push + poll"] == pytest.approx(0.5)
    late = site_segments(100.0, 101.0, {"time-reply-built": 109.0})  # site clock ahead: clamped
    assert sum(late.values()) == pytest.approx(1.0) and min(late.values()) >= 0


def _bare_loop(tmp_path):
    """The round loop's reply intake with an audit, the timeout and a history that records nothing."""
    from types import SimpleNamespace

    from tdamil.federation.audit import AuditLog
    from tdamil.federation.intake import ReplyIntake

    fed = SimpleNamespace(round_timeout_s=60.0, update_norm_factor=10.0, update_min_cosine=-0.1)
    return ReplyIntake(AuditLog(tmp_path / "audit.jsonl"), SimpleNamespace(add=lambda *a, **k: None), fed)


def test_an_error_reply_from_the_superlink_names_the_site_it_was_sent_to(tmp_path):
    """A site killed mid-round gets an error reply whose sender is the SuperLink (node id 1): the
    audit names the site the message was sent to, never ``site: null`` with the SuperLink's id."""
    from types import SimpleNamespace

    from tdamil.federation.audit import read_audit

    loop = _bare_loop(tmp_path)
    grid = SimpleNamespace(site_names={1001: "site_b"}, received_at={})
    sent = SimpleNamespace(metadata=SimpleNamespace(message_id="m-1", dst_node_id=1001))
    error = SimpleNamespace(metadata=SimpleNamespace(src_node_id=1, reply_to_message_id="m-1"),
                            has_error=lambda: True, error=SimpleNamespace(reason="node went offline", code=1))
    from tdamil.federation.records import ReplyContract

    assert loop.collect(grid, 3, "train", [sent], [error], ReplyContract("train", 3)) == []
    (failure,) = [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "failure"]
    assert failure["site"] == "site_b" and failure["node_id"] == 1001 and failure["round"] == 3


def test_replies_are_aggregated_in_site_order_whatever_their_arrival(tmp_path):
    """FedAvg sums floats in the order of the replies it gets; in arrival order two runs of the same
    seeded simulation differed from round 1 on (in the 8th decimal, then more). The intake hands them
    over sorted by site."""
    from types import SimpleNamespace

    from flwr.app import Message, MetricRecord, RecordDict

    from tdamil.federation.records import SITE, ReplyContract, eval_metric_keys, reply_site, site_record

    loop = _bare_loop(tmp_path)
    metrics = {k: float("nan") for k in eval_metric_keys()} | {"num-examples": 1}

    def reply(site: str, node: int) -> Message:
        instr = Message(RecordDict(), node, "evaluate")
        instr.metadata.__dict__["_message_id"] = f"m-{site}"
        out = Message(RecordDict({SITE: site_record(site, 1, "t"), "metrics": MetricRecord(metrics)}),
                      reply_to=instr)
        out.metadata.__dict__["_src_node_id"] = node
        return out

    grid = SimpleNamespace(site_names={}, received_at={})
    arrived = [reply("site_c", 3), reply("site_a", 1), reply("site_b", 2)]
    for order in (arrived, arrived[::-1]):
        got = loop.collect(grid, 1, "evaluate", [], list(order), ReplyContract("evaluate", 1, "t"))
        assert [reply_site(r) for r in got] == ["site_a", "site_b", "site_c"]
