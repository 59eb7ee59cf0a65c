"""The project's own processes with security on: flwr-server + two tdamil-client over TLS with
registered site keys and site-level DP, on 127.0.0.1. Checks the audit trail end to end, then
breaks things (tampered certificate, damaged checkpoint, malformed config, plaintext) and checks
each gives a clear error and loses no finished round.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tdamil.atomic import sha256_file
from tdamil.net import free_port
from tdamil.security.certs import init_pki, issue_site
from tdamil.security.integrity import CheckpointIntegrityError, verify_checkpoint
from federation_processes import start_logged, stop_all

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent




@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """A finished 1-round federation: TLS, site keys registered, DP at the coordinator and sites.

    The demo's default (secure) files are used as written: the README's real-process demo path."""
    from tdamil.federation.demo import write_demo_federation

    root = tmp_path_factory.mktemp("proj_e2e")
    public, internal = free_port(), free_port()
    paths = write_demo_federation(
        root / "demo", num_sites=2, train_bags=12, val_bags=6, test_bags=6, heldout_bags=20,
        superlink=f"127.0.0.1:{public}", internal_port=internal, runtime_ports=[free_port(), free_port()],
        federation={"rounds": 1, "evaluate_sites": False, "round_timeout_s": 200, "wait_for_sites_s": 200},
    )
    pki = root / "demo" / "certs"  # written by write_demo_federation: CA, server cert, site keys
    privacy = {"enabled": True, "clipping_norm": 5.0, "noise_multiplier": 0.1, "delta": 1e-5}
    srv = yaml.safe_load(paths["server"].read_text())
    assert srv["auth"] == {"enabled": True, "site_public_keys": "certs/site_keys"} and "tls" in srv
    srv["privacy"] = privacy
    paths["server"].write_text(yaml.safe_dump(srv))
    sites = [s for s in paths if s != "server"]
    for s in sites:
        y = yaml.safe_load(paths[s].read_text())
        assert y["auth"]["private_key"] == f"../certs/sites/{s}/{s}.key"
        y["privacy"] = privacy
        paths[s].write_text(yaml.safe_dump(y))
    procs = []
    try:
        server = start_logged([str(BIN / "flwr-server"), "--config", str(paths["server"])], root / "server.log", root)
        procs.append(server)
        for s in sites:
            procs.append(start_logged([str(BIN / "tdamil-client"), "--config", str(paths[s]), "--state-dir",
                                 str(root / f"state_{s}")], root / f"{s}.log", root))
        try:
            rc = server.wait(timeout=300)
        except subprocess.TimeoutExpired:
            rc = None
        assert rc == 0, (root / "server.log").read_text()[-4000:]
    finally:
        stop_all(procs)
    out = root / "demo" / srv["output_dir"]
    return {"root": root, "paths": paths, "pki": pki, "out": out, "sites": sites, "server_cfg": srv}


def _audit(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "audit.jsonl").read_text().splitlines() if ln.strip()]


@pytest.mark.slow
def test_tls_run_with_registered_sites_and_dp_finishes(fed):
    log = (fed["root"] / "server.log").read_text()
    assert "Registered site site_a" in log and "Registered site site_b" in log
    assert "Site-level DP on" in log
    # Flower's lines (streamed from the ServerApp) are shown once, with time, level and source
    assert "\x1b[" not in log
    import re

    (sampled,) = [ln for ln in log.splitlines() if "configure_train: Sampled" in ln]
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO flwr: configure_train", sampled), sampled
    records = _audit(fed["out"])
    assert records[0]["event"] == "run_started" and records[-1]["event"] == "run_finished"
    # the privacy spent after round 1 is in the audit trail and equals the accountant's value
    from tdamil.security.config import PrivacyConfig
    from tdamil.security.dp import PrivacyAccountant

    (done,) = [r for r in records if r["event"] == "round_finished"]
    expected = PrivacyAccountant(PrivacyConfig(**fed["server_cfg"]["privacy"]), 1.0).epsilon(1)
    assert done["dp_epsilon"] == pytest.approx(expected)


@pytest.mark.slow
def test_audit_round_record_lists_sites_sizes_metrics_checkpoints_and_no_data(fed):
    records = _audit(fed["out"])
    replies = [r for r in records if r["event"] == "reply" and r["phase"] == "train" and r["round"] == 1]
    assert {r["site"] for r in replies} == set(fed["sites"])
    for r in replies:
        assert r["payload_bytes"] > 1000  # the model weights, not a handful of numbers
        assert isinstance(r["metrics"]["train-loss"], float) and r["metrics"]["num-examples"] > 0
    ckpts = [r for r in records if r["event"] == "checkpoint"]
    assert ckpts and all(len(r["sha256"]) == 64 for r in ckpts)
    for r in ckpts:
        if Path(r["path"]).is_file() and r["kind"] != "best":
            assert sha256_file(r["path"]) == r["sha256"]
    text = (fed["out"] / "audit.jsonl").read_text()
    # no slide/patient identifiers and no feature values leave the sites into the log
    for s in fed["sites"]:
        with open(fed["root"] / "demo" / s / "manifest.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert rows and not any(row["slide_id"] in text or row["patient_id"] in text for row in rows)
    assert "features" not in text and "coords" not in text
    assert len(text) < 20_000


@pytest.mark.slow
def test_tampered_server_certificate_is_refused_clearly(fed, tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    pki = fed["pki"]
    # alter one byte of the signed content (the host name): still a well-formed certificate, but
    # its signature no longer verifies, as after tampering in transit or on disk
    der = bytearray(x509.load_pem_x509_certificate((pki / "server.pem").read_bytes())
                    .public_bytes(serialization.Encoding.DER))
    der[der.find(b"localhost")] ^= 0x01  # the demo's certificate is for localhost
    bad = tmp_path / "server.pem"
    bad.write_bytes(x509.load_der_x509_certificate(bytes(der)).public_bytes(serialization.Encoding.PEM))
    srv = dict(fed["server_cfg"])
    srv["tls"] = dict(srv["tls"], cert=str(bad))
    srv["output_dir"] = str(tmp_path / "run")
    srv["superlink"] = {"address": f"127.0.0.1:{free_port()}", "internal_port": free_port()}
    cfg = fed["paths"]["server"].parent / "server_tampered.yaml"
    cfg.write_text(yaml.safe_dump(srv))
    res = subprocess.run([str(BIN / "flwr-server"), "--config", str(cfg)], capture_output=True, text=True,
                         timeout=180, env=dict(os.environ, FLWR_TELEMETRY_ENABLED="0"))
    assert res.returncode == 2  # refused before the SuperLink starts, not at key registration
    assert "not signed by" in res.stderr and "Traceback" not in res.stdout + res.stderr


@pytest.mark.slow
def test_damaged_checkpoint_is_detected_and_finished_rounds_kept(fed):
    out = fed["out"]
    last = out / "checkpoints" / "last.pt"
    round1 = out / "checkpoints" / "round_0001.pt"
    assert verify_checkpoint(last, out / "audit.jsonl") == sha256_file(last)
    before = round1.read_bytes()
    data = bytearray(last.read_bytes())
    good = bytes(data)
    data[len(data) // 2] ^= 0x01  # one flipped bit: torch.load still reads it
    last.write_bytes(bytes(data))
    try:
        with pytest.raises(CheckpointIntegrityError, match="round_0001.pt .*is intact"):
            verify_checkpoint(last, out / "audit.jsonl")
        # a truncated checkpoint: the coordinator refuses to resume, says which file and which
        # intact one to use, and exits non-zero although the audit log's earlier session finished
        last.write_bytes(good[: len(good) // 3])
        res = subprocess.run([str(BIN / "flwr-server"), "--config", str(fed["paths"]["server"]), "--resume"],
                             capture_output=True, text=True, timeout=200,
                             env=dict(os.environ, FLWR_TELEMETRY_ENABLED="0"))
        assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
        (final,) = [ln for ln in res.stderr.splitlines() if "The run failed" in ln]
        assert "last.pt" in final and "round_0001.pt (round 1) is intact" in final
        assert "Run finished" not in res.stdout + res.stderr
        assert round1.read_bytes() == before  # the finished round is untouched
        records = _audit(out)
        assert sum(r["event"] == "run_finished" for r in records) == 1
        assert records[-1]["event"] == "run_failed" and records[-1]["session"] != records[-2].get("session")
    finally:
        last.write_bytes(good)


@pytest.mark.slow
def test_project_commands_refuse_plaintext_and_malformed_config(fed, tmp_path):
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    srv = dict(fed["server_cfg"])
    srv.pop("tls")
    srv["auth"] = {"enabled": False}
    plain = fed["paths"]["server"].parent / "server_plain.yaml"
    plain.write_text(yaml.safe_dump(srv))
    res = subprocess.run([str(BIN / "flwr-server"), "--config", str(plain), "--check"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode != 0 and "tdamil-certs init" in res.stderr and "--insecure" in res.stderr
    site_yaml = yaml.safe_load(fed["paths"]["site_a"].read_text())
    site_yaml.pop("tls")
    site_plain = fed["paths"]["site_a"].parent / "site_a_plain.yaml"
    site_plain.write_text(yaml.safe_dump(site_yaml))
    res = subprocess.run([str(BIN / "tdamil-client"), "--config", str(site_plain), "--check"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode != 0 and "tls.ca_cert" in res.stderr
    broken = fed["paths"]["server"].parent / "server_broken.yaml"
    broken.write_text(fed["paths"]["server"].read_text().replace("tls:", "tls: [", 1))
    res = subprocess.run([str(BIN / "flwr-server"), "--config", str(broken), "--check"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode != 0 and "server_broken.yaml" in res.stderr and "line" in res.stderr


@pytest.mark.slow
def test_broken_or_tampered_server_certificate_is_a_one_line_error_before_anything_starts(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from tdamil.federation.demo import write_demo_federation

    paths = write_demo_federation(tmp_path / "demo", num_sites=2, train_bags=4, val_bags=2, test_bags=2,
                                  heldout_bags=4, superlink=f"127.0.0.1:{free_port()}", internal_port=free_port())
    pki = tmp_path / "pki"
    init_pki(pki, ["coordinator.example.org"])
    broken = tmp_path / "broken.pem"  # PEM markers around bytes that are no certificate
    broken.write_text("-----BEGIN CERTIFICATE-----\nTUlJQm9uZXk=\n-----END CERTIFICATE-----\n")
    der = bytearray(x509.load_pem_x509_certificate((pki / "server.pem").read_bytes())
                    .public_bytes(serialization.Encoding.DER))
    der[der.find(b"coordinator.example.org")] ^= 0x01  # signed content altered: signature fails
    tampered = tmp_path / "tampered.pem"
    tampered.write_bytes(x509.load_der_x509_certificate(bytes(der)).public_bytes(serialization.Encoding.PEM))
    srv = yaml.safe_load(paths["server"].read_text())
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    for cert, expected in ((broken, "broken.pem"), (tampered, "not signed by")):
        srv["tls"] = {"ca_cert": str(pki / "ca.pem"), "cert": str(cert), "key": str(pki / "server.key")}
        paths["server"].write_text(yaml.safe_dump(srv))
        res = subprocess.run([str(BIN / "flwr-server"), "--config", str(paths["server"])], capture_output=True,
                             text=True, timeout=120, env=env)
        assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
        assert "Traceback" not in res.stderr and "PEM lib" not in res.stderr
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], res.stderr[-2000:]
        assert "SuperLink running" not in res.stderr  # refused before anything started


def _serve(port: int, tls_files: tuple[Path, Path] | None, stop, ready=None) -> None:
    """Accept connections on 127.0.0.1:port until ``stop`` is set: a TLS handshake with the given
    certificate and key, or (None) a plaintext HTTP answer. ``ready`` (an Event) is set once it listens."""
    import ssl

    ctx = None
    if tls_files is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls_files[0]), str(tls_files[1]))
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(8)
        srv.settimeout(0.2)
        if ready is not None:
            ready.set()
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    if ctx is None:
                        conn.recv(1024)
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    else:
                        with ctx.wrap_socket(conn, server_side=True):
                            pass
                except (OSError, ssl.SSLError):
                    pass


def test_site_checks_ca_key_and_tls_link_before_starting_the_supernode(tmp_path, capsys, caplog):
    import logging

    import threading

    from tdamil.client.site import main as client_main
    from tdamil.federation.demo import write_demo_federation

    paths = write_demo_federation(tmp_path / "demo", num_sites=2, train_bags=4, val_bags=2, test_bags=2,
                                  heldout_bags=4)
    pki, other = tmp_path / "pki", tmp_path / "other"
    init_pki(pki, ["coordinator.example.org"])
    init_pki(other, ["coordinator.example.org"])
    bundle = issue_site("site_a", pki=pki)
    tls_port, plain_port, closed_port = free_port(), free_port(), free_port()
    stop = threading.Event()
    listening = [threading.Event(), threading.Event()]
    servers = [threading.Thread(target=_serve, args=(tls_port, (pki / "server.pem", pki / "server.key"), stop, listening[0])),
               threading.Thread(target=_serve, args=(plain_port, None, stop, listening[1]))]
    for t in servers:
        t.start()
    assert all(e.wait(30) for e in listening), "the test's TLS / plaintext servers did not start listening"
    site = yaml.safe_load(paths["site_a"].read_text())
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    cases = [  # (port, ca, key, exit code, text expected on stderr / in the log)
        (tls_port, pki / "ca.pem", bundle.private_key, 0, "TLS link to the coordinator"),
        (closed_port, pki / "ca.pem", bundle.private_key, 0, "cannot be reached yet"),  # not up yet: SuperNode retries
        (tls_port, other / "ca.pem", bundle.private_key, 2, "not signed by the CA"),
        (plain_port, pki / "ca.pem", bundle.private_key, 2, "does not speak TLS"),
        (tls_port, pki / "ca.pem", bad_key, 2, "auth.private_key"),
    ]
    try:
        for port, ca, key, code, text in cases:
            site["federation"]["superlink"] = f"127.0.0.1:{port}"
            site["tls"] = {"ca_cert": str(ca)}
            site["auth"] = {"private_key": str(key)}
            cfg = paths["site_a"].parent / "site_a_check.yaml"
            cfg.write_text(yaml.safe_dump(site))
            caplog.clear()
            with caplog.at_level(logging.INFO):
                rc = client_main(["--config", str(cfg), "--check", "--no-extract"])
            err = capsys.readouterr().err
            assert rc == code, (port, text, err[-2000:])
            if code == 0:
                assert text in caplog.text
            else:
                (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
                assert text in line and "Traceback" not in err
    finally:
        stop.set()
        for t in servers:
            t.join(timeout=10)
