"""The gateway's connection layer: its own accept loop and uvicorn's h11 protocol, with limits.

:mod:`tdamil.server.gateway` decides WHAT may pass (the Fleet API allow-list, bodies streamed to
the SuperLink); this module bounds HOW connections may use the port (:class:`~tdamil.server.
gateway.Limits`): connection caps in all and per address at accept, before the TLS handshake; a
time limit for the TLS handshake plus request headers; header line and byte counts checked before
h11 parses them; unread answers dropped; the open-file limit raised to fit the cap (or the cap
lowered). Every refusal is logged with the client address.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import signal
import socket
import ssl
import time
from collections import Counter
from typing import Any, Callable, Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from tdamil.server.gateway import _HEAD_END, HEADERS_AT, LINGER, FleetGateway, Limits, _raw_answer

logger = logging.getLogger("tdamil.server.gateway")  # one log stream with the gateway's own lines

__all__ = ["open_file_cap", "serve"]


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request headers, a byte-level header check
    before h11 parses them, and a deadline for a client that does not read its answer."""

    def __init__(self, *args: Any, limits: Limits, release: Callable[[], None]) -> None:
        super().__init__(*args)
        self.limits, self.release = limits, release
        self.head, self.lines = b"", 0  # bytes and line ends of the headers still incomplete
        self.lingering = False
        self.head_timer: Optional[asyncio.TimerHandle] = None
        self.send_timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        for timer in (self.head_timer, self.send_timer):
            if timer is not None:
                timer.cancel()
        self.release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        if self.conn.their_state is h11.IDLE:  # request line and headers
            if self.head_timer is None:
                self._start_head_timer()
            if not self._head_fits(data):
                return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.head_timer is not None:
            if self.scope is not None:  # the body limits count from here, not from when the app runs
                self.scope.setdefault("extensions", {})[HEADERS_AT] = time.monotonic()
            self.head_timer.cancel()
            self.head_timer, self.head, self.lines = None, b"", 0

    def _head_fits(self, data: bytes) -> bool:
        lim, seen = self.limits, len(self.head)
        head = self.head + data
        end = _HEAD_END.search(head, max(0, seen - 3))
        size = end.end() if end else len(head)
        self.lines += head.count(b"\n", seen, size)
        if size > lim.max_header_bytes:
            self._refuse(431, f"request headers over {lim.max_header_bytes} bytes")
        elif self.lines > lim.max_headers + 2:  # the request line and the blank line end in \n too
            self._refuse(431, f"over {lim.max_headers} request header lines")
        else:
            self.head = b"" if end else head
            return True
        return False

    def _start_head_timer(self) -> None:
        self.head_timer = self.loop.call_later(self.limits.header_timeout, self._refuse, 408,
                                               f"request headers not complete within {self.limits.header_timeout:g} s")

    def _refuse(self, status: int, reason: str) -> None:
        if self.transport.is_closing() or self.lingering:
            return
        logger.warning("Refused connection from %s: %s (%d).", self._peer(), reason, status)
        self.transport.write(_raw_answer(status, reason))
        # close after LINGER s of reading and dropping what still comes: closing on unread bytes
        # sends a reset, which can destroy the answer before the client has read it
        self.lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER, self.transport.close)

    def _peer(self) -> str:
        return self.client[0] if self.client else "?"

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.send_timer is None:
            self.send_timer = self.loop.call_later(self.limits.send_timeout, self._send_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None

    def _send_stalled(self) -> None:
        logger.warning("Dropped connection from %s: answer unread for %g s.", self._peer(), self.limits.send_timeout)
        self.transport.abort()


class _Door:
    """Counts open connections, in all and per client address, from accept to close."""

    def __init__(self, limits: Limits) -> None:
        self.limits, self.open, self.per_address = limits, 0, Counter()

    def admit(self, address: str) -> Optional[tuple[int, str]]:
        if self.open >= self.limits.max_connections:
            return 503, f"{self.open} connections open (--max-connections)"
        if self.per_address[address] >= self.limits.max_per_address:
            return 429, f"{self.per_address[address]} connections open from this address (--max-per-address)"
        self.open += 1
        self.per_address[address] += 1
        return None

    def releaser(self, address: str) -> Callable[[], None]:
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self.open -= 1
                self.per_address[address] -= 1
                if not self.per_address[address]:
                    del self.per_address[address]
        return release


async def _accept(listener: socket.socket, door: _Door, make: Callable[..., _Protocol], config: Any,
                  limits: Limits) -> None:
    loop, pending = asyncio.get_running_loop(), set()
    while True:
        try:
            conn, peer = await loop.sock_accept(listener)
        except OSError as exc:  # EMFILE/ENFILE/ENOBUFS: out of descriptors or memory; try again shortly
            logger.error("Cannot accept a connection: %s (open-file limit? see --max-connections).", exc)
            await asyncio.sleep(0.1)
            continue
        address = peer[0]
        refused = door.admit(address)
        if refused is not None:
            logger.warning("Refused connection from %s: %s (%d).", address, refused[1], refused[0])
            if config.ssl is None:  # with TLS there is no HTTP before a handshake we will not spend on it
                try:
                    conn.send(_raw_answer(*refused))
                except OSError:
                    pass
            conn.close()
            continue
        release = door.releaser(address)
        task = loop.create_task(_connect(loop, conn, make, release, config.ssl, limits, address))
        pending.add(task)
        task.add_done_callback(pending.discard)


async def _connect(loop: asyncio.AbstractEventLoop, conn: socket.socket, make: Callable[..., _Protocol],
                   release: Callable[[], None], ssl_context: Any, limits: Limits, address: str) -> None:
    try:
        await loop.connect_accepted_socket(functools.partial(make, release=release), conn, ssl=ssl_context,
                                           ssl_handshake_timeout=limits.header_timeout if ssl_context else None)
    except ssl.SSLError as exc:  # e.g. plaintext HTTP sent to the TLS port
        logger.warning("Closed connection from %s: TLS handshake failed (%s).", address, exc.reason or exc)
    except ConnectionAbortedError:  # asyncio's handshake deadline
        logger.warning("Closed connection from %s: TLS handshake not complete within %g s.", address,
                       limits.header_timeout)
    except OSError as exc:  # the client went away (a port probe, a reset)
        logger.debug("Connection from %s ended before its TLS handshake: %s", address, exc)
    else:
        return
    conn.close()
    release()


def open_file_cap(limits: Limits) -> Limits:
    """Raise the soft open-file limit toward what ``limits`` need (two descriptors per connection:
    the client's and the SuperLink's), or lower ``max_connections`` to what the limit allows, so
    that accept() never fails silently for want of descriptors."""
    import resource  # noqa: PLC0415 - Unix only

    need = 2 * limits.max_connections + 64  # + the interpreter's own files
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < need:
        fits = max(16, (soft - 64) // 2)
        logger.warning("Open-file limit %d allows %d connections, not %d (raise LimitNOFILE).", soft, fits,
                       limits.max_connections)
        limits = dataclasses.replace(limits, max_connections=fits, max_per_address=min(limits.max_per_address, fits))
    return limits


async def serve(app: FleetGateway, host: str, port: int, limits: Limits, ssl_certfile: Optional[str] = None,
                ssl_keyfile: Optional[str] = None) -> None:
    """Serve ``app`` on ``host:port`` until SIGTERM or SIGINT."""
    import uvicorn  # noqa: PLC0415
    from uvicorn.server import ServerState  # noqa: PLC0415

    # h11: the raw request target reaches the app; no websockets; the client address is the TCP
    # peer (no X-Forwarded-For trusted here); no Server header; uvicorn's lines in our log format.
    config = uvicorn.Config(app, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, http="h11", ws="none",
                            lifespan="off", proxy_headers=False, server_header=False, date_header=False,
                            log_level="warning", access_log=False, log_config=None,
                            timeout_keep_alive=limits.keepalive_timeout,  # type: ignore[arg-type]
                            h11_max_incomplete_event_size=limits.max_header_bytes)
    config.load()
    state = ServerState()
    make = functools.partial(_Protocol, config, state, {}, limits=limits)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, backlog=1024)
    listener.setblocking(False)
    loop, stop = asyncio.get_running_loop(), asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    acceptor = loop.create_task(_accept(listener, _Door(limits), make, config, limits))
    await stop.wait()
    acceptor.cancel()
    listener.close()
    for protocol in list(state.connections):
        protocol.shutdown()  # idle connections close now, busy ones after their answer
    if state.tasks:
        await asyncio.wait(list(state.tasks), timeout=5)
    await app.client.aclose()
