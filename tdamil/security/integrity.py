"""Checkpoint integrity against the run's audit log (detects silent corruption before ``--resume``).

``torch.load`` happily reads a checkpoint whose tensor bytes were damaged (a flipped bit on disk, a
partial copy of the right length): the run would resume from corrupted weights. The audit log
records the sha256 of every checkpoint written (``{"event": "checkpoint", "path", "sha256"}``), so
the file can be verified before it is trusted, and an intact round checkpoint can be proposed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tdamil.atomic import sha256_file

logger = logging.getLogger(__name__)

__all__ = ["CheckpointIntegrityError", "CheckpointRecord", "recorded_checkpoints", "verify_checkpoint"]


class CheckpointIntegrityError(ValueError):
    """The checkpoint's bytes differ from what the audit log recorded; the message names the fix."""


@dataclass
class CheckpointRecord:
    round: int
    path: Path
    sha256: str


def recorded_checkpoints(audit_path: str | Path) -> list[CheckpointRecord]:
    """Every ``checkpoint`` event of ``audit.jsonl`` in order (unreadable lines are skipped and logged)."""
    out = []
    audit_path = Path(audit_path)
    for n, line in enumerate(audit_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s line %d is not JSON (interrupted write?); skipped.", audit_path, n)
            continue
        if rec.get("event") == "checkpoint" and rec.get("path") and rec.get("sha256"):
            out.append(CheckpointRecord(int(rec.get("round", -1)), Path(rec["path"]), str(rec["sha256"])))
    return out


def verify_checkpoint(checkpoint: str | Path, audit_path: str | Path) -> Optional[str]:
    """Check ``checkpoint`` against the last sha256 the audit log recorded for that path.

    Returns the sha256 when it matches, None when the audit log has no record of the file (nothing
    to compare with); raises :class:`CheckpointIntegrityError` when the bytes differ, naming an
    intact round checkpoint to resume from when one exists.
    """
    checkpoint = Path(checkpoint)
    records = recorded_checkpoints(audit_path)
    mine = [r for r in records if r.path.resolve() == checkpoint.resolve()]
    if not mine:
        return None
    actual = sha256_file(checkpoint)
    expected = mine[-1].sha256
    if actual == expected:
        return actual
    # the latest round first; among equals, a per-round file (round_XXXX.pt) before last/best
    candidates = sorted(
        (r for r in records if r.path.resolve() != checkpoint.resolve() and r.path.is_file()),
        key=lambda r: (r.round, r.path.name.startswith("round_")), reverse=True,
    )
    intact = [r for r in candidates if sha256_file(r.path) == r.sha256]
    hint = (f" {intact[0].path} (round {intact[0].round}) is intact: copy it over {checkpoint.name} and resume."
            if intact else " No intact checkpoint of this run is left; start a new run.")
    raise CheckpointIntegrityError(
        f"{checkpoint}: sha256 {actual[:12]}... differs from {expected[:12]}... recorded in {audit_path} when it was "
        f"written (round {mine[-1].round}): the file is damaged or was replaced.{hint}"
    )
