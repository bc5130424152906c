"""Compiled kernels (numba): matrix products that read the packed codes and multiply in registers.

numpy multiplies fast only in float32 BLAS, so the numpy kernels (:mod:`ringllm.ops.quant`)
must write every weight out as a float32 and read it back, every token. These kernels decode a
group of codes in registers and multiply it straight away, so a weight costs its packed bytes
of memory traffic and a few vector instructions.

Layout (four rows interleaved per group, so a pass over four rows reads one contiguous stream)
------------------------------------------------------------------------------------------------
Every quantized type is reduced at load, as :mod:`ringllm.ops.codes` says, to unsigned
codes ``c`` and float32 scales per group of ``gs`` values::

    w[r, g*gs + j] = d[r, g] * c[r, g, j] + m[r, g]      (types with a min: Q4_1 Q5_1 Q4_K Q5_K)
    w[r, g*gs + j] = d[r, g] * (c[r, g, j] - offset)      (Q4_0: 8, Q5_0: 16, Q8_0: 128, Q6_K: 32)

K-quant sub-block scales are folded into ``d`` and ``m`` as gguf computes them, so the values
are gguf's bit for bit. The codes of one group of one row are packed as:

==========================  ====  ==========================================================
types                       gs    per group of one row
==========================  ====  ==========================================================
Q4_0 Q4_1 Q4_K  (fmt NIB4)  32    ``qs``: 16 bytes, byte j = c[j] | c[j+16] << 4
Q5_0 Q5_1 Q5_K  (fmt NIB5)  32    ``qs`` as NIB4 (low 4 bits) + ``qh``: uint32, bit j = c[j] >> 4
Q8_0            (fmt BYTE)  32    ``qs``: 32 bytes, c[j] (= int8 q + 128)
Q6_K            (fmt Q6)    16    ``qs``: 8 bytes, byte j = low4(c[j]) | low4(c[j+8]) << 4,
                                  + ``qh``: uint32, bits 2j..2j+1 = c[j] >> 4 and bits
                                  16+2j..17+2j = c[j+8] >> 4 (j < 8)
==========================  ====  ==========================================================

and held as ``qs`` uint8 (ceil(rows/4), G * 4 * W) (W bytes a group, as above) and ``qh``
uint32 (ceil(rows/4), G * 4): row r's group g at ``qs[r >> 2, (4*g + (r & 3)) * W :][:W]`` and
``qh[r >> 2, 4*g + (r & 3)]``, i.e. the quad of rows 4q..4q+3 stores group 0 of its four
rows, then group 1 of its four rows, and so on (rows past the end are zero). The products read
four rows at a time, so each pass streams one run of memory; with the rows one after another
the four streams of a pass ran 1.1-3.7x slower from DRAM (the 49152x576 Q8_0 output matrix,
0.45-0.95 ns/weight against 0.12, measured side by side; see docs/performance.md). Only the
``_pair_*`` decoders index ``qs``/``qh``: every kernel goes through them. Beside them ``d``
(rows, G) float32 and, for types with a min, ``m`` (rows, G) float32 (a quad's scales are
contiguous already). Held bytes per
GGUF byte: Q4_0 1.11, Q4_1 1.20, Q4_K 1.33, Q5_0 1.09, Q5_1 1.17, Q5_K 1.27, Q8_0 1.06, Q6_K
1.22. Float matrices keep their own bits: F32 (rows, cols) float32 goes to BLAS; F16 and BF16
(rows, cols) uint16 are widened in registers.

The products: ``y[i, r] = sum_g d[r,g] * sum_j c[r,g,j] x[i,g,j] + a[r,g] * s[i,g]`` with
``s[i, g] = sum_j x[i, g, j]`` (computed once per call) and ``a = m`` or ``-offset * d``. One
row of x (decode) runs a kernel that decodes and multiplies in one pass over four weight
rows; a few rows (a decode batch) and many rows (prefill, from ``GEMM_MIN_N``) go to
:mod:`ringllm.ops.jit_batch` (each weight decoded once to float32, then dots or BLAS sgemm).

Threads: every kernel is ``parallel=True`` over fixed blocks of ``ROW_BLOCK`` rows (numba's
OpenMP layer, which may be entered from several Python threads at once); a row's arithmetic
never depends on which thread or how many computed it, so results do not depend on the thread
count. Kernels release the GIL (``nogil``), so the asyncio loop runs beside them.
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType

from ringllm.paths import cache_dir as _ringllm_cache

# numba must pick a thread-safe layer before the first parallel kernel compiles: the default
# workqueue layer aborts when two Python threads (two peers in one test process, a pipelined
# prefill) enter parallel kernels at once. OpenMP (libgomp) is thread-safe and ships with gcc.
numba.config.THREADING_LAYER = "omp"
# Compiled kernels are cached on disk beside ringllm's models (not in site-packages, which may
# be read-only, and where files pip does not know outlive an uninstall); must be set before any
# decorator runs, so every module with kernels takes njit from here.
_CACHE = _ringllm_cache() / "numba"
numba.config.CACHE_DIR = str(_CACHE)
from numba import njit, prange  # noqa: E402

QT = GGMLQuantizationType
_F32 = np.float32

# Rows per unit of parallel work. Fixed, so a row's result is the same for any thread count.
ROW_BLOCK = 16  # a multiple of 4: a quad of interleaved rows never straddles two blocks
# With at least this many rows of x, dequantize to float32 and use BLAS sgemm (prefill);
# fewer go to jit_batch.gemm_batch. Measured (bench/batch.py, thread CPU time, one thread, ns
# per weight for all rows, batch kernel vs decode + sgemm): Q4_1 3072x576 n=16 0.63 vs 0.79,
# n=24 1.19 vs 1.28, n=32 1.16 vs 1.28; Q8_0 8192x576 n=32 1.27 vs 1.33 (docs/performance.md).
GEMM_MIN_N = 32
# Prefill dequantizes this many weights at a time before each sgemm.
GEMM_CHUNK_WEIGHTS = 1 << 18

_JIT = dict(nogil=True, cache=True, fastmath=True)
_JITP = dict(parallel=True, **_JIT)
# Dequantization must round like gguf (d*q, then + m): no fused multiply-add, so no fastmath.
_JIT_EXACT = dict(nogil=True, cache=True, parallel=True)

NIB4, NIB5, BYTE, Q6 = 0, 1, 2, 3
FORMAT = {QT.Q4_0: NIB4, QT.Q4_1: NIB4, QT.Q4_K: NIB4,
          QT.Q5_0: NIB5, QT.Q5_1: NIB5, QT.Q5_K: NIB5,
          QT.Q8_0: BYTE, QT.Q6_K: Q6}
FLOATS = (QT.F32, QT.F16, QT.BF16)


# ----------------------------------------------------------------------------- decoding
#
# ``_pair(fmt, qs, qh, r, g, j)`` gives the codes of values j and j + gs/2 of group g of row r
# as float32: ``lo`` as it is and ``hi`` times ``_HI[fmt]`` (16 for the nibble formats: the
# high nibble is read as ``b & 0xF0`` and x is scaled by 1/16 instead, exactly). Everything
# stays in 32-bit lanes: numba types a shift of int32 as int64, and the 64-bit lanes LLVM then
# used ran 2x slower (measured); bits of ``qh`` are masked with constants and scaled instead
# (a branch-free select per bit measured slower again for Q6_K). Every index is cast to
# unsigned (``_U``): numba wraps a signed index that may be negative (``i < 0 ? i + n : i``,
# per element), which turned jit_batch's vector loads of codes into byte-by-byte inserts; with
# unsigned indices its decode ran 0.40 -> 0.10 ns/weight (Q4_1, one thread, L1-resident panel)
# and the n = 8 product 0.55 -> 0.28 (docs/performance.md, "Unsigned indices"). gemv unchanged.

_I = np.int32
_U = np.uint64
# Masks for the high bits (applied to the low 16 bits of qh, or to qh >> 16, so the masked value
# is a small positive int32), and the powers of two that turn a masked field into its share of
# the code: exact in float32.
_B1 = np.array([1 << k for k in range(16)], np.int32)
_S1L = np.array([16.0 * 2.0 ** -k for k in range(16)], np.float32)
_S1H = np.array([256.0 * 2.0 ** -k for k in range(16)], np.float32)
_B2 = np.array([3 << 2 * k for k in range(8)], np.int32)
_S2L = np.array([16.0 * 2.0 ** (-2 * k) for k in range(8)], np.float32)
_S2H = np.array([256.0 * 2.0 ** (-2 * k) for k in range(8)], np.float32)
_HI = np.array([16.0, 16.0, 1.0, 16.0], np.float32)  # by format: NIB4, NIB5, BYTE, Q6


@njit(inline="always", **_JIT)
def _pair_nib4(qs, qh, r, g, j):
    b = _I(qs[_U(r >> 2), _U((g * 4 + (r & 3)) * 16 + j)])
    return _F32(b & _I(15)), _F32(b & _I(240))


@njit(inline="always", **_JIT)
def _pair_nib5(qs, qh, r, g, j):
    b = _I(qs[_U(r >> 2), _U((g * 4 + (r & 3)) * 16 + j)])
    h = _I(qh[_U(r >> 2), _U(g * 4 + (r & 3))])
    lo = _F32(b & _I(15)) + _F32(h & _B1[_U(j)]) * _S1L[_U(j)]  # bit j, as 0 or 16
    hi = _F32(b & _I(240)) + _F32((h >> _I(16)) & _B1[_U(j)]) * _S1H[_U(j)]  # bit 16 + j, as 0 or 256
    return lo, hi


@njit(inline="always", **_JIT)
def _pair_byte(qs, qh, r, g, j):
    k = (g * 4 + (r & 3)) * 32
    return _F32(_I(qs[_U(r >> 2), _U(k + j)])), _F32(_I(qs[_U(r >> 2), _U(k + 16 + j)]))


@njit(inline="always", **_JIT)
def _pair_q6(qs, qh, r, g, j):
    b = _I(qs[_U(r >> 2), _U((g * 4 + (r & 3)) * 8 + j)])
    h = _I(qh[_U(r >> 2), _U(g * 4 + (r & 3))])
    lo = _F32(b & _I(15)) + _F32(h & _B2[_U(j)]) * _S2L[_U(j)]  # bits 2j..2j+1, times 16
    hi = _F32(b & _I(240)) + _F32((h >> _I(16)) & _B2[_U(j)]) * _S2H[_U(j)]  # bits 16+2j.., times 256
    return lo, hi


@njit(inline="always", **_JIT)
def _pair(fmt, qs, qh, r, g, j):
    """The format is a plain argument, not a function passed in: numba cannot cache kernels
    that take functions, and typing one on every call cost more than the kernel (measured).
    Call it only with a literal ``fmt`` (see gemv's): with a runtime one, LLVM
    if-converts the four decoders into one loop that computes all of them (measured 2-3x
    slower)."""
    if fmt == NIB4:
        return _pair_nib4(qs, qh, r, g, j)
    if fmt == NIB5:
        return _pair_nib5(qs, qh, r, g, j)
    if fmt == BYTE:
        return _pair_byte(qs, qh, r, g, j)
    return _pair_q6(qs, qh, r, g, j)


# ----------------------------------------------------------------------------- products
#
# Four rows at a time share each load of x; a group's sum stays a register until it is
# scaled. Measured here (SmolLM2's 1536x576 Q4_1 matrix, one thread, hot cache): one row at a
# time 0.8-1.1 ns/weight, four at a time 0.2-0.45 (the box was loaded; same run).


@njit(inline="always", **_JIT)
def _quad_acc(fmt, half, qs, qh, d, m, has_m, off, x, xs, r, ra, rb, rc, acc):
    """Four weight rows times one row of x, for the one-row GEMV: each row's scaled products
    accumulate in ``half`` lanes (``acc``, (4, 16) scratch) across all groups and are summed once
    at the end, instead of a horizontal sum per group and row, which was 40% of the instructions
    of the kernel before it (its asm). Measured (one thread, thread CPU time, ns/weight, same run): Q4_0/Q4_1/Q4_K 0.115 ->
    0.091, Q8_0 0.105 -> 0.084, Q5_0 0.176 -> 0.162, Q6_K 0.244 -> 0.177. The scratch is made
    once per block of rows; a view of one per-thread buffer measured 4x slower (LLVM no longer
    vectorized)."""
    inv_hi = _F32(1) / _HI[fmt]
    b0 = b1 = b2 = b3 = _F32(0)
    acc[:] = 0
    for g in range(d.shape[1]):
        x0 = g * 2 * half
        d0, d1, d2, d3 = d[r, g], d[ra, g], d[rb, g], d[rc, g]
        for j in range(half):
            xl, xh = x[x0 + j], x[x0 + half + j] * inv_hi
            lo, hi = _pair(fmt, qs, qh, r, g, j)
            acc[0, j] += d0 * (lo * xl + hi * xh)
            lo, hi = _pair(fmt, qs, qh, ra, g, j)
            acc[1, j] += d1 * (lo * xl + hi * xh)
            lo, hi = _pair(fmt, qs, qh, rb, g, j)
            acc[2, j] += d2 * (lo * xl + hi * xh)
            lo, hi = _pair(fmt, qs, qh, rc, g, j)
            acc[3, j] += d3 * (lo * xl + hi * xh)
        xg = xs[g]
        if has_m:
            b0 += m[r, g] * xg
            b1 += m[ra, g] * xg
            b2 += m[rb, g] * xg
            b3 += m[rc, g] * xg
        else:
            xo = off * xg
            b0 -= d0 * xo
            b1 -= d1 * xo
            b2 -= d2 * xo
            b3 -= d3 * xo
    for j in range(half):
        b0 += acc[0, j]
        b1 += acc[1, j]
        b2 += acc[2, j]
        b3 += acc[3, j]
    return b0, b1, b2, b3


@njit(**_JITP)
def gemv(fmt, qs, qh, d, m, off, x, out):
    """One row of x: y[r] = sum_g scale(sum_j c[r, g, j] x[g, j]), four rows at a time. The
    group sums of x are taken here, once, before the threads split (a numpy call for them cost
    4-5 us of a 576x576 product's ~40)."""
    rows, G = d.shape
    has_m = m.shape[0] == rows
    gs = x.shape[0] // G
    xs = np.empty(G, _F32)
    for g in range(G):
        t = _F32(0)
        for j in range(gs):
            t += x[g * gs + j]
        xs[g] = t
    for blk in prange((rows + ROW_BLOCK - 1) // ROW_BLOCK):
        acc = np.empty((4, 16), _F32)
        r0 = blk * ROW_BLOCK
        r1 = min(rows, r0 + ROW_BLOCK)
        r = r0
        while r < r1:  # rows r..r+3, the last one repeated where fewer remain (not stored)
            ra, rb, rc = min(r + 1, r1 - 1), min(r + 2, r1 - 1), min(r + 3, r1 - 1)
            if fmt == NIB4:
                a0, a1, a2, a3 = _quad_acc(NIB4, 16, qs, qh, d, m, has_m, off, x, xs, r, ra, rb, rc, acc)
            elif fmt == NIB5:
                a0, a1, a2, a3 = _quad_acc(NIB5, 16, qs, qh, d, m, has_m, off, x, xs, r, ra, rb, rc, acc)
            elif fmt == BYTE:
                a0, a1, a2, a3 = _quad_acc(BYTE, 16, qs, qh, d, m, has_m, off, x, xs, r, ra, rb, rc, acc)
            else:
                a0, a1, a2, a3 = _quad_acc(Q6, 8, qs, qh, d, m, has_m, off, x, xs, r, ra, rb, rc, acc)
            out[r] = a0
            if r + 1 < r1:
                out[r + 1] = a1
            if r + 2 < r1:
                out[r + 2] = a2
            if r + 3 < r1:
                out[r + 3] = a3
            r += 4


@njit(inline="always", nogil=True, cache=True)
def _dequant_row(fmt, half, qs, qh, d, m, has_m, off, r, out, t):
    inv_hi = _F32(1) / _HI[fmt]
    for g in range(d.shape[1]):
        dg = d[r, g]
        x0 = g * 2 * half
        for j in range(half):
            lo, hi = _pair(fmt, qs, qh, r, g, j)
            hi *= inv_hi
            if has_m:
                out[t, x0 + j] = dg * lo + m[r, g]
                out[t, x0 + half + j] = dg * hi + m[r, g]
            else:
                out[t, x0 + j] = dg * (lo - off)
                out[t, x0 + half + j] = dg * (hi - off)


@njit(**_JIT_EXACT)
def dequant_rows(fmt, qs, qh, d, m, off, r0, out):
    """Rows [r0, r0 + len(out)) as float32, gguf's values bit for bit (d*(c-off), d*c + m)."""
    has_m = m.shape[0] == d.shape[0]
    for t in prange(out.shape[0]):
        r = r0 + t
        if fmt == NIB4:
            _dequant_row(NIB4, 16, qs, qh, d, m, has_m, off, r, out, t)
        elif fmt == NIB5:
            _dequant_row(NIB5, 16, qs, qh, d, m, has_m, off, r, out, t)
        elif fmt == BYTE:
            _dequant_row(BYTE, 16, qs, qh, d, m, has_m, off, r, out, t)
        else:
            _dequant_row(Q6, 8, qs, qh, d, m, has_m, off, r, out, t)


# F16 / BF16: widened in registers from their bits with exact power-of-two tables.
F16_POW = np.array([2.0 ** (max(e, 1) - 25) for e in range(32)], _F32)  # (1024 + m) * 2**(e-25)
BF16_POW = np.array([2.0 ** (max(e, 1) - 134) for e in range(256)], np.float64).astype(_F32)


@njit(inline="always", **_JIT)
def _half(h, kind, f16pow, bfpow):
    if kind == 0:  # F16: sign 1, exponent 5, mantissa 10
        e = (h >> 10) & 31
        mant = h & 1023
        v = _F32(mant + (1024 if e else 0)) * f16pow[e]
        return -v if h & 0x8000 else v
    e = (h >> 7) & 255  # BF16: sign 1, exponent 8, mantissa 7
    mant = h & 127
    v = _F32(mant + (128 if e else 0)) * bfpow[e]
    return -v if h & 0x8000 else v


@njit(**_JITP)
def gemm_half(kind, w16, x, out, f16pow, bfpow):
    rows, K = w16.shape
    n = x.shape[0]
    for blk in prange((rows + ROW_BLOCK - 1) // ROW_BLOCK):
        wf = np.empty(K, _F32)
        for r in range(blk * ROW_BLOCK, min(rows, blk * ROW_BLOCK + ROW_BLOCK)):
            for k in range(K):
                wf[k] = _half(w16[r, k], kind, f16pow, bfpow)
            for i in range(n):
                s = _F32(0)
                for k in range(K):
                    s += wf[k] * x[i, k]
                out[i, r] = s


@njit(**_JITP)
def widen_half(kind, w16, idx, out, f16pow, bfpow):
    for t in prange(idx.shape[0]):
        r = idx[t]
        for k in range(w16.shape[1]):
            out[t, k] = _half(w16[r, k], kind, f16pow, bfpow)


def cache_dir():
    return _CACHE


def _marker():
    import hashlib
    from pathlib import Path

    here = Path(__file__)
    src = hashlib.sha256(b"".join((here.with_name(name)).read_bytes()
                                  for name in ("jit.py", "jit_batch.py", "fused.py"))).hexdigest()[:16]
    return _CACHE / f"warm-{numba.__version__}-{src}"


def cache_is_warm() -> bool:
    """Whether this numba and this kernel source were compiled into the cache before."""
    return _marker().is_file()


def mark_warm() -> None:
    """Remember that this numba and this kernel source are compiled into the cache."""
    _CACHE.mkdir(parents=True, exist_ok=True)
    _marker().touch()
