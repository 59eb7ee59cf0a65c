"""What the end-to-end tests share when they run real coordinator and site processes: reading the
audit log while a run writes it, waiting for a condition with the processes' logs on a timeout,
starting / stopping a process group with its output in a log file, and stopping a federation's
processes all at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence, Union

from tdamil.federation.processes import ManagedProcess


def audit_events(out: Path) -> list[dict]:
    """The audit log's events so far (a line still being written is skipped)."""
    path = out / "audit.jsonl"
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return events


def wait_for(what: str, predicate: Callable[[], bool], timeout: float, procs: list[ManagedProcess], *,
             poll: float = 0.5, tail: int = 30) -> None:
    """Wait until ``predicate()``; on a timeout fail with the last lines of every process's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    logs = "\n\n".join(f"--- {p.name} ({p.log_path}) ---\n{p.tail(tail)}" for p in procs)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def start_logged(cmd: list[str], log: Path, cwd: Path, extra_env: dict | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (no telemetry, unbuffered, one thread), output to ``log``."""
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(extra_env or {}))
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it after 30 s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass


def stop_all(procs: Sequence[Union[ManagedProcess, subprocess.Popen]], grace: float = 5.0) -> None:
    """Stop every process (last started first) with their shutdowns overlapping: SIGTERM goes to every
    process group at once, then each is waited for (``ManagedProcess.stop`` / :func:`stop_group`, which
    SIGKILL what is left), so a federation of n processes stops in one grace period, not n."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    for proc in reversed(procs):
        if isinstance(proc, ManagedProcess):
            proc.stop(grace=grace)
        else:
            stop_group(proc)
