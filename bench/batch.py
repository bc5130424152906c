"""The decode-batch and prefill kernels (ringllm/ops/jit_batch.py) and the compiled per-token
math (ringllm/ops/fused.py) against what they replace: one JSON line per result.

    python bench/batch.py [--ns 2 4 8 15 128] [--rounds 7] [--fused-rows 1 8]
    python bench/batch.py --steps 9 [--threads 1] [--model smollm2-135m]

Thread CPU time (``time.thread_time``: the box is shared, and this counts only our thread),
one thread (numba and BLAS), min over ``--rounds`` runs alternating old/new:

- per matrix and n: ``new_ns_per_w`` (``JitMatrix.matmul``: gemm_batch below
  ``jit.GEMM_MIN_N`` rows, decode + sgemm from it), and where the old kernels still exist,
  ``old_ns_per_w`` (``jit.gemm_small`` below 16 rows, the exact ``jit.dequant_rows`` + sgemm
  from 16: the kernels before jit_batch);
  ``blas_ns_per_w`` (decode + sgemm at every n: where the switch should be) and
  ``gemv_x_n_ns_per_w`` (n one-row GEMVs);
- per fused op at SmolLM2's decode shapes: microseconds per call, nn (numpy) vs fused, and
  the saving per decode step (calls per step x difference).

``--steps R``: instead, the whole model in one process: wall time of a decode step for one
sequence and for eight (each after its own 64-token prompt), 10 steps each, R rounds
alternating which goes first; medians and ``speedup_8_over_1`` = 8 x step(1) / step(8), the
serving figure without HTTP or scheduling (bench/serve.py measures those too).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numba  # noqa: E402
import numpy as np  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from bench.kernels import random_raw  # noqa: E402
from ringllm import nn  # noqa: E402
from ringllm.ops import fused, jit  # noqa: E402
from ringllm.ops.jit_matrix import JitMatrix  # noqa: E402

SHAPES = [(QT.Q4_1, 3072, 576), (QT.Q4_1, 576, 1536), (QT.Q8_0, 8192, 576), (QT.Q6_K, 1024, 1024),
          (QT.Q5_0, 1024, 1024), (QT.Q4_K, 1024, 1024)]


def best_of(cases: dict, rounds: int) -> dict:
    """cases: name -> fn. Thread CPU seconds of each, min over rounds, order alternating."""
    for f in cases.values():
        f()
    best = {k: float("inf") for k in cases}
    names = list(cases)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            t = time.thread_time()
            cases[k]()
            best[k] = min(best[k], time.thread_time() - t)
    return best


def old_product(mat: JitMatrix, x: np.ndarray, out: np.ndarray) -> None:
    """The kernels before jit_batch, called on the same held matrix (its fields are read here,
    in a bench, on purpose: they are the kernels' arguments)."""
    m = mat._m if mat._m is not None else np.zeros((0, 0), np.float32)
    qh = mat._qh if mat._qh is not None else np.zeros((0, 0), np.uint32)
    n = x.shape[0]
    if n < 16:  # the old switch to sgemm
        xs = x.reshape(n, -1, mat._gs).sum(axis=2, dtype=np.float32)
        jit.gemm_small(mat._fmt, mat._qs, qh, mat._d, m, mat._off, x, xs, out)
        return
    step = max(jit.ROW_BLOCK, jit.GEMM_CHUNK_WEIGHTS // mat.cols // jit.ROW_BLOCK * jit.ROW_BLOCK)
    buf = np.empty((min(step, mat.rows), mat.cols), np.float32)
    for r0 in range(0, mat.rows, step):
        w = buf[: min(step, mat.rows - r0)]
        jit.dequant_rows(mat._fmt, mat._qs, qh, mat._d, m, mat._off, r0, w)
        np.matmul(x, w.T, out=out[:, r0:r0 + len(w)])


def matrices(ns: list[int], rounds: int) -> None:
    rng = np.random.default_rng(0)
    has_old = hasattr(jit, "gemm_small")
    for qt, rows, cols in SHAPES:
        mat = JitMatrix.from_raw(qt, random_raw(qt, rows, cols, rng), rows, cols)
        for n in ns:
            x = rng.standard_normal((n, cols)).astype(np.float32)
            out = np.empty((n, rows), np.float32)
            cases = {"new": lambda: mat.matmul(x),
                     "blas": lambda: mat._gemm_blas(x, out),
                     "gemv_x_n": lambda: [mat.matvec(x[i]) for i in range(n)]}
            if has_old:
                cases["old"] = lambda: old_product(mat, x, out)
            best = best_of(cases, rounds)
            w = rows * cols
            line = {"bench": "batch", "type": qt.name, "rows": rows, "cols": cols, "n": n,
                    **{f"{k}_ns_per_w": round(v / w * 1e9, 3) for k, v in best.items()}}
            if has_old:
                line["old_over_new"] = round(best["old"] / best["new"], 2)
            print(json.dumps(line), flush=True)


def fused_ops(rows: int, rounds: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, 576)).astype(np.float32)
    w = rng.standard_normal(576).astype(np.float32)
    q = rng.standard_normal((rows, 9, 64)).astype(np.float32)
    k = rng.standard_normal((rows, 3, 64)).astype(np.float32)
    f = nn.rope_factors(np.arange(100, 100 + rows), 64, 10000.0)
    qa = rng.standard_normal((3, 3, 64)).astype(np.float32)
    kc = rng.standard_normal((3, 256, 64)).astype(np.float32)
    vc = rng.standard_normal((3, 256, 64)).astype(np.float32)
    ops = {  # name: (calls per decode step of SmolLM2, function of a module)
        "rmsnorm": (61, lambda mod: mod.rmsnorm(x, w, 1e-5)),
        "rope_q_and_k": (30, lambda mod: (mod.rope(q, f, False), mod.rope(k, f, False))),
        "attention_1_token_L128": (30 * rows, lambda mod: mod.cached_attention(qa, kc, vc, 128, None)),
    }
    reps = 50
    for name, (calls, fn) in ops.items():
        best = best_of({mod.__name__: (lambda mod=mod: [fn(mod) for _ in range(reps)]) for mod in (nn, fused)}, rounds)
        a, b = best[nn.__name__] / reps, best[fused.__name__] / reps
        print(json.dumps({"bench": "fused", "op": name, "rows": rows, "numpy_us": round(a * 1e6, 2),
                          "fused_us": round(b * 1e6, 2), "calls_per_step": calls,
                          "saves_ms_per_step": round((a - b) * calls * 1e3, 3)}), flush=True)


def model_steps(model_spec: str, threads: int, rounds: int) -> None:
    from ringllm import runtime
    from ringllm.model import Segment

    chosen = runtime.set_threads(threads)
    info, mf = runtime.open_model(model_spec)
    model = runtime.load_model(mf, runtime.make_plan(info, [1.0]), 0)
    mf.close()
    text = "The history of the ring network begins with the token ring, a local area network. " * 8
    ids = info.tokenizer.encode(text, parse_special=False)
    caches = {}
    for n in (1, 8):
        caches[n] = [model.new_cache() for _ in range(n)]
        for i, c in enumerate(caches[n]):
            model.forward([Segment(c, np.array(ids[i:i + 64]))])
    times: dict[int, list[float]] = {1: [], 8: []}
    for r in range(rounds):
        for n in (1, 8) if r % 2 == 0 else (8, 1):
            t = time.perf_counter()
            for _ in range(10):
                model.forward([Segment(c, np.array([5])) for c in caches[n]])
                for c in caches[n]:
                    c.length -= 1  # the same position every step: equal work in every round
            times[n].append((time.perf_counter() - t) / 10)
    m1, m8 = float(np.median(times[1])), float(np.median(times[8]))
    print(json.dumps({"bench": "batch_steps", "model": model_spec, "kernels": chosen.family, "threads": threads,
                      "rounds": rounds, "step_ms_1": round(m1 * 1e3, 2), "step_ms_8": round(m8 * 1e3, 2),
                      "speedup_8_over_1": round(8 * m1 / m8, 2)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 4, 8, 15, 16, 32, 128])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--fused-rows", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--steps", type=int, default=0, help="rounds of whole-model decode steps, 1 vs 8 streams")
    ap.add_argument("--threads", type=int, default=1, help="with --steps: kernel threads")
    ap.add_argument("--model", default="smollm2-135m", help="with --steps: the model")
    args = ap.parse_args()
    if args.steps:
        model_steps(args.model, args.threads, args.steps)
        return
    threadpool_limits(1)
    numba.set_num_threads(1)
    matrices(args.ns, args.rounds)
    for rows in args.fused_rows:
        fused_ops(rows, max(args.rounds, 30))


if __name__ == "__main__":
    main()
