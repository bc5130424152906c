"""Compiled (numba) versions of the per-token math of :mod:`ringllm.nn`, for the numba family.

:meth:`ringllm.ops.kernels.Kernels.nn` hands the model either :mod:`ringllm.nn` (the numpy
reference) or this module, which has the same names: the functions compiled here replace
several numpy calls (and their temporaries) by one; everything else is nn's own function.
Results agree with nn's to float32 rounding (sums run in another order).

Kept only where it paid (decode, SmolLM2, one thread; figures in docs/performance.md):
``rmsnorm``, ``rope`` and ``cached_attention`` for one query token per sequence. Prefill's
attention stays nn's (BLAS matmuls win on many rows). SwiGLU stays numpy's: numpy's float32
``exp`` is SIMD and the compiled one is a scalar libm call per value (measured slower).
"""

from __future__ import annotations

import math

import numpy as np

from ringllm import nn
from ringllm.nn import GATES, causal_mask, gelu_tanh_glu, rope_factors, softcap, softmax_attention, swiglu  # noqa: F401
from ringllm.ops.jit import njit  # jit.py configures numba (cache directory, threads) first

_F32 = np.float32
_JIT = dict(nogil=True, cache=True, fastmath=True)

# At most this many query rows per sequence (query heads x new tokens) go through the
# compiled attention; more (prefill) go to nn's BLAS matmuls, which win there.
ATTENTION_MAX_ROWS = 64


@njit(**_JIT)
def _rmsnorm(x, w, eps, out):
    n, d = x.shape
    for i in range(n):
        s = _F32(0)
        for k in range(d):
            s += x[i, k] * x[i, k]
        inv = _F32(1) / math.sqrt(s / _F32(d) + eps)
        for k in range(d):
            out[i, k] = x[i, k] * inv * w[k]


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """As :func:`ringllm.nn.rmsnorm`: x (..., d) * rsqrt(mean(x^2) + eps) * weight (d,)."""
    d = x.shape[-1]
    x2 = np.ascontiguousarray(x, dtype=_F32).reshape(-1, d)
    out = np.empty_like(x2)
    _rmsnorm(x2, weight, _F32(eps), out)
    return out.reshape(x.shape)


@njit(**_JIT)
def _rope(x, c, s, neox, out):
    n, heads, hd = x.shape
    half = c.shape[1]
    for i in range(n):
        for h in range(heads):
            for k in range(hd):
                out[i, h, k] = x[i, h, k]
            if neox:
                for j in range(half):
                    a, b = x[i, h, j], x[i, h, half + j]
                    out[i, h, j] = a * c[i, j] - b * s[i, j]
                    out[i, h, half + j] = a * s[i, j] + b * c[i, j]
            else:
                for j in range(half):
                    a, b = x[i, h, 2 * j], x[i, h, 2 * j + 1]
                    out[i, h, 2 * j] = a * c[i, j] - b * s[i, j]
                    out[i, h, 2 * j + 1] = a * s[i, j] + b * c[i, j]


def rope(x: np.ndarray, factors: np.ndarray, neox: bool) -> np.ndarray:
    """As :func:`ringllm.nn.rope`: x (n, heads, head_dim) rotated by ``factors`` (n, rope_dim/2)
    complex64; returns a new array."""
    out = np.empty(x.shape, _F32)
    _rope(x, np.ascontiguousarray(factors.real), np.ascontiguousarray(factors.imag), bool(neox), out)
    return out


@njit(**_JIT)
def _attention(q, k, v, L, mask, has_mask, out):
    """softmax(q k[:, :L]^T + mask) v[:, :L] per KV head: q (g, r, d), k/v (g, cap, d)."""
    g, r, d = q.shape
    p = np.empty(L, _F32)
    for h in range(g):
        for i in range(r):
            best = -np.inf
            for t in range(L):
                sc = _F32(0)
                for e in range(d):
                    sc += q[h, i, e] * k[h, t, e]
                if has_mask:
                    sc += mask[i, t]
                p[t] = sc
                best = max(best, sc)
            tot = _F32(0)
            for t in range(L):
                p[t] = math.exp(p[t] - best)
                tot += p[t]
            inv = _F32(1) / tot
            o = out[h, i]  # 1-D views: the loop over e then vectorizes (measured 2x)
            o[:] = 0
            for t in range(L):
                w = p[t] * inv
                vt = v[h, t]
                for e in range(d):
                    o[e] += w * vt[e]


_NO_MASK = np.zeros((0, 0), _F32)


def cached_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, length: int,
                     mask: np.ndarray | None) -> np.ndarray:
    """As :func:`ringllm.nn.cached_attention`; compiled for up to ATTENTION_MAX_ROWS rows."""
    if q.shape[1] > ATTENTION_MAX_ROWS:
        return nn.cached_attention(q, k_cache, v_cache, length, mask)
    out = np.empty(q.shape, _F32)
    _attention(np.ascontiguousarray(q, dtype=_F32), k_cache, v_cache, length,
               _NO_MASK if mask is None else mask, mask is not None, out)
    return out


def warm_up() -> None:
    """Compile (or load from the on-disk cache) every kernel here once, on tiny inputs."""
    x = np.ones((2, 2, 8), _F32)
    rmsnorm(x, np.ones(8, _F32), 1e-5)
    f = rope_factors(np.arange(2), 8, 10000.0)
    rope(x, f, True)
    rope(x, f, False)
    cached_attention(x, x, x, 2, None)
    cached_attention(x, x, x, 2, np.zeros((2, 2), _F32))
