"""Serving the app on a TCP port, with the limits a client meets before any handler runs.

- **Header deadline** (``header_timeout``): a connection must deliver a complete request head
  (request line and headers) within this many seconds of opening, and again of the end of
  each response, so it is also the idle limit of a kept-alive connection; otherwise it is
  closed without an answer. This is aiohttp's keep-alive timer, which it arms at connect and
  after each response and which closes a connection only while no handler runs on it: a long
  streaming response is never cut by it. With TLS the TLS handshake has the same deadline.
- **Body deadline** (``body_timeout``): enforced where the handlers read the body
  (:func:`ringllm.http.plumbing.read_json`): a 408, and the connection is closed after at most
  :data:`LINGER` seconds more of reading (aiohttp's lingering close, so that the client can
  read the 408 rather than a reset).
- **Connection cap** (``max_connections``): at most this many connections are open at once;
  one more is answered ``503`` (OpenAI's JSON error shape, ``code: too_many_connections``,
  ``Retry-After: 1``) without reading its request, and closed. Refusals are logged as a
  count, at most one line per :data:`REFUSAL_LOG_EVERY` seconds.

Besides, aiohttp refuses request lines and header fields over 8190 bytes and more than 128
headers (400), and the app refuses bodies over ``MAX_BODY`` (413).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl as ssl_module
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ringllm.http.plumbing import error_body
from ringllm.ring.config import HTTP_BODY_TIMEOUT, HTTP_HEADER_TIMEOUT, HTTP_MAX_CONNECTIONS

log = logging.getLogger("ringllm.http")

# After a refusal (408, 413, 401, ...) that left a body unread, how long aiohttp keeps reading
# and discarding it before closing (its default is 10 s): enough for a real client to finish
# sending what it had in flight, short enough that a slowloris body costs little beyond
# body_timeout.
LINGER = 2.0
# A refused connection is closed this long after its 503 at the latest (or when the client
# closes first), so the client reads the 503 instead of a reset.
REFUSED_LINGER = 1.0
REFUSAL_LOG_EVERY = 10.0  # seconds between "refused N connections" lines during a flood


@dataclass(frozen=True)
class HttpLimits:
    """What a peer's HTTP port allows each client (ring.toml's ``[http]``; see the module)."""

    header_timeout: float = HTTP_HEADER_TIMEOUT
    body_timeout: float = HTTP_BODY_TIMEOUT
    max_connections: int = HTTP_MAX_CONNECTIONS


class _Gauge:
    """Open connections of one server against its cap, and the throttled refusal log."""

    def __init__(self, cap: int) -> None:
        self.cap, self.open, self.refused = cap, 0, 0
        self._unreported, self._reported_at = 0, 0.0

    def admit(self) -> bool:
        if self.open < self.cap:
            self.open += 1
            return True
        self.refused += 1
        self._unreported += 1
        now = time.monotonic()
        if now - self._reported_at >= REFUSAL_LOG_EVERY:
            log.warning("refused %d HTTP connection(s) since the last report: %d open, the limit ([http] "
                        "max_connections)", self._unreported, self.open)
            self._unreported, self._reported_at = 0, now
        return False

    def release(self) -> None:
        self.open -= 1


def _refusal(cap: int) -> bytes:
    body = json.dumps(error_body(f"this peer already has {cap} HTTP connections open, its limit ([http] "
                                 "max_connections); retry later", "server_error",
                                 code="too_many_connections")).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class _Handler(web.RequestHandler):
    """aiohttp's connection handler, counted against the cap; over it, a 503 and close."""

    def __init__(self, manager: web.Server, gauge: _Gauge, refusal: bytes, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._gauge, self._refusal, self._refused = gauge, refusal, False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._gauge.admit():
            super().connection_made(transport)
            return
        self._refused = True
        t: Any = transport
        t.write(self._refusal)
        if t.can_write_eof():
            t.write_eof()
        asyncio.get_running_loop().call_later(REFUSED_LINGER, t.close)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def eof_received(self) -> Any:
        if self._refused:
            return None  # the transport closes
        return super().eof_received()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        self._gauge.release()
        super().connection_lost(exc)


class HttpServer:
    """A listening HTTP port serving one app (:func:`serve_http`); :meth:`close` stops both."""

    def __init__(self, runner: web.AppRunner, server: asyncio.AbstractServer, gauge: _Gauge) -> None:
        self._runner, self._server, self._gauge = runner, server, gauge

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    @property
    def open_connections(self) -> int:
        return self._gauge.open

    @property
    def refused_connections(self) -> int:
        return self._gauge.refused

    async def close(self) -> None:
        self._server.close()  # no new connections
        await self._runner.cleanup()  # the open ones, and the app
        await self._server.wait_closed()


async def serve_http(app: web.Application, host: str | None = None, port: int | None = None, *,
                     sock: socket.socket | None = None, ssl: ssl_module.SSLContext | None = None,
                     limits: HttpLimits = HttpLimits()) -> HttpServer:
    """Serve ``app`` on ``host:port`` (0: any free port, see :attr:`HttpServer.port`), or on
    ``sock``, a socket bound already (listened on here), with ``limits``."""
    if (sock is None) == (host is None or port is None):
        raise TypeError("serve_http takes host and port, or sock")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        manager = runner.server
        assert manager is not None  # setup() made it
        loop = asyncio.get_running_loop()
        gauge, refusal = _Gauge(limits.max_connections), _refusal(limits.max_connections)

        def handler() -> _Handler:
            return _Handler(manager, gauge, refusal, loop=loop, keepalive_timeout=limits.header_timeout,
                            lingering_time=LINGER, access_log=None)

        server = await loop.create_server(handler, host, port, sock=sock, ssl=ssl, reuse_address=True, backlog=128,
                                          ssl_handshake_timeout=limits.header_timeout if ssl else None)
    except BaseException:
        await runner.cleanup()
        raise
    return HttpServer(runner, server, gauge)
