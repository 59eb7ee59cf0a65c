"""Network addresses: the one ``host:port`` parser, a free loopback port, and waiting for a listener.

Below every layer that opens sockets (security preflight, node-key registration, Flower processes,
the simulation's Ray address), so none of them imports another for it.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Optional

__all__ = ["split_host_port", "free_port", "wait_for_port"]


def split_host_port(address: str, what: str = "address") -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); the one parser for every address setting.

    Raises ValueError naming ``what`` (the setting) and an example.
    """
    host, sep, port = str(address).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must be host:port with a port 1-65535 (e.g. coordinator.example.org:9092), "
                         f"got {address!r}")
    return host, int(port)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 30.0, proc: Optional[Any] = None) -> None:
    """Block until ``host:port`` accepts connections (or raise TimeoutError / RuntimeError).

    A wildcard bind address (``0.0.0.0``, ``::``) is probed on loopback. ``proc`` (a
    :class:`tdamil.federation.processes.ManagedProcess`) ends the wait early when it exits.
    """
    target = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    deadline = time.monotonic() + timeout
    last: Optional[OSError] = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with code {proc.poll()} before listening on {host}:{port}; "
                               f"see {proc.log_path}: {' | '.join(proc.tail(5).splitlines())}")
        try:
            with socket.create_connection((target, port), timeout=1.0):
                return
        except OSError as exc:
            last = exc
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s ({last})")
