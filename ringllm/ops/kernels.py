"""Which kernels compute, and on how many threads: one object, chosen once per process.

Two families compute the same products: ``numba`` (compiled, :mod:`ringllm.ops.jit`; the
default where numba imports) and ``numpy`` (:mod:`ringllm.ops.quant`; the reference, and the
fallback). Sums run in another order in each, so their results differ in the last bits: every
peer of a ring must use the same family (the handshake compares it), and a ring's output is
identical to one peer's only with the same family.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ringllm import nn
from ringllm.errors import ConfigError
from ringllm.ops import quant

log = logging.getLogger("ringllm.kernels")

FAMILIES = ("auto", "numba", "numpy")


@dataclass(frozen=True)
class Kernels:
    """A kernel family and its thread count. Pass it to the loader; call :meth:`bind` in each
    thread that runs kernels (numba's thread count is per calling thread)."""

    family: str  # "numba" | "numpy"
    threads: int

    def matrix(self, qtype, raw: np.ndarray, rows: int, cols: int,
               rows_done: Callable[[int], None] | None = None):
        """A weight matrix from its GGUF rows, held for this family's kernels."""
        if self.family == "numba":
            from ringllm.ops.jit_matrix import JitMatrix

            return JitMatrix.from_raw(qtype, raw, rows, cols, rows_done=rows_done)
        return quant.QuantMatrix.from_raw(qtype, raw, rows, cols, rows_done=rows_done)

    @property
    def nn(self):
        """The per-token math for this family: :mod:`ringllm.ops.fused` (compiled) for numba,
        :mod:`ringllm.nn` (the reference) for numpy; both have the same functions."""
        if self.family == "numba":
            from ringllm.ops import fused

            return fused
        return nn

    def bind(self) -> None:
        """Make the calling thread's kernels use ``threads`` threads."""
        if self.family == "numba":
            import numba

            if numba.get_num_threads() != self.threads:
                numba.set_num_threads(self.threads)


def choose(requested: str, threads: int, say: Callable[[str], None] | None = None) -> Kernels:
    """The kernels for ``--kernels requested`` on ``threads`` threads.

    ``auto`` takes numba when it imports and falls back to numpy with one line saying why;
    ``numba`` that cannot import is a ConfigError. The numpy family's worker pool is set up
    here (:func:`ringllm.ops.quant.set_threads`); BLAS itself stays on one thread (we split
    rows ourselves). The first use of numba compiles the kernels into numba's on-disk cache
    (``compiling kernels, first run only``: ~1-2 min here); later processes load them.
    """
    if requested not in FAMILIES:
        raise ConfigError(f"kernels must be one of {', '.join(FAMILIES)}, got {requested!r}")
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    say = say or log.warning
    family = requested
    if requested in ("auto", "numba"):
        try:
            _load_numba(threads, say)
            family = "numba"
        except ImportError as exc:
            if requested == "numba":
                raise ConfigError(f"--kernels numba, but numba does not import: {exc}") from None
            say(f"numba does not import ({exc}); using the numpy kernels")
            family = "numpy"
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    quant.set_threads(threads if family == "numpy" else 1)
    return Kernels(family, threads)


_compiled = False


def _load_numba(threads: int, say: Callable[[str], None]) -> None:
    global _compiled
    import numba  # ImportError here means: fall back (auto) or refuse (numba)

    if numba.config.NUMBA_NUM_THREADS < threads:
        raise ConfigError(f"{threads} kernel threads requested, but numba allows "
                          f"{numba.config.NUMBA_NUM_THREADS} (NUMBA_NUM_THREADS)")
    if _compiled:
        return
    from ringllm.ops import fused, jit, jit_matrix

    t = time.perf_counter()
    if not jit.cache_is_warm():
        say("compiling kernels, first run only (about a minute or two)")
    jit_matrix.warm_up()
    fused.warm_up()
    took = time.perf_counter() - t
    if took > 5:
        say(f"kernels compiled in {took:.0f} s (cached in {jit.cache_dir()})")
    _compiled = True
