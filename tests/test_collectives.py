"""Collectives over in-memory rings (P=1..5) and loopback TCP (P=2..4).

Every all-reduce must be bit-identical on all peers (compared with ``tobytes()``) and close to
the float64 sum; all-gather and broadcast must be exact; a lost peer must surface as
PeerLostError naming it, within the timeout, and nothing may hang.
"""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ringllm.errors import LocalProtocolError, PeerLostError, RemoteProtocolError, RingError
from ringllm.ring.codec import (dequantize_q8_0, dequantize_q8_0_residual, hadamard_rotate, quantize_q8_0,
                                quantize_q8_0_residual)
from ringllm.ring.collectives import Collectives
from ringllm.ring.formation import open_tcp_ring
from ringllm.ring.handshake import HandshakeInfo
from ringllm.ring.memory import memory_link_pair, memory_ring

ALGOS = {"exchange": 1 << 62, "ring": 0}


def make(p: int, wire: str = "f32", algo: str | None = None, chunk_elems: int = 64,
         **link_kw) -> tuple[list[Collectives], list]:
    rings = memory_ring(p, **link_kw)
    small = None if algo is None else ALGOS[algo]
    return [Collectives(r, p, rings[r], wire, small_max_elems=small, chunk_elems=chunk_elems)
            for r in range(p)], rings


async def run_all(colls, fn, timeout: float = 10.0):
    async with asyncio.timeout(timeout):
        return await asyncio.gather(*(fn(r, c) for r, c in enumerate(colls)))


def check_allreduce(outs, xs, wire: str, algo: str) -> None:
    p = len(xs)
    assert all(o.dtype == np.float32 and o.shape == xs[0].shape for o in outs)
    assert all(o.tobytes() == outs[0].tobytes() for o in outs), "peers disagree"
    if outs[0].size == 0:
        return
    ref = np.sum(np.stack(xs).astype(np.float64), axis=0)
    mags = np.stack([np.abs(x).astype(np.float64) for x in xs])
    tol = 4 * p * 2.0**-24 * mags.sum(axis=0) + 1e-30
    if wire == "q8_0" and p > 1:
        # Q8_0 rounds in the Hadamard-rotated domain (two passes, the second over the first's
        # rounding error, which only shrinks it: the one-pass bound below still holds and
        # test_q8_0_residual_pass_divides_the_error checks the gain). There a value errs by at most
        # amax/254 (rounding) + amax*2^-11 (f16 scale), amax being its 32-block's largest
        # magnitude; exchange quantizes each rotated input once, the ring requantizes partial
        # sums (whose block amax is at most the sum of the inputs') once per hop. Rotating
        # back, an element's error is at most 1/8 of the sum of its 64-block's errors.
        hops = 1 if algo == "exchange" else p
        n = xs[0].size
        amax = sum(np.repeat(np.abs(hadamard_rotate(x.reshape(-1).astype(np.float32))).reshape(-1, 32).max(axis=1), 32)
                   for x in xs).astype(np.float64)
        err_rot = hops * amax * (1 / 254 + 2.0**-11) + hops * p * 1e-6
        bound = np.repeat(err_rot.reshape(-1, 64).sum(axis=1) / 8, 64)[:n].reshape(xs[0].shape)
        tol = tol + bound + 4 * p * 2.0**-24 * amax.sum() / max(n, 1)
    np.testing.assert_array_less(np.abs(outs[0].astype(np.float64) - ref), tol + 1e-37)


# -- Q8_0 ---------------------------------------------------------------------------------------
def test_q8_0_matches_gguf_reference():
    gguf_quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(32 * 50) * rng.uniform(0.001, 100, 32 * 50)).astype(np.float32)
    x[:32] = 0  # an all-zero block (d = 0)
    x[32:64] = np.arange(32) - 15.5  # amax 15.5...
    x[32] = 127  # ...now 127, so d = 1 and the .5 ties must round away from zero
    ref = gguf_quants.quantize(x.reshape(-1, 32), GGMLQuantizationType.Q8_0)
    ours = quantize_q8_0(x)
    assert ours.tobytes() == ref.tobytes()
    deq = gguf_quants.dequantize(ref, GGMLQuantizationType.Q8_0).reshape(-1)
    assert dequantize_q8_0(ours, x.size).tobytes() == deq.astype(np.float32).tobytes()


def test_q8_0_blocks_too_small_for_a_float16_scale_encode_as_zeros():
    """Values so small that the block's scale is 0 in float16 decode to 0 (as gguf's would);
    their codes are zeros, not what inf/NaN cast to, with no overflow or invalid operation
    on the way (underflow, of subnormal inputs, is what they are)."""
    x = np.zeros(96, np.float32)
    x[:32] = np.float32(1e-39) * np.arange(1, 33)  # subnormal: 1/d overflows float32
    x[32:64] = np.float32(3e-6)  # d = 2.4e-8: below float16's smallest subnormal, rounds to 0
    x[64:] = np.linspace(-1, 1, 32, dtype=np.float32)  # an ordinary block beside them
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        q = quantize_q8_0(x)
    assert not q[:2].any()
    np.testing.assert_array_equal(dequantize_q8_0(q, 96)[:64], 0)
    np.testing.assert_allclose(dequantize_q8_0(q, 96)[64:], x[64:], atol=1 / 127)


@given(x=hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-100, 100, width=32)),
       outlier=st.floats(200, 5000))
def test_q8_0_residual_pass_divides_the_error(x, outlier):
    """The q8_0 wire's second pass: its error is that of Q8_0 applied to the first pass's
    error, so at most amax_r/254 + amax_r*2^-11 per 32-block (amax_r the block's largest
    first-pass error) plus float32 rounding of the subtraction and the final sum (an ulp or
    two of the block's largest value) plus 127 * 2^-25 where the residual's scale is a float16
    subnormal (spacing 2^-24), and never worse than one pass."""
    x = x.copy()
    x[0] = outlier  # the case that motivated it: one huge channel
    one = dequantize_q8_0(quantize_q8_0(x), x.size)
    two = dequantize_q8_0_residual(quantize_q8_0_residual(x), x.size)
    pad = -x.size % 32
    blocks = lambda v: np.abs(np.concatenate([v, np.zeros(pad, np.float32)])).reshape(-1, 32).max(axis=1)  # noqa: E731
    r, amax = blocks(x - one).astype(np.float64), blocks(x).astype(np.float64)
    bound = np.repeat(r / 254 + r * 2.0**-11 + 2 * amax * 2.0**-23 + 127 * 2.0**-25, 32)[: x.size]
    err = np.abs(two.astype(np.float64) - x)
    assert np.all(err <= bound)
    assert err.max() <= np.abs(one.astype(np.float64) - x).max()
    assert quantize_q8_0_residual(x).nbytes == 2 * quantize_q8_0(x).nbytes


def test_q8_0_layout_and_tail_padding():
    x = np.arange(1, 41, dtype=np.float32)  # 40 values: one full block, one padded
    q = quantize_q8_0(x)
    assert q.nbytes == 2 * 34
    raw = q.tobytes()
    assert np.frombuffer(raw[:2], "<f2")[0] == np.float16(32 / 127)
    assert np.frombuffer(raw[34 + 2 + 8:68], np.int8).tolist() == [0] * 24  # padding
    assert np.allclose(dequantize_q8_0(raw, 40), x, rtol=0.01, atol=0.2)


# -- all-reduce, in memory -----------------------------------------------------------------------
shapes = st.one_of(st.just((576,)), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40))
values = st.floats(-1e4, 1e4, width=32)


@st.composite
def inputs(draw):
    p = draw(st.integers(1, 5))
    shape = draw(shapes)
    xs = [draw(hnp.arrays(np.float32, shape, elements=values)) for _ in range(p)]
    return p, xs


@pytest.mark.parametrize("wire", ["f32", "q8_0"])
@pytest.mark.parametrize("algo", ["exchange", "ring"])
@given(data=inputs())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_allreduce_bit_identical_and_accurate(wire, algo, data):
    p, xs = data
    colls, _ = make(p, wire, algo, chunk_elems=32)
    outs = asyncio.run(run_all(colls, lambda r, c: c.allreduce(xs[r])))
    check_allreduce(outs, xs, wire, algo)
    if p == 1:
        assert outs[0].tobytes() == xs[0].tobytes()


@pytest.mark.parametrize("p", [2, 3, 4, 5])
@pytest.mark.parametrize("wire", ["f32", "q8_0"])
async def test_allreduce_sequence_both_algorithms_automatic(p, wire):
    colls, _ = make(p, wire, chunk_elems=1024)
    for c in colls:
        c.small_max_elems = 1000
    rng = np.random.default_rng(p)
    for n in (576, 5000, 1, 576, 40_000):
        xs = [rng.standard_normal(n).astype(np.float32) for _ in range(p)]
        outs = await run_all(colls, lambda r, c: c.allreduce(xs[r]))
        check_allreduce(outs, xs, wire, colls[0].algorithm(n))
    assert [c.seq for c in colls] == [5] * p


async def test_exchange_sums_in_rank_order():
    # 1e8 + 1 - 1e8 in float32 depends on the order; rank order gives ((1e8 + 1) - 1e8) = 0.
    xs = [np.array([v], np.float32) for v in (1e8, 1.0, -1e8)]
    colls, _ = make(3, algo="exchange")
    outs = await run_all(colls, lambda r, c: c.allreduce(xs[r]))
    assert [o[0] for o in outs] == [np.float32(np.float32(1e8) + np.float32(1)) - np.float32(1e8)] * 3


# -- all-gather and broadcast -------------------------------------------------------------------
@given(st.integers(1, 5), st.data())
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_allgather_exact_with_ranks_of_different_shapes(p, data):
    dtypes = st.sampled_from([np.float32, np.int64, np.uint8, np.float16, np.bool_])
    xs = [data.draw(hnp.arrays(data.draw(dtypes), hnp.array_shapes(min_dims=0, max_dims=2, min_side=0,
                                                                    max_side=30)))
          for _ in range(p)]
    colls, _ = make(p)
    outs = asyncio.run(run_all(colls, lambda r, c: c.allgather(xs[r])))
    for got in outs:
        assert len(got) == p
        for g, x in zip(got, xs):
            assert g.dtype == x.dtype and g.shape == x.shape and g.tobytes() == x.tobytes()


@given(st.integers(1, 5), st.integers(0, 4), hnp.arrays(
    st.sampled_from([np.float32, np.int32, np.uint8]),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=50)))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_broadcast_exact(p, root, x):
    root %= p
    colls, _ = make(p)
    outs = asyncio.run(run_all(colls, lambda r, c: c.broadcast(x if r == root else None, root)))
    for got in outs:
        assert got.dtype == x.dtype and got.shape == x.shape and got.tobytes() == x.tobytes()


async def test_large_broadcast_is_chunked():
    x = np.arange(300_000, dtype=np.float32)  # 1.2 MB: several frames, forwarded as they come
    colls, _ = make(4)
    outs = await run_all(colls, lambda r, c: c.broadcast(x if r == 2 else None, 2))
    assert all(np.array_equal(o, x) for o in outs)


# -- lockstep violations ---------------------------------------------------------------------------
async def test_mismatched_collectives_are_protocol_errors():
    colls, _ = make(2, recv_timeout=2)

    async def go(r, c):
        if r == 0:
            return await c.allreduce(np.ones(8, np.float32))
        return await c.allgather(np.ones(8, np.float32))

    with pytest.raises(RemoteProtocolError, match="out of step"):
        await run_all(colls, go)


async def test_mismatched_sizes_are_protocol_errors():
    colls, _ = make(3, recv_timeout=2)
    with pytest.raises(RemoteProtocolError, match="all-reduces 8 elements but we have 9"):
        await run_all(colls, lambda r, c: c.allreduce(np.ones(8 if r == 0 else 9, np.float32)))


async def test_broken_collectives_refuse_later_calls():
    colls, rings = make(2, recv_timeout=0.2)
    with pytest.raises(PeerLostError):
        await colls[0].allreduce(np.ones(4, np.float32))  # rank 1 never joins
    with pytest.raises(RingError, match="earlier failure"):
        await colls[0].allreduce(np.ones(4, np.float32))


async def test_overlapping_calls_are_refused():
    colls, _ = make(2, recv_timeout=1)
    first = asyncio.ensure_future(colls[0].allreduce(np.ones(4, np.float32)))
    await asyncio.sleep(0)
    with pytest.raises(LocalProtocolError, match="overlap"):
        await colls[0].allreduce(np.ones(4, np.float32))
    await colls[1].allreduce(np.ones(4, np.float32))
    assert (await first).tolist() == [2.0] * 4


# -- failures: cut, stall, silence -----------------------------------------------------------------
@pytest.mark.parametrize("algo", ["exchange", "ring"])
async def test_cut_link_raises_peer_lost_naming_the_peer(algo):
    colls, rings = make(3, algo=algo, recv_timeout=1.0)
    x = np.ones(1000, np.float32)
    await run_all(colls, lambda r, c: c.allreduce(x))
    rings[1].next.cut("cable pulled")  # the connection rank 1 -> rank 2
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    results = await asyncio.wait_for(asyncio.gather(*(c.allreduce(x) for c in colls),
                                                    return_exceptions=True), 5)
    assert loop.time() - t0 < 3
    assert all(isinstance(e, PeerLostError) for e in results), results
    assert results[1].peer == "rank 2" and "cable pulled" in str(results[1])
    assert results[2].peer == "rank 1"


async def test_stalled_link_times_out_with_peer_named():
    colls, rings = make(2, algo="exchange", recv_timeout=0.3)
    rings[0].next.stall()
    results = await asyncio.wait_for(asyncio.gather(
        *(c.allreduce(np.ones(4, np.float32)) for c in colls), return_exceptions=True), 5)
    assert isinstance(results[1], PeerLostError) and results[1].peer == "rank 0"
    assert "no frame within 0.3 s" in str(results[1])


async def test_stall_then_unstall_delivers():
    colls, rings = make(2, algo="exchange", recv_timeout=2)
    rings[0].next.stall()
    task = asyncio.gather(*(c.allreduce(np.ones(4, np.float32)) for c in colls))
    await asyncio.sleep(0.05)
    rings[0].next.unstall()
    outs = await asyncio.wait_for(task, 5)
    assert all(o.tolist() == [2.0] * 4 for o in outs)


async def test_keepalive_detects_silence_and_pings_keep_idle_link_up():
    a, b = memory_link_pair("a", "b")
    async with asyncio.timeout(5):
        ka = asyncio.ensure_future(a.keepalive(0.05, 0.3))
        kb = asyncio.ensure_future(b.keepalive(0.05, 0.3))
        await asyncio.sleep(0.5)  # idle, but pings flow both ways
        assert not a.closed and not b.closed
        a.stall()  # b hears nothing any more
        err = await b.wait_closed()
        assert isinstance(err, PeerLostError) and err.peer == "a" and "silent" in str(err)
        await asyncio.gather(ka, kb)


async def test_trickled_bytes_decode_the_same():
    rings = memory_ring(3, chunk=7)  # every frame arrives in 7-byte pieces
    colls = [Collectives(r, 3, rings[r], "q8_0", small_max_elems=0, chunk_elems=64) for r in range(3)]
    xs = [np.random.default_rng(r).standard_normal(500).astype(np.float32) for r in range(3)]
    outs = await run_all(colls, lambda r, c: c.allreduce(xs[r]))
    check_allreduce(outs, xs, "q8_0", "ring")


async def test_goodbye_reaches_neighbours():
    colls, rings = make(3, recv_timeout=5)
    async with asyncio.timeout(5):
        await asyncio.gather(*(ring.shutdown("done", timeout=2) for ring in rings))
    for ring in rings:
        assert all(isinstance(link.error, PeerLostError) for link in ring.links)


# -- loopback TCP ------------------------------------------------------------------------------------
async def tcp_ring(p: int, **kw):
    socks = []
    for _ in range(p):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        s.setblocking(False)
        socks.append(s)
    addrs = [("127.0.0.1", s.getsockname()[1]) for s in socks]
    infos = [HandshakeInfo(ring="t", rank=r, size=p, model="m", plan="p") for r in range(p)]
    async with asyncio.timeout(10):
        return await asyncio.gather(*(
            open_tcp_ring(r, addrs, me=infos[r], secret=b"s3cret", listen_sock=socks[r], **kw)
            for r in range(p)))


@pytest.mark.parametrize("p", [2, 3, 4])
async def test_tcp_ring_collectives(p):
    rings = await tcp_ring(p, recv_timeout=5)
    try:
        rng = np.random.default_rng(p)
        for wire in ("f32", "q8_0"):
            for algo in ("exchange", "ring"):
                colls = [Collectives(r, p, rings[r], wire, small_max_elems=ALGOS[algo],
                                     chunk_elems=1 << 14) for r in range(p)]
                for n in (576, 100_003):
                    xs = [rng.standard_normal(n).astype(np.float32) for _ in range(p)]
                    outs = await run_all(colls, lambda r, c: c.allreduce(xs[r]))
                    check_allreduce(outs, xs, wire, algo)
        colls = [Collectives(r, p, rings[r]) for r in range(p)]
        got = await run_all(colls, lambda r, c: c.allgather(np.arange(r + 1)))
        assert all([g.tolist() for g in gs] == [list(range(r + 1)) for r in range(p)] for gs in got)
        big = rng.standard_normal(200_000).astype(np.float32)
        got = await run_all(colls, lambda r, c: c.broadcast(big if r == p - 1 else None, p - 1))
        assert all(np.array_equal(g, big) for g in got)
    finally:
        for ring in rings:
            ring.close()


async def test_tcp_peer_loss_is_named_and_fast():
    rings = await tcp_ring(3, recv_timeout=2)
    colls = [Collectives(r, 3, rings[r]) for r in range(3)]
    await run_all(colls, lambda r, c: c.allreduce(np.ones(10, np.float32)))
    rings[2].close("peer 2 crashed")
    results = await asyncio.wait_for(asyncio.gather(
        *(c.allreduce(np.ones(10, np.float32)) for c in colls[:2]), return_exceptions=True), 5)
    assert all(isinstance(e, PeerLostError) for e in results), results
    assert "rank 2" in results[1].peer  # rank 1's successor
    for ring in rings:
        ring.close()


# -- links lent to worker threads ------------------------------------------------------------------
@pytest.mark.parametrize("p", [1, 2, 3])
async def test_lent_links_run_collectives_in_worker_threads(p):
    rings = await tcp_ring(p, recv_timeout=5) if p > 1 else memory_ring(1)
    colls = [Collectives(r, p, rings[r], "f32", chunk_elems=1 << 12) for r in range(p)]
    await run_all(colls, lambda r, c: c.allreduce(np.ones(3, np.float32)))  # some async traffic
    rng = np.random.default_rng(p)
    inputs = {n: [rng.standard_normal(n).astype(np.float32) for _ in range(p)]
              for n in (576, 50_000)}

    def worker(r: int, c: Collectives):
        outs = [c.allreduce_sync(inputs[n][r]) for n in (576, 50_000, 576)]
        c.small_max_elems, saved = 16, c.small_max_elems  # force the ring algorithm
        outs.append(c.allreduce_sync(inputs[50_000][r]))
        c.small_max_elems = saved
        outs.append(c.allgather_sync(np.arange(r + 2)))
        outs.append(c.broadcast_sync(inputs[576][0] if r == 0 else None, 0))
        return outs

    for c in colls:
        assert await c.lend_to_thread()
    if p > 1:
        with pytest.raises(LocalProtocolError, match="lent to a worker thread"):
            await colls[0].allreduce(np.ones(3, np.float32))
    async with asyncio.timeout(20):
        results = await asyncio.gather(*(asyncio.to_thread(worker, r, c) for r, c in enumerate(colls)))
    for c in colls:
        c.take_back()
    for k, n in enumerate((576, 50_000, 576)):
        check_allreduce([res[k] for res in results], inputs[n], "f32", "exchange")
    check_allreduce([res[3] for res in results], inputs[50_000], "f32", "ring")
    assert all([g.tolist() for g in res[4]] == [list(range(r + 2)) for r in range(p)] for res in results)
    assert all(np.array_equal(res[5], inputs[576][0]) for res in results)
    # Back on the event loop, the links still work.
    outs = await run_all(colls, lambda r, c: c.allreduce(inputs[576][r]))
    check_allreduce(outs, inputs[576], "f32", "exchange")
    for ring in rings:
        ring.close()


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("wire", ["f32", "q8_0"])
async def test_lent_exchange_matches_the_coroutine_path(p, wire):
    """The lent links' blocking exchange (BlockingLink.recv_expected, pre-encoded frames) gives
    the same bits as the coroutine exchange on the event loop, P=4 forwarding included, with
    and without spinning, and with the wire format overridden by ``exact``."""
    rings = await tcp_ring(p, recv_timeout=5)
    rng = np.random.default_rng(10 + p)
    xs = [rng.standard_normal((2, 288)).astype(np.float32) for _ in range(p)]
    colls = [Collectives(r, p, rings[r], wire) for r in range(p)]
    on_loop = await run_all(colls, lambda r, c: c.allreduce(xs[r]))
    on_loop_exact = await run_all(colls, lambda r, c: c.allreduce(xs[r], exact=True))
    for spin in (False, True):
        colls = [Collectives(r, p, rings[r], wire, spin=spin) for r in range(p)]
        for c in colls:
            assert await c.lend_to_thread()

        def worker(r: int, c: Collectives):
            return [c.allreduce_sync(xs[r]), c.allreduce_sync(xs[r], exact=True)]

        async with asyncio.timeout(20):
            lent = await asyncio.gather(*(asyncio.to_thread(worker, r, c) for r, c in enumerate(colls)))
        for c in colls:
            c.take_back()
        assert [o[0].tobytes() for o in lent] == [o.tobytes() for o in on_loop]
        assert [o[1].tobytes() for o in lent] == [o.tobytes() for o in on_loop_exact]
        check_allreduce([o[0] for o in lent], xs, wire, "exchange")
    for ring in rings:
        ring.close()


async def test_lent_exchange_takes_anything_unexpected_through_the_decoder():
    """A frame that is not byte for byte the expected one leaves the fast path: a ping ahead of
    it is skipped, a peer out of step is named, and a peer on its event loop (not lent) pairs
    with a lent one."""
    rings = await tcp_ring(2, recv_timeout=5)
    colls = [Collectives(r, 2, rings[r], spin=True) for r in range(2)]
    x = [np.full(576, r + 1.0, np.float32) for r in range(2)]
    assert await colls[0].lend_to_thread()
    thread = asyncio.ensure_future(asyncio.to_thread(colls[0].allreduce_sync, x[0]))
    await asyncio.sleep(0.1)  # rank 0 now waits in recv_expected
    rings[1].next.write("ping", {"t": 1})  # rank 0's prev link: a ping, then the all-reduce
    async with asyncio.timeout(10):
        mine = await colls[1].allreduce(x[1])
        theirs = await thread
    assert mine.tolist() == theirs.tolist() == [3.0] * 576
    # Out of step: rank 1 all-gathers while rank 0 all-reduces.
    thread = asyncio.ensure_future(asyncio.to_thread(colls[0].allreduce_sync, x[0]))
    with pytest.raises(RemoteProtocolError, match="out of step"):
        async with asyncio.timeout(10):
            await asyncio.gather(colls[1].allgather(np.arange(3)), thread)
    if not thread.done():
        rings[0].close()
    with pytest.raises(RingError):
        await asyncio.wait_for(thread, 10)
    colls[0].take_back()
    for ring in rings:
        ring.close()


async def test_lent_link_loss_raises_in_thread_and_fails_link():
    rings = await tcp_ring(2, recv_timeout=0.5)
    colls = [Collectives(r, 2, rings[r]) for r in range(2)]
    await colls[0].lend_to_thread()
    t0 = time.monotonic()
    with pytest.raises(PeerLostError, match="no frame within 0.5 s") as info:
        await asyncio.wait_for(asyncio.to_thread(colls[0].allreduce_sync, np.ones(4, np.float32)), 5)
    assert time.monotonic() - t0 < 3 and info.value.peer.startswith("rank 1")
    colls[0].take_back()
    assert isinstance(rings[0].prev.error, PeerLostError)
    for ring in rings:
        ring.close()


async def test_memory_links_are_not_lent_and_sync_calls_use_the_loop():
    colls, _ = make(2)
    assert [await c.lend_to_thread() for c in colls] == [False, False]
    x = [np.full(5, r + 1, np.float32) for r in range(2)]
    async with asyncio.timeout(10):
        outs = await asyncio.gather(*(asyncio.to_thread(c.allreduce_sync, x[r]) for r, c in enumerate(colls)))
    assert all(o.tolist() == [3.0] * 5 for o in outs)
    for c in colls:
        c.take_back()


def test_caller_buffer_reuse_is_safe_under_uvloop():
    """uvloop sends a large buffer by reference; a caller that reuses its input as soon as the
    all-reduce returns must not change what the peer receives."""
    uvloop = pytest.importorskip("uvloop")

    async def main():
        rings = await tcp_ring(2, recv_timeout=10)
        for sock in (rings[0].next._transport.get_extra_info("socket"),
                     rings[1].prev._transport.get_extra_info("socket")):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        # No flow-control pause: without a flush the call could return with x0 still queued.
        rings[0].next._transport.set_write_buffer_limits(high=1 << 30)
        colls = [Collectives(r, 2, rings[r]) for r in range(2)]
        xs = [np.full(1 << 20, r + 1, np.float32) for r in range(2)]
        rings[1].prev._transport.pause_reading()  # rank 1 is slow to read rank 0's vector
        tasks = [asyncio.ensure_future(c.allreduce(x)) for c, x in zip(colls, xs)]
        await asyncio.sleep(0.3)
        if tasks[0].done():
            xs[0][:] = 100  # reuse the buffer the moment the call has returned
        rings[1].prev._transport.resume_reading()
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        for ring in rings:
            ring.close()
        return outs

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        outs = runner.run(main())
    assert outs[0].tobytes() == outs[1].tobytes()
    assert outs[0][0] == 3.0


@pytest.mark.parametrize("wire", ["f32", "q8_0"])
async def test_empty_allreduce_on_the_exchange(wire):
    """An empty vector still makes a frame each way: its payload (an empty block array under
    q8_0, whose shape has a zero) is sent as zero bytes, not refused by memoryview.cast."""
    colls, rings = make(3, wire, "exchange")
    outs = await run_all(colls, lambda r, c: c.allreduce(np.zeros(0, np.float32)))
    assert all(o.shape == (0,) and o.dtype == np.float32 for o in outs)
    for ring in rings:
        ring.close()
