"""The Fleet gateway (server/gateway.py) under load, on 127.0.0.1: slow clients, large unauthenticated
bodies and header floods, with a legitimate Fleet call timed meanwhile.

    python benchmarks/bench_gateway_load.py                      # this tree's gateway and the one of --before
    python benchmarks/bench_gateway_load.py --before e9dd7eb --slow 1000 --out benchmarks/results/gateway_load.json

Each gateway runs as its own process (``python <file> --listen ... --upstream ...``) in front of a
stand-in upstream (:class:`Sink`: reads each body in 64 KiB pieces and drops it, answers 200
``upstream-ok``), not a SuperLink. One attack per gateway: ``--slow`` connections from 127.0.0.2
upwards (``--per-address`` each) in three kinds, a third each: request headers trickled one byte
per ``--drip`` s, a body trickled likewise after complete headers, and ``Expect: 100-continue``
with no body ever; at the same time ``--bodies`` bodies of ``--body-mib`` MiB without any
authentication header, paced at ``--body-rate`` MiB/s each. While they are held, a legitimate
``POST /v1/fleet/get-run`` every 0.5 s. Measured: how long the slow connections stayed open (a
connection still open after ``--give-up`` s counts as held), the gateway's VmRSS peak and after the
bodies ended, the legitimate calls' answers and latency, and one request with 10,000 headers.
The test (tests/test_gateway_load.py) drives the same pieces.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
KINDS = ("headers", "body", "expect")
_HEAD = b"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: coordinator\r\nContent-Type: application/protobuf\r\n"


class Sink:
    """A stand-in SuperLink on 127.0.0.1: reads each body and drops it, answers 200 ``upstream-ok``;
    counts requests and bytes per path."""

    def __init__(self) -> None:
        calls = self.calls = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                left, size = int(self.headers.get("content-length", 0)), 0
                while left:
                    piece = self.rfile.read(min(left, 65536))
                    if not piece:
                        break
                    left, size = left - len(piece), size + len(piece)
                calls.append((self.path, size))
                self.send_response(200)
                self.send_header("content-length", "11")
                self.end_headers()
                self.wfile.write(b"upstream-ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` in MiB (Linux /proc)."""
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else 0.0


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every 50 ms; ``peak`` in MiB."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                self.peak = max(self.peak, rss_mib(self.pid))
            except OSError:
                return


def post(port: int, path: str = "/v1/fleet/get-run", headers: bytes = b"", body: bytes = b"\x08\x01",
         source: str = "127.0.0.1", timeout: float = 30) -> tuple[int, bytes, float]:
    """One request with ``Connection: close``: (status, body, seconds to the whole answer); status 0: none."""
    start = time.monotonic()
    data = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as sock:
            sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: coordinator\r\n" + headers +
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        pass
    head, _, answer = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return (int(match.group(1)) if match else 0), answer, time.monotonic() - start


async def _slow_one(port: int, kind: str, source: str, drip: float, give_up: float, out: dict) -> None:
    start = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except OSError as exc:
        out.update(kind=kind, error=type(exc).__name__)
        return
    first = {"headers": _HEAD,
             "body": _HEAD + b"Content-Length: 100000\r\n\r\n",
             "expect": _HEAD + b"Content-Length: 100000\r\nExpect: 100-continue\r\n\r\n"}[kind]
    trickle = b"x-slow: " + b"a" * 100000 if kind == "headers" else b"\x00" * 100000

    async def dripping() -> None:
        writer.write(first)
        for i in range(len(trickle) if kind != "expect" else 0):
            await asyncio.sleep(drip)
            writer.write(trickle[i:i + 1])

    dripper, data = asyncio.ensure_future(dripping()), b""
    try:
        async with asyncio.timeout(give_up):
            while chunk := await reader.read(65536):
                data += chunk
        out["held_s"] = time.monotonic() - start
    except OSError:  # reset by the gateway
        out["held_s"] = time.monotonic() - start
    except TimeoutError:
        out["held_s"] = None  # still open when we gave up
    dripper.cancel()
    writer.close()
    statuses = re.findall(rb"HTTP/1\.[01] (\d{3})", data)
    out.update(kind=kind, statuses=[int(s) for s in statuses])


def slow_clients(port: int, n: int, per_address: int, drip: float, give_up: float) -> list[dict]:
    """``n`` slow connections (kinds in turn), ``per_address`` from each of 127.0.0.2, 127.0.0.3, ...;
    returns one dict per connection once each was closed or ``give_up`` s passed:
    kind, held_s (None: still open at give_up), statuses (the answers' status codes)."""
    results: list[dict] = [{} for _ in range(n)]

    async def all_of_them() -> None:
        await asyncio.gather(*(_slow_one(port, KINDS[i % 3], f"127.0.0.{2 + i // per_address}", drip, give_up,
                                         results[i]) for i in range(n)))

    asyncio.run(all_of_them())
    return results


def big_body(port: int, size: int, rate: float, source: str, out: dict) -> None:
    """One body of ``size`` bytes with no authentication header, paced at ``rate`` bytes/s."""
    start = time.monotonic()
    sent, piece = 0, b"\x00" * MiB
    data = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=120, source_address=(source, 0)) as sock:
            sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: coordinator\r\n"
                         b"Content-Type: application/protobuf\r\nContent-Length: %d\r\n\r\n" % size)
            try:
                while sent < size:
                    sock.sendall(piece[:min(MiB, size - sent)])
                    sent += min(MiB, size - sent)
                    time.sleep(max(0.0, start + sent / rate - time.monotonic()))
            except OSError:  # refused mid-body: the answer may still be readable
                pass
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        pass
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    out.update(status=int(match.group(1)) if match else 0, sent_mib=sent / MiB, seconds=time.monotonic() - start)


def attack(port: int, pid: int, slow: int = 200, per_address: int = 25, drip: float = 1.0, give_up: float = 40.0,
           bodies: int = 4, body_mib: int = 63, body_rate: float = 16.0, legit_every: float = 0.5) -> dict:
    """Slow connections, large bodies and legitimate calls at once against the gateway on ``port``
    (process ``pid``); returns the figures (see the module docstring)."""
    sampler = RssSampler(pid)
    before = rss_mib(pid)
    sampler.start()
    slow_out: list[dict] = []
    body_out: list[dict] = [{} for _ in range(bodies)]
    threads = [threading.Thread(target=lambda: slow_out.extend(slow_clients(port, slow, per_address, drip, give_up)))]
    threads += [threading.Thread(target=big_body, args=(port, body_mib * MiB, body_rate * MiB, "127.0.0.250",
                                                        body_out[i])) for i in range(bodies)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the slow connections are open
    legit = []
    while threads[0].is_alive() or any(t.is_alive() for t in threads[1:]):
        legit.append(post(port))
        time.sleep(legit_every)
    for t in threads:
        t.join()
    time.sleep(1.0)
    sampler.stop.set()
    held = [r.get("held_s") for r in slow_out]
    closed = [h for h in held if h is not None]
    return {
        "slow": slow, "slow_opened": sum("error" not in r for r in slow_out),
        "slow_still_open_at_give_up": sum(h is None and "error" not in r for h, r in zip(held, slow_out)),
        "slow_held_s": {k: _spread([r.get("held_s") for r in slow_out if r.get("kind") == k and r.get("held_s")])
                        for k in KINDS},
        "slow_answers": sorted({s for r in slow_out for s in r.get("statuses", [])}),
        "slow_closed_max_s": max(closed) if closed else None,
        "bodies": [{k: round(v, 2) if isinstance(v, float) else v for k, v in b.items()} for b in body_out],
        "rss_before_mib": round(before, 1), "rss_peak_mib": round(sampler.peak, 1),
        "rss_after_mib": round(rss_mib(pid), 1),
        "legit_calls": len(legit), "legit_ok": sum(s == 200 and b == b"upstream-ok" for s, b, _ in legit),
        "legit_latency_s": _spread([t for s, _, t in legit]),
    }


def _spread(values: list) -> Optional[dict]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3), "n": len(values)}


def many_headers(port: int, n: int = 10_000) -> dict:
    """One legitimate call with ``n`` extra header lines: status and seconds to the answer."""
    status, _, seconds = post(port, headers=b"".join(b"x-h%d: v\r\n" % i for i in range(n)))
    return {"headers": n, "status": status, "seconds": round(seconds, 3)}


def start_gateway(script: Path, upstream: int, log: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1", FLWR_TELEMETRY_ENABLED="0")
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, str(script), "--listen", f"127.0.0.1:{port}", "--upstream",
                                 f"http://127.0.0.1:{upstream}", *flags], stdout=fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default="e9dd7eb", help="git revision of the gateway to compare ('' to skip)")
    p.add_argument("--slow", type=int, default=1000)
    p.add_argument("--per-address", type=int, default=25)
    p.add_argument("--drip", type=float, default=5.0, help="s between two trickled bytes")
    p.add_argument("--give-up", type=float, default=45.0)
    p.add_argument("--bodies", type=int, default=4)
    p.add_argument("--body-mib", type=int, default=63)
    p.add_argument("--body-rate", type=float, default=8.0, help="MiB/s per body")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of client sockets
    tmp = Path(tempfile.mkdtemp(prefix="gateway_load_"))
    variants = {"after": REPO / "server" / "gateway.py"}
    if args.before:
        old = tmp / "gateway_before.py"
        old.write_bytes(subprocess.run(["git", "show", f"{args.before}:server/gateway.py"], cwd=REPO,
                                       capture_output=True, check=True).stdout)
        variants = {"before": old, **variants}
    figures = {}
    for name, script in variants.items():
        sink = Sink()
        proc, port = start_gateway(script, sink.port, tmp / f"{name}.log")
        try:
            time.sleep(1.0)
            figures[name] = attack(port, proc.pid, slow=args.slow, per_address=args.per_address, drip=args.drip,
                                   give_up=args.give_up, bodies=args.bodies, body_mib=args.body_mib,
                                   body_rate=args.body_rate)
            figures[name]["many_headers"] = many_headers(port)
            figures[name]["log_lines"] = len((tmp / f"{name}.log").read_text().splitlines())
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            sink.close()
        print(name, json.dumps(figures[name], indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
