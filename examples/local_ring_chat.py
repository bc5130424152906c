"""A multi-turn chat with a 3-peer ring that lives inside this process.

    python examples/local_ring_chat.py [--peers 3] [--max-tokens 64] [--links memory|tcp]

LocalRing loads one shard per peer and runs every peer's step loop and HTTP API here; the
client talks to one of them over HTTP exactly as it would to a remote peer. The history is
kept, so the second question can refer to the first answer.
"""

from __future__ import annotations

import argparse
import asyncio

import ringllm

QUESTIONS = ["Name one planet of the solar system.", "What colour is it?"]


async def main(args: argparse.Namespace) -> None:
    async with ringllm.LocalRing(peers=args.peers, links=args.links) as ring:
        print(f"ring of {args.peers} peers up; HTTP on {', '.join(ring.addresses)}")
        history = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."}]
        async with ringllm.connect(ring.addresses[-1]) as client:  # any peer takes requests
            for question in QUESTIONS:
                print(f"\n> {question}")
                history.append({"role": "user", "content": question})
                reply = ""
                async for piece in client.chat(history, max_tokens=args.max_tokens, temperature=0.3, seed=1):
                    print(piece, end="", flush=True)
                    reply += piece
                history.append({"role": "assistant", "content": reply})
                print()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--links", choices=["memory", "tcp"], default="memory")
    asyncio.run(main(ap.parse_args()))
