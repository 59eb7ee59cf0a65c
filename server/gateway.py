"""Fleet-only gateway: the one port the coordinator exposes to the sites.

Flower 1.42's SuperLink serves its Fleet API (sites), Control API (submit/stop runs; not
authenticated in the open-source build) and Runtime API (the ServerApp process) on ONE HTTP port.
The coordinator therefore binds the SuperLink to 127.0.0.1 and puts this small reverse proxy on
the public address: it forwards ``POST /v1/fleet/*`` to the SuperLink unchanged (the SuperNode
authentication headers included) and answers 404 to everything else, so the Control and Runtime
APIs are reachable only from the coordinator machine itself. With TLS it terminates TLS with the
server certificate and talks TLS to the SuperLink on loopback.

Run as ``python -m tdamil.server.gateway --listen 0.0.0.0:9092 --upstream https://127.0.0.1:9093``
(``flwr-server`` starts and stops it).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Optional

from tdamil.logs import setup_logging

logger = logging.getLogger(__name__)

__all__ = ["ALLOWED_PREFIXES", "create_gateway_app", "main"]

ALLOWED_PREFIXES = ("/v1/fleet/",)
_HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer",
                "upgrade", "proxy-authorization", "proxy-authenticate"}


def create_gateway_app(upstream: str, ca_cert: Optional[str] = None, timeout: float = 300.0):  # type: ignore[no-untyped-def]
    """A Starlette app forwarding only the Fleet API to ``upstream`` (``http(s)://127.0.0.1:port``)."""
    import httpx  # noqa: PLC0415
    from starlette.applications import Starlette  # noqa: PLC0415
    from starlette.requests import Request  # noqa: PLC0415
    from starlette.responses import PlainTextResponse, Response  # noqa: PLC0415
    from starlette.routing import Route  # noqa: PLC0415

    verify: object = ca_cert if ca_cert else True
    client = httpx.AsyncClient(base_url=upstream.rstrip("/"), verify=verify, timeout=timeout)  # type: ignore[arg-type]

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or not path.startswith(ALLOWED_PREFIXES):
            logger.warning("Refused %s %s from %s (only the Fleet API is served here).", request.method, path,
                           request.client.host if request.client else "?")
            return PlainTextResponse("Not found: this address serves the Fleet API only.\n", status_code=404)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        if request.client is not None:
            headers["x-forwarded-for"] = request.client.host
        body = await request.body()
        try:
            upstream_resp = await client.post(path, content=body, headers=headers,
                                              params=dict(request.query_params))
        except httpx.HTTPError as exc:
            logger.error("SuperLink unreachable: %s", exc)
            return PlainTextResponse("SuperLink unavailable\n", status_code=503)
        out_headers = {k: v for k, v in upstream_resp.headers.items() if k.lower() not in _HOP_HEADERS
                       and k.lower() != "content-encoding"}
        return Response(content=upstream_resp.content, status_code=upstream_resp.status_code, headers=out_headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]  # noqa: ARG001
        yield
        await client.aclose()

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])],
                     lifespan=lifespan)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tdamil.server.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="public host:port the sites dial")
    parser.add_argument("--upstream", required=True, help="SuperLink URL on loopback, e.g. https://127.0.0.1:9093")
    parser.add_argument("--ssl-certfile", default=None)
    parser.add_argument("--ssl-keyfile", default=None)
    parser.add_argument("--ca-cert", default=None, help="CA that signed the SuperLink's certificate")
    args = parser.parse_args(argv)
    setup_logging()
    import uvicorn  # noqa: PLC0415

    host, _, port = args.listen.rpartition(":")
    app = create_gateway_app(args.upstream, ca_cert=args.ca_cert)
    logger.info("Fleet gateway on %s -> %s (Fleet API only)", args.listen, args.upstream)
    uvicorn.run(app, host=host.strip("[]"), port=int(port), ssl_certfile=args.ssl_certfile,
                ssl_keyfile=args.ssl_keyfile, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
