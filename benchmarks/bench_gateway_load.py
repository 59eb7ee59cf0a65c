"""The Fleet gateway (server/gateway.py) under load, on 127.0.0.1: slow clients, large unauthenticated
bodies and header floods, with a legitimate Fleet call timed meanwhile.

    python benchmarks/bench_gateway_load.py                      # this tree's gateway and the one of --before
    python benchmarks/bench_gateway_load.py --before e9dd7eb --slow 1000 --out benchmarks/results/gateway_load.json
    python benchmarks/bench_gateway_load.py --federation --rounds 3   # a real coordinator and site, under attack

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
from datetime import datetime
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


def rss_mib(pid: int) -> Optional[float]:
    """VmRSS of ``pid`` in MiB (Linux /proc); None once the process has ended."""
    try:
        match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every 50 ms; ``peak`` in MiB."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05) and (rss := rss_mib(self.pid)) is not None:
            self.peak = max(self.peak, rss)


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
    """One slow connection; ``held_s`` counts from the moment the gateway's limit can start at the
    earliest: the connect call (headers kind), or the complete headers written (body and expect
    kinds). With 1,000 of them in one client loop on a busy machine, the headers can leave seconds
    after the connect, and that wait is the client's, not the gateway's."""
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
        nonlocal start
        writer.write(first)
        await writer.drain()
        if kind != "headers":
            start = time.monotonic()
        for i in range(len(trickle) if kind != "expect" else 0):
            await asyncio.sleep(drip)
            writer.write(trickle[i:i + 1])

    dripper, data = asyncio.ensure_future(dripping()), b""
    try:
        async with asyncio.timeout(give_up):
            while chunk := await reader.read(65536):
                data += chunk
        out["held_s"] = time.monotonic() - start
    except TimeoutError:  # before OSError: TimeoutError is one
        out["held_s"] = None  # still open when we gave up
    except OSError:  # reset by the gateway
        out["held_s"] = time.monotonic() - start
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
        "rss_before_mib": _round(before), "rss_peak_mib": round(sampler.peak, 1), "rss_after_mib": _round(rss_mib(pid)),
        "legit_calls": len(legit), "legit_ok": sum(s == 200 and b == b"upstream-ok" for s, b, _ in legit),
        "legit_statuses": sorted({s for s, _, _ in legit}),
        "legit_latency_s": _spread([t for s, _, t in legit]),
    }


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 1)


def _spread(values: list) -> Optional[dict]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3), "n": len(values)}


def many_headers(port: int, n: int = 10_000) -> dict:
    """One legitimate call with ``n`` extra header lines: status and seconds to the answer."""
    status, _, seconds = post(port, headers=b"".join(b"x-h%d: v\r\n" % i for i in range(n)))
    return {"headers": n, "status": status, "seconds": round(seconds, 3)}


def start_gateway(script: Path, upstream: int, log: Path, *flags: str,
                  nofile: Optional[tuple[int, int]] = None) -> tuple[subprocess.Popen, int]:
    """``script`` (a gateway.py) on a free port of 127.0.0.1, under the open-file limit ``nofile`` (soft, hard)."""
    import resource
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1", FLWR_TELEMETRY_ENABLED="0")
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, str(script), "--listen", f"127.0.0.1:{port}", "--upstream",
                                 f"http://127.0.0.1:{upstream}", *flags], stdout=fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, preexec_fn=limit if nofile else None)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.2)


def _gateway_pid(root_pid: int) -> int:
    """The fleet gateway process under ``flwr-server`` (Linux /proc)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
            stat = (cmdline.parent / "stat").read_text()
        except OSError:
            continue
        if b"tdamil.server.gateway" in args and int(stat.rpartition(")")[2].split()[1]) == root_pid:
            return int(cmdline.parent.name)
    raise LookupError("no gateway process under flwr-server")


def federation(args: argparse.Namespace, tmp: Path, under_attack: bool) -> dict:
    """A real coordinator (``flwr-server``, plaintext) and one real site run ``--rounds`` rounds of the
    demo task; with ``under_attack``, attack waves (as :func:`attack`) hit the public port until the run ends."""
    sys.path.insert(0, str(REPO))
    from tdamil.federation.demo import write_demo_federation
    from tdamil.federation.processes import ManagedProcess, flower_env
    from tdamil.net import free_port

    root = tmp / ("attacked" if under_attack else "quiet")
    fleet = free_port()
    paths = write_demo_federation(
        root, num_sites=1, train_bags=8, val_bags=4, test_bags=4, heldout_bags=10,
        model={"name": "tdamil", "dim": 16, "depth": 1, "num_heads": 2},
        federation={"rounds": args.rounds, "min_sites": 1, "min_replies": 1, "round_timeout_s": 300,
                    "wait_for_sites_s": 300, "evaluate_sites": False},
        superlink=f"127.0.0.1:{fleet}", internal_port=free_port(), runtime_ports=[free_port()], secure=False)
    env, py, audit = flower_env(threads=1), sys.executable, root / "run" / "audit.jsonl"
    server = ManagedProcess("flwr-server", [py, "-m", "tdamil.server.coordinator", "--config", str(paths["server"]),
                                            "--insecure"], root / "logs" / "server.log", env=env)
    procs, waves, start = [server], [], time.monotonic()
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", fleet), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() - start < 300, server.tail(30)
                time.sleep(0.5)
        gateway = _gateway_pid(server.pid)
        procs.append(ManagedProcess("site_a", [py, "-m", "tdamil.client.site", "--config", str(paths["site_a"]),
                                               "--insecure", "--state-dir", str(root / "state")],
                                    root / "logs" / "site_a.log", env=env))
        while server.poll() is None and rss_mib(gateway) is not None and time.monotonic() - start < 900:
            if under_attack:
                waves.append(attack(fleet, gateway, slow=args.slow, per_address=args.per_address, drip=args.drip,
                                    give_up=args.give_up, bodies=args.bodies, body_mib=args.body_mib,
                                    body_rate=args.body_rate))
            else:
                time.sleep(1)
        events = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
    finally:
        for proc in reversed(procs):
            proc.stop()
    stamp = {(e["event"], e.get("round")): datetime.fromisoformat(e["time"]) for e in events}
    rounds = [e["round"] for e in events if e["event"] == "aggregated"]
    log = next(root.rglob("gateway.log")).read_text().splitlines()
    return {"exit_code": server.poll(), "seconds": round(time.monotonic() - start, 1),
            "rounds_aggregated": rounds, "sites_per_round": [e["sites"] for e in events if e["event"] == "aggregated"],
            "round_seconds": [round((stamp["aggregated", r] - stamp["round_started", r]).total_seconds(), 2)
                              for r in rounds if ("round_started", r) in stamp],
            "finished": any(e["event"] == "run_finished" for e in events),
            "gateway_log_lines": len(log), "gateway_refusal_lines": sum(" Refused " in ln for ln in log),
            "attack_waves": waves}


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
    p.add_argument("--nofile", default=None, help="SOFT:HARD open-file limit of the gateway processes (systemd's "
                   "default is 1024:524288)")
    p.add_argument("--federation", action="store_true",
                   help="instead: a real coordinator and site run --rounds rounds, quiet and then under attack")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of client sockets
    tmp = Path(tempfile.mkdtemp(prefix="gateway_load_"))
    if args.federation:
        figures = {"quiet": federation(args, tmp, False), "attacked": federation(args, tmp, True)}
        print(json.dumps(figures, indent=1), flush=True)
        if args.out:
            args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **figures}, indent=1))
        return 0
    variants = {"after": REPO / "server" / "gateway.py"}
    if args.before:
        old = tmp / "gateway_before.py"
        old.write_bytes(subprocess.run(["git", "show", f"{args.before}:server/gateway.py"], cwd=REPO,
                                       capture_output=True, check=True).stdout)
        variants = {"before": old, **variants}
    figures = {}
    for name, script in variants.items():
        sink = Sink()
        nofile = tuple(int(x) for x in args.nofile.split(":")) if args.nofile else None
        proc, port = start_gateway(script, sink.port, tmp / f"{name}.log", nofile=nofile)
        try:
            time.sleep(1.0)
            figures[name] = attack(port, proc.pid, slow=args.slow, per_address=args.per_address, drip=args.drip,
                                   give_up=args.give_up, bodies=args.bodies, body_mib=args.body_mib,
                                   body_rate=args.body_rate)
            figures[name]["many_headers"] = many_headers(port)
            log = (tmp / f"{name}.log").read_text().splitlines()
            figures[name].update(log_lines=len(log), log_refusal_lines=sum(" Refused " in ln for ln in log))
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
