"""The forward pass's math (ringllm.nn) against direct formulas, and the gemma3 layer facts."""

from __future__ import annotations

import math

import numpy as np

from ringllm import nn
from ringllm.model_file import ARCHITECTURES, ModelConfig


def test_causal_mask_with_sliding_window():
    """A query at p sees keys k with k <= p and p - k < window (llama.cpp's standard SWA)."""
    m = nn.causal_mask(start=3, count=4, repeat=2, window=3)  # queries at 3..6, twice
    assert m.shape == (8, 7)
    for row, p in enumerate([3, 4, 5, 6] * 2):
        seen = [k for k in range(7) if m[row, k] == 0]
        assert seen == [k for k in range(7) if k <= p and p - k < 3]
    assert nn.causal_mask(9, 1, 4) is None  # one query without a window sees every key
    decode = nn.causal_mask(9, 1, 1, window=4)  # ... but a window hides the early ones
    assert [k for k in range(10) if decode[0, k] == 0] == [6, 7, 8, 9]


def test_rope_styles_rotate_the_documented_pairs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 8)).astype(np.float32)
    pos = np.array([0, 5, 17])
    f = nn.rope_factors(pos, 8, 10000.0)
    ang = pos[:, None] * 10000.0 ** (-np.arange(0, 8, 2) / 8)  # (3, 4)
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., 0::2], x[..., 1::2]  # NORM: (x[2j], x[2j+1])
    norm = nn.rope(x, f, neox=False)
    np.testing.assert_allclose(norm[..., 0::2], a * c - b * s, atol=1e-5)
    np.testing.assert_allclose(norm[..., 1::2], a * s + b * c, atol=1e-5)
    a, b = x[..., :4], x[..., 4:]  # NEOX: (x[j], x[j+4])
    neox = nn.rope(x, f, neox=True)
    np.testing.assert_allclose(neox[..., :4], a * c - b * s, atol=1e-5)
    np.testing.assert_allclose(neox[..., 4:], a * s + b * c, atol=1e-5)


def test_gates():
    g = np.linspace(-6, 6, 25, dtype=np.float32)
    up = np.full_like(g, 2.0)
    gelu = [0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))) * 2 for v in g.tolist()]
    np.testing.assert_allclose(nn.gelu_tanh_glu(g, up), gelu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nn.swiglu(g, up), [v / (1 + math.exp(-v)) * 2 for v in g.tolist()], rtol=1e-5, atol=1e-6)


def test_gemma3_layers_every_sixth_global():
    c = ModelConfig(name="g", architecture="gemma3", n_layers=18, dim=640, n_heads=4, n_kv_heads=1, head_dim=256,
                    ffn_dim=2048, vocab_size=10, context_length=32768, rope_theta=1e6, rope_dim=256, rms_eps=1e-6,
                    tied_embeddings=True, arch=ARCHITECTURES["gemma3"], sliding_window=512)
    assert [i for i in range(18) if not c.is_local(i)] == [5, 11, 17]
    assert c.layer_rope_theta(0) == 10000.0 and c.layer_rope_theta(5) == 1e6
    assert c.query_scale == 1 / 16
