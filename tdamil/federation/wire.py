"""The model on the wire: one packed array per message instead of one array per tensor.

Flower 1.42 moves a message as a tree of objects, one HTTP request per object, at most two in
flight: every array of an ``ArrayRecord`` costs an ``Array`` and at least one ``ArrayChunk`` (one
per 5 MiB), so a 44-tensor model took ~100 requests each way (``benchmarks/wan.md``). Here every
float32 tensor of a message's model travels concatenated in ONE flat array named ``packed``
(tensors of any other dtype, none in the project's models, travel beside it as they are).

The layout (names, shapes, dtypes in ``state_dict`` order) is the global model's: the coordinator
sends it in the instruction's config (``wire-layout``, JSON) and unpacks every reply with its OWN
copy, never one a site sends. Unpacking happens where a message enters (the site: the incoming
instruction; the coordinator: :class:`~tdamil.federation.intake.ReplyIntake`, before the contract
checks), so every check, screen and strategy sees the ordinary ``{name: array}`` record. A packed
array of the wrong dtype or length, or a record that is not packed, is a :class:`WireError`.

Codecs (``federation.update_codec``, the replies' form; instructions are always ``fp32``):

* ``fp32``: the trained weights, bit-exact;
* ``fp16``: the trained weights in half precision (half the bytes; values beyond 65504 become
  Inf and are refused as non-finite);
* ``fp16-delta``: ``trained - global`` in half precision, added back to the global model the
  coordinator sent (half the bytes; the rounding error scales with the update, not the weights);
* ``xor``: the bit-exact difference to a model both sides hold (the 32-bit patterns XORed, split
  into byte planes and deflated): the site-evaluation message of a round sends the new global
  model this way against the model the site trained from in that round (see
  :func:`keep_base`), so a site never downloads a full model just to evaluate it.
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from tdamil.federation.records import ARRAYS, CONFIG, ROUND_TOKEN

__all__ = ["CODECS", "WireError", "flatten", "pack", "unpack", "open_instruction", "pack_reply",
           "pack_instructions", "open_reply", "layout_to_json", "layout_from_json"]

Layout = dict[str, tuple[tuple[int, ...], str]]

PACKED = "packed"
CODECS = ("fp32", "fp16", "fp16-delta")  # the replies' codecs (federation.update_codec)
_DTYPES = {"fp32": "float32", "fp16": "float16", "fp16-delta": "float16", "xor": "uint8"}
DIFFERENCE_CODECS = ("fp16-delta", "xor")  # codecs that are a difference to a model both sides hold
# instruction config keys
WIRE_LAYOUT = "wire-layout"    # the global model's layout, JSON [[name, shape, dtype], ...]
UPDATE_CODEC = "update-codec"  # how the site packs its reply
KEEP_BASE = "keep-base"        # train: keep the received model, a site-evaluation message follows
BASE_TOKEN = "base-token"      # evaluate: the arrays are an ``xor`` difference to the model of this round token
_BASE = "tdamil-wire-base"     # the context.state records holding the kept model
_BASE_OF = "tdamil-wire-base-of"


class WireError(ValueError):
    """A packed record that does not fit the layout or codec it is read with."""


def layout_to_json(layout: Layout) -> str:
    return json.dumps([[name, list(shape), dtype] for name, (shape, dtype) in layout.items()])


def layout_from_json(text: str) -> Layout:
    try:
        return {str(n): (tuple(int(d) for d in s), str(t)) for n, s, t in json.loads(text)}
    except (TypeError, ValueError) as exc:
        raise WireError(f"the instruction's {WIRE_LAYOUT} is not a layout ({exc})") from None


def _flat_names(layout: Layout) -> list[str]:
    return [name for name, (_, dtype) in layout.items() if dtype == "float32"]


def flat_size(layout: Layout) -> int:
    return sum(math.prod(layout[name][0]) for name in _flat_names(layout))


def flatten(arrays: ArrayRecord, layout: Layout) -> np.ndarray:
    """The record's float32 tensors, in layout order, as one float32 vector."""
    parts = []
    for name in _flat_names(layout):
        if name not in arrays:
            raise WireError(f"array {name!r} of the model is missing")
        values = arrays[name].numpy()
        if tuple(values.shape) != layout[name][0] or values.dtype != np.float32:
            raise WireError(f"array {name!r} is {values.dtype}{list(values.shape)}, the model's is "
                            f"float32{list(layout[name][0])}")
        parts.append(values.reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def _xor(flat: np.ndarray, base: np.ndarray) -> np.ndarray:
    planes = (flat.view(np.uint32) ^ base.view(np.uint32)).view(np.uint8).reshape(-1, 4).T
    return np.frombuffer(zlib.compress(planes.tobytes(), 1), dtype=np.uint8)


def _unxor(payload: np.ndarray, base: np.ndarray) -> np.ndarray:
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(payload.tobytes(), 4 * base.size + 1)  # bounded: no inflation bomb
    except zlib.error as exc:
        raise WireError(f"its xor difference does not inflate ({exc})") from None
    if len(raw) != 4 * base.size or inflate.unconsumed_tail:
        raise WireError(f"its xor difference holds {len(raw)} bytes, the model {4 * base.size}")
    bits = np.frombuffer(raw, dtype=np.uint8).reshape(4, -1).T.copy().view(np.uint32).reshape(-1)
    return (bits ^ base.view(np.uint32)).view(np.float32)


def pack(arrays: ArrayRecord, layout: Layout, codec: str = "fp32", base: np.ndarray | None = None) -> ArrayRecord:
    """``arrays`` (a model of ``layout``) as one packed array in ``codec`` (``base``: the flat model a
    difference is taken to), the tensors of other dtypes beside it."""
    if codec not in _DTYPES:
        raise WireError(f"unknown codec {codec!r}")
    flat = flatten(arrays, layout)
    if codec in DIFFERENCE_CODECS and (base is None or base.shape != flat.shape):
        raise WireError(f"codec {codec} needs the model it is a difference to")
    if codec == "fp32":
        payload = flat
    elif codec == "fp16":
        with np.errstate(over="ignore"):
            payload = flat.astype(np.float16)
    elif codec == "fp16-delta":
        with np.errstate(over="ignore", invalid="ignore"):
            payload = (flat - base).astype(np.float16)
    else:
        payload = _xor(flat, base)
    record = {PACKED: Array(np.ascontiguousarray(payload))}
    record.update({name: arrays[name] for name in layout if name not in _flat_names(layout) and name in arrays})
    return ArrayRecord(record)


def unpack(record: ArrayRecord, layout: Layout, codec: str = "fp32", base: np.ndarray | None = None) -> ArrayRecord:
    """The ``{name: array}`` record a packed one holds; :class:`WireError` when it does not fit."""
    others = [name for name in layout if name not in _flat_names(layout)]
    names = list(record.keys())
    if sorted(names) != sorted([PACKED] + others):
        shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
        raise WireError(f"its arrays are not packed: it holds {len(names)} array(s) ({shown}), expected one "
                        f"{PACKED!r} array" + (f" and {others}" if others else ""))
    packed = record[PACKED]
    want, size = _DTYPES.get(codec), flat_size(layout)
    shape = tuple(int(d) for d in packed.shape)
    if str(packed.dtype) != want or len(shape) != 1 or (codec != "xor" and shape[0] != size):
        raise WireError(f"its packed array is {packed.dtype}{list(shape)}, the model in codec {codec} is "
                        f"{want}[{size if codec != 'xor' else 'n'}]")
    payload = packed.numpy()
    if codec in DIFFERENCE_CODECS and (base is None or base.size != size):
        raise WireError(f"codec {codec} needs the model it is a difference to")
    if codec == "fp32":
        flat = payload
    elif codec == "fp16":
        flat = payload.astype(np.float32)
    elif codec == "fp16-delta":
        with np.errstate(over="ignore", invalid="ignore"):
            flat = base + payload.astype(np.float32)
    else:
        flat = _unxor(payload, base)
    out: dict[str, Any] = {}
    start = 0
    for name, (shape_, dtype) in layout.items():
        if dtype == "float32":
            n = math.prod(shape_)
            out[name] = Array(np.ascontiguousarray(flat[start:start + n].reshape(shape_)))
            start += n
        else:
            out[name] = record[name]
    return ArrayRecord(out)


# --- the site --------------------------------------------------------------------------------
def open_instruction(msg: Message, state: RecordDict) -> Message:
    """``msg`` with its model unpacked (a copy: ``msg`` stays as it came). A train instruction with
    ``keep-base`` leaves the received model in ``state`` (the run's ``context.state``) for the
    round's site-evaluation message, which then carries only an ``xor`` difference to it."""
    if not msg.has_content() or ARRAYS not in msg.content.array_records or CONFIG not in msg.content.config_records:
        return msg
    cfg = msg.content[CONFIG]
    layout = layout_from_json(str(cfg.get(WIRE_LAYOUT, "[]")))
    token = str(cfg.get(BASE_TOKEN, "") or "")
    base = None
    if token:
        kept = state.config_records.get(_BASE_OF)
        if kept is None or kept.get(ROUND_TOKEN) != token or _BASE not in state.array_records:
            raise WireError("this site does not hold the model the evaluate message is a difference to (it did not "
                            "take part in this round's training)")
        base = state[_BASE][PACKED].numpy()
    arrays = unpack(msg.content[ARRAYS], layout, "xor" if token else "fp32", base)
    for key in (_BASE, _BASE_OF):  # kept for one message only
        if key in state:
            del state[key]
    if bool(cfg.get(KEEP_BASE, False)):
        state[_BASE] = ArrayRecord({PACKED: Array(flatten(arrays, layout))})
        state[_BASE_OF] = ConfigRecord({ROUND_TOKEN: str(cfg.get(ROUND_TOKEN, ""))})
    opened = copy.copy(msg)
    opened.content = RecordDict({**msg.content, ARRAYS: arrays})
    return opened


def pack_reply(reply: Message, opened: Message) -> Message:
    """A train reply's model packed in the instruction's ``update-codec`` (``opened``: the
    instruction as :func:`open_instruction` returned it)."""
    if reply.has_error() or ARRAYS not in reply.content.array_records or ARRAYS not in opened.content.array_records:
        return reply
    cfg = opened.content[CONFIG]
    layout = layout_from_json(str(cfg.get(WIRE_LAYOUT, "[]")))
    codec = str(cfg.get(UPDATE_CODEC, "fp32"))
    base = flatten(opened.content[ARRAYS], layout) if codec in DIFFERENCE_CODECS else None
    reply.content[ARRAYS] = pack(reply.content[ARRAYS], layout, codec, base)
    return reply


# --- the coordinator -------------------------------------------------------------------------
def pack_instructions(messages: list[Message], arrays: ArrayRecord, layout: Layout,
                      base: tuple[str, np.ndarray] | None = None,
                      holders: set[int] | frozenset = frozenset()) -> list[int]:
    """Put one packed copy of ``arrays`` in every message (in place). ``base``: (round token, flat
    model) that the sites in ``holders`` (node ids) kept from this round's train message; their
    (evaluate) message carries the ``xor`` difference to it instead of the model. Returns each
    message's model bytes as sent."""
    full = delta = None
    for msg in messages:  # a strategy may give every message the same RecordDict: each gets its own
        content = dict(msg.content)
        if base is None or int(msg.metadata.dst_node_id) not in holders:
            full = pack(arrays, layout) if full is None else full
            content[ARRAYS] = full
        else:
            delta = pack(arrays, layout, "xor", base[1]) if delta is None else delta
            content[ARRAYS] = delta
            content[CONFIG] = ConfigRecord({**msg.content[CONFIG], BASE_TOKEN: base[0]})
        msg.content = RecordDict(content)
    return [int(msg.content[ARRAYS].count_bytes()) for msg in messages]


def open_reply(reply: Message, layout: Layout, codec: str, base: np.ndarray | None) -> str | None:
    """Unpack a train reply's model in place; why it cannot be, or None. A reply without the
    ``arrays`` record is left for the contract check to name."""
    if ARRAYS not in reply.content.array_records:
        return None
    try:
        reply.content[ARRAYS] = unpack(reply.content[ARRAYS], layout, codec, base)
    except WireError as exc:
        return f"{exc} (federation.update_codec={codec})"
    return None
