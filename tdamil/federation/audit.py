"""Append-only JSONL audit log of a federated run.

Every line is one JSON object with ``time`` (UTC ISO 8601), ``event`` and event fields. The log
records who took part in each round, what they sent (payload sizes in bytes, metric values; never
data), which checkpoints were written (path + sha256) and every failure. Lines are flushed and
fsynced as they are written so a crash loses at most the line being written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["AuditLog", "sha256_file", "read_audit"]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become null, numpy scalars become Python numbers, paths strings."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalar
        try:
            value = value.item()
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class AuditLog:
    """Append-only JSONL audit trail (``audit.jsonl`` in the run's output folder)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event and fsync it; returns the record written."""
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event}
        record.update(_clean(fields))
        line = json.dumps(record, sort_keys=False, allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return record

    # Convenience wrappers naming the events the run writes ---------------------------------
    def run_started(self, **fields: Any) -> None:
        self.write("run_started", **fields)

    def round_started(self, server_round: int, sites: list[str] | None = None, **fields: Any) -> None:
        self.write("round_started", round=server_round, sampled_nodes=sites, **fields)

    def reply(self, server_round: int, phase: str, site: str, node_id: int, payload_bytes: int,
              metrics: dict[str, Any]) -> None:
        self.write("reply", round=server_round, phase=phase, site=site, node_id=node_id,
                   payload_bytes=payload_bytes, metrics=metrics)

    def failure(self, server_round: int, phase: str, reason: str, site: str | None = None,
                node_id: int | None = None) -> None:
        logger.warning("Round %s %s failure (%s): %s", server_round, phase, site or node_id, reason)
        self.write("failure", round=server_round, phase=phase, site=site, node_id=node_id, reason=reason)

    def checkpoint(self, server_round: int, path: str | Path, kind: str) -> str:
        digest = sha256_file(path)
        self.write("checkpoint", round=server_round, kind=kind, path=str(path), sha256=digest)
        return digest


def read_audit(path: str | Path) -> list[dict[str, Any]]:
    """Read an audit log back (tests, reports)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
