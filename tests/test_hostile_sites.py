"""One faulty or hostile site must not spoil the federation.

Three digits sites and a held-out cohort run the real ServerApp and ClientApps in process; site_c
tampers with every reply it sends (as a hospital running modified code, or a GPU whose bf16
overflowed, would). Each behaviour is checked against the two-honest-site run (site_a + site_b
only): the bad reply is dropped and audited under site_c's registered name, the run finishes,
the global model stays finite, and held-out AUROC is within 0.02 of the honest run. Where site_c
misbehaves from round 1 on, the global model is even bit-identical to the honest run's: the
dropped reply had no influence at all.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from tdamil.federation.audit import read_audit
from tdamil.federation.config import FederationConfig
from tdamil.federation.records import ARRAYS, METRICS, SITE
from tdamil.federation.task import SiteData
from tdamil.federation.wire import PACKED, WIRE_LAYOUT, layout_from_json, unpack

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"name": "tdamil", "dim": 32, "depth": 1, "num_heads": 2}
# two rounds are enough for every behaviour (the replay needs a round after the one it replays); the
# honest federation below runs three, where late updates are nearly orthogonal and a screen could
# mistake an honest one for an attack. The behaviours train one local epoch per round (as
# configs/server.yaml; the screens compare the updates with each other); the honest federation
# trains two, so that its honest updates drift further apart.
ROUNDS = 2
HOSTILE = "site_c"


def _sites(names: list[str]):
    from tdamil.data.digits import DigitsBagsConfig, make_digits_sites
    from tdamil.simulation.sites import SimSites

    cfg = DigitsBagsConfig(num_train_bags=40, num_val_bags=6, num_test_bags=60, mean_bag_size=6, seed=3)
    made = make_digits_sites(cfg, 3, site_test_bags=4)
    sites = {n: SiteData(n, s.train, s.val, s.test) for n, s in made.items() if n in names}
    return SimSites(sites, {"held_out": made.held_out}, int(made["site_a"].train.in_dim))


def _run(tmp_path: Path, names: list[str], tamper: Callable[[int, Message, Message], None] | None = None, **fed):
    from tdamil.simulation.config import SimConfig
    from tdamil.simulation.engines import run_federation

    cfg = SimConfig(model=dict(TINY), output_dir=tmp_path, baselines=False)
    settings = dict(rounds=ROUNDS, lr=1e-3, local_epochs=1, min_sites=len(names), min_replies=2, round_timeout_s=60,
                    wait_for_sites_s=5, evaluate_sites=True) | fed
    cfg.federation = FederationConfig(**settings)
    sims = _sites(names)
    hostile_node = 1000 + names.index(HOSTILE) if HOSTILE in names else None

    def on_message(msg: Message, reply: Message) -> None:
        if tamper is not None and msg.metadata.dst_node_id == hostile_node and not reply.has_error():
            tamper(int(msg.content["config"]["server-round"]), msg, reply)

    setup = run_federation(cfg, sims, tmp_path, on_message=on_message)
    return setup, read_audit(tmp_path / "audit.jsonl")


def _final_auroc(events: list[dict]) -> float:
    return [e for e in events if e["event"] == "heldout_evaluation"][-1]["metrics"]["auroc"]


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """The two-honest-site run every behaviour is compared with (on one torch thread, as the tests:
    float sums depend on the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        setup, events = _run(tmp_path_factory.mktemp("honest"), ["site_a", "site_b"])
    finally:
        torch.set_num_threads(before)
    return setup.result.arrays, _final_auroc(events)


# --- the behaviours: each edits site_c's train reply in place -------------------------------------
# A reply's model travels packed (tdamil.federation.wire): site_c unpacks it, edits the named arrays
# and packs them again as the wire format says, concatenated in the layout's order (a model of
# another layout keeps its own length and dtype); arrays under other names go unpacked.
def _layout(msg: Message) -> dict:
    return layout_from_json(str(msg.content["config"][WIRE_LAYOUT]))


def _arrays(reply: Message, msg: Message) -> dict[str, np.ndarray]:
    return {k: a.numpy().copy() for k, a in unpack(reply.content[ARRAYS], _layout(msg)).items()}


def _set_arrays(reply: Message, arrays: dict[str, np.ndarray], msg: Message) -> None:
    layout = _layout(msg)
    if set(arrays) == set(layout):
        packed = {PACKED: Array(np.ascontiguousarray(np.concatenate([arrays[k].reshape(-1) for k in layout])))}
    else:
        packed = {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
    reply.content[ARRAYS] = ArrayRecord(packed)


def _map(fn: Callable[[str, np.ndarray], np.ndarray]):
    def tamper(rnd: int, msg: Message, reply: Message) -> None:
        if msg.metadata.message_type == "train":
            _set_arrays(reply, {k: fn(k, v) for k, v in _arrays(reply, msg).items()}, msg)
    return tamper


def _first_float(fn):
    def edit(reply: Message, msg: Message) -> None:
        arrays = _arrays(reply, msg)
        name = next(k for k, v in arrays.items() if v.dtype.kind == "f" and v.ndim == 2)
        arrays = fn(name, arrays)
        _set_arrays(reply, arrays, msg)
    return edit


def _train_only(edit):
    def tamper(rnd: int, msg: Message, reply: Message) -> None:
        if msg.metadata.message_type == "train":
            edit(reply, msg)
    return tamper


def _metric(key: str, value):
    def tamper(rnd: int, msg: Message, reply: Message) -> None:
        metrics = dict(reply.content[METRICS])
        metrics[key] = value
        reply.content[METRICS] = MetricRecord(metrics)
    return tamper


def _site(**fields):
    def tamper(rnd: int, msg: Message, reply: Message) -> None:
        record = dict(reply.content[SITE])
        record.update({k: (v(rnd) if callable(v) else v) for k, v in fields.items()})
        reply.content[SITE] = ConfigRecord(record)
    return tamper


def _replay():
    """From round 2 on, send round 1's reply again (arrays, metrics and site record)."""
    saved: dict[str, object] = {}

    def tamper(rnd: int, msg: Message, reply: Message) -> None:
        kind = msg.metadata.message_type
        if kind not in saved:
            saved[kind] = {k: copy.deepcopy(reply.content[k]) for k in (ARRAYS, METRICS, SITE) if k in reply.content}
            return
        for key, value in saved[kind].items():  # type: ignore[union-attr]
            reply.content[key] = copy.deepcopy(value)
    return tamper


def _sent_back_received(rnd: int, msg: Message, reply: Message) -> None:
    if msg.metadata.message_type == "train":
        reply.content[ARRAYS] = copy.deepcopy(msg.content[ARRAYS])


def _sign_flip(rnd: int, msg: Message, reply: Message) -> None:
    if msg.metadata.message_type == "train":
        received = {k: a.numpy() for k, a in unpack(msg.content[ARRAYS], _layout(msg)).items()}
        _set_arrays(reply, {k: (2 * received[k] - v if v.dtype.kind == "f" else v)
                            for k, v in _arrays(reply, msg).items()}, msg)


def _scaled(factor: float):
    return _map(lambda k, v: v * factor if v.dtype.kind == "f" else v)


BEHAVIOURS: dict[str, tuple[Callable, bool]] = {  # name -> (tamper, misbehaves from round 1)
    "nan weights": (_train_only(_first_float(lambda n, a: a | {n: np.full_like(a[n], np.nan)})), True),
    "inf weights": (_train_only(_first_float(lambda n, a: a | {n: a[n] + np.inf})), True),
    "weights x 1e6": (_scaled(1e6), True),
    "broadcastable shape (1, ...)": (_train_only(_first_float(lambda n, a: a | {n: a[n][:1]})), True),
    "larger shape": (_train_only(_first_float(lambda n, a: a | {n: np.concatenate([a[n], a[n]])})), True),
    "one extra array": (_train_only(lambda r, m: _set_arrays(r, _arrays(r, m) | {"aaa.extra": np.zeros(3, np.float32)},
                                                             m)), True),
    "arrays of another model": (_train_only(lambda r, m: _set_arrays(r, {f"other.{k}": v for k, v in
                                                                         _arrays(r, m).items()}, m)), True),
    "float64 arrays": (_map(lambda k, v: v.astype(np.float64) if v.dtype.kind == "f" else v), True),
    "num-examples 1e9": (_metric("num-examples", 1_000_000_000), True),
    "num-examples -19": (_metric("num-examples", -19), True),
    "num-examples 20.5": (_metric("num-examples", 20.5), True),
    "claims another site's name": (_site(name="site_a"), True),
    "a metric that is a list": (_metric("train-loss", [1.0, 2.0]), True),
    "huge metrics": (_metric("train-loss", 1e300), True),
    "auroc out of range": (_metric("val-auroc", 7.5), True),
    "an extra metric key": (_metric("leak", 1.0), True),
    "stale round number": (_site(**{"server-round": lambda rnd: rnd - 1}), True),
    "replayed earlier reply": (_replay(), False),
    "sent back the model it received": (_sent_back_received, True),
    "sign-flipped update": (_sign_flip, True),
}


FAST = ("nan weights", "num-examples -19", "claims another site's name", "sign-flipped update")


@pytest.mark.parametrize("behaviour", [b if b in FAST else pytest.param(b, marks=pytest.mark.slow) for b in BEHAVIOURS])
def test_a_hostile_site_is_dropped_audited_by_name_and_the_others_go_on(behaviour, honest, tmp_path):
    tamper, from_round_1 = BEHAVIOURS[behaviour]
    setup, events = _run(tmp_path, ["site_a", "site_b", HOSTILE], tamper)
    result = setup.result
    assert result.failed_rounds == [], [e for e in events if e["event"] == "failure"]
    finished = [e for e in events if e["event"] == "run_finished"]
    assert finished and finished[-1]["failed_rounds"] == []
    # the global model stays finite, in every checkpoint
    for name, array in result.arrays.items():
        assert np.isfinite(array.numpy()).all(), name
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["model_state"].values() if v.is_floating_point())
    # every round aggregated exactly the two honest sites; site_c's replies are failures under its real name
    hostile_rounds = range(1 if from_round_1 else 2, ROUNDS + 1)
    for rnd in range(1, ROUNDS + 1):
        (agg,) = [e for e in events if e["event"] == "aggregated" and e["round"] == rnd]
        want = ["site_a", "site_b"] if rnd in hostile_rounds else ["site_a", "site_b", HOSTILE]
        assert agg["sites"] == want, (rnd, agg)
        assert all(w is not None and 0 < w <= 40 for w in agg["weights"].values())
    failures = [e for e in events if e["event"] == "failure"]
    assert {e["round"] for e in failures if e["phase"] == "train"} == set(hostile_rounds), failures
    assert all(e["site"] == HOSTILE for e in failures), failures
    assert all(("refused" in e["reason"]) for e in failures), failures
    # nobody else lost anything: the model is the honest run's (bit-identical where site_c never counted)
    honest_arrays, honest_auroc = honest
    auroc = _final_auroc(events)
    print(f"FIGURE | {behaviour} | {auroc:.4f} | {honest_auroc:.4f} | {failures[0]['reason']}")
    assert abs(auroc - honest_auroc) <= 0.02, (auroc, honest_auroc)
    if from_round_1:
        for name, array in honest_arrays.items():
            assert np.array_equal(array.numpy(), result.arrays[name].numpy()), name
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["site"] for r in rows if r["phase"] == "train" and r["round"] in hostile_rounds} == {"site_a", "site_b"}


@pytest.mark.slow
def test_an_honest_federation_drops_nobody(tmp_path):
    """The screens are not trigger-happy: three honest sites, every reply aggregated every round."""
    setup, events = _run(tmp_path, ["site_a", "site_b", HOSTILE], rounds=3, local_epochs=2)
    assert [e for e in events if e["event"] == "failure"] == []
    assert sorted(e["round"] for e in events if e["event"] == "aggregated") == [1, 2, 3]
    assert all(e["sites"] == ["site_a", "site_b", HOSTILE] for e in events if e["event"] == "aggregated")
    assert math.isfinite(_final_auroc(events))


# --- the norm screen's clipping, on synthetic updates ---------------------------------------------
@pytest.fixture
def task_identity(monkeypatch):
    """Messages built outside a run need Flower's task identity set."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _update_replies(global_arrays: dict[str, np.ndarray], deltas: list[np.ndarray]) -> list[Message]:
    from flwr.app import RecordDict

    replies = []
    for i, delta in enumerate(deltas):
        instr = Message(RecordDict(), 1001 + i, "train")
        instr.metadata.__dict__["_message_id"] = f"m{i}"
        arrays = {"w": Array(np.ascontiguousarray((global_arrays["w"] + delta).astype(np.float32))),
                  "steps": Array(global_arrays["steps"].copy())}
        replies.append(Message(RecordDict({ARRAYS: ArrayRecord(arrays)}), reply_to=instr))
    return replies


def _screen_case(scales: list[float], **kwargs):
    from tdamil.federation.screening import screen_updates

    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=200).astype(np.float32), "steps": np.array([7], dtype=np.int64)}
    direction = rng.normal(size=200)
    deltas = [s * (direction + 0.3 * rng.normal(size=200)) * 1e-2 for s in scales]
    replies = _update_replies(base, deltas)
    before = [r.content[ARRAYS]["w"].numpy().copy() for r in replies]
    kept, dropped = screen_updates(ArrayRecord({k: Array(v) for k, v in base.items()}), replies, 10.0, 0.0, **kwargs)
    after = [r.content[ARRAYS]["w"].numpy() for r in replies]
    return base, replies, kept, dropped, before, after


@pytest.mark.usefixtures("task_identity")
def test_an_oversized_update_below_the_drop_factor_is_clipped_not_dropped():
    from tdamil.federation.screening import CLIP_FACTOR

    base, replies, kept, dropped, before, after = _screen_case([1.0, 1.1, 0.9, 1.0, 6.0])
    assert dropped == [] and kept == replies
    norms = [float(np.linalg.norm(a.astype(np.float64) - base["w"])) for a in after]
    typical = float(np.median(norms[:4]))
    assert float(np.linalg.norm(before[4].astype(np.float64) - base["w"])) > CLIP_FACTOR * typical
    assert norms[4] == pytest.approx(typical, rel=1e-4)  # scaled down to a typical site's norm ...
    d_before, d_after = before[4].astype(np.float64) - base["w"], after[4].astype(np.float64) - base["w"]
    assert float(d_before @ d_after) / (np.linalg.norm(d_before) * np.linalg.norm(d_after)) > 0.9999  # ... same direction
    for i in range(4):  # the others are untouched, bit for bit
        assert np.array_equal(before[i], after[i])
    assert after[4].dtype == np.float32 and replies[4].content[ARRAYS]["steps"].numpy()[0] == 7


@pytest.mark.usefixtures("task_identity")
def test_ordinary_updates_are_not_clipped_and_no_norm_screen_means_no_clipping():
    _base, _replies, kept, dropped, before, after = _screen_case([1.0, 1.3, 0.8, 1.0, 1.5])
    assert dropped == [] and all(np.array_equal(b, a) for b, a in zip(before, after))
    from tdamil.federation.screening import screen_updates

    _base, replies, kept, dropped, before, after = _screen_case([1.0, 1.1, 0.9, 1.0, 6.0], clip_factor=None)
    assert dropped == [] and np.array_equal(before[4], after[4])
    base = {"w": np.zeros(3, np.float32), "steps": np.array([7], dtype=np.int64)}
    replies = _update_replies(base, [np.ones(3), np.ones(3), 6 * np.ones(3)])
    kept, dropped = screen_updates(ArrayRecord({k: Array(v) for k, v in base.items()}), replies, None, None)
    assert np.array_equal(replies[2].content[ARRAYS]["w"].numpy(), 6 * np.ones(3, np.float32))


@pytest.mark.usefixtures("task_identity")
def test_a_flipped_update_is_dropped_and_an_honest_one_barely_against_the_others_is_kept():
    """Late rounds: honest updates agree only weakly (cosine ~0.2 with the others' mean) and one of
    them can be slightly negative by chance; a flipped update is about as opposed as an honest one
    agrees. Only the flipped one is dropped, and it does not drag the weak honest one down with it."""
    from tdamil.federation.screening import screen_updates

    rng = np.random.default_rng(1)
    dim = 2000
    common = rng.normal(size=dim)
    common /= np.linalg.norm(common)
    honest = [0.5 * common + rng.normal(size=dim) / np.sqrt(dim) for _ in range(4)]
    mean = np.mean(honest[:3], axis=0)
    mean /= np.linalg.norm(mean)
    noise = rng.normal(size=dim)
    noise -= (noise @ mean) * mean
    size = float(np.linalg.norm(honest[0]))
    weak = size * (noise / np.linalg.norm(noise) - 0.03 * mean)  # cosine -0.03 with the three others' mean
    deltas = [d * 1e-2 for d in [*honest[:3], weak, -honest[3]]]
    base = {"w": np.zeros(dim, np.float32), "steps": np.array([7], dtype=np.int64)}
    replies = _update_replies(base, deltas)
    kept, dropped = screen_updates(ArrayRecord({k: Array(v) for k, v in base.items()}), replies, 10.0, 0.0)
    assert [r for r, _ in dropped] == [replies[4]], [why for _, why in dropped]
    assert kept == replies[:4]
    assert "points against the other sites'" in dropped[0][1]
    # without the flipped one, the weak honest update is still kept
    kept, dropped = screen_updates(ArrayRecord({k: Array(v) for k, v in base.items()}), replies[:4], 10.0, 0.0)
    assert dropped == [] and kept == replies[:4]
