"""The HTTP side of a peer: every peer answers clients (aiohttp).

Routes (see docs/api.md for the full reference):

- ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``: the
  OpenAI-compatible API (:mod:`ringllm.openai_api`), streaming as server-sent events.
- ``POST /ringllm/v1/generate``: the native streaming endpoint, used by ``ringllm prompt``
  and :mod:`ringllm.client`.
- ``GET /health``: the peer's state, shard and memory (what ``ringllm status`` shows).
- ``GET /metrics``: Prometheus text exposition (:mod:`ringllm.metrics`).

With an API key every route but ``/health`` and ``/metrics`` needs ``Authorization: Bearer
<key>``; a wrong or missing key is a 401 in OpenAI's error shape. Every error is such a JSON
body: ``{"error": {"message", "type", "param", "code"}}``.

Native endpoint: ``POST /ringllm/v1/generate`` with a JSON body::

    {"prompt": "...", "raw": false, "system": null}   or   {"messages": [...]}   or   {"prompt_ids": [...]}
    + "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "top_logprobs",
      "max_tokens", "stop", "ignore_eos"

answers ``application/x-ndjson``, one JSON object per line::

    {"event": "start", "id": "r0-3", "prompt_ids": [...]}
    {"event": "token", "token": 198, "text": "\\n", "logprob": -1.42, "top_logprobs": [[198, -1.42], ...]}
    {"event": "end", "finish_reason": "stop", "prompt_tokens": 7, "completion_tokens": 12}
    {"event": "error", "error": {"type": "PeerLostError", "message": "lost peer rank 2: ..."}}

Errors before generation starts are HTTP 4xx/5xx; after it they are an ``error`` event.

Slow and vanished clients: the peer puts each request's Steps into an unbounded queue, so a
client that reads slowly only delays its own handler, never the ring. A handler notices a
client that went away (polling the connection while it waits for the next token, or a write
that fails or stalls for ``write_timeout`` seconds) and closes the request's generator, which
cancels the sequence on every peer and frees its KV cache.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import os
import select
import time
from typing import Any, AsyncIterator, Callable, TypeVar

from aiohttp import web

from ringllm.errors import PeerLostError, RequestError, RingError
from ringllm.generation import Request, Step
from ringllm.metrics import Metrics, RequestRecord, kv_cache_bytes, render, rss_bytes
from ringllm.peer import Peer, QueueFullError
from ringllm.runtime import prompt_ids
from ringllm.sampling import SamplingParams

PEER_KEY: web.AppKey[Peer] = web.AppKey("peer", Peer)
METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
OPTIONS_KEY: web.AppKey["ServerOptions"] = web.AppKey("options", object)  # type: ignore[arg-type]

T = TypeVar("T")
_HANGUP = getattr(select, "POLLRDHUP", 0) | getattr(select, "POLLHUP", 0) | getattr(select, "POLLERR", 0)

PUBLIC_PATHS = frozenset({"/health", "/metrics"})  # no API key needed: monitoring, no user data

_SAMPLING_FIELDS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float, "repeat_penalty": float,
                    "seed": int, "top_logprobs": int}


class ServerOptions:
    """Per-app settings: the API key, and how long a stalled client may hold a request."""

    def __init__(self, api_key: str | None = None, write_timeout: float = 30.0, poll_interval: float = 0.25) -> None:
        self.api_key = api_key
        self.write_timeout = write_timeout
        self.poll_interval = poll_interval
        self.ids = itertools.count()


class ApiError(RequestError):
    """A request refused by the HTTP layer, with its OpenAI error fields."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param, self.code, self.status, self.kind = param, code, status, kind


class ClientGone(Exception):
    """The HTTP client disconnected (or stopped reading for longer than the write timeout)."""


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   headers: dict[str, str] | None = None, code: str | None = None) -> web.Response:
    return web.json_response(error_body(message, kind, param, code), status=status, headers=headers)


def status_for(exc: RingError) -> tuple[int, str]:
    if isinstance(exc, ApiError):
        return exc.status, exc.kind
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
    param = getattr(exc, "param", None)
    code = getattr(exc, "code", None)
    if code is None and isinstance(exc, QueueFullError):
        code = "queue_full"
    elif code is None and "context holds only" in str(exc):
        code = "context_length_exceeded"
    # 429: the queue drains in about one request's time; 503: a broken ring re-forms in seconds.
    headers = {"Retry-After": "1" if status == 429 else "5"} if status in (429, 503) else None
    return error_response(status, str(exc), kind, param, headers, code)


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


async def start_request(http: web.Request, endpoint: str, parse: Callable[[Any], tuple[Request, T]]
                        ) -> tuple[StepStream, Step | None, Request, T] | web.Response:
    """Parse the JSON body with ``parse`` (-> (Request, anything the caller needs back)),
    submit the request and wait for its first token.

    Returns (stream, first step, request, parse's extra), or the error response to send:
    refusals before any token (bad input, full queue, broken ring) become HTTP statuses, not
    stream events. A client that disconnects while its request waits is cancelled here.
    """
    peer, metrics, opts = http.app[PEER_KEY], http.app[METRICS_KEY], http.app[OPTIONS_KEY]
    rid = f"r{peer.rank}-{next(opts.ids)}"
    try:
        body = await read_json(http)
        req, extra = parse(body)
        req.check_fits(peer.model.max_len)
    except RingError as exc:
        metrics.refused(endpoint, status_for(exc)[0])
        return response_for(exc)
    rec = metrics.start(rid, endpoint)
    rec.prompt_tokens = len(req.prompt_ids)
    stream = StepStream(http, peer.generate(req), rec)
    try:
        first = await stream.next()
    except BaseException as exc:
        await stream.aclose()
        if isinstance(exc, RingError):
            rec.status = status_for(exc)[0]
        else:
            rec.outcome = "cancelled"
        metrics.finish(rec)
        if isinstance(exc, RingError):
            return response_for(exc)
        if isinstance(exc, ClientGone):
            return web.Response(status=499)  # nginx's "client closed request": nobody reads it
        raise
    return stream, first, req, extra


# -- native endpoint ------------------------------------------------------------------------
def sampling_from(body: dict[str, Any], defaults: SamplingParams = SamplingParams()) -> SamplingParams:
    """SamplingParams from a JSON body; wrong types raise RequestError naming the field."""
    kw: dict[str, Any] = {}
    for name, kind in _SAMPLING_FIELDS.items():
        if body.get(name) is None:
            continue
        v = body[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
            raise ApiError(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {v!r}", param=name)
        kw[name] = kind(v)
    if "seed" not in kw:
        kw["seed"] = int.from_bytes(os.urandom(7), "little")
    try:
        return SamplingParams(**{**defaults.__dict__, **kw})
    except RequestError as exc:  # its messages start with the field's name
        name = str(exc).split(" ", 1)[0]
        raise ApiError(str(exc), param=name if name in _SAMPLING_FIELDS else None) from None


_NATIVE_FIELDS = frozenset({"prompt", "raw", "system", "messages", "prompt_ids", "max_tokens", "stop", "ignore_eos",
                            *_SAMPLING_FIELDS})


def request_from_body(peer: Peer, body: Any) -> Request:
    """The Request of a native-endpoint body; anything wrong raises RequestError naming the field."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    unknown = sorted(set(body) - _NATIVE_FIELDS)
    if unknown:
        raise ApiError(f"unknown field '{unknown[0]}' (allowed: {', '.join(sorted(_NATIVE_FIELDS))})", param=unknown[0])
    if "prompt_ids" in body:
        ids = body["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ApiError("'prompt_ids' must be a list of integers", param="prompt_ids")
        bad = [t for t in ids if not 0 <= t < peer.info.config.vocab_size]
        if bad:
            raise ApiError(f"'prompt_ids' has id {bad[0]} outside the vocabulary (0..{peer.info.config.vocab_size - 1})",
                           param="prompt_ids")
    elif "messages" in body:
        ids = prompt_ids(peer.info, messages=_messages(body["messages"]))
    elif isinstance(body.get("prompt"), str):
        system = body.get("system")
        if system is not None and not isinstance(system, str):
            raise ApiError("'system' must be a string", param="system")
        ids = prompt_ids(peer.info, body["prompt"], raw=bool(body.get("raw", False)), system=system)
    else:
        raise ApiError("give one of 'prompt' (a string), 'messages' or 'prompt_ids'", param="prompt")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:  # 256, or what the context has room for
        max_tokens = min(256, max(1, peer.model.max_len - len(ids)))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ApiError(f"'max_tokens' must be an integer, got {max_tokens!r}", param="max_tokens")
    if not 1 <= max_tokens <= peer.model.max_len:
        raise ApiError(f"'max_tokens' must be between 1 and the context length {peer.model.max_len}, got {max_tokens}",
                       param="max_tokens")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise ApiError("'stop' must be a non-empty string or a list of at most 16 non-empty strings", param="stop")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError("'ignore_eos' must be true or false", param="ignore_eos")
    sampling = sampling_from(body)
    vocab = peer.info.config.vocab_size
    if sampling.top_k > vocab:  # also keeps the value packable on the ring (msgpack: < 2**64)
        raise ApiError(f"'top_k' must be between 0 and the vocabulary size {vocab}, got {sampling.top_k}", param="top_k")
    return Request(tuple(ids), sampling, max_tokens=max_tokens, stop=tuple(stop), ignore_eos=ignore_eos)


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]")
        if not isinstance(m.get("content"), str):
            raise ApiError(f"messages[{i}].content must be a string", param=f"messages[{i}].content")
    return messages


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; malformed JSON raises RequestError (413 for an oversized body
    is raised by aiohttp and turned into a JSON error by the error middleware)."""
    try:
        return json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError("the request body is not valid JSON: nested too deeply") from None


async def handle_generate(request: web.Request) -> web.StreamResponse:
    peer = request.app[PEER_KEY]
    started = await start_request(request, "native", lambda body: (request_from_body(peer, body), None))
    if isinstance(started, web.StreamResponse):
        return started
    stream, step, req, _ = started
    rec = stream.rec
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
    try:
        async with stream:
            await resp.prepare(request)
            await _line(request, resp, {"event": "start", "id": rec.id, "prompt_ids": list(req.prompt_ids)})
            while step is not None:
                await _line(request, resp, {"event": "token", "token": step.token, "text": step.text,
                                            "logprob": step.choice.logprob,
                                            "top_logprobs": [[i, lp] for i, lp in step.choice.top_logprobs]})
                step = await stream.next()
            await _line(request, resp, {"event": "end", "finish_reason": rec.finish_reason,
                                        "prompt_tokens": rec.prompt_tokens, "completion_tokens": rec.completion_tokens})
    except RingError as exc:
        rec.outcome = "error"
        rec.finish_reason = type(exc).__name__
        await _try_line(request, resp, {"event": "error", "error": {"type": type(exc).__name__, "message": str(exc)}})
    except (ClientGone, ConnectionError):
        rec.outcome = "cancelled"  # the client went away; leaving the 'async with' cancelled the request
    except asyncio.CancelledError:
        rec.outcome = "cancelled"  # the server is stopping
        raise
    finally:
        request.app[METRICS_KEY].finish(rec)
    return resp


async def _line(http: web.Request, resp: web.StreamResponse, obj: dict[str, Any]) -> None:
    await write(http, resp, json.dumps(obj, ensure_ascii=False).encode() + b"\n")


async def _try_line(http: web.Request, resp: web.StreamResponse, obj: dict[str, Any]) -> None:
    try:
        await _line(http, resp, obj)
    except ClientGone:
        pass


# -- health and metrics ---------------------------------------------------------------------
def health(peer: Peer) -> dict[str, Any]:
    """The /health document: state, shard, memory and counters of this peer."""
    from ringllm.openai_api import model_id

    cfg, sh = peer.info.config, peer.model.shard
    stats = peer.stats.as_dict() if hasattr(peer.stats, "as_dict") else dict(vars(peer.stats))
    return {
        "status": "ok" if peer.failure is None else "down",
        "rank": peer.rank, "size": peer.size, "model": cfg.name, "model_id": model_id(peer),
        "running": peer.running, "queue": peer.queue_depth,
        "max_batch": peer.max_batch, "max_queue": peer.max_queue,
        "last_error": peer.stats.last_error,
        "shard": {
            "kv_heads": list(sh.kv_heads), "heads": list(sh.heads), "ffn": list(sh.ffn), "vocab": list(sh.vocab),
            # The FFN rows are split by capacity weight and dominate the compute: call that the share.
            "share": (sh.ffn[1] - sh.ffn[0]) / cfg.ffn_dim,
            "attention_share": (sh.heads[1] - sh.heads[0]) / cfg.n_heads,
        },
        "memory": {"weights_bytes": peer.model.w.nbytes, "kv_cache_bytes": kv_cache_bytes(peer),
                   "rss_bytes": rss_bytes()},
        "context_length": peer.model.max_len,
        "uptime_seconds": time.time() - peer.stats.started,
        "stats": stats,
    }


async def handle_health(request: web.Request) -> web.Response:
    return web.json_response(health(request.app[PEER_KEY]))


async def handle_metrics(request: web.Request) -> web.Response:
    text = render(request.app[METRICS_KEY], request.app[PEER_KEY])
    return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


# -- middlewares ----------------------------------------------------------------------------
@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own refusals (404, 405, 413, ...) in OpenAI's JSON error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}.get(exc.status,
                                                                                                      "invalid_request_error")
        msg = {404: f"no route {request.method} {request.path}",
               405: f"method {request.method} is not allowed on {request.path}",
               413: f"the request body is too large (at most {request.app._client_max_size} bytes)"}.get(exc.status, exc.reason)
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return error_response(exc.status, msg, kind, headers=headers or None)


def _auth(api_key: str) -> Any:
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                what = "missing" if not given else "incorrect"
                return error_response(401, f"{what} API key: send 'Authorization: Bearer <key>' with the ring's api_key",
                                      "invalid_request_error", code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return auth


def make_app(peer: Peer, *, api_key: str | None = None, write_timeout: float = 30.0,
             poll_interval: float = 0.25) -> web.Application:
    """The aiohttp app serving ``peer``. ``api_key`` (e.g. ``RingConfig.api_key``) turns on
    bearer authentication; ``write_timeout`` is how long a client may stall a streaming write
    before its request is cancelled; ``poll_interval`` how often a waiting handler checks
    that its client is still connected."""
    from ringllm import openai_api

    middlewares = [_errors] + ([_auth(api_key)] if api_key else [])
    app = web.Application(client_max_size=4 * 2**20, middlewares=middlewares)
    app[PEER_KEY] = peer
    app[METRICS_KEY] = Metrics()
    app[OPTIONS_KEY] = ServerOptions(api_key, write_timeout, poll_interval)
    app.router.add_post("/ringllm/v1/generate", handle_generate)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    openai_api.add_routes(app)
    return app
