"""Measured and projected decode tok/s for P = 1, 2, 3, 4, 8 peers on separate machines.

    python bench/scale.py [--model smollm2-135m] [--peers 1 2 3 4 8] [--threads 1]
                          [--tokens 16] [--rounds 3] [--comm-peers 2 3 4] [--ring-peers 1 2]
                          [--linkemu-dir ../shared/tools/linkemu] [--profile 1gbit-0.2ms]

Run as root (network namespaces). One JSON line per result:

1. ``compute``, per P: every rank's shard of the P-peer plan, loaded in this process and run
   alone, one rank at a time (so the box's two cores do not slow each other down), through
   ``--tokens`` one-token decode steps after a 64-token prompt with the all-reduce left as
   the identity (as bench/ceiling.py does): ms per token by rank (median over ``--rounds``
   rounds, ranks alternating within a round) and ``max_rank_ms``, the slowest rank's.
2. ``comm``, per P in ``--comm-peers``: P processes, each in its own linkemu namespace (links
   shaped to ``--profile``: /work/shared/tools/linkemu/README.md), running a decode token's
   collectives and nothing else, from a worker thread with the links lent to it as a peer's
   compute thread does (``Collectives.lend_to_thread``, ``allreduce_sync``): one small
   all-gather (control), the embedding all-reduce, 2 all-reduces per layer of ``dim`` float32,
   one small all-gather (greedy candidates). ``token_ms``: median per token on rank 0. Also
   single all-reduces of ``dim``, 16384 and 65536 floats (``allreduce_us``: the mean after
   the first tenth, the exchange algorithm forced), for the fit. Means, not medians: a token
   sums its 2L+3 calls, tail latencies included.
3. ``model``: the alpha-beta fit. The exchange all-reduce moves every vector floor(P/2) hops
   one way (and floor((P-1)/2) the other, at the same time), so one collective of an s-byte
   frame costs ``h(P) * (alpha + s / beta)`` with ``h(P) = floor(P/2)``; alpha and beta are the
   least-squares fit to every ``allreduce_us`` point. A token then costs

       comm_model(P) = h(P) * ((2L+1) * (alpha + frame(4*dim) / beta) + 2 * (alpha + frame(60) / beta))

   (frame(n): an n-byte payload with its frame header, bench/ring.py's ``frame_bytes``).
4. ``ring``, per P in ``--ring-peers``: bench/ring.py --linkemu (a real ring of peer processes
   in the namespaces, client-seen decode tok/s): the measured figure, for P that fits the box.
5. ``projection``, per P: ``projected_tok_s = 1000 / (max_rank_ms(P) + comm_ms(P))``, with
   ``comm_ms`` the measured ``token_ms`` where P was in ``--comm-peers``, else ``comm_model(P)``
   (``comm_source`` says which; P=1 has none); ``measured_tok_s`` from step 4 where there is one.
6. ``anchor``: distributed-llama's published figures (Llama 2 7B Q40, Raspberry Pi 4B, 1 GbE).

linkemu is brought up for max(--comm-peers, --ring-peers) namespaces and taken down at the end
(``--linkemu-keep``: neither, use namespaces that are already up). With ``--comm-peers`` and
``--ring-peers`` both empty no root is needed and comm_ms is the model with ``--alpha-us``
and ``--beta-mbit`` given by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

TEXT = "The ring passes a frame from peer to peer. "
PROMPT_TOKENS = 64
SMALL_GATHER_FLOATS = 15  # the step's control / greedy-candidate all-gathers: under 100 bytes (ring.py)
# All-reduce sizes of the alpha-beta fit besides dim: 64 KB fits linkemu's token-bucket burst
# (128 kB at 1 Gbit), 256 KB does not, so it pays the link rate (the fit's beta).
SWEEP_FLOATS = (16384, 65536)
COMM_PORT = 29300
# distributed-llama's README (b4rtaz/distributed-llama): Llama 2 7B Q40 on Raspberry Pi 4B
# 8 GB over 1 GbE, ms a token at 1 / 2 / 4 / 8 nodes.
ANCHOR_MS = {1: 1312, 2: 794, 4: 494, 8: 588}


def hops(p: int) -> int:
    return p // 2


def netns(rank: int) -> str:
    return f"collring-ns{rank}"


# --- 1. compute, one shard at a time ------------------------------------------------------------

def measure_compute(model_path: str, peers: list[int], threads: int, tokens: int, rounds: int) -> dict[int, dict]:
    import numpy as np

    from ringllm import runtime
    from ringllm.model import Segment

    runtime.set_threads(threads)
    info, mf = runtime.open_model(model_path)
    ids = info.tokenizer.encode(TEXT * (PROMPT_TOKENS // 4 + 1), parse_special=False)
    if len(ids) < PROMPT_TOKENS + tokens * rounds:
        raise SystemExit(f"scale: the prompt text gives {len(ids)} tokens, need {PROMPT_TOKENS + tokens * rounds}")
    out = {}
    try:
        for p in peers:
            plan = runtime.make_plan(info, [1.0] * p)
            models = [runtime.load_model(mf, plan, r, max_len=PROMPT_TOKENS + tokens * rounds + 8) for r in range(p)]
            caches = [m.new_cache() for m in models]
            for m, c in zip(models, caches):  # prompt, untimed (also the warm-up)
                m.forward([Segment(c, np.array(ids[:PROMPT_TOKENS]))])
            ms: list[list[float]] = [[] for _ in range(p)]
            for rnd in range(rounds):
                pos = PROMPT_TOKENS + rnd * tokens
                for r in range(p):
                    t = time.perf_counter()
                    for i in range(tokens):
                        models[r].forward([Segment(caches[r], np.array([ids[pos + i]]))])
                    ms[r].append((time.perf_counter() - t) / tokens * 1000)
            by_rank = [statistics.median(x) for x in ms]
            out[p] = {"bench": "scale", "part": "compute", "peers": p, "threads": threads, "tokens": tokens,
                      "rounds": rounds, "ms_by_rank": [round(x, 2) for x in by_rank],
                      "max_rank_ms": round(max(by_rank), 2), "load": os.getloadavg()[0]}
            print(json.dumps(out[p]), flush=True)
            del models, caches
    finally:
        mf.close()
    return out


# --- 2. communication on linkemu ----------------------------------------------------------------

async def comm_worker(rank: int, size: int, dim: int, n_layers: int, tokens: int, iters: int) -> None:
    """One rank of the communication-only ring; rank 0 prints its JSON result."""
    import numpy as np

    from ringllm.ring.collectives import Collectives
    from ringllm.ring.handshake import HandshakeInfo
    from ringllm.ring.formation import open_tcp_ring

    addrs = [(f"10.77.0.{r + 1}", COMM_PORT) for r in range(size)]
    me = HandshakeInfo(ring="scale", rank=rank, size=size, model="m", plan="p")
    links = await open_tcp_ring(rank, addrs, me=me, secret=b"bench-scale", recv_timeout=60.0)
    # The exchange algorithm at every size (the model's; a token's all-reduces of dim floats
    # use it anyway: dim is under every P's crossover, SMALL_MAX_* in ring/collectives.py).
    coll = Collectives(rank, size, links, "f32", small_max_elems=1 << 40)
    rng = np.random.default_rng(rank)
    vec = rng.standard_normal(dim).astype(np.float32)
    small = rng.standard_normal(SMALL_GATHER_FLOATS).astype(np.float32)
    sweep = {n: rng.standard_normal(n).astype(np.float32) for n in (dim, *SWEEP_FLOATS)}

    def token() -> None:
        coll.allgather_sync(small)
        coll.allreduce_sync(vec, exact=True)  # the embedding's
        for _ in range(2 * n_layers):
            coll.allreduce_sync(vec)
        coll.allgather_sync(small)

    def one(x) -> float:
        t = time.perf_counter()
        coll.allreduce_sync(x)
        return time.perf_counter() - t

    async def lent(fn, *args):
        await coll.lend_to_thread()
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            coll.take_back()

    try:
        token_ms = []
        for i in range(tokens + 2):  # two warm-up tokens
            t = time.perf_counter()
            await lent(token)
            if i >= 2:
                token_ms.append((time.perf_counter() - t) * 1000)
        sweep_us = {}
        for n, x in sweep.items():
            samples = await lent(lambda x=x: [one(x) for _ in range(iters)])
            sweep_us[n] = statistics.mean(samples[iters // 10:]) * 1e6  # mean: a token sums its calls
        # A rank can finish the last exchange while a neighbour still waits for its final
        # frames; a goodbye arriving with them failed that neighbour at P=4. Linger first.
        await asyncio.sleep(2.0)
    finally:
        await links.shutdown("scale benchmark done")
    if rank == 0:
        print(json.dumps({"token_ms": statistics.median(token_ms), "token_ms_all": [round(t, 2) for t in token_ms],
                          "allreduce_us": {str(n): round(v, 1) for n, v in sweep_us.items()}}), flush=True)


def measure_comm(p: int, dim: int, n_layers: int, tokens: int, iters: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--comm-worker",
           f"{p}:{dim}:{n_layers}:{tokens}:{iters}"]
    procs = [subprocess.Popen(["ip", "netns", "exec", netns(r), *cmd, str(r)],
                              stdout=subprocess.PIPE, text=True) for r in range(p)]
    outs = [pr.communicate(timeout=600)[0] for pr in procs]
    bad = [r for r, pr in enumerate(procs) if pr.returncode != 0]
    if bad:
        raise RuntimeError(f"comm workers of rank(s) {bad} failed at P={p} (their stderr is above)")
    res = json.loads(outs[0].strip().splitlines()[-1])
    row = {"bench": "scale", "part": "comm", "peers": p, "tokens": tokens, "token_ms": round(res["token_ms"], 3),
           "token_ms_all": res["token_ms_all"], "allreduce_us": res["allreduce_us"], "load": os.getloadavg()[0]}
    print(json.dumps(row), flush=True)
    return row


# --- 3. the alpha-beta fit ----------------------------------------------------------------------

def fit_alpha_beta(comm: dict[int, dict]) -> tuple[float, float]:
    """alpha (s) and beta (bytes/s) from t = h(P) * (alpha + frame(4n) / beta) over all points."""
    import numpy as np

    from ring import frame_bytes

    rows, ts = [], []
    for p, c in comm.items():
        for n, us in c["allreduce_us"].items():
            rows.append([hops(p), hops(p) * frame_bytes(4 * int(n))])
            ts.append(us * 1e-6)
    if len({r[1] / r[0] for r in rows}) < 2:
        raise SystemExit("scale: the fit needs all-reduces of at least two sizes")
    (alpha, inv_beta), *_ = np.linalg.lstsq(np.array(rows, float), np.array(ts), rcond=None)
    if alpha <= 0 or inv_beta <= 0:
        raise SystemExit(f"scale: the alpha-beta fit is not physical (alpha {alpha * 1e6:.1f} us, 1/beta "
                         f"{inv_beta:.3g} s/B) from {comm}; measure again on a quieter box")
    return float(alpha), float(1 / inv_beta)


def comm_model_ms(p: int, dim: int, n_layers: int, alpha: float, beta: float) -> float:
    from ring import frame_bytes

    per = lambda nbytes: alpha + frame_bytes(nbytes) / beta  # noqa: E731
    return hops(p) * ((2 * n_layers + 1) * per(4 * dim) + 2 * per(4 * SMALL_GATHER_FLOATS)) * 1000


# --- 4. the real ring on linkemu ----------------------------------------------------------------

def measure_ring(model_path: str, peers: list[int], threads: int, tokens: int, rounds: int) -> dict[int, dict]:
    cmd = ["ip", "netns", "exec", netns(0), sys.executable, str(HERE / "ring.py"), "--linkemu", "--model", model_path,
           "--peers", *map(str, peers), "--threads", str(threads), "--tokens", str(tokens), "--rounds", str(rounds)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            rows[r["peers"]] = {"bench": "scale", "part": "ring", "peers": r["peers"], "tok_s": r["tok_s"],
                                "tok_s_by_round": r["tok_s_by_round"], "step_ms": r["step_ms"],
                                "compute_ms_by_rank": r["compute_ms_by_rank"], "sync_ms_by_rank": r["sync_ms_by_rank"]}
            print(json.dumps(rows[r["peers"]]), flush=True)
    return rows


def linkemu(script: Path, verb: str, *args: str) -> None:
    subprocess.run(["bash", str(script), verb, *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a known model name or a GGUF path")
    ap.add_argument("--peers", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    ap.add_argument("--threads", type=int, default=1, help="compute threads of each (emulated) machine")
    ap.add_argument("--tokens", type=int, default=16, help="timed decode steps per rank and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--comm-peers", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--comm-tokens", type=int, default=30, help="timed tokens of collectives per P")
    ap.add_argument("--comm-iters", type=int, default=200, help="all-reduces per size in the sweep")
    ap.add_argument("--ring-peers", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--ring-tokens", type=int, default=64)
    ap.add_argument("--ring-rounds", type=int, default=2)
    ap.add_argument("--linkemu-dir", default=str(HERE.parents[1] / "shared" / "tools" / "linkemu"),
                    help="directory of linkemu's netem_ring.sh (default: ../shared/tools/linkemu from the checkout)")
    ap.add_argument("--profile", default="1gbit-0.2ms", help="linkemu profile: rate and one-way delay")
    ap.add_argument("--linkemu-keep", action="store_true", help="use namespaces already up; leave them")
    ap.add_argument("--alpha-us", type=float, default=None, help="without --comm-peers: the model's alpha")
    ap.add_argument("--beta-mbit", type=float, default=None, help="without --comm-peers: the model's beta")
    ap.add_argument("--comm-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("rank", nargs="?", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.comm_worker is not None:
        p, dim, n_layers, tokens, iters = map(int, a.comm_worker.split(":"))
        asyncio.run(comm_worker(a.rank, p, dim, n_layers, tokens, iters))
        return
    if a.rank is not None:
        sys.exit(f"scale: unexpected argument {a.rank} (P values go after --peers)")
    if any(p < 1 for p in a.peers + a.comm_peers + a.ring_peers) or min(a.tokens, a.rounds, a.threads) < 1:
        sys.exit("scale: --peers, --comm-peers, --ring-peers, --tokens, --rounds and --threads must be >= 1")
    if any(p < 2 for p in a.comm_peers):
        sys.exit(f"scale: --comm-peers are rings of at least 2, got {a.comm_peers}")
    if not a.comm_peers and (a.alpha_us is None or a.beta_mbit is None):
        sys.exit("scale: without --comm-peers give the model's --alpha-us and --beta-mbit")
    script = Path(a.linkemu_dir) / "netem_ring.sh"
    n_ns = max(a.comm_peers + a.ring_peers + [0])
    if n_ns and not script.is_file():
        sys.exit(f"scale: {script} not found; pass --linkemu-dir (the directory of linkemu's netem_ring.sh)")
    from ringllm import runtime
    from ringllm.fetch import resolve_model

    model_path = str(resolve_model(a.model))
    info, mf = runtime.open_model(model_path)
    mf.close()
    c = info.config
    machine = f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"

    compute = measure_compute(model_path, sorted(set(a.peers)), a.threads, a.tokens, a.rounds)
    comm: dict[int, dict] = {}
    ring: dict[int, dict] = {}
    if n_ns:
        if not a.linkemu_keep:
            existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            if "collring-" in existing:
                sys.exit("scale: collring-* namespaces exist already (another linkemu run?); "
                         "take them down (netem_ring.sh down) or pass --linkemu-keep")
        try:
            if not a.linkemu_keep:
                linkemu(script, "up", str(n_ns), a.profile)
            for p in sorted(set(a.comm_peers)):
                comm[p] = measure_comm(p, c.dim, c.n_layers, a.comm_tokens, a.comm_iters)
            if a.ring_peers:
                ring = measure_ring(model_path, sorted(set(a.ring_peers)), a.threads, a.ring_tokens, a.ring_rounds)
        finally:
            if not a.linkemu_keep:
                linkemu(script, "down")
    if comm:
        alpha, beta = fit_alpha_beta(comm)
    else:
        alpha, beta = a.alpha_us * 1e-6, a.beta_mbit * 1e6 / 8
    print(json.dumps({"bench": "scale", "part": "model", "profile": a.profile if comm else None,
                      "alpha_us": round(alpha * 1e6, 1), "beta_mbit_s": round(beta * 8 / 1e6, 1),
                      "formula": "comm_ms(P) = floor(P/2) * ((2L+1)*(alpha + frame(4*dim)/beta) "
                                 "+ 2*(alpha + frame(60)/beta))",
                      "n_layers": c.n_layers, "dim": c.dim,
                      "model_vs_measured_ms": {p: [round(comm_model_ms(p, c.dim, c.n_layers, alpha, beta), 2),
                                                   comm[p]["token_ms"]] for p in comm}}), flush=True)
    for p in sorted(set(a.peers)):
        if p == 1:
            comm_ms, source = 0.0, "none"
        elif p in comm:
            comm_ms, source = comm[p]["token_ms"], "measured"
        else:
            comm_ms, source = comm_model_ms(p, c.dim, c.n_layers, alpha, beta), "model"
        total = compute[p]["max_rank_ms"] + comm_ms
        row = {"bench": "scale", "part": "projection", "model": os.path.basename(model_path), "peers": p,
               "threads": a.threads, "max_rank_compute_ms": compute[p]["max_rank_ms"], "comm_ms": round(comm_ms, 2),
               "comm_source": source, "projected_ms_per_token": round(total, 2),
               "projected_tok_s": round(1000 / total, 2),
               "projected_speedup_vs_p1": round(compute[1]["max_rank_ms"] / total, 2) if 1 in compute else None,
               "measured_tok_s": ring[p]["tok_s"] if p in ring else None,
               "profile": a.profile if (comm or ring) else None, "machine": machine}
        print(json.dumps(row), flush=True)
    print(json.dumps({"bench": "scale", "part": "anchor",
                      "what": "distributed-llama, Llama 2 7B Q40, Raspberry Pi 4B, 1 GbE (its README)",
                      "ms_per_token": ANCHOR_MS, "tok_s": {n: round(1000 / ms, 2) for n, ms in ANCHOR_MS.items()},
                      "speedup_vs_1": {n: round(ANCHOR_MS[1] / ms, 2) for n, ms in ANCHOR_MS.items()}}), flush=True)


if __name__ == "__main__":
    main()
