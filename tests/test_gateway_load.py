"""The coordinator's public port under load: the gateway (server/gateway.py) as a real process on
127.0.0.1 in front of a stand-in upstream (benchmarks/bench_gateway_load.py's ``Sink``: reads each
body and drops it, answers ``upstream-ok``), not a SuperLink.

* slow clients (headers trickled, a body trickled, ``Expect: 100-continue`` and no body) are
  answered 408 and closed within the configured limits, while 4 unauthenticated 63 MiB bodies pass
  and a legitimate ``POST /v1/fleet/get-run`` still gets its upstream answer; the gateway's VmRSS
  stays under 300 MiB and is back near its start afterwards (200 slow connections here, 1,000
  with the default limits in the slow test);
* too many or too large headers answer 431, in plaintext and TLS, without parsing 10,000 lines;
  a stalled TLS handshake is closed;
* the per-address and global connection caps refuse (429, 503) and log; the open-file limit is
  raised toward what the caps need, or the cap lowered to fit it;
* the refusal log is rate-limited.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import resource
import socket
import ssl
import sys
import time
from pathlib import Path

import pytest
from test_gateway_attacks import gateway_process

from tdamil.security.certs import init_pki

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_gateway_load", REPO / "benchmarks" / "bench_gateway_load.py")
load = importlib.util.module_from_spec(_spec)
sys.modules["bench_gateway_load"] = load
_spec.loader.exec_module(load)

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from Linux /proc")
SLACK = 1.5  # s: timers fire on a loaded 2-core machine a little late


@pytest.fixture(scope="module", autouse=True)
def open_files():
    """Hundreds of client sockets in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def sink():
    upstream = load.Sink()
    yield upstream
    upstream.close()


def _check_attack(figures: dict, header_timeout: float, body_timeout: float, slow: int) -> None:
    assert figures["slow_opened"] == slow and figures["slow_still_open_at_give_up"] == 0, figures
    held = figures["slow_held_s"]
    assert held["headers"]["max"] <= header_timeout + SLACK, held
    assert held["body"]["max"] <= body_timeout + SLACK and held["expect"]["max"] <= body_timeout + SLACK, held
    assert min(h["median"] for h in held.values()) >= min(header_timeout, body_timeout) - 0.5, held  # not sooner
    assert figures["slow_answers"] == [100, 408], figures  # 100 Continue to the expect kind, then 408 to all
    # the large bodies reached the upstream, or waited for their share of the budget and were refused
    statuses = [b["status"] for b in figures["bodies"]]
    assert statuses.count(200) >= 2 and set(statuses) <= {200, 503}, figures["bodies"]
    assert figures["legit_calls"] >= 3 and figures["legit_ok"] == figures["legit_calls"], figures
    assert figures["legit_latency_s"]["max"] < 3.0, figures
    assert figures["rss_peak_mib"] < 300, figures
    assert figures["rss_after_mib"] < figures["rss_before_mib"] + 40, figures


@pytest.mark.slow
def test_slow_clients_are_closed_and_large_bodies_bounded_while_a_fleet_call_gets_through(sink, tmp_path):
    log = tmp_path / "gateway.log"
    with gateway_process(f"http://127.0.0.1:{sink.port}", log, "--header-timeout", "2",
                         "--body-idle-timeout", "3") as (gateway, port):
        figures = load.attack(port, gateway.pid, slow=200, per_address=25, drip=1.0, give_up=20, bodies=4,
                              body_mib=63, body_rate=32.0)
    _check_attack(figures, 2, 3, 200)
    text = log.read_text()
    assert re.search(r"Refused connection from 127\.0\.0\.\d+: request headers not complete within 2 s \(408\)\.", text)
    assert re.search(r"Refused POST /v1/fleet/push-messages from 127\.0\.0\.\d+: no body byte for 3 s \(408\)\.", text)
    assert re.search(r"Refused POST /v1/fleet/push-messages from 127\.0\.0\.\d+: body slower than 16384 "
                     r"bytes/s \(408\)\.", text)
    pushed = [size for path, size in sink.calls if path == "/v1/fleet/push-object"]
    assert pushed.count(63 * load.MiB) == [b["status"] for b in figures["bodies"]].count(200)  # streamed whole
    assert all(path in ("/v1/fleet/get-run", "/v1/fleet/push-object") for path, _ in sink.calls)  # no slow one


@pytest.mark.slow
def test_a_thousand_slow_clients_with_the_default_limits(sink, tmp_path):
    log = tmp_path / "gateway.log"
    with gateway_process(f"http://127.0.0.1:{sink.port}", log) as (gateway, port):
        figures = load.attack(port, gateway.pid, slow=1000, per_address=25, drip=5.0, give_up=45, bodies=4,
                              body_mib=63, body_rate=8.0)
    _check_attack(figures, 10, 30, 1000)
    assert "more lines like" in log.read_text() or len(log.read_text().splitlines()) < 400  # rate-limited


def _tls_pki(tmp_path: Path) -> Path:
    pki = tmp_path / "pki"
    init_pki(pki, ["coordinator.example.org"])
    return pki


@pytest.mark.slow
@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_too_many_or_too_large_headers_answer_431(sink, tmp_path, tls):
    flags, ca = ["--header-timeout", "2"], None
    if tls:
        pki = _tls_pki(tmp_path)
        flags += ["--ssl-certfile", str(pki / "server.pem"), "--ssl-keyfile", str(pki / "server.key")]
        ca = pki / "ca.pem"
    log = tmp_path / "gateway.log"

    def call(headers: bytes) -> tuple[int, bytes, float]:
        start = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        if ca is not None:
            sock = ssl.create_default_context(cafile=str(ca)).wrap_socket(sock, server_hostname="127.0.0.1")
        data, answered = b"", None
        with sock:
            try:
                sock.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: c\r\n" + headers +
                             b"Content-Length: 2\r\nConnection: close\r\n\r\nok")
                while chunk := sock.recv(65536):
                    data += chunk
                    answered = answered or time.monotonic()
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                pass
        head, _, body = data.partition(b"\r\n\r\n")
        match = re.match(rb"HTTP/1\.1 (\d{3})", head)
        return (int(match.group(1)) if match else 0), body, (answered or time.monotonic()) - start

    with gateway_process(f"http://127.0.0.1:{sink.port}", log, *flags) as (_, port):
        assert call(b"".join(b"x-h%d: v\r\n" % i for i in range(20)))[:2] == (200, b"upstream-ok")
        status, body, seconds = call(b"".join(b"x-h%d: v\r\n" % i for i in range(10_000)))
        assert status == 431 and seconds < 2.0, (status, body, seconds)
        assert call(b"".join(b"x-h%d: v\r\n" % i for i in range(70)))[0] == 431  # over 64 lines, under 16 KiB
        assert call(b"x-big: " + b"a" * 20_000 + b"\r\n")[0] == 431  # one line over 16 KiB
        if tls:  # a handshake that never starts is closed after --header-timeout
            start = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=15) as stalled:
                assert stalled.recv(1) == b""
            assert 2 - 0.5 <= time.monotonic() - start <= 2 + SLACK
    assert len(sink.calls) == 1
    text = log.read_text()
    assert "Refused connection from 127.0.0.1: request headers over 16384 bytes (431)." in text
    assert "Refused connection from 127.0.0.1: over 64 request header lines (431)." in text
    if tls:
        assert "Closed connection from 127.0.0.1: TLS handshake not complete within 2 s." in text


def _hold(port: int, source: str, n: int) -> list[socket.socket]:
    time.sleep(0.3)  # the gateway has seen the end of the connections before (gateway_process's probe)
    return [socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) for _ in range(n)]


def _refused_until_released(port: int, held: list[socket.socket]) -> None:
    """With ``held`` filling the gateway a Fleet call gets 503; once they close it gets through again."""
    time.sleep(0.3)
    assert load.post(port)[0] == 503
    for sock in held:
        sock.close()
    time.sleep(0.3)
    assert load.post(port)[:2] == (200, b"upstream-ok")


def test_connection_caps_per_address_and_in_all_refuse_and_log(sink, tmp_path):
    log = tmp_path / "gateway.log"
    with gateway_process(f"http://127.0.0.1:{sink.port}", log, "--max-per-address", "8", "--max-connections", "20",
                         "--header-timeout", "5") as (_, port):
        held = _hold(port, "127.0.0.77", 8)
        with socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.77", 0), timeout=10) as extra:
            assert extra.recv(4096).startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
        assert load.post(port)[:2] == (200, b"upstream-ok")  # another address still gets through
        held += _hold(port, "127.0.0.78", 8) + _hold(port, "127.0.0.79", 4)  # 20 open in all
        _refused_until_released(port, held)
    text = log.read_text()
    assert "Refused connection from 127.0.0.77: 8 connections open from this address (--max-per-address) (429)." \
        in text
    assert "Refused connection from 127.0.0.1: 20 connections open (--max-connections) (503)." in text


def _nofile(soft: int, hard: int):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _max_open_files(pid: int) -> int:
    line = next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines() if ln.startswith("Max open files"))
    return int(line.split()[3])


def test_open_file_limit_is_raised_or_the_cap_lowered_to_fit(sink, tmp_path):
    # systemd's default (soft 1024): the gateway raises its soft limit to what 2,048 connections need
    with gateway_process(f"http://127.0.0.1:{sink.port}", tmp_path / "a.log", preexec_fn=_nofile(1024, 8192)) \
            as (gateway, port):
        assert _max_open_files(gateway.pid) == 2 * 2048 + 64
    # a hard limit of 256: 96 connections, the next refused with 503 and logged instead of an empty reply
    log = tmp_path / "b.log"
    with gateway_process(f"http://127.0.0.1:{sink.port}", log, "--header-timeout", "5",
                         preexec_fn=_nofile(256, 256)) as (gateway, port):
        held = [s for i in range(4) for s in _hold(port, f"127.0.0.{10 + i}", 24)]
        _refused_until_released(port, held)
    text = log.read_text()
    assert "Open-file limit 256 allows 96 connections, not 2048 (raise LimitNOFILE)." in text
    assert "Refused connection from 127.0.0.1: 96 connections open (--max-connections) (503)." in text


def test_refusal_log_is_rate_limited(caplog):
    from tdamil.server.gateway import _FloodFilter

    gate = logging.getLogger("tdamil.server.gateway")
    flood = _FloodFilter(burst=3, window=0.2)
    gate.addFilter(flood)
    try:
        with caplog.at_level(logging.WARNING, logger="tdamil.server.gateway"):
            for i in range(50):
                gate.warning("Refused connection from %s: %s (%d).", f"10.0.0.{i}", "slow", 408)
            gate.warning("Refused connection from %s: %s (%d).", "10.0.0.99", "cap", 429)  # another kind
            time.sleep(0.25)
            gate.warning("Refused connection from %s: %s (%d).", "10.0.0.1", "slow", 408)  # a new window
    finally:
        gate.removeFilter(flood)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("(408)" in ln for ln in lines) == 4 and sum("(429)" in ln for ln in lines) == 1, lines
    assert any(ln.startswith("47 more lines like 'Refused connection from %s: %s (%d). 408'") for ln in lines), lines
