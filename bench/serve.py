"""Serving throughput of a ring of separate peer processes: one JSON line per result.

    python bench/serve.py [--peers 3] [--concurrency 1 4 8] [--max-tokens 64] [--api openai|native]
                          [--temperature 0.7] [--threads N] [--model NAME_OR_PATH]

Starts ``--peers`` ``ringllm peer`` processes on 127.0.0.1 (as ``ringllm local`` does), then
for each concurrency N runs N streaming requests at once, spread round-robin over the peers,
each generating exactly ``--max-tokens`` tokens (``ignore_eos``; ``--temperature``, 0 for
greedy, seeded per stream). Per N it reports:

- ``aggregate_tokens_per_s``: all streams' tokens / wall time from the first request to the
  last token (prefill included), and ``speedup``: that over the N=1 figure;
- ``ttft_s`` (mean, p50, max): time to each stream's first token;
- ``per_stream_tokens_per_s``: mean decode rate of one stream after its first token;
- from the peers' /health counters over the run: ``steps``, ``mean_batch`` (tokens per
  step), ``step_ms`` (wall time per step) split into ``sync_ms`` (waiting in collectives) and
  ``compute_ms``, averaged over the peers — where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import aiohttp  # noqa: E402

from ringllm.fetch import resolve_model  # noqa: E402
from ringllm.launch import _spawn_peer, _stop, _wait_healthy, default_threads  # noqa: E402
from ringllm.ring.config import init_ring_toml, load_ring  # noqa: E402

PROMPTS = ["Tell me a story about a lighthouse keeper.", "Explain how a bicycle stays upright.",
           "Write a short poem about rain.", "What is a ring network?", "Describe a busy market at dawn.",
           "Why do cats purr?", "Give advice to a new gardener.", "Summarize the history of bread."]


async def one_stream(session: aiohttp.ClientSession, address: str, i: int, args: argparse.Namespace) -> dict:
    """Run one streaming request; return its token count and timings."""
    prompt = PROMPTS[i % len(PROMPTS)]
    t0 = time.perf_counter()
    first = None
    tokens = 0
    if args.api == "openai":
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens, "stream": True,
                "ignore_eos": True, "temperature": args.temperature, "seed": i, "logprobs": True,  # logprobs: one event per token
                "stream_options": {"include_usage": True}}
        async with session.post(f"http://{address}/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                ev = json.loads(line[6:])
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
                elif ev["choices"] and ev["choices"][0].get("logprobs") and first is None:
                    first = time.perf_counter()
    else:
        body = {"prompt": prompt, "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": args.temperature, "seed": i}
        async with session.post(f"http://{address}/ringllm/v1/generate", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.content:
                ev = json.loads(line)
                if ev["event"] == "token":
                    tokens += 1
                    if first is None:
                        first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return {"tokens": tokens, "start": t0, "first": first, "end": end,
            "decode_rate": (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0}


async def health(session: aiohttp.ClientSession, addresses: list[str]) -> list[dict]:
    out = []
    for a in addresses:
        async with session.get(f"http://{a}/health") as resp:
            out.append((await resp.json())["stats"])
    return out


async def run_level(addresses: list[str], n: int, args: argparse.Namespace) -> dict:
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        before = await health(session, addresses)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(session, addresses[i % len(addresses)], i, args) for i in range(n)))
        wall = time.perf_counter() - t0
        after = await health(session, addresses)
    ttfts = sorted(r["first"] - r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    steps = [a["steps"] - b["steps"] for a, b in zip(after, before)]
    ring_tokens = [a["tokens"] - b["tokens"] for a, b in zip(after, before)]

    def per_step(key: str) -> float:
        vals = [(a[key] - b[key]) / s for a, b, s in zip(after, before, steps) if s]
        return round(1000 * statistics.mean(vals), 2) if vals else 0.0

    step_key = "step_seconds" if "step_seconds" in after[0] else None
    row = {
        "bench": "serve", "api": args.api, "peers": len(addresses), "concurrency": n, "max_tokens": args.max_tokens,
        "tokens": tokens, "seconds": round(wall, 3),
        "aggregate_tokens_per_s": round(tokens / wall, 2),
        "per_stream_tokens_per_s": round(statistics.mean(r["decode_rate"] for r in results), 2),
        "ttft_s": {"mean": round(statistics.mean(ttfts), 3), "p50": round(ttfts[len(ttfts) // 2], 3),
                   "max": round(ttfts[-1], 3)},
        "steps": steps[0], "mean_batch": round(ring_tokens[0] / steps[0], 2) if steps[0] else 0.0,
        "step_ms": round(1000 * wall / steps[0], 2) if steps[0] else 0.0,
        "sync_ms": per_step("sync_seconds"), "compute_ms": per_step("compute_seconds"),
    }
    if step_key:
        row["loop_step_ms"] = per_step(step_key)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--api", choices=["openai", "native"], default="openai")
    ap.add_argument("--model", default=None)
    ap.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of every stream (0: greedy)")
    ap.add_argument("--threads", type=int, default=None, help="compute threads per peer (default: cores / peers)")
    args = ap.parse_args()

    model = str(resolve_model(args.model))
    threads = args.threads or default_threads(args.peers)
    with tempfile.TemporaryDirectory(prefix="ringllm-bench-") as tmp:
        ring_path = Path(tmp) / "ring.toml"
        ring_path.write_text(init_ring_toml(args.peers, model=model))
        cfg = load_ring(ring_path)
        procs = [_spawn_peer(ring_path, r, threads, Path(tmp)) for r in range(args.peers)]
        try:
            _wait_healthy(cfg, procs, Path(tmp))
            addresses = [f"127.0.0.1:{p.http_port}" for p in cfg.peers]
            warm = argparse.Namespace(**{**vars(args), "max_tokens": 4})
            asyncio.run(run_level(addresses, 1, warm))  # first-request costs (buffers, pools)
            base = None
            for n in args.concurrency:
                row = asyncio.run(run_level(addresses, n, args))
                base = base or row["aggregate_tokens_per_s"]
                row["speedup"] = round(row["aggregate_tokens_per_s"] / base, 2)
                row.update(threads_per_peer=threads, cpus=os.cpu_count(), python=platform.python_version())
                print(json.dumps(row), flush=True)
        finally:
            _stop(procs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
