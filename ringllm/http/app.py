"""The aiohttp app of a peer: routes, ``/health``, ``/metrics``, authentication, and the error
middleware that answers every error in OpenAI's JSON shape.

Routes (docs/api.md is the full reference):

- ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``: the
  OpenAI-compatible API (:mod:`ringllm.http.openai_api`), streaming as server-sent events.
- ``POST /ringllm/v1/generate``: the native NDJSON endpoint (:mod:`ringllm.http.native`).
- ``GET /health``: the peer's state, shard and memory (what ``ringllm status`` shows); while
  the ring re-forms, also whom it waits for. (Before the ring first forms the peer serves
  :mod:`ringllm.http.joining`'s app instead: ``/health`` answers 503 ``joining``.)
- ``GET /metrics``: Prometheus text exposition (:mod:`ringllm.metrics`).
- ``GET /``, ``GET /static/*``, ``GET /ringllm/v1/ring``: the chat page and the ring view it
  shows (:mod:`ringllm.http.page`).

With an API key every route but ``/health``, ``/metrics`` and the page's files needs ``Authorization: Bearer
<key>``; a wrong or missing key is a 401. Every error is a JSON body ``{"error": {"message",
"type", "param", "code"}}``: handlers raise, and :func:`_errors` answers.

Slow and vanished clients: the peer puts each request's Steps into an unbounded queue, so a
client that reads slowly only delays its own handler, never the ring. A handler notices a
client that went away (polling the connection while it waits for the next token, or a write
that fails or stalls for ``write_timeout`` seconds) and closes the request's generator, which
cancels the sequence on every peer and frees its KV cache.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any, Sequence

from aiohttp import web

from ringllm.errors import RingError
from ringllm.http import native, openai_api, page
from ringllm.http.joining import waiting_entries
from ringllm.http.plumbing import (METRICS_KEY, OPTIONS_KEY, PEER_KEY, ClientGone, ServerOptions, error_response,
                                   model_id, response_for)
from ringllm.metrics import Metrics, kv_cache_bytes, render, rss_bytes
from ringllm.peer import Peer
from ringllm.ring.config import HTTP_BODY_TIMEOUT
from ringllm.ring.formation import FormationProgress

log = logging.getLogger("ringllm.http")

PUBLIC_PATHS = frozenset({"/health", "/metrics"})  # no API key needed: monitoring, no user data
# A prompt can fill at most the context (SmolLM2: 8192 tokens, tens of kB of text): 4 MiB
# admits any real request and bounds what a flood makes a peer buffer and parse.
MAX_BODY = 4 * 2**20
PROGRESS_KEY: web.AppKey[FormationProgress | None] = web.AppKey("formation", FormationProgress)


def health(peer: Peer, progress: FormationProgress | None = None) -> dict[str, Any]:
    """The /health document: state, shard, memory and counters of this peer; with
    ``progress`` (the re-forming ring's), ``waiting_for`` as in :mod:`ringllm.http.joining`."""
    cfg, sh = peer.info.config, peer.model.shard
    waiting = [] if progress is None else waiting_entries(progress)
    return {
        "status": "ok" if peer.failure is None else "down",
        "rank": peer.rank, "size": peer.size, "model": cfg.name, "model_id": model_id(peer),
        "running": peer.running, "queue": peer.queue_depth,
        "max_batch": peer.max_batch, "max_queue": peer.max_queue,
        "last_error": peer.stats.last_error,
        "waiting_for": waiting,
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
        "stats": peer.stats.as_dict(),
    }


async def handle_health(request: web.Request) -> web.Response:
    return web.json_response(health(request.app[PEER_KEY], request.app[PROGRESS_KEY]))


async def handle_metrics(request: web.Request) -> web.Response:
    text = render(request.app[METRICS_KEY], request.app[PEER_KEY])
    return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error raised by a handler as a JSON response: RingErrors by their kind
    (:func:`~ringllm.http.plumbing.response_for`), aiohttp's own refusals (404, 405, 413, ...)
    in the same shape, a client that left as 499, and anything else as a 500 that says only
    the exception's type (its text may quote the request; the log has it, escaped)."""
    try:
        return await handler(request)
    except RingError as exc:
        return response_for(exc)
    except ClientGone:
        return web.Response(status=499)  # nginx's "client closed request": nobody reads it
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
        msg = {404: f"no route {request.method} {request.path}",
               405: f"method {request.method} is not allowed on {request.path}",
               408: f"the request body did not arrive within {request.app[OPTIONS_KEY].body_timeout:g} s",
               413: f"the request body is too large (at most {MAX_BODY} bytes)"}.get(exc.status, exc.reason)
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return error_response(exc.status, msg, kind, headers=headers or None)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as exc:  # noqa: BLE001 - a bug answers 500 in JSON, the peer goes on
        log.error("%s %s failed: %s: %s", request.method, request.path, type(exc).__name__, ascii(str(exc))[:300])
        return error_response(500, f"internal error ({type(exc).__name__}); the peer's log has the details",
                              "server_error")


def _auth(api_key: str) -> Any:
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS and not page.is_public(request.path):
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):
                what = "missing" if not given else "incorrect"
                return error_response(401, f"{what} API key: send 'Authorization: Bearer <key>' with the ring's api_key",
                                      "invalid_request_error", code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return auth


def make_app(peer: Peer, *, api_key: str | None = None, write_timeout: float = 30.0,
             poll_interval: float = 0.25, body_timeout: float = HTTP_BODY_TIMEOUT,
             ring_addresses: Sequence[str] = (), progress: FormationProgress | None = None) -> web.Application:
    """The aiohttp app serving ``peer``. ``api_key`` (e.g. ``RingConfig.api_key``) turns on
    bearer authentication; ``write_timeout`` is how long a client may stall a streaming write
    before its request is cancelled; ``poll_interval`` how often a waiting handler checks
    that its client is still connected; ``body_timeout`` how long a request's body may take
    to arrive (408); ``ring_addresses`` the HTTP host:port of every peer, in rank order, for
    the chat page's ring view; ``progress``: the formation progress of the peer's ring, for
    /health while it re-forms. Serve it with :func:`ringllm.http.serve.serve_http`, which
    adds the header deadline and the connection cap."""
    middlewares = [_errors] + ([_auth(api_key)] if api_key else [])
    app = web.Application(client_max_size=MAX_BODY, middlewares=middlewares)
    app[PEER_KEY] = peer
    app[METRICS_KEY] = Metrics()
    app[OPTIONS_KEY] = ServerOptions(api_key, write_timeout, poll_interval, body_timeout)
    app[PROGRESS_KEY] = progress
    app.router.add_post("/ringllm/v1/generate", native.handle_generate)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    openai_api.add_routes(app)
    page.add_routes(app, health, ring_addresses)
    return app
