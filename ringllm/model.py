"""The llama transformer forward pass on one peer's shard, rank-agnostic.

The model knows nothing of ranks or sockets: it computes with whatever slices the loader gave
it and calls the injected ``allreduce`` twice per layer (after attention, after the FFN), once
for the embedding when the vocabulary is split, and returns logits for its own vocabulary
slice. With one peer the allreduce is the identity and this is the plain single-device model.

A forward call takes a batch of *segments*: each is one sequence's new tokens (a whole prompt
for prefill, one token for decode) with that sequence's KV cache. All segments' tokens go
through the matrix products together; only attention is per segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ringllm.errors import RequestError
from ringllm.shard.loader import ShardWeights

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


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (n, dim) * rsqrt(mean(x^2) + eps) * weight, in float32."""
    if x.shape[0] == 1:  # decode: one BLAS dot and two multiplies (a third of the general path)
        v = x[0]
        inv = np.float32(1.0) / np.sqrt(np.dot(v, v) / np.float32(v.size) + np.float32(eps))
        return x * (weight * inv)
    ms = np.einsum("ij,ij->i", x, x)
    ms *= np.float32(1.0 / x.shape[1])
    ms += np.float32(eps)
    np.sqrt(ms, out=ms)
    return (x / ms[:, None]) * weight


class Rope:
    """GGML's NORM rope (adjacent pairs (x[2i], x[2i+1]) rotate by pos * theta^(-2i/d)).

    A pair is one complex64 number, so rotation is one complex multiply by e^(i*angle), taken
    from a table built once for every position (angles computed in float64).
    """

    def __init__(self, rope_dim: int, theta: float, max_len: int) -> None:
        inv_freq = theta ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
        self.table = np.empty((max_len, rope_dim // 2), np.complex64)
        # In blocks of positions: the float64/complex128 intermediates of the whole 8192-token
        # table were an 8 MB spike at the top of a peer's memory peak (right after the weights).
        for p0 in range(0, max_len, 512):
            ang = np.arange(p0, min(max_len, p0 + 512), dtype=np.float64)[:, None] * inv_freq[None, :]
            self.table[p0 : p0 + len(ang)] = np.exp(1j * ang)
        self.half = rope_dim // 2

    def __call__(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x (n, heads, head_dim) float32 -> rotated copy."""
        out = np.array(x, dtype=np.float32, order="C")
        z = out[..., : 2 * self.half].view(np.complex64)  # (n, heads, half): pairs as complex
        z *= self.table[positions][:, None, :]
        return out


class Transformer:
    """One peer's part of a llama model. ``forward`` returns local-vocab logits."""

    def __init__(self, weights: ShardWeights, allreduce: AllReduce = identity_allreduce, max_len: int | None = None,
                 allreduce_exact: AllReduce | None = None) -> None:
        self.w = weights
        self.cfg = weights.config
        self.shard = weights.shard
        self.allreduce = allreduce
        # For sums that are one peer's vector plus zeros (the embedding): never quantized.
        self.allreduce_exact = allreduce_exact or allreduce
        self.max_len = min(max_len or self.cfg.context_length, self.cfg.context_length)
        self.vocab_range = weights.shard.vocab
        self._split_vocab = (self.vocab_range[1] - self.vocab_range[0]) != self.cfg.vocab_size
        self.rope = Rope(self.cfg.rope_dim, self.cfg.rope_theta, self.max_len)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers, self.shard.n_kv_heads, self.cfg.head_dim, self.max_len)

    def forward(self, segments: Sequence[Segment]) -> np.ndarray:
        """Run the segments' tokens; return logits (n_segments, local_vocab) of each last token.

        Every peer must call ``forward`` with the same segments in the same order (the
        allreduces pair up across peers). Raises RequestError before any compute if a
        sequence would exceed the context length; caches are then unchanged.
        """
        for seg in segments:
            seg.cache.reserve(seg.cache.length + len(seg.tokens))
        c = self.cfg
        ids = np.concatenate([np.asarray(s.tokens, np.int64) for s in segments])
        positions = np.concatenate([np.arange(s.cache.length, s.cache.length + len(s.tokens)) for s in segments])
        masks = [self._causal_mask(seg) for seg in segments]  # the same for every layer
        x = self._embed(ids)  # (n, dim)
        for li, lw in enumerate(self.w.layers):
            h = rmsnorm(x, lw.attn_norm, c.rms_eps)
            attn = self._attention(li, lw, h, segments, positions, masks)
            x = x + self.allreduce(lw.wo.partial(attn))
            h = rmsnorm(x, lw.ffn_norm, c.rms_eps)
            gu = lw.gate_up.matmul(h)
            f = gu.shape[1] // 2
            gate, up = gu[:, :f], gu[:, f:]
            act = np.negative(gate)  # SwiGLU: silu(gate) * up = gate / (1 + e^-gate) * up, in place
            np.exp(act, out=act)
            act += np.float32(1.0)
            np.divide(gate, act, out=act)
            act *= up
            x = x + self.allreduce(lw.down.partial(act))
        for seg in segments:
            seg.cache.length += len(seg.tokens)
        last = np.cumsum([len(s.tokens) for s in segments]) - 1
        h = rmsnorm(x[last], self.w.output_norm, c.rms_eps)
        return self.w.output.matmul(h)

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        v0, v1 = self.vocab_range
        if (ids < 0).any() or (ids >= self.cfg.vocab_size).any():
            bad = int(ids[(ids < 0) | (ids >= self.cfg.vocab_size)][0])
            raise RequestError(f"token id {bad} is outside the vocabulary (0..{self.cfg.vocab_size - 1})")
        if not self._split_vocab:
            return self.w.embed.rows_f32(ids)
        # Vocab-parallel embedding: the owner of each id fills its row, others add zeros.
        x = np.zeros((len(ids), self.cfg.dim), np.float32)
        mine = (ids >= v0) & (ids < v1)
        if mine.any():
            x[mine] = self.w.embed.rows_f32(ids[mine] - v0)
        return self.allreduce_exact(x)

    def _causal_mask(self, seg: Segment) -> np.ndarray | None:
        """Additive mask (q_per_kv * t, L) of a multi-token segment: query i (position p0 + i)
        sees keys 0..p0 + i. None for a single token, which sees every key."""
        t, p0 = len(seg.tokens), seg.cache.length
        if t <= 1:
            return None
        qpos = np.tile(np.arange(p0, p0 + t), self.shard.q_per_kv)
        return np.where(np.arange(p0 + t)[None, :] > qpos[:, None], np.float32(-np.inf), np.float32(0))

    def _attention(self, li: int, lw, h: np.ndarray, segments: Sequence[Segment], positions: np.ndarray,
                   masks: Sequence[np.ndarray | None]) -> np.ndarray:
        """Attention over this peer's heads: (n, dim) -> (n, my_heads * head_dim)."""
        sh, hd = self.shard, self.cfg.head_dim
        nh, nkv, qpk = sh.n_heads, sh.n_kv_heads, sh.q_per_kv
        n = h.shape[0]
        if lw.qkv is None:
            return np.zeros((n, 0), np.float32)
        qkv = lw.qkv.matmul(h)
        q = self.rope(qkv[:, : nh * hd].reshape(n, nh, hd), positions)
        q *= np.float32(1.0 / np.sqrt(hd))  # the score scale, applied once to q
        k = self.rope(qkv[:, nh * hd : (nh + nkv) * hd].reshape(n, nkv, hd), positions)
        v = qkv[:, (nh + nkv) * hd :].reshape(n, nkv, hd)
        # The owned query heads need not fill whole KV groups (the plan splits query heads):
        # place them in full groups of qpk slots, the others zero, and drop those outputs.
        # The padding costs a few extra score rows, not a second attention code path.
        off = sh.q_offset
        if nh != nkv * qpk:
            padded = np.zeros((n, nkv * qpk, hd), np.float32)
            padded[:, off : off + nh] = q
            q = padded
        out = np.empty((n, nkv * qpk * hd), np.float32)
        start = 0
        for seg, mask in zip(segments, masks):
            t = len(seg.tokens)
            p0 = seg.cache.length
            L = p0 + t
            K, V = seg.cache.k[li], seg.cache.v[li]
            K[:, p0:L] = k[start : start + t].transpose(1, 0, 2)
            V[:, p0:L] = v[start : start + t].transpose(1, 0, 2)
            if t == 1:  # decode: one query per head, no mask, no reshuffles
                scores = np.matmul(q[start].reshape(nkv, qpk, hd), K[:, :L].transpose(0, 2, 1))  # (nkv, qpk, L)
                scores -= scores.max(axis=-1, keepdims=True)
                np.exp(scores, out=scores)
                scores /= scores.sum(axis=-1, keepdims=True)
                out[start] = np.matmul(scores, V[:, :L]).reshape(-1)
                start += 1
                continue
            # (t, nh, hd) -> (nkv, qpk * t, hd): the query heads of a KV group share its keys.
            qs = q[start : start + t].reshape(t, nkv, qpk, hd).transpose(1, 2, 0, 3).reshape(nkv, qpk * t, hd)
            scores = np.matmul(qs, K[:, :L].transpose(0, 2, 1))  # (nkv, qpk*t, L)
            if mask is not None:
                scores += mask
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            o = np.matmul(scores, V[:, :L])  # (nkv, qpk*t, hd)
            out[start : start + t] = o.reshape(nkv, qpk, t, hd).transpose(2, 0, 1, 3).reshape(t, nkv * qpk * hd)
            start += t
        return out if nh == nkv * qpk else out[:, off * hd : (off + nh) * hd]
