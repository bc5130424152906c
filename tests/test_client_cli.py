"""The asyncio client (plain asyncio and uvloop) and the ``prompt``/``status`` commands, run
as a user runs them: against peers' HTTP APIs, the CLI as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time

import pytest
import uvloop

import ringllm
from ringllm import runtime
from ringllm.client import connect, ring_health
from ringllm.errors import PeerLostError, QueueFullError, RequestError, RingError
from tests.ring_thread import RingThread

HI = [{"role": "user", "content": "Say hello."}]
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run_in(loop: str, coro_fn):
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(coro_fn())


def cli(*args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RINGLLM_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "ringllm", *args], input=input, capture_output=True, text=True,
                          timeout=timeout, env=env)


# -- the client on the tiny model, under both loops -------------------------------------------
@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_local_ring_and_client_under(loop, tiny_model_path):
    """LocalRing, its HTTP servers and the client all on one loop of the given kind."""

    async def go():
        async with ringllm.LocalRing(peers=2, model=str(tiny_model_path), links="tcp", max_batch=1, max_queue=0) as ring:
            async with connect(ring.addresses[1]) as client:
                done = await client.complete("the", raw=True, max_tokens=5, temperature=0, ignore_eos=True)
                assert len(done.ids) == 5 and done.finish_reason == "length" and done.prompt_ids
                pieces = [p async for p in client.stream("the", raw=True, max_tokens=3, ignore_eos=True, seed=1)]
                assert pieces
                assert (await client.health())["rank"] == 1
                assert [m["id"] for m in await client.models()] == ["tiny"]
                # Leaving the iterator early cancels the request on the ring.
                async with contextlib.aclosing(client.chat(HI, max_tokens=100, ignore_eos=True)) as pieces:
                    async for _ in pieces:
                        break
                for _ in range(100):
                    if not any(p.running or p.queue_depth for p in ring.peers):
                        break
                    await asyncio.sleep(0.05)
                assert [p.running for p in ring.peers] == [0, 0]
                # max_batch 1, max_queue 0: one running request fills the ring.
                events = client.events(prompt="the", max_tokens=100, ignore_eos=True)
                await anext(events)
                with pytest.raises(QueueFullError, match="queue is full"):
                    async with connect(ring.addresses[0]) as other:
                        await other.complete("x", max_tokens=2)
                await events.aclose()
                # Let the cancellation reach every peer before the ring closes (closing a ring
                # mid-step can leave a compute thread waiting for its receive timeout).
                for _ in range(100):
                    if not any(p.running or p.queue_depth for p in ring.peers):
                        break
                    await asyncio.sleep(0.05)

    run_in(loop, go)


def test_client_errors(tiny_model_path):
    async def go():
        client = connect("127.0.0.1:1")
        with pytest.raises(RingError, match="not open"):
            await client.complete("x")
        async with client:
            with pytest.raises(PeerLostError, match="127.0.0.1:1"):
                await client.complete("x")
            with pytest.raises(TypeError, match="'temprature'"):
                await client.complete("x", temprature=0.5)
        with pytest.raises(RequestError, match="host:port"):
            connect("nowhere")
        async with ringllm.LocalRing(peers=1, model=str(tiny_model_path)) as ring:
            async with connect(ring.addresses[0]) as c:
                with pytest.raises(RequestError, match="temperature"):
                    await c.complete("x", temperature=-1)
                with pytest.raises(RequestError, match="context holds only 128"):
                    await c.complete("word " * 300, raw=True)
            health = await ring_health([ring.addresses[0], "127.0.0.1:1"], timeout=2)
            assert health[0]["status"] == "ok" and "cannot connect" in health[1]["error"]

    asyncio.run(go())


# -- the real model: the loop is never blocked; the CLI ------------------------------------
@pytest.fixture(scope="module")
def ring():
    with RingThread(peers=3, links="tcp") as rt:
        yield rt


@pytest.mark.model
@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_client_never_blocks_the_callers_loop(loop, ring):
    async def go():
        gaps, stop = [], asyncio.Event()

        async def ticker():
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        async with connect(ring.addresses[0]) as client:
            text = "".join([p async for p in client.chat(HI, max_tokens=8, temperature=0)])
        stop.set()
        await tick
        return text, max(gaps)

    text, worst = run_in(loop, go)
    assert text
    assert worst < 0.5, f"the caller's loop stalled for {worst:.2f} s"


@pytest.mark.model
def test_prompt_streams_and_reports_timing(ring):
    out = cli("prompt", "--peer", ring.addresses[1], "Say hello.", "--max-tokens", "6", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "tokens, first after" in out.stderr and "tokens/s" in out.stderr


@pytest.mark.model
def test_prompt_json_and_prompt_from_stdin(ring):
    out = cli("prompt", "--peer", ring.addresses[2], "--json", "--max-tokens", "4", "--temperature", "0",
              "--top-logprobs", "2", input="Say hello.")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert set(doc) == {"prompt_ids", "ids", "text", "top_logprobs", "finish_reason"}
    assert len(doc["ids"]) <= 4 and all(len(t) == 2 for t in doc["top_logprobs"])


@pytest.mark.model
def test_chat_keeps_the_history(ring, smollm2_path):
    info, mf = runtime.open_model(str(smollm2_path))
    mf.close()
    lines = "Name one fruit.\n\n/reset\nName one animal.\nWhat sound does it make?\n"
    out = cli("prompt", "--peer", ring.addresses[0], "--chat", "--json", "--system", "Answer in five words.",
              "--max-tokens", "6", "--temperature", "0", "What is two plus two?", input=lines)
    assert out.returncode == 0, out.stderr
    turns = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(turns) == 4  # the first message from the argument, then three stdin lines with text
    prompts = [info.tokenizer.decode(t["prompt_ids"]) for t in turns]
    assert all("Answer in five words." in p for p in prompts)
    assert "What is two plus two?" in prompts[1] and turns[0]["text"].strip() in prompts[1]
    assert "What is two plus two?" not in prompts[2]  # /reset forgot it
    assert "Name one animal." in prompts[3] and turns[2]["text"].strip() in prompts[3]
    assert "history cleared" in out.stderr and out.stderr.count("tokens, first after") == 4


@pytest.mark.model
def test_chat_streams_text_without_json(ring):
    out = cli("prompt", "--peer", ring.addresses[0], "--chat", "--max-tokens", "4", "--temperature", "0",
              input="Hello!\nHow are you?\n")
    assert out.returncode == 0, out.stderr
    assert len([ln for ln in out.stdout.splitlines() if ln.strip()]) == 2


def _ring_toml(tmp_path, http_ports: list[int]) -> str:
    lines = ['name = "t"', 'secret = "0123456789abcdef0123"', ""]
    for i, hp in enumerate(http_ports):
        lines += ["[[peer]]", 'host = "127.0.0.1"', f"port = {20000 + i}", f"http_port = {hp}", ""]
    path = tmp_path / "ring.toml"
    path.write_text("\n".join(lines))
    return str(path)


@pytest.mark.model
def test_status_shows_every_peer_and_down_ones(ring, tmp_path):
    ports = [int(a.rsplit(":", 1)[1]) for a in ring.addresses]
    from ringllm.ring.config import free_ports

    dead = free_ports(1)[0]
    path = _ring_toml(tmp_path, ports + [dead])
    out = cli("status", "--ring", path)
    assert out.returncode == 1, out.stderr  # one peer is down
    assert "Traceback" not in out.stderr
    rows = out.stdout.splitlines()
    assert rows[0].split()[:3] == ["RANK", "ADDRESS", "STATE"]
    for rank in range(3):
        cols = rows[1 + rank].split()
        assert cols[:3] == [str(rank), f"127.0.0.1:{ports[rank]}", "up"]
        assert cols[3] == "33%" and cols[4] == f"{rank}-{rank + 1}"  # SmolLM2: 3 KV heads, FFN in thirds
    assert rows[4].split()[:3] == ["3", f"127.0.0.1:{dead}", "down"] and "cannot connect" in rows[4]

    out = cli("status", "--ring", path, "--json")
    doc = json.loads(out.stdout)
    assert [r["state"] for r in doc] == ["up", "up", "up", "down"]
    assert all(r["weights_bytes"] > 0 and r["rss_bytes"] > 0 for r in doc[:3])
    assert sum(r["share"] for r in doc[:3]) == pytest.approx(1.0)

    out = cli("status", *sum((["--peer", a] for a in ring.addresses), []))
    assert out.returncode == 0 and out.stdout.count(" up ") == 3


def test_cli_errors_are_one_line(tmp_path):
    out = cli("prompt", "--peer", "127.0.0.1:1", "hi")
    assert out.returncode == 2 and out.stderr.startswith("ringllm: error: lost peer http://127.0.0.1:1: cannot connect")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 3\n")
    out = cli("status", "--ring", str(bad))
    assert out.returncode == 2 and out.stderr.startswith("ringllm: error: ") and "Traceback" not in out.stderr
    out = cli("prompt", "--peer", "127.0.0.1:1", "--chat", "--raw", input="x\n")
    assert out.returncode == 2 and "--raw cannot be used with --chat" in out.stderr
