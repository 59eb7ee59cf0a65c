"""Atomic writes: an interrupted write leaves the previous file intact and no debris behind."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tdamil.atomic import atomic_path, sha256_file


def test_success_replaces_the_file_with_the_requested_mode(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "key.pem"
    with atomic_path(dest, mode=0o600) as tmp:
        assert tmp.parent == dest.parent and tmp != dest
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o600  # private from the first byte
        tmp.write_text("secret")
    assert dest.read_text() == "secret"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert [p.name for p in dest.parent.iterdir()] == ["key.pem"]


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    dest = tmp_path / "last.pt"
    dest.write_text("round 3")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(dest) as tmp:
            tmp.write_text("half of round 4")
            raise RuntimeError("disk full")
    assert dest.read_text() == "round 3"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_default_mode_is_readable_and_suffix_is_kept(tmp_path: Path) -> None:
    dest = tmp_path / "qc.png"
    with atomic_path(dest, suffix=".tmp.png") as tmp:
        assert tmp.name.endswith(".tmp.png")
        tmp.write_bytes(b"png")
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644


def test_sha256_file_matches_hashlib_across_chunk_boundaries(tmp_path: Path) -> None:
    import hashlib

    data = bytes(range(256)) * 40000  # 10 MB: more than one 8 MiB chunk
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "f", chunk=1000) == hashlib.sha256(data).hexdigest()
