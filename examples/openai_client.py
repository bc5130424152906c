"""The official ``openai`` package against a ring: streaming chat, then a plain completion.

    python examples/openai_client.py [--max-tokens 64]              # starts a 3-peer LocalRing
    python examples/openai_client.py --base-url http://127.0.0.1:8700/v1 [--api-key KEY]

Without ``--base-url`` the example starts a 3-peer ring in this process on real loopback TCP
links and asks each peer in turn; with it, it talks to a ring you already run
(``ringllm peer ...``). Needs ``pip install openai``.
"""

from __future__ import annotations

import argparse
import asyncio

from openai import AsyncOpenAI

import ringllm


async def ask(base_url: str, api_key: str, max_tokens: int) -> None:
    async with AsyncOpenAI(base_url=base_url, api_key=api_key) as client:
        model = (await client.models.list()).data[0].id
        print(f"[{base_url}] model {model}: ", end="", flush=True)
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is a ring network? One sentence."}],
            max_tokens=max_tokens, temperature=0.7, seed=42, stream=True)
        async for chunk in stream:
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="", flush=True)
        print()
        done = await client.completions.create(model=model, prompt="The three primary colours are",
                                               max_tokens=max_tokens, temperature=0)
        print(f"completion: {done.choices[0].text!r} ({done.usage.completion_tokens} tokens, "
              f"finish: {done.choices[0].finish_reason})")


async def main(args: argparse.Namespace) -> None:
    if args.base_url:
        await ask(args.base_url, args.api_key, args.max_tokens)
        return
    async with ringllm.LocalRing(peers=3, links="tcp") as ring:
        for address in ring.addresses:  # every peer serves the same API
            await ask(f"http://{address}/v1", "unused", args.max_tokens)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default=None, help="a running peer's OpenAI base URL (default: start a LocalRing)")
    ap.add_argument("--api-key", default="unused", help="the ring's [http] api_key, if it has one")
    ap.add_argument("--max-tokens", type=int, default=64)
    asyncio.run(main(ap.parse_args()))
