"""The federation's global-model checkpoints: one per round, ``last.pt`` and ``best.pt``.

Each file is a :mod:`tdamil.checkpoint` (``kind="federated"``): the global model with ``round``,
``model_spec`` (JSON text), ``strategy_state`` (server-optimiser moments as tensors), ``best``
(``{"round", "metric", "value"}``) and the server-side ``metrics`` of that round.
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
                      model_spec=model_spec, strategy_state=strategy_state or {}, best=self.best)
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
        ckpt = load_checkpoint(self.last_path)
        self.best = ckpt.get("best")
        return ckpt
