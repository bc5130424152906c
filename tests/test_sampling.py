"""The sampling rule gives the same token on every peer, and the same as one peer would."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ringllm.errors import RequestError
from ringllm.sampling import SamplingParams, choose, _gumbel
from ringllm.shard.plan import apportion


class ThreadGather:
    """An all-gather among P threads (a stand-in for the ring's collective)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list = [None] * size
        self.barrier = threading.Barrier(size)

    def for_rank(self, rank: int):
        def gather(obj):
            self.barrier.wait()
            self.slots[rank] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()
            return out
        return gather


def on_peers(vocab, weights, fn):
    """Run ``fn(lo, hi, gather)`` for each peer's vocabulary slice, one thread per peer."""
    ranges = apportion(vocab, weights)
    g = ThreadGather(len(ranges))
    results = [None] * len(ranges)

    def run(rank):
        results[rank] = fn(*ranges[rank], g.for_rank(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(ranges))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def sharded_choose(logits, weights, params, step, history):
    return on_peers(len(logits), weights,
                    lambda lo, hi, g: choose(logits[lo:hi], lo, params, step, history, g))


params_st = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.5, 1.0, 1.7]),
    top_k=st.sampled_from([0, 1, 5, 40]),
    top_p=st.sampled_from([1.0, 0.9, 0.5]),
    min_p=st.sampled_from([0.0, 0.05, 0.3]),
    repeat_penalty=st.sampled_from([1.0, 1.3]),
    seed=st.integers(0, 2**40),
    top_logprobs=st.integers(0, 5),
)


@settings(max_examples=60, deadline=None)
@given(params=params_st, weights=st.lists(st.floats(0.5, 3), min_size=1, max_size=5),
       step=st.integers(0, 1000), data=st.data())
def test_split_vocab_picks_what_one_peer_picks(params, weights, step, data):
    vocab = data.draw(st.integers(len(weights) * 2, 600))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    logits = (rng.standard_normal(vocab) * 3).astype(np.float32)
    history = list(rng.integers(0, vocab, 10))
    single = choose(logits, 0, params, step, history)
    shards = sharded_choose(logits, weights, params, step, history)
    for c in shards:
        assert c.token == single.token
        assert c.logprob == pytest.approx(single.logprob, abs=1e-5)
        assert [i for i, _ in c.top_logprobs] == [i for i, _ in single.top_logprobs]


def test_greedy_is_argmax_lowest_id_on_ties():
    logits = np.array([1.0, 3.0, 3.0, 2.0], np.float32)
    assert choose(logits, 0, SamplingParams(temperature=0), 0, []).token == 1


def test_temperature_sampling_follows_the_distribution():
    """Gumbel-max with Philox noise samples softmax(logits / T): a chi-square-free frequency check."""
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3)
    counts = np.bincount([choose(logits, 0, p, s, []).token for s in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


def test_top_k_and_min_p_exclude_tokens():
    logits = np.array([5.0, 4.9, 0.0, -1.0], np.float32)
    p = SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=1)
    assert {choose(logits, 0, p, s, []).token for s in range(300)} == {0, 1}
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=1)
    assert {choose(logits, 0, p, s, []).token for s in range(300)} == {0, 1}


def test_top_p_without_top_k_finds_the_nucleus_across_peers():
    """A flat distribution needs more candidates than the first gather brings."""
    logits = np.zeros(5000, np.float32)
    logits[:3] = 50.0  # the nucleus at p=0.9 is these three; the rest are negligible
    p = SamplingParams(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0, seed=5)
    for s in range(20):
        toks = {c.token for c in sharded_choose(logits, [1, 1, 1], p, s, [])}
        assert len(toks) == 1 and toks.pop() in (0, 1, 2)


def test_bad_params_are_refused_with_the_field_named():
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(RequestError, match="temperature"):
        SamplingParams(temperature=-1)


def test_top_p_nucleus_larger_than_first_gather_matches_single_peer():
    """A nucleus of thousands of tokens forces the candidate gather to grow; still exact."""
    logits = np.linspace(0.0, 0.5, 6000).astype(np.float32)[::-1].copy()
    p = SamplingParams(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0, seed=11)
    for s in range(5):
        single = choose(logits, 0, p, s, []).token
        assert {c.token for c in sharded_choose(logits, [1, 2, 1], p, s, [])} == {single}


def sharded_choose_batch(logits, weights, params, steps, histories):
    from ringllm.sampling import choose_batch

    vocab = logits.shape[1]
    return on_peers(vocab, weights,
                    lambda lo, hi, g: choose_batch(logits[:, lo:hi], lo, params, steps, histories, g))


@settings(max_examples=30, deadline=None)
@given(params=st.lists(params_st, min_size=1, max_size=6), weights=st.lists(st.floats(0.5, 3), min_size=1, max_size=4),
       seed=st.integers(0, 2**32 - 1))
def test_batched_choice_equals_one_by_one_and_across_peers(params, weights, seed):
    rng = np.random.default_rng(seed)
    vocab = 300
    logits = (rng.standard_normal((len(params), vocab)) * 3).astype(np.float32)
    steps = list(rng.integers(0, 100, len(params)))
    histories = [list(rng.integers(0, vocab, 5)) for _ in params]
    one_by_one = [choose(logits[i], 0, p, steps[i], histories[i]).token for i, p in enumerate(params)]
    for peer_result in sharded_choose_batch(logits, weights, params, steps, histories):
        assert [c.token for c in peer_result] == one_by_one


def test_batched_greedy_makes_one_gather():
    from ringllm.sampling import choose_batch

    calls = []

    def gather(obj):
        calls.append(obj)
        return [obj]

    logits = np.random.default_rng(0).standard_normal((8, 100)).astype(np.float32)
    choose_batch(logits, 0, [SamplingParams(temperature=0)] * 8, [0] * 8, [[]] * 8, gather)
    assert len(calls) == 1
    calls.clear()
    choose_batch(logits, 0, [SamplingParams(temperature=0.7, seed=i) for i in range(8)], [0] * 8, [[]] * 8, gather)
    assert len(calls) == 2


def test_values_that_would_not_fit_the_wire_are_refused_up_front():
    """Everything in a request crosses the control all-gather (msgpack): huge ints must be
    refused where the request is made, not break the ring later."""
    from ringllm.generation import Request

    with pytest.raises(RequestError, match="top_k"):
        SamplingParams(top_k=2**70)
    with pytest.raises(RequestError, match="max_tokens"):
        Request((1, 2), max_tokens=2**70)
    with pytest.raises(RequestError, match="prompt token ids"):
        Request((1, 2**64))


@given(seed=st.integers(0, 2**31 - 1), step=st.integers(0, 10_000),
       cut=st.lists(st.integers(0, 1000), min_size=2, max_size=6, unique=True))
def test_gumbel_slices_are_the_whole_vocabulary_draw(seed, step, cut):
    """Each peer draws noise for its own slice only; the slices must be exactly the single
    peer's whole-vocabulary draw, or sampled tokens would depend on P."""
    cut = sorted(cut)
    whole = _gumbel(seed, step, cut[0], cut[-1])
    parts = np.concatenate([_gumbel(seed, step, a, b) for a, b in zip(cut, cut[1:])])
    assert np.array_equal(parts, whole)
    u = np.random.Generator(np.random.Philox(key=seed, counter=step)).random(cut[-1])[cut[0]:]
    assert np.array_equal(whole, (-np.log(-np.log(np.clip(u, 1e-300, 1.0 - 1e-16)))).astype(np.float32))
