"""ringllm.ops.jit (the compiled kernels) against the oracle ``gguf.quants`` and the numpy path
(the property test over random types and shapes runs both families: tests/test_quant.py).

The same tolerance argument as tests/test_quant.py (see its docstring): products within
``1e-5 * (amp @ |x|)`` of the float64 product of gguf's weights; dequantization bit for bit.
The compiled kernels sum in another order than the numpy ones, so the two families agree to
that same bound, not bit for bit; within one family, results are bit-identical whatever the
thread count.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from ringllm.errors import ModelError, UnsupportedError
from ringllm.ops import jit, jit_matrix, quant
from ringllm.ops.kernels import Kernels, choose
from tests.test_quant import (ALL, F16_SPECIALS, GQUANTIZE, amplitude, check_close,
                              check_holds_no_reference_to_raw, make_raw, oracle, same_bits)


@pytest.fixture(autouse=True)
def _threads():
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(1)


def _products(m, rng, cols, ns=(1, 3, jit.GEMM_MIN_N - 1, jit.GEMM_MIN_N, 40)):
    return [rng.standard_normal((n, cols)).astype(np.float32) for n in ns]


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_every_type_and_path_against_gguf_and_numpy(qtype):
    """Each type through one row (decode), a few rows (batched decode) and many (dequantize +
    sgemm); both families within the bound of the oracle, hence of each other."""
    rng = np.random.default_rng(qtype.value)
    rows, cols = 77, 512  # rows not a multiple of the 4-row step or the 16-row block
    raw = make_raw(qtype, rows, cols, "random" if qtype not in GQUANTIZE else "normal", rng)
    w = oracle(qtype, raw, rows, cols)
    amp = amplitude(qtype, raw, rows, cols)
    mj = jit_matrix.JitMatrix.from_raw(qtype, raw, rows, cols)
    mq = quant.QuantMatrix.from_raw(qtype, raw, rows, cols)
    for xs in _products(mj, rng, cols):
        ref = xs.astype(np.float64) @ w.T.astype(np.float64)
        mag = np.abs(xs).astype(np.float64) @ amp.T
        yj, yq = mj.matmul(xs), mq.matmul(xs)
        check_close(yj, ref, mag)
        check_close(yq, ref, mag)
        check_close(yj, yq.astype(np.float64), 2 * mag)  # so the families are within 2e-5 of each other


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q5_0, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.F16])
def test_threads_bit_identical(qtype):
    """Threads split fixed blocks of rows, so the thread count never changes a result."""
    rng = np.random.default_rng(7)
    rows, cols = 301, 512
    m = jit_matrix.JitMatrix.from_raw(qtype, make_raw(qtype, rows, cols, "random", rng), rows, cols)
    xs = _products(m, rng, cols)
    one = [m.matmul(x) for x in xs]
    numba.set_num_threads(2)
    two = [m.matmul(x) for x in xs]
    assert all(same_bits(a, b) for a, b in zip(one, two))


def test_concurrent_callers():
    """Several Python threads in parallel kernels at once (two peers in one process, the
    pipelined prefill): numba's OpenMP layer allows it; results stay the same."""
    rng = np.random.default_rng(3)
    mats = [jit_matrix.JitMatrix.from_raw(qt, make_raw(qt, 300, 512, "random", rng), 300, 512)
            for qt in (QT.Q4_1, QT.Q5_0, QT.Q8_0, QT.Q6_K)]
    xs = [rng.standard_normal((n, 512)).astype(np.float32) for n in (1, 3, 1, 20)]
    want = [m.matmul(x) for m, x in zip(mats, xs)]

    def run(mx):
        numba.set_num_threads(2)
        return mx[0].matmul(mx[1])

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        for _ in range(5):
            got = list(ex.map(run, zip(mats, xs)))
            assert all(same_bits(a, b) for a, b in zip(got, want))


# Held bytes over GGUF bytes, from the layout table in ringllm/ops/jit.py's docstring; the
# issue's bound is 1.35.
HELD = {QT.Q4_0: 20 / 18, QT.Q4_1: 24 / 20, QT.Q5_0: 24 / 22, QT.Q5_1: 28 / 24, QT.Q8_0: 36 / 34,
        QT.Q4_K: 192 / 144, QT.Q5_K: 224 / 176, QT.Q6_K: 256 / 210, QT.F32: 1.0, QT.F16: 1.0, QT.BF16: 1.0}


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_memory_per_gguf_byte(qtype):
    rows, cols = 64, 1024
    raw = make_raw(qtype, rows, cols, "random", np.random.default_rng(0))
    m = jit_matrix.JitMatrix.from_raw(qtype, raw, rows, cols)
    assert m.nbytes / raw.nbytes == pytest.approx(HELD[qtype], rel=1e-6)
    assert m.nbytes <= 1.35 * raw.nbytes


def test_holds_no_reference_to_raw(tmp_path):
    check_holds_no_reference_to_raw(jit_matrix.JitMatrix.from_raw, QT.Q5_K, "random", tmp_path)


def test_rows_done_reports_copied_rows_in_order():
    rng = np.random.default_rng(2)
    raw = make_raw(QT.Q8_0, 2000, 256, "normal", rng).copy()
    want = oracle(QT.Q8_0, raw.copy(), 2000, 256)
    seen: list[int] = []

    def done(r: int) -> None:
        seen.append(r)
        raw[:r] = 0  # the caller may drop these now; a later read of them would be wrong

    m = jit_matrix.JitMatrix.from_raw(QT.Q8_0, raw, 2000, 256, rows_done=done)
    assert len(seen) > 1 and seen == sorted(seen) and seen[-1] == 2000
    assert same_bits(m.dequantize(), want)


def test_column_slice_of_raw():
    rng = np.random.default_rng(1)
    raw = make_raw(QT.Q4_K, 30, 1024, "random", rng)
    m = jit_matrix.JitMatrix.from_raw(QT.Q4_K, raw[:, 144:432], 30, 512)
    assert same_bits(m.dequantize(), oracle(QT.Q4_K, raw, 30, 1024)[:, 256:768])


def test_half_floats_special_values():
    """F16/BF16 widened in registers: signed zeros, subnormals, extremes; F16 Inf/NaN refused."""
    h = F16_SPECIALS
    raw = np.tile(h, (3, 2)).view(np.uint8)
    m = jit_matrix.JitMatrix.from_raw(QT.F16, raw, 3, 32)
    want = np.tile(h.view(np.float16).astype(np.float32), (3, 2))
    assert same_bits(m.dequantize(), want)
    check_close(m.matvec(np.ones(32, np.float32)), want.astype(np.float64).sum(axis=1),
                np.abs(want).astype(np.float64).sum(axis=1))
    bf = np.array([0, 0x8000, 1, 0x8001, 0x007F, 0x0080, 0x3F80, 0xBF80, 0x7F7F, 0xFF7F,
                   0x4049, 0xC000, 0x0040, 0x8040, 0x1234, 0x9234], np.uint16)
    mb = jit_matrix.JitMatrix.from_raw(QT.BF16, np.tile(bf, (2, 2)).view(np.uint8), 2, 32)
    assert same_bits(mb.dequantize(), np.tile((bf.astype(np.uint32) << 16).view(np.float32), (2, 2)))
    bad = raw.copy().view(np.uint16)
    bad[1, 5] = 0x7E00  # NaN
    with pytest.raises(ModelError, match="Inf/NaN"):
        jit_matrix.JitMatrix.from_raw(QT.F16, bad.view(np.uint8), 3, 32)


def test_wrong_input():
    with pytest.raises(ModelError, match=r"Q4_1 4x64 needs uint8 raw of shape \(4, 40\)"):
        jit_matrix.JitMatrix.from_raw(QT.Q4_1, np.zeros((4, 41), np.uint8), 4, 64)
    with pytest.raises(UnsupportedError, match="Q2_K"):
        jit_matrix.JitMatrix.from_raw(QT.Q2_K, np.zeros((1, 84), np.uint8), 1, 256)
    m = jit_matrix.JitMatrix.from_raw(QT.Q8_0, np.zeros((4, 34), np.uint8), 4, 32)
    with pytest.raises(ValueError, match=r"\(32,\)"):
        m.matvec(np.zeros(33, np.float32))
    with pytest.raises(ValueError, match=r"\(n, 32\)"):
        m.matmul(np.zeros((2, 31), np.float32))
    with pytest.raises(IndexError):
        m.rows_f32(np.array([4]))
    assert m.matmul(np.zeros((0, 32), np.float32)).shape == (0, 4)


def test_choose_kernels():
    k = choose("auto", 2, say=lambda s: None)
    assert k == Kernels("numba", 2)
    assert choose("numpy", 1).family == "numpy"
    with pytest.raises(Exception, match="kernels must be one of auto, numba, numpy, got 'fast'"):
        choose("fast", 1)
    quant.set_threads(1)


def test_choose_falls_back_with_one_line(monkeypatch):
    """Where numba cannot import, auto says so once and computes with numpy; numba is refused."""
    import builtins

    from ringllm.ops import kernels

    real_import = builtins.__import__

    def no_numba(name, *a, **kw):
        if name == "numba" or name.startswith("numba."):
            raise ImportError("No module named 'numba'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(kernels, "_compiled", False)
    monkeypatch.setattr(builtins, "__import__", no_numba)
    said: list[str] = []
    assert choose("auto", 1, say=said.append).family == "numpy"
    assert said == ["numba does not import (No module named 'numba'); using the numpy kernels"]
    with pytest.raises(Exception, match="--kernels numba, but numba does not import"):
        choose("numba", 1, say=said.append)


def test_ring_toml_kernels(tmp_path):
    """ring.toml's ``kernels`` takes the families ringllm.ops.kernels knows, and nothing else."""
    from ringllm.ops.kernels import FAMILIES
    from ringllm.ring import config

    assert config.KERNEL_FAMILIES == FAMILIES
    base = config.init_ring_toml(2)
    path = tmp_path / "ring.toml"
    path.write_text('kernels = "numpy"\n' + base)
    assert config.load_ring(path).kernels == "numpy"
    path.write_text(base)
    assert config.load_ring(path).kernels == "auto"
    path.write_text('kernels = "gpu"\n' + base)
    with pytest.raises(Exception, match=r"kernels: must be one of auto, numba, numpy, got 'gpu'"):
        config.load_ring(path)


def test_kernels_are_cached_in_ringllms_cache_whichever_module_comes_first(tmp_path):
    """numba's on-disk cache is ringllm's cache directory even when the fused kernels are
    imported before the matrix kernels (as the kernel loader does). Beside the source it would
    be site-packages, where files pip does not know outlive an uninstall and shadow the next
    install of the package."""
    code = "from ringllm.ops import fused; fused.warm_up(); from ringllm.ops import jit; print(jit.cache_dir())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RINGLLM_CACHE": str(tmp_path)},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "numba")
    cached = {p.name.split("-")[0] for p in (tmp_path / "numba").rglob("*.nbi")}
    assert {"fused._rmsnorm", "fused._rope"} <= cached
