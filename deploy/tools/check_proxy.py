#!/usr/bin/env python3
"""Smoke test of deploy/proxy/nginx.conf against a real SuperLink on this machine (needs nginx).

    python deploy/tools/check_proxy.py            # exit 0 when every check passes

Starts, on 127.0.0.1 with free ports: flower-superlink (TLS, --enable-supernode-auth), nginx with
the shipped config (only ports, certificate paths and log/pid paths rewritten), registers a site
key through the loopback Control API, connects a flower-supernode THROUGH the proxy and checks:
the site comes online; /v1/control/*, /v1/runtime/*, /health, /docs and dot-segment or
percent-encoded paths to the Control API answer 404 through the proxy, and a GET of a Fleet call
too. Everything started is stopped at the end. (tests/test_gateway_attacks.py sends the full attack
list through the same rendered configuration.)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"port {port} did not open")


def render_nginx(src: str, tmp: Path, pki: Path, public: int, upstream: int) -> str:
    conf = src.replace("/etc/tdamil/pki", str(pki))
    conf = conf.replace("server 127.0.0.1:9093;", f"server 127.0.0.1:{upstream};")
    conf = re.sub(r"listen 443 ssl;", f"listen 127.0.0.1:{public} ssl;", conf)
    conf = re.sub(r"\s*listen \[::\]:443 ssl;", "", conf)
    conf = conf.replace("/var/log/nginx/", f"{tmp}/").replace("/run/nginx-tdamil.pid", f"{tmp}/nginx.pid")
    conf = conf.replace("worker_processes auto;", "worker_processes 1;")
    return conf


def status_of(url: str, ctx: ssl.SSLContext, method: str = "POST") -> int:
    """The status of one request; urllib sends the path as written (no dot-segment removal)."""
    req = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def main() -> int:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        print("nginx is not installed (apt-get install nginx-light)")
        return 2
    sys.path.insert(0, str(REPO))
    from tdamil.security.certs import init_pki, issue_site
    from tdamil.security.nodeauth import list_site_nodes, register_site_keys

    tmp = Path(tempfile.mkdtemp(prefix="tdamil_proxy_"))
    pki = tmp / "pki"
    init_pki(pki, ["coordinator.example.org"])
    site = issue_site("site_a", pki=pki)
    up, public = free_port(), free_port()
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_HOME=str(tmp / "flwr"))
    procs = []
    failures = []
    try:
        procs.append(subprocess.Popen(
            [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(up), "--isolation", "process",
             "--ssl-ca-certfile", str(pki / "ca.pem"), "--ssl-certfile", str(pki / "server.pem"),
             "--ssl-keyfile", str(pki / "server.key"), "--enable-supernode-auth"],
            stdout=open(tmp / "superlink.log", "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True))
        wait_port(up)
        conf = tmp / "nginx.conf"
        conf.write_text(render_nginx((REPO / "deploy/proxy/nginx.conf").read_text(), tmp, pki, public, up))
        t = subprocess.run([nginx, "-t", "-c", str(conf), "-p", str(tmp)], capture_output=True, text=True)
        print("nginx -t:", t.returncode, t.stderr.strip().splitlines()[-1] if t.stderr else "")
        if t.returncode:
            return 1
        procs.append(subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp), "-g", "daemon off;"],
                                      stdout=open(tmp / "nginx.out", "wb"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        wait_port(public)
        register_site_keys(pki / "site_keys", f"127.0.0.1:{up}", ca_cert=pki / "ca.pem")
        procs.append(subprocess.Popen(
            [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{public}", "--root-certificates",
             str(site.ca_cert), "--auth-supernode-private-key", str(site.private_key), "--isolation", "process",
             "--port", str(free_port()), "--max-retries", "2"],
            stdout=open(tmp / "supernode.log", "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True))
        status = None
        end = time.monotonic() + 30
        while time.monotonic() < end and status != "online":
            nodes = list_site_nodes(f"127.0.0.1:{up}", ca_cert=pki / "ca.pem")
            status = next((n.status for n in nodes.values() if n.name == "site_a"), None)
            time.sleep(0.5)
        print("site_a through the proxy:", status)
        if status != "online":
            failures.append("site did not come online through the proxy")
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        for method, path in (("POST", "/v1/control/list-nodes"), ("POST", "/v1/control/register-node"),
                             ("POST", "/v1/runtime/acquire-task"), ("GET", "/docs"), ("GET", "/health"),
                             ("POST", "/v1/fleet/../control/list-nodes"),
                             ("POST", "/v1/fleet/%2e%2e/control/list-nodes"),
                             ("POST", "/v1/fleet/..%2fcontrol/list-nodes"), ("GET", "/v1/fleet/get-run")):
            code = status_of(f"https://127.0.0.1:{public}{path}", ctx, method)
            print(f"{method} {path}: {code} (want 404)")
            if code != 404:
                failures.append(f"{method} {path} answered {code}, expected 404")
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
    print("FAILED: " + "; ".join(failures) if failures else "OK: only the Fleet API is reachable through the proxy")
    if failures:
        print(f"logs in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
