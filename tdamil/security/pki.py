"""Issuing the consortium's certificates and site keys (``tdamil-certs init`` / ``issue``).

* :func:`init_pki` creates the consortium CA and the coordinator's TLS server certificate. Its
  subject alternative names (SAN) list every DNS name and IP address sites dial, and always
  ``localhost`` and ``127.0.0.1`` (local runs, the loopback Control API, the gateway's upstream).
* :func:`issue_site` creates what one hospital needs: the CA certificate to trust and the site's
  ECDSA P-384 key pair for SuperNode authentication, in OpenSSH format (what
  ``flower-supernode --auth-supernode-private-key`` reads and ``flwr supernode register`` expects).
  The public key is also copied into ``<pki>/site_keys/<site>.pub``, the folder the coordinator's
  ``auth.site_public_keys`` names.

Private keys are written with mode 0600 and never overwritten unless ``force`` is given.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tdamil.atomic import atomic_path
from tdamil.security.certcheck import CertsError, is_ca, load_cert, public_key_fingerprint
from tdamil.security.config import check_site_name

logger = logging.getLogger(__name__)

__all__ = ["PkiPaths", "SiteBundle", "init_pki", "issue_site"]

ALWAYS_DNS = ("localhost",)
ALWAYS_IPS = ("127.0.0.1",)


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
    ca = load_cert(ca_path)
    if not is_ca(ca):
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
