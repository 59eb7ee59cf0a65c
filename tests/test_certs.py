"""tdamil-certs: CA + server certificate, site keys in Flower's formats, checks with clear errors."""

from __future__ import annotations

import datetime as dt
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tdamil.security.certs import (
    CertsError,
    check_certificate,
    check_site_key,
    init_pki,
    issue_site,
    load_site_public_key,
    main,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pki") / "pki"
    init_pki(root, ["coordinator.example.org"], ["10.1.2.3"])
    issue_site("site_a", pki=root)
    return root


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_writes_ca_and_server_cert_with_required_san(pki: Path):
    cert = x509.load_pem_x509_certificate((pki / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"coordinator.example.org", "localhost"}
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1"}
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.issuer == ca.subject
    assert _mode(pki / "ca.key") == 0o600 and _mode(pki / "server.key") == 0o600


def test_server_key_matches_and_every_san_is_covered(pki: Path):
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))  # OpenSSL accepts the CA file
    ctx.load_cert_chain(str(pki / "server.pem"), str(pki / "server.key"))  # and the key pair
    cert = x509.load_pem_x509_certificate((pki / "server.pem").read_bytes())
    for host in ("coordinator.example.org", "localhost", "127.0.0.1", "10.1.2.3"):
        check_certificate(pki / "server.pem", pki / "ca.pem", host=host, key=pki / "server.key")
    assert cert.not_valid_after_utc > dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=300)


def test_site_key_is_p384_in_flower_formats(pki: Path):
    site = pki / "sites" / "site_a"
    priv = serialization.load_ssh_private_key((site / "site_a.key").read_bytes(), None)
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert _mode(site / "site_a.key") == 0o600
    # flwr supernode register reads the public key with Flower's own loader
    from flwr.cli.supernode.register import try_load_public_key

    raw = try_load_public_key(pki / "site_keys" / "site_a.pub")
    pub_from_priv = priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert raw == pub_from_priv
    assert (site / "ca.pem").read_bytes() == (pki / "ca.pem").read_bytes()
    assert check_site_key(site / "site_a.key", pki / "site_keys" / "site_a.pub").startswith("SHA256:")


def test_keys_are_never_overwritten_silently(pki: Path):
    before = (pki / "sites" / "site_a" / "site_a.key").read_bytes()
    with pytest.raises(CertsError, match="refusing to overwrite.*--force"):
        issue_site("site_a", pki=pki)
    with pytest.raises(CertsError, match="refusing to overwrite"):
        init_pki(pki, ["coordinator.example.org"])
    assert (pki / "sites" / "site_a" / "site_a.key").read_bytes() == before


def test_site_issued_at_hospital_with_only_the_ca(pki: Path, tmp_path: Path):
    b = issue_site("site_z", ca_cert=pki / "ca.pem", out=tmp_path / "site_z")
    assert b.registered_copy is None and b.private_key.is_file() and b.ca_cert.is_file()
    load_site_public_key(b.public_key)
    with pytest.raises(CertsError, match="site name"):
        issue_site("../evil", ca_cert=pki / "ca.pem", out=tmp_path / "x")


def test_check_reports_wrong_host_wrong_ca_tampering_expiry_and_wrong_key(pki: Path, tmp_path: Path):
    with pytest.raises(CertsError, match="does not cover 'evil.example.org'"):
        check_certificate(pki / "server.pem", pki / "ca.pem", host="evil.example.org")
    other = init_pki(tmp_path / "other", ["coordinator.example.org"])
    with pytest.raises(CertsError, match="not signed by the CA"):
        check_certificate(pki / "server.pem", other.ca_cert)
    with pytest.raises(CertsError, match="not the private key"):
        check_certificate(pki / "server.pem", pki / "ca.pem", key=other.server_key)
    future = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=5000)
    with pytest.raises(CertsError, match="expired on"):
        check_certificate(pki / "server.pem", pki / "ca.pem", at=future)
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=390)
    report = check_certificate(pki / "server.pem", pki / "ca.pem", at=soon)
    assert any("expires in" in w for w in report.warnings)
    # flip one byte inside the signed part: the signature no longer verifies
    der = bytearray(x509.load_pem_x509_certificate((pki / "server.pem").read_bytes()).public_bytes(serialization.Encoding.DER))
    idx = der.find(b"coordinator.example.org")
    der[idx] ^= 0x01
    tampered = tmp_path / "tampered.der"
    tampered.write_bytes(bytes(der))
    with pytest.raises(CertsError, match="not signed by the CA|altered|not a valid"):
        check_certificate(tampered, pki / "ca.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertsError, match="garbage.pem: not a valid X.509"):
        check_certificate(garbage, pki / "ca.pem")


def test_site_key_checks(pki: Path, tmp_path: Path):
    b = issue_site("site_k", ca_cert=pki / "ca.pem", out=tmp_path / "k")
    b.private_key.chmod(0o644)
    with pytest.raises(CertsError, match="chmod 600"):
        check_site_key(b.private_key)
    b.private_key.chmod(0o600)
    with pytest.raises(CertsError, match="does not match"):
        check_site_key(b.private_key, pki / "site_keys" / "site_a.pub")
    rsa_pub = tmp_path / "rsa.pub"
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_pub.write_bytes(
        rsa.generate_private_key(65537, 2048).public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    with pytest.raises(CertsError, match="ECDSA P-384"):
        load_site_public_key(rsa_pub)


def test_cli_exit_codes_and_messages(pki: Path, tmp_path: Path, capsys):
    assert main(["check", "--cert", str(pki / "server.pem"), "--ca", str(pki / "ca.pem"),
                 "--host", "coordinator.example.org", "--key", str(pki / "server.key")]) == 0
    assert "OK:" in capsys.readouterr().out
    assert main(["check", "--cert", str(pki / "server.pem"), "--ca", str(pki / "ca.pem"), "--host", "nope.org"]) == 1
    assert "does not cover 'nope.org'" in capsys.readouterr().err
    # the installed console script runs
    out = subprocess.run(
        [sys.executable, "-m", "tdamil.security.certs", "init", "--out", str(tmp_path / "p"),
         "--server-name", "c.example.org", "--ip", "not-an-ip"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1 and "is not an IP address" in out.stderr
