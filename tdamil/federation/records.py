"""The message layout the coordinator and the sites agree on.

Instruction (server -> site), one ``RecordDict``:
  ``"arrays"``: ArrayRecord, the global model's full state dict (task token T and channel matrix C
               included), packed into one array on the wire (:mod:`tdamil.federation.wire`);
  ``"config"``: ConfigRecord with ``server-round``, ``local-epochs``, ``lr``, ``proximal-mu``,
               ``model-spec`` (JSON text: model config, input dim, number of classes) and the
               wire format (``wire-layout``, ``update-codec``, ``keep-base``, ``base-token``).

Reply (site -> server), one ``RecordDict``:
  train:    ``"arrays"`` (the locally trained state dict, packed in ``update-codec``) +
            ``"metrics"`` (MetricRecord);
  evaluate: ``"metrics"`` only;
  both carry ``"site"``: a ConfigRecord with the site's name, the round it answers
  (``server-round``) and the instruction's ``round-token`` echoed back. Nothing else.

Every reply is checked against :class:`ReplyContract` before it is used (:func:`reply_problem`):
the coordinator drops a reply that breaks it, with an audit line naming the site and what was
wrong, and aggregates the others; a site checks its own reply the same way before sending, so it
sends an error reply instead of NaN weights or a reply that cannot be encoded. The site name the
coordinator records is the one its key was registered under, never the name a reply claims.

One message per site per round: with ``evaluate-global`` true in the train config the site first
evaluates the INCOMING global model (the previous round's result) on its validation split, then
trains; the coordinator records those ``global-<k>`` metrics as the site evaluation of round r-1's
global model. A separate evaluate message is sent only for the last round's model (or when
``federation.evaluate_with_train`` is false); it carries the bit-exact difference to the model the
site kept from the round's train message (``keep-base``), see :mod:`tdamil.federation.wire`.

Train metrics always carry the same keys: ``num-examples`` (training slides, the FedAvg weight),
``train-loss``, ``train-seconds``, ``global-<k>`` (the incoming global model on the validation
split; NaN when not asked), ``val-<k>`` (the locally trained model on the validation split) for
every key of ``METRIC_KEYS``, and the timeline stamps ``time-*``
(:data:`~tdamil.federation.timeline.SITE_STAMPS`, wall-clock seconds, NaN where a step did not
happen). Evaluate metrics carry ``num-examples`` (validation slides), every ``METRIC_KEYS`` key and
the same stamps. An undefined value (one-class split) is NaN, never a missing key, because Flower
ends the run when sites report different keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from tdamil.federation.timeline import SITE_STAMPS

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
WEIGHT_KEY = "num-examples"


def metric_keys() -> tuple[str, ...]:
    """The metric names an evaluation returns (:data:`tdamil.train.metrics.METRIC_KEYS`)."""
    # imported here: the metrics module loads scikit-learn, which only processes that build
    # metric records need (not the coordinator's CLI or the gateway)
    from tdamil.train.metrics import METRIC_KEYS  # noqa: PLC0415

    return tuple(METRIC_KEYS)


GLOBAL_PREFIX = "global-"  # train replies: the incoming global model on the validation split


def train_metric_keys() -> tuple[str, ...]:
    keys = metric_keys()
    return ((WEIGHT_KEY, "train-loss", "train-seconds") + tuple(f"{GLOBAL_PREFIX}{k}" for k in keys)
            + tuple(f"val-{k}" for k in keys) + SITE_STAMPS)


def eval_metric_keys() -> tuple[str, ...]:
    return (WEIGHT_KEY,) + metric_keys() + SITE_STAMPS


def is_stamp(key: str) -> bool:
    """A timeline stamp, not a metric (never averaged across sites)."""
    return key in SITE_STAMPS


def global_evaluation(metrics: dict[str, float]) -> dict[str, float] | None:
    """The incoming global model's validation metrics a train reply carries, in evaluate-reply
    form (``num-examples`` = validation slides), or None when the site was not asked for them."""
    values = {k[len(GLOBAL_PREFIX):]: v for k, v in metrics.items() if k.startswith(GLOBAL_PREFIX)}
    n = values.get("n")
    if n is None or not math.isfinite(float(n)):
        return None
    return {WEIGHT_KEY: int(n), **values}


def to_metric_record(values: dict[str, Any], keys: Iterable[str]) -> MetricRecord:
    """A MetricRecord holding exactly ``keys``; missing or non-numeric values become NaN."""
    out: dict[str, float | int] = {}
    for key in keys:
        value = values.get(key, float("nan"))
        if isinstance(value, bool):
            value = int(value)
        if key == WEIGHT_KEY:
            out[key] = int(value) if value == value else 0
        elif isinstance(value, (int, float)):
            out[key] = float(value)
        else:
            try:
                out[key] = float(value)
            except (TypeError, ValueError):
                out[key] = float("nan")
    return MetricRecord(out)


def reply_site(msg: Message) -> str:
    """The site name a reply carries, or ``node-<id>`` when absent."""
    if msg.has_content() and SITE in msg.content.config_records:
        return str(msg.content.config_records[SITE].get("name", f"node-{msg.metadata.src_node_id}"))
    return f"node-{msg.metadata.src_node_id}"


def reply_metrics(msg: Message) -> dict[str, float]:
    if not msg.has_content() or not msg.content.metric_records:
        return {}
    record = next(iter(msg.content.metric_records.values()))
    return {k: float(v) if not isinstance(v, list) else v for k, v in record.items()}


def payload_bytes(content: RecordDict) -> int:
    """Bytes of arrays + metrics + configs a message carries (what travels, before framing)."""
    total = 0
    for record in content.array_records.values():
        total += record.count_bytes()
    for record in content.metric_records.values():
        total += record.count_bytes()
    for record in content.config_records.values():
        # Flower's count_bytes raises on an empty string: count those values by hand
        total += sum(len(k) + (len(v) if isinstance(v, (str, bytes)) else 8) for k, v in record.items())
    return total


def nan_weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of every metric over the replies, skipping NaN values per key.

    Flower's default averaging turns one site's NaN (e.g. AUROC on a one-class validation split)
    into a NaN for the federation; here each key is averaged over the sites where it is defined.
    A key undefined everywhere stays NaN. The weight key itself is summed.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    total_weight = 0.0
    keys: list[str] = []
    for rec in records:
        metrics = next(iter(rec.metric_records.values()))
        w = float(metrics.get(weight_key, 0) or 0)
        total_weight += w
        for key, value in metrics.items():
            if key == weight_key or isinstance(value, list):
                continue
            if key not in keys:
                keys.append(key)
            v = float(value)
            if math.isfinite(v):
                # sites without examples still count when every weight is zero
                sums[key] = sums.get(key, 0.0) + v * w
                weights[key] = weights.get(key, 0.0) + w
    out: dict[str, float | int] = {weight_key: int(total_weight)}
    for key in keys:
        out[key] = sums[key] / weights[key] if weights.get(key, 0.0) > 0 else float("nan")
    return MetricRecord(out)


def site_record(name: str, server_round: int = 0, round_token: str = "") -> ConfigRecord:
    """The reply's ``site`` record: the name the site runs as, the round it answers and the
    instruction's round token (a replayed reply of an earlier round carries another token)."""
    record = ConfigRecord({"name": name, "server-round": int(server_round)})
    if round_token:  # Flower cannot size an empty string; an instruction without a token gets none back
        record[ROUND_TOKEN] = str(round_token)
    return record


ROUND_TOKEN = "round-token"  # instruction config: a fresh random token per round, echoed by replies
# The once-per-run handshake (tdamil.data.contract, tdamil.federation.versions): the instruction
# config carries the run's feature contract and required versions (JSON text); a site checks both
# before it trains and answers with its versions and the contract its files record in ``site``.
FEATURE_CONTRACT = "feature-contract"
REQUIRED_VERSIONS = "required-versions"
SITE_VERSIONS = "versions"
SITE_FEATURES = "extraction"  # the contract its feature files record (metadata, never data)
# Metrics that are fractions (NaN where undefined); anything else must be finite-or-NaN and below
# MAX_METRIC in magnitude. A site's slide count lies in (0, max_examples] (train) or [0, ...] (evaluate).
_FRACTIONS = ("auroc", "balanced_accuracy", "f1", "accuracy")
MAX_METRIC = 1e12


@dataclass(frozen=True)
class ReplyContract:
    """What a reply to one instruction must look like.

    phase:         ``train`` (arrays + metrics) or ``evaluate`` (metrics only).
    server_round:  the round the instruction belongs to.
    round_token:   the instruction's token (empty: not checked, e.g. an older coordinator).
    arrays:        train: the global model's ``{name: (shape, dtype)}``; the reply must hold exactly
                   these arrays (names, shapes, dtypes), all finite.
    max_examples:  upper bound of a train reply's ``num-examples`` (the coordinator's
                   ``federation.max_site_examples``).
    codec:         how a train reply's model is packed (:mod:`tdamil.federation.wire`,
                   ``federation.update_codec``); the coordinator unpacks it with ``arrays`` before
                   any check. Empty: the reply is checked as it is (a site's check of its own reply).
    """

    phase: str
    server_round: int
    round_token: str = ""
    arrays: dict[str, tuple[tuple[int, ...], str]] | None = None
    max_examples: int = 1_000_000
    codec: str = ""

    @classmethod
    def for_model(cls, phase: str, server_round: int, round_token: str, arrays: ArrayRecord | None,
                  max_examples: int = 1_000_000) -> "ReplyContract":
        layout = None if arrays is None else {k: (tuple(int(d) for d in a.shape), str(a.dtype))
                                              for k, a in arrays.items()}
        return cls(phase, int(server_round), str(round_token or ""), layout, int(max_examples))

    @classmethod
    def of_instruction(cls, msg: Message) -> "ReplyContract":
        """The contract a site's reply to ``msg`` must meet (the site's own pre-send check)."""
        cfg = msg.content.config_records.get(CONFIG, ConfigRecord())
        phase = "train" if msg.metadata.message_type.startswith("train") else "evaluate"
        arrays = msg.content.array_records.get(ARRAYS) if phase == "train" else None
        return cls.for_model(phase, int(cfg.get("server-round", 0)), str(cfg.get(ROUND_TOKEN, "")), arrays)


def error_text(msg: Message) -> str:
    """An error reply's reason on one line, without the ``<class '...'>:<'...'>`` wrapper Flower puts
    around an exception raised in a ClientApp."""
    from tdamil.logs import one_line_error  # noqa: PLC0415

    return one_line_error(msg.error.reason or f"error code {msg.error.code}")


def reply_problem(msg: Message, contract: ReplyContract) -> str | None:
    """Why a (non-error) reply breaks ``contract``, in one sentence, or None when it is sound."""
    content = msg.content
    expected = {METRICS, SITE} | ({ARRAYS} if contract.phase == "train" else set())
    found = set(content.array_records) | set(content.metric_records) | set(content.config_records)
    if found != expected:
        return f"records {sorted(found)}, expected {sorted(expected)}"
    problem = _site_problem(content.config_records[SITE], contract)
    if problem is None:
        problem = _metrics_problem(content.metric_records[METRICS], contract)
    if problem is None and contract.phase == "train":
        problem = _arrays_problem(content.array_records[ARRAYS], contract)
    return problem


def _site_problem(site: ConfigRecord, contract: ReplyContract) -> str | None:
    if not isinstance(site.get("name"), str) or not site.get("name"):
        return "no site name"
    if any(not isinstance(v, (str, int)) or isinstance(v, bool) or v == "" for v in site.values()):
        return "its site record holds an empty or non-text value"
    rnd = site.get("server-round")
    if rnd is not None and (not isinstance(rnd, int) or isinstance(rnd, bool) or rnd != contract.server_round):
        return f"answers round {rnd}, this is round {contract.server_round} (stale or replayed reply)"
    if contract.round_token and site.get(ROUND_TOKEN) != contract.round_token:
        return ("does not carry this round's token (a replayed earlier reply, or a site running an older "
                "tdamil-fl: upgrade it)")
    return None


def _metrics_problem(record: MetricRecord, contract: ReplyContract) -> str | None:
    keys = train_metric_keys() if contract.phase == "train" else eval_metric_keys()
    extra, missing = sorted(set(record) - set(keys)), sorted(set(keys) - set(record))
    if extra or missing:
        return f"metric keys differ from the contract (unexpected {extra[:5]}, missing {missing[:5]})"
    for key, value in record.items():
        if isinstance(value, list) or isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric {key!r} is not a number"
        v = float(value)
        if key == WEIGHT_KEY:
            low = 1 if contract.phase == "train" else 0
            if not (float(v).is_integer() and low <= v <= contract.max_examples):
                return (f"num-examples {value!r} is not an integer in [{low}, {contract.max_examples}] "
                        "(federation.max_site_examples)")
        elif math.isnan(v):
            continue
        elif not math.isfinite(v) or abs(v) > MAX_METRIC:
            return f"metric {key!r} = {value!r} is out of range"
        elif key.split("-", 1)[-1] in _FRACTIONS and not 0.0 <= v <= 1.0:
            return f"metric {key!r} = {value!r} is not a fraction in [0, 1]"
    return None


def _arrays_problem(record: ArrayRecord, contract: ReplyContract) -> str | None:
    layout = contract.arrays or {}
    names = list(record.keys())
    extra, missing = sorted(set(names) - set(layout)), sorted(set(layout) - set(names))
    if extra or missing:
        return f"arrays of another model (unexpected {extra[:3]}, missing {missing[:3]})"
    for name in names:
        array = record[name]
        shape, dtype = tuple(int(d) for d in array.shape), str(array.dtype)
        if (shape, dtype) != layout[name]:
            return f"array {name!r} is {dtype}{list(shape)}, the global model's is {layout[name][1]}{list(layout[name][0])}"
        values = array.numpy()
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            bad = int(values.size - np.isfinite(values).sum())
            return f"array {name!r} holds {bad} non-finite value(s) (NaN/Inf)"
    return None
