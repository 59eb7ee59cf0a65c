"""Reading and checking certificates and site keys: the verdicts come from ``cryptography``.

* :func:`check_certificate` - a certificate against the consortium CA: chain, validity dates and
  the host it must cover are decided by ``cryptography.x509.verification`` (the same RFC 5280 /
  CA/B-profile path validation a TLS client does); this module only explains a refusal (which
  file, what is wrong, the fix) and checks that the private key matches;
* :func:`check_site_key` / :func:`load_site_public_key` / :func:`public_key_fingerprint` - a
  site's OpenSSH ECDSA key pair, as ``flower-supernode`` and ``flwr supernode register`` use it.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

__all__ = ["CertsError", "CertReport", "check_certificate", "check_site_key", "load_site_public_key",
           "public_key_fingerprint", "load_cert", "is_ca"]


class CertsError(ValueError):
    """A certificate or key is missing, invalid or does not fit. The message says how to fix it."""


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


def load_cert(path: Path) -> x509.Certificate:
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


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


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


def _san(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return list(san.get_values_for_type(x509.DNSName)), [str(i) for i in san.get_values_for_type(x509.IPAddress)]


def _subject(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _verify(cert: x509.Certificate, ca: x509.Certificate, name: str, now: dt.datetime) -> Optional[str]:
    """cryptography's path validation of ``cert`` (issued by ``ca``) for a TLS server named ``name``
    at time ``now``; None when valid, else the verifier's reason."""
    verifier = PolicyBuilder().store(Store([ca])).time(now).build_server_verifier(_subject(name))
    try:
        verifier.verify(cert, [])
    except VerificationError as exc:
        return str(exc)
    return None


def _explain(cert_path: Path, ca_path: Path, c: x509.Certificate, a: x509.Certificate, now: dt.datetime,
             host: str, covered: list[str], reason: str) -> str:
    """Why the verifier refused, in the operator's terms, with the fix."""
    for label, x, p in (("CA certificate", a, ca_path), ("certificate", c, cert_path)):
        if now < x.not_valid_before_utc:
            return (f"{p}: {label} is not valid before {x.not_valid_before_utc:%Y-%m-%d %H:%M} UTC. Check this "
                    "machine's clock (NTP) or re-issue it.")
        if now > x.not_valid_after_utc:
            return (f"{p}: {label} expired on {x.not_valid_after_utc:%Y-%m-%d}. Re-issue it with 'tdamil-certs init' "
                    "(sites then need the new ca.pem if the CA changed).")
    if covered and _verify(c, a, covered[0], now) is None:  # valid for its own name: the host is the problem
        return (f"{cert_path} does not cover {host!r} (it covers {', '.join(covered)}). Sites dialling {host!r} "
                f"will refuse it: re-run 'tdamil-certs init' with --server-name/--ip {host}.")
    return (f"{cert_path} was not signed by the CA in {ca_path} (issuer {c.issuer.rfc4514_string()!r}, CA "
            f"{a.subject.rfc4514_string()!r}), or the certificate was altered ({reason}). Use the ca.pem from the "
            "same 'tdamil-certs init' run, or re-issue the server certificate.")


def check_certificate(
    cert: str | Path,
    ca: str | Path,
    *,
    host: Optional[str] = None,
    key: str | Path | None = None,
    warn_days: int = 30,
    at: Optional[dt.datetime] = None,
) -> CertReport:
    """Verify ``cert`` against ``ca``: signature chain, validity dates, coverage of ``host`` (when
    given), and that ``key`` is its private key.

    Raises :class:`CertsError` with a message naming the file and the fix on the first failure;
    returns a :class:`CertReport` (with warnings, e.g. expiry within ``warn_days``) otherwise.
    """
    cert_path, ca_path = Path(cert), Path(ca)
    c = load_cert(cert_path)
    a = load_cert(ca_path)
    now = at or dt.datetime.now(dt.timezone.utc)
    if not is_ca(a):
        raise CertsError(f"{ca_path} is not a CA certificate; pass the consortium ca.pem as --ca.")
    dns, ips = _san(c)
    covered = dns + ips
    name = host or (covered[0] if covered else "localhost")  # no host asked: chain and dates only
    reason = _verify(c, a, name, now)
    if reason is not None:
        raise CertsError(_explain(cert_path, ca_path, c, a, now, name, covered, reason))
    if key is not None:
        priv = _load_private_key(Path(key))
        if _pub_bytes(priv.public_key()) != _pub_bytes(c.public_key()):
            raise CertsError(f"{key} is not the private key of {cert_path}. Use the key written next to it.")
    days_left = (c.not_valid_after_utc - now).total_seconds() / 86400
    report = CertReport(subject=c.subject.rfc4514_string(), issuer=c.issuer.rfc4514_string(),
                        not_before=c.not_valid_before_utc, not_after=c.not_valid_after_utc, days_left=days_left,
                        dns_names=dns, ip_addresses=ips)
    if days_left < warn_days:
        report.warnings.append(f"{cert_path} expires in {days_left:.0f} days: renew it soon.")
    if "127.0.0.1" not in ips:
        report.warnings.append(f"{cert_path} does not cover 127.0.0.1: local runs and the proxy upstream will fail.")
    return report


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
    key = load_site_public_key(key_or_path) if isinstance(key_or_path, (str, Path)) else key_or_path
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


