"""The federation's global-model checkpoints: one per round, ``last.pt`` and ``best.pt``.

Each file is a :mod:`tdamil.checkpoint` (``kind="federated"``): the global model with ``round``,
``model_spec`` (JSON text), ``strategy_state`` (server-optimiser moments as tensors), ``best``
(``{"round", "metric", "value"}``), the server-side ``metrics`` of that round and, once the round
loop has set it (:meth:`CheckpointStore.set_feature_contract`), the run's ``feature_contract``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from tdamil.checkpoint import load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["CheckpointStore"]


class CheckpointStore:
    """Writes ``round_XXXX.pt`` (keeping the last ``keep_last``), ``last.pt`` and ``best.pt``."""

    def __init__(self, folder: str | Path, keep_last: int = 3, metric: str = "auroc", mode: str = "max") -> None:
        self.folder = Path(folder)
        self.keep_last = max(0, int(keep_last))
        self.metric = metric
        self.mode = mode
        self.best: dict[str, Any] | None = None
        self.feature_contract: dict[str, Any] | None = None

    def set_feature_contract(self, contract: Any) -> None:
        """Record the run's feature contract in every checkpoint written from now on (``round_*.pt``,
        ``last.pt``, ``best.pt``): a :class:`~tdamil.data.contract.FeatureContract`, its
        ``to_dict()`` or ``to_json()``, or ``None`` (not recorded)."""
        from tdamil.data.contract import FeatureContract  # noqa: PLC0415

        if contract is None:
            self.feature_contract = None
        elif isinstance(contract, FeatureContract):
            self.feature_contract = contract.to_dict()
        elif isinstance(contract, str):
            self.feature_contract = FeatureContract.from_json(contract, source="the run's feature contract").to_dict()
        else:
            self.feature_contract = FeatureContract.from_dict(contract, source="the run's feature contract").to_dict()

    @property
    def last_path(self) -> Path:
        return self.folder / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.folder / "best.pt"

    def is_better(self, value: float | None) -> bool:
        if value is None or value != value:
            return False
        if self.best is None or self.best.get("value") is None:
            return True
        return value > self.best["value"] if self.mode == "max" else value < self.best["value"]

    def save(self, server_round: int, arrays: ArrayRecord, model_spec: str, *, metric_value: float | None,
             strategy_state: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> list[tuple[str, Path]]:
        """Save this round; returns ``[(kind, path), ...]`` of the files written."""
        improved = self.is_better(metric_value)
        if improved:
            self.best = {"round": server_round, "metric": self.metric, "value": metric_value}
        spec = json.loads(model_spec)
        fields = dict(kind="federated", model_config=spec["model"], in_dim=spec["in_dim"],
                      num_classes=spec["num_classes"], metrics=metrics or {}, round=server_round,
                      model_spec=model_spec, strategy_state=strategy_state or {}, best=self.best,
                      feature_contract=self.feature_contract)
        state = arrays.to_torch_state_dict()
        written: list[tuple[str, Path]] = []
        round_path = self.folder / f"round_{server_round:04d}.pt"
        save_checkpoint(round_path, state, **fields)
        written.append(("round", round_path))
        save_checkpoint(self.last_path, state, **fields)
        written.append(("last", self.last_path))
        if improved:
            save_checkpoint(self.best_path, state, **fields)
            written.append(("best", self.best_path))
            logger.info("Round %d: new best %s = %.4f -> %s", server_round, self.metric, metric_value, self.best_path)
        return written

    def _prune(self, current: int) -> None:
        """Delete per-round checkpoints older than the last ``keep_last`` rounds up to ``current``."""
        for old in self.folder.glob("round_*.pt"):
            try:
                rnd = int(old.stem.split("_")[1])
            except (IndexError, ValueError):
                continue
            if rnd <= current - self.keep_last:
                old.unlink(missing_ok=True)

    def prune(self, current: int) -> None:
        """Apply ``keep_last`` (call after the written files were hashed for the audit log)."""
        self._prune(current)

    def load_last(self) -> dict[str, Any]:
        """``last.pt`` to resume from; refused when it recorded another feature contract than the one
        set now (the resumed model was trained on other features)."""
        ckpt = load_checkpoint(self.last_path)
        recorded = ckpt.get("feature_contract")
        if self.feature_contract is not None and recorded is not None and dict(recorded) != self.feature_contract:
            changed = ", ".join(f"{k} {recorded.get(k)!r} -> {self.feature_contract.get(k)!r}"
                                for k in sorted(set(recorded) | set(self.feature_contract))
                                if recorded.get(k) != self.feature_contract.get(k))
            raise ValueError(f"{self.last_path}: the run's feature contract changed ({changed}); the model was trained "
                             "on other features. Resume with the contract of that run, or start a new run in another "
                             "output folder.")
        self.best = ckpt.get("best")
        return ckpt


def archive_previous_run(out_dir: Path) -> Path:
    """A fresh run in a folder holding a finished or interrupted one: move the old run's
    checkpoints, plots, audit log and metrics aside to ``previous/<time>/``; returns that folder."""
    import shutil  # noqa: PLC0415
    from datetime import datetime  # noqa: PLC0415

    dest = Path(out_dir) / "previous" / datetime.now().strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoints", "plots", "audit.jsonl", "metrics.jsonl", "metrics.csv"):
        src = Path(out_dir) / name
        if src.exists():
            shutil.move(str(src), str(dest / name))
    logger.warning("%s held a previous run (not resumed): moved it to %s. Use --resume to continue a run.",
                   out_dir, dest)
    return dest
