"""The HTTP side of a peer: every peer answers clients (aiohttp).

Native streaming endpoint, used by ``ringllm prompt`` and :mod:`ringllm.client`:

``POST /ringllm/v1/generate`` with a JSON body::

    {"prompt": "...", "raw": false, "system": null}   or   {"messages": [...]}   or   {"prompt_ids": [...]}
    + "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "top_logprobs",
      "max_tokens", "stop", "ignore_eos"

answers ``application/x-ndjson``, one JSON object per line::

    {"event": "start", "id": "0-3", "prompt_ids": [...]}
    {"event": "token", "token": 198, "text": "\\n", "logprob": -1.42, "top_logprobs": [[198, -1.42], ...]}
    {"event": "end", "finish_reason": "stop", "prompt_tokens": 7, "completion_tokens": 12}
    {"event": "error", "error": {"type": "PeerLostError", "message": "lost peer rank 2: ..."}}

Errors before generation starts are HTTP 4xx/5xx with an OpenAI-shaped JSON error body.
``GET /health`` reports the peer's state.
"""

from __future__ import annotations

import json
import os
from typing import Any

from aiohttp import web

from ringllm.errors import PeerLostError, RequestError, RingError
from ringllm.generation import Request
from ringllm.peer import Peer, QueueFullError
from ringllm.runtime import prompt_ids
from ringllm.sampling import SamplingParams

PEER_KEY: web.AppKey[Peer] = web.AppKey("peer", Peer)

_SAMPLING_FIELDS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float, "repeat_penalty": float,
                    "seed": int, "top_logprobs": int}


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return web.json_response(body, status=status, headers=headers)


def status_for(exc: RingError) -> tuple[int, str]:
    if isinstance(exc, QueueFullError):
        return 429, "rate_limit_error"
    if isinstance(exc, RequestError):
        return 400, "invalid_request_error"
    if isinstance(exc, PeerLostError):
        return 503, "peer_lost"
    return 500, "server_error"


def sampling_from(body: dict[str, Any], defaults: SamplingParams = SamplingParams()) -> SamplingParams:
    """SamplingParams from a JSON body; wrong types raise RequestError naming the field."""
    kw: dict[str, Any] = {}
    for name, kind in _SAMPLING_FIELDS.items():
        if body.get(name) is None:
            continue
        v = body[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
            raise RequestError(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {v!r}")
        kw[name] = kind(v)
    if "seed" not in kw:
        kw["seed"] = int.from_bytes(os.urandom(7), "little")
    base = {**defaults.__dict__, **kw}
    return SamplingParams(**base)


def request_from_body(peer: Peer, body: Any) -> Request:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if "prompt_ids" in body:
        ids = body["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise RequestError("'prompt_ids' must be a list of integers")
        bad = [t for t in ids if not 0 <= t < peer.info.config.vocab_size]
        if bad:
            raise RequestError(f"'prompt_ids' has id {bad[0]} outside the vocabulary (0..{peer.info.config.vocab_size - 1})")
    elif "messages" in body:
        ids = prompt_ids(peer.info, messages=_messages(body["messages"]))
    elif isinstance(body.get("prompt"), str):
        ids = prompt_ids(peer.info, body["prompt"], raw=bool(body.get("raw", False)), system=body.get("system"))
    else:
        raise RequestError("give one of 'prompt' (a string), 'messages' or 'prompt_ids'")
    max_tokens = body.get("max_tokens", 256)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise RequestError(f"'max_tokens' must be an integer, got {max_tokens!r}")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise RequestError("'stop' must be a non-empty string or a list of at most 16 non-empty strings")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError("'ignore_eos' must be true or false")
    return Request(tuple(ids), sampling_from(body), max_tokens=max_tokens, stop=tuple(stop), ignore_eos=ignore_eos)


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'")
        if not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}].content must be a string")
    return messages


async def read_json(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None


async def handle_generate(request: web.Request) -> web.StreamResponse:
    peer = request.app[PEER_KEY]
    try:
        req = request_from_body(peer, await read_json(request))
        req.check_fits(peer.model.max_len)
        gen = peer.generate(req)
        first = await anext(gen, None)  # errors before the first token become HTTP statuses
    except RingError as exc:
        status, kind = status_for(exc)
        return error_response(status, str(exc), kind, headers={"Retry-After": "1"} if status == 429 else None)
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    n = 0
    finish = None
    try:
        await _line(resp, {"event": "start", "prompt_ids": list(req.prompt_ids)})
        step = first
        while step is not None:
            n += 1
            finish = step.finish_reason
            await _line(resp, {"event": "token", "token": step.token, "text": step.text, "logprob": step.choice.logprob,
                               "top_logprobs": [[i, lp] for i, lp in step.choice.top_logprobs]})
            step = await anext(gen, None)
        await _line(resp, {"event": "end", "finish_reason": finish, "prompt_tokens": len(req.prompt_ids),
                           "completion_tokens": n})
    except RingError as exc:
        await _line(resp, {"event": "error", "error": {"type": type(exc).__name__, "message": str(exc)}})
    except (ConnectionResetError, ConnectionError):
        pass  # the client went away; closing the generator below cancels the request
    finally:
        await gen.aclose()
    return resp


async def _line(resp: web.StreamResponse, obj: dict[str, Any]) -> None:
    await resp.write(json.dumps(obj, ensure_ascii=False).encode() + b"\n")


async def handle_health(request: web.Request) -> web.Response:
    peer = request.app[PEER_KEY]
    return web.json_response({
        "status": "ok" if peer.failure is None else "down",
        "rank": peer.rank, "size": peer.size, "model": peer.info.config.name,
        "running": peer.running, "queue": peer.queue_depth,
        "last_error": peer.stats.last_error,
    })


def make_app(peer: Peer) -> web.Application:
    app = web.Application(client_max_size=4 * 2**20)
    app[PEER_KEY] = peer
    app.router.add_post("/ringllm/v1/generate", handle_generate)
    app.router.add_get("/health", handle_health)
    return app
