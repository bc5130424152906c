"""Requests, the per-sequence state machine, and the single-process generation loop.

A :class:`Sequence` is deterministic: given the same request and the same chosen tokens, every
peer of a ring holds the same state and reaches the same finish decision at the same step,
so no peer has to tell the others that a sequence ended.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence as Seq

import numpy as np

from ringllm.errors import RequestError
from ringllm.model import KVCache, Segment, Transformer
from ringllm.sampling import Choice, Gather, SamplingParams, choose, single_gather
from ringllm.stops import StopMatcher
from ringllm.tokenizer import StreamDecoder, Tokenizer


@dataclass(frozen=True)
class Request:
    """One completion to generate from already-tokenized prompt ids."""

    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise RequestError("the prompt is empty (no tokens)")
        if not 1 <= self.max_tokens < 2**31:
            raise RequestError(f"max_tokens must be in [1, 2**31) (got {self.max_tokens})")
        if any(not 0 <= t < 2**31 for t in self.prompt_ids):
            raise RequestError("prompt token ids must be in [0, 2**31)")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must not be empty")

    def check_fits(self, context_length: int) -> None:
        """Raise RequestError if the prompt leaves no room to generate in the context."""
        if len(self.prompt_ids) > context_length:
            raise RequestError(
                f"prompt is {len(self.prompt_ids)} tokens but the context holds only {context_length}"
            )


@dataclass
class Step:
    """What one sampled token produced for the caller."""

    token: int
    text: str  # new text safe to show (may be empty while a UTF-8 sequence or stop string is pending)
    choice: Choice
    finish_reason: str | None = None  # "stop" (EOG token or stop string) or "length"


class Sequence:
    """The state of one request as generation proceeds (identical on every peer)."""

    def __init__(self, request: Request, tokenizer: Tokenizer, cache: KVCache, context_length: int) -> None:
        request.check_fits(context_length)
        self.request = request
        self.cache = cache
        self.context_length = context_length
        self.ids: list[int] = []
        self.finish_reason: str | None = None
        self._eog = frozenset(tokenizer.eog_ids)
        self._decoder = StreamDecoder(tokenizer)
        self._stops = StopMatcher(request.stop)

    @property
    def history(self) -> list[int]:
        return list(self.request.prompt_ids) + self.ids

    def next_tokens(self) -> np.ndarray:
        """The tokens to feed next: the whole prompt first, then the last chosen token."""
        if self.cache.length == 0:
            return np.asarray(self.request.prompt_ids, np.int64)
        return np.asarray(self.ids[-1:], np.int64)

    def accept(self, choice: Choice) -> Step:
        """Record a chosen token; decide whether the sequence is finished."""
        assert self.finish_reason is None, "sequence already finished"
        tok = choice.token
        self.ids.append(tok)
        if tok in self._eog and not self.request.ignore_eos:
            self.finish_reason = "stop"  # the end-of-generation token's own text is not shown
            return Step(tok, self._drain(), choice, self.finish_reason)
        text, stopped = self._stops.push(self._decoder.push(tok))
        if stopped:
            self.finish_reason = "stop"
        elif len(self.ids) >= self.request.max_tokens or self.cache.length >= self.context_length:
            self.finish_reason = "length"
            text += self._drain()
        return Step(tok, text, choice, self.finish_reason)

    def _drain(self) -> str:
        """At the end: text held for an incomplete UTF-8 sequence or a possible stop string."""
        text, stopped = self._stops.push(self._decoder.flush())
        return text if stopped else text + self._stops.flush()


class LocalEngine:
    """Generation on one process that holds the whole model (the ring of one), synchronously."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, gather: Gather = single_gather) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.gather = gather

    def generate(self, request: Request) -> Iterator[Step]:
        """Yield one Step per generated token until the request finishes."""
        seq = Sequence(request, self.tokenizer, self.model.new_cache(), self.model.max_len)
        v0 = self.model.vocab_range[0]
        while seq.finish_reason is None:
            logits = self.model.forward([Segment(seq.cache, seq.next_tokens())])[0]
            choice = choose(logits, v0, request.sampling, len(seq.ids), seq.history, self.gather)
            yield seq.accept(choice)


@dataclass
class Completion:
    """A finished generation with its timing (what ``--json`` prints, plus stats)."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    time_to_first_token: float = 0.0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "prompt_ids": self.prompt_ids,
            "ids": self.ids,
            "text": self.text,
            "top_logprobs": [[[i, lp] for i, lp in step] for step in self.top_logprobs],
            "finish_reason": self.finish_reason,
        }

    @property
    def tokens_per_second(self) -> float:
        decode = self.seconds - self.time_to_first_token
        return (len(self.ids) - 1) / decode if len(self.ids) > 1 and decode > 0 else 0.0


def collect(steps: Iterator[Step], prompt_ids: Seq[int], on_text=None) -> Completion:
    """Drain steps into a Completion, calling ``on_text(piece)`` as text arrives."""
    out = Completion(list(prompt_ids))
    t0 = time.perf_counter()
    for st in steps:
        if not out.ids:
            out.time_to_first_token = time.perf_counter() - t0
        out.ids.append(st.token)
        out.text += st.text
        out.top_logprobs.append(st.choice.top_logprobs)
        out.finish_reason = st.finish_reason
        if on_text and st.text:
            on_text(st.text)
    out.seconds = time.perf_counter() - t0
    return out
