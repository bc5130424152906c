"""Issue 5, item 6: a bounded soak on a 3-peer loopback ring of real processes (SmolLM2).

About 200 requests over about 3 minutes from a few concurrent clients spread over the peers:
mixed prompt and output lengths, greedy and sampled, and random disconnects (before the first
token, or after a few). Every request must complete, or fail cleanly with a typed error (a
full queue is clean; anything else is counted by kind and fails the test), none may hang, the
ring must end idle (no running or queued sequence, no KV cache held), and each peer's resident
memory at the end must be within 10% of its value after warm-up.

Prints the request count, the outcomes and failures by kind, and the RSS trend (run with -s).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import pytest

import ringllm
from ringllm.errors import RingError
from tests.peer_procs import Ring, ring_toml

pytestmark = pytest.mark.model

REQUESTS = 200
DURATION = 165.0  # seconds: no new request after this, even if fewer than REQUESTS were sent
CLIENTS = 6
WORDS = ("the sea keeps its light and the keeper writes down every ship that passes in the night "
         "while storms come and go over the rocks and the lamp turns").split()


def _request(rng: random.Random) -> dict:
    n_words = rng.choice([3, 10, 30, 90])
    prompt = " ".join(rng.choice(WORDS) for _ in range(n_words))
    body = {"prompt": prompt, "raw": rng.random() < 0.5, "max_tokens": rng.choice([1, 4, 8, 16, 32]),
            "ignore_eos": rng.random() < 0.7}
    if rng.random() < 0.5:
        body |= {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": rng.randrange(2**31)}
    else:
        body["temperature"] = 0.0
    return body


async def _one(addr: str, body: dict, disconnect_after: int | float | None) -> str:
    """Run one request; returns its outcome ('ok', 'disconnected', 'hung up early') or raises.

    ``disconnect_after``: an int hangs up after that many tokens; a float hangs up after that
    many seconds whatever the request's state (queued, in prefill, streaming).
    """
    if isinstance(disconnect_after, float):
        try:
            async with asyncio.timeout(disconnect_after):
                return await _one(addr, body, None)
        except TimeoutError:
            return "hung up early"
    async with ringllm.connect(addr, timeout=90) as client:
        tokens = 0
        gen = client.events(**body)
        try:
            async for ev in gen:
                if disconnect_after is not None and tokens >= disconnect_after:
                    return "disconnected"  # leaving the iterator hangs up mid-stream
                if ev["event"] == "token":
                    tokens += 1
                elif ev["event"] == "end":
                    assert ev["completion_tokens"] == tokens <= body["max_tokens"]
                    return "ok"
        finally:
            await gen.aclose()
    raise AssertionError("stream ended without an end event")


async def _soak(ring: Ring, seed: int) -> tuple[Counter, int]:
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    sent = 0
    deadline = time.monotonic() + DURATION

    async def client(i: int) -> None:
        nonlocal sent
        while sent < REQUESTS and time.monotonic() < deadline:
            sent += 1
            body = _request(rng)
            roll = rng.random()
            disconnect = rng.uniform(0.0, 0.6) if roll < 0.05 else rng.choice([1, 3]) if roll < 0.15 else None
            try:
                async with asyncio.timeout(120):  # a hang is a failure, not a stuck suite
                    outcome = await _one(ring.http(i % ring.cfg.size), body, disconnect)
            except RingError as exc:
                outcome = "queue_full" if "queue is full" in str(exc) else f"error:{type(exc).__name__}:{exc}"
            except TimeoutError:
                outcome = "hang"
            except Exception as exc:  # noqa: BLE001 - anything else is an unclean failure, counted
                outcome = f"unclean:{type(exc).__name__}:{exc}"
            outcomes[outcome] += 1

    await asyncio.gather(*[client(i) for i in range(CLIENTS)])
    return outcomes, sent


async def _warm_up(ring: Ring) -> None:
    """The largest shapes the soak uses: longest prompts, longest outputs, a full batch."""
    rng = random.Random(1)
    bodies = [_request(rng) | {"prompt": " ".join(WORDS * 4), "max_tokens": 32, "ignore_eos": True}
              for _ in range(CLIENTS)]
    await asyncio.gather(*[_one(ring.http(i % 3), b, None) for i, b in enumerate(bodies)])


def test_soak_mixed_requests_and_disconnects_no_leaks(tmp_path, smollm2_path):
    with Ring(tmp_path, ring_toml(3, str(smollm2_path), name="soak", heartbeat=1.0, dead_after=5.0), tag="soak") as ring:
        ring.start_all()
        ring.wait_up(timeout=180)
        asyncio.run(_warm_up(ring))
        time.sleep(1.0)
        base = [ring.rss_kb(r) for r in range(3)]
        trend = [(0.0, base)]
        t0 = time.monotonic()

        async def sample() -> None:
            while True:
                await asyncio.sleep(30)
                trend.append((time.monotonic() - t0, [ring.rss_kb(r) for r in range(3)]))

        async def main() -> tuple[Counter, int]:
            sampler = asyncio.create_task(sample())
            try:
                return await _soak(ring, seed=1234)
            finally:
                sampler.cancel()

        outcomes, sent = asyncio.run(main())
        elapsed = time.monotonic() - t0
        time.sleep(1.0)  # let the last cancellations reach every peer
        end = [ring.rss_kb(r) for r in range(3)]
        trend.append((elapsed + 1.0, end))
        health = [ring.health(r) for r in range(3)]

        print(f"\n[soak] {sent} requests in {elapsed:.0f} s from {CLIENTS} clients; outcomes: {dict(outcomes)}")
        failures = {k: n for k, n in outcomes.items() if k not in ("ok", "disconnected", "hung up early", "queue_full")}
        print(f"[soak] failures by kind: {failures or 'none'}")
        for t, rss in trend:
            print(f"[soak] t={t:5.0f} s  RSS MiB: " + "  ".join(f"rank {r}: {kb / 1024:6.1f}" for r, kb in enumerate(rss)))
        print("[soak] RSS end/warm-up: " + "  ".join(f"rank {r}: {e / b:.3f}" for r, (b, e) in enumerate(zip(base, end))))

        assert sent >= 100, f"only {sent} requests in {DURATION:g} s"
        assert not failures, failures
        assert outcomes["ok"] >= sent * 0.6
        for r, h in enumerate(health):
            assert h is not None and h["status"] == "ok", h
            assert h["running"] == 0 and h["queue"] == 0 and h["memory"]["kv_cache_bytes"] == 0, h
            log = ring.log(r)
            assert "ring lost" not in log and "Traceback" not in log and "keepalive failed" not in log, log[-3000:]
        for r, (b, e) in enumerate(zip(base, end)):
            assert e <= b * 1.10, f"rank {r}: RSS grew from {b} kB after warm-up to {e} kB"
