"""The one SuperNode supervisor: run ``flower-supernode`` in the foreground, restart it, stop it.

Flower 1.42's SuperNode exits after ``--max-retries`` failed reconnections, and may log "Giving up
reconnection" or "SuperNode terminated gracefully" and then not exit (its runtime server and
SuperExec keep it alive). :func:`supervise_supernode` follows its output, kills such a process
``hang_grace`` seconds later and starts a fresh one (backoff 2-30 s), until Ctrl-C / SIGTERM.

A SuperLink with node authentication answers a key it does not know with Flower error 2004
("Failed to activate SuperNode", exit code 305). Retrying cannot fix that, so when the SuperNode
was never accepted in this session :class:`SuperNodeRejected` is raised instead of reconnecting
forever. (Once accepted, a 2004 may also mean "this key is still marked online" after a network
cut, which clears by itself: then it is retried.)
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

from tdamil.federation.processes import ManagedProcess

logger = logging.getLogger(__name__)

__all__ = ["REPLY_BUILT", "SuperNodeRejected", "supervise_supernode"]

# Lines after which a Flower 1.42 SuperNode is finished but may not exit by itself.
_ENDED_MARKERS = ("SuperNode terminated", "Giving up reconnection")
_REJECTED_MARKERS = ("[code: 2004]", "Failed to activate SuperNode")
_ACCEPTED_MARKER = "SuperNode ID:"


# What a SuperNode prints when the coordinator is not there: Flower's retry warnings, and its
# exit-code-305 block ("Exit Code: 305" / "Failed to initialize the connection to the SuperLink." /
# "[Errno 111] Connection refused" / ... / "ref-exit-codes/305.html").
# A retry warning alone may be a network blip that the next try mends; giving up, or the 305 error,
# means the coordinator is gone.
_GONE_MARKERS = ("Connection refused", "Connection attempt failed", "Giving up reconnection", "Exit Code: 305",
                 "Failed to initialize the connection to the SuperLink",
                 "could not establish a connection to the SuperLink", "ref-exit-codes/305")
_GONE_FOR_GOOD = ("Giving up reconnection", "Exit Code: 305", "Connection refused")
RUN_FINISHED_LINE = "run finished; waiting for the next run"
# Flower's lines for a message this site could not finish, and what they mean for the round.
_MISSED = {"Failed to send message": "its reply did not reach the coordinator",
           "Failed to receive message": "the coordinator's instruction did not arrive completely"}
# After a coordinator restart (or a finished run) a process of the old run asks with its old task
# token and is refused: Flower says "authentication failed" / 401, which reads like an attack.
_STALE_TOKEN = ("task-token authentication failed",)
# The ClientApp's line before its reply goes (tdamil.client.client_app.log_reply_size): the byte count follows.
REPLY_BUILT = "reply built:"


class SuperNodeRejected(RuntimeError):
    """The coordinator refused this SuperNode's key (not registered, or another key)."""


class _RunState:
    """Where the site is in its work, across SuperNode restarts, from the lines Flower prints.

    A coordinator that goes away after this site's last reply, with no message in hand, is a
    finished run (a coordinator exits when its run ends): the SuperNode's "Connection refused"
    errors are then the site waiting for the next run, said in one line (:data:`RUN_FINISHED_LINE`),
    not an error. Gone before the site ever replied, or in the middle of a message, they stay errors.
    """

    def __init__(self) -> None:
        self.replied = False  # a reply reached the coordinator in this session
        self.busy = False  # a message was received and its reply is not sent yet
        self.waiting = False  # the coordinator left after a finished run; reconnecting quietly
        self.reply_bytes: Optional[int] = None  # the ClientApp's "reply built: N bytes" line
        self.sending_since: Optional[float] = None  # the SuperNode's "Sending:" line (time.monotonic())

    def note(self, line: str) -> None:
        if REPLY_BUILT in line:
            try:
                self.reply_bytes = int(line.split(REPLY_BUILT, 1)[1].split()[0])
            except (IndexError, ValueError):
                self.reply_bytes = None
        if "Sending:" in line:
            self.sending_since = time.monotonic()
        if "Receiving:" in line:
            self.busy, self.waiting = True, False
        elif "Sent successfully" in line:
            self.busy, self.replied = False, True
        elif "Ignoring" in line or "Failed to send message" in line or "Failed to receive message" in line:
            self.busy = False
        elif _ACCEPTED_MARKER in line or "Connection successful" in line:
            self.waiting = False

    def reword(self, line: str) -> Optional[str]:
        """The line to echo: unchanged, :data:`RUN_FINISHED_LINE` (once per wait), an operator's
        reading of it (a missed round, a stale task token) or None (quiet)."""
        now = time.strftime('%Y-%m-%d %H:%M:%S')
        if any(m in line for m in _STALE_TOKEN):
            return (f"{now} INFO tdamil.client: a process of an earlier run asked this site's SuperNode with its old "
                    "task token and was refused (Flower: Runtime task-token authentication failed / 401). Expected "
                    "after a coordinator restart or a finished run; nothing to do.\n")
        missed = next((why for marker, why in _MISSED.items() if marker in line), None)
        if missed is not None:
            reason = line.split(": ", 2)[-1].strip() if line.count(": ") >= 2 else line.strip()
            return line + (f"{now} WARNING tdamil.client: this site missed the round: {missed} ({reason}). The "
                           "coordinator counts it as missing when the round's deadline passes "
                           "(federation.round_timeout_s); the site takes part again from the next round.\n")
        if "Sent successfully" in line and self.sending_since is not None:
            took, size = time.monotonic() - self.sending_since, self.reply_bytes
            self.sending_since = self.reply_bytes = None
            if size and took > 0:
                return line + (f"{now} INFO tdamil.client: reply sent: {size / 1e6:.1f} MB in {took:.1f} s "
                               f"(~{size * 8 / took / 1e6:.1f} Mbit/s).\n")
        if self.waiting:
            return None if any(m in line for m in _GONE_MARKERS) or not line.strip() else line
        if self.replied and not self.busy and any(m in line for m in _GONE_FOR_GOOD):
            self.waiting = True
            return f"{time.strftime('%Y-%m-%d %H:%M:%S')} INFO tdamil.client: {RUN_FINISHED_LINE} (the coordinator " \
                   "closed the connection after this site's last reply; the SuperNode keeps reconnecting)\n"
        return line


class _Output:
    """Echo the SuperNode's lines in the project's log format and note what they say."""

    def __init__(self, state: Optional[_RunState] = None) -> None:
        self.ended = threading.Event()
        self.rejected = threading.Event()
        self.accepted = threading.Event()
        self.state = state or _RunState()

    def __call__(self, line: str) -> None:
        self.state.note(line)
        shown = self.state.reword(line)
        if shown is not None:
            _echo_line(shown, "flower-supernode")
        if any(marker in line for marker in _ENDED_MARKERS):
            self.ended.set()
        if any(marker in line for marker in _REJECTED_MARKERS):
            self.rejected.set()
        if _ACCEPTED_MARKER in line:
            self.accepted.set()


def _run_once(cmd: list[str], env: dict[str, str], hang_grace: float,
              companion: Optional[Callable[[int], list[str]]] = None,
              state: Optional[_RunState] = None) -> tuple[Optional[int], _Output]:
    """Run one SuperNode until it exits (or hangs after its last line); returns (exit code, output).

    ``companion(supernode_pid)``: the command of a process that serves this SuperNode (the warm-start
    SuperExec of ``--isolation process``); it is started after the SuperNode and stopped with it, and
    if it dies the SuperNode is restarted with a fresh one (it would receive no task otherwise)."""
    out = _Output(state)
    proc = ManagedProcess("flower-supernode", cmd, None, env=env, on_line=out)
    helper = None
    try:
        if companion is not None:
            helper = ManagedProcess("warm-start", companion(proc.pid), None, env=env,
                                    on_line=functools.partial(_echo_companion, state=out.state))
        ended_at: Optional[float] = None
        while proc.poll() is None:
            if out.ended.is_set() or out.rejected.is_set():
                ended_at = ended_at or time.monotonic()
                if time.monotonic() - ended_at > hang_grace:
                    break
            if helper is not None and helper.poll() is not None:
                logger.warning("The warm-start SuperExec stopped (exit code %s); restarting the SuperNode with it.",
                               helper.poll())
                break
            time.sleep(0.2)
    finally:
        if helper is not None:
            helper.stop()
        code = proc.stop()  # SIGTERM, SIGKILL 5 s later (also on Ctrl-C)
    return code, out


def _echo_companion(line: str, state: _RunState) -> None:
    """The warm-start SuperExec's lines (its ClientApps' among them); quiet about its lost SuperNode
    while the site waits for a run."""
    if REPLY_BUILT in line:
        state.note(line)
    if not (state.waiting and (any(m in line for m in _GONE_MARKERS) or not line.strip())):
        _echo_line(line, "warm-start")


def _echo_line(line: str, source: str) -> None:
    """Write a child process's line to our stdout in the project's log format."""
    from tdamil.logs import reformat_flower_line  # noqa: PLC0415

    sys.stdout.write(reformat_flower_line(line, source=source))
    sys.stdout.flush()


def supervise_supernode(cmd: list[str], env: dict[str, str], *, restart: bool = True,
                        backoff: tuple[float, float] = (2.0, 30.0), hang_grace: float = 10.0,
                        companion: Optional[Callable[[int], list[str]]] = None) -> int:
    """Run the SuperNode; restart it when it stops (coordinator restarted, network lost) until
    Ctrl-C / SIGTERM. Returns the exit code (130 when interrupted); raises :class:`SuperNodeRejected`
    when the coordinator refuses the key before ever accepting it."""

    def _stop(signum: int, frame: Any) -> None:  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    delay = backoff[0]
    accepted_once = False
    state = _RunState()
    try:
        while True:
            started = time.monotonic()
            code, out = _run_once(cmd, env, hang_grace, companion, state)
            accepted_once = accepted_once or out.accepted.is_set()
            if out.rejected.is_set() and not accepted_once:
                raise SuperNodeRejected("the coordinator refused this site's key")
            if not restart:
                return int(code or 0)
            if time.monotonic() - started > 60:
                delay = backoff[0]
            if state.waiting:  # after a finished run: said once already (RUN_FINISHED_LINE)
                logger.debug("Waiting for the next run: SuperNode restarted in %.0f s.", delay)
            else:
                logger.warning("The SuperNode stopped (exit code %s): the coordinator may be restarting or "
                               "unreachable. Reconnecting in %.0f s (Ctrl-C to quit).", code, delay)
            time.sleep(delay)
            delay = min(backoff[1], delay * 2)
    except KeyboardInterrupt:
        logger.info("Stopping the SuperNode.")
        return 130
