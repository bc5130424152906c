"""Load one peer's slices of a GGUF model into compact, contiguous, still-quantized memory.

Only the owned slices are copied out of the file map (a row range is a contiguous byte range;
a column range is a byte range inside every row, cut on quant-block boundaries); the
:class:`~ringllm.model_file.ModelFile` can then be dropped so the map and its touched pages go.

Matrices that read the same input are fused into one quantized matrix (q|k|v, gate|up) when
their quant types agree: one kernel call instead of three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ringllm.memory import release_free_memory
from ringllm.model_file import ModelConfig, ModelFile, TensorInfo
from ringllm.ops.kernels import Kernels
from ringllm.ops.quant import QuantMatrix, block_size
from ringllm.ops.quant import threads as quant_threads
from ringllm.shard.plan import PeerShard, Range

if TYPE_CHECKING:  # numba may not import: the loader itself never needs it
    from ringllm.ops.jit_matrix import JitMatrix


class Projection:
    """Several output-row blocks that share one input, computed as few kernel calls as possible.

    ``matvec``/``matmul`` return the concatenation of the parts' outputs, in order.
    """

    def __init__(self, parts: Sequence[tuple[TensorInfo, Range]], kernels: Kernels) -> None:
        parts = [(info, (a, b)) for info, (a, b) in parts if b > a]  # a peer may own no rows of a part
        self.cols = parts[0][0].cols if parts else 0
        self.out_sizes = [b - a for _, (a, b) in parts]
        self.matrices: list[QuantMatrix | JitMatrix] = []
        group: list[np.ndarray] = []
        qtype = None
        for info, (a, b) in parts:
            if group and info.qtype != qtype:
                self.matrices.append(_from_rows(kernels, qtype, group, self.cols))
                group = []
            qtype = info.qtype
            group.append(info.raw[a:b])
        if group:
            self.matrices.append(_from_rows(kernels, qtype, group, self.cols))

    @property
    def rows(self) -> int:
        return sum(self.out_sizes)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x (n, cols) -> (n, rows)."""
        if not self.matrices:
            return np.zeros((x.shape[0], 0), np.float32)
        if len(self.matrices) == 1:
            return self.matrices[0].matmul(x)
        return np.concatenate([m.matmul(x) for m in self.matrices], axis=1)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.matrices)


def _from_rows(kernels: Kernels, qtype, blocks: list[np.ndarray], cols: int):
    raw = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=0)
    return kernels.matrix(qtype, np.ascontiguousarray(raw), raw.shape[0], cols)


@dataclass
class RowParallel:
    """A matrix split by input columns: this peer's columns [lo, hi) of W (rows, cols).

    The stored slice is widened to whole quant blocks, [start, stop) ⊇ [lo, hi); the input is
    zero outside [lo, hi), so the widening adds exact zeros and the partial sums stay exact.
    """

    matrix: QuantMatrix | JitMatrix | None
    lo: int
    hi: int
    start: int
    stop: int
    rows: int

    def partial(self, x: np.ndarray) -> np.ndarray:
        """x (n, hi - lo) -> this peer's partial product (n, rows)."""
        if self.matrix is None:
            return np.zeros((x.shape[0], self.rows), np.float32)
        if (self.start, self.stop) != (self.lo, self.hi):
            padded = np.zeros((x.shape[0], self.stop - self.start), np.float32)
            padded[:, self.lo - self.start: self.hi - self.start] = x
            x = padded
        return self.matrix.matmul(x)

    @classmethod
    def load(cls, info: TensorInfo, lo: int, hi: int, kernels: Kernels) -> "RowParallel":
        if hi <= lo:
            return cls(None, lo, hi, lo, lo, info.rows)
        bs = block_size(info.qtype)
        start, stop = lo // bs * bs, -(-hi // bs) * bs
        per_block = info.raw.shape[1] // (info.cols // bs)
        raw = info.raw[:, start // bs * per_block: stop // bs * per_block]
        m = kernels.matrix(info.qtype, np.ascontiguousarray(raw), info.rows, stop - start)
        return cls(m, lo, hi, start, stop, info.rows)

    @property
    def nbytes(self) -> int:
        return self.matrix.nbytes if self.matrix is not None else 0


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    qkv: Projection | None  # None when this peer owns no attention heads
    wo: RowParallel
    ffn_norm: np.ndarray
    gate_up: Projection
    down: RowParallel
    qkv_bias: np.ndarray | None = None  # the q|k|v bias slices of qkv's rows (qwen2)
    q_norm: np.ndarray | None = None  # (head_dim,) per-head RMSNorm weights (qwen3, gemma3)
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None  # on the attention output, after the all-reduce (gemma3)
    post_ffn_norm: np.ndarray | None = None


@dataclass
class ShardWeights:
    """Everything one peer holds of the model."""

    config: ModelConfig
    shard: PeerShard
    layers: list[LayerWeights]
    embed: QuantMatrix | JitMatrix  # token_embd rows of this peer's vocab range
    output: QuantMatrix | JitMatrix  # output rows of the vocab range (the same object when tied)
    output_norm: np.ndarray
    kernels: Kernels

    @property
    def nbytes(self) -> int:
        n = self.embed.nbytes + (0 if self.output is self.embed else self.output.nbytes)
        for lw in self.layers:
            n += lw.wo.nbytes + lw.gate_up.nbytes + lw.down.nbytes + (lw.qkv.nbytes if lw.qkv else 0)
        return n


def load_shard(model: ModelFile, shard: PeerShard, kernels: Kernels | None = None) -> ShardWeights:
    """Copy this peer's slices out of ``model`` (which the caller may drop afterwards), held for
    ``kernels`` (default: the numpy kernels on the thread count :mod:`ringllm.ops.quant` has)."""
    kernels = kernels or Kernels("numpy", quant_threads())
    c = model.config
    hd = c.head_dim
    (h0, h1), (k0, k1), (f0, f1), (v0, v1) = shard.heads, shard.kv_heads, shard.ffn, shard.vocab

    def vec(name: str) -> np.ndarray:
        info = model.tensor(name)
        return QuantMatrix.from_raw(info.qtype, np.ascontiguousarray(info.raw), info.rows, info.cols).dequantize().reshape(-1)

    a = c.arch
    layers = []
    for i in range(c.n_layers):
        t = lambda part: model.tensor(f"blk.{i}.{part}.weight")  # noqa: E731
        opt = lambda name, on: vec(f"blk.{i}.{name}") if on else None  # noqa: E731
        q_rows, kv_rows = (h0 * hd, h1 * hd), (k0 * hd, k1 * hd)
        # Read from disk only what is copied below: the row slices of the column-parallel
        # matrices, all of the rest (a row-parallel matrix's column slice touches every page).
        sliced = {f"blk.{i}.{p}.weight": r for p, r in (("attn_q", q_rows), ("attn_k", kv_rows),
                  ("attn_v", kv_rows), ("ffn_gate", (f0, f1)), ("ffn_up", (f0, f1)))}
        for name in c.layer_tensors(i):
            if h1 > h0 or name.split(".")[2] not in ("attn_q", "attn_k", "attn_v", "attn_output"):
                model.prefetch(name, sliced.get(name))
        qkv = qkv_bias = None
        if h1 > h0:
            qkv = Projection([(t("attn_q"), q_rows), (t("attn_k"), kv_rows), (t("attn_v"), kv_rows)], kernels)
            if a.qkv_bias:  # a bias is sliced like its matrix's output rows
                qkv_bias = np.concatenate([vec(f"blk.{i}.attn_{p}.bias")[r0:r1]
                                           for p, (r0, r1) in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))])
        layers.append(LayerWeights(
            attn_norm=vec(f"blk.{i}.attn_norm.weight"),
            qkv=qkv,
            wo=RowParallel.load(t("attn_output"), h0 * hd, h1 * hd, kernels),
            ffn_norm=vec(f"blk.{i}.ffn_norm.weight"),
            gate_up=Projection([(t("ffn_gate"), (f0, f1)), (t("ffn_up"), (f0, f1))], kernels),
            down=RowParallel.load(t("ffn_down"), f0, f1, kernels),
            qkv_bias=qkv_bias,
            # Norms act on whole vectors (a head, or the all-reduced output): every peer holds them.
            q_norm=opt("attn_q_norm.weight", a.qk_norm),
            k_norm=opt("attn_k_norm.weight", a.qk_norm),
            post_attn_norm=opt("post_attention_norm.weight", a.post_norms),
            post_ffn_norm=opt("post_ffw_norm.weight", a.post_norms),
        ))
        for name in c.layer_tensors(i):
            model.release(name)  # copied: keep peak RSS near the shard's size
    def vocab_rows(name: str):
        # The biggest tensors (28 MB for SmolLM2): drop file pages as the rows are repacked,
        # or they would sit in RSS next to their copy (measured: +30 MB peak at P=1).
        info = model.tensor(name)
        model.prefetch(name, (v0, v1))
        return kernels.matrix(info.qtype, np.ascontiguousarray(info.raw[v0:v1]), v1 - v0, info.cols,
                                    rows_done=lambda r: model.release(name, (v0, v0 + r)))

    release_free_memory()  # the layers' load temporaries, before the biggest matrix arrives
    embed = vocab_rows("token_embd.weight")
    if not c.tied_embeddings:
        release_free_memory()  # the embedding's repacking temporaries, likewise
    output = embed if c.tied_embeddings else vocab_rows("output.weight")
    for name in ("token_embd.weight", "output.weight"):
        if model.has(name):
            model.release(name)
    return ShardWeights(c, shard, layers, embed, output, vec("output_norm.weight"), kernels)


def ffn_block_size(model: ModelFile) -> int:
    """The granularity at which the FFN hidden dimension may be cut (ffn_down's block size)."""
    return max(block_size(model.tensor(f"blk.{i}.ffn_down.weight").qtype) for i in range(model.config.n_layers))
