"""The federated round loop (Flower 1.42 Message API), with resume.

Flower's ``Strategy.start`` always starts at round 1 and has no resume; this loop calls the same
strategy hooks (``configure_train`` / ``aggregate_train`` / ``configure_evaluate``) with a round
offset, so ``--resume`` continues from ``last.pt`` at the next
round. Per round it also: evaluates the global model on the server's held-out cohorts (round 0 =
the initial model, skipped on resume), writes ``last.pt`` / ``round_XXXX.pt`` / ``best.pt``
atomically, appends per-site metrics, and writes the audit log (who took part, payload sizes,
metrics, checkpoints with sha256, failures, and a ``round_timeline`` of where the round's seconds
went, see :mod:`tdamil.federation.timeline`).

Site evaluation (``evaluate_sites``) rides on the train message (``evaluate_with_train``): the
replies of round r carry each site's validation metrics of the model it received, i.e. of round
r-1's global model, recorded as round r-1 (``evaluate`` rows, ``site_evaluation`` audit lines);
the last round's model gets one separate evaluate message, which carries only the bit-exact
difference to the model each site kept from that round's train message (:mod:`tdamil.federation.
wire`: every message's model travels as one packed array). With ``checkpoint.source: sites``,
``best.pt`` for round r-1 is therefore chosen during round r, before that round's aggregation (so
the strategy state saved with it is still round r-1's).

Nothing a site sends is trusted (issue: one hostile site must not spoil the federation):

1. every reply is checked against the message contract (:func:`~tdamil.federation.records.
   reply_problem`: this round's token, the global model's arrays, finite values, a bounded
   ``num-examples``, numeric metrics) and against the identity of its node: the site name comes
   from the registered key (``site_nodes``) or the simulation's node config, never from the reply;
2. the remaining updates are screened against each other (:mod:`tdamil.federation.screening`);
3. the aggregated model must be finite, keep the global model's layout and pass the held-out
   evaluation; otherwise the round fails, the previous global model (and the strategy's state) is
   kept, and nothing of it reaches ``last.pt`` / ``best.pt``.

Each refusal is a ``failure`` audit line naming the site (by its registered name) and the reason;
the round aggregates the others when ``min_replies`` still holds.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from tdamil.federation.audit import AuditLog
from tdamil.federation.checkpoint import CheckpointStore, archive_previous_run
from tdamil.federation.config import CheckpointConfig, FederationConfig
from tdamil.federation.grids import PatientGrid, SitesUnavailableError
from tdamil.federation.history import MetricsHistory, plot_learning_curves
from tdamil.federation.records import (FEATURE_CONTRACT, METRICS, REQUIRED_VERSIONS, ROUND_TOKEN, ReplyContract,
                                       error_text, global_evaluation, is_stamp, nan_weighted_mean, reply_metrics,
                                       reply_site)
from tdamil.federation.intake import ReplyIntake
from tdamil.federation.screening import cast_like, layout_of, model_problem
from tdamil.federation.strategies import restore_strategy_state, strategy_state
from tdamil.federation.timeline import RoundClock, round_table
from tdamil.federation.wire import KEEP_BASE, UPDATE_CODEC, WIRE_LAYOUT, flatten, layout_to_json, pack_instructions

logger = logging.getLogger(__name__)

__all__ = ["RoundLoop", "RunResult"]

EvaluateFn = Callable[[int, ArrayRecord], dict[str, dict[str, float]]]


@dataclass
class RunResult:
    arrays: ArrayRecord
    first_round: int
    last_round: int
    failed_rounds: list[int] = field(default_factory=list)
    out_dir: Path | None = None


class RoundLoop:
    """Runs rounds ``start..cfg.rounds`` of one federated run.

    ``evaluate_fn(round, arrays)`` returns ``{cohort: metrics}`` for the server's held-out cohorts
    (or ``{}``). ``epsilon_fn(round)`` (DP enabled) returns the privacy budget spent so far.
    ``session`` tags every audit line (the coordinator passes its own; default: a fresh id).
    ``on_round(round)`` runs after every round and once when the run ends (the coordinator writes
    its run report there); an error in it is logged, never fatal. ``site_nodes`` maps each
    authenticated node id to the site its key was registered for (the coordinator's key
    registration); without it the simulation's node configs name the sites, and a deployment
    without key registration trusts the names replies claim but refuses two nodes claiming one.
    """

    def __init__(self, strategy: Any, fed: FederationConfig, model_spec: str, out_dir: str | Path, *,
                 ckpt: CheckpointConfig | None = None, evaluate_fn: EvaluateFn | None = None,
                 epsilon_fn: Callable[[int], float] | None = None, plot: bool = True,
                 session: str | None = None, on_round: Callable[[int], None] | None = None,
                 site_nodes: dict[int, str] | None = None, feature_contract: Any = None,
                 required_versions: dict[str, str] | None = None) -> None:
        self.strategy = strategy
        self.on_round = on_round
        self._reporter: ThreadPoolExecutor | None = None
        self._report_job: Future | None = None
        self._round_end: float | None = None
        self.fed = fed
        self.model_spec = model_spec
        self.out_dir = Path(out_dir)
        self.ckpt_cfg = ckpt or CheckpointConfig()
        self.evaluate_fn = evaluate_fn
        self.epsilon_fn = epsilon_fn
        self.plot = plot
        self.session = session or uuid.uuid4().hex[:12]
        self.audit = AuditLog(self.out_dir / "audit.jsonl", session=self.session)
        self.history = MetricsHistory(self.out_dir)
        self.store = CheckpointStore(self.out_dir / "checkpoints", keep_last=self.ckpt_cfg.keep_last,
                                     metric=self.ckpt_cfg.metric, mode=self.ckpt_cfg.mode)
        source = self.ckpt_cfg.source or ("heldout" if evaluate_fn is not None else "sites")
        self.best_source = source
        self.intake = ReplyIntake(self.audit, self.history, fed, site_nodes, required_versions=required_versions,
                                  feature_contract=feature_contract)
        # sent with every instruction: the site checks both before it trains (once per run)
        self.handshake = {FEATURE_CONTRACT: feature_contract.to_json() if feature_contract is not None else "",
                          REQUIRED_VERSIONS: json.dumps(required_versions or {}, sort_keys=True)}
        self.store.set_feature_contract(feature_contract)
        self.round_token = ""  # fresh per round: replies echo it (a replayed reply does not)
        self.with_train = bool(fed.evaluate_sites and fed.evaluate_with_train)
        self._deadline: float | None = None  # time.monotonic() at which the current round ends
        self.remote = False  # the sites are other processes (not the simulation's in-process grid)
        self._base: tuple[str, Any] | None = None  # (round token, flat model) of this round's train message
        self._holders: set[int] = set()  # nodes whose train reply came: they kept that model

    # ---------------------------------------------------------------------------------------
    def train_config(self, layout: dict, keep_base: bool = False) -> ConfigRecord:
        return ConfigRecord({
            WIRE_LAYOUT: layout_to_json(layout), UPDATE_CODEC: self.fed.update_codec, KEEP_BASE: keep_base,
            ROUND_TOKEN: self.round_token,
            **self.handshake,
            "local-epochs": int(self.fed.local_epochs),
            "lr": float(self.fed.lr),
            "weight-decay": float(self.fed.weight_decay),
            "proximal-mu": float(self.fed.proximal_mu if self.fed.strategy == "fedprox" else 0.0),
            "model-spec": self.model_spec,
            "evaluate-global": self.with_train,
            # over a network the site reports its transfers: when this was sent, how long the round has
            **({"sent-at": time.time(), "round-timeout-s": float(self.fed.round_timeout_s)} if self.remote else {}),
        })

    def evaluate_config(self, layout: dict) -> ConfigRecord:
        return ConfigRecord({"model-spec": self.model_spec, ROUND_TOKEN: self.round_token, **self.handshake,
                             WIRE_LAYOUT: layout_to_json(layout)})

    def run(self, grid: Any, initial_arrays: ArrayRecord, *, resume: bool = False) -> RunResult:
        self.remote = not getattr(getattr(grid, "inner", grid), "runs_sites_here", False)
        arrays = initial_arrays
        start = 1
        if resume and self.store.last_path.exists():
            self._verify_last()
            ckpt = self.store.load_last()
            if ckpt.get("model_spec") != self.model_spec:
                raise ValueError(f"{self.store.last_path}: the checkpoint's model differs from the config "
                                 "(model section or input dim changed). Resume with the same config, or "
                                 "start a new run in another output folder.")
            arrays = ArrayRecord({k: v for k, v in ckpt["model_state"].items()})  # type: ignore[arg-type]
            restore_strategy_state(self.strategy, ckpt.get("strategy_state"))
            start = int(ckpt["round"]) + 1
            self.history.drop_after(int(ckpt["round"]))
            if self.with_train and int(ckpt["round"]) < self.fed.rounds:
                # the next round's replies evaluate this model at the sites again
                self.history.drop_rows(int(ckpt["round"]), "evaluate")
            self.audit.write("resumed", from_checkpoint=str(self.store.last_path), completed_round=ckpt["round"],
                             next_round=start)
            logger.info("Resuming after round %d from %s.", ckpt["round"], self.store.last_path)
        elif resume:
            logger.warning("--resume given but %s does not exist: starting at round 1.", self.store.last_path)
        elif self.store.last_path.exists():
            archive_previous_run(self.out_dir)
            self.store.best = None
        self.audit.run_started(rounds=self.fed.rounds, start_round=start, strategy=self.fed.strategy,
                               min_sites=self.fed.min_sites, local_epochs=self.fed.local_epochs, lr=self.fed.lr,
                               model_spec=self.model_spec, global_model_bytes=initial_arrays.count_bytes())
        if start == 1 and self.evaluate_fn is not None:
            self._record_heldout(0, self._heldout_audited(0, arrays))
        failed: list[int] = []
        if start > self.fed.rounds:
            logger.info("All %d rounds are already done (%s).", self.fed.rounds, self.store.last_path)
        for rnd in range(start, self.fed.rounds + 1):
            arrays, ok = self._round(grid, rnd, arrays)
            if not ok:
                failed.append(rnd)
        self._drain_reports()  # before plotting here: pyplot is not thread-safe
        self.history.write_csv()
        if self.plot:
            try:
                plot_learning_curves(self.history.rows(), self.out_dir / "plots")
            except Exception as exc:  # noqa: BLE001 - plots must never lose a finished run
                logger.warning("Could not draw learning curves: %s", exc)
        self.audit.write("run_finished", last_round=self.fed.rounds, failed_rounds=failed,
                         best=self.store.best)
        self._after_round(self.fed.rounds, last=True)
        return RunResult(arrays=arrays, first_round=start, last_round=self.fed.rounds, failed_rounds=failed,
                         out_dir=self.out_dir)

    def _round(self, grid: Any, rnd: int, arrays: ArrayRecord) -> tuple[ArrayRecord, bool]:
        """One round: train (+ the sites' evaluation of the previous model), site evaluation where a
        separate message is due, held-out evaluation, checkpoints, timeline."""
        clock = RoundClock(started=self._round_end or time.time())  # a gap between rounds counts too
        logger.info("[ROUND %d/%d]", rnd, self.fed.rounds)
        self.round_token = secrets.token_hex(8)
        state_before = strategy_state(self.strategy)  # FedAdam/FedYogi moments, restored on a rejection
        new_arrays, ok = self._train_round(grid, rnd, arrays, clock)
        t = time.time()
        heldout: dict[str, dict[str, float]] = {}
        if ok and new_arrays is not None:
            heldout, problem = self._heldout(rnd, new_arrays)
            kept: dict[str, dict[str, float]] | None = None
            if problem is not None:
                kept, kept_problem = self._heldout(rnd, arrays)
                if kept_problem is not None and not heldout:
                    # the evaluation fails for the previous model too: the cohort, not the update, is broken
                    self.audit.failure(rnd, "heldout", problem)
                    problem, kept = None, None
            if problem is None:
                arrays = new_arrays
            else:
                ok = False
                restore_strategy_state(self.strategy, state_before)
                self.audit.failure(rnd, "aggregate", f"the aggregated model was rejected ({problem}); the previous "
                                   "global model is kept and nothing of this round is checkpointed as new")
                heldout = kept or {}
        elif self.evaluate_fn is not None:
            heldout = self._heldout_audited(rnd, arrays)
        self._record_heldout(rnd, heldout)
        clock.timed("held-out evaluation", t)
        site_eval: dict[str, float] = {}
        if self.fed.evaluate_sites and (not self.with_train or rnd == self.fed.rounds):
            t = time.time()
            site_eval = self._evaluate_round(grid, rnd, arrays)
            clock.timed("site evaluate message", t)
        aggregate: dict[str, float] = {}
        if self.epsilon_fn is not None:
            aggregate["dp-epsilon"] = float(self.epsilon_fn(rnd))
        aggregate["round-seconds"] = time.time() - clock.started
        self.history.add(rnd, "aggregate", "federation", aggregate)
        value = self._best_value(site_eval, heldout)
        t = time.time()
        self._save(rnd, arrays, value, {"sites": site_eval, "heldout": heldout, **aggregate})
        clock.timed("checkpoint", t)
        self.history.write_csv()
        table = round_table(clock, time.time())
        self.audit.write("round_timeline", round=rnd, **table)
        self.audit.write("round_finished", round=rnd, ok=ok, seconds=table["seconds"],
                         best_metric=self.store.metric, metric_value=value,
                         dp_epsilon=aggregate.get("dp-epsilon"))
        self._after_round(rnd)
        self._round_end = time.time()
        return arrays, ok

    def _after_round(self, rnd: int, *, last: bool = False) -> None:
        """Run ``on_round`` off the critical path: in a background thread that overlaps the next
        round's local training (the run report takes seconds: plots). A report still being
        written when the next round ends is not queued again (each report covers the whole run
        so far); the run's last one runs in this thread after the others finished."""
        if self.on_round is None:
            return
        if last:
            self._drain_reports()
            self._call_on_round(rnd)
            return
        if self._report_job is not None and not self._report_job.done():
            return
        if self._reporter is None:
            self._reporter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="round-report")
        self._report_job = self._reporter.submit(self._call_on_round, rnd)

    def _drain_reports(self) -> None:
        if self._reporter is not None:
            self._reporter.shutdown(wait=True)
            self._reporter = None

    def _call_on_round(self, rnd: int) -> None:
        try:
            self.on_round(rnd)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - a report must never cost a round
            logger.warning("After round %d: %s", rnd, exc)

    def _save(self, rnd: int, arrays: ArrayRecord, value: float | None, metrics: dict[str, Any]) -> None:
        """Checkpoint round ``rnd`` (``best.pt`` too when ``value`` improves) and audit the files."""
        written = self.store.save(rnd, arrays, self.model_spec, metric_value=value,
                                  strategy_state=strategy_state(self.strategy), metrics=metrics)
        for kind, path in written:
            self.audit.checkpoint(rnd, path, kind)
        self.store.prune(rnd)

    def _verify_last(self) -> None:
        """Check ``last.pt`` against the sha256 the audit log recorded when it was written (torch
        reads a checkpoint with flipped bits without complaint). On a mismatch this raises
        :class:`~tdamil.security.integrity.CheckpointIntegrityError` naming the file and an intact
        round checkpoint to resume from; nothing is deleted or overwritten."""
        from tdamil.security.integrity import verify_checkpoint  # noqa: PLC0415

        if not self.audit.path.exists():
            logger.warning("%s: no audit log, so %s cannot be checked against its recorded sha256.",
                           self.out_dir, self.store.last_path)
            return
        if verify_checkpoint(self.store.last_path, self.audit.path) is None:
            logger.warning("%s is not recorded in %s: resuming without an integrity check.",
                           self.store.last_path, self.audit.path)
        else:
            logger.info("%s matches the sha256 recorded in %s.", self.store.last_path, self.audit.path)

    # ---------------------------------------------------------------------------------------
    def _best_value(self, site_eval: dict[str, float], heldout: dict[str, dict[str, float]]) -> float | None:
        metric = self.store.metric
        if self.best_source == "heldout":
            values = [m.get(metric) for m in heldout.values()]
        else:
            values = [site_eval.get(metric)]
        values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        return sum(values) / len(values) if values else None

    def _send(self, grid: Any, messages: list[Message], rnd: int, phase: str,
              clock: RoundClock | None = None) -> list[Message]:
        """Send one phase's messages and collect the replies until the round's deadline:
        ``federation.round_timeout_s`` counts from the round's train message, and a later message
        of the same round (a separate site evaluation) gets only what is left of it. A site
        without a reply by then gets an error reply naming the deadline (audited by the intake);
        replies of an earlier round that arrive now are refused and audited."""
        now = time.monotonic()
        if phase == "train" or self._deadline is None:
            self._deadline = now + self.fed.round_timeout_s
        if clock is not None:
            clock.sent = time.time()
        self._refuse_late(grid)
        left = self._deadline - now
        if not isinstance(grid, PatientGrid):
            return list(grid.send_and_receive(messages, timeout=max(left, 0.0)))
        if left <= 0:
            self.audit.failure(rnd, phase, f"not sent: the round's deadline (federation.round_timeout_s="
                               f"{self.fed.round_timeout_s:.0f} s) had passed")
            return []
        note = (f"no reply by the round's deadline (federation.round_timeout_s={self.fed.round_timeout_s:.0f} s "
                f"for the whole round; {left:.0f} s were left for the {phase} message): the site stopped, "
                "lost its link or is too slow")
        replies = list(grid.send_and_receive(messages, timeout=left, round_phase=(rnd, phase), deadline_note=note))
        if clock is not None:
            clock.collected = time.time()
        self._refuse_late(grid)
        return replies

    def _refuse_late(self, grid: Any) -> None:
        """Audit the replies that came after their round's deadline; they are never used."""
        for late in grid.late_replies() if isinstance(grid, PatientGrid) else []:
            what = error_text(late.reply) if late.reply.has_error() else "a reply"
            self.audit.failure(late.round, late.phase, f"late reply refused: {what} arrived {late.seconds_late:.0f} s "
                               f"after the round's deadline (federation.round_timeout_s="
                               f"{self.fed.round_timeout_s:.0f} s); it is never aggregated",
                               site=self.intake.site_of(grid, late.node_id), node_id=late.node_id)

    def _name_sites(self, grid: Any) -> None:
        """Let the grid name the sites it waits for: registered ones and those seen in replies."""
        if isinstance(grid, PatientGrid):
            grid.known_sites = lambda: ({n: (s, "took part before") for n, s in self.intake.node_sites.items()}
                                        | {n: (s, "registered") for n, s in self.intake.registered(grid).items()})

    def _site_evaluation(self, model_round: int, per_site: dict[str, dict[str, float]], via: str) -> dict[str, float]:
        """Record the sites' validation metrics of round ``model_round``'s global model (per site
        and their NaN-aware weighted mean); returns the mean as ``{metric: value}``."""
        for site, metrics in per_site.items():
            self.history.add(model_round, "evaluate", site, metrics)
            self.audit.write("site_evaluation", round=model_round, site=site, via=via, metrics=metrics)
        if not per_site:
            return {}
        records = [RecordDict({METRICS: MetricRecord(m)}) for m in per_site.values()]
        mean = {k: float(v) for k, v in nan_weighted_mean(records, "num-examples").items()}
        self.history.add(model_round, "aggregate", "site-evaluation", {f"sites-{k}": v for k, v in mean.items()})
        return mean

    def _evaluation_in_train(self, rnd: int, valid: list[Message], received: ArrayRecord) -> None:
        """Round ``rnd``'s replies evaluated the model they received (round ``rnd - 1``'s): record it
        and, when the sites choose ``best.pt``, checkpoint that model now if it is the best so far."""
        per_site = {}
        for reply in valid:
            evaluation = global_evaluation(reply_metrics(reply))
            if evaluation is not None:
                per_site[reply_site(reply)] = evaluation
        mean = self._site_evaluation(rnd - 1, per_site, via=f"train message of round {rnd}")
        if self.best_source == "sites" and rnd > 1:
            value = self._best_value(mean, {})
            if self.store.is_better(value):
                self._save(rnd - 1, received, value, {"sites": mean})

    def _train_round(self, grid: Any, rnd: int, arrays: ArrayRecord,
                     clock: RoundClock) -> tuple[ArrayRecord | None, bool]:
        self._name_sites(grid)
        layout = layout_of(arrays)
        keep_base = self.fed.evaluate_sites and (not self.with_train or rnd == self.fed.rounds)
        try:
            messages = list(self.strategy.configure_train(rnd, arrays, self.train_config(layout, keep_base), grid))
        except SitesUnavailableError as exc:
            self.audit.failure(rnd, "train", str(exc))
            raise
        pack_instructions(messages, arrays, layout)
        self._base = (self.round_token, flatten(arrays, layout)) if keep_base else None
        self.audit.round_started(rnd, sites=[m.metadata.dst_node_id for m in messages],
                                 global_model_bytes=arrays.count_bytes())
        replies = self._send(grid, messages, rnd, "train", clock)
        contract = ReplyContract("train", rnd, self.round_token, layout, self.fed.max_site_examples,
                                 self.fed.update_codec)
        valid = self.intake.collect(grid, rnd, "train", messages, replies, contract, clock=clock,
                                    global_arrays=arrays)
        self._holders = {int(r.metadata.src_node_id) for r in valid}
        if self.with_train:
            self._evaluation_in_train(rnd, valid, arrays)
        t_aggregate = time.time()
        if len(valid) < self.fed.required_replies:
            self.audit.failure(rnd, "train", f"only {len(valid)} site(s) replied, federation.min_replies="
                               f"{self.fed.required_replies}: the global model is kept unchanged this round")
            return None, False
        try:
            new_arrays, agg = self.strategy.aggregate_train(rnd, valid)
        except Exception as exc:  # noqa: BLE001 - InconsistentMessageReplies, AggregationError, DP checks
            self.audit.failure(rnd, "aggregate", f"{type(exc).__name__}: {exc}")
            return None, False
        if new_arrays is None:
            self.audit.failure(rnd, "aggregate", "aggregation returned no model")
            return None, False
        new_arrays = cast_like(new_arrays, layout)
        problem = model_problem(new_arrays, layout)
        if problem is not None:
            self.audit.failure(rnd, "aggregate", f"the aggregated model was rejected ({problem}); the previous "
                               "global model is kept")
            return None, False
        if agg is not None:
            self.history.add(rnd, "train-aggregate", "federation",
                             {k: v for k, v in dict(agg).items() if not is_stamp(k) and not k.startswith("global-")})
        self.audit.write("aggregated", round=rnd, sites=[reply_site(r) for r in valid],
                         weighting=getattr(self.strategy, "weighting", "num-examples"),
                         weights=self._weights_used(valid), global_model_bytes=new_arrays.count_bytes())
        clock.timed("aggregate", t_aggregate)
        return new_arrays, True

    def _weights_used(self, valid: list[Message]) -> dict[str, float | None]:
        """Each site's weight in this round's average, as the strategy applied it: the DP wrapper
        reports its own (equal weights, 0 for a dropped update); otherwise the slide counts."""
        used = getattr(self.strategy, "last_weights", None)
        if isinstance(used, dict):
            return {reply_site(r): float(used.get(int(r.metadata.src_node_id), 0.0)) for r in valid}
        return {reply_site(r): reply_metrics(r).get("num-examples") for r in valid}

    def _evaluate_round(self, grid: Any, rnd: int, arrays: ArrayRecord) -> dict[str, float]:
        try:
            layout = layout_of(arrays)
            messages = list(self.strategy.configure_evaluate(rnd, arrays, self.evaluate_config(layout), grid))
        except SitesUnavailableError as exc:
            self.audit.failure(rnd, "evaluate", str(exc))
            return {}
        sizes = pack_instructions(messages, arrays, layout, self._base, self._holders)
        if not messages:
            return {}
        self.audit.write("evaluate_sent", round=rnd, model_bytes=sizes)  # an xor difference where a site kept its base
        replies = self._send(grid, messages, rnd, "evaluate")
        contract = ReplyContract("evaluate", rnd, self.round_token, None, self.fed.max_site_examples)
        valid = self.intake.collect(grid, rnd, "evaluate", messages, replies, contract)
        per_site = {reply_site(r): {k: v for k, v in reply_metrics(r).items() if not is_stamp(k)} for r in valid}
        return self._site_evaluation(rnd, per_site, via="evaluate message")

    def _heldout(self, rnd: int, arrays: ArrayRecord) -> tuple[dict[str, dict[str, float]], str | None]:
        """Held-out metrics of ``arrays`` (not recorded yet) and why the model fails them, or None.
        A model fails when the evaluation raises or its held-out loss is not finite."""
        if self.evaluate_fn is None:
            return {}, None
        try:
            results = self.evaluate_fn(rnd, arrays) or {}
        except Exception as exc:  # noqa: BLE001 - evaluation must not end the run
            logger.exception("Server-side evaluation failed")
            return {}, f"held-out evaluation failed: {type(exc).__name__}: {exc}"
        for cohort, metrics in results.items():
            loss = metrics.get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                return results, f"held-out loss on {cohort} is {loss}"
        return results, None

    def _heldout_audited(self, rnd: int, arrays: ArrayRecord) -> dict[str, dict[str, float]]:
        results, problem = self._heldout(rnd, arrays)
        if problem is not None:
            self.audit.failure(rnd, "heldout", problem)
        return results

    def _record_heldout(self, rnd: int, results: dict[str, dict[str, float]]) -> None:
        for cohort, metrics in results.items():
            self.history.add(rnd, "heldout", cohort, metrics)
            self.audit.write("heldout_evaluation", round=rnd, cohort=cohort, metrics=metrics)
            logger.info("Round %d held-out %s: %s", rnd, cohort,
                        ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
