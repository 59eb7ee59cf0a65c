"""The coordinator's Flower ServerApp (Message API).

FedAvg (or FedProx / FedAdam / FedYogi) over the FULL model state (TDA-MIL's task token T and
channel matrix C included), weighted by each site's number of training slides; server-side
evaluation of the global model on held-out cohorts at round 0 and after every round; atomic
checkpoints every round plus the best; ``resume`` continues from ``last.pt`` at the next round;
per-site metrics CSV/JSONL, learning curves and an audit log (see :mod:`tdamil.federation.loop`).

Deployed, ``flwr-server`` submits a run whose run config carries ``server-config`` (absolute path of
the coordinator's YAML) and ``resume``; this app then runs inside Flower's ``flwr-serverapp``
process next to the SuperLink. The simulation builds the same app with :func:`make_server_app`.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from tdamil.federation.audit import AuditLog
from tdamil.federation.config import CheckpointConfig, FederationConfig
from tdamil.federation.grids import InProcessGrid, PatientGrid
from tdamil.federation.object_pulls import use_quick_object_pulls
from tdamil.federation.loop import RoundLoop, RunResult
from tdamil.federation.run_report import write_run_report
from tdamil.federation.strategies import build_strategy
from tdamil.federation.records import metric_keys
from tdamil.federation.task import ModelSpec, build_model, load_arrays, model_to_arrays
from tdamil.federation.versions import required_versions

logger = logging.getLogger(__name__)

__all__ = ["RunSetup", "make_server_app", "run_federated", "make_heldout_evaluate", "app"]


@dataclass
class RunSetup:
    """Everything one federated run needs at the coordinator."""

    spec: ModelSpec
    federation: FederationConfig
    out_dir: Path
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    heldout: dict[str, Any] = field(default_factory=dict)  # cohort -> BagDataset
    privacy: Any = None  # tdamil.security.config.PrivacyConfig
    resume: bool = False
    plot: bool = True
    session: Optional[str] = None  # coordinator session id, written on every audit line
    site_nodes: Optional[dict[int, str]] = None  # authenticated node id -> site (key registration)
    feature_contract: Any = None  # tdamil.data.contract.FeatureContract: what every site's features must be
    required_versions: Optional[dict[str, str]] = None  # package -> specifier (default: required_versions())
    result: Optional[RunResult] = None  # filled in after the run


def make_heldout_evaluate(spec: ModelSpec, cohorts: dict[str, Any]) -> Callable[[int, ArrayRecord], dict]:
    """``evaluate_fn(round, arrays) -> {cohort: metrics}`` for the held-out cohorts, each metric with
    its 95 % CI (``<metric>_ci_low`` / ``_ci_high``: stratified bootstrap over the cohort's patients)."""
    from tdamil.stats import bootstrap_ci, interval_columns  # noqa: PLC0415
    from tdamil.train.engine import evaluate as evaluate_bags  # noqa: PLC0415 - loads scikit-learn

    model = build_model(spec, seed=None)

    def with_ci(ds: Any) -> dict[str, float]:
        res = evaluate_bags(model, ds)
        metrics = {k: float(res.metrics.get(k, float("nan"))) for k in metric_keys()}
        return metrics | interval_columns(bootstrap_ci(res.labels, res.probs, ds.patient_ids))

    def evaluate(server_round: int, arrays: ArrayRecord) -> dict[str, dict[str, float]]:
        load_arrays(model, arrays)
        return {name: with_ci(ds) for name, ds in cohorts.items()}

    return evaluate


def _privacy(setup: RunSetup, strategy: Any, num_sites: int) -> tuple[Any, Optional[Callable[[int], float]]]:
    """Wrap the strategy for DP and return an epsilon(round) function (only when enabled)."""
    if setup.privacy is None or not getattr(setup.privacy, "enabled", False):
        return strategy, None
    from tdamil.security.dp import dp_server_strategy  # noqa: PLC0415

    rate = min(1.0, setup.federation.fraction_sites)
    wrapped = dp_server_strategy(strategy, setup.privacy, num_sites, sampling_rate=rate)
    return wrapped, wrapped.site_accountant.epsilon


def run_federated(grid: Grid, setup: RunSetup) -> RunResult:
    """Run (or resume) the federation described by ``setup`` on ``grid``."""
    fed = setup.federation
    if setup.session is None:
        setup.session = uuid.uuid4().hex[:12]
    strategy, epsilon_fn = _privacy(setup, build_strategy(fed), fed.min_sites)
    evaluate_fn = make_heldout_evaluate(setup.spec, setup.heldout) if setup.heldout else None
    loop = RoundLoop(strategy, fed, setup.spec.to_json(), setup.out_dir, ckpt=setup.checkpoint,
                     evaluate_fn=evaluate_fn, epsilon_fn=epsilon_fn, plot=setup.plot, session=setup.session,
                     on_round=lambda _rnd: write_run_report(setup.out_dir),  # report.html, every round
                     site_nodes=setup.site_nodes, feature_contract=setup.feature_contract,
                     required_versions=setup.required_versions if setup.required_versions is not None
                     else required_versions())
    initial = model_to_arrays(build_model(setup.spec, seed=fed.seed))
    if not isinstance(grid, InProcessGrid):  # replies over the network: ask for their arrays every <= 0.5 s
        use_quick_object_pulls("coordinator")
    patient = PatientGrid(grid, min_nodes=fed.min_sites, wait_timeout=fed.wait_for_sites_s,
                          poll_interval=fed.reply_poll_s)
    result = loop.run(patient, initial, resume=setup.resume)
    setup.result = result
    return result


def _bridge_logging() -> None:
    """In ``flwr-serverapp`` only Flower's console handler reaches the coordinator's log stream:
    give it the project's format (time, level, source) and route the project's loggers through it.
    Where the process already logs (simulation, tests), Flower's lines go through that, once."""
    from tdamil.logs import format_flower_console, route_flower_to_root  # noqa: PLC0415

    if logging.getLogger().handlers:
        route_flower_to_root()
        return
    ours = logging.getLogger("tdamil")
    handlers = format_flower_console()
    if handlers and not ours.handlers:
        for handler in handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def make_server_app(setup_fn: Callable[[Context], RunSetup]) -> ServerApp:
    """A ServerApp whose run is described by ``setup_fn(context)``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _bridge_logging()
        setup: Optional[RunSetup] = None
        try:
            setup = setup_fn(context)
            run_federated(grid, setup)
        except Exception as exc:
            record_run_failure(context, setup, exc)
            raise

    return server_app


def record_run_failure(context: Context, setup: Optional[RunSetup], exc: BaseException) -> None:
    """Append ``run_failed`` (this session, one-line error) to the run's audit log, so the
    coordinator reports why the run ended instead of an earlier session's result."""
    out = setup.out_dir if setup is not None else context.run_config.get("output-dir")
    if not out:
        return
    session = (setup.session if setup is not None else None) or context.run_config.get("session-id") or None
    error = " ".join(f"{type(exc).__name__}: {exc}".split())
    try:
        AuditLog(Path(str(out)) / "audit.jsonl", session=str(session) if session else None).write(
            "run_failed", error=error)
    except OSError as log_exc:  # never hide the original error
        logger.error("Could not record the failure in %s: %s", out, log_exc)
    try:
        write_run_report(Path(str(out)))  # the page then says the run failed, and why
    except Exception as rep_exc:  # noqa: BLE001 - never hide the original error
        logger.error("Could not update %s/report.html: %s", out, rep_exc)
    logger.error("The run failed: %s", error)


def setup_from_run_config(context: Context) -> RunSetup:
    """Deployed runs: read the coordinator's YAML named by the run config ``server-config``."""
    from tdamil.federation.data import cohort_datasets  # noqa: PLC0415
    from tdamil.server.config import load_server_config  # noqa: PLC0415

    path = context.run_config.get("server-config")
    if not path:
        raise ValueError("The run config lacks 'server-config'. Start runs with `flwr-server --config ...`.")
    cfg = load_server_config(Path(str(path)))
    heldout = {}
    if cfg.evaluation.data is not None:
        heldout = cohort_datasets(cfg.evaluation.data, cfg.evaluation.cohorts)
    out_dir = Path(str(context.run_config.get("output-dir") or cfg.output_dir))
    site_nodes = None
    nodes_file = str(context.run_config.get("site-nodes") or "")
    if nodes_file:
        site_nodes = {int(k): str(v) for k, v in json.loads(Path(nodes_file).read_text(encoding="utf-8")).items()}
    return RunSetup(site_nodes=site_nodes, feature_contract=cfg.contract,
                    required_versions=required_versions(cfg.versions), spec=ModelSpec(cfg.model, cfg.in_dim, cfg.num_classes), federation=cfg.federation,
                    out_dir=out_dir, checkpoint=cfg.checkpoint, heldout=heldout, privacy=cfg.privacy,
                    resume=bool(context.run_config.get("resume", False)),
                    session=str(context.run_config.get("session-id") or "") or None)


# The ServerApp the SuperLink runs (``tdamil.server.server_app:app`` in [tool.flwr.app.components]).
app = make_server_app(setup_from_run_config)
