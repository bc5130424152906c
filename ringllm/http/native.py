"""The native endpoint ``POST /ringllm/v1/generate``: one JSON object per generated token
(``application/x-ndjson``), used by ``ringllm prompt`` and :mod:`ringllm.client`.

The body (validated by :func:`ringllm.http.validate.parse_native`)::

    {"prompt": "...", "raw": false, "system": null}   or   {"messages": [...]}   or   {"prompt_ids": [...]}
    + "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "top_logprobs",
      "max_tokens", "stop", "ignore_eos"

The answer, one object per line::

    {"event": "start", "id": "r0-3", "prompt_ids": [...]}
    {"event": "token", "token": 198, "text": "\\n", "logprob": -1.42, "top_logprobs": [[198, -1.42], ...]}
    {"event": "end", "finish_reason": "stop", "prompt_tokens": 7, "completion_tokens": 12}
    {"event": "error", "error": {"type": "PeerLostError", "message": "lost peer rank 2: ..."}}

Errors before generation starts are HTTP 4xx/5xx in OpenAI's error shape; after it they are
an ``error`` event.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from ringllm.errors import RingError
from ringllm.http.plumbing import METRICS_KEY, ClientGone, start_request, write
from ringllm.http.validate import parse_native


async def handle_generate(request: web.Request) -> web.StreamResponse:
    started = await start_request(request, "native", parse_native)
    stream, step, rec = started.stream, started.first, started.rec
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
    try:
        async with stream:
            await resp.prepare(request)
            await _line(request, resp, {"event": "start", "id": rec.id,
                                        "prompt_ids": list(started.api.request.prompt_ids)})
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
    # Every str in obj is inside a JSON string, where backslashreplace's \udXXX is the JSON
    # escape: text that UTF-8 cannot encode still gives a valid line rather than an exception.
    await write(http, resp, json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n")


async def _try_line(http: web.Request, resp: web.StreamResponse, obj: dict[str, Any]) -> None:
    try:
        await _line(http, resp, obj)
    except ClientGone:
        pass
