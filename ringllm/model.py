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

import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ringllm.errors import RequestError
from ringllm.ops import quant
from ringllm.shard.loader import ShardWeights

AllReduce = Callable[[np.ndarray], np.ndarray]

# A prefill is cut into pipelined blocks (see Transformer._pipeline_blocks) only if each gets
# at least this many tokens. Measured with two threads on SmolLM2 here (median time ratio,
# plain over pipelined, 6-12 interleaved pairs): 128 tokens 0.99-1.08, 192 1.12, 256 1.19,
# 512 1.35-1.40. Below that both threads decoding every weight for few rows costs more than
# the attention they share out.
PIPELINE_MIN_ROWS = 64
# The cost of attending to one key, per query-head width, in matrix weights' worth of work.
# Measured on SmolLM2 here, one thread, 128-token prefill: attention 58 ms, the matrix
# products 500 ms (numpy's softmax passes make a key cost ~11x its multiply-adds).
ATTENTION_WEIGHTS_PER_KEY = 11


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


@dataclass(frozen=True)
class _Part:
    """Tokens [start, start + count) of one sequence, in one forward: a whole segment, or a
    segment's share of a pipelined prefill block."""

    cache: KVCache
    start: int
    count: int


class _LayerEvents:
    """Between two pipelined blocks: one event per layer, set once the earlier block has
    written its keys and values there; all set, and ``failed``, if it ended early."""

    def __init__(self, n_layers: int) -> None:
        self.events = [threading.Event() for _ in range(n_layers)]
        self.failed = False

    def fail(self) -> None:
        self.failed = True
        for e in self.events:
            e.set()


@dataclass(frozen=True)
class _Gate:
    """A pipelined block's two event lists: the block before it, and the one after."""

    wait_for: _LayerEvents | None
    announce: _LayerEvents | None

    def wrote(self, li: int) -> None:
        """This block's keys and values of layer li are in the cache: the next may read them.
        Then wait until the block before has written its own (the keys this block reads)."""
        if self.announce is not None:
            self.announce.events[li].set()
        if self.wait_for is not None:
            self.wait_for.events[li].wait()
            if self.wait_for.failed:
                raise RuntimeError("the pipelined prefill block before this one failed")


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
        sequence would exceed the context length; caches are then unchanged. Alone with
        several kernel threads, a long batch runs as pipelined blocks (_pipeline_blocks):
        its logits may then differ from one thread's in the last bits.
        """
        self.w.kernels.bind()
        for seg in segments:
            seg.cache.reserve(seg.cache.length + len(seg.tokens))
        ids = np.concatenate([np.asarray(s.tokens, np.int64) for s in segments])
        parts = [_Part(seg.cache, seg.cache.length, len(seg.tokens)) for seg in segments]
        x = self._embed(ids)  # (n, dim)
        blocks = self._pipeline_blocks(parts)
        if len(blocks) == 1:
            x = self._layers(x, parts)
        else:
            x = self._layers_pipelined(x, blocks)
        for seg in segments:
            seg.cache.length += len(seg.tokens)
        last = np.cumsum([len(s.tokens) for s in segments]) - 1
        h = rmsnorm(x[last], self.w.output_norm, self.cfg.rms_eps)
        return self.w.output.matmul(h)

    def _layers(self, x: np.ndarray, parts: Sequence[_Part], pipe: _Gate | None = None) -> np.ndarray:
        """Every layer on the rows of ``parts`` (x is (their tokens, dim)); returns the new x.
        ``pipe`` (a pipelined prefill block) orders its attention after the block before."""
        c = self.cfg
        positions = np.concatenate([np.arange(p.start, p.start + p.count) for p in parts])
        masks = [self._causal_mask(p) for p in parts]  # the same for every layer
        for li, lw in enumerate(self.w.layers):
            h = rmsnorm(x, lw.attn_norm, c.rms_eps)
            attn = self._attention(li, lw, h, parts, positions, masks, pipe)
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
        return x

    def _pipeline_blocks(self, parts: list[_Part]) -> list[list[_Part]]:
        """The token blocks of a pipelined prefill, or ``[parts]`` to run the batch as one.

        Only a model alone (allreduce the identity: no peer to keep in step) with several
        kernel threads and enough tokens is cut: the tokens, in order, into one block per
        thread, a sequence's tokens split between blocks where a cut falls. Each thread then
        runs its block through every layer with its kernels to itself, so the attention,
        norms and SwiGLU run in parallel too, not only the matrix products; block ``j``'s
        attention at layer ``l`` waits for block ``j-1`` to have written its keys and values
        there, and never otherwise. Blocks are sized for equal work: a row's attention
        grows with its position, so later blocks get fewer rows.
        """
        k = quant.threads()
        n = sum(p.count for p in parts)
        if k == 1 or n < k * PIPELINE_MIN_ROWS or self.allreduce is not identity_allreduce:
            return [parts]
        # Work of a row, in matrix weights: one layer's weights, plus its attention over its
        # keys at ATTENTION_WEIGHTS_PER_KEY per key and query-head width.
        c = self.cfg
        layer_weights = (c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.dim
                         + 3 * c.dim * c.ffn_dim)
        per_key = ATTENTION_WEIGHTS_PER_KEY * c.n_heads * c.head_dim
        keys = np.concatenate([np.arange(p.start + 1, p.start + p.count + 1) for p in parts])
        work = np.cumsum(layer_weights + per_key * keys)
        cuts = [int(np.searchsorted(work, work[-1] * j / k)) for j in range(1, k)]
        blocks, row, pi, taken = [], 0, 0, 0
        for end in cuts + [n]:
            block = []
            while row < end:
                p = parts[pi]
                take = min(p.count - taken, end - row)
                block.append(_Part(p.cache, p.start + taken, take))
                row, taken = row + take, taken + take
                if taken == p.count:
                    pi, taken = pi + 1, 0
            blocks.append(block)
        return [b for b in blocks if b]

    def _layers_pipelined(self, x: np.ndarray, blocks: list[list[_Part]]) -> np.ndarray:
        """Run each block's rows through every layer on its own kernel thread (see
        _pipeline_blocks); the rows of x come back in order."""
        written = [_LayerEvents(len(self.w.layers)) for _ in blocks[1:]]  # block j -> block j + 1
        gates = [_Gate(written[j - 1] if j else None, written[j] if j < len(written) else None)
                 for j in range(len(blocks))]
        bounds = np.cumsum([0] + [sum(p.count for p in b) for b in blocks])
        outs: list[np.ndarray] = [x[:0]] * len(blocks)

        def run(j: int) -> None:
            try:
                outs[j] = self._layers(x[bounds[j]:bounds[j + 1]], blocks[j], gates[j])
            except BaseException:
                if gates[j].announce is not None:
                    gates[j].announce.fail()  # the next block must not wait forever
                raise

        quant.run_together([lambda j=j: run(j) for j in range(len(blocks))])
        return np.concatenate(outs)

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

    def _causal_mask(self, part: _Part) -> np.ndarray | None:
        """Additive mask (q_per_kv * t, L) of a multi-token part: query i (position p0 + i)
        sees keys 0..p0 + i. None for a single token, which sees every key."""
        t, p0 = part.count, part.start
        if t <= 1:
            return None
        qpos = np.tile(np.arange(p0, p0 + t), self.shard.q_per_kv)
        return np.where(np.arange(p0 + t)[None, :] > qpos[:, None], np.float32(-np.inf), np.float32(0))

    def _attention(self, li: int, lw, h: np.ndarray, parts: Sequence[_Part], positions: np.ndarray,
                   masks: Sequence[np.ndarray | None], pipe: _Gate | None = None) -> np.ndarray:
        """Attention over this peer's heads: (n, dim) -> (n, my_heads * head_dim)."""
        sh, hd = self.shard, self.cfg.head_dim
        nh, nkv, qpk = sh.n_heads, sh.n_kv_heads, sh.q_per_kv
        n = h.shape[0]
        if lw.qkv is None:
            if pipe is not None:
                pipe.wrote(li)
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
        for part in parts:
            p0, t = part.start, part.count
            part.cache.k[li][:, p0 : p0 + t] = k[start : start + t].transpose(1, 0, 2)
            part.cache.v[li][:, p0 : p0 + t] = v[start : start + t].transpose(1, 0, 2)
            start += t
        if pipe is not None:
            pipe.wrote(li)
        start = 0
        for part, mask in zip(parts, masks):
            t = part.count
            L = part.start + t
            K, V = part.cache.k[li], part.cache.v[li]
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
