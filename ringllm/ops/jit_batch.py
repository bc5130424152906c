"""Compiled kernels for a few rows of x at once (a decode batch) and fast dequantization.

The one-row kernels (:mod:`ringllm.ops.jit`) sum each group of codes, scale it, and reduce the
vector lanes to one number per group: right for one row of x, where a weight is touched once.
For n rows, each weight is used n times, so it pays to decode it once into float32 and then
run plain dot products whose vector sums are reduced once per whole row:

1. dequantize ``PANEL`` weight rows into a float32 scratch (``w = d*c + m`` or
   ``d*(c - off)``, computed with fastmath: a multiply-add may round once instead of twice,
   so a weight can differ from gguf's in the last bit, which stays within the products'
   float32 tolerance; :func:`ringllm.ops.jit.dequant_rows` stays the exact one);
2. dot every pair of those rows with every four rows of x (eight sums live in vector
   registers; each weight load is shared by four rows of x, each x load by two weight rows).

A decoded row is in the matrix's own column order, so x goes in as it is. (An earlier
version wrote every group's first ``half`` values, then every group's second, and reordered
x to match on every call; with the unsigned indices of ``jit._pair`` the natural order
vectorizes as well, and the copy of x is gone: docs/performance.md, "Unsigned indices".)
Prefill uses the same decode (:func:`decode_rows`) for blocks of rows, then BLAS sgemm.

Scratch per parallel block: ``PANEL * cols`` floats (24 KiB at cols 1536: L1-sized).
Threads split fixed blocks of ``jit.ROW_BLOCK`` rows, so results never depend on the thread
count; a row of out depends only on its row of x and on which of the 4-row (or leftover)
paths that row took.
"""

from __future__ import annotations

import numpy as np

from ringllm.ops import jit
from ringllm.ops.jit import BYTE, NIB4, NIB5, Q6, njit, prange

_F32 = np.float32
_U = np.uint64
_JIT = dict(nogil=True, cache=True, fastmath=True)
_JITP = dict(parallel=True, **_JIT)

# Weight rows dequantized at a time, then dotted with every row of x.
PANEL = 4


@njit(inline="always", **_JIT)
def _decode_row(fmt, half, qs, qh, d, m, has_m, off, r, w):
    """Row r of the codes as float32 (fastmath: see the module doc) into ``w`` (cols,), in
    the matrix's own column order. ``half`` is a runtime value here on purpose: with a
    literal, LLVM unrolls the group's loop fully and then cannot vectorize it (the stores
    might alias the codes); as a loop it vectorizes with a runtime alias check (measured 2-5x
    faster). Indices are unsigned for the reason given in jit (``_U``)."""
    inv_hi = _F32(1) / jit._HI[fmt]
    for g in range(d.shape[1]):
        dg = d[r, g]
        dh = dg * inv_hi
        mg = m[r, g] if has_m else -off * dg
        x0 = _U(g * 2 * half)
        for j in range(half):
            cl, ch = jit._pair(fmt, qs, qh, r, g, j)
            w[x0 + _U(j)] = dg * cl + mg
            w[x0 + _U(half + j)] = dh * ch + mg


@njit(inline="always", **_JIT)
def _decode_rows(fmt, half, qs, qh, d, m, has_m, off, r0, k, w):
    for t in range(k):
        if fmt == NIB4:
            _decode_row(NIB4, half, qs, qh, d, m, has_m, off, r0 + t, w[t])
        elif fmt == NIB5:
            _decode_row(NIB5, half, qs, qh, d, m, has_m, off, r0 + t, w[t])
        elif fmt == BYTE:
            _decode_row(BYTE, half, qs, qh, d, m, has_m, off, r0 + t, w[t])
        else:
            _decode_row(Q6, half, qs, qh, d, m, has_m, off, r0 + t, w[t])


@njit(inline="always", **_JIT)
def _dots_2x4(w, a, b, x, i, out, r):
    """out[i..i+3, r], out[i..i+3, r+1] = x[i..i+3] . w[a], w[b] (b == a for a lone row)."""
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = _F32(0)
    for k in range(w.shape[1]):
        wa, wb = w[a, k], w[b, k]
        x0, x1, x2, x3 = x[i, k], x[i + 1, k], x[i + 2, k], x[i + 3, k]
        s00 += wa * x0
        s01 += wa * x1
        s02 += wa * x2
        s03 += wa * x3
        s10 += wb * x0
        s11 += wb * x1
        s12 += wb * x2
        s13 += wb * x3
    out[i, r], out[i + 1, r], out[i + 2, r], out[i + 3, r] = s00, s01, s02, s03
    if b != a:
        out[i, r + 1], out[i + 1, r + 1], out[i + 2, r + 1], out[i + 3, r + 1] = s10, s11, s12, s13


@njit(inline="always", **_JIT)
def _dots_2x1(w, a, b, x, i, out, r):
    s0 = s1 = _F32(0)
    for k in range(w.shape[1]):
        xi = x[i, k]
        s0 += w[a, k] * xi
        s1 += w[b, k] * xi
    out[i, r] = s0
    if b != a:
        out[i, r + 1] = s1


@njit(**_JITP)
def gemm_batch(fmt, half, qs, qh, d, m, off, x, out):
    """out (n, rows) = x (n, cols) @ W.T for a few rows of x: see the module doc."""
    rows = d.shape[0]
    n, K = x.shape
    has_m = m.shape[0] == rows
    n4 = n - n % 4
    for blk in prange((rows + jit.ROW_BLOCK - 1) // jit.ROW_BLOCK):
        w = np.empty((PANEL, K), _F32)
        r1 = min(rows, blk * jit.ROW_BLOCK + jit.ROW_BLOCK)
        for r0 in range(blk * jit.ROW_BLOCK, r1, PANEL):
            k = min(PANEL, r1 - r0)
            _decode_rows(fmt, half, qs, qh, d, m, has_m, off, r0, k, w)
            for t in range(0, k, 2):
                b = min(t + 1, k - 1)
                for i in range(0, n4, 4):
                    _dots_2x4(w, t, b, x, i, out, r0 + t)
                for i in range(n4, n):
                    _dots_2x1(w, t, b, x, i, out, r0 + t)


@njit(**_JITP)
def decode_rows(fmt, half, qs, qh, d, m, off, r0, out):
    """Rows [r0, r0 + len(out)) as float32 (fastmath, see the module doc): the fast
    dequantization before prefill's sgemm."""
    has_m = m.shape[0] == d.shape[0]
    nb = (out.shape[0] + jit.ROW_BLOCK - 1) // jit.ROW_BLOCK
    for blk in prange(nb):
        t0 = blk * jit.ROW_BLOCK
        k = min(jit.ROW_BLOCK, out.shape[0] - t0)
        _decode_rows(fmt, half, qs, qh, d, m, has_m, off, r0 + t0, k, out[t0:t0 + k])
