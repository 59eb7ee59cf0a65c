"""The hospital site's Flower ClientApp (Message API).

``train``: load the global model, evaluate it on the site's validation slides when the coordinator
asks (``evaluate-global``: one message per round carries the previous round's site evaluation),
train ``local-epochs`` epochs on the training slides, evaluate the trained model on the validation
slides, reply with the trained arrays + metrics. ``evaluate``: evaluate the global model on the
validation slides (the last round's model, or every round with ``evaluate_with_train: false``).
Every reply carries the timeline stamps (``time-*``) of this run. The model travels packed into one
array each way (:mod:`tdamil.federation.wire`): unpacked on arrival, the reply packed last. Replies carry only the model's arrays, a MetricRecord
with fixed keys (NaN where undefined) and the site's name; slides and features never leave the
site.

Deployed, the SuperNode is started by ``tdamil-client`` with ``--node-config 'site="site_a"
config="/abs/configs/sites/site_a.yaml"'``; each message runs this app in a fresh process, so the
site's data are re-opened from the feature cache on disk. The simulation builds the same app with
:func:`make_client_app` and an in-memory data provider.
"""

from __future__ import annotations

import time

_IMPORT_START = time.time()  # the timeline's "app imports" segment starts here

import json  # noqa: E402 - after the stamp on purpose
import logging  # noqa: E402
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from tdamil.federation.supernode import REPLY_BUILT  # noqa: E402 - the site's supervisor reads the line
from tdamil.federation.records import (  # noqa: E402
    ARRAYS,
    CONFIG,
    FEATURE_CONTRACT,
    METRICS,
    REQUIRED_VERSIONS,
    ROUND_TOKEN,
    SITE,
    SITE_FEATURES,
    SITE_VERSIONS,
    WEIGHT_KEY,
    ReplyContract,
    eval_metric_keys,
    reply_problem,
    site_record,
    to_metric_record,
    train_metric_keys,
)
from tdamil.federation.task import (  # noqa: E402
    ModelSpec,
    SiteData,
    build_model,
    load_arrays,
    local_evaluate,
    local_train,
    model_to_arrays,
)
from tdamil.federation.timeline import STAMP_REPLY_BUILT, process_start_time  # noqa: E402
from tdamil.federation.wire import open_instruction, pack_reply  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = ["SiteRuntime", "make_client_app", "SiteConfigLoader", "app"]


@dataclass
class SiteRuntime:
    """What the ClientApp needs about the site it runs at."""

    name: str
    data: SiteData
    train_cfg: Any = None  # tdamil.train.engine.TrainConfig
    train_mods: list = field(default_factory=list)  # e.g. DP clipping mods
    accept_unlabelled_features: bool = False  # the site config's override for CLAM/TRIDENT files


SiteProvider = Callable[[Context], SiteRuntime]


def _compose(handler: Callable[[Message, Context], Message], mods: list) -> Callable[[Message, Context], Message]:
    """Wrap ``handler`` in Flower mods (``mod(msg, ctx, call_next)``), first mod outermost."""
    fn = handler
    for mod in reversed(mods):
        fn = (lambda m, nxt: (lambda msg, ctx: m(msg, ctx, nxt)))(mod, fn)
    return fn


def _spec(msg: Message, rt: SiteRuntime) -> ModelSpec:
    spec = ModelSpec.from_json(str(msg.content[CONFIG]["model-spec"]))
    in_dim = getattr(rt.data.train, "in_dim", None) if len(rt.data.train) else None
    if in_dim is not None and int(in_dim) != spec.in_dim:
        raise ValueError(
            f"Site {rt.name}: features have dimension {in_dim} but the federation's model expects {spec.in_dim}. "
            f"All sites must extract features with the same encoder as the coordinator's config."
        )
    return spec


def _start_stamps() -> dict[str, float]:
    """The stamps known when a handler starts: process creation, app import, handler entry.

    Read per message: a warm start (:mod:`tdamil.client.warm_start`) forks this process from one that
    imported this module earlier, so the import happened before the process began (0 s for it)."""
    started = process_start_time()
    if not started == started:  # NaN (no /proc): the import time is the best stamp there is
        started = _PROCESS_START
    return {"time-process-start": started, "time-import-start": max(_IMPORT_START, started),
            "time-imported": max(_IMPORTED, started), "time-handler-start": time.time()}


def handshake(msg: Message, context: Context, rt: SiteRuntime) -> dict[str, str]:
    """Check the run's required versions and feature contract before anything else; raise one line
    naming what does not fit, so the site is refused before it trains. Returns the ``site``
    record's ``versions`` and ``features`` (JSON text). Once per run and contract: the result is
    kept in the run's ``context.state``, which Flower hands to every message of the run (each
    message's ClientApp is a fresh process, so a cache in memory would not survive)."""
    import hashlib  # noqa: PLC0415

    from tdamil.data.contract import FeatureContract, check_features, feature_paths  # noqa: PLC0415
    from tdamil.federation.versions import check_versions, site_versions  # noqa: PLC0415

    cfg = msg.content[CONFIG] if CONFIG in msg.content.config_records else {}
    key = (str(cfg.get(FEATURE_CONTRACT, "")), str(cfg.get(REQUIRED_VERSIONS, "")))
    digest = hashlib.sha256("\0".join(key).encode()).hexdigest()
    kept = context.state.config_records.get(_HANDSHAKE)
    if kept is not None and kept.get("key") == digest:
        return {SITE_VERSIONS: str(kept[SITE_VERSIONS]), SITE_FEATURES: str(kept[SITE_FEATURES])}
    train = rt.train_cfg
    versions = site_versions(device=getattr(train, "device", "auto"),
                             mixed_precision=bool(getattr(train, "mixed_precision", True)))
    problem = check_versions(versions, json.loads(key[1]), site=rt.name) if key[1] else None
    if problem is not None:
        raise ValueError(f"{problem}; refused before training")
    features = "{}"  # never an empty string: Flower cannot size one
    if key[0]:
        report = check_features(feature_paths([rt.data.train, rt.data.val, rt.data.test]),
                                FeatureContract.from_json(key[0], source="the run's feature contract"),
                                site=rt.name, allow_unlabelled_attrs=rt.accept_unlabelled_features)
        features = report.observed.to_json()
    fields = {SITE_VERSIONS: json.dumps(versions, sort_keys=True), SITE_FEATURES: features}
    context.state[_HANDSHAKE] = ConfigRecord({"key": digest, **fields})
    return fields


_HANDSHAKE = "tdamil-handshake"  # the context.state record holding this run's accepted handshake


def _site_record(msg: Message, context: Context, rt: SiteRuntime) -> Any:
    cfg = msg.content[CONFIG] if CONFIG in msg.content.config_records else {}
    record = site_record(rt.name, int(cfg.get("server-round", 0)), str(cfg.get(ROUND_TOKEN, "")))
    for key, value in handshake(msg, context, rt).items():
        record[key] = value
    return record


def checked_reply(msg: Message, content: RecordDict, rt: SiteRuntime) -> Message:
    """The reply, after the site checked it against the message contract the coordinator applies:
    NaN/Inf weights (e.g. a bf16 overflow on the site's GPU), wrong arrays or unencodable metrics
    are never sent; the handler raises instead, so the coordinator gets an error reply naming the
    problem and the site stays in the run."""
    reply = Message(content, reply_to=msg)
    problem = reply_problem(reply, ReplyContract.of_instruction(msg))
    if problem is not None:
        raise ValueError(f"Site {rt.name}: the reply was not sent because it breaks the federation's message "
                         f"contract: {problem}. Lower train.lr or set train.max_grad_norm if training diverged.")
    return reply


def _transfer_clock(msg: Message) -> tuple[float, float] | None:
    """(sent at, deadline at) on the coordinator's clock, when the instruction crossed a network."""
    cfg = msg.content[CONFIG] if CONFIG in msg.content.config_records else {}
    try:
        sent = float(cfg["sent-at"])
        return sent, sent + float(cfg["round-timeout-s"])
    except (KeyError, TypeError, ValueError):
        return None


def log_instruction_transfer(msg: Message) -> None:
    """One line as the instruction arrives: its size, how long it took, the time left in the round."""
    clock = _transfer_clock(msg)
    if clock is None or ARRAYS not in msg.content.array_records:
        return
    nbytes, took = msg.content[ARRAYS].count_bytes(), time.time() - clock[0]
    rate = f" (~{nbytes * 8 / took / 1e6:.1f} Mbit/s)" if took > 0.05 else ""
    logger.info("Round %d: instruction in: %.1f MB, %.1f s after the coordinator sent it%s; %.0f s to the round's "
                "deadline.", int(msg.content[CONFIG].get("server-round", 0)), nbytes / 1e6, took, rate,
                clock[1] - time.time())


def log_reply_size(msg: Message, reply: Message) -> None:
    """One line as the reply leaves the ClientApp; the SuperNode's "Sent successfully" completes it."""
    clock = _transfer_clock(msg)
    if clock is None or not reply.has_content() or ARRAYS not in reply.content.array_records:
        return
    nbytes = reply.content[ARRAYS].count_bytes()
    logger.info("Round %d: %s %d bytes (%.1f MB) to send; %.0f s to the round's deadline.",
                int(msg.content[CONFIG].get("server-round", 0)), REPLY_BUILT, nbytes, nbytes / 1e6,
                clock[1] - time.time())


def make_client_app(provider: SiteProvider) -> ClientApp:
    """A ClientApp whose site data come from ``provider(context)``."""
    app = ClientApp()

    def _model(msg: Message, rt: SiteRuntime, stamps: dict[str, float]) -> Any:
        model = build_model(_spec(msg, rt), seed=None)
        load_arrays(model, msg.content[ARRAYS])
        stamps["time-model-built"] = time.time()
        return model

    def _train(msg: Message, context: Context, rt: SiteRuntime, stamps: dict[str, float]) -> Message:
        cfg = msg.content[CONFIG]
        handshake(msg, context, rt)  # refused before the model is even built
        model = _model(msg, rt, stamps)
        glob: dict[str, float] = {}
        if bool(cfg.get("evaluate-global", False)):
            glob = local_evaluate(model, rt.data.val)
            stamps["time-global-evaluated"] = time.time()
        server_round = int(cfg.get("server-round", 1))
        logger.info("Site %s, round %d: training %d local epoch(s) on %d slides.", rt.name, server_round,
                    int(cfg["local-epochs"]), len(rt.data.train))
        stats = local_train(model, rt.data.train, rt.train_cfg, epochs=int(cfg["local-epochs"]), lr=float(cfg["lr"]),
                            weight_decay=float(cfg.get("weight-decay", 1e-2)),
                            prox_mu=float(cfg.get("proximal-mu", 0.0)), server_round=server_round)
        stamps["time-trained"] = time.time()
        val = local_evaluate(model, rt.data.val)
        stamps["time-local-evaluated"] = time.time()
        arrays = model_to_arrays(model)
        stamps[STAMP_REPLY_BUILT] = time.time()
        values = {WEIGHT_KEY: len(rt.data.train), **stats, **{f"global-{k}": v for k, v in glob.items()},
                  **{f"val-{k}": v for k, v in val.items()}, **stamps}
        content = RecordDict({ARRAYS: arrays, METRICS: to_metric_record(values, train_metric_keys()),
                              SITE: _site_record(msg, context, rt)})
        return checked_reply(msg, content, rt)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        stamps = _start_stamps()
        log_instruction_transfer(msg)
        msg = open_instruction(msg, context.state)  # the model arrives packed (tdamil.federation.wire)
        rt = provider(context)
        stamps["time-data-opened"] = time.time()
        reply = pack_reply(_compose(lambda m, c: _train(m, c, rt, stamps), rt.train_mods)(msg, context), msg)
        log_reply_size(msg, reply)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        stamps = _start_stamps()
        msg = open_instruction(msg, context.state)  # the model, or its difference to the one kept in training
        rt = provider(context)
        stamps["time-data-opened"] = time.time()
        handshake(msg, context, rt)
        model = _model(msg, rt, stamps)
        val = local_evaluate(model, rt.data.val)
        stamps["time-global-evaluated"] = stamps[STAMP_REPLY_BUILT] = time.time()
        values = {WEIGHT_KEY: len(rt.data.val) if rt.data.val is not None else 0, **val, **stamps}
        content = RecordDict({METRICS: to_metric_record(values, eval_metric_keys()), SITE: _site_record(msg, context, rt)})
        return checked_reply(msg, content, rt)

    return app


class SiteConfigLoader:
    """Provider for deployed sites: reads ``node_config["config"]`` (the site YAML) once per process."""

    def __init__(self) -> None:
        self._cache: dict[str, SiteRuntime] = {}

    def __call__(self, context: Context) -> SiteRuntime:
        path = context.node_config.get("config")
        if not path:
            raise ValueError("This SuperNode was started without --node-config config=<site yaml>. Start it with "
                             "`tdamil-client --site <name>`.")
        key = str(path)
        if key not in self._cache:
            self._cache[key] = self._load(Path(key), str(context.node_config.get("site", "")))
        return self._cache[key]

    @staticmethod
    def _load(path: Path, site: str) -> SiteRuntime:
        from tdamil.client.config import load_site_config  # noqa: PLC0415
        from tdamil.federation.data import split_datasets  # noqa: PLC0415

        cfg, _ = load_site_config(path, extraction=False)
        if site and site != cfg.site:
            raise ValueError(f"{path}: the file is for site '{cfg.site}' but the SuperNode runs as '{site}'.")
        fed = cfg.federation
        parts = split_datasets(cfg.data, val_fraction=fed.val_fraction, test_fraction=fed.test_fraction,
                               seed=fed.split_seed)
        mods: list = []
        if cfg.privacy.enabled:
            from tdamil.security.dp import dp_client_mods  # noqa: PLC0415

            mods = list(dp_client_mods(cfg.privacy))
        return SiteRuntime(name=cfg.site, data=SiteData(cfg.site, parts["train"], parts["val"], parts["test"]),
                           train_cfg=cfg.train, train_mods=mods,
                           accept_unlabelled_features=bool(cfg.accept_unlabelled_features))


# The ClientApp a SuperNode loads (``tdamil.client.client_app:app`` in [tool.flwr.app.components]).
app = make_client_app(SiteConfigLoader())
_PROCESS_START = process_start_time()
_IMPORTED = time.time()
