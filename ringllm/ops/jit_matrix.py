"""A weight matrix held for the compiled kernels: :class:`JitMatrix` (the layout and the
kernels are in :mod:`ringllm.ops.jit`)."""

from __future__ import annotations

from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType

from ringllm.errors import ModelError
from ringllm.ops import codes, jit, jit_batch

QT = GGMLQuantizationType
_F32 = np.float32


def _pack(fmt: int, codes: np.ndarray, gs: int) -> tuple[np.ndarray, np.ndarray | None]:
    """codes (r, cols) unsigned -> (qs (r, G * bytes per group), qh (r, G) or None): each
    row's groups as jit's layout packs them, before four rows are interleaved."""
    r, cols = codes.shape
    G = cols // gs
    c = codes.reshape(r, G, gs).astype(np.uint32)
    if fmt == jit.BYTE:
        return c.astype(np.uint8).reshape(r, cols), None
    half = gs // 2
    lo, hi = c[:, :, :half], c[:, :, half:]
    qs = ((lo & 15) | ((hi & 15) << 4)).astype(np.uint8).reshape(r, G * half)
    if fmt == jit.NIB4:
        return qs, None
    bits = 1 if fmt == jit.NIB5 else 2
    top = c >> 4  # (r, G, gs)
    if fmt == jit.NIB5:  # bit j: value j's 5th bit, values 0..31 in order
        shifts = np.arange(32, dtype=np.uint32)
    else:  # jit.Q6: value j < 8 at bits 2j, value 8 + j at 16 + 2j
        shifts = np.concatenate([2 * np.arange(8), 16 + 2 * np.arange(8)]).astype(np.uint32)
    qh = np.bitwise_or.reduce((top & ((1 << bits) - 1)) << shifts, axis=2).astype(np.uint32)
    return qs, qh


_EMPTY = np.zeros((0, 0), _F32)
_EMPTY_U32 = np.zeros((0, 0), np.uint32)


class JitMatrix:
    """A weight matrix W (rows, cols) held for the compiled kernels. y = W @ x.

    The same contract as :class:`ringllm.ops.quant.QuantMatrix` (``matvec``, ``matmul``,
    ``rows_f32``, ``dequantize``, ``nbytes``); results agree with it to float32 rounding
    (sums run in another order), and ``rows_f32``/``dequantize`` are gguf's values exactly.
    """

    def __init__(self, qtype, rows: int, cols: int, qs: np.ndarray, qh: np.ndarray | None,
                 d: np.ndarray | None, m: np.ndarray | None) -> None:
        self.qtype, self.rows, self.cols = QT(qtype), rows, cols
        self._qs, self._qh, self._d, self._m = qs, qh, d, m
        self._fmt = jit.FORMAT.get(self.qtype)
        if self._fmt is not None:
            codec = codes.codec(self.qtype)
            self._gs, self._off = codec.gs, _F32(codec.offset)
            # gemv's leading arguments, made once: a decode token makes ~120 calls.
            self._gemv_args = (self._fmt, qs, qh if qh is not None else _EMPTY_U32, d,
                               m if m is not None else _EMPTY, self._off)

    # -- construction

    @classmethod
    def from_raw(cls, qtype, raw: np.ndarray, rows: int, cols: int,
                 rows_done: Callable[[int], None] | None = None) -> "JitMatrix":
        """raw: uint8 (rows, row_bytes) as stored in the GGUF (may be a read-only memmap view).
        Converted in blocks of rows, so transient memory stays small; ``rows_done(r)`` is
        called once rows [0, r) are copied. Errors as :meth:`QuantMatrix.from_raw`."""
        codes.check_raw(qtype, raw, rows, cols)
        qtype = QT(qtype)
        if qtype in jit.FLOATS:
            if qtype == QT.F32:
                w = np.array(np.asarray(raw).view(_F32).reshape(rows, cols))
            else:
                w = np.array(np.asarray(raw).view(np.uint16).reshape(rows, cols))
                if qtype == QT.F16 and np.any((w & 0x7C00) == 0x7C00):
                    raise ModelError("F16 matrix holds Inf/NaN weights")
            if rows_done is not None:
                rows_done(rows)
            return cls(qtype, rows, cols, w, None, None, None)
        codec = codes.codec(qtype)
        fmt, gs = jit.FORMAT[qtype], codec.gs
        G = cols // gs
        quads, width = (rows + 3) // 4, gs if fmt == jit.BYTE else gs // 2
        # Four rows interleaved per group (see jit's layout); rows past the end stay zero.
        qs = np.zeros((quads, G, 4, width), np.uint8)
        qh = np.zeros((quads, G, 4), np.uint32) if fmt in (jit.NIB5, jit.Q6) else None
        d = np.empty((rows, G), _F32)
        m = np.empty((rows, G), _F32) if codec.has_m else None
        step = max(1, (1 << 18) // cols)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            c, dr, mr = codec.unpack(np.asarray(raw[r0:r1]), cols)
            q, h = _pack(fmt, c, gs)
            at = np.arange(r0, r1)
            qs.transpose(0, 2, 1, 3)[at >> 2, at & 3] = q.reshape(r1 - r0, G, width)
            if qh is not None:
                qh.transpose(0, 2, 1)[at >> 2, at & 3] = h
            d[r0:r1] = dr
            if m is not None:
                m[r0:r1] = mr
            if rows_done is not None:
                rows_done(r1)
        qs = qs.reshape(quads, G * 4 * width)
        qh = qh.reshape(quads, G * 4) if qh is not None else None
        return cls(qtype, rows, cols, qs, qh, d, m)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self._qs, self._qh, self._d, self._m) if a is not None)

    def __repr__(self) -> str:
        return f"JitMatrix({self.qtype.name}, {self.rows}x{self.cols}, {self.nbytes / 2**20:.2f} MiB)"

    # -- products

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """y = W @ x for x float32 (cols,); returns float32 (rows,), written to ``out`` if given."""
        x, out = codes.matvec_args(x, out, self.rows, self.cols)
        self._product(x[None, :], out[None, :])
        return out

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T for x float32 (n, cols); returns float32 (n, rows)."""
        x = np.ascontiguousarray(x, dtype=_F32)
        if x.ndim != 2 or x.shape[1] != self.cols:
            raise ValueError(f"matmul expects x of shape (n, {self.cols}), got {x.shape}")
        out = np.empty((x.shape[0], self.rows), _F32)
        if x.shape[0]:
            self._product(x, out)
        return out

    def _product(self, x: np.ndarray, out: np.ndarray) -> None:
        n = x.shape[0]
        if n == 1 and self._fmt is not None:  # decode: the hot path, checked first
            jit.gemv(*self._gemv_args, x[0], out[0])
            return
        if self.qtype == QT.F32:
            np.matmul(x, self._qs.T, out=out)
            return
        if self._fmt is None:  # F16 / BF16
            jit.gemm_half(0 if self.qtype == QT.F16 else 1, self._qs, x, out, jit.F16_POW, jit.BF16_POW)
            return
        if n >= jit.GEMM_MIN_N:
            self._gemm_blas(x, out)
            return
        m = self._m if self._m is not None else _EMPTY
        qh = self._qh if self._qh is not None else _EMPTY_U32
        half = self._gs // 2  # a decode batch: each weight decoded once for all n rows (jit_batch)
        jit_batch.gemm_batch(self._fmt, half, self._qs, qh, self._d, m, self._off,
                             x, out)

    def _gemm_blas(self, x: np.ndarray, out: np.ndarray) -> None:
        """Prefill: decode blocks of rows to float32 (compiled, threaded; jit_batch) and sgemm each."""
        step = max(jit.ROW_BLOCK, jit.GEMM_CHUNK_WEIGHTS // self.cols // jit.ROW_BLOCK * jit.ROW_BLOCK)
        buf = np.empty((min(step, self.rows), self.cols), _F32)
        m = self._m if self._m is not None else _EMPTY
        qh = self._qh if self._qh is not None else _EMPTY_U32
        half = self._gs // 2
        for r0 in range(0, self.rows, step):
            r1 = min(self.rows, r0 + step)
            w = buf[: r1 - r0]
            jit_batch.decode_rows(self._fmt, half, self._qs, qh, self._d, m, self._off, r0, w)
            np.matmul(x, w.T, out=out[:, r0:r1])

    def _dequant_into(self, r0: int, w: np.ndarray) -> None:
        m = self._m if self._m is not None else _EMPTY
        qh = self._qh if self._qh is not None else _EMPTY_U32
        jit.dequant_rows(self._fmt, self._qs, qh, self._d, m, self._off, r0, w)

    # -- dequantization

    def rows_f32(self, idx: np.ndarray) -> np.ndarray:
        """Dequantized rows W[idx] as float32 (len(idx), cols), bit-identical to gguf."""
        idx = np.asarray(idx).reshape(-1)
        if idx.size and (idx.min() < -self.rows or idx.max() >= self.rows):
            raise IndexError(f"row index out of range for {self.rows} rows")
        idx = idx.astype(np.int64) % self.rows
        if self.qtype == QT.F32:
            return self._qs[idx]
        out = np.empty((len(idx), self.cols), _F32)
        if self._fmt is None:
            jit.widen_half(0 if self.qtype == QT.F16 else 1, self._qs, idx, out, jit.F16_POW, jit.BF16_POW)
            return out
        for t, r in enumerate(idx):  # one compiled call per row: embeddings look up a few
            self._dequant_into(int(r), out[t:t + 1])
        return out

    def dequantize(self) -> np.ndarray:
        """The whole matrix as float32 (rows, cols); for tests and debugging."""
        if self.qtype == QT.F32:
            return self._qs.copy()
        if self._fmt is None:
            return self.rows_f32(np.arange(self.rows))
        out = np.empty((self.rows, self.cols), _F32)
        self._dequant_into(0, out)
        return out


def warm_up() -> None:
    """Compile (or load from the on-disk cache) every kernel once, on a tiny zero matrix each."""
    for qt in list(jit.FORMAT) + list(jit.FLOATS):
        cols = 256
        mat = JitMatrix.from_raw(qt, np.zeros((2, codes.row_bytes(qt, cols)), np.uint8), 2, cols)
        for n in (1, 2, jit.GEMM_MIN_N):
            mat.matmul(np.ones((n, cols), _F32))
        mat.rows_f32(np.array([0]))
    jit.mark_warm()
