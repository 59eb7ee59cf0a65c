"""Real flower-superlink / flower-supernode processes on 127.0.0.1: TLS, site keys, refusals.

Every process gets a free port, its own log file and a bounded life; all are stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tdamil.net import free_port
from tdamil.security.certs import init_pki, issue_site
from tdamil.security.config import SiteAuthConfig, TLSConfig
from tdamil.security.nodeauth import NodeAuthError, list_site_nodes, register_site_keys, unregister_site
from tdamil.security.preflight import (
    SecurityCheckError,
    check_server_tls,
    check_site_security,
    probe_tls,
    require_tls,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent




def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"port {port} not open after {timeout}s:\n{log.read_text()[-3000:]}")


class Procs:
    """Start Flower processes with a log file each; stop them all (process groups) at the end."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_HOME=str(root / "flwr_home"),
                        PYTHONUNBUFFERED="1")

    def start(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.root / f"{name}.log"
        fh = open(log, "wb")
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=fh, stderr=subprocess.STDOUT,
                                env=self.env, cwd=self.root, start_new_session=True)
        fh.close()
        self.procs.append(proc)
        return proc, log

    def wait_exit(self, proc: subprocess.Popen, timeout: float = 40.0) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise AssertionError(f"process did not exit within {timeout}s")

    @staticmethod
    def stop(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)


def superlink_args(port: int, pki: Path | None, auth: bool = True) -> list[str]:
    args = ["flower-superlink", "--host", "127.0.0.1", "--port", str(port), "--isolation", "process",
            "--disable-runtime-dependency-installation"]
    if pki is not None:
        args += ["--ssl-ca-certfile", str(pki / "ca.pem"), "--ssl-certfile", str(pki / "server.pem"),
                 "--ssl-keyfile", str(pki / "server.key")]
    if auth:
        args += ["--enable-supernode-auth"]
    return args


def supernode_args(port: int, runtime_port: int, *, ca: Path | None, key: Path | None, site: str,
                   insecure: bool = False) -> list[str]:
    args = ["flower-supernode", "--superlink", f"127.0.0.1:{port}", "--port", str(runtime_port),
            "--isolation", "process", "--max-retries", "1", "--max-wait-time", "10",
            "--node-config", f'site="{site}"']
    if insecure:
        args.append("--insecure")
    if ca is not None:
        args += ["--root-certificates", str(ca)]
    if key is not None:
        args += ["--auth-supernode-private-key", str(key)]
    return args


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sec_e2e")
    pki = root / "pki"
    init_pki(pki, ["coordinator.example.org"])
    for site in ("site_a", "site_b"):
        issue_site(site, pki=pki)
    # site_b's key exists but is NOT registered: move it out of the registry folder
    (root / "unregistered").mkdir()
    shutil.move(pki / "site_keys" / "site_b.pub", root / "unregistered" / "site_b.pub")
    procs = Procs(root)
    port = free_port()
    link, log = procs.start("superlink_tls", superlink_args(port, pki))
    try:
        _wait_port(port, link, log)
        yield {"root": root, "pki": pki, "port": port, "procs": procs, "link": link, "log": log}
    finally:
        procs.stop_all()


def _wait_status(port: int, ca: Path, site: str, status: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        nodes = list_site_nodes(f"127.0.0.1:{port}", ca_cert=ca)
        seen = {n.name: n.status for n in nodes.values()}
        if seen.get(site) == status:
            return
        time.sleep(0.3)
    raise AssertionError(f"{site} never became {status}; nodes: {seen}")


def test_registered_site_joins_over_tls(world):
    pki, port, procs = world["pki"], world["port"], world["procs"]
    check_server_tls(TLSConfig(pki / "ca.pem", pki / "server.pem", pki / "server.key"), ["coordinator.example.org"])
    site = pki / "sites" / "site_a"
    check_site_security(TLSConfig(ca_cert=site / "ca.pem"), SiteAuthConfig(site / "site_a.key"))
    assert probe_tls(f"127.0.0.1:{port}", site / "ca.pem").startswith("TLSv1.")
    reg = register_site_keys(pki / "site_keys", f"127.0.0.1:{port}", ca_cert=pki / "ca.pem")
    assert set(reg) == {"site_a"} and reg["site_a"].newly_registered
    # the same request through a Flower CLI connection (what flwr-server writes for `flwr` commands)
    home = world["root"] / "cli_home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "c"\n\n[superlink.c]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{pki / "ca.pem"}"\n')
    again = register_site_keys(pki / "site_keys", superlink="c", flwr_home=home)
    assert list(again) == ["site_a"]
    assert again["site_a"].node_id == reg["site_a"].node_id and not again["site_a"].newly_registered
    node, log = procs.start("site_a", supernode_args(port, free_port(), ca=site / "ca.pem",
                                                     key=site / "site_a.key", site="site_a"))
    _wait_status(port, pki / "ca.pem", "site_a", "online")
    assert node.poll() is None, log.read_text()
    procs.stop(node)


def test_unregistered_site_key_is_rejected(world):
    pki, port, procs = world["pki"], world["port"], world["procs"]
    site = pki / "sites" / "site_b"
    node, log = procs.start("site_b", supernode_args(port, free_port(), ca=site / "ca.pem",
                                                     key=site / "site_b.key", site="site_b"))
    assert procs.wait_exit(node) != 0
    assert "Failed to activate SuperNode" in log.read_text()
    names = {n.name for n in list_site_nodes(f"127.0.0.1:{port}", ca_cert=pki / "ca.pem").values()}
    assert "site_b" not in names


def test_site_without_the_consortium_ca_fails_clearly(world, tmp_path):
    pki, port, procs = world["pki"], world["port"], world["procs"]
    other = init_pki(tmp_path / "other", ["coordinator.example.org"])
    with pytest.raises(SecurityCheckError, match="not signed by the CA in .*other/ca.pem.*current ca.pem"):
        probe_tls(f"127.0.0.1:{port}", other.ca_cert)
    with pytest.raises(SecurityCheckError, match="does not cover 'evil.example.org'"):
        probe_tls(f"127.0.0.1:{port}", pki / "ca.pem", server_name="evil.example.org")
    site = pki / "sites" / "site_a"
    node, log = procs.start("site_noca", supernode_args(port, free_port(), ca=None,
                                                        key=site / "site_a.key", site="site_a"))
    assert procs.wait_exit(node) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in log.read_text()
    with pytest.raises(NodeAuthError, match="not signed by"):
        register_site_keys(pki / "site_keys", f"127.0.0.1:{port}", ca_cert=other.ca_cert)
    with pytest.raises(NodeAuthError, match="speaks TLS"):
        register_site_keys(pki / "site_keys", f"127.0.0.1:{port}", insecure=True)


@pytest.mark.parametrize("refusal", ["Server disconnected without sending a response.",
                                     "[Errno 104] Connection reset by peer"])
def test_plain_http_to_the_tls_control_api_is_named_however_the_server_refuses_it(tmp_path, monkeypatch, refusal):
    """A TLS SuperLink closes a plain-HTTP connection or, depending on timing, resets it (seen in a
    clean-clone run of the test above); either way the error names the misconfiguration."""
    from types import SimpleNamespace

    import tdamil.security.nodeauth as nodeauth

    site = issue_site("site_a", pki=init_pki(tmp_path / "pki", ["coordinator.example.org"]).root)

    def refused(request):
        raise ConnectionError(refusal)

    monkeypatch.setattr(nodeauth, "wait_for_port", lambda *a, **k: None)
    monkeypatch.setattr(nodeauth, "_client", lambda *a: SimpleNamespace(RegisterNode=refused, close=lambda: None))
    with pytest.raises(NodeAuthError, match="speaks TLS and refused plain HTTP"):
        register_site_keys([site.public_key], "127.0.0.1:9093", insecure=True)


def test_wrong_private_key_for_a_registered_site_is_rejected(world, tmp_path):
    pki, port, procs = world["pki"], world["port"], world["procs"]
    impostor = issue_site("site_a", ca_cert=pki / "ca.pem", out=tmp_path / "impostor")
    node, log = procs.start("site_a_impostor", supernode_args(port, free_port(), ca=impostor.ca_cert,
                                                              key=impostor.private_key, site="site_a"))
    assert procs.wait_exit(node) != 0
    assert "Failed to activate SuperNode" in log.read_text()


def test_revoked_site_can_no_longer_join(world):
    pki, port, procs = world["pki"], world["port"], world["procs"]
    reg = register_site_keys(pki / "site_keys", f"127.0.0.1:{port}", ca_cert=pki / "ca.pem")
    unregister_site(f"127.0.0.1:{port}", reg["site_a"].node_id, ca_cert=pki / "ca.pem")
    site = pki / "sites" / "site_a"
    node, log = procs.start("site_a_revoked", supernode_args(port, free_port(), ca=site / "ca.pem",
                                                             key=site / "site_a.key", site="site_a"))
    assert procs.wait_exit(node) != 0
    assert "Failed to activate SuperNode" in log.read_text()


def test_control_api_only_on_loopback(world):
    with pytest.raises(NodeAuthError, match="must stay on the coordinator's loopback"):
        register_site_keys(world["pki"] / "site_keys", f"10.1.2.3:{world['port']}", ca_cert=world["pki"] / "ca.pem")


def test_plaintext_is_refused_without_insecure(tmp_path):
    procs = Procs(tmp_path)
    try:
        # Flower itself: no certificates and no --insecure -> the SuperLink does not start
        port = free_port()
        link, log = procs.start("superlink_nocert", superlink_args(port, None, auth=False))
        assert procs.wait_exit(link) != 0
        assert "Certificates are required unless running in insecure mode" in log.read_text()
        # Our processes: refuse before Flower starts, naming the missing setting
        with pytest.raises(SecurityCheckError, match=r"tls.ca_cert not set, and plaintext is refused"):
            require_tls(TLSConfig(), insecure=False, role="site", source="site_a.yaml")
        with pytest.raises(SecurityCheckError, match=r"tls.ca_cert, tls.cert, tls.key not set"):
            require_tls(TLSConfig(), insecure=False, role="server", source="server.yaml")
        assert require_tls(TLSConfig(), insecure=True, role="site") is False
        # A plaintext SuperLink (--insecure) is detected by the site's TLS probe and by the SuperNode
        port = free_port()
        link, log = procs.start("superlink_plain", superlink_args(port, None, auth=False) + ["--insecure"])
        _wait_port(port, link, log)
        pki = tmp_path / "pki"
        init_pki(pki, ["coordinator.example.org"])
        with pytest.raises(SecurityCheckError, match="does not speak TLS"):
            probe_tls(f"127.0.0.1:{port}", pki / "ca.pem")
        node, nlog = procs.start("site_tls_to_plain", supernode_args(port, free_port(), ca=pki / "ca.pem",
                                                                     key=None, site="site_a"))
        assert procs.wait_exit(node) != 0
        assert "SSL" in nlog.read_text()
    finally:
        procs.stop_all()


def test_tampered_or_mismatched_server_files_are_caught_before_start(tmp_path):
    pki = tmp_path / "pki"
    init_pki(pki, ["coordinator.example.org"])
    other = init_pki(tmp_path / "other", ["coordinator.example.org"])
    pem = (pki / "server.pem").read_text().splitlines()
    mid = len(pem) // 2
    pem[mid] = pem[mid][:10] + ("A" if pem[mid][10] != "A" else "B") + pem[mid][11:]
    (tmp_path / "tampered.pem").write_text("\n".join(pem) + "\n")
    with pytest.raises(SecurityCheckError, match="tampered.pem"):
        check_server_tls(TLSConfig(pki / "ca.pem", tmp_path / "tampered.pem", pki / "server.key"))
    with pytest.raises(SecurityCheckError, match="is not the private key"):
        check_server_tls(TLSConfig(pki / "ca.pem", pki / "server.pem", other.server_key))
    with pytest.raises(SecurityCheckError, match="does not cover 'hospital-facing.example.org'"):
        check_server_tls(TLSConfig(pki / "ca.pem", pki / "server.pem", pki / "server.key"),
                         ["hospital-facing.example.org"])
    # the SuperLink itself refuses a key that does not match its certificate
    procs = Procs(tmp_path)
    try:
        mixed = tmp_path / "mixed"
        mixed.mkdir()
        shutil.copy(pki / "ca.pem", mixed / "ca.pem")
        shutil.copy(pki / "server.pem", mixed / "server.pem")
        shutil.copy(other.server_key, mixed / "server.key")
        link, log = procs.start("superlink_mixed", superlink_args(free_port(), mixed))
        assert procs.wait_exit(link) != 0
    finally:
        procs.stop_all()
