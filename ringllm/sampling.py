"""Token choice over a vocabulary that may be split across peers.

The rule (every peer applies it and so every peer picks the same token, with no master):

1. Each peer holds the logits of its vocabulary slice [v0, v1).
2. Repetition penalty on the slice (llama.cpp's rule: positive logits divided by the penalty,
   negative ones multiplied) for tokens in the last ``repeat_last_n`` of the sequence.
3. Greedy (temperature <= 0): every peer offers its best (logit, id); the highest logit wins,
   the lowest id on ties.
4. Otherwise the filters, in llama.cpp's default order top-k -> top-p -> min-p, each reduce to
   a logit threshold, computed from a small all-gather of each peer's sorted top candidates
   (and the slices' log-sum-exp when top-p runs without top-k). The kept set is every token
   with a logit at or above the threshold. Then temperature, then the **Gumbel-max trick**:
   the token is argmax over kept tokens of ``logit / T + g[id]``, where ``g`` is Gumbel noise
   for the whole vocabulary drawn from Philox(key=seed, counter=step). Noise depends only on
   (seed, step, token id), not on how the vocabulary is split, so P peers pick exactly what
   one peer would, and the same seed gives the same text.

``gather(obj) -> list`` is the all-gather of small Python objects (rank order); one peer
passes ``lambda o: [o]``. Every peer must call :func:`choose` the same number of times with
equal parameters (it makes 1 to 3 gathers a step, the same number on every peer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ringllm.errors import RequestError

Gather = Callable[[Any], list[Any]]


def single_gather(obj: Any) -> list[Any]:
    return [obj]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature <= 0`` means greedy; 0 disables top_k, 1.0 top_p, 0 min_p."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = 0
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        checks = [
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be a finite number >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (math.isfinite(self.repeat_penalty) and self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
            (0 <= self.top_logprobs <= 20, "top_logprobs must be between 0 and 20"),
            (0 <= self.seed < 2**63, "seed must be in [0, 2**63)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise RequestError(f"{msg} (got {self!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Choice:
    token: int
    logprob: float  # log-softmax of the raw model logits (before penalty and temperature)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


def choose(logits: np.ndarray, vocab_offset: int, vocab_size: int, params: SamplingParams, step: int,
           history: Sequence[int], gather: Gather = single_gather) -> Choice:
    """Pick the next token from this peer's logit slice ``logits`` (ids vocab_offset + i)."""
    raw = logits.astype(np.float32, copy=False)
    lg = _penalized(raw, vocab_offset, params, history)
    v0 = vocab_offset
    want_lp = params.top_logprobs
    local_lse = _logsumexp(raw)
    top_raw = _top(raw, want_lp, v0) if want_lp else ([], [])

    if params.greedy:
        parts = gather((_best(lg, raw, v0), local_lse, top_raw))
        token, token_logit = _argmax_pairs([p[0] for p in parts])
    else:
        token, token_logit, parts = _sample(lg, raw, v0, vocab_size, params, step, gather, local_lse, top_raw)

    lse = _combine_lse([p[1] for p in parts])
    logprob = float(token_logit - lse)
    top: list[tuple[int, float]] = []
    if want_lp:
        vals = np.concatenate([np.asarray(p[2][0], np.float32) for p in parts])
        ids = np.concatenate([np.asarray(p[2][1], np.int64) for p in parts])
        order = np.lexsort((ids, -vals))[:want_lp]
        top = [(int(ids[i]), float(vals[i] - lse)) for i in order]
    return Choice(token, logprob, top)


def _sample(lg: np.ndarray, raw: np.ndarray, v0: int, vocab_size: int, params: SamplingParams, step: int,
            gather: Gather, local_lse: float, top_raw) -> tuple[int, float, list]:
    """Filters as thresholds, then Gumbel-max: (token, its raw logit, the first gather's parts)."""
    k = params.top_k if params.top_k > 0 else 0
    need_list = k > 0 or params.top_p < 1.0
    m = k if k > 0 else 256
    first = None
    while True:
        cand = _top(lg, m, v0) if need_list else ([], [])
        parts = gather((cand, local_lse, top_raw, _logsumexp(lg), float(lg.max()) if len(lg) else -np.inf))
        first = first or parts
        vals = np.concatenate([np.asarray(p[0][0], np.float32) for p in parts]) if need_list else np.zeros(0, np.float32)
        vals = np.sort(vals)[::-1]
        gmax = max(p[4] for p in parts)
        tau = -np.inf
        if k > 0 and len(vals) >= k:
            tau = max(tau, float(vals[k - 1]))
        if params.top_p < 1.0:
            kept = vals if k == 0 else vals[:k]
            norm = _combine_lse([p[3] for p in parts]) if k == 0 else _logsumexp(kept)
            cum = np.cumsum(np.exp(kept.astype(np.float64) - norm))
            hit = np.nonzero(cum >= params.top_p)[0]
            # With top-k the list is complete; without it, the gathered prefix is exact only down
            # to the highest "last value sent" among peers that had more to send.
            bound = -np.inf
            if k == 0:
                truncated = [p[0][0][-1] for p in parts if len(p[0][0]) == m]
                bound = max(truncated) if truncated else -np.inf
            if len(hit) and kept[hit[0]] >= bound:
                tau = max(tau, float(kept[hit[0]]))
            elif k == 0 and bound > -np.inf:
                m *= 4  # not enough candidates to find the nucleus yet: ask for more
                continue
        if params.min_p > 0.0:
            tau = max(tau, gmax + math.log(params.min_p))
        break
    noise = _gumbel(params.seed, step, vocab_size)[v0 : v0 + len(lg)]
    score = np.where(lg >= tau, lg / np.float32(params.temperature) + noise, -np.inf)
    token, token_logit = _argmax_pairs(gather(_best(score, raw, v0)))
    return token, token_logit, first


def _gumbel(seed: int, step: int, n: int) -> np.ndarray:
    """Gumbel(0,1) noise for the whole vocabulary, a pure function of (seed, step)."""
    u = np.random.Generator(np.random.Philox(key=seed, counter=step)).random(n)
    return (-np.log(-np.log(np.clip(u, 1e-300, 1.0 - 1e-16)))).astype(np.float32)


def _penalized(lg: np.ndarray, v0: int, params: SamplingParams, history: Sequence[int]) -> np.ndarray:
    if params.repeat_penalty == 1.0 or not history or params.repeat_last_n == 0:
        return lg
    recent = np.unique(np.asarray(history[-params.repeat_last_n:], np.int64)) - v0
    recent = recent[(recent >= 0) & (recent < len(lg))]
    if not len(recent):
        return lg
    out = lg.copy()
    sel = out[recent]
    out[recent] = np.where(sel > 0, sel / params.repeat_penalty, sel * params.repeat_penalty)
    return out


def _top(lg: np.ndarray, m: int, v0: int) -> tuple[list[float], list[int]]:
    """This slice's m largest (values desc, ids), ties by lower id."""
    m = min(m, len(lg))
    if m == 0:
        return [], []
    idx = np.argpartition(-lg, m - 1)[:m] if m < len(lg) else np.arange(len(lg))
    idx = idx[np.lexsort((idx, -lg[idx]))]
    return lg[idx].tolist(), (idx + v0).tolist()


def _best(score: np.ndarray, raw: np.ndarray, v0: int) -> tuple[float, int, float] | None:
    """This slice's candidate: (score, id, raw logit) of its highest score, lowest id on ties."""
    if not len(score):
        return None
    i = int(np.argmax(score))
    return (float(score[i]), v0 + i, float(raw[i]))


def _argmax_pairs(cands: list[tuple[float, int, float] | None]) -> tuple[int, float]:
    """The winning (id, raw logit) among the peers' candidates: highest score, lowest id."""
    live = [c for c in cands if c is not None and c[0] > -np.inf]
    if not live:
        raise RequestError("no token can be sampled: every logit was filtered out")
    best = min(live, key=lambda c: (-c[0], c[1]))
    return best[1], best[2]


def _logsumexp(x: np.ndarray) -> float:
    if not len(x):
        return -math.inf
    m = float(x.max())
    return m + math.log(float(np.exp((x - m).astype(np.float64)).sum()))


def _combine_lse(parts: list[float]) -> float:
    m = max(parts)
    if m == -math.inf:
        return m
    return m + math.log(sum(math.exp(p - m) for p in parts))
