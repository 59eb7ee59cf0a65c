"""A private WAN on loopback for end-to-end tests and benchmarks (no tdamil import).

Every process of a federation runs inside a fresh network namespace (``ip netns``) whose only
interface is its own loopback; nothing inside can reach another address, and the namespace is
deleted when the harness closes. Each site reaches the coordinator through its own link:

* **delay**: a userspace TCP relay (``python wan_harness.py relay``, started inside the namespace)
  listens on the site's port and forwards to the coordinator's fleet port, holding every chunk
  for half the round-trip time in each direction (this kernel has no netem);
* **rate**: an htb class per site and direction on the namespace's loopback (MTU set to 1500),
  matched by the relay's port (uploads: destination port; downloads: source port);
* **loss**: a classic-BPF ``cls_bpf`` filter (``ld rand``; no compiler needed) sends that
  fraction of the link's TCP segments to a class whose queue holds nothing (``pfifo limit 0``), so
  they are dropped (this kernel has no ``act_gact`` for ``action drop``);
* **cuts**: the relay stops forwarding and, once its small buffer is full, stops reading, so the
  sender's TCP stalls as on a dead line; when the cut ends the data flows on. A cut can be armed
  to start after a given number of uploaded bytes ("mid-upload").

The relay is steered through a JSON control file and reports its byte counts, its cuts and its
request -> answer turns (data flowing down after data flowed up on one connection: the round trips
the protocol waits for) in a JSON status file; each turn is also logged with its request's path
when the line carries plaintext HTTP (``--insecure`` runs; ``-`` under TLS), so a benchmark can
tell a message's own requests from idle polls and heartbeats (the test process stays outside the namespace). Root (or CAP_NET_ADMIN) is needed:
:func:`namespaces_allowed` says why not where it is missing.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["namespaces_allowed", "Wan", "Link", "LinkSpec", "loss_bytecode"]

HOLD_BYTES = 256 * 1024  # what a cut relay buffers per direction before it stops reading


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def namespaces_allowed() -> str | None:
    """None when a network namespace can be made here, else why not (a skip reason)."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "the ip and tc commands (iproute2) are not installed"
    name = f"tdwan-probe-{os.getpid()}"
    res = _run("ip", "netns", "add", name)
    if res.returncode != 0:
        return f"`ip netns add` is not allowed here ({res.stderr.strip() or res.returncode}); run as root"
    _run("ip", "netns", "del", name)
    return None


def loss_bytecode(port: int, loss: float) -> str:
    """Classic BPF for ``tc filter ... bpf bytecode``: match (the packet goes to the dropping class) a
    ``loss`` fraction of the TCP segments from or to ``port`` (L2 header of 14 bytes on lo)."""
    threshold = min(0xFFFFFFFF, round((1.0 - loss) * 2**32))
    prog = [
        (0x30, 0, 0, 23),           # ldb [23]: IP protocol
        (0x15, 0, 8, 6),            # TCP, else no match
        (0xB1, 0, 0, 14),           # x = IP header length
        (0x48, 0, 0, 14),           # ldh [x+14]: source port
        (0x15, 2, 0, port),
        (0x48, 0, 0, 16),           # ldh [x+16]: destination port
        (0x15, 0, 3, port),
        (0x20, 0, 0, 0xFFFFF038),   # ld rand (SKF_AD_OFF + SKF_AD_RANDOM)
        (0x35, 0, 1, threshold),    # rand >= threshold: drop
        (0x06, 0, 0, 0xFFFFFFFF),
        (0x06, 0, 0, 0),
    ]
    return f"{len(prog)}," + ",".join(f"{c} {t} {f} {k}" for c, t, f, k in prog)


@dataclass
class LinkSpec:
    """One site's line: round-trip time, rate each way (None: unshaped) and loss fraction."""

    rtt_ms: float = 0.0
    rate_mbit: float | None = None
    loss: float = 0.0


@dataclass
class Link:
    """A site's relay: ``port`` is what the site dials instead of the coordinator."""

    name: str
    port: int
    spec: LinkSpec
    control: Path
    status_path: Path
    proc: subprocess.Popen | None = None
    _arms: int = 0

    def _control(self, **values) -> None:
        current = json.loads(self.control.read_text()) if self.control.exists() else {}
        current.update(values)
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(json.dumps(current))
        os.replace(tmp, self.control)

    def cut(self, seconds: float) -> None:
        """Cut the line now for ``seconds``."""
        self._control(cut_until=time.time() + seconds)

    def cut_after_upload(self, nbytes: int, seconds: float) -> None:
        """Cut the line for ``seconds`` once ``nbytes`` more have been uploaded through it."""
        self._arms += 1
        self._control(arm={"id": self._arms, "after_up_bytes": int(nbytes), "seconds": float(seconds)})

    def turn_times(self) -> list[float]:
        """When each request -> answer turn on this line happened (``time.time()``)."""
        return [t for t, _ in self.turns()]

    def turns(self) -> list[tuple[float, str]]:
        """Each request -> answer turn on this line: when (``time.time()``) and the request's path
        (``-`` where the line is TLS or the request did not start a chunk)."""
        path = self.status_path.with_name("turns.log")
        rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
        return [(float(r[0]), r[1] if len(r) > 1 else "-") for r in rows if r]

    def status(self) -> dict:
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}


@dataclass
class Wan:
    """A network namespace holding the federation and one shaped link per site.

    ``exec_prefix`` runs a command inside; :meth:`link` adds a site's line to ``target_port``
    (the coordinator's fleet port); :meth:`close` stops the relays and deletes the namespace.
    """

    workdir: Path
    name: str = field(default_factory=lambda: f"tdwan-{uuid.uuid4().hex[:8]}")
    links: dict[str, Link] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._check(_run("ip", "netns", "add", self.name))
        self._check(self.ns("ip", "link", "set", "lo", "mtu", "1500"))
        self._check(self.ns("ip", "link", "set", "lo", "up"))
        self._check(self.ns("tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "999"))
        self._check(self.ns("tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:999", "htb",
                            "rate", "20gbit"))

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def ns(self, *cmd: str) -> subprocess.CompletedProcess:
        return _run(*self.exec_prefix, *cmd)

    @staticmethod
    def _check(res: subprocess.CompletedProcess) -> None:
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(res.args)}: {res.stderr.strip()}")

    def link(self, site: str, port: int, target_port: int, spec: LinkSpec) -> Link:
        k = len(self.links) + 1
        folder = self.workdir / f"link_{site}"
        folder.mkdir(exist_ok=True)
        link = Link(site, port, spec, folder / "control.json", folder / "status.json")
        for stale in (link.control, link.status_path, link.status_path.with_name("turns.log")):
            stale.unlink(missing_ok=True)
        if spec.rate_mbit is not None:
            for match, cls in (("dport", 10 * k), ("sport", 10 * k + 1)):
                rate = f"{spec.rate_mbit}mbit"
                self._check(self.ns("tc", "class", "add", "dev", "lo", "parent", "1:", "classid", f"1:{cls}", "htb",
                                    "rate", rate, "ceil", rate))
                self._check(self.ns("tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio",
                                    "2", "u32", "match", "ip", match, str(port), "0xffff", "flowid", f"1:{cls}"))
        if spec.loss > 0:  # matched segments go to a class whose queue holds nothing: dropped
            cls = 10 * k + 5
            self._check(self.ns("tc", "class", "add", "dev", "lo", "parent", "1:", "classid", f"1:{cls}", "htb",
                                "rate", "20gbit"))
            self._check(self.ns("tc", "qdisc", "add", "dev", "lo", "parent", f"1:{cls}", "handle", f"{cls}:",
                                "pfifo", "limit", "0"))
            self._check(self.ns("tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1",
                                "bpf", "bytecode", loss_bytecode(port, spec.loss), "classid", f"1:{cls}"))
        log = open(folder / "relay.log", "w")  # noqa: SIM115 - kept open by the child
        link.proc = subprocess.Popen(
            [*self.exec_prefix, sys.executable, str(Path(__file__).resolve()), "relay", "--listen", str(port),
             "--target", str(target_port), "--rtt-ms", str(spec.rtt_ms), "--control", str(link.control),
             "--status", str(link.status_path)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.links[site] = link
        deadline = time.monotonic() + 20
        while not link.status() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not link.status():
            raise RuntimeError(f"the relay for {site} did not start: {(folder / 'relay.log').read_text()[-2000:]}")
        return link

    def close(self) -> None:
        for link in self.links.values():
            if link.proc is not None and link.proc.poll() is None:
                os.killpg(link.proc.pid, 15)
                try:
                    link.proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(link.proc.pid, 9)
        _run("ip", "netns", "del", self.name)


# ------------------------------------------------------------------------------------------------
# The relay (runs inside the namespace)
def _request_path(data: bytes) -> str:
    """The path of a plaintext HTTP request that starts ``data`` ("POST /api/v0/fleet/x HTTP/1.1"),
    else ``-`` (TLS, or a request split so that its first chunk holds no request line)."""
    line = data.split(b"\r\n", 1)[0].split(b" ")
    if len(line) == 3 and line[0].isalpha() and line[0].isupper() and line[2].startswith(b"HTTP/"):
        return line[1].decode("ascii", "replace").replace(" ", "%20") or "-"
    return "-"


class _Relay:
    def __init__(self, target: int, rtt_ms: float, control: Path, status: Path) -> None:
        self.target = target
        self.delay = rtt_ms / 2000.0
        self.control, self.status = control, status
        self.lock = threading.Condition()
        self.cut_until = 0.0
        self.up = self.down = self.connections = 0
        self.turns = 0  # request -> answer turns: downstream data after upstream data on one connection
        self.turn_times: list[tuple[float, str]] = []  # when each turn happened, its request path (turns.log)
        self.cuts: list[list[float]] = []
        self.armed: dict | None = None
        self.arm_seen = 0

    def cut_now(self) -> bool:
        return time.time() < self.cut_until

    def pump(self, src: socket.socket, dst: socket.socket, upward: bool, last: list[str]) -> None:
        queue: collections.deque = collections.deque()
        held = [0]

        def reader() -> None:
            try:
                while True:
                    with self.lock:
                        while held[0] >= HOLD_BYTES and self.cut_now():
                            self.lock.wait(0.05)
                    data = src.recv(65536)
                    with self.lock:
                        queue.append((time.monotonic() + self.delay, data))
                        held[0] += len(data)
                        self.lock.notify_all()
                    if not data:
                        return
            except OSError:
                with self.lock:
                    queue.append((0.0, b""))
                    self.lock.notify_all()

        threading.Thread(target=reader, daemon=True).start()
        try:
            while True:
                with self.lock:
                    while not queue or self.cut_now() or queue[0][0] > time.monotonic():
                        wait = 0.05 if not queue or self.cut_now() else queue[0][0] - time.monotonic()
                        self.lock.wait(max(wait, 0.0005))
                    _, data = queue.popleft()
                    held[0] -= len(data)
                if not data:
                    break
                dst.sendall(data)
                with self.lock:
                    if upward:
                        self.up += len(data)
                        self._maybe_cut()
                        if last[0] != "up":  # a new request on this connection
                            last[1] = _request_path(data)
                    else:
                        self.down += len(data)
                        if last[0] == "up":
                            self.turns += 1
                            self.turn_times.append((time.time(), last[1]))
                    last[0] = "up" if upward else "down"
                    self.lock.notify_all()
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _maybe_cut(self) -> None:
        if self.armed is not None and self.up - self.armed["base"] >= self.armed["after_up_bytes"]:
            self.cut_until = time.time() + self.armed["seconds"]
            self.cuts.append([time.time(), self.cut_until])
            self.armed = None

    def handle(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self.lock:
            self.connections += 1
        last = ["", "-"]  # the direction data last flowed on this connection, and its request's path
        threading.Thread(target=self.pump, args=(client, upstream, True, last), daemon=True).start()
        threading.Thread(target=self.pump, args=(upstream, client, False, last), daemon=True).start()

    def watch(self) -> None:
        while True:
            try:
                ctl = json.loads(self.control.read_text()) if self.control.exists() else {}
            except (OSError, ValueError):
                ctl = {}
            with self.lock:
                if float(ctl.get("cut_until", 0)) > self.cut_until:
                    self.cut_until = float(ctl["cut_until"])
                    self.cuts.append([time.time(), self.cut_until])
                arm = ctl.get("arm")
                if arm and int(arm["id"]) > self.arm_seen:
                    self.arm_seen = int(arm["id"])
                    self.armed = {**arm, "base": self.up}
                state = {"up": self.up, "down": self.down, "connections": self.connections, "turns": self.turns,
                         "cuts": self.cuts,
                         "armed": self.armed is not None, "cut": self.cut_now()}
                self.lock.notify_all()
                times, self.turn_times = self.turn_times, []
            if times:
                with open(self.status.with_name("turns.log"), "a", encoding="ascii") as fh:
                    fh.write("".join(f"{t:.3f} {path}\n" for t, path in times))
            tmp = self.status.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.status)
            time.sleep(0.05)


def relay_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="wan_harness.py relay")
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--target", type=int, required=True)
    ap.add_argument("--rtt-ms", type=float, default=0.0)
    ap.add_argument("--control", type=Path, required=True)
    ap.add_argument("--status", type=Path, required=True)
    ap.add_argument("--max-seconds", type=float, default=3600.0)  # never outlives a test by long
    args = ap.parse_args(argv)
    relay = _Relay(args.target, args.rtt_ms, args.control, args.status)
    server = socket.create_server(("127.0.0.1", args.listen), backlog=64)
    threading.Thread(target=relay.watch, daemon=True).start()
    threading.Timer(args.max_seconds, lambda: os._exit(0)).start()
    while True:
        client, _ = server.accept()
        relay.handle(client)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "relay":
        relay_main(sys.argv[2:])
    else:
        sys.exit("usage: wan_harness.py relay --listen PORT --target PORT [--rtt-ms MS] --control F --status F")
