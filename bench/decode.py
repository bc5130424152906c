"""Single-peer speed and memory: one JSON line per result.

    python bench/decode.py [--model smollm2-135m] [--threads 1 2] [--repeats 3] [--long-prompt 512]

Each thread count runs in its own subprocess (so peak RSS is its own), side by side in one
run. Per run: prefill tokens/s for a 128-token prompt and for a --long-prompt one (0: skip),
decode tokens/s for 128 greedy tokens after a 64-token prompt (best of --repeats; the two
prefills interleaved); RSS once the model is loaded (before any request)
and its peak so far (the load), the peak over the whole run (KV caches and work buffers
included), each also above a bare ``python -c "import numpy"`` measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

TEXT = ("The history of the ring network begins with the token ring, a local area network in which each "
        "station passes a small frame to its neighbour; the frame circulates until a station claims it. ")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(model_spec: str, threads: int, repeats: int, long_prompt: int, kernels: str) -> dict:
    import numpy as np

    from ringllm import runtime
    from ringllm.model import Segment

    t0 = time.perf_counter()
    chosen = runtime.set_threads(threads, kernels)
    kernels_s = time.perf_counter() - t0
    info, mf = runtime.open_model(model_spec)
    model = runtime.load_model(mf, runtime.make_plan(info, [1.0]), 0)
    mf.close()
    loaded_rss, load_peak = current_rss_mb(), peak_rss_mb()  # the model loaded, no request yet
    ids = info.tokenizer.encode(TEXT * (8 + long_prompt // 32), parse_special=False)
    p128, p64, plong = np.array(ids[:128]), np.array(ids[:64]), np.array(ids[:long_prompt])
    model.forward([Segment(model.new_cache(), p64[:8])])  # warm-up: buffers, pools

    prefill, prefill_long = [], []
    for _ in range(repeats):
        for prompt, times in ((p128, prefill), (plong, prefill_long)) if long_prompt else ((p128, prefill),):
            t = time.perf_counter()
            model.forward([Segment(model.new_cache(), prompt)])
            times.append(time.perf_counter() - t)

    decode = []
    for _ in range(repeats):
        cache = model.new_cache()
        logits = model.forward([Segment(cache, p64)])[0]
        t = time.perf_counter()
        for _ in range(128):
            tok = int(np.argmax(logits))
            logits = model.forward([Segment(cache, np.array([tok]))])[0]
        decode.append(time.perf_counter() - t)
    return {
        "bench": "decode",
        "model": os.path.basename(info.path),
        "threads": threads,
        "kernels": chosen.family,
        "kernels_ready_s": round(kernels_s, 2),
        "decode_tok_s": round(128 / min(decode), 2),
        "prefill_tok_s": round(128 / min(prefill), 1),
        "prefill_tokens": 128,
        **({"prefill_long_tok_s": round(long_prompt / min(prefill_long), 1), "prefill_long_tokens": long_prompt}
           if long_prompt else {}),
        "decode_tokens": 128,
        "decode_prompt_tokens": 64,
        "loaded_rss_mb": round(loaded_rss, 1),
        "load_peak_rss_mb": round(load_peak, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_mb": round(current_rss_mb(), 1),
        "weights_mb": round(model.w.nbytes / 2**20, 1),
    }


def baseline_rss() -> float:
    code = "import numpy, resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)"
    return float(subprocess.check_output([sys.executable, "-c", code]).strip())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long-prompt", type=int, default=512, help="tokens of the long prefill (0: skip it)")
    ap.add_argument("--kernels", nargs="+", default=["auto"], choices=["auto", "numba", "numpy"],
                    help="kernel families to run; several alternate within each round")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole set, alternating families")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.model, args.worker, args.repeats, args.long_prompt, args.kernels[0])))
        return
    from ringllm.fetch import resolve_model

    resolve_model(args.model)  # fetch once, outside the timed workers
    base = baseline_rss()
    for rnd, n, fam in [(r, n, f) for r in range(args.rounds) for n in args.threads for f in args.kernels]:
        out = subprocess.check_output([sys.executable, __file__, "--model", args.model, "--repeats",
                                       str(args.repeats), "--long-prompt", str(args.long_prompt),
                                       "--kernels", fam, "--worker", str(n)])
        row = json.loads(out.decode().strip().splitlines()[-1])
        row["round"] = rnd
        row["numpy_baseline_rss_mb"] = round(base, 1)
        row["loaded_rss_above_numpy_mb"] = round(row["loaded_rss_mb"] - base, 1)
        row["load_peak_above_numpy_mb"] = round(row["load_peak_rss_mb"] - base, 1)
        row["peak_rss_above_numpy_mb"] = round(row["peak_rss_mb"] - base, 1)
        row["machine"] = f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}"
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
