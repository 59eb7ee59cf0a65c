"""The coordinator's public port under attack: only the Fleet API may get through.

An attack list (dot segments, single and double percent-encoding, overlong UTF-8, raw non-ASCII
bytes, backslashes, ``//``, ``;`` parameters, mixed case, queries, absolute-form targets, Host
header tricks, HTTP/1.0, every method other than POST) is sent over raw sockets, so no client
library normalises anything, to:

* the path checker alone (a pure function, fast);
* a real ``flwr-server`` (SuperLink on loopback + fleet gateway), plaintext and TLS with registered
  site keys; judged by what the SuperLink did: its Control API on loopback lists the same nodes
  and runs, none stopped, no intruder key registered, no registered site removed; and every
  answer is the gateway's own refusal, not the SuperLink's;
* nginx with ``deploy/proxy/nginx.conf`` in front of the same SuperLink, where nginx is installed.

Afterwards a real site (``tdamil-client``) still joins through the same port and listens on
loopback only, and the coordinator's whole process tree listens on two ports: the public entry and
the SuperLink on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest
import yaml

from tdamil.net import free_port
from tdamil.security.certs import init_pki, issue_site, load_site_public_key
from tdamil.security.nodeauth import list_site_nodes
from tdamil.server.gateway import FLEET_PATHS, REFUSED_BODY, refusal
from federation_processes import stop_group

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
INVALID_BODY = b"Invalid HTTP request received."  # uvicorn's answer when h11 cannot parse a request


@dataclass(frozen=True)
class Attack:
    name: str
    target: str  # "{control}" stands for 127.0.0.1:<SuperLink port>; may hold raw bytes as \x escapes
    method: str = "POST"
    version: str = "HTTP/1.1"
    host: Optional[str] = None  # Host header; None: the public address, "": no Host header

    def target_bytes(self, control: str) -> bytes:
        return self.target.replace("{control}", control).encode("latin-1")


_T = "/v1/fleet/../control/list-runs"
ATTACKS = [
    Attack("dot segments to list-runs", _T),
    Attack("dot segments to register-node", "/v1/fleet/../control/register-node"),
    Attack("dot segments to stop-run", "/v1/fleet/../control/stop-run"),
    Attack("dot segments to unregister-node", "/v1/fleet/../control/unregister-node"),
    Attack("dot segments to list-nodes", "/v1/fleet/../control/list-nodes"),
    Attack("dot segments to the Runtime API", "/v1/fleet/../runtime/get-nodes"),
    Attack("from a Fleet call up two levels", "/v1/fleet/get-run/../../control/list-runs"),
    Attack("./../", "/v1/fleet/./../control/register-node"),
    Attack("%2e%2e", "/v1/fleet/%2e%2e/control/list-runs"),
    Attack("%2E%2E", "/v1/fleet/%2E%2E/control/register-node"),
    Attack(".%2e", "/v1/fleet/.%2e/control/list-runs"),
    Attack("%2e.", "/v1/fleet/%2e./control/register-node"),
    Attack("..%2f", "/v1/fleet/..%2fcontrol/list-runs"),
    Attack("..%2F", "/v1/fleet/..%2Fcontrol/register-node"),
    Attack("%2e%2e%2f", "/v1/fleet/%2e%2e%2fcontrol/stop-run"),
    Attack("%252e%252e (double encoding)", "/v1/fleet/%252e%252e/control/list-runs"),
    Attack("%252e%252e%252f (double encoding)", "/v1/fleet/%252e%252e%252fcontrol/register-node"),
    Attack("encoded Fleet path", "/v1/fleet/get%2drun"),
    Attack("backslashes", "/v1/fleet/..\\control\\list-runs"),
    Attack("..%5c", "/v1/fleet/..%5ccontrol/register-node"),
    Attack("overlong UTF-8 dots %c0%ae", "/v1/fleet/%c0%ae%c0%ae/control/list-runs"),
    Attack("overlong UTF-8 slash %c0%af", "/v1/fleet/..%c0%afcontrol/register-node"),
    Attack("raw overlong UTF-8 bytes", "/v1/fleet/\xc0\xae\xc0\xae/control/list-runs"),
    Attack("raw non-ASCII bytes", "/v1/fleet/\xe2\x80\xa5/control/register-node"),
    Attack("NUL byte %00", "/v1/fleet/get-run%00/../../control/list-runs"),
    Attack("';' parameter after ..", "/v1/fleet/..;/control/list-runs"),
    Attack("';' parameter on a Fleet call", "/v1/fleet/get-run;jsessionid=1"),
    Attack("double slash", "//v1/control/list-runs"),
    Attack("double slash inside", "/v1/fleet//../control/register-node"),
    Attack("trailing slash", "/v1/fleet/get-run/"),
    Attack("mixed case Fleet call", "/V1/Fleet/get-run"),
    Attack("mixed case Control API", "/v1/fleet/../CONTROL/list-runs"),
    Attack("query string with dots", "/v1/fleet/get-run?x=/../../control/list-runs"),
    Attack("query string on traversal", "/v1/fleet/../control/list-runs?"),
    Attack("fragment", "/v1/fleet/get-run#/../../control/list-runs"),
    Attack("plain Control API", "/v1/control/list-runs"),
    Attack("plain Control API register-node", "/v1/control/register-node"),
    Attack("plain Runtime API", "/v1/runtime/get-nodes"),
    Attack("/health", "/health"),
    Attack("/docs", "/docs"),
    Attack("/openapi.json", "/openapi.json"),
    Attack("absolute-form to the Control API", "http://{control}/v1/control/list-runs"),
    Attack("absolute-form with https", "https://{control}/v1/control/register-node"),
    Attack("absolute-form with traversal", "http://{control}/v1/fleet/../control/stop-run"),
    Attack("Host header of the SuperLink", "/v1/control/list-runs", host="{control}"),
    Attack("Host header and traversal", "/v1/fleet/../control/register-node", host="{control}"),
    Attack("HTTP/1.0 traversal", _T, version="HTTP/1.0", host=""),
    Attack("HTTP/1.0 Control API", "/v1/control/register-node", version="HTTP/1.0", host=""),
    Attack("HTTP/1.0 GET on a Fleet call", "/v1/fleet/get-run", method="GET", version="HTTP/1.0", host=""),
    Attack("OPTIONS *", "*", method="OPTIONS"),
    *(Attack(f"{m} on a Fleet call", "/v1/fleet/register-node", method=m)
      for m in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE")),
    Attack("GET on the Control API", "/v1/control/list-runs", method="GET"),
    Attack("lower-case post", "/v1/fleet/get-run", method="post"),
    Attack("CONNECT to the SuperLink", "{control}", method="CONNECT"),
]


def _split(raw: bytes) -> tuple[bytes, bytes]:
    """What an HTTP/1.1 server hands the application: the target before and after ``?``."""
    path, _, query = raw.partition(b"?")
    return path, query


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_path_checker_refuses_the_attack(attack):
    path, query = _split(attack.target_bytes("127.0.0.1:9093"))
    assert refusal(attack.method, path, query) is not None


def test_path_checker_allows_exactly_the_fleet_calls_by_post():
    assert len(ATTACKS) >= 30
    assert len(FLEET_PATHS) == 12 and all(p.startswith("/v1/fleet/") for p in FLEET_PATHS)
    for path in sorted(FLEET_PATHS):
        assert refusal("POST", path.encode()) is None
        assert refusal("POST", path.encode(), b"x=1") == "query string"
        assert refusal("POST", f"http://127.0.0.1:9093{path}".encode()) == "absolute-form or authority-form target"
        assert refusal("POST", path.upper().encode()) == "not a Fleet API call"
        for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "CONNECT", "post"):
            assert refusal(method, path.encode()) is not None
    assert refusal("POST", b"/v1/fleet/../control/list-runs") == "dot segment"
    assert refusal("POST", b"/v1/fleet/%2e%2e/control/list-runs") == "percent-encoding"
    assert refusal("POST", b"/v1/fleet/\xc0\xae/control") == "non-ASCII or control byte"


# ---- talking raw HTTP -----------------------------------------------------------------------------
def raw_request(attack: Attack, public: str, control: str, body: bytes) -> bytes:
    host = public if attack.host is None else attack.host.replace("{control}", control)
    lines = [f"{attack.method} ".encode() + attack.target_bytes(control) + f" {attack.version}".encode()]
    if host:
        lines.append(f"Host: {host}".encode())
    lines += [b"Content-Type: application/protobuf", b"Accept: application/protobuf", b"x-flwr-client: cli",
              b"Connection: close"]
    if attack.method not in ("GET", "HEAD", "TRACE", "OPTIONS", "CONNECT"):
        lines.append(f"Content-Length: {len(body)}".encode())
    else:
        body = b""
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def send_raw(port: int, request: bytes, ca: Optional[Path]) -> tuple[int, bytes]:
    """Send bytes as they are; return (status, body) of the answer (0 when none came)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    if ca is not None:
        sock = ssl.create_default_context(cafile=str(ca)).wrap_socket(sock, server_hostname="127.0.0.1")
    data = b""
    with sock:
        sock.sendall(request)
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return (int(match.group(1)) if match else 0), body


def attack_body(target: str, world: dict) -> bytes:
    """A request the Control API would act on, for the call the target aims at."""
    from flwr.proto.control_pb2 import ListNodesRequest, ListRunsRequest, RegisterNodeRequest, \
        StopRunRequest, UnregisterNodeRequest

    if "unregister-node" in target:
        return UnregisterNodeRequest(node_id=min(world["nodes"], default=1)).SerializeToString()
    if "register-node" in target:
        return RegisterNodeRequest(public_key=world["intruder_pem"], name="intruder").SerializeToString()
    if "stop-run" in target:
        return StopRunRequest(run_id=world["run_id"]).SerializeToString()
    if "list-nodes" in target:
        return ListNodesRequest().SerializeToString()
    return ListRunsRequest().SerializeToString()


# ---- the gateway process against a recording upstream ------------------------------------------------
class _Recorder:
    """A plain HTTP server on 127.0.0.1 that records each request line, headers and body."""

    def __init__(self):
        import http.server
        import threading

        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                seen.append((self.requestline, dict(self.headers), body))
                self.send_response(200)
                self.send_header("content-length", "11")
                self.end_headers()
                self.wfile.write(b"upstream-ok")

            do_GET = do_PUT = do_DELETE = do_POST  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def gateway_process(upstream: str, log: Path, *flags: str, **popen) -> Iterator[tuple[subprocess.Popen, int]]:
    """``python -m tdamil.server.gateway`` on a free port of 127.0.0.1 in front of ``upstream``
    (a URL), with ``flags``, its output in ``log``; yields (process, port) once it accepts; stopped after.
    ``popen``: more arguments for :class:`subprocess.Popen` (e.g. ``preexec_fn``)."""
    port = free_port()
    with open(log, "wb") as fh:
        gateway = subprocess.Popen([sys.executable, "-m", "tdamil.server.gateway", "--listen", f"127.0.0.1:{port}",
                                    "--upstream", upstream, *flags], stdout=fh, stderr=subprocess.STDOUT, env=_env(),
                                   start_new_session=True, **popen)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert gateway.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        yield gateway, port
    finally:
        stop_group(gateway)


def test_gateway_forwards_the_checked_path_to_its_upstream_and_nothing_else(tmp_path):
    upstream = _Recorder()
    log = tmp_path / "gateway.log"
    try:
        with gateway_process(f"http://127.0.0.1:{upstream.port}", log) as (_, port):
            legit = (b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: 127.0.0.1:1\r\nX-Forwarded-For: 203.0.113.9\r\n"
                     b"X-Forwarded-Host: evil.example.org\r\nflwr-public-key: QUJD\r\nContent-Length: 5\r\n"
                     b"Connection: close\r\n\r\nhello")
            assert send_raw(port, legit, None) == (200, b"upstream-ok")
            for attack in ATTACKS:
                request = raw_request(attack, f"127.0.0.1:{port}", f"127.0.0.1:{upstream.port}", b"x")
                status, body = send_raw(port, request, None)
                assert status in (400, 404) and (body in (REFUSED_BODY, b"") or body.startswith(INVALID_BODY)), \
                    (attack.name, status, body)
    finally:
        upstream.close()
    (line, headers, body) = upstream.seen[0]
    assert len(upstream.seen) == 1  # no attack reached the upstream
    assert line == "POST /v1/fleet/get-run HTTP/1.1" and body == b"hello"
    assert headers["Host"] == f"127.0.0.1:{upstream.port}"  # the client's Host never steers the upstream
    assert headers["x-forwarded-for"] == "127.0.0.1" and "X-Forwarded-Host" not in headers
    assert headers["flwr-public-key"] == "QUJD"  # SuperNode authentication headers pass unchanged
    text = log.read_text()
    assert "Refused GET /v1/fleet/register-node from 127.0.0.1: method 'GET' (POST only)." in text
    assert "Refused POST /v1/fleet/\\xc0\\xae\\xc0\\xae/control/list-runs" not in text  # h11 refuses raw bytes
    assert "Refused POST http://127.0.0.1:" in text and "absolute-form" in text


def test_gateway_answers_413_over_the_body_cap_and_503_without_superlink(monkeypatch):
    import asyncio

    import tdamil.server.gateway as gw

    async def call(body: bytes) -> list[dict]:
        app, sent = gw.FleetGateway(f"http://127.0.0.1:{free_port()}"), []
        messages = [{"type": "http.request", "body": body[:4], "more_body": True},
                    {"type": "http.request", "body": body[4:], "more_body": False}]

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "raw_path": b"/v1/fleet/push-object", "query_string": b"",
                 "headers": [(b"host", b"x")], "client": ("127.0.0.1", 5)}
        await app(scope, receive, send)
        await app.client.aclose()
        return sent

    monkeypatch.setattr(gw, "MAX_BODY", 6)
    assert asyncio.run(call(b"0123456789"))[0]["status"] == 413
    assert asyncio.run(call(b"012345"))[0]["status"] == 503  # forwarded; nothing listens upstream


@pytest.mark.parametrize("case", ["headers stamped 0.8 s before the app ran", "0.8 s waiting for the body budget"])
def test_a_body_clock_starts_at_its_complete_headers_plus_the_gateways_own_wait(case):
    """A body's limit (here 1 s until its first byte) counts from the headers' stamp that the
    connection layer puts in the scope, not from when a busy loop runs the app; time the gateway
    itself keeps the body waiting for its large-body budget does not count against the client."""
    import asyncio
    import time

    import tdamil.server.gateway as gw

    async def call() -> list[dict]:
        limits = gw.Limits(body_idle_timeout=1.0, large_body=10, large_body_budget=100)
        app, sent = gw.FleetGateway(f"http://127.0.0.1:{free_port()}", limits=limits), []
        stamp = time.monotonic()
        if case.startswith("headers"):
            stamp -= 0.8
        else:  # another large body holds the whole budget for 0.8 s
            assert await app.budget.acquire(100, 0.0)
            asyncio.get_running_loop().call_later(0.8, app.budget.release, 100)

        async def receive():  # the first body byte comes 0.5 s after the app asks for it
            await asyncio.sleep(0.5)
            return {"type": "http.request", "body": b"x" * 50, "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "raw_path": b"/v1/fleet/push-object", "query_string": b"",
                 "headers": [(b"host", b"x"), (b"content-length", b"50")], "client": ("127.0.0.1", 5),
                 "extensions": {gw.HEADERS_AT: stamp}}
        await app(scope, receive, send)
        await app.client.aclose()
        return sent

    status = asyncio.run(call())[0]["status"]
    if case.startswith("headers"):
        assert status == 408  # 0.8 s + 0.5 s since the headers: over the 1 s
    else:
        assert status == 503  # read in time (the wait was the gateway's), then forwarded; nothing listens upstream


# ---- the real coordinator ---------------------------------------------------------------------------
def _control(world: dict):
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.supercore.control import ControlHttpClient

    ca = world["ca"]
    return ControlHttpClient.from_server_address(
        world["control"], insecure=ca is None, root_certificates=None if ca is None else ca.read_bytes(),
        interceptors=[CliClientHttpInterceptor()])


def superlink_state(world: dict) -> tuple[dict, dict]:
    """What the SuperLink holds, read through its Control API on loopback:
    ({node_id: (name, public key)}, {run_id: (status, sub_status)})."""
    from flwr.proto.control_pb2 import ListRunsRequest

    nodes = list_site_nodes(world["control"], ca_cert=world["ca"], insecure=world["ca"] is None)
    client = _control(world)
    try:
        runs = client.ListRuns(ListRunsRequest()).run_dict
    finally:
        client.close()
    return ({i: (n.name, n.public_key_pem) for i, n in nodes.items()},
            {i: (r.status.status, r.status.sub_status) for i, r in runs.items()})


def _env() -> dict:
    # Flower's switches for its legacy gRPC servers on [::] are set too: flwr-server must drop them
    return dict(os.environ, FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                FLWR_INTERNAL_GRPC_CONTROL_API="1", FLWR_INTERNAL_GRPC_FLEET_API="1")


@pytest.fixture(scope="module")
def world(request, tmp_path_factory):
    """A real ``flwr-server`` waiting for its sites, with a submitted run: ``plaintext`` (--insecure)
    or ``tls`` (certificates, registered keys of site_a and site_b; an intruder's key unregistered)."""
    from cryptography.hazmat.primitives import serialization

    from tdamil.federation.demo import write_demo_federation

    mode = request.param
    root = tmp_path_factory.mktemp(f"gateway_{mode}")
    public, internal = free_port(), free_port()
    paths = write_demo_federation(
        root / "demo", num_sites=2, train_bags=4, val_bags=2, test_bags=2, heldout_bags=4,
        superlink=f"127.0.0.1:{public}", internal_port=internal, runtime_ports=[free_port(), free_port()],
        model={"name": "tdamil", "dim": 16, "depth": 1, "num_heads": 2},
        federation={"rounds": 1, "evaluate_sites": False, "wait_for_sites_s": 600, "round_timeout_s": 600})
    pki = root / "pki"
    init_pki(pki, ["coordinator.example.org"])
    intruder = issue_site("intruder", ca_cert=pki / "ca.pem", out=root / "intruder")  # key never registered
    intruder_pem = load_site_public_key(intruder.public_key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    world = {"mode": mode, "root": root, "public": public, "internal": internal, "control": f"127.0.0.1:{internal}",
             "ca": None, "pki": pki, "sites": {}, "intruder_pem": intruder_pem, "paths": paths}
    srv = yaml.safe_load(paths["server"].read_text())
    srv.pop("tls", None)
    srv["auth"] = {"enabled": False}
    args = ["--insecure"]
    if mode == "tls":
        srv["tls"] = {"ca_cert": str(pki / "ca.pem"), "cert": str(pki / "server.pem"), "key": str(pki / "server.key")}
        srv["auth"] = {"enabled": True, "site_public_keys": str(pki / "site_keys")}
        world["sites"] = {s: issue_site(s, pki=pki) for s in ("site_a", "site_b")}
        world["ca"] = pki / "ca.pem"
        args = []
    paths["server"].write_text(yaml.safe_dump(srv))
    log = root / "server.log"
    with open(log, "wb") as fh:
        server = subprocess.Popen([str(BIN / "flwr-server"), "-v", "--config", str(paths["server"]), *args], stdout=fh,
                                  stderr=subprocess.STDOUT, env=_env(), cwd=root, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        runs: dict = {}
        while not runs:
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no run submitted within 240 s:\n" + log.read_text()[-3000:]
            time.sleep(1)
            try:
                nodes, runs = superlink_state(world)
            except Exception:  # SuperLink not up yet
                runs = {}
        world["run_id"] = next(iter(runs))
        world["server_pid"] = server.pid
        world["nodes"] = nodes
        world["gateway_log"] = next(root.rglob("gateway.log"))
        yield world
    finally:
        stop_group(server)


def _judge(world: dict, answers: dict[str, tuple[int, bytes]], before: tuple[dict, dict], own_body: bool) -> None:
    after = superlink_state(world)
    assert after[0] == before[0], "the SuperLink's nodes changed"  # no intruder added, no site removed
    # none started or stopped; a submitted run may move on from "starting" to "running" by itself
    assert after[1].keys() == before[1].keys(), "the SuperLink's runs changed"
    progress = {"pending": 0, "starting": 1, "running": 2}
    for run_id, (status, sub_status) in after[1].items():
        was = before[1][run_id][0]
        assert status in progress and progress[status] >= progress.get(was, 0) and not sub_status, \
            (run_id, was, status, sub_status)
    assert not any(world["intruder_pem"].strip() in pem.encode() for _, pem in after[0].values())
    assert all(status != "finished" for status, _ in after[1].values())
    for name, (status, body) in answers.items():
        assert status in (400, 403, 404, 405), (name, status, body[:300])
        assert b'"detail"' not in body and b"run_id" not in body, (name, body[:300])  # not the SuperLink's
        if own_body:  # the gateway refused it itself (or h11 refused to parse it)
            assert body in (REFUSED_BODY, b"") or body.startswith(INVALID_BODY), (name, status, body[:300])


def run_attacks(world: dict, port: int) -> dict[str, tuple[int, bytes]]:
    public = f"127.0.0.1:{port}"
    return {a.name: send_raw(port, raw_request(a, public, world["control"], attack_body(a.target, world)),
                             world["ca"])
            for a in ATTACKS}


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("world", ["plaintext", "tls"], indirect=True)
def test_attack_list_reaches_no_api_but_the_fleet_api(world):
    before = superlink_state(world)
    if world["mode"] == "tls":
        assert {name for name, _ in before[0].values()} == {"site_a", "site_b"}
    answers = run_attacks(world, world["public"])
    _judge(world, answers, before, own_body=True)
    assert sum(status == 404 for status, _ in answers.values()) >= len(ATTACKS) - 5
    # each refusal is logged with the method, the escaped target and the client's address
    log = world["gateway_log"].read_text()
    refused = [ln for ln in log.splitlines() if " Refused " in ln]
    assert sum(status == 404 for status, _ in answers.values()) <= len(refused)
    assert any("Refused POST /v1/fleet/../control/list-runs from 127.0.0.1: dot segment." in ln for ln in refused)
    assert any("Refused POST /v1/fleet/%c0%ae%c0%ae/control/list-runs from 127.0.0.1" in ln for ln in refused)


def _listening(root_pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket listening in the process tree under ``root_pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):  # a process that just ended
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    pids, inodes = [root_pid], set()
    while pids:
        pid = pids.pop()
        pids += children.get(pid, [])
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addr, port = fields[1].split(":")
                raw = bytes.fromhex(addr)
                ip = socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6,
                                      b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
                found.add((ip, int(port, 16)))
    return found


def _site(world: dict, site: str, port: int) -> list[str]:
    """``tdamil-client`` for ``site`` (the demo's YAML) dialling 127.0.0.1:``port``."""
    cfg = yaml.safe_load(world["paths"][site].read_text())
    cfg["federation"]["superlink"] = f"127.0.0.1:{port}"
    cfg.pop("tls", None)
    cfg.pop("auth", None)
    if world["mode"] == "tls":
        bundle = world["sites"][site]
        cfg["tls"], cfg["auth"] = {"ca_cert": str(bundle.ca_cert)}, {"private_key": str(bundle.private_key)}
    path = world["paths"][site].with_name(f"{site}_{port}.yaml")
    path.write_text(yaml.safe_dump(cfg))
    return [str(BIN / "tdamil-client"), "--config", str(path), "--state-dir", str(world["root"] / f"state_{port}"),
            *(["--insecure"] if world["mode"] == "plaintext" else [])]


FIRST_CALLS = ("/fleet/pull-messages", "/fleet/send-node-heartbeat")  # what a SuperNode sends once online


def _since(path: Path, offset: int) -> str:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


def assert_a_site_joins(world: dict, site: str, port: int, proxy_log: Path) -> str:
    """A real site (``tdamil-client``) comes online through ``port`` and is stopped; while online,
    it listens on loopback only. Returns what the proxy logged meanwhile."""
    log = world["root"] / f"{site}_{port}.log"
    seen = proxy_log.stat().st_size
    before = set(superlink_state(world)[0])
    with open(log, "wb") as fh:
        node = subprocess.Popen(_site(world, site, port), stdout=fh, stderr=subprocess.STDOUT, env=_env(),
                                start_new_session=True)
    try:
        deadline, online = time.monotonic() + 120, []
        while not online:
            assert node.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the site did not come online:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
            nodes = list_site_nodes(world["control"], ca_cert=world["ca"], insecure=world["ca"] is None)
            online = [n for n in nodes.values() if n.status == "online" and (n.name == site or n.node_id not in before)]
        if Path("/proc/net/tcp").exists():
            sockets = _listening(node.pid)
            assert sockets and all(ip == "127.0.0.1" for ip, _ in sockets), sockets  # its runtime API only
        # "online" comes with its activation; its first poll and heartbeat may still be on their way
        # (on a loaded machine it was stopped before either reached the proxy): wait for them, bounded
        until = time.monotonic() + 30
        while time.monotonic() < until and not all(p in _since(proxy_log, seen) for p in FIRST_CALLS):
            time.sleep(0.2)
    finally:
        stop_group(node)
    time.sleep(1)  # the SuperNode's last calls (deactivate-node) reach the log
    return _since(proxy_log, seen)


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("world", ["plaintext", "tls"], indirect=True)
def test_a_real_site_still_joins_through_the_gateway(world):
    log = assert_a_site_joins(world, "site_a", world["public"], world["gateway_log"])
    # flwr-server -v: the gateway logged each call it forwarded; the SuperNode needed no other
    calls = set(re.findall(r"POST (/\S+) from 127\.0\.0\.1 -> 200", log))
    joined = {"/v1/fleet/register-node"} if world["mode"] == "plaintext" else {"/v1/fleet/activate-node"}
    assert joined | {"/v1/fleet/pull-messages", "/v1/fleet/send-node-heartbeat"} <= calls <= FLEET_PATHS, log
    assert " Refused " not in log, log


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from Linux /proc")
@pytest.mark.parametrize("world", ["plaintext", "tls"], indirect=True)
def test_the_coordinator_listens_on_loopback_and_the_gateway_port_only(world):
    # SuperLink (Fleet + Control + Runtime API), gateway, SuperExec, ServerApp, flwr run: two ports;
    # no legacy gRPC server on [::] although its switches are in flwr-server's environment (_env)
    assert _listening(world["server_pid"]) == {("127.0.0.1", world["public"]), ("127.0.0.1", world["internal"])}


# ---- nginx with the shipped configuration -------------------------------------------------------------
def _nginx() -> Optional[str]:
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    return found if Path(found).exists() else None


@pytest.fixture
def nginx(world, tmp_path):
    binary = _nginx()
    if binary is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light); the gateway tests above "
                    "cover the same attack list")
    spec = importlib.util.spec_from_file_location("check_proxy", REPO / "deploy" / "tools" / "check_proxy.py")
    check_proxy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_proxy)
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(check_proxy.render_nginx((REPO / "deploy/proxy/nginx.conf").read_text(), tmp_path,
                                             world["pki"], port, int(world["control"].rpartition(":")[2])))
    test = subprocess.run([binary, "-t", "-c", str(conf), "-p", str(tmp_path)], capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    with open(tmp_path / "nginx.out", "wb") as fh:
        proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(tmp_path), "-g", "daemon off;"], stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        check_proxy.wait_port(port)
        yield port, tmp_path / "tdamil-access.log"
    finally:
        stop_group(proc)


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("world", ["tls"], indirect=True)
def test_attack_list_through_nginx_reaches_no_api_but_the_fleet_api(world, nginx):
    port, access_log = nginx
    before = superlink_state(world)
    answers = run_attacks(world, port)
    _judge(world, answers, before, own_body=False)
    # the rest nginx refused by itself before the rules (NUL byte, OPTIONS *, lower-case method,
    # CONNECT: 400; TRACE: 405) or answered without a body (HEAD)
    others = {name: (status, body[:200]) for name, (status, body) in answers.items() if body != REFUSED_BODY}
    assert len(others) <= 8 and all(b"<center>nginx</center>" in body or (name.startswith("HEAD") and body == b"")
                                    for name, (_, body) in others.items()), others
    access = assert_a_site_joins(world, "site_b", port, access_log)
    calls = re.findall(r'"POST (\S+) HTTP/1\.1" (\d+)', access)
    assert {"/v1/fleet/activate-node", "/v1/fleet/pull-messages"} <= {path for path, _ in calls}, access
    assert all(path in FLEET_PATHS and status == "200" for path, status in calls), access
