"""Append-only JSONL audit log of a federated run.

Every line is one JSON object with ``time`` (UTC ISO 8601), ``event``, ``session`` (the coordinator
session that wrote it, so a restarted coordinator judges its own session's outcome) and event fields. The log
records who took part in each round, what they sent (payload sizes in bytes, metric values; never
data), which checkpoints were written (path + sha256) and every failure. Lines are flushed and
fsynced as they are written so a crash loses at most the line being written.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tdamil.atomic import sha256_file
from tdamil.config import json_safe

logger = logging.getLogger(__name__)

__all__ = ["AuditLog", "read_audit", "session_outcome"]


class AuditLog:
    """Append-only JSONL audit trail (``audit.jsonl`` in the run's output folder)."""

    def __init__(self, path: str | Path, session: str | None = None) -> None:
        self.path = Path(path)
        self.session = session
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event and fsync it; returns the record written."""
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event}
        if self.session is not None:
            record["session"] = self.session
        record.update(json_safe(fields))
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


def session_outcome(path: str | Path, session: str) -> tuple[str, str | None]:
    """How coordinator session ``session`` ended according to the audit log: ``("finished", None)``,
    ``("failed", error)`` or ``("unknown", None)`` (no end recorded: crashed, killed, never started).
    Lines of earlier sessions (e.g. the ``run_finished`` of the run being resumed) are ignored;
    an unreadable line (interrupted write) is skipped."""
    path = Path(path)
    if not path.exists():
        return "unknown", None
    outcome: tuple[str, str | None] = ("unknown", None)
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or rec.get("session") != session:
            continue
        if rec.get("event") == "run_finished":
            outcome = ("finished", None)
        elif rec.get("event") == "run_failed":
            outcome = ("failed", str(rec.get("error") or "unknown error"))
    return outcome
