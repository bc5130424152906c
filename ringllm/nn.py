"""The elementwise and attention math of the forward pass, as small pure numpy functions.

Everything here is float32 in, float32 out, with no state but what a caller passes in, so a
compiled version of any one function can be swapped in without touching the model. The
quantized matrix products live in :mod:`ringllm.ops.quant`, not here.
"""

from __future__ import annotations

import numpy as np

_F32 = np.float32
_GELU_C = np.float32(np.sqrt(2.0 / np.pi))


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (..., d) * rsqrt(mean(x^2) + eps) * weight (d,), over the last axis."""
    if x.ndim == 2 and x.shape[0] == 1:  # decode: one BLAS dot and two multiplies
        v = x[0]
        inv = _F32(1.0) / np.sqrt(np.dot(v, v) / _F32(v.size) + _F32(eps))
        return x * (weight * inv)
    ms = np.einsum("...i,...i->...", x, x)
    ms *= _F32(1.0 / x.shape[-1])
    ms += _F32(eps)
    np.sqrt(ms, out=ms)
    return (x / ms[..., None]) * weight


def rope_factors(positions: np.ndarray, rope_dim: int, theta: float, scale: float = 1.0) -> np.ndarray:
    """e^(i * pos/scale * theta^(-2j/rope_dim)) for j < rope_dim/2: (n, rope_dim/2) complex64.

    Angles are computed in float64 and rounded once, per forward, for the positions at hand
    (a table of every position would cost 8 MB per base at 32k context and 128-wide heads).
    """
    inv_freq = theta ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    ang = (positions.astype(np.float64) / scale)[:, None] * inv_freq[None, :]
    return np.exp(1j * ang).astype(np.complex64)


def rope(x: np.ndarray, factors: np.ndarray, neox: bool) -> np.ndarray:
    """Rotate x (n, heads, head_dim) by ``factors`` (n, rope_dim/2); returns a new array.

    NORM style (GGML's default, llama): adjacent pairs (x[2j], x[2j+1]) rotate together.
    NEOX style (qwen2, qwen3, gemma3): x[j] pairs with x[j + rope_dim/2]. Dimensions past
    rope_dim pass through unrotated.
    """
    half = factors.shape[1]
    out = np.array(x, dtype=_F32, order="C")
    if not neox:
        z = out[..., : 2 * half].view(np.complex64)  # (n, heads, half): pairs as complex
        z *= factors[:, None, :]
        return out
    z = out[..., :half] + 1j * out[..., half : 2 * half]
    z = z.astype(np.complex64) * factors[:, None, :]
    out[..., :half] = z.real
    out[..., half : 2 * half] = z.imag
    return out


def causal_mask(start: int, count: int, repeat: int, window: int = 0) -> np.ndarray | None:
    """Additive mask (repeat * count, start + count) for queries at positions start..start+count-1
    (the block of ``count`` rows repeated ``repeat`` times): a query at p sees keys 0..p, and with
    a sliding ``window`` only the last ``window`` of them (p - key < window). None when no key
    is hidden from any query (one query and no window cut)."""
    L = start + count
    if count <= 1 and not (window and L > window):
        return None
    qpos = np.tile(np.arange(start, L), repeat)[:, None]
    kpos = np.arange(L)[None, :]
    hidden = kpos > qpos
    if window:
        hidden |= qpos - kpos >= window
    return np.where(hidden, _F32(-np.inf), _F32(0))


def softmax_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """softmax(q k^T + mask) v per KV head: q (g, r, d), k/v (g, L, d) -> (g, r, d).

    q is already scaled; ``mask`` (r, L) is added to every head's scores.
    """
    scores = np.matmul(q, k.transpose(0, 2, 1))  # (g, r, L)
    if mask is not None:
        scores += mask
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return np.matmul(scores, v)


def cached_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, length: int,
                     mask: np.ndarray | None) -> np.ndarray:
    """:func:`softmax_attention` of q (g, r, d) against the first ``length`` positions of a
    sequence's cache, k/v (g, capacity, d)."""
    return softmax_attention(q, k_cache[:, :length], v_cache[:, :length], mask)


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up = gate / (1 + e^-gate) * up (a new array; the inputs are kept)."""
    act = np.negative(gate)
    np.exp(act, out=act)
    act += _F32(1.0)
    np.divide(gate, act, out=act)
    act *= up
    return act


def gelu_tanh_glu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gelu(gate) * up with GELU's tanh approximation:
    0.5 * g * (1 + tanh(sqrt(2/pi) * (g + 0.044715 * g^3))) * up."""
    t = gate * gate
    t *= _F32(0.044715)
    t += _F32(1.0)
    t *= gate
    t *= _GELU_C
    np.tanh(t, out=t)
    t += _F32(1.0)
    t *= gate
    t *= _F32(0.5)
    t *= up
    return t


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """cap * tanh(x / cap)."""
    return np.tanh(x / _F32(cap)) * _F32(cap)


GATES = {"silu": swiglu, "gelu_tanh": gelu_tanh_glu}
