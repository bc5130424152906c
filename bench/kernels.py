"""Benchmark the quantized kernels of ringllm.ops.quant on SmolLM2-135M shapes.

Prints one JSON line per (qtype, shape, op, threads) with the best (min over interleaved
repeats: the machine is shared and noisy) time and G weights/s, then lines estimating decode
and prefill tokens/s for SmolLM2-135M (30 layers, Q4_1, tied Q8_0 embedding) from those times.

    python bench/kernels.py                 # SmolLM2 shapes, threads 1 and 2
    python bench/kernels.py --all-types     # plus every supported type at 2048x1024
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from threadpoolctl import threadpool_limits

from ringllm.ops import quant

LAYERS = 30
# name -> (rows, cols); attn q|k|v and ffn gate|up are concatenated along rows as the model does.
LAYER_SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
HEAD = (49152, 576)


def random_raw(qtype, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks with sane f16 scales (kernel speed does not depend on the values)."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    if qtype == QT.F32:
        return rng.standard_normal((rows, cols), np.float32).view(np.uint8)
    if qtype in (QT.F16, QT.BF16):
        h = rng.standard_normal((rows, cols), np.float32)
        h = h.astype(np.float16).view(np.uint16) if qtype == QT.F16 else h.view(np.uint32) >> 16
        return h.astype(np.uint16).view(np.uint8)
    b = rng.integers(0, 256, (rows * cols // bs, ts), dtype=np.uint8)
    scale = rng.uniform(0.001, 0.01, len(b)).astype(np.float16).view(np.uint8)
    at = {QT.Q6_K: [208], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2]}.get(qtype, [0])
    if qtype in (QT.Q4_1, QT.Q5_1):
        at = [0, 2]
    for a in at:
        b[:, a:a + 2] = scale.reshape(len(b), 2)
    return b.reshape(rows, -1)


def measure(cases, rounds: int, budget_s: float, pause_s: float = 0.0) -> dict:
    """cases: key -> (fn, weights). Interleaves all cases ``rounds`` times; min per-call seconds.

    ``pause_s`` sleeps between rounds so the samples span quiet and busy phases of the host.
    """
    best = {k: float("inf") for k in cases}
    for k, (fn, _) in cases.items():  # warm up buffers and thread pool
        fn()
    for _ in range(rounds):
        time.sleep(pause_s)
        for k, (fn, w) in cases.items():
            reps = max(1, int(budget_s / max(w * 0.3e-9, 1e-6)))
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t) / reps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--budget", type=float, default=0.01, help="seconds per timing sample")
    ap.add_argument("--pause", type=float, default=0.1, help="seconds between rounds")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prefill-n", type=int, default=128)
    ap.add_argument("--all-types", action="store_true")
    args = ap.parse_args()
    threadpool_limits(1, user_api="blas")
    rng = np.random.default_rng(0)

    mats = {name: (QT.Q4_1, shape) for name, shape in LAYER_SHAPES.items()}
    mats["head"] = (QT.Q8_0, HEAD)
    if args.all_types:
        for qt in sorted(quant.SUPPORTED, key=lambda t: t.value):
            mats[f"all-{qt.name}"] = (qt, (2048, 1024))
    n = args.prefill_n
    xs = {c: rng.standard_normal(c, np.float32) for _, (_, (_, c)) in mats.items()}
    Xs = {c: rng.standard_normal((n, c), np.float32) for _, (_, (_, c)) in mats.items()}
    raws = {name: random_raw(qt, r, c, rng) for name, (qt, (r, c)) in mats.items()}

    for threads in [int(t) for t in args.threads.split(",")]:
        quant.set_threads(threads)  # before loading: tiles are cut for the thread count
        built = {name: quant.QuantMatrix.from_raw(qt, raws[name], r, c)
                 for name, (qt, (r, c)) in mats.items()}
        mv, mm = {}, {}
        for name, m in built.items():
            w = m.rows * m.cols
            x, X, out = xs[m.cols], Xs[m.cols], np.empty(m.rows, np.float32)
            mv[(name, "matvec", threads)] = (lambda m=m, x=x, o=out: m.matvec(x, o), w)
            if name != "head":
                mm[(name, "matmul", threads)] = (lambda m=m, X=X: m.matmul(X), w * n)
        # decode and prefill kernels are timed apart: sgemm-heavy prefill samples slow the
        # matvec samples that follow them (clock/cache effects), which a decode never sees.
        best = (measure(mv, args.rounds, args.budget, args.pause)
                | measure(mm, args.rounds, args.budget, args.pause))
        for (name, op, th), s in best.items():
            m = built[name]
            print(json.dumps({
                "qtype": m.qtype.name, "shape": [m.rows, m.cols], "name": name, "op": op,
                "n": n if op == "matmul" else 1, "threads": th, "us": round(s * 1e6, 1),
                # matmul: weights x tokens per second
                "gw_s": round(m.rows * m.cols * (n if op == "matmul" else 1) / s / 1e9, 3),
                **({"gflop_s": round(2 * m.rows * m.cols * n / s / 1e9, 1),
                    "tok_s": round(n / s, 1)} if op == "matmul" else {}),
            }), flush=True)
        layer_mv = sum(best[(k, "matvec", threads)] for k in LAYER_SHAPES)
        decode = LAYERS * layer_mv + best[("head", "matvec", threads)]
        weights = LAYERS * sum(r * c for r, c in LAYER_SHAPES.values()) + HEAD[0] * HEAD[1]
        print(json.dumps({
            "estimate": "smollm2-135m decode (kernels only)", "threads": threads,
            "ms_per_token": round(decode * 1e3, 2), "tok_s": round(1 / decode, 1),
            "gw_s": round(weights / decode / 1e9, 3)}), flush=True)
        prefill = LAYERS * sum(best[(k, "matmul", threads)] for k in LAYER_SHAPES)
        prefill += best[("head", "matvec", threads)]  # logits of the last token only
        print(json.dumps({
            "estimate": f"smollm2-135m prefill n={n} (kernels only)", "threads": threads,
            "ms": round(prefill * 1e3, 1), "tok_s": round(n / prefill, 1)}), flush=True)
    quant.set_threads(1)


if __name__ == "__main__":
    main()
