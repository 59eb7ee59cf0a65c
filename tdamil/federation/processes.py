"""Start, watch and stop the Flower processes (SuperLink, SuperNode, gateway, ``flwr run``).

Every process runs in its own session (process group) so that stopping it also stops the children
Flower spawns (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``): SIGTERM to the group,
then SIGKILL after a grace period.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

logger = logging.getLogger(__name__)

__all__ = ["ManagedProcess", "flower_env", "flower_bin", "die_with_parent"]


def flower_bin(name: str) -> str:
    """Path of a Flower console script next to this Python (the project's virtualenv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(flwr_home: Optional[Path] = None, threads: Optional[int] = None) -> dict[str, str]:
    """Environment for Flower processes: telemetry off, own FLWR_HOME, optional CPU thread cap."""
    env = dict(os.environ)
    # Flower spawns flower-superexec / flwr-serverapp / flwr-clientapp by name: find ours first
    bin_dir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    # Flower's internal switches for its legacy gRPC Control / Fleet servers: they bind [::]:9093
    # and [::]:9092 whatever --host says, past the fleet gateway (unauthenticated Control API)
    for key in ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API"):
        env.pop(key, None)
    # the SuperNode's SuperExec looks for a new message's ClientApp task every 1 s by default: every
    # round's message waited 0.5 s on average for it (issue #10); 0.1 s costs nothing measurable
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    if flwr_home is not None:
        Path(flwr_home).mkdir(parents=True, exist_ok=True)
        env["FLWR_HOME"] = str(flwr_home)
    if threads:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[key] = str(threads)
    return env


def die_with_parent() -> None:  # pragma: no cover - runs in the child
    """``preexec_fn`` for every child (Linux): deliver SIGTERM to it when the process that started it
    dies (even by SIGKILL), so a crashed coordinator or site never leaves a SuperLink / SuperNode
    running on its own. Grandchildren Flower spawns are covered by :mod:`tdamil.federation.watchdog`."""
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ManagedProcess:
    """A child process in its own process group, logging to a file (and optionally following lines)."""

    def __init__(self, name: str, cmd: Sequence[str], log_path: Optional[Path], env: Optional[dict[str, str]] = None,
                 cwd: Optional[Path] = None, on_line: Optional[Callable[[str], None]] = None) -> None:
        """``log_path=None``: the process writes to this terminal. ``on_line``: called with each
        output line (after it is written to the log), from a reader thread."""
        self.name = name
        self.cmd = list(cmd)
        self.log_path = Path(log_path) if log_path is not None else None
        self._log = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        logger.debug("Starting %s: %s", name, " ".join(self.cmd))
        out = subprocess.PIPE if on_line is not None else self._log
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT if out else None, env=env,
                                     cwd=cwd, start_new_session=True, text=True, errors="replace",
                                     preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)
        self._reader: Optional[threading.Thread] = None
        if on_line is not None:
            self._reader = threading.Thread(target=self._follow, args=(on_line,), daemon=True)
            self._reader.start()

    def _follow(self, on_line: Callable[[str], None]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self._log is not None and not self._log.closed:
                self._log.write(line)
                self._log.flush()
            on_line(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def tail(self, lines: int = 20) -> str:
        if self.log_path is None:
            return ""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float = 5.0) -> Optional[int]:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds; returns the exit code."""
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                logger.debug("%s did not stop within %.0f s: killing it.", self.name, grace)
        # children (superexec, serverapp/clientapp) may outlive the leader: kill what is left
        self._signal_group(signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._log is not None and not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole group at once (tests: a site or the coordinator crashing)."""
        self._signal_group(signal.SIGKILL)
        self.proc.wait(timeout=10)
