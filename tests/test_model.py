"""The single-peer engine against the exact float32 reference (shared fixture)."""

from __future__ import annotations

import numpy as np
import pytest

from ringllm import prefill
from ringllm.generation import LocalEngine, Request, collect
from ringllm.model import Segment
from ringllm.sampling import SamplingParams

pytestmark = pytest.mark.model

GREEDY = SamplingParams(temperature=0.0)


def test_first_step_top20_logprobs_within_tolerance(smollm2, fixture_data):
    """Top-20 log-probs of the first step agree with the reference within 0.05."""
    info, model = smollm2
    tol = fixture_data["tolerances"]["logits_abs"]
    for case in fixture_data["logits"]:
        logits = model.forward([Segment(model.new_cache(), np.array(case["prompt_ids"]))])[0].astype(np.float64)
        ours = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        ref = np.array(case["top_logits"], np.float64)
        # The reference gives logits of its top 20 only; the log-softmax normaliser is ours, so
        # compare differences relative to the top-1 (a log-prob difference needs no normaliser)
        # and the raw logits themselves.
        ids = case["top_ids"]
        assert list(np.argsort(-logits, kind="stable")[:20]) == ids
        np.testing.assert_allclose(logits[ids], ref, atol=tol)
        np.testing.assert_allclose(ours[ids] - ours[ids[0]], ref - ref[0], atol=tol)


def test_greedy_matches_reference(smollm2, fixture_data):
    """Greedy ids identical, except after a divergence where the reference margin < 0.05."""
    info, model = smollm2
    engine = LocalEngine(model, info.tokenizer)
    for case in fixture_data["greedy"]:
        req = Request(tuple(case["prompt_ids"]), GREEDY, max_tokens=len(case["ids"]), ignore_eos=True)
        got = collect(engine.generate(req), req.prompt_ids).ids
        ref = case["ids"]
        diverge = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
        if diverge is not None:
            assert case["margin"][diverge] < 0.05, f"{case['id']}: diverged at {diverge} with margin {case['margin'][diverge]}"
        assert len(got) == len(ref)


def test_greedy_text_matches_reference(smollm2, fixture_data):
    info, model = smollm2
    engine = LocalEngine(model, info.tokenizer)
    case = fixture_data["greedy"][0]
    req = Request(tuple(case["prompt_ids"]), GREEDY, max_tokens=len(case["ids"]), ignore_eos=True)
    assert collect(engine.generate(req), req.prompt_ids).text == case["text"]


def test_batch_prefill_equals_token_by_token(smollm2, fixture_data):
    """Prompt fed as one batch vs token by token: logits equal within 1e-3."""
    info, model = smollm2
    ids = fixture_data["greedy"][1]["prompt_ids"]
    batch = model.forward([Segment(model.new_cache(), np.array(ids))])[0]
    cache = model.new_cache()
    for t in ids:
        step = model.forward([Segment(cache, np.array([t]))])[0]
    assert np.abs(batch - step).max() < 1e-3


def test_two_sequences_in_one_forward_equal_separate(smollm2, fixture_data):
    """Segments batched into one forward give the same logits as separate forwards."""
    info, model = smollm2
    a, b = fixture_data["greedy"][0]["prompt_ids"], fixture_data["logits"][0]["prompt_ids"]
    sep = [model.forward([Segment(model.new_cache(), np.array(p))])[0] for p in (a, b)]
    both = model.forward([Segment(model.new_cache(), np.array(a)), Segment(model.new_cache(), np.array(b))])
    for x, y in zip(sep, both):
        assert np.abs(x - y).max() < 1e-3


def test_prompt_longer_than_context_is_refused(smollm2):
    info, model = smollm2
    from ringllm.errors import RequestError

    req = Request(tuple([1] * (model.max_len + 1)), GREEDY, max_tokens=1)
    with pytest.raises(RequestError, match=r"prompt is \d+ tokens but the context holds only \d+"):
        list(LocalEngine(model, info.tokenizer).generate(req))


def test_same_seed_same_text(smollm2, fixture_data):
    info, model = smollm2
    engine = LocalEngine(model, info.tokenizer)
    ids = tuple(fixture_data["greedy"][1]["prompt_ids"])
    runs = [collect(engine.generate(Request(ids, SamplingParams(temperature=0.9, seed=s), max_tokens=12)), ids).ids
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.fixture
def two_kernel_threads():
    """Two numpy kernel threads for one test: the pipelined prefill is how the numpy family
    uses them (the session's models were loaded with one thread: their tiling stays, which
    only changes how kernel work is shared, never the result)."""
    from ringllm import runtime

    runtime.set_threads(2, "numpy")
    yield
    runtime.set_threads(1)


_LONG_TEXT = ("A ring network passes a small frame from station to station; each one reads it, adds its "
              "share and sends it on, so after one turn every station has seen the sum of all of them. ") * 6


def _mixed_batch(model, info):
    """A 100-token prompt, a decode token of a sequence 12 tokens in, and a 40-token prompt:
    one forward of 141 rows, fresh caches each time it is called."""
    pool = info.tokenizer.encode(_LONG_TEXT, parse_special=False)
    assert len(pool) >= 152
    a, b, c = np.array(pool[:100]), np.array(pool[100:112]), np.array(pool[112:152])
    seg_b = Segment(model.new_cache(), b[:-1])
    model.forward([seg_b])
    return [Segment(model.new_cache(), a), Segment(seg_b.cache, b[-1:]), Segment(model.new_cache(), c)]


def test_pipelined_prefill_equals_one_thread(smollm2, fixture_data, two_kernel_threads, monkeypatch):
    """With two kernel threads a long forward runs as two pipelined token blocks (here the
    cut falls inside the first prompt). Logits and caches agree with one thread within the
    1e-3 of batch vs token by token (the sums run in another order: a block's softmax rows
    are shorter, BLAS sees other row counts), and the next greedy tokens are the same."""
    from ringllm.ops import quant

    info, model = smollm2
    calls = []
    real = quant.run_together
    monkeypatch.setattr(quant, "run_together", lambda tasks: (calls.append(len(tasks)), real(tasks))[1])

    piped_segs = _mixed_batch(model, info)
    piped = model.forward(piped_segs)
    assert calls == [2]  # the pipeline ran: two blocks on two threads
    monkeypatch.setattr(prefill, "PIPELINE_MIN_ROWS", 10**6)
    plain_segs = _mixed_batch(model, info)
    plain = model.forward(plain_segs)
    assert calls == [2]  # and this time it did not

    np.testing.assert_allclose(piped, plain, rtol=0, atol=1e-3)
    assert list(piped.argmax(axis=1)) == list(plain.argmax(axis=1))
    for p, q in zip(piped_segs, plain_segs):
        assert p.cache.length == q.cache.length
        for li in range(model.cfg.n_layers):
            L = p.cache.length
            np.testing.assert_allclose(p.cache.k[li][:, :L], q.cache.k[li][:, :L], rtol=0, atol=1e-3)
            np.testing.assert_allclose(p.cache.v[li][:, :L], q.cache.v[li][:, :L], rtol=0, atol=1e-3)


@pytest.mark.parametrize("failing_block", [0, 1])
def test_pipelined_prefill_failure_ends_both_blocks(smollm2, fixture_data, two_kernel_threads, monkeypatch,
                                                    failing_block):
    """A block that fails mid-way must not leave the other waiting for its keys: forward
    raises the failure (within seconds, not never)."""
    import threading

    from ringllm.model import Transformer

    info, model = smollm2
    segs = _mixed_batch(model, info)
    real = Transformer._attention

    def attention(self, li, *args):
        on_worker = threading.current_thread().name.startswith("ringllm-kernel")  # block 1's thread
        if li == 3 and on_worker == (failing_block == 1):
            raise MemoryError("injected failure in a pipelined block")
        return real(self, li, *args)

    monkeypatch.setattr(Transformer, "_attention", attention)
    result: list[BaseException | None] = []

    def run():
        try:
            model.forward(segs)
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            result.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "forward hung after a pipelined block failed"
    assert isinstance(result[0], MemoryError) and "injected" in str(result[0])


def test_pipeline_blocks_only_alone_with_threads_and_enough_tokens(tiny_model_path, two_kernel_threads, monkeypatch):
    """The cut: rows in order, one block per thread, a sequence split where a cut falls,
    later rows (more keys) in smaller blocks; never for a short batch, and never in a ring
    (the all-reduces of two blocks would interleave differently on each peer): a model built
    with an all-reduce, however trivial, runs even a long batch as one."""
    from ringllm import runtime
    from ringllm.model import Transformer
    from ringllm.ops import quant
    from ringllm.prefill import Span, plan_blocks

    info, mf = runtime.open_model(str(tiny_model_path))
    model = runtime.load_model(mf, runtime.make_plan(info, [1.0]), 0)
    mf.close()
    a, b = model.new_cache(), model.new_cache()
    spans = [Span(a, 0, 90), Span(b, 5, 1), Span(model.new_cache(), 0, 37)]  # 128 rows
    blocks = plan_blocks(model.cfg, spans, 2)
    assert len(blocks) == 2
    flat = [(p.cache, p.start + i) for block in blocks for p in block for i in range(p.count)]
    assert flat == [(p.cache, p.start + i) for p in spans for i in range(p.count)]
    rows = [sum(p.count for p in block) for block in blocks]
    assert rows[0] > rows[1] and rows[1] >= 1

    short = [Span(a, 0, 2 * prefill.PIPELINE_MIN_ROWS - 1)]
    assert plan_blocks(model.cfg, short, 2) == [short]

    calls = []
    real = quant.run_together
    monkeypatch.setattr(quant, "run_together", lambda tasks: (calls.append(len(tasks)), real(tasks))[1])
    ids = np.arange(128) % 200
    model.forward([Segment(model.new_cache(), ids)])
    assert calls == [2]  # alone: pipelined
    ring = Transformer(model.w, allreduce=lambda x: x)
    assert not ring.alone
    ring.forward([Segment(ring.new_cache(), ids)])
    assert calls == [2]  # built with an all-reduce: one block