"""Register hospitals' public keys with the SuperLink (SuperNode authentication).

With ``flower-superlink --enable-supernode-auth`` only SuperNodes whose ECDSA public key was
registered beforehand may join; everybody else is refused at ``activate-node`` (Flower error code
2004, "Failed to activate SuperNode"). Flower 1.42 registers keys through the **Control API**
(``flwr supernode register <site>.pub``), which sends a ``RegisterNodeRequest`` to
``/v1/control/register-node``. :func:`register_site_keys` sends exactly that request with Flower's
own HTTP client, for every ``<site>.pub`` in a folder, and is idempotent (a key already
registered keeps its node id), so it can run at every coordinator start.

The Control API is not authenticated in the open-source Flower build: whoever reaches it can
register keys, start or stop runs. In Flower 1.42 the Control, Fleet and Runtime APIs share the
SuperLink's one HTTPS port (``--host``/``--port``). Therefore:

* the SuperLink listens on the coordinator's loopback only (``--host 127.0.0.1``), and
* hospitals reach the Fleet API through a reverse proxy that forwards ``/v1/fleet/`` and nothing
  else (``deploy/proxy/nginx.conf``, ``deploy/proxy/envoy.yaml``).

This module refuses to talk to a Control API that is not on a loopback address.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from tdamil.net import split_host_port, wait_for_port
from tdamil.security.certs import CertsError, load_site_public_key, public_key_fingerprint

logger = logging.getLogger(__name__)

__all__ = [
    "NodeAuthError",
    "RegisteredSite",
    "SiteNode",
    "register_site_keys",
    "connection_from_flwr_home",
    "list_site_nodes",
    "unregister_site",
    "site_key_files",
    "require_loopback",
]


class NodeAuthError(RuntimeError):
    """Registering or listing site keys failed; the message says why and what to do."""


@dataclass
class RegisteredSite:
    """One registered key: site name (from ``<site>.pub``), Flower node id, key fingerprint."""

    site: str
    node_id: int
    fingerprint: str
    newly_registered: bool


@dataclass
class SiteNode:
    """A SuperNode known to the SuperLink (from ``ListNodes``)."""

    node_id: int
    name: str
    status: str  # registered | online | offline | unregistered
    public_key_pem: str

    def same_key(self, pem: bytes | str) -> bool:
        """Whether this node's registered key equals ``pem`` (compared as DER, not as text)."""
        from cryptography.hazmat.primitives import serialization

        def der(value: bytes | str) -> bytes:
            raw = value.encode() if isinstance(value, str) else value
            key = serialization.load_pem_public_key(raw)
            return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

        try:
            return der(self.public_key_pem) == der(pem)
        except ValueError:
            return False


def require_loopback(address: str) -> tuple[str, int]:
    """Split ``host:port`` and require a loopback host (127.0.0.0/8, ::1 or localhost)."""
    try:
        host, port = split_host_port(address, "the Control API address")
    except ValueError as exc:
        raise NodeAuthError(str(exc)) from None
    loopback = host == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if not loopback:
        raise NodeAuthError(
            f"refusing to use the Control API at {address}: it is not authenticated in Flower's open-source "
            "build and must stay on the coordinator's loopback (run flower-superlink with --host 127.0.0.1 and "
            "expose only /v1/fleet/ through the proxy in deploy/proxy/). Run this on the coordinator."
        )
    return host, port


def site_key_files(keys: Path | str | Iterable[Path | str]) -> dict[str, Path]:
    """``<site>.pub`` files from a folder (or an explicit list) -> {site: path}."""
    if isinstance(keys, (str, Path)) and Path(keys).is_dir():
        files = sorted(Path(keys).glob("*.pub"))
        if not files:
            raise NodeAuthError(
                f"{keys}: no <site>.pub files. Put each site's public key there ('tdamil-certs issue' writes them)."
            )
    elif isinstance(keys, (str, Path)):
        if not Path(keys).is_file():
            raise NodeAuthError(f"{keys}: no such file or folder of site public keys (auth.site_public_keys).")
        files = [Path(keys)]
    else:
        files = [Path(k) for k in keys]
    out: dict[str, Path] = {}
    for f in files:
        site = f.name[: -len(".pub")] if f.name.endswith(".pub") else f.stem
        if site in out:
            raise NodeAuthError(f"two public keys for site {site!r}: {out[site]} and {f}. Keep one.")
        out[site] = f
    return out


def _client(address: str, ca_cert: Optional[Path], insecure: bool):
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.supercore.control import ControlHttpClient

    require_loopback(address)
    if not insecure:
        if ca_cert is None:
            raise NodeAuthError(
                "the SuperLink runs with TLS: pass the consortium CA certificate (tls.ca_cert) to reach its Control API."
            )
        if not Path(ca_cert).is_file():
            raise NodeAuthError(f"{ca_cert}: CA certificate not found (tls.ca_cert).")
    return ControlHttpClient.from_server_address(
        address,
        insecure=insecure,
        root_certificates=None if insecure else Path(ca_cert).read_bytes(),
        interceptors=[CliClientHttpInterceptor()],
    )


def _error_detail(exc: Exception) -> tuple[Optional[int], str]:
    response = getattr(exc, "response", None)
    if response is None:
        return None, str(exc)
    try:
        body = response.json()
        return body.get("code"), str(body.get("detail", response.text))
    except ValueError:
        return None, response.text or str(exc)


def list_site_nodes(
    control_address: str, *, ca_cert: Optional[Path | str] = None, insecure: bool = False
) -> dict[int, SiteNode]:
    """SuperNodes known to the SuperLink: ``{node_id: SiteNode(name, status, ...)}``."""
    from flwr.proto.control_pb2 import ListNodesRequest

    client = _client(control_address, Path(ca_cert) if ca_cert else None, insecure)
    try:
        reply = client.ListNodes(ListNodesRequest())
    except Exception as exc:  # httpx errors, TLS errors
        raise NodeAuthError(f"listing SuperNodes at {control_address} failed: {_error_detail(exc)[1]}") from exc
    finally:
        client.close()
    return {
        int(n.node_id): SiteNode(
            int(n.node_id), n.name, n.status,
            n.public_key.decode() if isinstance(n.public_key, bytes) else n.public_key,
        )
        for n in reply.nodes_info
    }


def connection_from_flwr_home(flwr_home: Path | str, name: str) -> tuple[str, Optional[Path], bool]:
    """(address, root certificates, insecure) of connection ``name`` in ``<flwr_home>/config.toml``,
    the file ``flwr`` CLI commands (``flwr supernode register <key> <name>``) read."""
    import tomllib

    path = Path(flwr_home) / "config.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise NodeAuthError(f"{path}: cannot read the Flower CLI configuration ({exc}).") from None
    conn = data.get("superlink", {}).get(name)
    if not isinstance(conn, dict) or "address" not in conn:
        raise NodeAuthError(f"{path}: no [superlink.{name}] connection with an address.")
    ca = conn.get("root-certificates")
    return str(conn["address"]), (Path(ca) if ca else None), bool(conn.get("insecure", False))


def register_site_keys(
    keys: Path | str | Iterable[Path | str],
    control_address: Optional[str] = None,
    *,
    ca_cert: Optional[Path | str] = None,
    insecure: bool = False,
    superlink: Optional[str] = None,
    flwr_home: Optional[Path | str] = None,
    wait_s: float = 30.0,
) -> dict[str, RegisteredSite]:
    """Register every ``<site>.pub`` with the SuperLink's Control API (loopback only).

    ``keys``: the folder ``auth.site_public_keys`` (or a list of ``.pub`` files). Where the Control
    API is: ``control_address`` (``127.0.0.1:9093``) with ``ca_cert`` (the consortium CA; the
    SuperLink certificate covers 127.0.0.1) or ``insecure``; or, as ``flwr`` CLI commands do, a
    connection name ``superlink`` in ``<flwr_home>/config.toml``. Waits up to ``wait_s`` for the
    SuperLink to listen. A key registered before keeps its node id. Returns ``{site: RegisteredSite}``
    in file order (``list(result)`` gives the site names).
    """
    if control_address is None:
        if superlink is None or flwr_home is None:
            raise NodeAuthError("give the Control API address (127.0.0.1:<port>) or a Flower connection name + flwr_home.")
        control_address, conf_ca, conf_insecure = connection_from_flwr_home(flwr_home, superlink)
        ca_cert = ca_cert if ca_cert is not None else conf_ca
        insecure = insecure or conf_insecure
    from cryptography.hazmat.primitives import serialization
    from flwr.proto.control_pb2 import RegisterNodeRequest

    files = site_key_files(keys)
    loaded = {}
    for site, path in files.items():
        try:
            key = load_site_public_key(path)
        except CertsError as exc:
            raise NodeAuthError(str(exc)) from None
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        loaded[site] = (pem, public_key_fingerprint(key))
    host, port = require_loopback(control_address)
    try:
        wait_for_port(host, port, timeout=wait_s)
    except TimeoutError as exc:
        raise NodeAuthError(f"the SuperLink's Control API did not answer: {exc}. Is flower-superlink running "
                            "with --host/--port set to this address?") from None
    client = _client(control_address, Path(ca_cert) if ca_cert else None, insecure)
    result: dict[str, RegisteredSite] = {}
    known: Optional[dict[int, SiteNode]] = None
    try:
        for site, (pem, fp) in loaded.items():
            try:
                reply = client.RegisterNode(RegisterNodeRequest(public_key=pem, name=site))
                result[site] = RegisteredSite(site, int(reply.node_id), fp, True)
                logger.info("Registered site %s (key %s) as SuperNode %d.", site, fp, reply.node_id)
            except Exception as exc:
                code, detail = _error_detail(exc)
                if "already in use" not in detail.lower():
                    # a TLS server answers plain HTTP by closing the connection, or (depending on
                    # timing) by resetting it: both mean the same misconfiguration
                    if insecure and any(m in detail.lower() for m in ("disconnected", "connection reset")):
                        detail = ("the SuperLink speaks TLS and refused plain HTTP; pass the consortium CA "
                                  "(ca_cert) instead of insecure")
                    elif "CERTIFICATE_VERIFY_FAILED" in str(exc):
                        detail = (f"the SuperLink's certificate is not signed by {ca_cert}; pass the CA that "
                                  "signed tls.cert")
                    raise NodeAuthError(f"registering {files[site]} for site {site!r} failed: {detail}") from exc
                if known is None:
                    known = list_site_nodes(control_address, ca_cert=ca_cert, insecure=insecure)
                match = [n for n in known.values() if n.same_key(pem)]
                if not match:
                    raise NodeAuthError(f"site {site!r}: key reported in use but not listed; restart the SuperLink.") from exc
                result[site] = RegisteredSite(site, match[0].node_id, fp, False)
                if match[0].name and match[0].name != site:
                    logger.warning("Key %s of site %s is registered under the name %r.", fp, site, match[0].name)
                logger.info("Site %s (key %s) was already registered as SuperNode %d.", site, fp, match[0].node_id)
    finally:
        client.close()
    return result


def unregister_site(
    control_address: str, node_id: int, *, ca_cert: Optional[Path | str] = None, insecure: bool = False
) -> None:
    """Revoke a site: remove its SuperNode (and key) from the SuperLink."""
    from flwr.proto.control_pb2 import UnregisterNodeRequest

    client = _client(control_address, Path(ca_cert) if ca_cert else None, insecure)
    try:
        client.UnregisterNode(UnregisterNodeRequest(node_id=int(node_id)))
    except Exception as exc:
        raise NodeAuthError(f"unregistering SuperNode {node_id} failed: {_error_detail(exc)[1]}") from exc
    finally:
        client.close()
    logger.info("Unregistered SuperNode %d; its key can no longer join.", node_id)
