"""The OpenAI-compatible API of every peer: chat completions, completions, models.

Request bodies are validated field by field, once, at the boundary (:func:`parse_chat`,
:func:`parse_completion`: pure functions of the body, the model and the context length); the
handlers only move Steps into JSON or server-sent events. Semantics follow OpenAI's API
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
import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from ringllm.errors import RingError
from ringllm.generation import Request, Step
from ringllm.runtime import ModelInfo, prompt_ids
from ringllm.sampling import SamplingParams
from ringllm.server import (METRICS_KEY, PEER_KEY, ApiError, ClientGone, StepStream, error_body, start_request,
                            status_for, write)

MAX_STOP = 16
MAX_TOP_LOGPROBS = 20  # the sampler's limit (OpenAI's own: 20 for chat, 5 for completions)
COMPLETION_DEFAULT_MAX_TOKENS = 16

_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "logprobs",
           "presence_penalty", "frequency_penalty", "logit_bias", "user", "store", "metadata", "service_tier",
           "top_k", "min_p", "repeat_penalty", "ignore_eos"}
CHAT_FIELDS = frozenset(_COMMON | {"messages", "top_logprobs", "max_completion_tokens", "response_format", "tools",
                                   "tool_choice", "parallel_tool_calls", "functions", "function_call"})
COMPLETION_FIELDS = frozenset(_COMMON | {"prompt", "echo", "suffix", "best_of"})
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class ApiRequest:
    """A validated OpenAI request: what to generate and how to answer."""

    kind: str  # "chat" or "completion"
    request: Request
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


def model_id(peer: Any) -> str:
    """The id this peer's model goes by in the API: the GGUF file name without ``.gguf``."""
    return Path(peer.info.path).stem


# -- request parsing (pure) -----------------------------------------------------------------
class _Body:
    """Typed reads from a JSON body; errors are 400s naming the field. Absent and null are None."""

    def __init__(self, body: Any, allowed: frozenset[str]) -> None:
        if not isinstance(body, dict):
            raise ApiError("the request body must be a JSON object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(f"unknown field '{unknown[0]}'", param=unknown[0])
        self.body = body

    def raw(self, name: str) -> Any:
        return self.body.get(name)

    def boolean(self, name: str) -> bool | None:
        v = self.body.get(name)
        if v is not None and not isinstance(v, bool):
            raise ApiError(f"'{name}' must be true or false, got {v!r}", param=name)
        return v

    def string(self, name: str) -> str | None:
        v = self.body.get(name)
        if v is not None and not isinstance(v, str):
            raise ApiError(f"'{name}' must be a string, got {_short(v)}", param=name)
        return v

    def integer(self, name: str, lo: int, hi: int | None = None) -> int | None:
        v = self.body.get(name)
        if v is None:
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ApiError(f"'{name}' must be an integer, got {_short(v)}", param=name)
        if v < lo or (hi is not None and v > hi):
            rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise ApiError(f"'{name}' must be {rng}, got {v}", param=name)
        return v

    def number(self, name: str, lo: float, hi: float | None = None, *, lo_open: bool = False) -> float | None:
        v = self.body.get(name)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ApiError(f"'{name}' must be a number, got {_short(v)}", param=name)
        if v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
            rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]" if hi is not None else f"> {lo:g}"
            raise ApiError(f"'{name}' must be {rng}, got {v}", param=name)
        return float(v)

    def only(self, name: str, ok: Callable[[Any], bool], what: str) -> None:
        """Refuse a field we do not implement unless it has its no-op value."""
        v = self.body.get(name)
        if v is not None and not ok(v):
            raise ApiError(f"'{name}' is not supported by ringllm ({what})", param=name)


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, (bytes, bytearray)) else repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _common(b: _Body, prompt_len: int, context: int, vocab: int, max_tokens: int | None,
            default_max: int | None) -> dict[str, Any]:
    """Sampling, stop and length settings shared by both endpoints.

    Every value is bounded here: a request travels the ring (msgpack) and runs on every peer,
    so nothing a client sends may be able to upset the step loop.
    """
    b.string("model")
    b.string("user")
    b.integer("n", 1, 1)
    b.only("presence_penalty", lambda v: v == 0, "only 0; use 'repeat_penalty'")
    b.only("frequency_penalty", lambda v: v == 0, "only 0; use 'repeat_penalty'")
    b.only("logit_bias", lambda v: v == {}, "only an empty object")
    temperature = b.number("temperature", 0.0, 2.0)
    top_p = b.number("top_p", 0.0, 1.0)
    top_k = b.integer("top_k", 0, vocab)
    min_p = b.number("min_p", 0.0, 1.0)
    repeat_penalty = b.number("repeat_penalty", 0.0, lo_open=True)
    seed = b.integer("seed", -(2**63), 2**64 - 1)
    ignore_eos = b.boolean("ignore_eos") or False
    stream = b.boolean("stream") or False
    opts = b.raw("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage"} or not isinstance(opts.get("include_usage", False), bool):
            raise ApiError("'stream_options' must be an object {\"include_usage\": true|false}", param="stream_options")
        if not stream:
            raise ApiError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        include_usage = bool(opts.get("include_usage", False))
    stop = b.raw("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} non-empty strings",
                       param="stop")

    room = context - prompt_len
    if room < 1:
        raise ApiError(f"the prompt is {prompt_len} tokens but the context holds only {context}: no room to "
                       f"generate", param="messages" if default_max is None else "prompt", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = room if default_max is None else min(default_max, room)
    elif prompt_len + max_tokens > context:
        raise ApiError(f"this model's context holds {context} tokens, but {prompt_len + max_tokens} were requested "
                       f"({prompt_len} in the prompt, {max_tokens} to generate); lower 'max_tokens' to at most {room}",
                       param="max_tokens", code="context_length_exceeded")

    greedy = temperature == 0 or top_p == 0
    sampling = SamplingParams(
        temperature=0.0 if greedy else (1.0 if temperature is None else temperature),
        top_p=1.0 if top_p is None or greedy else top_p,
        top_k=top_k or 0,
        min_p=min_p or 0.0,
        repeat_penalty=repeat_penalty or 1.0,
        seed=(seed % 2**63) if seed is not None else int.from_bytes(os.urandom(7), "little"),
    )
    return {"sampling": sampling, "max_tokens": max_tokens, "stop": tuple(stop), "ignore_eos": ignore_eos,
            "stream": stream, "include_usage": include_usage}


def parse_chat(body: Any, info: ModelInfo, context: int) -> ApiRequest:
    """Validate a ``POST /v1/chat/completions`` body; raise ApiError (400) naming the field."""
    b = _Body(body, CHAT_FIELDS)
    b.only("tools", lambda v: v == [], "no tool calling")
    b.only("functions", lambda v: v == [], "no function calling")
    b.only("tool_choice", lambda v: v == "none", "no tool calling")
    b.only("function_call", lambda v: v == "none", "no function calling")
    b.only("response_format", lambda v: v == {"type": "text"}, "only {\"type\": \"text\"}")
    b.boolean("parallel_tool_calls")
    messages = _chat_messages(b.raw("messages"))
    ids = prompt_ids(info, messages=messages)
    logprobs = b.boolean("logprobs") or False
    top = b.integer("top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    if top and not logprobs:
        raise ApiError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    mt = b.integer("max_completion_tokens", 1)
    if mt is None:
        mt = b.integer("max_tokens", 1)
    c = _common(b, len(ids), context, info.config.vocab_size, mt, None)
    return _api("chat", ids, c, logprobs, top)


def parse_completion(body: Any, info: ModelInfo, context: int) -> ApiRequest:
    """Validate a ``POST /v1/completions`` body; raise ApiError (400) naming the field."""
    b = _Body(body, COMPLETION_FIELDS)
    b.only("echo", lambda v: v is False, "only false")
    b.only("suffix", lambda v: False, "no insertion")
    b.integer("best_of", 1, 1)
    ids = _completion_prompt(b.raw("prompt"), info)
    top = b.integer("logprobs", 0, MAX_TOP_LOGPROBS)
    c = _common(b, len(ids), context, info.config.vocab_size, b.integer("max_tokens", 1),
                COMPLETION_DEFAULT_MAX_TOKENS)
    return _api("completion", ids, c, top is not None, top or 0)


def _api(kind: str, ids: list[int], c: dict[str, Any], logprobs: bool, top: int) -> ApiRequest:
    sampling = SamplingParams(**{**c["sampling"].__dict__, "top_logprobs": top})
    req = Request(tuple(ids), sampling, max_tokens=c["max_tokens"], stop=c["stop"], ignore_eos=c["ignore_eos"])
    return ApiRequest(kind, req, c["stream"], c["include_usage"], logprobs, top)


def _chat_messages(messages: Any) -> list[dict[str, str]]:
    if messages is None:
        raise ApiError("'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(f"{where} must be an object", param=where)
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise ApiError(f"{where}.{extra[0]} is not supported (text messages only)", param=f"{where}.{extra[0]}")
        role = m.get("role")
        if role not in _ROLES:
            raise ApiError(f"{where}.role must be one of {', '.join(_ROLES)}, got {_short(role)}", param=f"{where}.role")
        out.append({"role": _ROLES[role], "content": _content(m.get("content"), f"{where}.content")})
    return out


def _content(c: Any, where: str) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(f"{where}[{j}] must be a text part {{\"type\": \"text\", \"text\": \"...\"}}",
                               param=f"{where}[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(f"{where} must be a string or a list of text parts, got {_short(c)}", param=where)


def _completion_prompt(p: Any, info: ModelInfo) -> list[int]:
    """A string, a list holding one string, a list of token ids, or a list holding one such list."""
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        ids = prompt_ids(info, p, raw=True)
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        vocab = info.config.vocab_size
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ApiError(f"'prompt' has token id {bad[0]} outside the vocabulary (0..{vocab - 1})", param="prompt")
        ids = list(p)
    elif p is None:
        raise ApiError("'prompt' is required", param="prompt")
    elif isinstance(p, list) and len(p) > 1:
        raise ApiError("only one prompt per request is supported; send several requests (they are batched)",
                       param="prompt")
    else:
        raise ApiError("'prompt' must be a string or a list of token ids", param="prompt")
    if not ids:
        raise ApiError("the prompt is empty (no tokens)", param="prompt")
    return ids


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
    return f"data: {data}\n\n".encode()


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


def _model_card(peer: Any) -> dict[str, Any]:
    return {"id": model_id(peer), "object": "model", "created": int(peer.stats.started), "owned_by": "ringllm",
            "context_length": peer.model.max_len, "ring_size": peer.size}


async def _serve(http: web.Request, endpoint: str, parse: Callable[[Any, ModelInfo, int], ApiRequest]
                 ) -> web.StreamResponse:
    peer = http.app[PEER_KEY]

    def parse_body(body: Any) -> tuple[Request, ApiRequest]:
        api = parse(body, peer.info, peer.model.max_len)
        return api.request, api

    started = await start_request(http, endpoint, parse_body)
    if isinstance(started, web.StreamResponse):
        return started
    stream, step, req, api = started
    answer = Answer(api, peer.info, model_id(peer), len(req.prompt_ids))
    try:
        async with stream:
            if api.stream:
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
