"""Ring speed for P = 1..4 peers as separate processes on 127.0.0.1: one JSON line per P.

    python bench/ring.py [--peers 1 2 3 4] [--threads 1] [--wire f32] [--tokens 128] [--rounds 5]
                         [--kernels auto|numba|numpy]

Every P's ring is started at once (``--threads`` compute threads per peer; idle rings cost
nothing but memory), each gets a warm-up request, and then ``--rounds`` rounds each send one
timed greedy request (64-token prompt, ``--tokens`` generated, EOS ignored) to rank 0 of every
ring in turn. This machine is shared and noisy (a slow spell can halve one run's speed), so
rings are compared round by round: ``speedup_vs_p1`` is the median over rounds of tok/s at P
divided by tok/s at P=1 in the same round. Reported per P (medians over rounds):

- ``tok_s``: decode tokens/s seen by the client (first token excluded), and every round's;
- ``compute_ms_per_token`` / ``sync_ms_per_token``: rank 0's decode step time split into
  waiting in collectives and the rest (peer counters from /health; decode-only figures are
  the difference between a long request and a one-token request); ``compute_ms_by_rank`` /
  ``sync_ms_by_rank``: the same for every rank;
- ``bytes_per_token_per_peer``: frame bytes each peer wrote to its ring links per decode
  token (its own counter), next to ``formula_bytes_per_token`` (docs/performance.md derives it);
- ``peak_rss_mb``: each peer's VmHWM.

``--linkemu`` runs every peer in its own network namespace as built by
``../shared/tools/linkemu/netem_ring.sh up P PROFILE`` (rank r in ``collring-ns<r>`` at
10.77.0.<r+1>, links shaped to the profile's rate and one-way delay), so the ring pays what a
LAN costs; run the benchmark itself inside ``collring-ns0``:

    bash ../shared/tools/linkemu/netem_ring.sh up 2 1gbit-0.2ms
    ip netns exec collring-ns0 python bench/ring.py --linkemu --peers 1 2
    bash ../shared/tools/linkemu/netem_ring.sh down

The emulated hosts still share this machine's cores (and, since each is alone on its
"host", every peer busy-waits for its neighbours: keep P <= cores).

``--kernels numpy`` runs the peers on the reference kernels (ring.toml's ``kernels``), e.g. to
compare the ring against a commit from before the compiled kernels.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ringllm.client import connect  # noqa: E402
from ringllm.fetch import resolve_model  # noqa: E402
from ringllm.launch import _spawn_peer, _stop, _wait_healthy  # noqa: E402
from ringllm.ring.config import init_ring_toml, load_ring  # noqa: E402

TEXT = ("The history of the ring network begins with the token ring, a local area network in which each "
        "station passes a small frame to its neighbour; the frame circulates until a station claims it. ")


def proc_field(pid: int, name: str, field: str) -> int:
    text = Path(f"/proc/{pid}/{name}").read_text()
    return int(re.search(rf"^{field}:\s+(\d+)", text, re.M).group(1))


def frame_bytes(payload: int, kind: str = "coll", header: dict | None = None) -> int:
    """Bytes of one frame on the wire, measured with the real encoder."""
    from ringllm.ring.wire import encode_frame

    head, view = encode_frame(kind, header or {"s": 100_000, "i": 0, "o": "ar", "n": 576}, b"x" * payload)
    return len(head) + (view.nbytes if view is not None else 0)


def formula_bytes(p: int, n_layers: int, dim: int, wire: str) -> float:
    """Bytes one peer sends per decode token (docs/performance.md derives it).

    Exchange all-reduce: every vector travels floor(P/2) hops one way and floor((P-1)/2) the
    other, so each peer sends P-1 vector frames per all-reduce. Per token: 2 per layer plus
    one for the vocab-parallel embedding. The step's two small all-gathers (control news and
    greedy candidates) add P-1 frames each of under 100 bytes.
    """
    if p == 1:
        return 0.0
    # q8_0: two Q8_0 passes (value, rounding error) over the 64-padded rotated vector
    payload = dim * 4 if wire == "f32" else 2 * (-(-dim // 64) * 64 // 32 * 34)
    layers = 2 * n_layers * (p - 1) * frame_bytes(payload)
    embedding = (p - 1) * frame_bytes(dim * 4)  # always float32, whatever the wire format
    small = 2 * (p - 1) * frame_bytes(60, header={"s": 100_000, "i": 0, "o": "ag"})
    return layers + embedding + small


async def peer_stats(hosts: list[str], ports: list[int]) -> list[dict]:
    out = []
    for host, port in zip(hosts, ports):
        async with connect(f"{host}:{port}") as client:
            out.append((await client.health())["stats"])
    return out


async def timed_request(port: int, prompt_ids: list[int], tokens: int, host: str = "127.0.0.1") -> dict:
    async with connect(f"{host}:{port}") as client:
        return (await client.complete(prompt_ids=prompt_ids, temperature=0, max_tokens=tokens, ignore_eos=True)).__dict__


def linkemu_host(rank: int) -> str:
    """Rank's address in linkemu's namespaces (netem_ring.sh: collring-ns<r> at 10.77.0.<r+1>)."""
    return f"10.77.0.{rank + 1}"


class Ring:
    """One ring of p peer processes, started once and measured in several rounds."""

    def __init__(self, p: int, model: str, threads: int, wire: str, linkemu: bool = False,
                 kernels: str = "auto") -> None:
        self.p = p
        self.tmp = tempfile.TemporaryDirectory(prefix="ringllm-bench-")
        ring_path = Path(self.tmp.name) / "ring.toml"
        text = init_ring_toml(p, model=model, wire=wire, kernels=kernels)
        if linkemu:  # each peer at its namespace's address; HTTP on every address, for /health
            for r in range(p):
                text = text.replace('host = "127.0.0.1"', f'host = "{linkemu_host(r)}"', 1)
            text += '\n[http]\nhost = "0.0.0.0"\n'
        ring_path.write_text(text)
        cfg = load_ring(ring_path)
        logdir = Path(self.tmp.name)
        self.procs = [_spawn_peer(ring_path, r, threads, logdir,
                                  prefix=["ip", "netns", "exec", f"collring-ns{r}"] if linkemu and r else ())
                      for r in range(p)]
        self.hosts = [linkemu_host(r) if linkemu else "127.0.0.1" for r in range(p)]
        self.ports = [pc.http_port for pc in cfg.peers]
        self.cfg = cfg

    def wait(self) -> None:
        _wait_healthy(self.cfg, self.procs, Path(self.tmp.name))

    def measure(self, prompt_ids: list[int], tokens: int) -> dict:
        """One timed greedy request; decode-only figures from the difference of a long and a
        one-token request."""
        p = self.p
        s0 = asyncio.run(peer_stats(self.hosts, self.ports))
        asyncio.run(timed_request(self.ports[0], prompt_ids, 1, self.hosts[0]))
        s1 = asyncio.run(peer_stats(self.hosts, self.ports))
        done = asyncio.run(timed_request(self.ports[0], prompt_ids, tokens, self.hosts[0]))
        s2 = asyncio.run(peer_stats(self.hosts, self.ports))

        def decode_delta(r: int, key: str) -> float:
            return (s2[r][key] - s1[r][key]) - (s1[r][key] - s0[r][key])

        steps = decode_delta(0, "steps")
        n = len(done["ids"])
        return {
            "tok_s": (n - 1) / (done["seconds"] - done["time_to_first_token"]),
            "ttft_ms": done["time_to_first_token"] * 1000,
            "step_ms": decode_delta(0, "step_seconds") / steps * 1000,
            "compute_ms_by_rank": [(decode_delta(r, "step_seconds") - decode_delta(r, "sync_seconds"))
                                   / steps * 1000 for r in range(p)],
            "sync_ms_by_rank": [decode_delta(r, "sync_seconds") / steps * 1000 for r in range(p)],
            "bytes_per_token_per_peer": [round(decode_delta(r, "bytes_sent") / steps) for r in range(p)],
            "ids_head": done["ids"][:8],
        }

    def peak_rss_mb(self) -> list[float]:
        return [round(proc_field(pr.pid, "status", "VmHWM") / 1024, 1) for pr in self.procs]

    def close(self) -> None:
        _stop(self.procs)
        self.tmp.cleanup()


def summarize(p: int, threads: int, wire: str, runs: list[dict], p1_runs: list[dict] | None) -> dict:
    """Medians over the rounds; speedup_vs_p1 is the median of the per-round ratios (each
    round measures every P back to back, so a slow spell on the box hits both sides)."""
    med = lambda xs: round(float(np.median(xs)), 2)  # noqa: E731
    row = {
        "peers": p, "threads_per_peer": threads, "wire": wire, "rounds": len(runs),
        "tok_s": med([r["tok_s"] for r in runs]),
        "tok_s_by_round": [round(r["tok_s"], 2) for r in runs],
        "ttft_ms": med([r["ttft_ms"] for r in runs]),
        "step_ms": med([r["step_ms"] for r in runs]),
        "compute_ms_per_token": med([r["compute_ms_by_rank"][0] for r in runs]),
        "sync_ms_per_token": med([r["sync_ms_by_rank"][0] for r in runs]),
        "compute_ms_by_rank": [med([r["compute_ms_by_rank"][k] for r in runs]) for k in range(p)],
        "sync_ms_by_rank": [med([r["sync_ms_by_rank"][k] for r in runs]) for k in range(p)],
        "bytes_per_token_per_peer": runs[-1]["bytes_per_token_per_peer"],
        "ids_head": runs[-1]["ids_head"],
    }
    if p1_runs is not None:
        row["speedup_vs_p1"] = med([r["tok_s"] / q["tok_s"] for r, q in zip(runs, p1_runs)])
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wire", default="f32", choices=["f32", "q8_0"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="rounds over all P, back to back")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--kernels", default="auto", choices=["auto", "numba", "numpy"],
                    help="the peers' kernels (ring.toml's kernels)")
    ap.add_argument("--linkemu", action="store_true",
                    help="peers in linkemu's namespaces (run this inside collring-ns0; see above)")
    args = ap.parse_args()
    if args.linkemu and linkemu_host(0) not in Path("/proc/net/fib_trie").read_text():
        sys.exit(f"--linkemu: {linkemu_host(0)} is not an address here; run inside collring-ns0 "
                 "after netem_ring.sh up (see this script's docstring)")
    from ringllm import runtime

    model = str(resolve_model(args.model))
    info, mf = runtime.open_model(model)
    mf.close()
    c = info.config
    prompt_ids = info.tokenizer.encode(TEXT * 8, parse_special=False)[:64]
    machine = f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    rings = {p: Ring(p, model, args.threads, args.wire, args.linkemu, args.kernels) for p in args.peers}
    try:
        for ring in rings.values():
            ring.wait()
            asyncio.run(timed_request(ring.ports[0], prompt_ids, 8, ring.hosts[0]))  # warm-up
        runs: dict[int, list[dict]] = {p: [] for p in args.peers}
        for _ in range(args.rounds):  # every round measures every P back to back
            for p, ring in rings.items():
                runs[p].append(ring.measure(prompt_ids, args.tokens))
        for p, ring in rings.items():
            row = summarize(p, args.threads, args.wire, runs[p], runs.get(1))
            row["formula_bytes_per_token"] = round(formula_bytes(p, c.n_layers, c.dim, args.wire))
            row["peak_rss_mb"] = ring.peak_rss_mb()
            row["kernels"] = args.kernels
            row["load"] = round(os.getloadavg()[0], 2)
            row["machine"] = machine
            print(json.dumps(row), flush=True)
    finally:
        for ring in rings.values():
            ring.close()

if __name__ == "__main__":
    main()
