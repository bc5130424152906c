"""All-reduce latency benchmark: P peers as separate processes on 127.0.0.1.

    python bench/allreduce.py [--peers 2,3,4] [--sizes 576,4096,65536,1048576]
                              [--wire f32,q8_0] [--loop uvloop,asyncio] [--algo auto]
                              [--threadsafe]

Prints one JSON line per (loop, P, wire, algorithm, size): median and p99 latency of one
all-reduce in microseconds, measured on rank 0 over back-to-back calls after a warm-up, in
``--rounds`` interleaved rounds (so a burst of load elsewhere on the box does not spoil one
size); ``load`` is the 1-minute load average when the line was written.
``--algo exchange,ring`` forces each algorithm (to measure the crossover); ``--threadsafe``
also times calls made from a worker thread, as the model's compute thread makes them, through
``asyncio.run_coroutine_threadsafe`` (``threadsafe_median_us``), through
``Collectives.allreduce_sync`` (``sync_median_us``), and through ``allreduce_sync`` with the
links lent to the thread (``lent_median_us``, see ``Collectives.lend_to_thread``).  The peers pin nothing: with P > cores they oversubscribe.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ringllm.ring.collectives import CHUNK_ELEMS, Collectives  # noqa: E402
from ringllm.ring.handshake import HandshakeInfo  # noqa: E402
from ringllm.ring.formation import open_tcp_ring  # noqa: E402

SECRET = b"bench-secret"


def _iters(n: int, scale: float) -> int:
    base = 3000 if n <= 4096 else 400 if n <= 65536 else 40
    return max(10, int(base * scale))


def _stats(samples: list[float]) -> tuple[float, float]:
    a = np.sort(np.array(samples)) * 1e6
    return float(np.median(a)), float(a[min(len(a) - 1, int(np.ceil(0.99 * len(a))) - 1)])


async def _peer_main(rank: int, size: int, sock: socket.socket, ports: list[int],
                     args: argparse.Namespace, out: mp.Queue) -> None:
    me = HandshakeInfo(ring="bench", rank=rank, size=size, model="m", plan="p")
    addrs = [("127.0.0.1", p) for p in ports]
    ring = await open_tcp_ring(rank, addrs, me=me, secret=SECRET, listen_sock=sock,
                               recv_timeout=60.0)
    loop = asyncio.get_running_loop()
    try:
        for wire in args.wire:
            for algo in args.algo:
                small = {"auto": None, "exchange": 1 << 62, "ring": 0}[algo]
                coll = Collectives(rank, size, ring, wire, small_max_elems=small,
                                   chunk_elems=args.chunk_elems)
                xs = {n: np.random.default_rng(rank).standard_normal(n).astype(np.float32)
                      for n in args.sizes}
                samples: dict[int, list[float]] = {n: [] for n in args.sizes}
                threadsafe: dict[int, list[float]] = {n: [] for n in args.sizes}
                sync: dict[int, list[float]] = {n: [] for n in args.sizes}
                lent: dict[int, list[float]] = {n: [] for n in args.sizes}
                # Rounds interleave the sizes so that interference from other processes on the
                # box is spread over all of them rather than spoiling one.
                for _ in range(args.rounds):
                    for n in args.sizes:
                        x = xs[n]
                        iters = max(5, _iters(n, args.scale) // args.rounds)
                        for _ in range(max(2, iters // 10)):
                            await coll.allreduce(x)
                        for _ in range(iters):
                            t0 = time.perf_counter()
                            await coll.allreduce(x)
                            samples[n].append(time.perf_counter() - t0)
                        if args.threadsafe and n <= 65536:
                            threadsafe[n] += await _threadsafe(loop, coll, x, iters, False)
                            sync[n] += await _threadsafe(loop, coll, x, iters, True)
                            await coll.lend_to_thread()
                            try:
                                lent[n] += await _threadsafe(loop, coll, x, iters, True)
                            finally:
                                coll.take_back()
                for n in args.sizes:
                    med, p99 = _stats(samples[n])
                    rec = {"loop": args.loop_name, "P": size, "wire": wire,
                           "algorithm": coll.algorithm(n), "forced": algo != "auto",
                           "floats": n, "iters": len(samples[n]),
                           "median_us": round(med, 1), "p99_us": round(p99, 1)}
                    if threadsafe[n]:
                        rec["threadsafe_median_us"] = round(_stats(threadsafe[n])[0], 1)
                        rec["sync_median_us"] = round(_stats(sync[n])[0], 1)
                        rec["lent_median_us"] = round(_stats(lent[n])[0], 1)
                    rec["load"] = round(os.getloadavg()[0], 2)
                    if rank == 0:
                        out.put(json.dumps(rec))
    finally:
        await ring.shutdown("benchmark done")


async def _threadsafe(loop: asyncio.AbstractEventLoop, coll: Collectives, x: np.ndarray,
                      iters: int, sync: bool) -> list[float]:
    """Latencies of all-reduces called from a worker thread (the model's path), either through
    ``run_coroutine_threadsafe`` or through ``Collectives.allreduce_sync``."""
    samples: list[float] = []

    def worker() -> None:
        for _ in range(iters):
            t0 = time.perf_counter()
            if sync:
                coll.allreduce_sync(x)
            else:
                asyncio.run_coroutine_threadsafe(coll.allreduce(x), loop).result()
            samples.append(time.perf_counter() - t0)

    await asyncio.to_thread(worker)
    return samples


def _peer_proc(rank: int, size: int, sock: socket.socket, ports: list[int],
               args: argparse.Namespace, out: mp.Queue) -> None:
    if args.loop_name == "uvloop":
        import uvloop
        uvloop.install()
    asyncio.run(_peer_main(rank, size, sock, ports, args, out))


def run_ring(size: int, args: argparse.Namespace) -> None:
    socks = []
    for _ in range(size):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    ctx = mp.get_context("fork")  # children inherit the bound listening sockets
    out: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_peer_proc, args=(r, size, socks[r], ports, args, out))
             for r in range(size)]
    for p in procs:
        p.start()
    for s in socks:
        s.close()
    expected = len(args.wire) * len(args.algo) * len(args.sizes)
    for _ in range(expected):
        print(out.get(timeout=600), flush=True)
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise SystemExit(f"peer process exited with {p.exitcode}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    csv = lambda conv: (lambda s: [conv(v) for v in s.split(",")])  # noqa: E731
    ap.add_argument("--peers", type=csv(int), default=[2, 3, 4])
    ap.add_argument("--sizes", type=csv(int), default=[576, 4096, 65536, 1048576])
    ap.add_argument("--wire", type=csv(str), default=["f32", "q8_0"])
    ap.add_argument("--loop", type=csv(str), default=["uvloop", "asyncio"])
    ap.add_argument("--algo", type=csv(str), default=["auto"])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply iteration counts")
    ap.add_argument("--chunk-elems", type=int, default=CHUNK_ELEMS,
                    help="elements per frame in the ring algorithm")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the sizes")
    ap.add_argument("--threadsafe", action="store_true")
    args = ap.parse_args()
    for loop_name in args.loop:
        args.loop_name = loop_name
        for size in args.peers:
            run_ring(size, args)


if __name__ == "__main__":
    main()
