"""A generation :class:`~ringllm.generation.Request` in the form it travels the ring.

The control all-gather (see :mod:`ringllm.peer`) packs every new request with msgpack, as
this map::

    {"prompt_ids": [int, ...],            # each in [0, 2**31)
     "sampling": {"temperature": float, "top_k": int, "top_p": float, "min_p": float,
                  "repeat_penalty": float, "repeat_last_n": int, "seed": int, "top_logprobs": int},
     "max_tokens": int, "stop": [str, ...], "ignore_eos": bool}

:func:`to_wire` refuses (RequestError) a request msgpack cannot pack, e.g. a stop string
holding a lone surrogate, which UTF-8 cannot encode: the origin peer calls it before the
request joins the news, so such a request never reaches the ring. :func:`from_wire` checks
the types of everything it reads, so a malformed map is a RequestError, never another
exception; being a pure function of the map, it gives the same answer on every peer.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

import msgpack

from ringllm.errors import RequestError
from ringllm.generation import Request
from ringllm.sampling import SamplingParams

_SAMPLING_TYPES = {f.name: (float if f.type in ("float", float) else int) for f in fields(SamplingParams)}


def to_wire(r: Request) -> dict[str, Any]:
    """The msgpack-ready map of ``r``; RequestError if msgpack cannot pack it."""
    d = {"prompt_ids": list(r.prompt_ids), "sampling": asdict(r.sampling), "max_tokens": r.max_tokens,
         "stop": list(r.stop), "ignore_eos": r.ignore_eos}
    try:
        msgpack.packb(d, use_bin_type=True)
    except (UnicodeEncodeError, OverflowError, TypeError, ValueError) as exc:
        raise RequestError(f"the request cannot travel the ring: {type(exc).__name__}") from None
    return d


def from_wire(d: Any) -> Request:
    """The Request of a wire map; RequestError naming the key for anything malformed."""
    if not isinstance(d, dict):
        raise RequestError("a wire request must be a map")
    ids = _get(d, "prompt_ids", list)
    if not all(_is_int(t) for t in ids):
        raise RequestError("wire request: 'prompt_ids' must hold integers")
    s = _get(d, "sampling", dict)
    if set(s) != set(_SAMPLING_TYPES):
        raise RequestError(f"wire request: 'sampling' must have exactly the keys {sorted(_SAMPLING_TYPES)}")
    for name, kind in _SAMPLING_TYPES.items():
        v = s[name]
        if not (_is_int(v) or (kind is float and isinstance(v, float))):
            raise RequestError(f"wire request: 'sampling.{name}' must be a number")
    stop = _get(d, "stop", list)
    if not all(isinstance(x, str) for x in stop):
        raise RequestError("wire request: 'stop' must hold strings")
    max_tokens = _get(d, "max_tokens", int)
    ignore_eos = _get(d, "ignore_eos", bool)
    if isinstance(max_tokens, bool):
        raise RequestError("wire request: 'max_tokens' must be an integer")
    sampling = SamplingParams(**{k: _SAMPLING_TYPES[k](v) for k, v in s.items()})
    return Request(tuple(ids), sampling, max_tokens=max_tokens, stop=tuple(stop), ignore_eos=ignore_eos)


def _get(d: dict, key: str, kind: type) -> Any:
    if key not in d or not isinstance(d[key], kind):
        raise RequestError(f"wire request: '{key}' must be a {kind.__name__}")
    return d[key]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
