"""ringllm.ops.fused (the compiled per-token math) against float64 formulas written here and
against ringllm.nn (the numpy reference): both within 1e-5 relative of the float64 result,
hence of each other."""

from __future__ import annotations

import numpy as np
import pytest

from ringllm import nn
from ringllm.ops import fused
from ringllm.ops.kernels import Kernels

F64 = np.float64


def _close(got, ref, scale):
    """|got - ref| <= 1e-5 * scale elementwise (scale: the magnitude the sums are made of)."""
    err = np.abs(got.astype(F64) - ref)
    assert np.all(err <= 1e-5 * scale + 1e-30), f"max err/scale {np.max(err / scale):.3g}"


@pytest.mark.parametrize("shape", [(1, 576), (8, 576), (3, 4, 64)])
def test_rmsnorm(shape):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    x64 = x.astype(F64)
    ref = x64 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + 1e-5) * w
    scale = np.abs(ref) + 1e-6
    for f in (fused.rmsnorm, nn.rmsnorm):
        got = f(x, w, 1e-5)
        assert got.shape == x.shape and got.dtype == np.float32
        _close(got, ref, scale)


def test_rmsnorm_of_a_strided_view():
    """q and k are column slices of the q|k|v product: not contiguous."""
    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((5, 3 * 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    q = qkv[:, 64:128].reshape(5, 1, 64)
    _close(fused.rmsnorm(q, w, 1e-6), nn.rmsnorm(q, w, 1e-6).astype(F64), np.abs(nn.rmsnorm(q, w, 1e-6)) + 1e-6)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("rope_dim", [64, 32])  # 32: half the head rotates, the rest passes
def test_rope(neox, rope_dim):
    rng = np.random.default_rng(rope_dim + neox)
    n, heads, hd = 3, 4, 64
    x = rng.standard_normal((n, heads, hd)).astype(np.float32)
    pos = np.array([0, 7, 300])
    f = nn.rope_factors(pos, rope_dim, 10000.0)
    ang = pos[:, None].astype(F64) * 10000.0 ** (-np.arange(0, rope_dim, 2) / rope_dim)[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    ref = x.astype(F64).copy()
    half = rope_dim // 2
    if neox:
        a, b = x[..., :half].astype(F64), x[..., half:rope_dim].astype(F64)
        ref[..., :half], ref[..., half:rope_dim] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., 0:rope_dim:2].astype(F64), x[..., 1:rope_dim:2].astype(F64)
        ref[..., 0:rope_dim:2], ref[..., 1:rope_dim:2] = a * c - b * s, a * s + b * c
    # the factors are complex64: their rounding (~6e-8 relative) is the same for both families
    scale = np.abs(x).max(axis=-1, keepdims=True) * 2
    for fn in (fused.rope, nn.rope):
        got = fn(x, f, neox)
        assert got.shape == x.shape
        _close(got, ref, scale)


@pytest.mark.parametrize("r, L, masked", [(3, 1, False), (3, 70, False), (9, 130, True), (64, 40, True)])
def test_cached_attention(r, L, masked):
    rng = np.random.default_rng(r * L)
    g, d, cap = 3, 64, 256
    q = (rng.standard_normal((g, r, d)) * 0.3).astype(np.float32)
    k = rng.standard_normal((g, cap, d)).astype(np.float32)
    v = rng.standard_normal((g, cap, d)).astype(np.float32)
    k[:, L:] = np.nan  # past the length: must not be read
    v[:, L:] = np.nan
    mask = None
    if masked:
        mask = np.where(rng.random((r, L)) < 0.3, np.float32(-np.inf), np.float32(0))
        mask[:, 0] = 0  # every query sees a key
    s = np.einsum("grd,gld->grl", q.astype(F64), k[:, :L].astype(F64))
    if mask is not None:
        s = s + mask
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    ref = np.einsum("grl,gld->grd", p, v[:, :L].astype(F64))
    scale = np.einsum("grl,gld->grd", p, np.abs(v[:, :L].astype(F64))) + 1e-6
    for fn in (fused.cached_attention, nn.cached_attention):
        got = fn(q, k, v, L, mask)
        assert got.shape == (g, r, 64)
        _close(got, ref, scale * 10)  # scores of |q.k| ~ 5 put ~5e-7 of rounding into exp


def test_prefill_rows_go_to_numpy(monkeypatch):
    calls = []
    monkeypatch.setattr(nn, "cached_attention", lambda *a: calls.append(a[0].shape) or np.zeros(a[0].shape, np.float32))
    q = np.zeros((1, fused.ATTENTION_MAX_ROWS + 1, 8), np.float32)
    kv = np.zeros((1, 4, 8), np.float32)
    fused.cached_attention(q, kv, kv, 4, None)
    fused.cached_attention(q[:, :3], kv, kv, 4, None)
    assert calls == [q.shape]


def test_families_pick_their_math():
    assert Kernels("numba", 1).nn is fused
    assert Kernels("numpy", 1).nn is nn
    for name in ("rmsnorm", "rope", "rope_factors", "causal_mask", "cached_attention", "GATES", "softcap"):
        assert hasattr(fused, name) and hasattr(nn, name)
