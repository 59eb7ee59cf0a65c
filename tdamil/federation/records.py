"""The message layout the coordinator and the sites agree on.

Instruction (server -> site), one ``RecordDict``:
  ``"arrays"``: ArrayRecord, the global model's full state dict (task token T and channel matrix C
               included);
  ``"config"``: ConfigRecord with ``server-round``, ``local-epochs``, ``lr``, ``proximal-mu`` and
               ``model-spec`` (JSON text: model config, input dim, number of classes).

Reply (site -> server), one ``RecordDict``:
  train:    ``"arrays"`` (the locally trained state dict) + ``"metrics"`` (MetricRecord);
  evaluate: ``"metrics"`` only;
  both carry ``"site"``: a ConfigRecord with the site's name (for per-site logs). Nothing else.

One message per site per round: with ``evaluate-global`` true in the train config the site first
evaluates the INCOMING global model (the previous round's result) on its validation split, then
trains; the coordinator records those ``global-<k>`` metrics as the site evaluation of round r-1's
global model. A separate evaluate message is sent only for the last round's model (or when
``federation.evaluate_with_train`` is false).

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
from typing import Any, Iterable

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

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
        total += record.count_bytes()
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


def site_record(name: str) -> ConfigRecord:
    return ConfigRecord({"name": name})
