"""Slide claims: several extraction processes share one features folder without doing a slide twice.

Before a process works on a slide it creates ``<features_dir>/.claims/<slide_id>.claim`` with
``O_CREAT | O_EXCL`` (atomic on local file systems and NFSv3+), holding its pid, host and start
time. A process that finds the file leaves the slide to its owner. The owner refreshes the file's
modification time while it works (a heartbeat, once per batch) and deletes it when the slide is
finished or has failed. A claim is stale, and taken over, when its owner is a dead process on this
host, or when its heartbeat is older than ``stale_s`` (owner on another machine that crashed).

Taking over renames the stale file away first; if what was renamed turns out not to be the claim
judged stale (another process took it over in between), it is linked back and left alone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

__all__ = ["Claim", "try_claim", "claim_path", "CLAIMS_DIR"]

CLAIMS_DIR = ".claims"


def claim_path(features_dir: Path, slide_id: str) -> Path:
    return Path(features_dir) / CLAIMS_DIR / f"{slide_id}.claim"


@dataclass
class Claim:
    """A slide this process holds; :meth:`touch` while working, :meth:`release` when done."""

    path: Path
    slide_id: str

    def touch(self) -> None:
        try:
            os.utime(self.path)
        except FileNotFoundError:  # removed by hand; the work goes on, the h5 write is atomic anyway
            pass

    def release(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _read(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _stale_reason(path: Path, info: Optional[dict[str, Any]], stale_s: float) -> str:
    """Why the claim at ``path`` is stale, or '' when its owner may still be working."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "gone"
    if info and info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
        return f"its process {info.get('pid')} on this host is gone"
    if age > stale_s:
        return f"no heartbeat for {age:.0f} s (limit {stale_s:.0f} s)"
    if info is None and age > 60:  # a claim is written right after it is created; unreadable for long = broken
        return "unreadable claim file"
    return ""


def _create(path: Path, slide_id: str) -> Optional[Claim]:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as f:
        json.dump({"slide_id": slide_id, "pid": os.getpid(), "host": socket.gethostname(),
                   "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f)
        f.flush()
        os.fsync(f.fileno())
    return Claim(path, slide_id)


def try_claim(features_dir: Path, slide_id: str, stale_s: float = 1800.0) -> Optional[Claim]:
    """Claim ``slide_id`` for this process; None when another live process holds it."""
    path = claim_path(features_dir, slide_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    claim = _create(path, slide_id)
    if claim is not None:
        return claim
    info = _read(path)
    why = _stale_reason(path, info, stale_s)
    if not why:
        return None
    moved = path.with_name(f"{path.name}.stale.{socket.gethostname()}.{os.getpid()}")
    try:
        os.rename(path, moved)
    except FileNotFoundError:  # its owner finished or another process took it over
        return _create(path, slide_id)
    if _read(moved) != info:  # we moved a newer claim than the one judged stale: put it back
        try:
            os.link(moved, path)
        except OSError:  # taken again meanwhile, or no hard links on this file system: leave it
            pass
        moved.unlink(missing_ok=True)
        return None
    moved.unlink(missing_ok=True)
    if why != "gone":
        logger.warning("%s: taking over a stale claim (%s; was %s)", slide_id, why, info)
    return _create(path, slide_id)
