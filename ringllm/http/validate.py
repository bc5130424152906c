"""Request bodies validated once, at the boundary, into a frozen :class:`ApiRequest`.

One validator serves both APIs (the native ``/ringllm/v1/generate`` and OpenAI's chat and
text completions): the same reads of the same fields (stop strings, messages, token ids,
sampling settings, seeds, the context check), with what differs between the APIs (defaults,
ranges, field names) in one :class:`_Dialect` per API. Every function here is pure (a body,
the model's tokenizer and vocabulary, the context length) and raises
:class:`~ringllm.errors.RequestError` with ``param`` naming the field, so a refusal is a 400
whose body says which field was wrong.

Everything a client sends is bounded here, because a request travels the ring (msgpack) and
runs on every peer: nothing may be able to upset a later stage. :func:`check_json` refuses,
anywhere in the body, strings UTF-8 cannot encode (lone surrogates, which JSON's ``\\ud800``
escapes can produce), NaN and infinities, and nesting deeper than :data:`MAX_DEPTH`; the
field reads refuse wrong types and out-of-range numbers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from typing import Any, Callable

from ringllm.errors import RequestError
from ringllm.generation import Request
from ringllm.runtime import ModelInfo, prompt_ids
from ringllm.sampling import SamplingParams

MAX_DEPTH = 16  # nested arrays/objects; the deepest body we read, messages[i].content[j].text, has 5
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20  # the sampler's limit (OpenAI's own: 20 for chat, 5 for completions)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
NATIVE_DEFAULT_MAX_TOKENS = 256
MAX_SEED = 2**63  # the sampler's seeds are in [0, 2**63): a Philox key the ring packs as int64
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class ApiRequest:
    """A validated request: what to generate and how to answer.

    ``kind`` is ``"native"``, ``"chat"`` or ``"completion"``; ``top_logprobs`` is how many
    alternatives each token reports (also in ``request.sampling``).
    """

    kind: str
    request: Request
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


# -- the whole body -------------------------------------------------------------------------
def parse_json(raw: bytes) -> Any:
    """The JSON document in ``raw``; RequestError for bytes that are not JSON (including
    integers too long for Python to convert, and nesting too deep to parse)."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:  # ValueError: JSONDecodeError, over-long integers
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError("the request body is not valid JSON: nested too deeply") from None


def check_json(body: Any) -> None:
    """Refuse anything in a parsed body that a later stage could choke on, naming where it is:
    strings (and keys) UTF-8 cannot encode, NaN and infinities, nesting deeper than MAX_DEPTH.

    Recursion is bounded by MAX_DEPTH, and the path is only built for a refusal, so a big
    body costs no memory beyond itself."""
    try:
        _walk(body, 0)
    except _Bad as bad:
        where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in reversed(bad.path)).lstrip(".")
        raise RequestError(bad.message(where), param=where or None) from None


class _Bad(Exception):
    """A refusal found by _walk; ``path`` collects the keys and indices on the way out."""

    def __init__(self, what: str, detail: str = "") -> None:
        super().__init__(what)
        self.what, self.detail, self.path = what, detail, []

    def message(self, where: str) -> str:
        field = f"'{where}'" if where else "the body"
        if self.what == "key":
            return f"a key of {field} {self.detail}"
        if self.what == "deep":
            return f"{field} nests deeper than {MAX_DEPTH} levels"
        return f"{field} {self.detail}"


def _walk(v: Any, depth: int) -> None:
    if isinstance(v, str):
        _utf8(v, "value")
    elif isinstance(v, float):
        if not math.isfinite(v):
            raise _Bad("number", f"must be a finite number, got {v}")
    elif isinstance(v, (dict, list)):
        if depth >= MAX_DEPTH:
            raise _Bad("deep")
        for k, x in (v.items() if isinstance(v, dict) else enumerate(v)):
            if isinstance(k, str):
                _utf8(k, "key")
            try:
                _walk(x, depth + 1)
            except _Bad as bad:
                bad.path.append(k)
                raise


def _utf8(s: str, what: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _Bad(what, f"is not valid Unicode: it holds a lone surrogate ({exc.object[exc.start]!a} at character "
                         f"{exc.start}), which UTF-8 cannot encode") from None


class Fields:
    """Typed reads from a JSON object; errors name the field. Absent and null read as None."""

    def __init__(self, body: Any, allowed: frozenset[str]) -> None:
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        check_json(body)
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise RequestError(f"unknown field '{unknown[0]}' (allowed: {', '.join(sorted(allowed))})",
                               param=unknown[0])
        self.body = body

    def raw(self, name: str) -> Any:
        return self.body.get(name)

    def boolean(self, name: str) -> bool | None:
        v = self.body.get(name)
        if v is not None and not isinstance(v, bool):
            raise RequestError(f"'{name}' must be true or false, got {_short(v)}", param=name)
        return v

    def string(self, name: str) -> str | None:
        v = self.body.get(name)
        if v is not None and not isinstance(v, str):
            raise RequestError(f"'{name}' must be a string, got {_short(v)}", param=name)
        return v

    def integer(self, name: str, lo: int, hi: int | None = None) -> int | None:
        v = self.body.get(name)
        if v is None:
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise RequestError(f"'{name}' must be an integer, got {_short(v)}", param=name)
        if v < lo or (hi is not None and v > hi):
            rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise RequestError(f"'{name}' must be {rng}, got {_short(v)}", param=name)
        return v

    def number(self, name: str, lo: float, hi: float | None = None, *, lo_open: bool = False) -> float | None:
        v = self.body.get(name)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RequestError(f"'{name}' must be a number, got {_short(v)}", param=name)
        if v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
            rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]" if hi is not None else f"> {lo:g}" if lo_open \
                else f">= {lo:g}"
            raise RequestError(f"'{name}' must be {rng}, got {_short(v)}", param=name)
        return float(v)

    def only(self, name: str, ok: Callable[[Any], bool], what: str) -> None:
        """Refuse a field we do not implement unless it has its no-op value."""
        v = self.body.get(name)
        if v is not None and not ok(v):
            raise RequestError(f"'{name}' is not supported by ringllm ({what})", param=name)


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, int) or isinstance(v, bool) or abs(v) < 10**40 else f"an integer of {len(str(abs(v)))} digits"
    return s if len(s) <= 40 else s[:37] + "..."


# -- the fields both APIs share -------------------------------------------------------------
@dataclass(frozen=True)
class _Dialect:
    """What differs between the APIs in the shared fields."""

    fields: frozenset[str]
    defaults: SamplingParams  # before the seed, which is random unless given
    temperature_max: float | None
    openai: bool  # top_p 0 means greedy; seeds in [-2**63, 2**64) are taken mod 2**63


_SAMPLING = frozenset({"temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "max_tokens", "stop",
                       "ignore_eos"})
NATIVE = _Dialect(frozenset(_SAMPLING | {"prompt", "raw", "system", "messages", "prompt_ids", "top_logprobs"}),
                  SamplingParams(), None, openai=False)
_OPENAI_COMMON = _SAMPLING | {"model", "n", "stream", "stream_options", "logprobs", "presence_penalty",
                              "frequency_penalty", "logit_bias", "user", "store", "metadata", "service_tier"}
CHAT = _Dialect(frozenset(_OPENAI_COMMON | {"messages", "top_logprobs", "max_completion_tokens", "response_format",
                                            "tools", "tool_choice", "parallel_tool_calls", "functions",
                                            "function_call"}),
                SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0), 2.0, openai=True)
COMPLETION = _Dialect(frozenset(_OPENAI_COMMON | {"prompt", "echo", "suffix", "best_of"}), CHAT.defaults, 2.0,
                      openai=True)


def sampling(f: Fields, d: _Dialect, vocab: int, top_logprobs: int) -> SamplingParams:
    """The sampling settings: the dialect's defaults overridden by the body's fields."""
    temperature = f.number("temperature", 0.0, d.temperature_max)
    top_p = f.number("top_p", 0.0, 1.0, lo_open=not d.openai)
    kw: dict[str, Any] = {
        "temperature": temperature, "top_p": top_p, "top_k": f.integer("top_k", 0, vocab),
        "min_p": f.number("min_p", 0.0, 1.0), "repeat_penalty": f.number("repeat_penalty", 0.0, lo_open=True),
    }
    kw = {k: v for k, v in kw.items() if v is not None}
    if d.openai and (temperature == 0 or top_p == 0):  # OpenAI: either at 0 means greedy
        kw.update(temperature=0.0, top_p=1.0)
    seed = f.integer("seed", -MAX_SEED, 2 * MAX_SEED - 1) if d.openai else f.integer("seed", 0, MAX_SEED - 1)
    kw["seed"] = seed % MAX_SEED if seed is not None else int.from_bytes(os.urandom(7), "little")
    return replace(d.defaults, **kw, top_logprobs=top_logprobs)


def stop_strings(f: Fields) -> tuple[str, ...]:
    """``stop``: a non-empty string or a list of at most MAX_STOP of them (none: no stop)."""
    stop = f.raw("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} non-empty strings",
                           param="stop")
    return tuple(stop)


def messages(v: Any) -> list[dict[str, str]]:
    """Chat messages: a non-empty list of {"role", "content"[, "name"]}, content a string or a
    list of text parts; roles as OpenAI names them ("developer" is the system role)."""
    if v is None:
        raise RequestError("'messages' is required", param="messages")
    if not isinstance(v, list) or not v:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object", param=where)
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise RequestError(f"{where}.{extra[0]} is not supported (text messages only)", param=f"{where}.{extra[0]}")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {_short(role)}",
                               param=f"{where}.role")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise RequestError(f"{where}.name must be a string", param=f"{where}.name")
        out.append({"role": ROLES[role], "content": _content(m.get("content"), f"{where}.content")})
    return out


def _content(c: Any, where: str) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}[{j}] must be a text part {{\"type\": \"text\", \"text\": \"...\"}}",
                                   param=f"{where}[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"{where} must be a string or a list of text parts, got {_short(c)}", param=where)


def token_ids(v: Any, vocab: int, param: str) -> list[int]:
    """A non-empty list of token ids, each in the vocabulary."""
    if not isinstance(v, list) or not v or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise RequestError(f"'{param}' must be a non-empty list of token ids (integers)", param=param)
    bad = next((t for t in v if not 0 <= t < vocab), None)
    if bad is not None:
        raise RequestError(f"'{param}' has token id {_short(bad)} outside the vocabulary (0..{vocab - 1})", param=param)
    return list(v)


def fit(n_prompt: int, max_tokens: int | None, context: int, default: int | None, *, param: str,
        must_fit: bool) -> int:
    """``max_tokens`` for a prompt of ``n_prompt`` tokens: ``default`` (None: the rest of the
    context) when not given. A prompt that leaves no room is a 400 ``context_length_exceeded``
    naming ``param``; with ``must_fit``, so is a prompt + max_tokens over the context (OpenAI's
    rule; the native API stops at the context instead, with finish_reason "length")."""
    room = context - n_prompt
    if room < 1:
        raise RequestError(f"the prompt is {n_prompt} tokens but the context holds only {context}: no room to "
                           f"generate", param=param, code="context_length_exceeded")
    if max_tokens is None:
        return room if default is None else min(default, room)
    if must_fit and max_tokens > room:
        raise RequestError(f"this model's context holds {context} tokens, but {n_prompt + max_tokens} were requested "
                           f"({n_prompt} in the prompt, {max_tokens} to generate); lower 'max_tokens' to at most {room}",
                           param="max_tokens", code="context_length_exceeded")
    return max_tokens


def _request(ids: list[int], f: Fields, sp: SamplingParams, max_tokens: int) -> Request:
    return Request(tuple(ids), sp, max_tokens=max_tokens, stop=stop_strings(f),
                   ignore_eos=f.boolean("ignore_eos") or False)


# -- the three endpoints --------------------------------------------------------------------
def parse_native(body: Any, info: ModelInfo, context: int) -> ApiRequest:
    """Validate a ``POST /ringllm/v1/generate`` body (see docs/api.md)."""
    f = Fields(body, NATIVE.fields)
    raw, system = f.boolean("raw") or False, f.string("system")
    if f.raw("prompt_ids") is not None:
        ids, param = token_ids(f.raw("prompt_ids"), info.config.vocab_size, "prompt_ids"), "prompt_ids"
    elif f.raw("messages") is not None:
        ids, param = prompt_ids(info, messages=messages(f.raw("messages"))), "messages"
    elif isinstance(f.raw("prompt"), str):
        ids, param = prompt_ids(info, f.raw("prompt"), raw=raw, system=system), "prompt"
    else:
        raise RequestError("give one of 'prompt' (a string), 'messages' or 'prompt_ids'", param="prompt")
    if not ids:
        raise RequestError("the prompt is empty (no tokens)", param=param)
    mt = f.integer("max_tokens", 1, context)
    max_tokens = fit(len(ids), mt, context, NATIVE_DEFAULT_MAX_TOKENS, param=param, must_fit=False)
    sp = sampling(f, NATIVE, info.config.vocab_size, f.integer("top_logprobs", 0, MAX_TOP_LOGPROBS) or 0)
    return ApiRequest("native", _request(ids, f, sp, max_tokens))


def _openai_common(f: Fields) -> tuple[bool, bool]:
    """The OpenAI fields we accept only at their no-op values; (stream, include_usage)."""
    f.string("model")
    f.string("user")
    f.integer("n", 1, 1)
    f.only("presence_penalty", lambda v: v == 0, "only 0; use 'repeat_penalty'")
    f.only("frequency_penalty", lambda v: v == 0, "only 0; use 'repeat_penalty'")
    f.only("logit_bias", lambda v: v == {}, "only an empty object")
    stream = f.boolean("stream") or False
    opts = f.raw("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict) or set(opts) - {"include_usage"} or not isinstance(opts.get("include_usage", False), bool):
        raise RequestError("'stream_options' must be an object {\"include_usage\": true|false}", param="stream_options")
    if not stream:
        raise RequestError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    return stream, bool(opts.get("include_usage", False))


def parse_chat(body: Any, info: ModelInfo, context: int) -> ApiRequest:
    """Validate a ``POST /v1/chat/completions`` body."""
    f = Fields(body, CHAT.fields)
    f.only("tools", lambda v: v == [], "no tool calling")
    f.only("functions", lambda v: v == [], "no function calling")
    f.only("tool_choice", lambda v: v == "none", "no tool calling")
    f.only("function_call", lambda v: v == "none", "no function calling")
    f.only("response_format", lambda v: v == {"type": "text"}, "only {\"type\": \"text\"}")
    f.boolean("parallel_tool_calls")
    ids = prompt_ids(info, messages=messages(f.raw("messages")))
    logprobs = f.boolean("logprobs") or False
    top = f.integer("top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    if top and not logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    mt = f.integer("max_completion_tokens", 1)
    if mt is None:
        mt = f.integer("max_tokens", 1)
    stream, include_usage = _openai_common(f)
    max_tokens = fit(len(ids), mt, context, None, param="messages", must_fit=True)
    sp = sampling(f, CHAT, info.config.vocab_size, top)
    return ApiRequest("chat", _request(ids, f, sp, max_tokens), stream, include_usage, logprobs, top)


def parse_completion(body: Any, info: ModelInfo, context: int) -> ApiRequest:
    """Validate a ``POST /v1/completions`` body."""
    f = Fields(body, COMPLETION.fields)
    f.only("echo", lambda v: v is False, "only false")
    f.only("suffix", lambda v: False, "no insertion")
    f.integer("best_of", 1, 1)
    ids = _completion_prompt(f.raw("prompt"), info)
    top = f.integer("logprobs", 0, MAX_TOP_LOGPROBS)
    stream, include_usage = _openai_common(f)
    max_tokens = fit(len(ids), f.integer("max_tokens", 1), context, COMPLETION_DEFAULT_MAX_TOKENS, param="prompt",
                     must_fit=True)
    sp = sampling(f, COMPLETION, info.config.vocab_size, top or 0)
    return ApiRequest("completion", _request(ids, f, sp, max_tokens), stream, include_usage,
                      top is not None, top or 0)


def _completion_prompt(p: Any, info: ModelInfo) -> list[int]:
    """A string, a list holding one string, a list of token ids, or a list holding one such list."""
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        ids = prompt_ids(info, p, raw=True)
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        ids = token_ids(p, info.config.vocab_size, "prompt")
    elif p is None:
        raise RequestError("'prompt' is required", param="prompt")
    elif isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise RequestError("only one prompt per request is supported; send several requests (they are batched)",
                           param="prompt")
    else:
        raise RequestError("'prompt' must be a string or a list of token ids", param="prompt")
    if not ids:
        raise RequestError("the prompt is empty (no tokens)", param="prompt")
    return ids
