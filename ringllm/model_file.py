"""Open a GGUF file: validate it, read its hyperparameters, and expose tensors as raw byte views.

Nothing here copies weights: tensors are zero-copy views into the ``gguf`` package's memory
map, as (rows, row_bytes) uint8 arrays in the file's own block layout. The shard loader copies
the slices a peer owns and then drops this object so the map (and the pages it touched) go.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ringllm.errors import ModelError, UnsupportedError

GGUF_MAGIC = b"GGUF"
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
        from gguf import GGUFReader  # imported lazily: it is slow to import

        try:
            reader = GGUFReader(self.path, "r")
        except (ValueError, IndexError, struct.error, OSError) as exc:
            raise ModelError(f"{self.path}: cannot parse GGUF structure ({exc}); the file may be truncated or corrupt") from None
        self.metadata: dict[str, Any] = _read_metadata(reader)
        self.tensors: dict[str, TensorInfo] = _read_tensors(self.path, reader)
        self.config = _read_config(self.path, self.metadata, tied="output.weight" not in self.tensors)
        self.fingerprint = _fingerprint(self.metadata, self.tensors)
        self._check_tensors()

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
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise ModelError(f"model file {path} does not exist") from None
    except IsADirectoryError:
        raise ModelError(f"model path {path} is a directory, not a GGUF file") from None
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from None
    if head[:4] != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (starts with {head[:4]!r}, expected b'GGUF')")
    if len(head) < 8:
        raise ModelError(f"{path} is truncated ({len(head)} bytes)")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise ModelError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")


def _read_metadata(reader: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception as exc:  # a malformed field: name it
            raise ModelError(f"GGUF metadata field {key!r} is malformed: {exc}") from None
    return meta


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


def _read_tensors(path: Path, reader: Any) -> dict[str, TensorInfo]:
    from gguf import GGML_QUANT_SIZES

    size = path.stat().st_size
    out: dict[str, TensorInfo] = {}
    for t in reader.tensors:
        shape = [int(n) for n in t.shape]  # ne order: ne[0] is the contiguous dimension
        cols = shape[0]
        rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        block, type_size = GGML_QUANT_SIZES.get(t.tensor_type, (None, None))
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ModelError(
                f"{path.name} is truncated: tensor {t.name!r} ends at byte {end} but the file has {size} bytes"
            )
        if block is None or cols % block:
            raise UnsupportedError(f"{path.name}: tensor {t.name!r} has type {t.tensor_type!r} with unsupported layout")
        row_bytes = cols // block * type_size
        raw = np.asarray(t.data).view(np.uint8).reshape(rows, row_bytes)
        out[t.name] = TensorInfo(t.name, t.tensor_type, rows, cols, raw)
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
