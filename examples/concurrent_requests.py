"""Many requests at once: the ring batches them into the same forward steps.

    python examples/concurrent_requests.py [--requests 8] [--max-tokens 64]

Sends ``--requests`` completions concurrently, spread over the peers of an in-process ring,
and prints each one's time to first token and the aggregate tokens/s, compared with one
request alone. Runs on uvloop when it is installed (any asyncio loop works).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

import ringllm

TOPICS = ["the sea", "a mountain", "a city at night", "an old library", "the desert", "a forest", "the moon", "rain"]


async def batch(ring: ringllm.LocalRing, n: int, max_tokens: int) -> float:
    """Run n requests at once; return the aggregate tokens/s."""
    async with contextlib.AsyncExitStack() as stack:  # one client per peer
        clients = [await stack.enter_async_context(ringllm.connect(a)) for a in ring.addresses]
        t0 = time.perf_counter()
        done = await asyncio.gather(*(
            clients[i % len(clients)].complete(f"Write one sentence about {TOPICS[i % len(TOPICS)]}.",
                                               max_tokens=max_tokens, ignore_eos=True, seed=i)
            for i in range(n)))
        wall = time.perf_counter() - t0
    tokens = sum(len(d.ids) for d in done)
    for i, d in enumerate(done):
        print(f"  request {i}: first token after {d.time_to_first_token * 1000:.0f} ms, {len(d.ids)} tokens: "
              f"{d.text.strip()[:60]!r}")
    print(f"  {n} request(s): {tokens} tokens in {wall:.1f} s = {tokens / wall:.1f} tokens/s")
    return tokens / wall


async def main(args: argparse.Namespace) -> None:
    async with ringllm.LocalRing(peers=3, max_batch=max(args.requests, 1)) as ring:
        print("one request alone:")
        alone = await batch(ring, 1, args.max_tokens)
        print(f"{args.requests} requests at once:")
        together = await batch(ring, args.requests, args.max_tokens)
        print(f"batching speedup: {together / alone:.1f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.run(main(args))
    except ImportError:
        asyncio.run(main(args))
