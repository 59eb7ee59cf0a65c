"""Consortium certificates and site keys (``tdamil-certs``), built on ``cryptography``.

The federation uses one private certificate authority (CA) run by the coordinator:

* ``tdamil-certs init`` creates the CA and the coordinator's TLS server certificate. Its subject
  alternative names (SAN) list every DNS name and IP address sites dial, and always ``localhost``
  and ``127.0.0.1`` (local runs, the loopback Control API, the reverse proxy's upstream).
* ``tdamil-certs issue --site site_a`` creates what one hospital needs: the CA certificate to trust
  and the site's ECDSA P-384 key pair for SuperNode authentication, in OpenSSH format (the format
  ``flower-supernode --auth-supernode-private-key`` reads and ``flwr supernode register`` expects).
  The public key is also copied into ``<pki>/site_keys/<site>.pub``, the folder the coordinator's
  ``auth.site_public_keys`` points at. Better still, a hospital runs ``issue --ca ca.pem`` on its own
  machine so the private key never leaves the site, and sends only ``<site>.pub``.
* ``tdamil-certs check`` verifies a certificate against the CA, its validity dates, the host name or
  IP it must cover and the private key it must match, and says what to do when something is wrong.

Layout written by ``init`` / ``issue`` (paths as in :class:`tdamil.security.config.TLSConfig`)::

    pki/ca.pem  pki/ca.key                      consortium CA (keep ca.key offline)
    pki/server.pem  pki/server.key              coordinator:  tls.cert, tls.key, tls.ca_cert=ca.pem
    pki/site_keys/site_a.pub                    coordinator:  auth.site_public_keys=pki/site_keys
    pki/sites/site_a/ca.pem                     site:         tls.ca_cert
    pki/sites/site_a/site_a.key  site_a.pub     site:         auth.private_key (and the public half)

Private keys are written with mode 0600 and never overwritten unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tdamil.atomic import atomic_path
from tdamil.security.config import check_site_name
from tdamil.logs import setup_logging

logger = logging.getLogger(__name__)

__all__ = [
    "CertsError",
    "PkiPaths",
    "SiteBundle",
    "CertReport",
    "init_pki",
    "issue_site",
    "check_certificate",
    "check_site_key",
    "load_site_public_key",
    "public_key_fingerprint",
    "main",
]

ALWAYS_DNS = ("localhost",)
ALWAYS_IPS = ("127.0.0.1",)


class CertsError(ValueError):
    """A certificate or key is missing, invalid or does not fit. The message says how to fix it."""


@dataclass
class PkiPaths:
    """Files written by :func:`init_pki`."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    site_keys: Path


@dataclass
class SiteBundle:
    """Files written by :func:`issue_site` for one hospital."""

    site: str
    folder: Path
    ca_cert: Path
    private_key: Path
    public_key: Path
    registered_copy: Optional[Path]  # <pki>/site_keys/<site>.pub, when a PKI folder was given


@dataclass
class CertReport:
    """What :func:`check_certificate` found (all checks passed when it returns)."""

    subject: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    days_left: float
    dns_names: list[str] = field(default_factory=list)
    ip_addresses: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        san = ", ".join(self.dns_names + self.ip_addresses) or "(none)"
        lines = [
            f"subject:  {self.subject}",
            f"issuer:   {self.issuer}",
            f"valid:    {self.not_before:%Y-%m-%d} .. {self.not_after:%Y-%m-%d} ({self.days_left:.0f} days left)",
            f"covers:   {san}",
        ]
        lines += [f"WARNING:  {w}" for w in self.warnings]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# writing files
def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _refuse_overwrite(paths: Sequence[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        names = ", ".join(str(p) for p in existing)
        raise CertsError(
            f"{names} already exist(s); refusing to overwrite keys or certificates silently. "
            "Use another --out folder, or pass --force if you really mean to replace them "
            "(sites holding the old CA or registered keys must then be updated)."
        )


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key with mode 0600 from the start (no window where others can read it)."""
    with atomic_path(path, mode=0o600) as tmp:
        tmp.write_bytes(data)


def _write_public(path: Path, data: bytes) -> None:
    with atomic_path(path, mode=0o644) as tmp:
        tmp.write_bytes(data)


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san_entries(dns_names: Sequence[str], ips: Sequence[str]) -> tuple[list[str], list[str]]:
    dns = list(dict.fromkeys([*dns_names, *ALWAYS_DNS]))
    ip_list: list[str] = []
    for raw in [*ips, *ALWAYS_IPS]:
        try:
            ip_list.append(str(ipaddress.ip_address(raw)))
        except ValueError:
            raise CertsError(f"--ip {raw!r} is not an IP address. Give DNS names with --server-name.") from None
    for name in dns:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            raise CertsError(f"--server-name {name!r} is an IP address; pass it with --ip instead.")
        if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.*-]{0,251}[A-Za-z0-9])?", name):
            raise CertsError(f"--server-name {name!r} is not a valid DNS name.")
    return dns, list(dict.fromkeys(ip_list))


def init_pki(
    out: str | Path,
    server_names: Sequence[str],
    ips: Sequence[str] = (),
    *,
    organisation: str = "tdamil-fl consortium",
    ca_days: int = 3650,
    server_days: int = 397,
    force: bool = False,
) -> PkiPaths:
    """Create the consortium CA and the coordinator's server certificate under ``out``.

    The server certificate covers ``server_names`` (DNS) and ``ips`` plus ``localhost`` and
    ``127.0.0.1``. Keys are ECDSA P-384. Refuses to replace existing files unless ``force``.
    """
    out = Path(out)
    if not server_names:
        raise CertsError("give at least one --server-name: the DNS name hospitals use to reach the coordinator.")
    dns, ip_list = _san_entries(server_names, ips)
    paths = PkiPaths(
        root=out,
        ca_cert=out / "ca.pem",
        ca_key=out / "ca.key",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
        site_keys=out / "site_keys",
    )
    _refuse_overwrite([paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key], force)
    now = _now()

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{organisation} CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                    x509.NameAttribute(NameOID.COMMON_NAME, dns[0]),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=server_days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ip_list]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(srv_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    out.mkdir(parents=True, exist_ok=True)
    _write_private(paths.ca_key, _pem_key(ca_key))
    _write_public(paths.ca_cert, _pem_cert(ca_cert))
    _write_private(paths.server_key, _pem_key(srv_key))
    _write_public(paths.server_cert, _pem_cert(srv_cert))
    paths.site_keys.mkdir(exist_ok=True)
    logger.info(
        "Created consortium CA %s and server certificate %s covering %s (valid %d days).",
        paths.ca_cert, paths.server_cert, ", ".join(dns + ip_list), server_days,
    )
    return paths


def _check_site_name(site: str) -> None:
    try:
        check_site_name(site)
    except ValueError as exc:
        raise CertsError(str(exc)) from None


def issue_site(
    site: str,
    *,
    pki: str | Path | None = None,
    ca_cert: str | Path | None = None,
    out: str | Path | None = None,
    force: bool = False,
) -> SiteBundle:
    """Create a site's ECDSA P-384 key pair and copy the CA certificate it must trust.

    ``pki``: the folder made by :func:`init_pki` (the public key is also copied into
    ``<pki>/site_keys/<site>.pub``); ``ca_cert``: the CA certificate when running at the hospital
    without the PKI folder; ``out``: where the site's files go (default ``<pki>/sites/<site>``).
    """
    _check_site_name(site)
    pki_dir = Path(pki) if pki is not None else None
    ca_path = Path(ca_cert) if ca_cert is not None else (pki_dir / "ca.pem" if pki_dir else None)
    if ca_path is None:
        raise CertsError("give --pki (the folder made by 'tdamil-certs init') or --ca (the consortium's ca.pem).")
    if not ca_path.is_file():
        raise CertsError(f"{ca_path}: CA certificate not found. Run 'tdamil-certs init' first or fix --pki/--ca.")
    ca = _load_cert(ca_path)
    if not _is_ca(ca):
        raise CertsError(f"{ca_path} is not a CA certificate (BasicConstraints CA:FALSE). Pass the consortium ca.pem.")
    if out is None:
        if pki_dir is None:
            raise CertsError("give --out (where to write the site's files) when using --ca without --pki.")
        out = pki_dir / "sites" / site
    out_dir = Path(out)
    bundle = SiteBundle(
        site=site,
        folder=out_dir,
        ca_cert=out_dir / "ca.pem",
        private_key=out_dir / f"{site}.key",
        public_key=out_dir / f"{site}.pub",
        registered_copy=(pki_dir / "site_keys" / f"{site}.pub") if pki_dir else None,
    )
    targets = [bundle.private_key, bundle.public_key]
    if bundle.registered_copy is not None:
        targets.append(bundle.registered_copy)
    _refuse_overwrite(targets, force)

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public = public + f" tdamil-site:{site}\n".encode()
    _write_private(bundle.private_key, private)
    _write_public(bundle.public_key, public)
    if ca_path.resolve() != bundle.ca_cert.resolve():
        _write_public(bundle.ca_cert, ca_path.read_bytes())
    if bundle.registered_copy is not None:
        _write_public(bundle.registered_copy, public)
    logger.info(
        "Site %s: private key %s (keep it on the site, mode 0600), public key %s (fingerprint %s).",
        site, bundle.private_key, bundle.public_key, public_key_fingerprint(bundle.public_key),
    )
    return bundle


# --------------------------------------------------------------------------------------------
# reading and checking
def _load_cert(path: Path) -> x509.Certificate:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CertsError(f"{path}: cannot read the certificate ({exc.strerror}).") from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise CertsError(
            f"{path}: not a valid X.509 certificate (damaged or not a certificate). "
            "Copy it again from the coordinator or re-create it with 'tdamil-certs init'."
        ) from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _verify_signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    pub = ca.public_key()
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(pub, rsa.RSAPublicKey):
            pub.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
        else:  # Ed25519 and friends
            pub.verify(cert.signature, cert.tbs_certificate_bytes)  # type: ignore[call-arg]
    except InvalidSignature:
        return False
    return True


def _load_private_key(path: Path):
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CertsError(f"{path}: cannot read the private key ({exc.strerror}).") from None
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            return serialization.load_ssh_private_key(data, password=None)
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertsError(f"{path}: not a readable unencrypted private key (damaged, encrypted or wrong file).") from None


def _pub_bytes(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_certificate(
    cert: str | Path,
    ca: str | Path,
    *,
    host: Optional[str] = None,
    key: str | Path | None = None,
    warn_days: int = 30,
    at: Optional[dt.datetime] = None,
) -> CertReport:
    """Verify ``cert`` against ``ca``: signature chain, validity dates, SAN coverage, key match.

    Raises :class:`CertsError` with a message naming the file and the fix on the first failure;
    returns a :class:`CertReport` (with warnings, e.g. expiry within ``warn_days``) otherwise.
    """
    cert_path, ca_path = Path(cert), Path(ca)
    c = _load_cert(cert_path)
    a = _load_cert(ca_path)
    now = at or _now()
    if not _is_ca(a):
        raise CertsError(f"{ca_path} is not a CA certificate; pass the consortium ca.pem as --ca.")
    if c.issuer != a.subject or not _verify_signed_by(c, a):
        raise CertsError(
            f"{cert_path} was not signed by the CA in {ca_path} (issuer {c.issuer.rfc4514_string()!r}, "
            f"CA {a.subject.rfc4514_string()!r}), or the certificate was altered. Use the ca.pem from the same "
            "'tdamil-certs init' run, or re-issue the server certificate."
        )
    for label, x, p in (("CA certificate", a, ca_path), ("certificate", c, cert_path)):
        if now < x.not_valid_before_utc:
            raise CertsError(
                f"{p}: {label} is not valid before {x.not_valid_before_utc:%Y-%m-%d %H:%M} UTC. "
                "Check this machine's clock (NTP) or re-issue it."
            )
        if now > x.not_valid_after_utc:
            raise CertsError(
                f"{p}: {label} expired on {x.not_valid_after_utc:%Y-%m-%d}. Re-issue it with 'tdamil-certs init' "
                "(sites then need the new ca.pem if the CA changed)."
            )
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
        ips = [str(i) for i in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns, ips = [], []
    days_left = (c.not_valid_after_utc - now).total_seconds() / 86400
    report = CertReport(
        subject=c.subject.rfc4514_string(),
        issuer=c.issuer.rfc4514_string(),
        not_before=c.not_valid_before_utc,
        not_after=c.not_valid_after_utc,
        days_left=days_left,
        dns_names=list(dns),
        ip_addresses=ips,
    )
    if host:
        if not _host_covered(host, dns, ips):
            raise CertsError(
                f"{cert_path} does not cover {host!r} (it covers {', '.join(dns + ips) or 'nothing'}). "
                f"Sites dialling {host!r} will refuse it: re-run 'tdamil-certs init' with "
                f"--server-name/--ip {host}."
            )
    if key is not None:
        priv = _load_private_key(Path(key))
        if _pub_bytes(priv.public_key()) != _pub_bytes(c.public_key()):
            raise CertsError(f"{key} is not the private key of {cert_path}. Use the key written next to it.")
    if days_left < warn_days:
        report.warnings.append(f"{cert_path} expires in {days_left:.0f} days: renew it soon.")
    if "127.0.0.1" not in ips:
        report.warnings.append(f"{cert_path} does not cover 127.0.0.1: local runs and the proxy upstream will fail.")
    return report


def _host_covered(host: str, dns: Sequence[str], ips: Sequence[str]) -> bool:
    try:
        return str(ipaddress.ip_address(host)) in ips
    except ValueError:
        pass
    host = host.lower().rstrip(".")
    for name in dns:
        name = name.lower().rstrip(".")
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False


def load_site_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """Read a site's ``<site>.pub`` (OpenSSH or PEM) and require an ECDSA key on a NIST curve."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertsError(f"{path}: cannot read the site public key ({exc.strerror}).") from None
    try:
        key = (
            serialization.load_pem_public_key(data)
            if data.lstrip().startswith(b"-----BEGIN")
            else serialization.load_ssh_public_key(data)
        )
    except (ValueError, UnsupportedAlgorithm):
        raise CertsError(
            f"{path}: not a readable public key. Expected the '<site>.pub' written by 'tdamil-certs issue' "
            "(one line starting with 'ecdsa-sha2-nistp384')."
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertsError(f"{path}: a {type(key).__name__} key; site keys must be ECDSA P-384 ('tdamil-certs issue').")
    if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise CertsError(f"{path}: curve {key.curve.name} is not a NIST curve accepted by Flower; use P-384.")
    return key


def check_site_key(private_key: str | Path, public_key: str | Path | None = None) -> str:
    """Check a site's private key (OpenSSH ECDSA, mode 0600) and that it matches ``public_key``.

    Returns the key's fingerprint; raises :class:`CertsError` otherwise.
    """
    path = Path(private_key)
    priv = _load_private_key(path)
    if not isinstance(priv, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{path}: not an ECDSA key; create the site key with 'tdamil-certs issue'.")
    if b"OPENSSH PRIVATE KEY" not in path.read_bytes():
        raise CertsError(
            f"{path}: in PEM format, but flower-supernode reads OpenSSH private keys. Re-create it with 'tdamil-certs issue'."
        )
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise CertsError(f"{path}: readable by other users (mode {path.stat().st_mode & 0o777:o}). Run: chmod 600 {path}")
    if public_key is not None:
        pub = load_site_public_key(public_key)
        if _pub_bytes(pub) != _pub_bytes(priv.public_key()):
            raise CertsError(
                f"{path} does not match {public_key}: the coordinator registered another key. Send the current "
                "<site>.pub to the coordinator to register it, or use the matching private key."
            )
    return public_key_fingerprint(priv.public_key())


def public_key_fingerprint(key_or_path) -> str:
    """SHA-256 fingerprint (``SHA256:...`` as ssh-keygen prints it) of a public key or .pub file."""
    import base64
    import hashlib

    key = load_site_public_key(key_or_path) if isinstance(key_or_path, (str, Path)) else key_or_path
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


# --------------------------------------------------------------------------------------------
# command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tdamil-certs",
        description="Consortium CA, coordinator TLS certificate and site keys for tdamil-fl.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    pi = sub.add_parser("init", help="create the consortium CA and the coordinator's server certificate")
    pi.add_argument("--out", required=True, type=Path,
                    help="folder to write (e.g. certs/); site public keys go to <out>/site_keys/")
    pi.add_argument("--server-name", action="append", default=[], required=True,
                    help="DNS name sites dial (repeat for several); localhost is always added")
    pi.add_argument("--ip", action="append", default=[], help="IP address sites dial (repeatable); 127.0.0.1 is always added")
    pi.add_argument("--org", default="tdamil-fl consortium", help="organisation name in the certificates")
    pi.add_argument("--ca-days", type=int, default=3650, help="CA validity in days (default 3650)")
    pi.add_argument("--server-days", type=int, default=397, help="server certificate validity in days (default 397)")
    pi.add_argument("--force", action="store_true", help="replace existing files (invalidates what sites hold)")

    ps = sub.add_parser("issue", help="create a site's key pair and copy the CA certificate it trusts")
    ps.add_argument("--site", required=True, help="site name, e.g. site_a")
    ps.add_argument("--pki", type=Path, default=None,
                    help="the folder made by 'init' (default: pki if it exists); the public key is also copied to "
                         "<pki>/site_keys/<site>.pub, the folder auth.site_public_keys names")
    ps.add_argument("--ca", type=Path, default=None, help="the consortium ca.pem (at a hospital, without the PKI folder)")
    ps.add_argument("--out", type=Path, default=None, help="where the site's files go (default <pki>/sites/<site>)")
    ps.add_argument("--force", action="store_true", help="replace an existing key (it must then be registered again)")

    pc = sub.add_parser("check", help="verify a certificate (chain, expiry, host coverage, key) or a site key")
    pc.add_argument("--cert", type=Path, help="certificate to check (e.g. pki/server.pem)")
    pc.add_argument("--ca", type=Path, help="CA certificate that must have signed it")
    pc.add_argument("--host", action="append", default=[], help="name or IP the certificate must cover (repeatable)")
    pc.add_argument("--key", type=Path, help="private key that must match --cert")
    pc.add_argument("--site-key", type=Path, help="a site's private key to check (OpenSSH ECDSA, mode 0600)")
    pc.add_argument("--site-pub", type=Path, help="the registered public key --site-key must match")
    pc.add_argument("--warn-days", type=int, default=30, help="warn when fewer days are left (default 30)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tdamil-certs``; returns the exit status (0 ok, 1 a check failed, 2 usage)."""
    setup_logging()
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            paths = init_pki(
                args.out, args.server_name, args.ip, organisation=args.org,
                ca_days=args.ca_days, server_days=args.server_days, force=args.force,
            )
            print(f"CA certificate:      {paths.ca_cert}   (give to every site)")
            print(f"CA key:              {paths.ca_key}   (keep offline)")
            print(f"server certificate:  {paths.server_cert}")
            print(f"server key:          {paths.server_key}")
            print(f"site keys folder:    {paths.site_keys}   (auth.site_public_keys)")
        elif args.command == "issue":
            pki = args.pki
            if pki is None and args.ca is None and Path("pki/ca.pem").is_file():
                pki = Path("pki")
            b = issue_site(args.site, pki=pki, ca_cert=args.ca, out=args.out, force=args.force)
            print(f"site {b.site}: folder {b.folder}")
            print(f"  tls.ca_cert:      {b.ca_cert}")
            print(f"  auth.private_key: {b.private_key}   (stays on site, mode 0600)")
            print(f"  public key:       {b.public_key}   fingerprint {public_key_fingerprint(b.public_key)}")
            if b.registered_copy:
                print(f"  copied to:        {b.registered_copy}   (register with the SuperLink)")
        else:
            if not args.cert and not args.site_key:
                print("tdamil-certs check: give --cert (with --ca) and/or --site-key.", file=sys.stderr)
                return 2
            if args.cert:
                if not args.ca:
                    print("tdamil-certs check: --cert needs --ca (the consortium ca.pem).", file=sys.stderr)
                    return 2
                report = None
                for host in args.host or [None]:
                    report = check_certificate(args.cert, args.ca, host=host, key=args.key, warn_days=args.warn_days)
                assert report is not None
                print(f"OK: {args.cert} is signed by {args.ca}, valid, "
                      + (f"covers {', '.join(args.host)}" if args.host else "no host checked")
                      + (f", matches {args.key}" if args.key else ""))
                print(report.summary())
            if args.site_key:
                fp = check_site_key(args.site_key, args.site_pub)
                print(f"OK: site key {args.site_key} ({fp})" + (f" matches {args.site_pub}" if args.site_pub else ""))
    except CertsError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    """Console script wrapper (``tdamil-certs``)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
