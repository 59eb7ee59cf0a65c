"""Orphan watchdog: whatever a coordinator or site started goes away when it dies, even by SIGKILL.

``PR_SET_PDEATHSIG`` (:func:`tdamil.federation.processes.die_with_parent`) covers only our direct
children. Flower's own children (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) are
started by the SuperLink / SuperNode, outlive it and keep retrying for tens of seconds. So
:func:`start_watchdog` starts one small process that

* every ``interval`` seconds (1 s: one walk of /proc costs about 10 ms of CPU) records the whole
  tree under the watched process (each pid with its start time, so a reused pid is never mistaken
  for one of ours), and
* when its stdin reaches end-of-file - the kernel closes the pipe when the watched process ends,
  however it ends - sends SIGTERM to every recorded process still alive, then SIGKILL after
  ``grace`` seconds.

Run as ``python -m tdamil.federation.watchdog <pid>`` (started by :func:`start_watchdog`).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

__all__ = ["start_watchdog", "descendants", "process_table"]

_PROC = Path("/proc")


def process_table() -> dict[int, tuple[int, int]]:
    """``{pid: (parent pid, start time in clock ticks)}`` of every process visible in /proc."""
    table: dict[int, tuple[int, int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # "pid (comm) state ppid ..." - comm may hold spaces and parentheses: split after the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(root: int, table: Optional[dict[int, tuple[int, int]]] = None) -> dict[int, int]:
    """``{pid: start time}`` of every process below ``root`` (children, grandchildren, ...)."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, int] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        if pid not in found:
            found[pid] = table[pid][1]
            stack.extend(children.get(pid, []))
    return found


def _alive(tracked: dict[int, int]) -> list[int]:
    table = process_table()
    return [pid for pid, start in tracked.items() if pid in table and table[pid][1] == start]


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def watch(parent: int, interval: float = 1.0, grace: float = 2.0) -> None:
    """Record ``parent``'s tree until stdin closes, then stop every recorded process still alive."""
    tracked: dict[int, int] = {}
    me = os.getpid()
    while True:
        tracked.update({p: s for p, s in descendants(parent).items() if p != me})
        ready, _, _ = select.select([sys.stdin], [], [], interval)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
    alive = _alive(tracked)
    _signal_all(alive, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = _alive(tracked)
    _signal_all(alive, signal.SIGKILL)


def start_watchdog() -> Optional[subprocess.Popen]:
    """Watch this process's tree from a separate process (Linux; None elsewhere).

    Keep the returned object referenced: its stdin pipe is what tells the watchdog we are alive.
    """
    if not _PROC.is_dir():
        return None
    return subprocess.Popen([sys.executable, "-m", "tdamil.federation.watchdog", str(os.getpid())],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


if __name__ == "__main__":  # pragma: no cover - runs as the watchdog process
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the terminal is the parent's business
    watch(int(sys.argv[1]))
