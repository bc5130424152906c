"""qwen3 on a small synthetic GGUF (no real file is available here), against an independent
float64 reference written from transformers' modeling_qwen3.py, alone and split over 2..4
peers (issue: models).

The reference below shares no code with ringllm: it reads the file with gguf's own reader and
dequantizer and follows the transformers formulation (rotate_half RoPE, per-head q/k RMSNorm
before RoPE, SwiGLU, tied output).
"""

from __future__ import annotations

import threading

import gguf
import numpy as np
import pytest

from ringllm import runtime
from ringllm.model import Segment, Transformer
from ringllm.model_file import ModelFile
from ringllm.shard.loader import load_shard
from tests.synth import write_tiny_model

N_HEADS, N_KV, HEAD_DIM, DIM = 4, 2, 32, 64  # attention width 128 != dim, as in Qwen3


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("qwen3") / "qwen3.gguf", arch="qwen3", dim=DIM,
                            n_heads=N_HEADS, n_kv_heads=N_KV, head_dim=HEAD_DIM, ffn_dim=128, n_layers=2)


def reference_logits(path, ids: list[int]) -> np.ndarray:
    """Logits (len(ids), vocab) of every position, float64."""
    r = gguf.GGUFReader(str(path))
    W = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(
        [int(d) for d in reversed(t.shape)]) for t in r.tensors}
    eps, theta = 1e-5, 10000.0

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rotate_half(x):
        return np.concatenate([-x[..., HEAD_DIM // 2:], x[..., : HEAD_DIM // 2]], -1)

    n = len(ids)
    inv = 1.0 / theta ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    freqs = np.arange(n)[:, None] * inv[None, :]
    emb = np.concatenate([freqs, freqs], -1)[:, None, :]  # (n, 1, hd)
    cos, sin = np.cos(emb), np.sin(emb)
    x = W["token_embd.weight"][ids]
    for i in range(2):
        b = lambda name: W[f"blk.{i}.{name}.weight"]  # noqa: E731
        h = norm(x, b("attn_norm"))
        q = norm((h @ b("attn_q").T).reshape(n, N_HEADS, HEAD_DIM), b("attn_q_norm"))
        k = norm((h @ b("attn_k").T).reshape(n, N_KV, HEAD_DIM), b("attn_k_norm"))
        v = (h @ b("attn_v").T).reshape(n, N_KV, HEAD_DIM)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, N_HEADS // N_KV, axis=1), np.repeat(v, N_HEADS // N_KV, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(HEAD_DIM)
        s = np.where(np.triu(np.ones((n, n), bool), 1), -np.inf, s)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", p, v).reshape(n, -1) @ b("attn_output").T
        h = norm(x, b("ffn_norm"))
        g = h @ b("ffn_gate").T
        x = x + ((g / (1 + np.exp(-g))) * (h @ b("ffn_up").T)) @ b("ffn_down").T
    return norm(x, W["output_norm.weight"]) @ W["token_embd.weight"].T


IDS = [5, 70, 33, 201, 9, 150, 77, 12, 260, 3, 44]


def test_config_reads_qwen3(qwen3_path):
    c = ModelFile(qwen3_path).config
    assert (c.architecture, c.head_dim, c.n_heads, c.n_kv_heads) == ("qwen3", HEAD_DIM, N_HEADS, N_KV)
    assert c.arch.qk_norm and c.arch.rope_neox and not c.arch.qkv_bias


def test_qwen3_alone_matches_reference(qwen3_path):
    """Prefill then decode: each step's logits within 1e-3 of the float64 reference."""
    info, mf = runtime.open_model(str(qwen3_path))
    model = runtime.load_model(mf, runtime.make_plan(info, [1.0]), 0)
    ref = reference_logits(qwen3_path, IDS)
    cache = model.new_cache()
    got = [model.forward([Segment(cache, np.array(IDS[:6]))])[0]]
    got += [model.forward([Segment(cache, np.array([t]))])[0] for t in IDS[6:]]
    np.testing.assert_allclose(np.array(got), ref[5:], rtol=0, atol=1e-3)


def split_forward(path, peers: int, ids: list[int]) -> np.ndarray:
    """The last-token logits of ``peers`` shards run in threads, summing partials in rank order
    at a barrier (the ring's all-reduce without the ring), gathered over the vocabulary."""
    info, mf = runtime.open_model(str(path))
    plan = runtime.make_plan(info, [1.0] * peers)
    barrier, slots = threading.Barrier(peers), [None] * peers

    def allreduce_of(rank):
        def allreduce(x):
            slots[rank] = x
            barrier.wait()
            total = sum(slots[1:], slots[0].copy())
            barrier.wait()
            return total
        return allreduce

    models = [Transformer(load_shard(mf, plan[r]), allreduce_of(r)) for r in range(peers)]
    outs = [None] * peers

    def run(r):
        outs[r] = models[r].forward([Segment(models[r].new_cache(), np.array(ids))])[0]

    threads = [threading.Thread(target=run, args=(r,)) for r in range(peers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return np.concatenate(outs)


@pytest.mark.parametrize("peers", [2, 3, 4])
def test_qwen3_split_equals_reference(qwen3_path, peers):
    """At P=3 and 4 a KV group (2 query heads) is cut: both peers hold its KV head."""
    plan = runtime.make_plan(runtime.open_model(str(qwen3_path))[0], [1.0] * peers)
    assert sum(s.n_kv_heads for s in plan.shards) > N_KV or peers == 2
    got = split_forward(qwen3_path, peers, IDS)
    np.testing.assert_allclose(got, reference_logits(qwen3_path, IDS)[-1], rtol=0, atol=1e-3)
