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

The port is public, so what one client may hold is bounded (:class:`Limits`, one CLI flag each):
time to finish the TLS handshake and the request headers, body idle time and minimum body rate
(also after ``Expect: 100-continue``), time a client may leave an answer unread, open connections
in all and per client address, header count and bytes, and the bytes of large bodies in flight.
Bodies are streamed to the SuperLink (a small call is read whole first, so a client trickling it
holds no upstream connection). Each refusal (404/408/413/429/431/503) is logged with the client
address and the reason; each kind of line at most :data:`LOG_BURST` times a minute.

With TLS it terminates TLS with the server certificate and talks TLS to the SuperLink on loopback.
Run as ``python -m tdamil.server.gateway --listen 0.0.0.0:9092 --upstream https://127.0.0.1:9093``
(``flwr-server`` starts and stops it); ``-v`` logs every forwarded call; ``--help`` lists the limits,
which ``TDAMIL_GATEWAY_OPTIONS`` in the environment can set when ``flwr-server`` starts the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

import httpx

from tdamil.logs import setup_logging

logger = logging.getLogger("tdamil.server.gateway")  # the same name when run with -m

__all__ = ["FLEET_PATHS", "REFUSED_BODY", "Limits", "FleetGateway", "refusal", "main"]

# The Fleet API calls of a Flower 1.42 SuperNode (flwr/supernode/fleet_http_client.py; the same set
# the SuperLink routes under /v1/fleet). register-node/unregister-node serve SuperNodes that
# register themselves (no node auth); with node auth the SuperLink refuses them itself.
FLEET_PATHS = frozenset(f"/v1/fleet/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received",
))
REFUSED_BODY = b"Not found: this address serves the Fleet API only.\n"
HEADERS_AT = "tdamil.headers_at"  # scope extension: time.monotonic() when the request headers were complete
MAX_BODY = 64 * 1024 * 1024  # Flower sends model payloads in ~5 MiB objects; nginx.conf uses the same cap
READ_WHOLE = 64 * 1024  # a body up to this size is read before the upstream call (uvicorn's read window)
LINGER = 1.0  # s a connection refused outside h11 keeps reading (and dropping) before it closes
OPTIONS_ENV = "TDAMIL_GATEWAY_OPTIONS"  # more command-line options, read before the real ones
LOG_BURST = 100  # log lines of one kind per minute; the rest are counted in one line
MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one client may take of the public port; each field is the CLI flag of the same name."""
    header_timeout: float = 10.0  # s for the TLS handshake, and again from the first byte to the end of the headers
    body_idle_timeout: float = 30.0  # s without a body byte, also after Expect: 100-continue
    body_min_rate: int = 16 * 1024  # bytes/s a body must average once body_idle_timeout has passed
    send_timeout: float = 60.0  # s a client may leave the answer unread before the connection is dropped
    keepalive_timeout: float = 5.0  # s an idle connection stays open between requests
    max_connections: int = 2048  # open connections in all (lowered to fit the open-file limit)
    max_per_address: int = 64  # open connections from one client address
    max_headers: int = 64  # request header lines (a SuperNode sends about 10)
    max_header_bytes: int = 16 * 1024  # request line and headers
    large_body: int = 8 * MiB  # a body declared larger than this needs a share of large_body_budget
    large_body_budget: int = 128 * MiB  # bytes of large bodies in flight to the SuperLink at once


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
_HEAD_END = re.compile(rb"\r?\n\r?\n")


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


class _FloodFilter(logging.Filter):
    """At most ``burst`` records per message template (and status) and ``window`` seconds pass; the others are
    counted and reported in one line when the window ends, so a flood cannot fill the disk."""

    def __init__(self, burst: int = LOG_BURST, window: float = 60.0) -> None:
        super().__init__()
        self.burst, self.window = burst, window
        self.seen: dict[str, list] = {}  # template -> [window start, passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "flood_summary", False):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        key = f"{record.msg} {args[-1]}" if args and isinstance(args[-1], int) else str(record.msg)  # + status
        now = time.monotonic()
        entry = self.seen.get(key)
        if entry is None or now - entry[0] >= self.window:
            self._report(key)
            entry = self.seen[key] = [now, 0, 0]
        if entry[1] < self.burst:
            entry[1] += 1
            return True
        entry[2] += 1
        if entry[2] == 1:  # the first dropped line of this window: report the count when it ends
            try:
                asyncio.get_running_loop().call_later(entry[0] + self.window - now, self._report, key)
            except RuntimeError:  # no event loop: reported with the next line of this kind
                pass
        return False

    def _report(self, key: str) -> None:
        entry = self.seen.pop(key, None)
        if entry and entry[2]:
            logger.warning("%d more lines like %r in %.0f s were not logged.", entry[2], key[:80], self.window,
                           extra={"flood_summary": True})


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class _Gone(Exception):
    """The client closed the connection."""


_PHRASES = {408: b"Request Timeout", 413: b"Content Too Large", 429: b"Too Many Requests",
            431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


def _raw_answer(status: int, reason: str) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection, for refusals made outside h11."""
    body = f"{reason}\n".encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, _PHRASES[status], len(body))) + body


async def _answer(send: Any, status: int, body: bytes, headers: Optional[list[tuple[bytes, bytes]]] = None,
                  close: bool = False) -> None:
    if headers is None:
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    if close:  # a refused request's unread body is not read and thrown away: the connection ends
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Budget:
    """Bytes of large bodies in flight; a request waits for its share, for at most ``timeout`` s."""

    def __init__(self, size: int) -> None:
        self.size, self.used = size, 0
        self.freed = asyncio.Event()

    async def acquire(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.used + n > self.size:
            self.freed.clear()
            try:
                await asyncio.wait_for(self.freed.wait(), deadline - time.monotonic())
            except (asyncio.TimeoutError, ValueError):
                return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n
        self.freed.set()


class _Body:
    """The request body as ASGI messages arrive, each wait bounded: no byte for ``body_idle_timeout``
    s, or an average under ``body_min_rate`` bytes/s after that, ends the request (408)."""

    def __init__(self, receive: Any, limits: Limits, start: float) -> None:
        self.receive, self.limits = receive, limits
        self.start, self.size, self.more = start, 0, True  # start: time.monotonic() the limits count from

    async def chunk(self) -> bytes:
        now, lim = time.monotonic(), self.limits
        idle_end = now + lim.body_idle_timeout
        rate_end = self.start + lim.body_idle_timeout + self.size / lim.body_min_rate
        try:  # the first call also sends "100 Continue" when the client asked for it
            message = await asyncio.wait_for(self.receive(), max(0.0, min(idle_end, rate_end) - now))
        except asyncio.TimeoutError:
            idle = idle_end <= rate_end or not self.size
            raise _Refused(408, f"no body byte for {lim.body_idle_timeout:g} s" if idle else
                           f"body slower than {lim.body_min_rate} bytes/s") from None
        if message["type"] == "http.disconnect":
            raise _Gone
        data = message.get("body", b"")
        self.size += len(data)
        if self.size > MAX_BODY:
            raise _Refused(413, f"body over {MAX_BODY} bytes")
        self.more = message.get("more_body", False)
        return data

    async def head(self) -> bytes:
        """Up to :data:`READ_WHOLE` bytes (the whole body of a small call)."""
        parts, got = [], 0
        while self.more and got < READ_WHOLE:
            parts.append(await self.chunk())
            got += len(parts[-1])
        return b"".join(parts)

    async def rest(self, first: bytes) -> AsyncIterator[bytes]:
        yield first
        while self.more:
            yield await self.chunk()


class FleetGateway:
    """ASGI application forwarding only the Fleet API to ``upstream`` (``http(s)://127.0.0.1:port``)."""

    def __init__(self, upstream: str, ca_cert: Optional[str] = None, timeout: float = 300.0,
                 limits: Limits = Limits()) -> None:
        self.base, self.limits = httpx.URL(upstream), limits
        self.budget = _Budget(limits.large_body_budget)
        pool = httpx.Limits(max_connections=limits.max_connections, max_keepalive_connections=32)
        self.client = httpx.AsyncClient(verify=ca_cert if ca_cert else True, timeout=timeout,  # type: ignore[arg-type]
                                        limits=pool, follow_redirects=False, trust_env=False)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        target, query = scope["raw_path"], scope["query_string"]
        client = scope["client"][0] if scope.get("client") else "?"
        reason = refusal(scope["method"], target, query)
        if reason is not None:
            shown = _shown(target + (b"?" + query if query else b""))
            logger.warning("Refused %s %s from %s: %s.", _shown(scope["method"].encode()), shown, client, reason)
            await _answer(send, 404, REFUSED_BODY, close=True)
            return
        path = target.decode("ascii")
        try:
            await self._admit(path, scope, receive, client, send)
        except _Refused as exc:
            logger.warning("Refused POST %s from %s: %s (%d).", path, client, exc.reason, exc.status)
            await _answer(send, exc.status, f"{exc.reason}\n".encode(), close=True)
        except _Gone:
            pass

    async def _admit(self, path: str, scope: dict, receive: Any, client: str, send: Any) -> None:
        lim, headers = self.limits, scope["headers"]
        # h11 parsed them already; the protocol's byte-level check cannot see pipelined requests
        if len(headers) > lim.max_headers or sum(len(k) + len(v) + 4 for k, v in headers) > lim.max_header_bytes:
            raise _Refused(431, f"over {lim.max_headers} header lines or {lim.max_header_bytes} bytes")
        declared = next((int(v) for k, v in headers if k == b"content-length"), None)  # h11 checked the digits
        if declared is not None and declared > MAX_BODY:
            raise _Refused(413, f"body over {MAX_BODY} bytes")
        share = min(MAX_BODY if declared is None else declared, lim.large_body_budget)
        share = share if share > lim.large_body else 0
        # the body's limits count from the complete headers (the protocol's stamp; a busy loop may
        # start this app later), plus any time the gateway itself kept the body waiting for budget
        start, waiting = scope.get("extensions", {}).get(HEADERS_AT, time.monotonic()), time.monotonic()
        if share and not await self.budget.acquire(share, lim.body_idle_timeout):
            raise _Refused(503, f"{lim.large_body_budget} bytes of large bodies already in flight for "
                                f"{lim.body_idle_timeout:g} s")
        try:
            body = _Body(receive, lim, start + time.monotonic() - waiting)
            await self._forward(path, scope, body, declared, client, send)
        finally:
            if share:
                self.budget.release(share)

    async def _forward(self, path: str, scope: dict, body: _Body, declared: Optional[int], client: str,
                       send: Any) -> None:
        headers = [(k, v) for k, v in scope["headers"]
                   if k.decode("latin-1") not in _DROP_HEADERS and not k.startswith(b"x-forwarded-")]
        headers.append((b"x-forwarded-for", client.encode()))
        first = await body.head()
        content: Any = first
        if body.more:  # a large body streams; its declared length goes upstream, not chunked encoding
            content = body.rest(first)
            if declared is not None:
                headers.append((b"content-length", str(declared).encode()))
        url = self.base.copy_with(raw_path=path.encode("ascii"))  # the checked path, nothing re-normalised
        try:
            response = await self.client.post(url, content=content, headers=headers)
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tdamil.server.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="public host:port the sites dial")
    parser.add_argument("--upstream", required=True, help="SuperLink URL on loopback, e.g. https://127.0.0.1:9093")
    parser.add_argument("--ssl-certfile", default=None)
    parser.add_argument("--ssl-keyfile", default=None)
    parser.add_argument("--ca-cert", default=None, help="CA that signed the SuperLink's certificate")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every forwarded call")
    limits = parser.add_argument_group("limits per client (defaults in brackets)")
    helps = {
        "header_timeout": "s for the TLS handshake, and for the request line and headers from their first byte",
        "body_idle_timeout": "s without a body byte (also after 'Expect: 100-continue') before 408",
        "body_min_rate": "bytes/s a body must average after body-idle-timeout s, else 408",
        "send_timeout": "s a client may leave its answer unread before the connection is dropped",
        "keepalive_timeout": "s an idle connection stays open between requests",
        "max_connections": "open connections in all; more are answered 503 and closed",
        "max_per_address": "open connections from one client address; more are answered 429 and closed",
        "max_headers": "request header lines; more: 431",
        "max_header_bytes": "bytes of request line and headers; more: 431",
        "large_body": "bodies declared larger than this many bytes share large-body-budget",
        "large_body_budget": "bytes of large bodies in flight at once; a body waits body-idle-timeout s, then 503",
    }
    for field in dataclasses.fields(Limits):
        default = field.default
        limits.add_argument("--" + field.name.replace("_", "-"), type=type(default), default=default,
                            metavar="N", help=f"{helps[field.name]} [{default}]")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    # flwr-server starts the gateway with --listen and --upstream only: other flags come from the
    # environment (systemd: Environment="TDAMIL_GATEWAY_OPTIONS=--max-per-address 16"); the command line wins
    options = shlex.split(os.environ.get(OPTIONS_ENV, ""))
    args = _parser().parse_args(options + (sys.argv[1:] if argv is None else argv))
    setup_logging(args.verbose)
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)  # a line per call
    flood = _FloodFilter()
    for name in ("tdamil.server.gateway", "uvicorn.error", "asyncio"):
        logging.getLogger(name).addFilter(flood)
    from tdamil.server.gateway_server import open_file_cap, serve  # noqa: PLC0415 - the layer above this one

    limits = open_file_cap(Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)}))
    host, _, port = args.listen.rpartition(":")
    app = FleetGateway(args.upstream, ca_cert=args.ca_cert, limits=limits)
    logger.info("Fleet gateway on %s -> %s (%d Fleet API calls, POST only; %s)", args.listen, args.upstream,
                len(FLEET_PATHS), ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(limits).items()))
    asyncio.run(serve(app, host.strip("[]"), int(port), limits, args.ssl_certfile, args.ssl_keyfile))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
