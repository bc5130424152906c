"""What both APIs' handlers share: the app's keys and settings, error bodies and statuses,
reading the body, and running one request while watching its client.

Errors are raised, not returned: a handler (or :func:`start_request`) raises a
:class:`~ringllm.errors.RingError` or :class:`ClientGone`, and the app's error middleware
(:mod:`ringllm.http.app`) turns it into the response (:func:`response_for`, or 499).
"""

from __future__ import annotations

import asyncio
import itertools
import select
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from ringllm.errors import PeerLostError, QueueFullError, RequestError, RingError
from ringllm.generation import Step
from ringllm.http.validate import ApiRequest, parse_json
from ringllm.metrics import Metrics, RequestRecord
from ringllm.peer import Peer
from ringllm.ring.config import HTTP_BODY_TIMEOUT
from ringllm.runtime import ModelInfo


class ServerOptions:
    """Per-app settings: the API key, and how long a stalled client may hold a request."""

    def __init__(self, api_key: str | None = None, write_timeout: float = 30.0, poll_interval: float = 0.25,
                 body_timeout: float = HTTP_BODY_TIMEOUT) -> None:
        self.api_key = api_key
        self.write_timeout = write_timeout
        self.poll_interval = poll_interval
        self.body_timeout = body_timeout
        self.ids = itertools.count()


PEER_KEY: web.AppKey[Peer] = web.AppKey("peer", Peer)
METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
OPTIONS_KEY: web.AppKey[ServerOptions] = web.AppKey("options", ServerOptions)

_HANGUP = getattr(select, "POLLRDHUP", 0) | getattr(select, "POLLHUP", 0) | getattr(select, "POLLERR", 0)


class ClientGone(Exception):
    """The HTTP client disconnected (or stopped reading for longer than the write timeout)."""


def model_id(peer: Peer) -> str:
    """The id this peer's model goes by in the API: the GGUF file name without ``.gguf``."""
    return Path(peer.info.path).stem


# -- errors ---------------------------------------------------------------------------------
def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, which every route answers errors in."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   headers: dict[str, str] | None = None, code: str | None = None) -> web.Response:
    # json.dumps escapes everything outside ASCII, lone surrogates included.
    return web.json_response(error_body(message, kind, param, code), status=status, headers=headers)


def status_for(exc: RingError) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) for an error."""
    if isinstance(exc, QueueFullError):
        return 429, "rate_limit_error"
    if isinstance(exc, RequestError):
        return 400, "invalid_request_error"
    if isinstance(exc, PeerLostError):
        return 503, "peer_lost"
    return 500, "server_error"


def response_for(exc: RingError) -> web.Response:
    """The HTTP error response for an error raised before a request started generating."""
    status, kind = status_for(exc)
    param = exc.param if isinstance(exc, RequestError) else None
    code = exc.code if isinstance(exc, RequestError) else None
    # 429: the queue drains in about one request's time; 503: a broken ring re-forms in seconds.
    headers = {"Retry-After": "1" if status == 429 else "5"} if status in (429, 503) else None
    return error_response(status, str(exc), kind, param, headers, code)


async def read_json(http: web.Request) -> Any:
    """The request's JSON body; RequestError if it is not JSON (413 for an oversized body is
    raised by aiohttp and turned into a JSON error by the error middleware). A body that has
    not fully arrived ``body_timeout`` seconds after the handler asked for it is a 408 (a
    client dribbling it byte by byte holds the connection no longer)."""
    try:
        async with asyncio.timeout(http.app[OPTIONS_KEY].body_timeout):
            body = await http.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout() from None
    return parse_json(body)


# -- running one request --------------------------------------------------------------------
def client_gone(http: web.Request) -> bool:
    """True when the client closed its connection.

    aiohttp stops reading the socket while a handler runs, so it would only notice a client
    that hung up at the next write; a non-streaming or still-queued request would run to its
    end for nobody. Polling the socket for a peer hang-up (POLLRDHUP, Linux) consumes nothing.
    """
    transport = http.transport
    if transport is None or transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    fd = sock.fileno() if sock is not None else -1
    if fd < 0 or not hasattr(select, "poll"):
        return False
    poller = select.poll()
    poller.register(fd, _HANGUP)
    return bool(poller.poll(0))


class StepStream:
    """The Steps of one request, watched for the client going away.

    :meth:`next` returns the next Step, None at the end, raises the ring's error, or raises
    ClientGone when the HTTP client disconnected meanwhile. :meth:`aclose` (always call it;
    ``async with`` does) closes the peer's generator, which cancels an unfinished request on
    every peer.
    """

    def __init__(self, http: web.Request, gen: AsyncIterator[Step], rec: RequestRecord) -> None:
        self.http, self.gen, self.rec = http, gen, rec
        self.poll = http.app[OPTIONS_KEY].poll_interval
        self._checked = time.monotonic()

    async def __aenter__(self) -> "StepStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def next(self) -> Step | None:
        if time.monotonic() - self._checked >= self.poll:
            self._check()  # tokens may come faster than the poll interval: check between them too
        task = asyncio.ensure_future(anext(self.gen, None))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=self.poll)
                if not task.done():
                    self._check()
            step = task.result()
        finally:
            if not task.done():
                # Cancelling the pending __anext__ runs the generator's finally: the request is
                # cancelled on the ring and its queue dropped.
                task.cancel()
                await asyncio.wait({task})
        if step is not None:
            self.rec.token()
            self.rec.finish_reason = step.finish_reason
        return step

    async def aclose(self) -> None:
        await self.gen.aclose()

    def _check(self) -> None:
        self._checked = time.monotonic()
        if client_gone(self.http):
            raise ClientGone()


async def write(http: web.Request, resp: web.StreamResponse, data: bytes) -> None:
    """Write to a streaming response; a client that is gone or stalls past the write timeout
    raises ClientGone (its steps would otherwise pile up until the request ends)."""
    try:
        await asyncio.wait_for(resp.write(data), http.app[OPTIONS_KEY].write_timeout)
    except (ConnectionError, asyncio.TimeoutError, RuntimeError) as exc:
        # RuntimeError: aiohttp refuses writes once the transport is closed ("Cannot write to closing transport").
        raise ClientGone() from exc


@dataclass
class Started:
    """A request that produced its first Step (None: it ended without one)."""

    api: ApiRequest
    stream: StepStream
    first: Step | None

    @property
    def rec(self) -> RequestRecord:
        return self.stream.rec


Parser = Callable[[Any, ModelInfo, int], ApiRequest]


async def start_request(http: web.Request, endpoint: str, parse: Parser) -> Started:
    """Validate the body with ``parse``, submit the request and wait for its first token.

    Refusals before any token (bad input, full queue, broken ring) raise the RingError, which
    the error middleware answers with an HTTP status; a client that disconnects while its
    request waits raises ClientGone (and the request is cancelled). Either way the refusal
    is counted in the metrics here.
    """
    peer, metrics, opts = http.app[PEER_KEY], http.app[METRICS_KEY], http.app[OPTIONS_KEY]
    rid = f"r{peer.rank}-{next(opts.ids)}"
    try:
        api = parse(await read_json(http), peer.info, peer.model.max_len)
    except RingError as exc:
        metrics.refused(endpoint, status_for(exc)[0])
        raise
    rec = metrics.start(rid, endpoint)
    rec.prompt_tokens = len(api.request.prompt_ids)
    stream = StepStream(http, peer.generate(api.request), rec)
    try:
        first = await stream.next()
    except BaseException as exc:
        await stream.aclose()
        if isinstance(exc, RingError):
            rec.status = status_for(exc)[0]
        else:
            rec.outcome = "cancelled"
        metrics.finish(rec)
        raise
    return Started(api, stream, first)
