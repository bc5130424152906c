"""Open a GGUF file: validate it, read its hyperparameters, and expose tensors as raw byte views.

Nothing here copies weights: tensors are zero-copy views into a read-only memory map
(:mod:`ringllm.gguf_parse`), as (rows, row_bytes) uint8 arrays in the file's own block layout. The shard loader copies
the slices a peer owns and then drops this object so the map (and the pages it touched) go.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ringllm.errors import ModelError, UnsupportedError
from ringllm.gguf_parse import GGUFFile

SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a llama-architecture model, read once from GGUF metadata."""

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

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads


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
        self.fingerprint = _fingerprint(self.metadata, self.tensors)
        self._check_tensors()

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Drop the pages of a tensor (or of its rows [r0, r1)) that has been copied from our
        resident memory."""
        t = self._file.tensors[name]
        if rows is None:
            self._file.release(t)
        else:
            row_bytes = self.tensors[name].raw.shape[1]
            self._file.release(t, rows[0] * row_bytes, rows[1] * row_bytes)

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
            f"blk.{i}.{part}.weight" for i in range(c.n_layers)
            for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
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
    )


def _read_tensors(f: GGUFFile) -> dict[str, TensorInfo]:
    out: dict[str, TensorInfo] = {}
    for name, t in f.tensors.items():
        cols = t.shape[0]
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        out[name] = TensorInfo(name, t.qtype, rows, cols, f.data(t).reshape(rows, t.nbytes // rows))
    return out


def _fingerprint(meta: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> str:
    """A hash of the metadata and the tensor table (names, types, shapes, and a sample of bytes).

    Peers compare it at the handshake: two files that differ in any hyperparameter, tokenizer
    or tensor layout differ here. Hashing every weight byte would cost a second per 100 MB at
    each start, so only the first and last 4 KiB of each tensor are hashed.
    """
    h = hashlib.sha256()
    for key in sorted(meta):
        h.update(key.encode())
        h.update(repr(meta[key]).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{int(t.qtype)}:{t.rows}x{t.cols}".encode())
        flat = t.raw.reshape(-1)
        h.update(flat[:4096].tobytes())
        h.update(flat[-4096:].tobytes())
    return h.hexdigest()
