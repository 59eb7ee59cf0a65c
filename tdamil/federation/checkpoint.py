"""Atomic checkpoints of the global model: one per round, ``last.pt`` and ``best.pt``.

A checkpoint is a ``torch.save`` dict: ``round``, ``state_dict`` (the global model), ``model_spec``
(JSON text), ``strategy_state`` (server-optimiser moments), ``best`` (``{"round", "metric",
"value"}``), ``metrics`` (the server-side metrics of that round) and ``tdamil_version``. Files are
written to a temporary name in the same folder, fsynced, then renamed, so a crash never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

logger = logging.getLogger(__name__)

__all__ = ["CheckpointStore", "atomic_torch_save", "load_checkpoint"]


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :class:`CheckpointStore` (clear error when unreadable)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no checkpoint there. Run without --resume to start fresh.") from None
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable tdamil-fl checkpoint ({exc}). Delete it or point "
                         f"--resume at another run folder.") from None


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
             strategy_state: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
             extra: dict[str, Any] | None = None) -> list[tuple[str, Path]]:
        """Save this round; returns ``[(kind, path), ...]`` of the files written."""
        from tdamil import __version__  # noqa: PLC0415

        improved = self.is_better(metric_value)
        if improved:
            self.best = {"round": server_round, "metric": self.metric, "value": metric_value}
        payload = {
            "round": server_round,
            "state_dict": arrays.to_torch_state_dict(),
            "model_spec": model_spec,
            "strategy_state": strategy_state or {},
            "best": self.best,
            "metrics": metrics or {},
            "tdamil_version": __version__,
        }
        payload.update(extra or {})
        written: list[tuple[str, Path]] = []
        round_path = self.folder / f"round_{server_round:04d}.pt"
        atomic_torch_save(payload, round_path)
        written.append(("round", round_path))
        atomic_torch_save(payload, self.last_path)
        written.append(("last", self.last_path))
        if improved:
            atomic_torch_save(payload, self.best_path)
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
