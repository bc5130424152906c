"""How each GGUF weight type reduces to unsigned codes and float32 scales, once at load.

Both kernel families start here (:mod:`ringllm.ops.quant` repacks the codes into tiles for
numpy, :mod:`ringllm.ops.jit` into rows for the compiled kernels)::

    w[r, g*gs + j] = d[r, g] * (c[r, g, j] - offset) + m[r, g]    (gs = 32, or 16 for Q6_K)

with ``m`` only for the types that have a min (Q4_1 Q5_1 Q4_K Q5_K) and ``offset`` only for
the symmetric ones (Q4_0: 8, Q5_0: 16, Q6_K: 32, Q8_0: 128, its int8 stored offset-binary).
K-quant sub-block scales are folded in as ``gguf.quants`` computes them (``d*sc``,
``-dmin*min``), so dequantizing repeats gguf's float32 operations bit for bit. Each type's
GGUF block layout is decoded beside its entry in ``CODECS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ringllm.errors import ModelError, UnsupportedError

QT = GGMLQuantizationType
_F32 = np.float32


@dataclass(frozen=True)
class Codec:
    """How one GGUF quantized type is turned into codes and scales."""

    bits: int  # code width in the repacked word
    per: int  # codes per word (= row slots per tile)
    word: type  # numpy dtype of a repacked word
    gs: int  # values per scale group
    has_m: bool  # value = d*c + m (a min per group)
    offset: int  # value = d * (c - offset), as gguf computes it (0: no offset)
    unpack: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray | None]]


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 little-endian half floats -> float32 (...)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(_F32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32) codes: the 16 low nibbles, then the 16 high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _qh_bits(qh: np.ndarray) -> np.ndarray:
    """(..., 4) bytes of a little-endian uint32 -> (..., 32) bits, bit j first."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _blocks(raw: np.ndarray, qtype: QT) -> np.ndarray:
    """(r, row_bytes) -> (r, nblocks, type_size)."""
    return raw.reshape(raw.shape[0], -1, GGML_QUANT_SIZES[qtype][1])


def _unpack_q4_0(raw, cols):
    b = _blocks(raw, QT.Q4_0)
    return _nibbles(b[..., 2:18]).reshape(len(b), cols), _f16(b[..., 0:2]), None


def _unpack_q4_1(raw, cols):
    b = _blocks(raw, QT.Q4_1)
    return _nibbles(b[..., 4:20]).reshape(len(b), cols), _f16(b[..., 0:2]), _f16(b[..., 2:4])


def _unpack_q5_0(raw, cols):
    b = _blocks(raw, QT.Q5_0)
    c = _nibbles(b[..., 6:22]) | (_qh_bits(b[..., 2:6]) << 4)
    return c.reshape(len(b), cols), _f16(b[..., 0:2]), None


def _unpack_q5_1(raw, cols):
    b = _blocks(raw, QT.Q5_1)
    c = _nibbles(b[..., 8:24]) | (_qh_bits(b[..., 4:8]) << 4)
    return c.reshape(len(b), cols), _f16(b[..., 0:2]), _f16(b[..., 2:4])


def _unpack_q8_0(raw, cols):
    b = _blocks(raw, QT.Q8_0)
    # int8 q -> offset binary q + 128 (uint8 widens to float32 faster than int8)
    return (b[..., 2:34] ^ 0x80).reshape(len(b), cols), _f16(b[..., 0:2]), None


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12 packed bytes -> 8 six-bit scales and 8 six-bit mins.

    bytes 0-3: scale j (low 6 bits) | top 2 bits of scale j+4; bytes 4-7: same for mins;
    bytes 8-11: low nibble = low 4 bits of scale j+4, high nibble = low 4 bits of min j+4.
    """
    a, m, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 0x3F, (hi & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (hi >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(_F32), mn.astype(_F32)


def _k_common(b: np.ndarray):
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    sc, mn = _k_scales(b[..., 4:16])
    # 128 bytes of nibbles: 4 chunks of 32 bytes; sub-block 2i = low nibbles of chunk i,
    # sub-block 2i+1 = high nibbles.
    qs = b[..., -128:].reshape(*b.shape[:2], 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]
    return (qs & 0x0F).reshape(*b.shape[:2], 256), d * sc, -(dmin * mn)


def _unpack_q4_k(raw, cols):
    b = _blocks(raw, QT.Q4_K)
    c, d, m = _k_common(b)
    r = len(b)
    return c.reshape(r, cols), d.reshape(r, -1), m.reshape(r, -1)


def _unpack_q5_k(raw, cols):
    b = _blocks(raw, QT.Q5_K)
    c, d, m = _k_common(b)
    # qh: 32 bytes; bit s of byte l is the 5th bit of value l of sub-block s.
    qh = b[..., 16:48, None] >> np.arange(8, dtype=np.uint8)  # (r, nb, 32 l, 8 s)
    c = c | ((qh & 1).swapaxes(-1, -2).reshape(c.shape) << 4)
    r = len(b)
    return c.reshape(r, cols), d.reshape(r, -1), m.reshape(r, -1)


def _unpack_q6_k(raw, cols):
    b = _blocks(raw, QT.Q6_K)
    r, nb = b.shape[:2]
    # ql: 128 bytes = 2 halves of 64; value (half a, nibble h, l<64) = a*128 + h*64 + l.
    ql = b[..., 0:128].reshape(r, nb, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]
    # qh: 64 bytes = 2 halves of 32; value (half a, 2-bit field s, l<32) = a*128 + s*32 + l.
    qh = b[..., 128:192].reshape(r, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
    q = (ql & 0x0F).reshape(r, nb, 256) | ((qh & 0x03).reshape(r, nb, 256) << 4)
    c = q.reshape(r, cols)
    d = _f16(b[..., 208:210])[..., None] * b[..., 192:208].view(np.int8).astype(_F32)
    return c, d.reshape(r, -1), None


CODECS: dict[QT, Codec] = {
    QT.Q4_0: Codec(4, 2, np.uint8, 32, False, 8, _unpack_q4_0),
    QT.Q4_1: Codec(4, 2, np.uint8, 32, True, 0, _unpack_q4_1),
    QT.Q5_0: Codec(5, 3, np.uint16, 32, False, 16, _unpack_q5_0),
    QT.Q5_1: Codec(5, 3, np.uint16, 32, True, 0, _unpack_q5_1),
    QT.Q8_0: Codec(8, 1, np.uint8, 32, False, 128, _unpack_q8_0),
    QT.Q4_K: Codec(4, 2, np.uint8, 32, True, 0, _unpack_q4_k),
    QT.Q5_K: Codec(5, 3, np.uint16, 32, True, 0, _unpack_q5_k),
    QT.Q6_K: Codec(8, 1, np.uint8, 16, False, 32, _unpack_q6_k),
}
FLOATS = {QT.F32: np.float32, QT.F16: np.uint16, QT.BF16: np.uint16}  # the bits each keeps

SUPPORTED: frozenset[GGMLQuantizationType] = frozenset(CODECS) | frozenset(FLOATS)


def block_size(qtype: GGMLQuantizationType) -> int:
    """Values per block (1 for float types)."""
    _check_supported(qtype)
    return GGML_QUANT_SIZES[qtype][0]


def row_bytes(qtype: GGMLQuantizationType, cols: int) -> int:
    """Bytes of one row of ``cols`` values in the GGUF layout."""
    _check_supported(qtype)
    bs, ts = GGML_QUANT_SIZES[qtype]
    if cols <= 0 or cols % bs:
        raise ModelError(f"{qtype.name} row of {cols} values is not a positive multiple of {bs}")
    return cols // bs * ts


def check_raw(qtype, raw: np.ndarray, rows: int, cols: int) -> None:
    """Raise UnsupportedError for a type not in SUPPORTED, ModelError unless ``raw`` is uint8
    (rows, row_bytes) with rows >= 1: the bytes of ``rows`` rows as the GGUF stores them."""
    _check_supported(qtype)
    qtype = QT(qtype)
    rb = row_bytes(qtype, cols)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.shape != (rows, rb):
        got = (f"{raw.dtype} {raw.shape}" if isinstance(raw, np.ndarray)
               else type(raw).__name__)
        raise ModelError(f"{qtype.name} {rows}x{cols} needs uint8 raw of shape "
                         f"({rows}, {rb}), got {got}")
    if rows <= 0:
        raise ModelError(f"{qtype.name} matrix needs at least one row, got {rows}")


def codec(qtype: GGMLQuantizationType) -> Codec:
    """How a quantized type reduces to codes and float32 scales (the compiled kernels' layout
    starts from the same unpacking). KeyError for float types."""
    return CODECS[QT(qtype)]


def _check_supported(qtype) -> None:
    if qtype not in SUPPORTED:
        name = getattr(qtype, "name", str(qtype))
        raise UnsupportedError(f"tensor type {name} is not supported (have: "
                               f"{', '.join(sorted(t.name for t in SUPPORTED))})")


def matvec_args(x: np.ndarray, out: np.ndarray | None, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """The matvec contract both matrix families keep: x float32 (cols,) (converted, made
    contiguous), out float32 (rows,) (made if None). ValueError naming the shape otherwise."""
    x = np.ascontiguousarray(x, dtype=_F32)
    if x.shape != (cols,):
        raise ValueError(f"matvec expects x of shape ({cols},), got {x.shape}")
    if out is None:
        out = np.empty(rows, _F32)
    elif out.shape != (rows,) or out.dtype != _F32:
        raise ValueError(f"out must be float32 ({rows},), got {out.dtype} {out.shape}")
    return x, out
