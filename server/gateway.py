"""Fleet-only gateway: the one port the coordinator exposes to the sites.

Flower 1.42's SuperLink serves its Fleet API (sites), Control API (register keys, start/stop runs;
not authenticated in the open-source build) and Runtime API (the ServerApp process) on ONE HTTP
port. The coordinator therefore binds the SuperLink to 127.0.0.1 and puts this small reverse proxy
on the public address. It forwards a request only when

* the method is ``POST``, and
* the raw request target, byte for byte and before any decoding or normalisation, is one of the
  twelve Fleet API paths a Flower 1.42 SuperNode calls (:data:`FLEET_PATHS`), without a query.

Everything else (dot segments, percent-encoding, backslashes, ``//``, ``;`` parameters, non-ASCII
bytes, absolute-form targets, other methods, other APIs) answers 404 and is logged with the
method, the escaped target and the client address. The upstream URL is built from the allow-list
entry itself, so what reaches the SuperLink is exactly the path that was checked; the ``Host``
header and ``X-Forwarded-*`` headers of the client are dropped, so they cannot steer the upstream.
The HTTP parser is h11 because it hands over the request target as received (httptools reduces an
absolute-form target ``http://host/path`` to its path before the application sees it).

With TLS it terminates TLS with the server certificate and talks TLS to the SuperLink on loopback.
Run as ``python -m tdamil.server.gateway --listen 0.0.0.0:9092 --upstream https://127.0.0.1:9093``
(``flwr-server`` starts and stops it); ``-v`` logs every forwarded call.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Any, Optional

import httpx

from tdamil.logs import setup_logging

logger = logging.getLogger("tdamil.server.gateway")  # the same name when run with -m

__all__ = ["FLEET_PATHS", "REFUSED_BODY", "FleetGateway", "refusal", "main"]

# The Fleet API calls of a Flower 1.42 SuperNode (flwr/supernode/fleet_http_client.py; the same set
# the SuperLink routes under /v1/fleet). register-node/unregister-node serve SuperNodes that
# register themselves (no node auth); with node auth the SuperLink refuses them itself.
FLEET_PATHS = frozenset(f"/v1/fleet/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received",
))
REFUSED_BODY = b"Not found: this address serves the Fleet API only.\n"
MAX_BODY = 64 * 1024 * 1024  # Flower sends model payloads in ~5 MiB objects; nginx.conf uses the same cap

# Only for the log line (the allow-list alone decides): name what the target tried.
_TRICKS = (
    (re.compile(rb"^[A-Za-z][A-Za-z0-9+.-]*:"), "absolute-form or authority-form target"),
    (re.compile(rb"[^\x21-\x7e]"), "non-ASCII or control byte"),
    (re.compile(rb"(^|[/\\])\.\.?([/\\;]|$)"), "dot segment"),
    (re.compile(rb"%"), "percent-encoding"),
    (re.compile(rb"\\"), "backslash"),
    (re.compile(rb"//"), "double slash"),
    (re.compile(rb";"), "';' parameter"),
)
_DROP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer",
                 "upgrade", "proxy-authorization", "proxy-authenticate", "proxy-connection", "expect",
                 "forwarded", "x-real-ip"}


def refusal(method: str, target: bytes, query: bytes = b"") -> Optional[str]:
    """Why a request must not be forwarded, or None when it may be: ``method`` must be POST and the
    raw ``target`` (bytes as received, before ``?``) exactly one of :data:`FLEET_PATHS`, ``query`` empty."""
    if method != "POST":
        return f"method {method!r} (POST only)"
    for pattern, what in _TRICKS:
        if pattern.search(target):
            return what
    if query:
        return "query string"
    if target.decode("ascii") not in FLEET_PATHS:
        return "not a Fleet API call"
    return None


def _shown(raw: bytes, limit: int = 200) -> str:
    """A request target safe to print on one log line (bytes escaped, length bounded)."""
    text = repr(raw[:limit])[2:-1]
    return text + ("..." if len(raw) > limit else "")


class _TooLarge(Exception):
    pass


async def _read_body(receive: Any) -> bytes:
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise _TooLarge
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


async def _answer(send: Any, status: int, body: bytes, headers: Optional[list[tuple[bytes, bytes]]] = None) -> None:
    if headers is None:
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class FleetGateway:
    """ASGI application forwarding only the Fleet API to ``upstream`` (``http(s)://127.0.0.1:port``)."""

    def __init__(self, upstream: str, ca_cert: Optional[str] = None, timeout: float = 300.0) -> None:
        self.base = httpx.URL(upstream)
        self.client = httpx.AsyncClient(verify=ca_cert if ca_cert else True, timeout=timeout,  # type: ignore[arg-type]
                                        follow_redirects=False, trust_env=False)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        target, query = scope["raw_path"], scope["query_string"]
        client = scope["client"][0] if scope.get("client") else "?"
        reason = refusal(scope["method"], target, query)
        if reason is not None:
            shown = _shown(target + (b"?" + query if query else b""))
            logger.warning("Refused %s %s from %s: %s.", _shown(scope["method"].encode()), shown, client, reason)
            await _answer(send, 404, REFUSED_BODY)
            return
        try:
            body = await _read_body(receive)
        except _TooLarge:
            logger.warning("Refused POST %s from %s: body over %d bytes.", target.decode(), client, MAX_BODY)
            await _answer(send, 413, b"Request body too large.\n")
            return
        except ConnectionResetError:
            return
        await self._forward(target.decode("ascii"), scope, body, client, send)

    async def _forward(self, path: str, scope: dict, body: bytes, client: str, send: Any) -> None:
        headers = [(k, v) for k, v in scope["headers"]
                   if k.decode("latin-1") not in _DROP_HEADERS and not k.startswith(b"x-forwarded-")]
        headers.append((b"x-forwarded-for", client.encode()))
        url = self.base.copy_with(raw_path=path.encode("ascii"))  # the checked path, nothing re-normalised
        try:
            response = await self.client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            logger.error("SuperLink unreachable: %s", exc)
            await _answer(send, 503, b"SuperLink unavailable\n")
            return
        logger.debug("POST %s from %s -> %d", path, client, response.status_code)
        if path == "/v1/fleet/activate-node" and response.status_code >= 400:  # flwr-server shows this line
            logger.warning("Rejected join from %s: the SuperLink refused its key (not registered, or another key).",
                           client)
        out = [(k, v) for k, v in response.headers.raw
               if k.lower().decode("latin-1") not in _DROP_HEADERS and k.lower() != b"content-encoding"]
        await _answer(send, response.status_code, response.content, out)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tdamil.server.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="public host:port the sites dial")
    parser.add_argument("--upstream", required=True, help="SuperLink URL on loopback, e.g. https://127.0.0.1:9093")
    parser.add_argument("--ssl-certfile", default=None)
    parser.add_argument("--ssl-keyfile", default=None)
    parser.add_argument("--ca-cert", default=None, help="CA that signed the SuperLink's certificate")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every forwarded call")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)  # a line per call
    import uvicorn  # noqa: PLC0415

    host, _, port = args.listen.rpartition(":")
    app = FleetGateway(args.upstream, ca_cert=args.ca_cert)
    logger.info("Fleet gateway on %s -> %s (%d Fleet API calls, POST only)", args.listen, args.upstream,
                len(FLEET_PATHS))
    # h11: the raw request target reaches the app; no websockets; the client address is the TCP
    # peer (no X-Forwarded-For trusted here); no Server header; uvicorn's lines in our log format.
    uvicorn.run(app, host=host.strip("[]"), port=int(port), ssl_certfile=args.ssl_certfile,
                ssl_keyfile=args.ssl_keyfile, http="h11", ws="none", lifespan="on", proxy_headers=False,
                server_header=False, log_level="warning", access_log=False, log_config=None)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
