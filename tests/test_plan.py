from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from ringllm.errors import ConfigError
from ringllm.model_file import ModelConfig
from ringllm.shard.plan import apportion, plan_shards

SMOL = ModelConfig(name="smol", architecture="llama", n_layers=30, dim=576, n_heads=9, n_kv_heads=3, head_dim=64,
                   ffn_dim=1536, vocab_size=49152, context_length=8192, rope_theta=1e5, rope_dim=64, rms_eps=1e-5,
                   tied_embeddings=True)


@given(total=st.integers(0, 5000), weights=st.lists(st.floats(0.01, 100), min_size=1, max_size=8))
def test_apportion_covers_contiguously_and_proportionally(total, weights):
    ranges = apportion(total, weights)
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    s = sum(weights)
    for (lo, hi), w in zip(ranges, weights):
        assert abs((hi - lo) - total * w / s) < 1.0 + 1e-9  # within one unit of the exact share


def test_apportion_rejects_bad_weights():
    with pytest.raises(ConfigError, match="positive"):
        apportion(10, [1.0, 0.0])


def test_smollm2_splits_query_heads_and_shares_cut_kv_groups():
    p2 = plan_shards(SMOL, [1, 1])
    assert [s.heads for s in p2.shards] == [(0, 5), (5, 9)]
    assert [s.kv_heads for s in p2.shards] == [(0, 2), (1, 3)]  # KV head 1 serves both
    assert [s.q_offset for s in p2.shards] == [0, 2]
    p4 = plan_shards(SMOL, [1, 1, 1, 1])
    assert [s.n_heads for s in p4.shards] == [3, 2, 2, 2]  # every peer has attention
    assert [s.kv_heads for s in p4.shards] == [(0, 1), (1, 2), (1, 3), (2, 3)]
    p12 = plan_shards(SMOL, [1] * 12)  # more peers than query heads: some own none
    assert sum(s.n_heads for s in p12.shards) == 9
    assert all(s.n_kv_heads == 0 for s in p12.shards if s.n_heads == 0)
    assert all(s.ffn[1] > s.ffn[0] for s in p12.shards)


@given(weights=st.lists(st.floats(0.1, 10), min_size=1, max_size=12))
def test_every_query_head_is_owned_once_with_its_kv_head(weights):
    plan = plan_shards(SMOL, weights)
    owners = [s.rank for s in plan.shards for _ in range(s.n_heads)]
    assert len(owners) == SMOL.n_heads and owners == sorted(owners)
    for s in plan.shards:
        for h in range(*s.heads):
            assert s.kv_heads[0] <= h // SMOL.q_per_kv < s.kv_heads[1]
        assert 0 <= s.q_offset < SMOL.q_per_kv or s.n_heads == 0


@given(weights=st.lists(st.floats(0.1, 10), min_size=1, max_size=6), block=st.sampled_from([32, 256]))
def test_ffn_cut_on_block_boundaries_and_vocab_covered(weights, block):
    plan = plan_shards(SMOL, weights, block)
    assert all(s.ffn[0] % block == 0 and s.ffn[1] % block == 0 for s in plan.shards)
    assert plan.shards[-1].ffn[1] == SMOL.ffn_dim and plan.shards[-1].vocab[1] == SMOL.vocab_size


def test_plan_is_pure_and_digest_tracks_it():
    assert plan_shards(SMOL, [1, 2]).digest() == plan_shards(SMOL, [1, 2]).digest()
    assert plan_shards(SMOL, [1, 2]).digest() != plan_shards(SMOL, [2, 1]).digest()


def test_capacity_weights_shift_work():
    plan = plan_shards(SMOL, [3, 1])
    a, b = plan.shards
    assert a.ffn[1] - a.ffn[0] == 3 * (b.ffn[1] - b.ffn[0])
