"""The OpenAI-compatible API of every peer: chat completions, completions, models.

Request bodies are validated field by field, once, at the boundary
(:func:`ringllm.http.validate.parse_chat`, :func:`~ringllm.http.validate.parse_completion`);
the handlers only move Steps into JSON or server-sent events. Semantics follow OpenAI's API
reference, with these rules of our own:

- Sampling defaults are OpenAI's: ``temperature`` 1, ``top_p`` 1, no top-k or min-p. The
  extension fields ``top_k``, ``min_p``, ``repeat_penalty`` and ``ignore_eos`` (``extra_body``
  in the ``openai`` package) turn on llama.cpp-style filters. ``temperature`` 0 or ``top_p`` 0
  is greedy. Without ``seed`` the seed is random; with it the same request gives the same text.
- ``max_tokens`` (or ``max_completion_tokens``) must leave the prompt room in the context:
  prompt + max_tokens > context is a 400 ``context_length_exceeded``. Without it a chat reply
  may fill the context and a completion stops after 16 tokens (OpenAI's defaults).
- ``n``, ``best_of`` must be 1; ``echo`` false; penalties other than 0, ``logit_bias``, tools
  and non-text response formats are refused (400 naming the field) rather than ignored.
  Unknown fields are refused too; ``user``, ``store``, ``metadata``, ``service_tier`` and
  ``parallel_tool_calls`` are accepted and ignored.
- ``model`` may be any name: every peer serves one model, whose id (the GGUF file's stem)
  every response reports and ``GET /v1/models`` lists.
- ``usage.completion_tokens`` counts every token chosen, including a final end-of-generation
  token; logprobs list the tokens whose text is part of the reply (the end token is not).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from aiohttp import web

from ringllm.errors import RingError
from ringllm.generation import Step
from ringllm.http.plumbing import (METRICS_KEY, PEER_KEY, ClientGone, Parser, StepStream, error_body, model_id,
                                   start_request, status_for, write)
from ringllm.http.validate import ApiRequest, parse_chat, parse_completion
from ringllm.peer import Peer
from ringllm.runtime import ModelInfo


# -- responses (pure) -----------------------------------------------------------------------
class Answer:
    """Builds the JSON of one request's response from its Steps, streaming or whole."""

    def __init__(self, api: ApiRequest, info: ModelInfo, model: str, prompt_tokens: int) -> None:
        self.api, self.tok, self.model = api, info.tokenizer, model
        self.id = ("chatcmpl-" if api.kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if api.kind == "chat" else "text_completion"
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.text = ""
        self.finish_reason: str | None = None
        self.lp_content: list[dict[str, Any]] = []  # chat logprobs, one entry per shown token
        self.lp_legacy = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    # The end-of-generation token closes the reply without showing text: no logprobs entry.
    def _shown(self, step: Step) -> bool:
        return not (step.finish_reason == "stop" and self.tok.is_eog(step.token) and not self.api.request.ignore_eos)

    def _token(self, tid: int) -> tuple[str, list[int]]:
        raw = self.tok.token_bytes(tid)
        return raw.decode("utf-8", "replace"), list(raw)

    def add(self, step: Step) -> dict[str, Any] | None:
        """Record a step; return its logprobs part (chat: {"content": [...]}, completions:
        the legacy object) or None when logprobs are off or the step shows no token."""
        offset = len(self.text)
        self.completion_tokens += 1
        self.text += step.text
        self.finish_reason = step.finish_reason
        if not self.api.logprobs or not self._shown(step):
            return None
        text, raw = self._token(step.token)
        if self.api.kind == "chat":
            entry = {"token": text, "logprob": step.choice.logprob, "bytes": raw,
                     "top_logprobs": [{"token": t, "logprob": lp, "bytes": b}
                                      for t, b, lp in ((*self._token(i), lp) for i, lp in step.choice.top_logprobs)]}
            self.lp_content.append(entry)
            return {"content": [entry], "refusal": None}
        top = {self._token(i)[0]: lp for i, lp in step.choice.top_logprobs} if self.api.top_logprobs else None
        part = {"tokens": [text], "token_logprobs": [step.choice.logprob], "top_logprobs": [top],
                "text_offset": [offset]}
        for k, v in part.items():
            self.lp_legacy[k] += v
        return part

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def whole(self) -> dict[str, Any]:
        """The non-streaming response body."""
        if self.api.kind == "chat":
            lp = {"content": self.lp_content, "refusal": None} if self.api.logprobs else None
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text, "refusal": None},
                      "logprobs": lp, "finish_reason": self.finish_reason}
        else:
            choice = {"index": 0, "text": self.text, "logprobs": self.lp_legacy if self.api.logprobs else None,
                      "finish_reason": self.finish_reason}
        return {**self._head(self.object), "choices": [choice], "usage": self.usage()}

    def chunk(self, text: str | None, logprobs: dict[str, Any] | None, finish: str | None,
              role: bool = False) -> dict[str, Any]:
        """One streaming chunk (``chat.completion.chunk`` or ``text_completion``)."""
        if self.api.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            out = {**self._head("text_completion"),
                   "choices": [{"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}]}
        if self.api.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.api.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage()}


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    # backslashreplace: see ringllm.http.native._line (any str here is inside a JSON string)
    return f"data: {data}\n\n".encode("utf-8", "backslashreplace")


# -- handlers -------------------------------------------------------------------------------
async def handle_chat(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "chat", parse_chat)


async def handle_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "completions", parse_completion)


async def handle_models(request: web.Request) -> web.Response:
    peer = request.app[PEER_KEY]
    return web.json_response({"object": "list", "data": [_model_card(peer)]})


async def handle_model(request: web.Request) -> web.Response:
    peer = request.app[PEER_KEY]
    if request.match_info["model"] != model_id(peer):
        return web.json_response(error_body(f"the model '{request.match_info['model']}' does not exist; this ring "
                                            f"serves '{model_id(peer)}'", "invalid_request_error", "model",
                                            "model_not_found"), status=404)
    return web.json_response(_model_card(peer))


def _model_card(peer: Peer) -> dict[str, Any]:
    return {"id": model_id(peer), "object": "model", "created": int(peer.stats.started), "owned_by": "ringllm",
            "context_length": peer.model.max_len, "ring_size": peer.size}


async def _serve(http: web.Request, endpoint: str, parse: Parser) -> web.StreamResponse:
    peer = http.app[PEER_KEY]
    started = await start_request(http, endpoint, parse)
    stream, step = started.stream, started.first
    answer = Answer(started.api, peer.info, model_id(peer), len(started.api.request.prompt_ids))
    try:
        async with stream:
            if started.api.stream:
                return await _stream(http, stream, step, answer)
            while step is not None:
                answer.add(step)
                step = await stream.next()
            return web.json_response(answer.whole())
    except RingError as exc:
        # Failed after the first token of a non-streaming request (streams report in-band).
        stream.rec.outcome = "error"
        status, kind = status_for(exc)
        stream.rec.status = status
        return web.json_response(error_body(str(exc), kind), status=status)
    except (ClientGone, ConnectionError):
        stream.rec.outcome = "cancelled"
        return web.Response(status=499)
    except BaseException:
        stream.rec.outcome = "cancelled"
        raise
    finally:
        http.app[METRICS_KEY].finish(stream.rec)


async def _stream(http: web.Request, stream: StepStream, step: Step | None, answer: Answer) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(http)
    chat = answer.api.kind == "chat"
    try:
        await _events(http, resp, stream, step, answer, chat)
    except ClientGone:
        stream.rec.outcome = "cancelled"  # leaving _serve's 'async with' cancels the request
    return resp


async def _events(http: web.Request, resp: web.StreamResponse, stream: StepStream, step: Step | None,
                  answer: Answer, chat: bool) -> None:
    try:
        if chat:
            await write(http, resp, sse(answer.chunk("", None, None, role=True)))
        while step is not None:
            lp = answer.add(step)
            if step.text or lp is not None:
                await write(http, resp, sse(answer.chunk(step.text, lp, None)))
            step = await stream.next()
        await write(http, resp, sse(answer.chunk(None if chat else "", None, answer.finish_reason)))
        if answer.api.include_usage:
            await write(http, resp, sse(answer.usage_chunk()))
    except RingError as exc:
        stream.rec.outcome = "error"
        await write(http, resp, sse(error_body(str(exc), status_for(exc)[1])))
    await write(http, resp, sse("[DONE]"))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", handle_chat)
    app.router.add_post("/v1/completions", handle_completions)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/v1/models/{model}", handle_model)
