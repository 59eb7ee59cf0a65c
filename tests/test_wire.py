"""The model on the wire (tdamil.federation.wire): one packed array per message, unpacked where
the message enters; fp16 replies; the site-evaluation message as a bit-exact difference."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message

from tdamil.config import ConfigError
from tdamil.federation.audit import read_audit
from tdamil.federation.config import FederationConfig
from tdamil.federation.records import ARRAYS
from tdamil.federation.screening import layout_of
from tdamil.federation.task import ModelSpec, SiteData, build_model, model_to_arrays
from tdamil.federation.wire import PACKED, WireError, flatten, pack, unpack

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"name": "tdamil", "dim": 16, "depth": 1, "num_heads": 2}


def _model(seed: int = 0) -> ArrayRecord:
    return model_to_arrays(build_model(ModelSpec(TINY, in_dim=8, num_classes=2), seed=seed))


def _same(a: ArrayRecord, b: ArrayRecord) -> bool:
    return list(a.keys()) == list(b.keys()) and all(
        a[k].numpy().dtype == b[k].numpy().dtype and a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)


def test_fp32_pack_unpack_is_bit_exact_one_array_in_layout_order():
    arrays = _model()
    layout = layout_of(arrays)
    # values a float round trip could alter: -0.0, subnormals, the largest float32
    first = next(iter(layout))
    edited = {k: a.numpy().copy() for k, a in arrays.items()}
    edited[first].reshape(-1)[:3] = [-0.0, np.float32(1e-45), np.finfo(np.float32).max]
    arrays = ArrayRecord({k: Array(v) for k, v in edited.items()})
    packed = pack(arrays, layout)
    assert list(packed.keys()) == [PACKED]
    assert packed[PACKED].numpy().dtype == np.float32 and packed[PACKED].numpy().size == sum(
        v.size for v in edited.values())
    assert _same(unpack(packed, layout), arrays)


def test_the_xor_difference_is_bit_exact_and_smaller_than_the_model():
    base_arrays, layout = _model(0), layout_of(_model(0))
    rng = np.random.default_rng(0)
    new = ArrayRecord({k: Array((a.numpy() + 1e-4 * rng.standard_normal(a.numpy().shape)).astype(np.float32))
                       for k, a in base_arrays.items()})
    base = flatten(base_arrays, layout)
    packed = pack(new, layout, "xor", base)
    assert packed[PACKED].numpy().nbytes < 0.8 * base.nbytes
    assert _same(unpack(packed, layout, "xor", base), new)
    assert unpack(pack(base_arrays, layout, "xor", base), layout, "xor", base) is not None
    assert pack(base_arrays, layout, "xor", base)[PACKED].numpy().nbytes < 0.01 * base.nbytes  # nothing changed


@pytest.mark.parametrize("codec", ["fp16", "fp16-delta"])
def test_fp16_codecs_halve_the_bytes_within_half_precision(codec):
    base_arrays = _model(0)
    layout = layout_of(base_arrays)
    trained = _model(1)
    base = flatten(base_arrays, layout)
    packed = pack(trained, layout, codec, base)
    assert packed[PACKED].numpy().nbytes * 2 == flatten(trained, layout).nbytes
    got, want = flatten(unpack(packed, layout, codec, base), layout), flatten(trained, layout)
    scale = np.abs(want - base) if codec == "fp16-delta" else np.abs(want)
    assert np.all(np.abs(got - want) <= scale * 2 ** -10 + 1e-7)


@pytest.mark.parametrize("record, codec, why", [
    (lambda a, L: ArrayRecord({PACKED: Array(flatten(a, L)[:-1])}), "fp32", "float32[" ),
    (lambda a, L: ArrayRecord({PACKED: Array(flatten(a, L).astype(np.float64))}), "fp32", "float64"),
    (lambda a, L: a, "fp32", "not packed"),
    (lambda a, L: ArrayRecord({PACKED: Array(flatten(a, L)), "x": Array(np.zeros(2, np.float32))}), "fp32",
     "not packed"),
    (lambda a, L: ArrayRecord({PACKED: Array(flatten(a, L))}), "fp16", "float16"),
    (lambda a, L: ArrayRecord({PACKED: Array(np.arange(50, dtype=np.uint8))}), "xor", "does not inflate"),
])
def test_a_malformed_packed_record_is_a_wire_error(record, codec, why):
    arrays = _model()
    layout = layout_of(arrays)
    with pytest.raises(WireError, match="(?i)" + why.replace("[", r"\[")):
        unpack(record(arrays, layout), layout, codec, flatten(arrays, layout))


def test_update_codec_is_validated_with_a_hint(tmp_path):
    from tdamil.config import from_dict

    with pytest.raises(ValueError, match="Did you mean 'fp16-delta'"):
        FederationConfig(update_codec="fp16delta")
    with pytest.raises(ConfigError, match="update_codec.*Did you mean 'fp16'"):
        from_dict(FederationConfig, {"update_codec": "fp61"}, source="server.yaml")


# --- in a federation -------------------------------------------------------------------------------
def _run(tmp_path: Path, rounds: int = 2, on_message=None, **fed):
    from tdamil.data.digits import DigitsBagsConfig, make_digits_sites
    from tdamil.simulation.config import SimConfig
    from tdamil.simulation.engines import run_federation
    from tdamil.simulation.sites import SimSites

    made = make_digits_sites(DigitsBagsConfig(num_train_bags=16, num_val_bags=6, num_test_bags=40, mean_bag_size=6,
                                              seed=1), 2, site_test_bags=4)
    sims = SimSites({n: SiteData(n, s.train, s.val, s.test) for n, s in made.items()}, {"held_out": made.held_out},
                    int(made["site_a"].train.in_dim))
    cfg = SimConfig(model=dict(TINY), output_dir=tmp_path, baselines=False)
    cfg.federation = FederationConfig(**(dict(rounds=rounds, lr=1e-3, min_sites=2, round_timeout_s=60,
                                              wait_for_sites_s=5) | fed))
    setup = run_federation(cfg, sims, tmp_path, on_message=on_message)
    return setup, read_audit(tmp_path / "audit.jsonl")


def test_one_packed_array_travels_each_way_and_the_last_evaluation_is_a_difference(tmp_path):
    seen: list[tuple] = []

    def look(msg: Message, reply: Message) -> None:  # the records as they travel, before the coordinator unpacks
        sent = {k: (a.numpy().dtype, a.numpy().size) for k, a in msg.content[ARRAYS].items()}
        back = {k: str(a.dtype) for k, a in reply.content[ARRAYS].items()} if reply.content.array_records else {}
        seen.append((msg.metadata.message_type, int(msg.content["config"].get("server-round", 0)),
                     sent, back, dict(msg.content["config"])))

    setup, events = _run(tmp_path, rounds=2, on_message=look)
    size = flatten(setup.result.arrays, layout_of(setup.result.arrays)).size
    train = [s for s in seen if s[0] == "train"]
    assert len(train) == 4
    for _, rnd, sent, back, cfg in train:
        assert sent == {PACKED: (np.float32, size)} and back == {PACKED: "float32"}
        assert cfg["keep-base"] is (rnd == 2)  # the last round's train message: a separate evaluation follows
    evaluations = [s for s in seen if s[0] == "evaluate"]
    assert len(evaluations) == 2
    for _, _, sent, back, cfg in evaluations:
        assert set(sent) == {PACKED} and sent[PACKED][0] == np.uint8 and sent[PACKED][1] < 4 * size
        assert cfg["base-token"] == cfg["round-token"]
    assert [e for e in events if e["event"] == "failure"] == []
    rows = [e for e in events if e["event"] == "site_evaluation"]
    assert {(e["round"], e["site"], e["via"]) for e in rows} == {
        (0, "site_a", "train message of round 1"), (0, "site_b", "train message of round 1"),
        (1, "site_a", "train message of round 2"), (1, "site_b", "train message of round 2"),
        (2, "site_a", "evaluate message"), (2, "site_b", "evaluate message")}
    replies = [e for e in events if e["event"] == "reply" and e["phase"] == "train"]
    assert all(e["payload_bytes"] < 4 * size + 4096 for e in replies)
    # the audit records what the evaluate message carried (the WAN bench's floor of the last round)
    sent = [e for e in events if e["event"] == "evaluate_sent"]
    assert [e["round"] for e in sent] == [2] and len(sent[0]["model_bytes"]) == 2
    carried = sorted(s[2][PACKED][1] for s in evaluations)
    for recorded, payload in zip(sorted(sent[0]["model_bytes"]), carried):
        assert payload <= recorded < payload + 1024  # the payload plus the record's header


def test_a_malformed_packed_reply_is_refused_and_audited_under_the_site(tmp_path):
    def truncate(msg: Message, reply: Message) -> None:
        if msg.metadata.dst_node_id == 1001 and msg.metadata.message_type == "train" and not reply.has_error():
            flat = reply.content[ARRAYS][PACKED].numpy()
            reply.content[ARRAYS] = ArrayRecord({PACKED: Array(flat[:-7].copy())})

    seen: dict[str, str] = {}

    def look(msg: Message, reply: Message) -> None:
        truncate(msg, reply)
        if msg.metadata.message_type == "evaluate":
            seen[str(msg.metadata.dst_node_id)] = str(msg.content[ARRAYS][PACKED].numpy().dtype)

    setup, events = _run(tmp_path, rounds=1, on_message=look, min_replies=1)
    failures = [e for e in events if e["event"] == "failure"]
    assert len(failures) == 1, failures
    assert failures[0]["site"] == "site_b" and failures[0]["phase"] == "train"
    assert "reply refused: its model cannot be unpacked" in failures[0]["reason"]
    assert "federation.update_codec=fp32" in failures[0]["reason"]
    (agg,) = [e for e in events if e["event"] == "aggregated"]
    assert agg["sites"] == ["site_a"]
    assert setup.result.failed_rounds == []
    # the last evaluation: site_a (its reply counted) gets the difference, site_b the whole model
    assert seen == {"1000": "uint8", "1001": "float32"}
    rows = {(e["site"], e["via"]) for e in events if e["event"] == "site_evaluation" and e["round"] == 1}
    assert rows == {("site_a", "evaluate message"), ("site_b", "evaluate message")}


def _heldout_auroc(events: list[dict]) -> float:
    return [e for e in events if e["event"] == "heldout_evaluation"][-1]["metrics"]["auroc"]


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    """The fp32 federation both codecs are compared with, run once (on one torch thread, as they are)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(tmp_path_factory.mktemp("fp32"), rounds=3)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["fp16", "fp16-delta"])
def test_a_federation_with_fp16_replies_ends_near_the_fp32_model(tmp_path, codec, fp32_run):
    ref, ref_events = fp32_run
    got, events = _run(tmp_path / codec, rounds=3, update_codec=codec)
    layout = layout_of(ref.result.arrays)
    a, b = flatten(ref.result.arrays, layout), flatten(got.result.arrays, layout)
    assert not np.array_equal(a, b)  # the codec was used
    assert np.abs(a - b).max() < 1e-2 * max(1.0, float(np.abs(a).max()))
    assert abs(_heldout_auroc(events) - _heldout_auroc(ref_events)) <= 0.02
    replies = {e["payload_bytes"] for e in events if e["event"] == "reply" and e["phase"] == "train"}
    ref_replies = {e["payload_bytes"] for e in ref_events if e["event"] == "reply" and e["phase"] == "train"}
    assert max(replies) <= 0.5 * min(ref_replies) + 4096  # metrics and site record beside the model
    assert math.isfinite(_heldout_auroc(events))
