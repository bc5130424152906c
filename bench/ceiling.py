"""The most a ring could gain on this machine: P shards computing at once, with no ring.

    python bench/ceiling.py [--model smollm2-135m] [--peers 1 2 3] [--tokens 24] [--rounds 3]

For each P, P processes each load one rank's shard of a P-peer plan and run greedy-shaped
decode steps (one token each, after a 64-token prompt) with the all-reduce left as the
identity: the same matrix products, attention and norms as in a ring, but nothing sent and
nothing waited for. The processes start their timed steps together. What they take per token
is a floor for a real ring's step on this machine: the ring adds its all-reduces and the
waits for the slowest peer. ``ceiling_speedup_vs_p1`` is P=1's ms/token over the slowest
shard's, median over rounds (P values alternate within a round: this box is noisy).

One JSON line per P: ``ms_per_token_by_rank`` (medians), ``ceiling_speedup_vs_p1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def worker(model_spec: str, peers: int, rank: int, tokens: int, start_at: float) -> float:
    """ms per decode step of rank's shard, alone in its process; starts at ``start_at``."""
    import numpy as np

    from ringllm import runtime
    from ringllm.model import Segment

    runtime.set_threads(1)
    info, mf = runtime.open_model(model_spec)
    model = runtime.load_model(mf, runtime.make_plan(info, [1.0] * peers), rank)
    mf.close()
    ids = info.tokenizer.encode("The ring passes a frame from peer to peer. " * 20, parse_special=False)
    cache = model.new_cache()
    model.forward([Segment(cache, np.array(ids[:64]))])
    time.sleep(max(0.0, start_at - time.time()))
    t = time.perf_counter()
    for i in range(tokens):
        model.forward([Segment(cache, np.array([ids[i]]))])
    return (time.perf_counter() - t) / tokens * 1000


def run_round(model_spec: str, peers: int, tokens: int) -> list[float]:
    start_at = time.time() + 6.0  # time for every process to load its shard
    procs = [subprocess.Popen([sys.executable, __file__, "--model", model_spec, "--tokens", str(tokens),
                               "--worker", f"{peers}:{r}:{start_at}"], stdout=subprocess.PIPE)
             for r in range(peers)]
    return [float(p.communicate()[0].decode().split()[-1]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--peers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        peers, rank, start_at = args.worker.split(":", 2)
        print(worker(args.model, int(peers), int(rank), args.tokens, float(start_at)))
        return
    from ringllm.fetch import resolve_model

    resolve_model(args.model)  # fetch once, outside the timed workers
    ps = sorted(set(args.peers) | {1})
    rounds: dict[int, list[list[float]]] = {p: [] for p in ps}
    for _ in range(args.rounds):
        for p in ps:
            rounds[p].append(run_round(args.model, p, args.tokens))
    for p in ps:
        by_rank = [round(statistics.median(r[i] for r in rounds[p]), 1) for i in range(p)]
        speedup = statistics.median(one[0] / max(many) for one, many in zip(rounds[1], rounds[p]))
        print(json.dumps({"bench": "ceiling", "peers": p, "tokens": args.tokens, "rounds": args.rounds,
                          "ms_per_token_by_rank": by_rank, "ceiling_speedup_vs_p1": round(speedup, 2),
                          "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}"}),
              flush=True)


if __name__ == "__main__":
    main()
