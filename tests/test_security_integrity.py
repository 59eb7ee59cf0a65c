"""Checkpoint integrity against the audit log: a flipped bit is caught and an intact file proposed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tdamil.atomic import sha256_file
from tdamil.federation.audit import AuditLog
from tdamil.security.integrity import CheckpointIntegrityError, recorded_checkpoints, verify_checkpoint


def _write(audit: AuditLog, path: Path, rnd: int, kind: str, data: bytes) -> None:
    path.write_bytes(data)
    audit.write("checkpoint", round=rnd, kind=kind, path=str(path), sha256=sha256_file(path))


def test_flipped_bit_is_caught_and_latest_intact_round_proposed(tmp_path: Path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    _write(audit, ck / "round_0001.pt", 1, "round", b"one" * 1000)
    _write(audit, ck / "best.pt", 1, "best", b"one" * 1000)
    _write(audit, ck / "round_0002.pt", 2, "round", b"two" * 1000)
    _write(audit, ck / "last.pt", 2, "last", b"two" * 1000)
    with open(tmp_path / "audit.jsonl", "a") as fh:
        fh.write('{"event": "checkpoint", "round": 3, "pa')  # an interrupted last line is tolerated
    assert [r.round for r in recorded_checkpoints(tmp_path / "audit.jsonl")] == [1, 1, 2, 2]
    assert verify_checkpoint(ck / "last.pt", tmp_path / "audit.jsonl") == sha256_file(ck / "last.pt")
    data = bytearray((ck / "last.pt").read_bytes())
    data[100] ^= 0x04
    (ck / "last.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match=r"last.pt: sha256 .* differs .*round_0002.pt \(round 2\) is intact"):
        verify_checkpoint(ck / "last.pt", tmp_path / "audit.jsonl")
    (ck / "round_0002.pt").write_bytes(b"x")
    with pytest.raises(CheckpointIntegrityError, match=r"round_0001.pt \(round 1\) is intact"):
        verify_checkpoint(ck / "last.pt", tmp_path / "audit.jsonl")


def test_unrecorded_checkpoint_is_not_judged(tmp_path: Path):
    (tmp_path / "audit.jsonl").write_text(json.dumps({"event": "run_started"}) + "\n")
    (tmp_path / "x.pt").write_bytes(b"abc")
    assert verify_checkpoint(tmp_path / "x.pt", tmp_path / "audit.jsonl") is None
