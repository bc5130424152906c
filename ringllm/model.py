"""The transformer forward pass on one peer's shard, rank-agnostic.

The model knows nothing of ranks or sockets: it computes with whatever slices the loader gave
it and calls the ``allreduce`` it was built with twice per layer (after attention, after the
FFN), once for the embedding when the vocabulary is split, and returns logits for its own
vocabulary slice. Built without one (``allreduce=None``) it is the plain single-device model,
and only then may a long prefill run pipelined over the kernel threads (:mod:`ringllm.prefill`).

What differs between architectures (llama, qwen2, qwen3, gemma3) is data: the config's
:class:`~ringllm.model_file.ArchFacts` and the optional weights the loader filled in (biases,
q/k norms, post-norms). The math itself is in :mod:`ringllm.nn`.

A forward call takes a batch of *segments*: each is one sequence's new tokens (a whole prompt
for prefill, one token for decode) with that sequence's KV cache. All segments' tokens go
through the matrix products together; only attention is per segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ringllm.errors import RequestError
from ringllm.prefill import AfterKV, Span, layers_maybe_pipelined
from ringllm.shard.loader import LayerWeights, ShardWeights

AllReduce = Callable[[np.ndarray], np.ndarray]


def identity_allreduce(x: np.ndarray) -> np.ndarray:
    return x


class KVCache:
    """Keys and values of one sequence for this peer's KV heads, grown on demand.

    Layout per layer: (n_kv_local, capacity, head_dim) float32, so one head's keys are
    contiguous for the attention matmuls. Capacity doubles as the sequence grows, up to
    ``max_len`` (the context length); nothing is reserved for tokens that never come.
    """

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, max_len: int, initial: int = 64) -> None:
        self.n_layers, self.n_kv, self.head_dim, self.max_len = n_layers, n_kv, head_dim, max_len
        self.length = 0
        self._cap = 0
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self._initial = initial

    def reserve(self, length: int) -> None:
        if length > self.max_len:
            raise RequestError(f"sequence of {length} tokens exceeds the context length {self.max_len}")
        if length <= self._cap:
            return
        cap = max(self._initial, self._cap)
        while cap < length:
            cap *= 2
        cap = min(cap, self.max_len)
        shape = (self.n_kv, cap, self.head_dim)
        for store in (self.k, self.v):
            for i in range(self.n_layers):
                grown = np.empty(shape, np.float32)
                if i < len(store):
                    grown[:, : self.length] = store[i][:, : self.length]
                    store[i] = grown
                else:
                    store.append(grown)
        self._cap = cap

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


@dataclass
class Segment:
    """New tokens of one sequence to run through the model, appended to its cache."""

    cache: KVCache
    tokens: np.ndarray  # int (n,)


class _Batch:
    """What every layer of one forward shares: the spans, their positions, RoPE factors per
    base, and causal masks per window (computed on first use)."""

    def __init__(self, model: "Transformer", spans: Sequence[Span]) -> None:
        self.spans = spans
        self.positions = np.concatenate([np.arange(s.start, s.start + s.count) for s in spans])
        self._model = model
        self._rope: dict[float, np.ndarray] = {}
        self._masks: dict[int, list[np.ndarray | None]] = {}

    def rope(self, theta: float) -> np.ndarray:
        if theta not in self._rope:
            c = self._model.cfg
            self._rope[theta] = self._model.nn.rope_factors(self.positions, c.rope_dim, theta)
        return self._rope[theta]

    def masks(self, window: int) -> list[np.ndarray | None]:
        if window not in self._masks:
            qpk = self._model.shard.q_per_kv
            self._masks[window] = [self._model.nn.causal_mask(s.start, s.count, qpk, window) for s in self.spans]
        return self._masks[window]


class Transformer:
    """One peer's part of a model. ``forward`` returns local-vocab logits.

    ``allreduce`` sums a peer's partial activations over the ring; None means this model runs
    alone (no peers: the sums are its own). ``allreduce_exact`` is for sums that are one peer's
    vector plus zeros (the embedding), never quantized on the wire; it defaults to ``allreduce``.
    """

    def __init__(self, weights: ShardWeights, allreduce: AllReduce | None = None, max_len: int | None = None,
                 allreduce_exact: AllReduce | None = None) -> None:
        self.w = weights
        self.cfg = weights.config
        self.shard = weights.shard
        self.nn = weights.kernels.nn  # the per-token math: ringllm.nn or its compiled twin
        self.alone = allreduce is None
        self.allreduce = allreduce or identity_allreduce
        self.allreduce_exact = allreduce_exact or self.allreduce
        self.max_len = min(max_len or self.cfg.context_length, self.cfg.context_length)
        self.vocab_range = weights.shard.vocab
        self._split_vocab = (self.vocab_range[1] - self.vocab_range[0]) != self.cfg.vocab_size

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers, self.shard.n_kv_heads, self.cfg.head_dim, self.max_len)

    def forward(self, segments: Sequence[Segment]) -> np.ndarray:
        """Run the segments' tokens; return logits (n_segments, local_vocab) of each last token.

        Every peer must call ``forward`` with the same segments in the same order (the
        allreduces pair up across peers). Raises RequestError before any compute if a
        sequence would exceed the context length; caches are then unchanged. Alone with
        several kernel threads, a long batch runs pipelined (:mod:`ringllm.prefill`): its
        logits may then differ from one thread's in the last bits.
        """
        self.w.kernels.bind()
        for seg in segments:
            seg.cache.reserve(seg.cache.length + len(seg.tokens))
        ids = np.concatenate([np.asarray(s.tokens, np.int64) for s in segments])
        spans = [Span(seg.cache, seg.cache.length, len(seg.tokens)) for seg in segments]
        x = self._embed(ids)  # (n, dim)
        if self.alone:
            x = layers_maybe_pipelined(self.cfg, self.layers, x, spans)
        else:
            x = self.layers(x, spans)
        for seg in segments:
            seg.cache.length += len(seg.tokens)
        last = np.cumsum([len(s.tokens) for s in segments]) - 1
        logits = self.w.output.matmul(self.nn.rmsnorm(x[last], self.w.output_norm, self.cfg.rms_eps))
        return self.nn.softcap(logits, self.cfg.final_softcap) if self.cfg.final_softcap else logits

    def layers(self, x: np.ndarray, spans: Sequence[Span], after_kv: AfterKV | None = None) -> np.ndarray:
        """Every layer on the rows of ``spans`` (x is (their tokens, dim)); returns the new x.
        ``after_kv(layer)`` is called once that layer's keys and values are in the caches."""
        batch = _Batch(self, spans)
        for li, lw in enumerate(self.w.layers):
            x = self._block(li, lw, x, batch, after_kv)
        return x

    def _block(self, li: int, lw: LayerWeights, x: np.ndarray, batch: _Batch, after_kv: AfterKV | None) -> np.ndarray:
        eps = self.cfg.rms_eps
        a = self.allreduce(lw.wo.partial(self._attention(li, lw, self.nn.rmsnorm(x, lw.attn_norm, eps), batch, after_kv)))
        if lw.post_attn_norm is not None:
            a = self.nn.rmsnorm(a, lw.post_attn_norm, eps)
        x = x + a
        f = self.allreduce(lw.down.partial(self._ffn(lw, self.nn.rmsnorm(x, lw.ffn_norm, eps))))
        if lw.post_ffn_norm is not None:
            f = self.nn.rmsnorm(f, lw.post_ffn_norm, eps)
        return x + f

    def _ffn(self, lw: LayerWeights, h: np.ndarray) -> np.ndarray:
        """(n, dim) -> (n, my_ffn): the gated hidden units this peer owns."""
        gu = lw.gate_up.matmul(h)
        f = gu.shape[1] // 2
        return self.nn.GATES[self.cfg.arch.gate](gu[:, :f], gu[:, f:])

    def _attention(self, li: int, lw: LayerWeights, h: np.ndarray, batch: _Batch,
                   after_kv: AfterKV | None) -> np.ndarray:
        """Attention over this peer's heads: (n, dim) -> (n, my_heads * head_dim)."""
        if lw.qkv is None:  # this peer owns no heads
            if after_kv is not None:
                after_kv(li)
            return np.zeros((h.shape[0], 0), np.float32)
        q, k, v = self._qkv(li, lw, h, batch)
        row = 0
        for s in batch.spans:  # (t, nkv, hd) -> the cache's (nkv, t, hd)
            s.cache.k[li][:, s.start : s.start + s.count] = k[row : row + s.count].transpose(1, 0, 2)
            s.cache.v[li][:, s.start : s.start + s.count] = v[row : row + s.count].transpose(1, 0, 2)
            row += s.count
        if after_kv is not None:
            after_kv(li)
        return self._attend(li, q, batch)

    def _qkv(self, li: int, lw: LayerWeights, h: np.ndarray, batch: _Batch):
        """Projected queries (n, nh, hd) (rotated, scaled) and keys, values (n, nkv, hd)."""
        c, sh = self.cfg, self.shard
        n, hd, nh, nkv = h.shape[0], c.head_dim, sh.n_heads, sh.n_kv_heads
        qkv = lw.qkv.matmul(h)
        if lw.qkv_bias is not None:
            qkv += lw.qkv_bias
        q = qkv[:, : nh * hd].reshape(n, nh, hd)
        k = qkv[:, nh * hd : (nh + nkv) * hd].reshape(n, nkv, hd)
        v = qkv[:, (nh + nkv) * hd :].reshape(n, nkv, hd)
        if lw.q_norm is not None:
            q, k = self.nn.rmsnorm(q, lw.q_norm, c.rms_eps), self.nn.rmsnorm(k, lw.k_norm, c.rms_eps)
        factors = batch.rope(c.layer_rope_theta(li))
        q = self.nn.rope(q, factors, c.arch.rope_neox)
        q *= np.float32(c.query_scale)  # the score scale, applied once to q
        return q, self.nn.rope(k, factors, c.arch.rope_neox), v

    def _attend(self, li: int, q: np.ndarray, batch: _Batch) -> np.ndarray:
        """Each span's queries (n, nh, hd) against its cached keys -> (n, nh * hd).

        The owned query heads need not fill whole KV groups (the plan splits query heads): they
        are placed in full groups of q_per_kv slots, the others zero, and those outputs dropped.
        The padding costs a few extra score rows, not a second attention code path.
        """
        sh, hd = self.shard, self.cfg.head_dim
        n, nh, nkv, qpk, off = q.shape[0], sh.n_heads, sh.n_kv_heads, sh.q_per_kv, sh.q_offset
        if nh != nkv * qpk:
            padded = np.zeros((n, nkv * qpk, hd), np.float32)
            padded[:, off : off + nh] = q
            q = padded
        window = self.cfg.sliding_window if self.cfg.is_local(li) else 0
        out = np.empty((n, nkv * qpk * hd), np.float32)
        row = 0
        for s, mask in zip(batch.spans, batch.masks(window)):
            t, L = s.count, s.start + s.count
            # (t, nkv*qpk, hd) -> (nkv, qpk * t, hd): the query heads of a KV group share its keys.
            qs = q[row : row + t].reshape(t, nkv, qpk, hd).transpose(1, 2, 0, 3).reshape(nkv, qpk * t, hd)
            o = self.nn.cached_attention(qs, s.cache.k[li], s.cache.v[li], L, mask)  # (nkv, qpk*t, hd)
            out[row : row + t] = o.reshape(nkv, qpk, t, hd).transpose(2, 0, 1, 3).reshape(t, nkv * qpk * hd)
            row += t
        return out if nh == nkv * qpk else out[:, off * hd : (off + nh) * hd]

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        c = self.cfg
        if (ids < 0).any() or (ids >= c.vocab_size).any():
            bad = int(ids[(ids < 0) | (ids >= c.vocab_size)][0])
            raise RequestError(f"token id {bad} is outside the vocabulary (0..{c.vocab_size - 1})")
        if not self._split_vocab:
            x = self.w.embed.rows_f32(ids)
        else:  # vocab-parallel embedding: the owner of each id fills its row, others add zeros
            v0, v1 = self.vocab_range
            x = np.zeros((len(ids), c.dim), np.float32)
            mine = (ids >= v0) & (ids < v1)
            if mine.any():
                x[mine] = self.w.embed.rows_f32(ids[mine] - v0)
            x = self.allreduce_exact(x)
        if c.arch.embed_scaled:
            x = x * np.float32(np.sqrt(c.dim))
        return x
