"""Checks run before the coordinator or a site starts Flower, turning TLS failures into clear advice.

Flower reports a wrong CA, a plaintext server or a certificate for the wrong name as a bare
``CERTIFICATE_VERIFY_FAILED`` / "Server disconnected" after retries. ``flwr-server`` and
``tdamil-client`` call these functions first:

* :func:`check_coordinator_security` - the coordinator's one security precondition check: TLS
  files complete and fitting (:func:`check_server_tls`), node authentication only with TLS and
  with a folder of site keys; plaintext only with ``--insecure`` (:func:`require_tls`);
* :func:`check_site_security` - the site's one security precondition check: its CA file and
  private key are usable; plaintext only with ``--insecure``;
* :func:`probe_tls` - a real TLS handshake with the SuperLink (or the proxy) the way the SuperNode
  will do it, explaining what is wrong when it fails.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path
from typing import Literal, Optional, Sequence

from tdamil.net import split_host_port
from tdamil.security.certcheck import CertsError, check_certificate, check_site_key, is_ca, load_cert
from tdamil.security.config import ServerAuthConfig, SiteAuthConfig, TLSConfig

logger = logging.getLogger(__name__)

__all__ = ["SecurityCheckError", "CoordinatorNotReady", "require_tls", "check_server_tls", "check_coordinator_security",
           "check_site_security", "probe_tls"]

_WILDCARD_HOSTS = ("0.0.0.0", "::", "", "127.0.0.1", "localhost")


class SecurityCheckError(RuntimeError):
    """A security precondition failed; the message names the file or address and the fix."""


class CoordinatorNotReady(SecurityCheckError):
    """The address accepted the TCP connection and closed it before any TLS answer: what a proxy
    (or a load balancer) in front of a coordinator that is not up yet does. Retrying may fix it."""


def _split(address: str) -> tuple[str, int]:
    try:
        return split_host_port(address)
    except ValueError as exc:
        raise SecurityCheckError(str(exc)) from None


def require_tls(tls: TLSConfig, insecure: bool, role: Literal["server", "site"], source: str = "config") -> bool:
    """Return whether TLS is used; refuse plaintext unless ``insecure`` was given explicitly.

    Server: ``tls.ca_cert``, ``tls.cert`` and ``tls.key`` are all needed. Site: ``tls.ca_cert``.
    """
    needed = ("ca_cert", "cert", "key") if role == "server" else ("ca_cert",)
    missing = [k for k in needed if getattr(tls, k) is None]
    if insecure:
        logger.warning(
            "--insecure: model weights and metrics travel UNENCRYPTED. Use this only for tests on one machine."
        )
        return False
    if missing:
        what = ", ".join(f"tls.{k}" for k in missing)
        raise SecurityCheckError(
            f"{source}: {what} not set, and plaintext is refused. Create certificates with 'tdamil-certs init' "
            f"(coordinator) / copy the consortium ca.pem (site) and set {what}; pass --insecure only for local tests."
        )
    for k in needed:
        p = Path(getattr(tls, k))
        if not p.is_file():
            raise SecurityCheckError(f"{source}: tls.{k} = {p} does not exist. Fix the path or run 'tdamil-certs'.")
    return True


def check_server_tls(tls: TLSConfig, public_names: Sequence[str] = (), source: str = "config") -> None:
    """The coordinator's certificate is signed by ``tls.ca_cert``, valid, matches ``tls.key`` and
    covers 127.0.0.1 and every name in ``public_names``."""
    require_tls(tls, insecure=False, role="server", source=source)
    try:
        report = None
        for host in ["127.0.0.1", *public_names]:
            report = check_certificate(tls.cert, tls.ca_cert, host=host, key=tls.key)
    except CertsError as exc:
        raise SecurityCheckError(f"{source}: {exc}") from None
    for w in report.warnings if report else []:
        logger.warning("%s", w)


def check_coordinator_security(tls: TLSConfig, auth: ServerAuthConfig, *, insecure: bool, public_address: str,
                               source: str = "config") -> bool:
    """The coordinator's one security precondition check, before anything starts; returns whether
    TLS is on. ``public_address`` is where sites dial (``superlink.address``): a DNS name there must
    be covered by the certificate; an IP there only warns (sites may dial a covered DNS name)."""
    given = [tls.ca_cert, tls.cert, tls.key]
    if insecure:
        if auth.enabled:
            raise SecurityCheckError(f"{source}: auth.enabled needs TLS (Flower refuses node authentication "
                                     "without it); drop --insecure or set auth.enabled: false for a local test.")
        if any(given):
            logger.warning("--insecure given: the TLS certificates in %s are ignored.", source)
        return False
    if any(given) and not all(given):
        raise SecurityCheckError(f"{source}: 'tls' needs ca_cert, cert and key together (or none with --insecure).")
    host, _ = _split(public_address)
    check_server_tls(tls, [], source=source)  # parse, CA signature, validity, key, 127.0.0.1
    if host not in _WILDCARD_HOSTS:
        try:
            check_server_tls(tls, [host], source=source)
        except SecurityCheckError as exc:
            if not _is_ip(host):
                raise  # sites dial this name: the certificate must cover it
            logger.warning("%s (sites must dial a name the certificate covers).", " ".join(str(exc).split()))
    if auth.enabled:
        folder = auth.site_public_keys
        if folder is None or not Path(folder).is_dir() or not any(Path(folder).glob("*.pub")):
            raise SecurityCheckError(f"{source}: 'auth.enabled' is true but 'auth.site_public_keys' ({folder}) is not "
                                     "a folder of <site>.pub files. Collect each site's <site>.pub there "
                                     "(certs/site_keys/, written by `tdamil-certs issue`).")
    return True


def _is_ip(host: str) -> bool:
    import ipaddress  # noqa: PLC0415

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_site_security(
    tls: TLSConfig, auth: SiteAuthConfig, insecure: bool = False, source: str = "config"
) -> None:
    """The site's one security precondition check: unless ``insecure``, ``tls.ca_cert`` is set and is a
    readable CA; ``auth.private_key`` (if any) is a usable, private OpenSSH key."""
    if require_tls(tls, insecure, role="site", source=source):
        try:
            ca = load_cert(Path(tls.ca_cert))
        except CertsError as exc:
            raise SecurityCheckError(f"{source}: tls.ca_cert: {exc}") from None
        if not is_ca(ca):
            raise SecurityCheckError(f"{source}: tls.ca_cert = {tls.ca_cert} is not a CA certificate; use the consortium ca.pem.")
    if auth.private_key is not None:
        if not Path(auth.private_key).is_file():
            raise SecurityCheckError(f"{source}: auth.private_key = {auth.private_key} does not exist.")
        try:
            check_site_key(auth.private_key)
        except CertsError as exc:
            raise SecurityCheckError(f"{source}: auth.private_key: {exc}") from None


def probe_tls(address: str, ca_cert: Path | str, timeout: float = 5.0, server_name: Optional[str] = None) -> str:
    """TLS handshake with ``address`` verifying against ``ca_cert`` (as flower-supernode will).

    Returns the negotiated TLS version; raises :class:`SecurityCheckError` saying what is wrong:
    unreachable, plaintext server, certificate from another CA, name not covered, expired; and
    :class:`CoordinatorNotReady` when the connection was closed before any TLS answer.
    """
    host, port = _split(address)
    name = server_name or host
    ctx = ssl.create_default_context(cafile=str(ca_cert))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror:
        raise SecurityCheckError(f"cannot resolve {host!r}: check federation.superlink and the site's DNS.") from None
    except (ConnectionRefusedError, socket.timeout, TimeoutError, OSError) as exc:
        raise SecurityCheckError(
            f"cannot reach the coordinator at {address} ({exc.__class__.__name__}: {exc}). Is it running, is the "
            "address right, does the hospital firewall allow outbound TCP to that port?"
        ) from None
    try:
        with ctx.wrap_socket(sock, server_hostname=name) as tls_sock:
            return str(tls_sock.version())
    except ssl.SSLCertVerificationError as exc:
        code = getattr(exc, "verify_code", None)
        msg = getattr(exc, "verify_message", str(exc))
        if code == 62 or "mismatch" in str(msg).lower():
            raise SecurityCheckError(
                f"the coordinator's certificate does not cover {name!r} ({msg}). Dial the name in its certificate "
                "or ask the coordinator to re-issue it with 'tdamil-certs init --server-name/--ip'."
            ) from None
        if code in (9, 10):
            raise SecurityCheckError(
                f"the coordinator's certificate at {address} is not valid at this machine's time ({msg}). Check "
                "this machine's clock; otherwise the coordinator must renew it ('tdamil-certs init')."
            ) from None
        raise SecurityCheckError(
            f"the certificate presented by {address} is not signed by the CA in {ca_cert} ({msg}). Get the "
            "current ca.pem from the coordinator, or you are not talking to the coordinator."
        ) from None
    except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError) as exc:
        raise CoordinatorNotReady(
            f"{address} accepted the connection and closed it without answering the TLS handshake ({exc}): the "
            "coordinator, or a proxy in front of it whose coordinator is not up yet, is not ready."
        ) from None
    except ssl.SSLError as exc:
        text = f"{exc.reason or ''} {exc}".upper()
        if any(s in text for s in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST")):
            raise SecurityCheckError(
                f"{address} does not speak TLS (a plaintext server, e.g. started with --insecure). Refusing to send "
                "model weights unencrypted: the coordinator must run with its certificate."
            ) from None
        raise SecurityCheckError(f"TLS handshake with {address} failed: {exc}.") from None
    except (socket.timeout, TimeoutError, OSError) as exc:
        raise SecurityCheckError(
            f"{address} closed the connection during the TLS handshake ({exc}); it may not speak TLS."
        ) from None
