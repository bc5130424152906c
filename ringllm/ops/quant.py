"""Quantized weight matrices and their matvec / matmul kernels, in pure numpy.

A :class:`QuantMatrix` holds ``W`` (rows, cols) for ``y = W @ x``. Every quantized type is
reduced, once at load, to unsigned integer codes ``c`` and per-group float32 scales ``d`` (and
``m`` or an ``offset``), as :mod:`ringllm.ops.codes` describes; ``dequantize()`` repeats
gguf's float32 operations bit for bit.

Repacked layout (the bytes)
---------------------------
Rows are cut into ``nt`` tiles of ``T`` rows (the last one zero-padded), each tile into ``per``
row slots of ``Tp = T/per`` rows. One word holds ``per`` codes, slot ``k`` in bits
``[k*b, (k+1)*b)``:

=================  =====  ===  ===  ==================================================
types              word   b    per  bits/weight held: codes + float32 scales
=================  =====  ===  ===  ==================================================
Q4_0 Q4_1 Q4_K     u8     4    2    4 + 1 (d) [+ 1 (m)]
Q5_0 Q5_1 Q5_K     u16    5    3    5.33 + 1 [+ 1]
Q8_0 Q6_K          u8     8    1    8 + 1 (Q8_0), 8 + 2 (Q6_K: a scale per 16)
=================  =====  ===  ===  ==================================================

* ``_words[i]``: tile ``i`` as a C array ``(K, Tp)`` (K = cols): word ``[col, t]`` packs
  ``c[row = i*T + k*Tp + t, col]`` for ``k = 0..per-1``.
* ``_d[i]``, ``_m[i]``: float32 ``(per, G, Tp)`` (G = cols/gs), ``d'[k, g, t] = d[row, g] *
  2**-(k*b)`` and ``m[row, g]`` for the same rows.

Why: numpy multiplies fast only in float32 BLAS, so every weight must become a float32 in a
work buffer, and writing that buffer is the cost that matters (~0.15-0.2 ns/weight here, what
a memcpy of the floats costs). With this layout ONE ufunc call decodes a whole tile:
``bitwise_and(words, masks, out=f32 buf, casting='unsafe')`` with ``masks[k] = (2**b - 1) <<
(k*b)`` broadcast over slots writes ``c * 2**(k*b)`` (exact in float32) as ``(per, G, gs,
Tp)``; the power of two is folded into ``d'`` (exact both ways, so ``d'*c'`` rounds like
``d*c``). No shift pass, no interleave, no int8 copy of 4-bit weights. Then

* matvec: per tile one batched BLAS call ``x(G,1,gs) @ buf(per,G,gs,Tp)`` -> per-group dots
  ``P``; per call one ``einsum('ikgt,ikgt->ikt', d', P)`` and, for min/offset types, one
  ``s @ a`` with ``s[g] = sum_j x[g, j]`` and ``a = m`` (or ``a = d'`` with ``s`` times
  ``-offset * 2**(k*b)``). 0.25-0.3 ns/weight, ~20 us fixed per call.
* matmul (prefill, n >= _GEMM_MIN_N): decode one slot's column chunk straight into a
  ``(K [+ G], C)`` float32 matrix, multiply by ``d'``, put ``m`` (or ``-offset*d``) in the
  extra G rows, and one sgemm with x extended by its per-group sums does the rest.
  Smaller n decode each tile once and reuse the matvec scheme with n right-hand sides.

Tiles and chunks of tiles are fixed at load; threads claim whole chunks as they get a core,
so a row's result never depends on which thread or how many computed it. Float types keep their own bytes; F16/BF16 are widened per tile with integer
bit operations (numpy's float16 cast runs at ~0.3 G/s, far too slow), F32 goes straight to
BLAS.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
from gguf import GGMLQuantizationType

from ringllm.errors import ModelError
from ringllm.ops import codes
from ringllm.ops.codes import CODECS as _CODECS, FLOATS as _FLOATS
# The type facts both kernel families share, re-exported where callers have always found them.
from ringllm.ops.codes import SUPPORTED, block_size, check_raw, codec, row_bytes  # noqa: F401,E501

try:  # what np.einsum (no optimize=) calls after ~3 us of Python argument handling, 150x a token
    from numpy._core.multiarray import c_einsum as _c_einsum
except ImportError:  # a numpy that moved it: the public wrapper does the same
    _c_einsum = np.einsum

QT = GGMLQuantizationType
_F32 = np.float32

# Weights per tile: the float32 decode buffer is 4x this many bytes per thread. Measured on
# the 2-core EPYC (L2 1 MB), SmolLM2 decode: 256K 22.9, 512K 24.4, 768K 25.3, 1M 25.6,
# 1.5M 25.1 tok/s; smaller tiles lose to per-call overhead (2-5 us per numpy call).
_TILE_WEIGHTS = 3 << 18
# Matrices at least this big get a tile count divisible by the thread count set at load.
# Smaller ones stay on the calling thread: here a worker starts 30-80 us after the submit and
# two threads slow each other (shared L3, GIL on the small calls), so splitting SmolLM2's
# 0.5-0.9 M-weight matrices measured slower or even; the 28 M head runs 1.6x faster.
_SPLIT_WEIGHTS = 1 << 20
# matmul with fewer rows of x than this decodes tiles once and runs the matvec scheme on
# all rows at once; from here on, dequantize and use sgemm (crossover measured at n=16-24).
_GEMM_MIN_N = 16
# matvec applies the scales to at most this many per-group partial sums at once.
_P_FLOATS = 1 << 18
# With threads, chunks of tiles are claimed dynamically: aim for this many per thread.
_CHUNKS_PER_THREAD = 4
# Prefill dequantizes this many weights at a time (at most a row slot). Measured, 128 tokens:
# 96K 58, 192K 61, 384K 65, 768K 64 GFlop/s (pure sgemm on float32 weights: 69).
_GEMM_CHUNK_WEIGHTS = 3 << 17


# ----------------------------------------------------------------------------- threads


_pool: ThreadPoolExecutor | None = None
_nthreads = 1
_local = threading.local()


def set_threads(n: int) -> None:
    """Run kernels on ``n`` threads: the caller plus ``n - 1`` pool workers claiming chunks of
    tiles. Call it before loading matrices: tiles and chunks are cut for the thread count at
    load (a matrix loaded single-threaded stays one chunk). Results do not depend on ``n``.
    BLAS must be single-threaded (the caller pins it with threadpoolctl); numpy releases the
    GIL inside the heavy calls. Not to be called while kernels run.
    """
    global _pool, _nthreads
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    old = _pool
    _pool = ThreadPoolExecutor(n - 1, thread_name_prefix="ringllm-kernel") if n > 1 else None
    _nthreads = n
    if old is not None:
        old.shutdown(wait=True)


def _run_chunks(chunks: list[tuple[int, int]], work: Callable[[int, int], None]) -> None:
    """Call work(lo, hi) once per tile chunk, on the caller and up to n - 1 pool workers.

    Threads claim chunks from a shared iterator (handing out one item is atomic under the
    GIL), so a worker that is late to get a core just does less, and one that never started
    is cancelled instead of waited for. Chunks are fixed per matrix, so results are the same
    whoever computes them.
    """
    pool = _pool
    if pool is None or len(chunks) <= 1 or getattr(_local, "alone", False):
        for lo, hi in chunks:
            work(lo, hi)
        return
    todo = iter(chunks)

    def drain():
        for lo, hi in todo:
            work(lo, hi)

    futs = [pool.submit(drain) for _ in range(min(_nthreads, len(chunks)) - 1)]
    try:
        drain()
    finally:
        for f in futs:
            if not f.cancel():
                f.result()


def threads() -> int:
    """The kernel thread count set by :func:`set_threads`."""
    return _nthreads


def run_together(tasks: Sequence[Callable[[], None]]) -> None:
    """Run up to ``threads()`` tasks at once: the first on the caller, the others on pool
    workers. Each task's kernels stay on its own thread (every thread already has work, and
    sharing chunks between busy threads only adds hand-offs). Returns when every task has
    ended; then re-raises the first failure, if any. A task waiting on another must not
    wait forever if that one fails: the tasks see to that themselves.
    """
    if len(tasks) > _nthreads:
        raise ValueError(f"{len(tasks)} tasks for {_nthreads} kernel threads")

    def alone(task: Callable[[], None]) -> None:
        before = getattr(_local, "alone", False)
        _local.alone = True
        try:
            task()
        finally:
            _local.alone = before

    futs = [_pool.submit(alone, t) for t in tasks[1:]] if len(tasks) > 1 else []
    try:
        alone(tasks[0])
    finally:
        errors = [f.exception() for f in futs]  # waits for each
    for e in errors:
        if e is not None:
            raise e


def _scratch(name: str, n: int, dtype=_F32) -> np.ndarray:
    """A per-thread, 64-byte aligned flat work array of >= n items (grown, never shrunk)."""
    store = getattr(_local, "s", None)
    if store is None:
        store = _local.s = {}
    a = store.get(name)
    if a is None or a.size < n or a.dtype != dtype:
        itemsize = np.dtype(dtype).itemsize
        raw = np.empty(n * itemsize + 64, np.uint8)
        off = -raw.ctypes.data % 64
        a = store[name] = raw[off:off + n * itemsize].view(dtype)
    return a[:n]


# ----------------------------------------------------------------------------- the matrix


def _tiling(rows: int, cols: int, align: int) -> tuple[int, int]:
    """(rows per tile, tile count): ~_TILE_WEIGHTS per tile, tiles a multiple of ``align``
    rows, and for a big enough matrix a tile count divisible by the current thread count."""
    nt = max(1, -(-rows * cols // _TILE_WEIGHTS))
    if rows * cols >= _SPLIT_WEIGHTS:
        nt = -(-nt // _nthreads) * _nthreads
    t = -(-rows // nt)
    t = -(-t // align) * align
    return t, -(-rows // t)


class QuantMatrix:
    """A weight matrix W of shape (rows, cols) kept quantized in memory. y = W @ x.

    Rows are grouped into tiles fixed at load (cut for the thread count set then: call
    ``set_threads`` before loading); threads take whole tiles, so results are bit-identical
    whatever ``set_threads`` says later. Kernels may be called from several threads at once.
    """

    qtype: GGMLQuantizationType
    rows: int
    cols: int

    def __init__(self, qtype, rows, cols, tile, words, d=None, m=None):
        self.qtype, self.rows, self.cols = qtype, rows, cols
        self._T = tile
        self._nt = len(words)
        self._words = words  # (nt, K*Tp) code words, or (nt, T, K) float rows
        self._d = d  # (nt, per, G, Tp) float32 d * 2**-(slot*bits); None for float types
        self._m = m  # (nt, per, G, Tp) float32 for types with a min, else None
        c = self._codec = _CODECS.get(qtype)
        # Units of work: ranges of tiles, fixed here (one einsum each in matvec).
        per_chunk = -(-self._nt // (_CHUNKS_PER_THREAD * _nthreads)) if _nthreads > 1 else self._nt
        if c is not None:
            per_chunk = min(per_chunk, max(1, _P_FLOATS // (cols // c.gs * tile)))
        self._chunks = [(lo, min(self._nt, lo + per_chunk))
                        for lo in range(0, self._nt, per_chunk)]
        if c is not None:
            self._G = cols // c.gs
            self._Tp = tile // c.per
            self._masks = (((1 << c.bits) - 1) << (c.bits * np.arange(c.per))).astype(c.word)
            self._masks = self._masks[:, None, None]
            # per slot k: codes are c * 2**(k*bits) and d' = d * 2**-(k*bits)
            self._slot = (2.0 ** (c.bits * np.arange(c.per))).astype(_F32)
            # The kernels add sum_g a[g, t] * s[g] with s[g] = sum_j x[g, j]: a = m for types
            # with a min; a = d' for offset types, with s scaled by -offset * 2**(k*bits)
            # so that d' * that = -offset * d.
            self._a = m if c.has_m else (d if c.offset else None)
            self._sk = (np.ones((1, 1, 1), _F32) if c.has_m
                        else (-c.offset * self._slot)[:, None, None])

    # -- construction

    @classmethod
    def from_raw(cls, qtype, raw: np.ndarray, rows: int, cols: int,
                 rows_done: Callable[[int], None] | None = None) -> "QuantMatrix":
        """raw: uint8 (rows, row_bytes) exactly as stored in the GGUF file (may be a read-only
        memmap view, rows or block-aligned columns sliced). The result holds no reference to
        ``raw``; ``rows_done(r)``, if given, is called as soon as rows [0, r) of ``raw`` have
        been copied (so a caller can drop their file pages while a big matrix loads). Raises
        UnsupportedError for a type not in SUPPORTED, ModelError if raw has the wrong dtype or
        shape.
        """
        check_raw(qtype, raw, rows, cols)
        qtype = QT(qtype)
        if qtype in _FLOATS:
            return cls._from_float(qtype, raw, rows, cols)
        c = _CODECS[qtype]
        G = cols // c.gs
        T, nt = _tiling(rows, cols, 16 * c.per)
        Tp = T // c.per
        words = np.empty((nt, cols * Tp), c.word)
        d = np.empty((nt, c.per, G, Tp), _F32)
        m = np.empty((nt, c.per, G, Tp), _F32) if c.has_m else None
        slot_scale = (2.0 ** (-c.bits * np.arange(c.per))).astype(_F32)[:, None, None]  # exact

        def slots(a, n):  # one tile's (n, G) rows, zero-padded -> (per, G, Tp)
            full = np.zeros((T, G), _F32)
            full[:n] = a
            return full.reshape(c.per, Tp, G).transpose(0, 2, 1)

        for i in range(nt):  # tile by tile: transient memory stays ~one tile
            r0, r1 = i * T, min(rows, (i + 1) * T)
            codes, di, mi = c.unpack(np.asarray(raw[r0:r1]), cols)
            cp = np.zeros((T, cols), codes.dtype)
            cp[: r1 - r0] = codes
            cp = cp.reshape(c.per, Tp, cols).transpose(2, 0, 1)  # (K, per, Tp)
            if c.per == 1:
                w = cp[:, 0, :]
            else:
                w = np.zeros((cols, Tp), c.word)
                for k in range(c.per):
                    w |= cp[:, k, :].astype(c.word) << c.word(c.bits * k)
            words[i] = w.reshape(-1)
            np.multiply(slots(di, r1 - r0), slot_scale, out=d[i])
            if m is not None:
                m[i] = slots(mi, r1 - r0)
            if rows_done is not None:
                rows_done(r1)
        return cls(qtype, rows, cols, T, words, d, m)

    @classmethod
    def _from_float(cls, qtype, raw, rows, cols):
        T, nt = _tiling(rows, cols, 16)
        dt = _FLOATS[qtype]
        w = np.zeros((nt * T, cols), dt)
        w[:rows] = np.asarray(raw).view(dt)
        if qtype == QT.F16 and np.any((w & 0x7C00) == 0x7C00):
            raise ModelError("F16 matrix holds Inf/NaN weights")
        return cls(qtype, rows, cols, T, w.reshape(nt, T, cols))

    @property
    def nbytes(self) -> int:
        """Bytes held by the matrix (work buffers are per thread and not counted)."""
        return sum(a.nbytes for a in (self._words, self._d, self._m) if a is not None)

    def __repr__(self) -> str:
        return (f"QuantMatrix({self.qtype.name}, {self.rows}x{self.cols}, "
                f"{self._nt} tiles of {self._T} rows, {self.nbytes / 2**20:.2f} MiB)")

    # -- kernels

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """y = W @ x for x float32 (cols,); returns float32 (rows,), written to ``out`` if given."""
        x, out = codes.matvec_args(x, out, self.rows, self.cols)
        if self._codec is None:
            work = lambda lo, hi: self._float_tiles(x[None, :], out[None, :], lo, hi)
        else:
            work = lambda lo, hi: self._matvec_tiles(x, out, lo, hi)
        _run_chunks(self._chunks, work)
        return out

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T for x float32 (n, cols); returns float32 (n, rows)."""
        x = np.ascontiguousarray(x, dtype=_F32)
        if x.ndim != 2 or x.shape[1] != self.cols:
            raise ValueError(f"matmul expects x of shape (n, {self.cols}), got {x.shape}")
        n = x.shape[0]
        out = np.empty((n, self.rows), _F32)
        if n == 0:
            return out
        if self._codec is None:
            work = lambda lo, hi: self._float_tiles(x, out, lo, hi)
        else:
            xg = x.reshape(n, self._G, -1)
            xs = xg.sum(axis=2) if self._a is not None else None  # (n, G)
            if n < _GEMM_MIN_N:
                x3 = np.ascontiguousarray(xg.transpose(1, 0, 2))  # (G, n, gs)
                work = lambda lo, hi: self._batched_tiles(x3, xs, out, lo, hi)
            else:
                s0 = 1 if self._m is not None else -self._codec.offset
                xa = x if xs is None else np.concatenate([x, s0 * xs], axis=1)
                # Prefill: every (tile, slot, column chunk) is its own sgemm writing its own
                # output rows, so threads share out those units, not whole tiles: SmolLM2's
                # 0.3-0.9 M-weight matrices are one or two tiles, which kept prefill's
                # q|k|v and attn_output on one thread.
                units = self._gemm_units()
                _run_chunks([(j, j + 1) for j in range(len(units))],
                            lambda lo, hi: self._gemm_unit(xa, out, *units[lo]))
                return out
        _run_chunks(self._chunks, work)
        return out

    def _dest(self, out: np.ndarray, lo: int, hi: int, name: str) -> np.ndarray:
        """out[..., rows of tiles lo..hi) or, if that runs into the padding, a scratch the
        caller copies back with _undest."""
        T = self._T
        if hi * T <= self.rows:
            return out[..., lo * T:hi * T]
        lead = out.shape[:-1]
        return _scratch(name, math.prod(lead) * (hi - lo) * T).reshape(*lead, (hi - lo) * T)

    def _undest(self, out: np.ndarray, lo: int, hi: int, y: np.ndarray) -> None:
        if hi * self._T > self.rows:
            out[..., lo * self._T:] = y[..., : self.rows - lo * self._T]

    def _decode(self, i: int, dst: np.ndarray) -> None:
        """Codes of tile i -> float32 dst (per, K, Tp), ``c * 2**(slot*bits)`` (exact)."""
        w = self._words[i].reshape(1, self.cols, self._Tp)
        if self._codec.per == 1:
            np.copyto(dst, w, casting="unsafe")
        else:
            np.bitwise_and(w, self._masks, out=dst, casting="unsafe")

    def _matvec_tiles(self, x, out, lo, hi):
        c, G, T, Tp = self._codec, self._G, self._T, self._Tp
        buf = _scratch("buf", self.cols * T).reshape(c.per, self.cols, Tp)
        bv = buf.reshape(c.per, G, c.gs, Tp)
        x3 = x.reshape(G, 1, c.gs)
        nb = hi - lo  # one chunk: nb * G * T <= _P_FLOATS (or one tile)
        p = _scratch("p", nb * T * G).reshape(nb, c.per, G, 1, Tp)
        for i in range(lo, hi):
            self._decode(i, buf)
            np.matmul(x3, bv, out=p[i - lo])  # p[k, g, 0, t] = sum_j x[g, j] * c'[g, j, k, t]
        y = self._dest(out, lo, hi, "y")
        yk = y.reshape(nb, c.per, Tp)
        _c_einsum("ikgt,ikgt->ikt", self._d[lo:hi], p[:, :, :, 0, :], out=yk)
        if self._a is not None:  # + sum_g a[g, t] * s[g], s[g] = sum_j x[g, j] (* _sk)
            s = np.add.reduce(x.reshape(G, c.gs), axis=1)
            s = s[None] if self._m is not None else s * self._sk  # (1 | per, 1, G)
            t = _scratch("t", nb * T).reshape(nb, c.per, 1, Tp)
            np.matmul(s, self._a[lo:hi], out=t)
            yk += t[:, :, 0]
        self._undest(out, lo, hi, y)

    def _batched_tiles(self, x3, xs, out, lo, hi):
        """Small n: the matvec scheme with n right-hand sides per group."""
        c, G, T, Tp = self._codec, self._G, self._T, self._Tp
        n = x3.shape[1]
        buf = _scratch("buf", self.cols * T).reshape(c.per, self.cols, Tp)
        bv = buf.reshape(c.per, G, c.gs, Tp)
        p = _scratch("pn", G * n * T).reshape(c.per, G, n, Tp)
        if xs is not None:
            xk = xs * self._sk  # (per, n, G)
            t = _scratch("tn", n * T).reshape(c.per, n, Tp)
        for i in range(lo, hi):
            self._decode(i, buf)
            np.matmul(x3, bv, out=p)
            y = self._dest(out, i, i + 1, "yb")
            yk = y.reshape(n, c.per, Tp)
            _c_einsum("kgt,kgnt->nkt", self._d[i], p, out=yk)
            if xs is not None:
                np.matmul(xk, self._a[i], out=t)
                yk += t.transpose(1, 0, 2)
            self._undest(out, i, i + 1, y)

    def _gemm_units(self) -> list[tuple[int, int, int, int]]:
        """(tile, slot, first column, columns) of every prefill sgemm: row slot ``k`` of tile
        ``i``, columns [a, a + C) of its Tp (about _GEMM_CHUNK_WEIGHTS weights each)."""
        T, Tp, K = self._T, self._Tp, self.cols
        C = max(8, min(Tp, -(-_GEMM_CHUNK_WEIGHTS // K) // 8 * 8))
        return [(i, k, a, min(Tp, a + C) - a) for i in range(self._nt) for k in range(self._codec.per)
                for a in range(0, Tp, C) if i * T + k * Tp + a < self.rows]

    def _gemm_unit(self, xa, out, i, k, a, n_cols):
        """One prefill sgemm: dequantize columns [a, a + n_cols) of row slot k of tile i into a
        (K [+ G], n_cols) float32 matrix and multiply. For min/offset types ``xa`` is x with
        its per-group sums appended (times -offset for offset types) and the chunk gets G extra
        rows (m, or d), so the sgemm also adds ``sum_g m*s`` (or ``-offset * sum_g d*s``)."""
        c, G, T, Tp, K = self._codec, self._G, self._T, self._Tp, self.cols
        ka = xa.shape[1]
        b = a + n_cols
        w = _scratch("buf", ka * n_cols).reshape(ka, n_cols)
        words = self._words[i].reshape(1, K, Tp)
        if c.per == 1:
            np.copyto(w[:K], words[0, :, a:b], casting="unsafe")
        else:
            np.bitwise_and(words[:, :, a:b], self._masks[k], out=w[None, :K], casting="unsafe")
        wg = w[:K].reshape(G, c.gs, n_cols)
        np.multiply(wg, self._d[i, k, :, None, a:b], out=wg)
        if ka > K and self._m is not None:
            w[K:] = self._m[i, k, :, a:b]
        elif ka > K:  # -offset * d: the sums appended to x carry -offset
            np.multiply(self._d[i, k, :, a:b], self._slot[k], out=w[K:])
        r0 = i * T + k * Tp + a
        r1 = min(self.rows, r0 + n_cols)
        if r1 - r0 == n_cols:
            np.matmul(xa, w, out=out[:, r0:r1])
        else:
            out[:, r0:r1] = (xa @ w)[:, : r1 - r0]

    def _float_tiles(self, x, out, lo, hi):
        """F32 straight BLAS; F16/BF16 widened to float32 per tile with integer bit ops."""
        for i in range(lo, hi):
            w = self._widen(i)
            y = self._dest(out, i, i + 1, "yf")
            np.matmul(x, w.T, out=y)
            self._undest(out, i, i + 1, y)

    def _widen(self, i: int) -> np.ndarray:
        """Tile i of a float matrix as float32 (T, K)."""
        src = self._words[i]
        if self.qtype == QT.F32:
            return src
        b = _scratch("wide", src.size, np.uint32).reshape(src.shape)
        if self.qtype == QT.BF16:  # bf16 bits are the top half of the float32 bits
            np.left_shift(src, 16, out=b, dtype=np.uint32)
            return b.view(_F32)
        # f16 -> f32: the sign-extended h << 13 puts the sign at bit 31 and exponent|mantissa
        # at bits 13..27 (bits 28..30 get copies of the sign: cleared by the mask); scaling by
        # 2**112 rebiases the exponent (15 -> 127) and turns f16 subnormals into normals.
        np.left_shift(src.view(np.int16), 13, out=b, dtype=np.uint32, casting="unsafe")
        np.bitwise_and(b, np.uint32(0x8FFFE000), out=b)
        f = b.view(_F32)
        np.multiply(f, _F32(2.0**112), out=f)
        return f

    # -- dequantization

    def rows_f32(self, idx: np.ndarray) -> np.ndarray:
        """Dequantized rows W[idx] as float32 (len(idx), cols), bit-identical to gguf."""
        idx = np.asarray(idx).reshape(-1)
        if idx.size and (idx.min() < -self.rows or idx.max() >= self.rows):
            raise IndexError(f"row index out of range for {self.rows} rows")
        idx = idx.astype(np.int64) % self.rows
        ti, t = np.divmod(idx, self._T)
        c = self._codec
        if c is None:
            src = self._words[ti, t]
            if self.qtype == QT.F32:
                return src.copy()
            if self.qtype == QT.F16:
                return src.view(np.float16).astype(_F32)
            return (src.astype(np.uint32) << 16).view(_F32)
        k, tp = np.divmod(t, self._Tp)
        w = self._words.reshape(self._nt, self.cols, self._Tp)[ti, :, tp]  # (n, K)
        if c.per > 1:
            w = (w >> (c.bits * k).astype(c.word)[:, None]) & c.word((1 << c.bits) - 1)
        codes = w.astype(_F32)
        d = self._d[ti, k, :, tp] * self._slot[k][:, None]  # exact undo of the slot scale
        d = np.repeat(d, c.gs, axis=1)
        if c.offset:
            return (codes - _F32(c.offset)) * d  # gguf: d * (q - offset)
        v = codes * d
        if self._m is not None:  # gguf: d*q + m  /  d*q - dmin*min
            v += np.repeat(self._m[ti, k, :, tp], c.gs, axis=1)
        return v

    def dequantize(self) -> np.ndarray:
        """The whole matrix as float32 (rows, cols); for tests and debugging."""
        return self.rows_f32(np.arange(self.rows))
