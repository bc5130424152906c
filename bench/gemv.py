"""The compiled one-row GEMV (``JitMatrix.matvec``) as a SmolLM2-135M decode token sees it.

    python bench/gemv.py [--threads 1 2] [--rounds 12]

Builds 30 layers of SmolLM2's matrices (q|k|v 960x576, o 576x576, gate|up 3072x576, down
576x1536, Q4_1) and the 49152x576 Q8_0 output matrix from random blocks, all distinct (111 MB,
more than the last-level cache), and runs the 121 products of one token in model order, so
every matrix streams from DRAM as it does in the model. Prints one JSON line per thread count:
the min and median ms per token over ``--rounds`` (the first is a warm-up) and, per kind of
matrix, its best ms per token and ns per weight. Kernels only: no attention, no numpy glue.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numba  # noqa: E402
import numpy as np  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402

from bench.kernels import random_raw  # noqa: E402
from ringllm.ops.jit_matrix import JitMatrix  # noqa: E402

LAYERS = 30
SHAPES = [("qkv", QT.Q4_1, 960, 576), ("o", QT.Q4_1, 576, 576), ("gate_up", QT.Q4_1, 3072, 576),
          ("down", QT.Q4_1, 576, 1536)]
HEAD = ("head", QT.Q8_0, 49152, 576)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    seq = [(name, JitMatrix.from_raw(qt, random_raw(qt, r, c, rng), r, c))
           for _ in range(LAYERS) for name, qt, r, c in SHAPES]
    name, qt, r, c = HEAD
    seq.append((name, JitMatrix.from_raw(qt, random_raw(qt, r, c, rng), r, c)))
    xs = {c: rng.standard_normal(c).astype(np.float32) for c in (576, 1536)}
    outs = {m.rows: np.empty(m.rows, np.float32) for _, m in seq}
    weights = collections.Counter()
    for name, m in seq:
        weights[name] += m.rows * m.cols
    for threads in args.threads:
        numba.set_num_threads(threads)
        best, tokens = collections.defaultdict(lambda: float("inf")), []
        for rnd in range(args.rounds):
            acc = collections.defaultdict(float)
            t0 = time.perf_counter()
            for name, m in seq:
                t = time.perf_counter()
                m.matvec(xs[m.cols], outs[m.rows])
                acc[name] += time.perf_counter() - t
            if rnd:  # round 0 warms up
                tokens.append(time.perf_counter() - t0)
                for k, v in acc.items():
                    best[k] = min(best[k], v)
        print(json.dumps({
            "bench": "gemv", "threads": threads, "ms_token_min": round(min(tokens) * 1e3, 2),
            "ms_token_median": round(float(np.median(tokens)) * 1e3, 2),
            **{k: {"ms": round(best[k] * 1e3, 2), "ns_per_weight": round(best[k] * 1e9 / weights[k], 3)}
               for k in weights}}), flush=True)


if __name__ == "__main__":
    main()
