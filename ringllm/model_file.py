"""Open a GGUF file: validate it, read its hyperparameters, and expose tensors as raw byte views.

Nothing here copies weights: tensors are zero-copy views into a read-only memory map
(:mod:`ringllm.gguf_parse`), as (rows, row_bytes) uint8 arrays in the file's own block layout. The shard loader copies
the slices a peer owns and then drops this object so the map (and the pages it touched) go.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ringllm.errors import ModelError, UnsupportedError
from ringllm.file_hash import file_sha256
from ringllm.gguf_parse import GGUFFile


@dataclass(frozen=True)
class ArchFacts:
    """What sets an architecture's forward pass apart from llama's; the numbers come from GGUF.

    Sources: llama.cpp's llama-model.cpp (hparams per arch, rope type per arch) and
    src/models/{qwen2,qwen3,gemma3}.cpp; transformers' modeling_qwen2/qwen3/gemma3.py.
    """

    rope_neox: bool = False  # rotate (x[j], x[j + d/2]) rather than adjacent pairs
    qkv_bias: bool = False  # blk.N.attn_{q,k,v}.bias
    qk_norm: bool = False  # blk.N.attn_{q,k}_norm: RMSNorm over each head, before RoPE
    post_norms: bool = False  # blk.N.post_attention_norm / post_ffw_norm on each branch's output
    embed_scaled: bool = False  # token embeddings times sqrt(dim)
    gate: str = "silu"  # the FFN's gate activation (nn.GATES)
    # Every swa_period-th layer (the last of each period) attends globally; the others see a
    # sliding window of GGUF's attention.sliding_window keys, with RoPE base rope_theta_local.
    swa_period: int = 0
    rope_theta_local: float = 10000.0


ARCHITECTURES: dict[str, ArchFacts] = {
    "llama": ArchFacts(),  # also Mistral 7B-style GGUFs, which are written as "llama"
    "qwen2": ArchFacts(rope_neox=True, qkv_bias=True),
    "qwen3": ArchFacts(rope_neox=True, qk_norm=True),
    # llama.cpp: set_swa_pattern(6) (layers 5, 11, 17, ... global), rope_freq_base_train_swa
    # 10000; transformers: layer_types "sliding_attention" except every 6th, rope_local_base_freq
    # 10000, GELU-tanh ("gelu_pytorch_tanh"), embed_scale hidden_size**0.5.
    "gemma3": ArchFacts(rope_neox=True, qk_norm=True, post_norms=True, embed_scaled=True, gate="gelu_tanh",
                        swa_period=6, rope_theta_local=10000.0),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a model, read once from GGUF metadata (its architecture's facts in
    ``arch``)."""

    name: str
    architecture: str
    n_layers: int
    dim: int  # embedding width
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rope_dim: int
    rms_eps: float
    tied_embeddings: bool  # no output.weight: the output projection is token_embd
    arch: ArchFacts = ArchFacts()
    attn_scale: float = 0.0  # the query scale; 0: 1/sqrt(head_dim)
    sliding_window: int = 0  # keys a local layer sees (0: every layer is global)
    final_softcap: float = 0.0  # logits = cap * tanh(logits / cap) when > 0

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def query_scale(self) -> float:
        return self.attn_scale or 1.0 / float(np.sqrt(self.head_dim))

    def is_local(self, layer: int) -> bool:
        """Whether ``layer`` attends over a sliding window (with the local RoPE base)."""
        p = self.arch.swa_period
        return bool(self.sliding_window) and p > 0 and layer % p != p - 1

    def layer_rope_theta(self, layer: int) -> float:
        return self.arch.rope_theta_local if self.is_local(layer) else self.rope_theta

    def layer_tensors(self, layer: int) -> list[str]:
        """The GGUF tensor names layer ``layer`` must have."""
        parts = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
        names = [f"blk.{layer}.{p}.weight" for p in parts]
        a = self.arch
        if a.qkv_bias:
            names += [f"blk.{layer}.attn_{p}.bias" for p in "qkv"]
        if a.qk_norm:
            names += [f"blk.{layer}.attn_q_norm.weight", f"blk.{layer}.attn_k_norm.weight"]
        if a.post_norms:
            names += [f"blk.{layer}.post_attention_norm.weight", f"blk.{layer}.post_ffw_norm.weight"]
        return names


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    rows: int  # GGUF ne[1] (1 for vectors): output features of a weight matrix
    cols: int  # GGUF ne[0]: input features, the contiguous dimension
    raw: np.ndarray  # uint8 (rows, row_bytes) view into the file map

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)


class ModelFile:
    """A validated GGUF file of a supported architecture.

    Raises :class:`ModelError` for a missing, non-GGUF or truncated file, and
    :class:`UnsupportedError` for an unknown architecture or tensor type (naming the tensor).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        _check_header(self.path)
        self._file = GGUFFile(self.path)
        self.metadata: dict[str, Any] = self._file.metadata
        self.tensors: dict[str, TensorInfo] = _read_tensors(self._file)
        self.config = _read_config(self.path, self.metadata, tied="output.weight" not in self.tensors)
        self._check_tensors()

    @cached_property
    def fingerprint(self) -> str:
        """The SHA-256 of the whole file (hex), which peers compare at the handshake: two files
        that differ in any byte, weights included, differ here. Computed on first use, then
        cached by the file's identity (:mod:`ringllm.file_hash`): ~0.4 s for a 100 MB model
        the first time on the busy test box, a fraction of a millisecond the next
        (docs/performance.md has the figures)."""
        return file_sha256(self.path)

    def prefetch(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Start reading a tensor (or its rows [r0, r1)) from disk: call before copying it."""
        self._pages(self._file.prefetch, name, rows)

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Drop the pages of a tensor (or of its rows [r0, r1)) that has been copied from our
        resident memory."""
        self._pages(self._file.release, name, rows)

    def _pages(self, advise: Any, name: str, rows: tuple[int, int] | None) -> None:
        t = self._file.tensors[name]
        if rows is None:
            advise(t)
        else:
            row_bytes = self.tensors[name].raw.shape[1]
            advise(t, rows[0] * row_bytes, rows[1] * row_bytes)

    def drop_vocabulary(self) -> None:
        """Forget the large vocabulary arrays in ``metadata`` once the tokenizer is built."""
        for key in [k for k, v in self.metadata.items() if isinstance(v, list) and len(v) > 1024]:
            del self.metadata[key]

    def close(self) -> None:
        self.tensors.clear()
        self._file.close()

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(f"{self.path.name}: tensor {name!r} is missing") from None

    def has(self, name: str) -> bool:
        return name in self.tensors

    def _check_tensors(self) -> None:
        from ringllm.ops.quant import SUPPORTED

        for t in self.tensors.values():
            if t.qtype not in SUPPORTED:
                raise UnsupportedError(
                    f"{self.path.name}: tensor {t.name!r} has type {t.qtype.name}, which ringllm does not support "
                    f"(supported: {', '.join(sorted(q.name for q in SUPPORTED))})"
                )
        c = self.config
        for name in ["token_embd.weight", "output_norm.weight"] + [
            name for i in range(c.n_layers) for name in c.layer_tensors(i)
        ]:
            self.tensor(name)


def _check_header(path: Path) -> None:
    """OS-level problems with the path, as one-line errors (GGUFFile checks the contents)."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise ModelError(f"model file {path} does not exist") from None
    except IsADirectoryError:
        raise ModelError(f"model path {path} is a directory, not a GGUF file") from None
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from None


def _read_config(path: Path, meta: Mapping[str, Any], *, tied: bool) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedError(
            f"{path.name}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            raise ModelError(f"{path.name}: metadata {full!r} is missing")
        return meta[full]

    dim = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    n_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", dim // n_heads))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(meta.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
    if n_heads % n_kv:
        raise ModelError(f"{path.name}: head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
    value_dim = int(meta.get(f"{arch}.attention.value_length", head_dim))
    if value_dim != head_dim:
        raise UnsupportedError(f"{path.name}: attention.value_length {value_dim} differs from key_length {head_dim}")
    facts = ARCHITECTURES[arch]
    attn_scale = 0.0
    if arch == "gemma3" and int(need("block_count")) == 62:
        # Gemma 3 27B's query_pre_attn_scalar is dim / n_heads, not head_dim (llama.cpp's
        # f_attention_scale for LLM_TYPE_27B; the GGUF carries no key for it).
        attn_scale = 1.0 / float(np.sqrt(dim // n_heads))
    return ModelConfig(
        name=str(meta.get("general.name", path.stem)),
        architecture=arch,
        n_layers=int(need("block_count")),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=int(need("feed_forward_length")),
        vocab_size=vocab,
        context_length=int(need("context_length")),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_dim=int(meta.get(f"{arch}.rope.dimension_count", head_dim)),
        rms_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tied_embeddings=tied,
        arch=facts,
        attn_scale=attn_scale,
        sliding_window=int(meta.get(f"{arch}.attention.sliding_window", 0)) if facts.swa_period else 0,
        final_softcap=float(meta.get(f"{arch}.final_logit_softcapping", 0.0)),
    )


def _read_tensors(f: GGUFFile) -> dict[str, TensorInfo]:
    out: dict[str, TensorInfo] = {}
    for name, t in f.tensors.items():
        cols = t.shape[0]
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        out[name] = TensorInfo(name, t.qtype, rows, cols, f.data(t).reshape(rows, t.nbytes // rows))
    return out
