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
   the token is argmax over kept tokens of ``logit / T + g[id]``, where ``g[id]`` is the
   id-th Gumbel draw of Philox(key=seed, counter=step) (each peer draws only its slice of
   that stream). Noise depends only on
   (seed, step, token id), not on how the vocabulary is split, so P peers pick exactly what
   one peer would, and the same seed gives the same text.

``gather(obj) -> list`` is the all-gather of small Python objects (rank order); one peer
passes ``lambda o: [o]``. Every peer must call :func:`choose` the same number of times with
equal parameters (see :func:`choose_batch` for how many gathers it makes).
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
            (0 <= self.top_k < 2**31, "top_k must be in [0, 2**31)"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (math.isfinite(self.repeat_penalty) and self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (0 <= self.repeat_last_n < 2**31, "repeat_last_n must be in [0, 2**31)"),
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


def choose(logits: np.ndarray, vocab_offset: int, params: SamplingParams, step: int,
           history: Sequence[int], gather: Gather = single_gather) -> Choice:
    """Pick the next token from this peer's logit slice ``logits`` (ids vocab_offset + i)."""
    return choose_batch(logits[None, :], vocab_offset, [params], [step], [history], gather)[0]


def choose_batch(logits: np.ndarray, vocab_offset: int, params: Sequence[SamplingParams],
                 steps: Sequence[int], histories: Sequence[Sequence[int]], gather: Gather = single_gather) -> list[Choice]:
    """Pick one token for each row of ``logits`` (B, local_vocab), one sequence per row.

    Gathers per call, whatever B is: one when every row is greedy, two otherwise (plus one
    per growth of a top-p candidate list, which only top-p without top-k on a flat
    distribution needs). Every peer makes the same gathers because each decision is taken
    from gathered data.
    """
    v0, b = vocab_offset, len(params)
    raws = [logits[i].astype(np.float32, copy=False) for i in range(b)]
    lgs = [_penalized(raws[i], v0, params[i], histories[i]) for i in range(b)]
    sizes = [p.top_k if p.top_k > 0 else 256 for p in params]

    def summary(i: int) -> tuple:
        p, lg = params[i], lgs[i]
        need_list = not p.greedy and (p.top_k > 0 or p.top_p < 1.0)
        raw_lse = _logsumexp(raws[i])
        return (_best(lg, raws[i], v0) if p.greedy else None,
                raw_lse,
                _top(raws[i], p.top_logprobs, v0) if p.top_logprobs else ([], []),
                _top(lg, sizes[i], v0) if need_list else ([], []),
                raw_lse if lg is raws[i] else _logsumexp(lg),
                float(lg.max()) if len(lg) else -math.inf)

    gathered = gather([summary(i) for i in range(b)])
    per_seq = [[list(rank_parts[i]) for rank_parts in gathered] for i in range(b)]

    sampled = [i for i in range(b) if not params[i].greedy]
    taus: dict[int, float] = {}
    pending = sampled
    while pending:
        retry = []
        for i in pending:
            tau = _threshold(per_seq[i], params[i], sizes[i])
            if tau is None:
                sizes[i] *= 4  # not enough candidates to find the nucleus yet
                retry.append(i)
            else:
                taus[i] = tau
        if retry:
            more = gather([_top(lgs[i], sizes[i], v0) for i in retry])
            for j, i in enumerate(retry):
                for r, rank_parts in enumerate(more):
                    per_seq[i][r][3] = rank_parts[j]
        pending = retry

    winners: dict[int, tuple[int, float]] = {}
    if sampled:
        local = []
        for i in sampled:
            p = params[i]
            noise = _gumbel(p.seed, steps[i], v0, v0 + len(lgs[i]))
            score = np.where(lgs[i] >= taus[i], lgs[i] / np.float32(p.temperature) + noise, -np.inf)
            local.append(_best(score, raws[i], v0))
        for j, cands in enumerate(zip(*gather(local))):
            winners[sampled[j]] = _argmax_pairs(list(cands))

    out = []
    for i in range(b):
        parts = per_seq[i]
        token, token_logit = winners[i] if i in winners else _argmax_pairs([q[0] for q in parts])
        lse = _combine_lse([q[1] for q in parts])
        top: list[tuple[int, float]] = []
        if params[i].top_logprobs:
            vals = np.concatenate([np.asarray(q[2][0], np.float32) for q in parts])
            ids = np.concatenate([np.asarray(q[2][1], np.int64) for q in parts])
            order = np.lexsort((ids, -vals))[: params[i].top_logprobs]
            top = [(int(ids[k]), float(vals[k] - lse)) for k in order]
        out.append(Choice(token, float(token_logit - lse), top))
    return out


def _threshold(parts: list[list], params: SamplingParams, m: int) -> float | None:
    """The logit threshold of the top-k / top-p / min-p filters, or None if the gathered
    candidate lists are too short to place the top-p cut exactly."""
    k = params.top_k
    vals = np.sort(np.concatenate([np.asarray(q[3][0], np.float32) for q in parts]))[::-1]
    tau = -math.inf
    if k > 0 and len(vals) >= k:
        tau = max(tau, float(vals[k - 1]))
    if params.top_p < 1.0:
        kept = vals if k == 0 else vals[:k]
        norm = _combine_lse([q[4] for q in parts]) if k == 0 else _logsumexp(kept)
        cum = np.cumsum(np.exp(kept.astype(np.float64) - norm))
        hit = np.nonzero(cum >= params.top_p)[0]
        # With top-k the lists are complete; without it the merged prefix is exact only down
        # to the highest "last value sent" among peers that had more to send.
        bound = -math.inf
        if k == 0:
            truncated = [q[3][0][-1] for q in parts if len(q[3][0]) == m]
            bound = max(truncated) if truncated else -math.inf
        if len(hit) and kept[hit[0]] >= bound:
            tau = max(tau, float(kept[hit[0]]))
        elif k == 0 and bound > -math.inf:
            return None
    if params.min_p > 0.0:
        tau = max(tau, max(q[5] for q in parts) + math.log(params.min_p))
    return tau


def _gumbel(seed: int, step: int, lo: int, hi: int) -> np.ndarray:
    """Gumbel(0,1) noise for token ids [lo, hi): entries lo..hi-1 of one stream that is a pure
    function of (seed, step), so every peer draws only its own vocabulary slice and the slices
    agree with a single peer's whole-vocabulary draw. Philox is counter-based: ``advance(k)``
    skips 4k doubles in O(1)."""
    bits = np.random.Philox(key=seed, counter=step)
    bits.advance(lo // 4)
    u = np.random.Generator(bits).random(hi - lo + lo % 4)[lo % 4:]
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
    """log(sum(exp(x))) for float32 x: exp in float32 (each term to ~1 ulp, 3x faster than in
    float64 over a vocabulary), the sum accumulated in float64."""
    if not len(x):
        return -math.inf
    m = x.max()
    if m == -np.inf:
        return -math.inf
    e = np.subtract(x, m, dtype=np.float32)
    np.exp(e, out=e)
    return float(m) + math.log(float(np.add.reduce(e, dtype=np.float64)))


def _combine_lse(parts: list[float]) -> float:
    m = max(parts)
    if m == -math.inf:
        return m
    return m + math.log(sum(math.exp(p - m) for p in parts))
