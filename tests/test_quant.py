"""ringllm.ops.quant against the oracle ``gguf.quants.dequantize(raw, qtype) @ x``.

Tolerance (float32 summation order). Reference products are taken in float64 from gguf's
exact float32 weights. The kernels sum in float32 in their own order and, for types with a min
or an offset, split ``w = d*c + m`` into ``d*(sum c*x) + m*(sum x)``, so their rounding error
scales with ``|d|*|c| + |m|`` rather than with ``|w|`` (which is ~0 where ``d*c`` cancels
``m``). We bound that per weight by ``amp = |w(all codes lowest)| + |w(all codes highest)|``,
computed by gguf itself (>= the larger of ``|d|*code range`` and ``|m|``, so >= half of
``|d|*|c| + |m|``), and require ``|y - ref| <= 1e-5 * (amp @ |x|)``. The longest float32
sums any path takes are ~cols + cols/32 terms (sgemm over a row), whose rounding behaves like a
random walk: ~sqrt(800) * 6e-8 = 2e-6 at the 768 columns used here; observed worst is 4e-7
(sgemm path) and 6e-8 (matvec). A scale off by 1e-4 fails. dequantize() and rows_f32() run
gguf's own float32 operations in its order and must match it bit for bit.
"""

from __future__ import annotations

import concurrent.futures
import gc

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf import quants as gq
from hypothesis import HealthCheck, given, settings, strategies as st

from ringllm.errors import ModelError, RingError, UnsupportedError
from ringllm.ops import quant
from ringllm.ops.kernels import Kernels

# Test-side knowledge of the GGUF block layouts: byte offsets of f16 scale fields and the byte
# range holding the codes (high-bit planes included), and the code bytes giving the lowest and
# highest code.
F16_FIELDS = {QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q8_0: [0],
              QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}
CODE_BYTES = {QT.Q4_0: (2, 18), QT.Q4_1: (4, 20), QT.Q5_0: (2, 22), QT.Q5_1: (4, 24),
              QT.Q8_0: (2, 34), QT.Q4_K: (16, 144), QT.Q5_K: (16, 176), QT.Q6_K: (0, 192)}
EXTREME_CODES = {QT.Q8_0: (0x80, 0x7F)}  # int8 codes; the rest: 0x00 lowest, 0xFF highest
GQUANTIZE = {QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.BF16}
FLOATS = {QT.F32, QT.F16, QT.BF16}
ALL = sorted(quant.SUPPORTED, key=lambda t: t.value)
MODES = ["normal", "random", "zero", "huge", "negative"]


@pytest.fixture(autouse=True)
def _one_thread():
    quant.set_threads(1)
    yield
    quant.set_threads(1)


def make_raw(qtype, rows: int, cols: int, mode: str, rng: np.random.Generator) -> np.ndarray:
    """Valid GGUF bytes (rows, row_bytes) with finite f16 scales."""
    rb = quant.row_bytes(qtype, cols)
    if qtype in FLOATS:
        v = {"zero": np.zeros((rows, cols)), "huge": rng.choice([-65504.0, 65504.0], (rows, cols)),
             "negative": -np.abs(rng.standard_normal((rows, cols)))}.get(
            mode, rng.standard_normal((rows, cols)) * 3)
        v = v.astype(np.float32)
        if mode == "random":  # some tiny values: f16 subnormals, bf16/f32 near-denormals
            v[rng.random(v.shape) < 0.2] *= 2.0**-20
        if qtype == QT.F16:
            return v.astype(np.float16).view(np.uint8)
        return (v.view(np.uint8) if qtype == QT.F32 else gq.quantize(v, qtype).view(np.uint8))
    if mode == "normal" and qtype in GQUANTIZE:
        data = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.01, 10)
        return gq.quantize(data, qtype).view(np.uint8).reshape(rows, rb)
    if mode == "zero":
        return np.zeros((rows, rb), np.uint8)
    bs, ts = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (rows * cols // bs, ts), dtype=np.uint8)
    nb = len(b)
    if mode == "huge":  # the largest f16 magnitudes with small codes
        lo, hi = CODE_BYTES[qtype]
        b[:, lo:hi] &= 0x03
        scale = rng.choice([-65504.0, 65504.0], (nb, len(F16_FIELDS[qtype])))
    elif mode == "negative":
        scale = -rng.uniform(1e-3, 1e2, (nb, len(F16_FIELDS[qtype])))
    else:  # random finite scales over many binades, both signs, some f16 subnormals
        scale = rng.choice([-1, 1], (nb, len(F16_FIELDS[qtype]))) * 2.0 ** rng.uniform(
            -25, 12, (nb, len(F16_FIELDS[qtype])))
    s16 = scale.astype(np.float16).view(np.uint8).reshape(nb, -1, 2)
    for k, at in enumerate(F16_FIELDS[qtype]):
        b[:, at:at + 2] = s16[:, k]
    return b.reshape(rows, rb)


def oracle(qtype, raw, rows, cols) -> np.ndarray:
    return np.asarray(gq.dequantize(raw, qtype), np.float32).reshape(rows, cols)


def amplitude(qtype, raw, rows, cols) -> np.ndarray:
    """Per-weight |w| bound behind the tolerance (see module docstring)."""
    if qtype in FLOATS:
        return np.abs(oracle(qtype, raw, rows, cols))
    lo, hi = CODE_BYTES[qtype]
    bs, ts = GGML_QUANT_SIZES[qtype]
    amp = np.zeros((rows, cols), np.float64)
    for code in EXTREME_CODES.get(qtype, (0x00, 0xFF)):
        b = raw.reshape(-1, ts).copy()
        b[:, lo:hi] = code
        amp += np.abs(oracle(qtype, b.reshape(rows, -1), rows, cols))
    return amp


def check_close(got, ref, mag):
    tol = 1e-5 * mag + 1e-30
    err = np.abs(got.astype(np.float64) - ref)
    assert np.all(err <= tol), f"max err/tol {np.max(err / tol):.3g}"


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@st.composite
def cases(draw, types=tuple(ALL)):
    qtype = draw(st.sampled_from(types))
    bs = quant.block_size(qtype)
    unit = bs if bs > 1 else 32
    cols = unit * draw(st.integers(1, max(1, 768 // unit)))
    rows = draw(st.integers(1, 300))
    mode = draw(st.sampled_from(MODES))
    seed = draw(st.integers(0, 2**32 - 1))
    small_tiles = draw(st.booleans())
    return qtype, rows, cols, mode, seed, small_tiles


# monkeypatch_tiles sets both knobs on every example, so sharing the fixture is safe.
SETTINGS = settings(max_examples=70, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("family", ["numpy", "numba"])
@SETTINGS
@given(case=cases(), n=st.integers(1, 40))
def test_against_gguf(family, case, n, monkeypatch_tiles):
    """Both kernel families against the oracle (small tiles only change the numpy layout)."""
    qtype, rows, cols, mode, seed, small_tiles = case
    monkeypatch_tiles(small_tiles)
    rng = np.random.default_rng(seed)
    raw = make_raw(qtype, rows, cols, mode, rng)
    w = oracle(qtype, raw, rows, cols)
    assert np.all(np.isfinite(w))
    m = Kernels(family, 1).matrix(qtype, raw, rows, cols)
    assert (m.qtype, m.rows, m.cols) == (qtype, rows, cols)

    assert same_bits(m.dequantize(), w)
    idx = rng.integers(-rows, rows, 7)
    assert same_bits(m.rows_f32(idx), w[idx])

    amp = amplitude(qtype, raw, rows, cols)
    x = (rng.standard_normal(cols) * rng.choice([1e-3, 1.0, 30.0])).astype(np.float32)
    ref = w.astype(np.float64) @ x
    y = m.matvec(x)
    assert y.dtype == np.float32 and y.shape == (rows,)
    check_close(y, ref, amp @ np.abs(x))
    out = np.full(rows, np.nan, np.float32)
    assert m.matvec(x, out=out) is out and same_bits(out, y)

    xs = rng.standard_normal((n, cols)).astype(np.float32)
    ys = m.matmul(xs)
    assert ys.dtype == np.float32 and ys.shape == (n, rows)
    check_close(ys, xs.astype(np.float64) @ w.T.astype(np.float64),
                np.abs(xs).astype(np.float64) @ amp.T)


@pytest.fixture
def monkeypatch_tiles(monkeypatch):
    """Shrink tiles so small matrices run the multi-tile and padded-last-tile paths."""
    default = quant._TILE_WEIGHTS, quant._GEMM_CHUNK_WEIGHTS

    def apply(small: bool):
        tile, chunk = (4096, 2048) if small else default
        monkeypatch.setattr(quant, "_TILE_WEIGHTS", tile)
        monkeypatch.setattr(quant, "_GEMM_CHUNK_WEIGHTS", chunk)
    return apply


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 5, 16, 33])
def test_every_type_and_path(qtype, n, monkeypatch_tiles):
    """Each type through each matmul path (batched below _GEMM_MIN_N, sgemm from it)."""
    monkeypatch_tiles(True)
    rng = np.random.default_rng(n)
    rows, cols = 77, 512
    raw = make_raw(qtype, rows, cols, "random" if qtype not in GQUANTIZE else "normal", rng)
    w = oracle(qtype, raw, rows, cols)
    m = quant.QuantMatrix.from_raw(qtype, raw, rows, cols)
    xs = rng.standard_normal((n, cols)).astype(np.float32)
    amp = amplitude(qtype, raw, rows, cols)
    check_close(m.matmul(xs), xs.astype(np.float64) @ w.T.astype(np.float64),
                np.abs(xs).astype(np.float64) @ amp.T)


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q8_0, QT.Q5_K, QT.F16])
def test_threads_bit_identical(qtype):
    """Threads take whole tiles fixed at load, so every row is computed the same way."""
    quant.set_threads(2)  # tiling is chosen for the thread count at load
    rng = np.random.default_rng(7)
    rows, cols = 2100, 512  # >= _SPLIT_WEIGHTS
    m = quant.QuantMatrix.from_raw(qtype, make_raw(qtype, rows, cols, "random", rng), rows, cols)
    assert m._nt % 2 == 0  # the two threads really split it
    x = rng.standard_normal(cols).astype(np.float32)
    xs = [rng.standard_normal((n, cols)).astype(np.float32) for n in (3, 40)]
    two = [m.matvec(x)] + [m.matmul(a) for a in xs]
    quant.set_threads(1)
    one = [m.matvec(x)] + [m.matmul(a) for a in xs]
    assert all(same_bits(a, b) for a, b in zip(one, two))


def test_concurrent_callers_use_their_own_buffers():
    rng = np.random.default_rng(3)
    mats = [quant.QuantMatrix.from_raw(qt, make_raw(qt, 300, 512, "random", rng), 300, 512)
            for qt in (QT.Q4_1, QT.Q5_0, QT.Q8_0, QT.Q6_K)]
    xs = [rng.standard_normal(512).astype(np.float32) for _ in mats]
    want = [m.matvec(x) for m, x in zip(mats, xs)]
    quant.set_threads(2)
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        for _ in range(5):
            got = list(ex.map(lambda mx: mx[0].matvec(mx[1]), zip(mats, xs)))
            assert all(same_bits(a, b) for a, b in zip(got, want))


def check_holds_no_reference_to_raw(from_raw, qtype, mode: str, tmp_path) -> None:
    """A matrix built by ``from_raw`` from rows of a file map keeps no array on the map (the
    loader releases the map's pages), and still multiplies right once the map is gone.
    Both kernel families' tests call it."""
    raw = make_raw(qtype, 64, 256, mode, np.random.default_rng(0))
    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, np.uint8, "r", shape=raw.shape)
    sliced = mm[10:50]  # callers pass row (or block-aligned column) slices of the mmap
    m = from_raw(qtype, sliced, 40, 256)
    for v in vars(m).values():
        if isinstance(v, np.ndarray):
            assert not np.shares_memory(v, mm)
            assert v.base is None or not isinstance(v.base, np.memmap)
    del sliced, mm
    gc.collect()
    assert same_bits(m.dequantize(), oracle(qtype, raw[10:50], 40, 256))


def test_holds_no_reference_to_raw(tmp_path):
    check_holds_no_reference_to_raw(quant.QuantMatrix.from_raw, QT.Q4_1, "normal", tmp_path)


def test_rows_done_reports_copied_rows_in_order(monkeypatch_tiles):
    """The loader drops a big tensor's file pages as rows are copied: from_raw must report
    only rows it no longer reads, in order, ending with all of them."""
    monkeypatch_tiles(True)
    rng = np.random.default_rng(2)
    raw = make_raw(QT.Q8_0, 100, 256, "normal", rng).copy()
    seen: list[int] = []

    def done(r: int) -> None:
        seen.append(r)
        raw[:r] = 0  # what the caller may now drop; a later read of these rows would be wrong

    m = quant.QuantMatrix.from_raw(QT.Q8_0, raw, 100, 256, rows_done=done)
    assert len(seen) > 1 and seen == sorted(seen) and seen[-1] == 100
    assert same_bits(m.dequantize(), oracle(QT.Q8_0, make_raw(QT.Q8_0, 100, 256, "normal",
                                                                 np.random.default_rng(2)), 100, 256))


def test_column_slice_of_raw():
    """A block-aligned column range of the file rows is a valid (non-contiguous) raw."""
    rng = np.random.default_rng(1)
    raw = make_raw(QT.Q4_K, 30, 1024, "random", rng)
    part = raw[:, 144:432]  # blocks 1..2 of 4
    m = quant.QuantMatrix.from_raw(QT.Q4_K, part, 30, 512)
    assert same_bits(m.dequantize(), oracle(QT.Q4_K, raw, 30, 1024)[:, 256:768])


def test_sizes():
    assert quant.block_size(QT.Q4_K) == 256 and quant.block_size(QT.F32) == 1
    assert quant.row_bytes(QT.Q4_1, 576) == 18 * 20
    assert quant.row_bytes(QT.Q6_K, 512) == 2 * 210
    assert quant.row_bytes(QT.F16, 3) == 6
    with pytest.raises(ModelError, match="multiple of 32"):
        quant.row_bytes(QT.Q8_0, 33)
    rng = np.random.default_rng(0)
    m = quant.QuantMatrix.from_raw(QT.Q4_1, make_raw(QT.Q4_1, 1024, 576, "normal", rng),
                                   1024, 576)
    assert 0.95 < m.nbytes / (1024 * 576 * 6 / 8) < 1.1  # 4-bit codes + f32 d and m


# F16 bit patterns every widening must get right: signed zeros, subnormals, the smallest
# normal, +-1, the largest finite, and a few ordinary values.
F16_SPECIALS = np.array([0, 0x8000, 1, 0x8001, 0x03FF, 0x0400, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF,
                         0x3555, 0xC000, 0x0200, 0x8200, 0x1234, 0x9234], np.uint16)


def test_f16_special_values():
    """The integer f16 -> f32 widening: signed zeros, subnormals, extremes; Inf/NaN refused."""
    h = F16_SPECIALS
    raw = np.tile(h, (3, 2)).view(np.uint8)
    m = quant.QuantMatrix.from_raw(QT.F16, raw, 3, 32)
    want = np.tile(h.view(np.float16).astype(np.float32), (3, 2))
    assert same_bits(m._widen(0)[:3], want) and same_bits(m.dequantize(), want)
    x = np.ones(32, np.float32)
    ref = want.astype(np.float64).sum(axis=1)
    check_close(m.matvec(x), ref, np.abs(want).astype(np.float64).sum(axis=1))
    bad = raw.copy().view(np.uint16)
    bad[1, 5] = 0x7C00  # +Inf
    with pytest.raises(ModelError, match="Inf/NaN"):
        quant.QuantMatrix.from_raw(QT.F16, bad.view(np.uint8), 3, 32)


@pytest.mark.parametrize("qtype", [QT.Q2_K, QT.IQ4_NL, QT.TQ1_0])
def test_unsupported_type(qtype):
    with pytest.raises(UnsupportedError, match=qtype.name) as e:
        quant.QuantMatrix.from_raw(qtype, np.zeros((1, 256), np.uint8), 1, 256)
    assert isinstance(e.value, RingError)
    with pytest.raises(UnsupportedError, match=qtype.name):
        quant.row_bytes(qtype, 256)


@pytest.mark.parametrize("bad", [
    np.zeros((4, 41), np.uint8),  # one byte too many per row
    np.zeros((3, 40), np.uint8),  # rows mismatch
    np.zeros((4, 10), np.float32),  # wrong dtype
    np.zeros(160, np.uint8),  # flat
])
def test_wrong_raw(bad):
    with pytest.raises(ModelError, match=r"Q4_1 4x64 needs uint8 raw of shape \(4, 40\)"):
        quant.QuantMatrix.from_raw(QT.Q4_1, bad, 4, 64)


def test_wrong_inputs():
    m = quant.QuantMatrix.from_raw(QT.Q8_0, np.zeros((4, 34), np.uint8), 4, 32)
    with pytest.raises(ValueError, match=r"\(32,\)"):
        m.matvec(np.zeros(33, np.float32))
    with pytest.raises(ValueError, match="out"):
        m.matvec(np.zeros(32, np.float32), out=np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=r"\(n, 32\)"):
        m.matmul(np.zeros((2, 31), np.float32))
    with pytest.raises(IndexError):
        m.rows_f32(np.array([4]))
    with pytest.raises(ValueError):
        quant.set_threads(0)
    assert m.matmul(np.zeros((0, 32), np.float32)).shape == (0, 4)
