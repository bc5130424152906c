"""The OpenAI-compatible API driven by the official ``openai`` package (and curl) against a
3-peer ring on real loopback TCP links, with the real model."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.ring_thread import RingThread

pytestmark = pytest.mark.model

DOCS = Path(__file__).resolve().parent.parent / "docs"
HI = [{"role": "user", "content": "Say hello in one short sentence."}]


@pytest.fixture(scope="module")
def ring():
    with RingThread(peers=3, links="tcp") as rt:
        yield rt


@pytest.fixture(scope="module")
def clients(ring):
    cs = [openai.OpenAI(base_url=f"http://{a}/v1", api_key="unused", max_retries=0, timeout=120) for a in ring.addresses]
    yield cs
    for c in cs:
        c.close()


@pytest.fixture(scope="module")
def model_id(clients):
    return clients[0].models.list().data[0].id


def test_models_list(clients, model_id):
    assert model_id == "SmolLM2-135M-Instruct.Q4_1"
    for c in clients:
        assert [m.id for m in c.models.list()] == [model_id]
        assert c.models.retrieve(model_id).owned_by == "ringllm"


def test_streams_a_chat_completion_from_every_peer(clients, model_id, ring):
    texts = []
    for c in clients:
        chunks = list(c.chat.completions.create(model=model_id, messages=HI, max_tokens=12, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        assert all(isinstance(ch, ChatCompletionChunk) for ch in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert len({ch.id for ch in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
        content = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
        assert len(content) >= 2, "the reply should arrive in several pieces"
        finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finishes in (["stop"], ["length"])
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert 1 <= usage.completion_tokens <= 12
        texts.append("".join(content))
    assert texts[0] and texts[0] == texts[1] == texts[2]  # greedy: every peer gives the same reply
    ring.wait_idle()


def test_non_streaming_chat_validates_against_the_client_types(clients, model_id):
    raw = clients[1].chat.completions.with_raw_response.create(model=model_id, messages=HI, max_tokens=8, temperature=0)
    body = json.loads(raw.text)
    r = ChatCompletion.model_validate(body)
    assert r.model_extra == {} and r.choices[0].model_extra == {} and r.usage.model_extra == {}
    assert r.object == "chat.completion" and r.model == model_id
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    parsed = raw.parse()
    assert isinstance(parsed, ChatCompletion) and parsed.choices[0].message.content == r.choices[0].message.content


def test_completions_stream_and_whole_agree(clients, model_id):
    kw = dict(model=model_id, prompt="The capital of France is", max_tokens=6, temperature=0)
    whole = clients[2].completions.create(**kw)
    assert isinstance(whole, Completion) and whole.object == "text_completion"
    Completion.model_validate(whole.model_dump())
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6
    pieces = [ch.choices[0].text for ch in clients[0].completions.create(**kw, stream=True)]
    assert "".join(pieces) == whole.choices[0].text
    assert "Paris" in whole.choices[0].text


def test_seed_reproduces_a_sampled_reply_on_any_peer(clients, model_id):
    kw = dict(model=model_id, messages=HI, max_tokens=10, temperature=0.9, top_p=0.95, seed=1234)
    a = clients[0].chat.completions.create(**kw).choices[0].message.content
    b = clients[2].chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_stop_string_ends_the_reply_before_it(clients, model_id):
    kw = dict(model=model_id, prompt="1, 2, 3, 4, 5,", max_tokens=10, temperature=0)
    full = clients[0].completions.create(**kw).choices[0].text
    assert " 7" in full, full
    r = clients[0].completions.create(**kw, stop=[" 7", "never"])
    assert r.choices[0].text == full[: full.index(" 7")] and r.choices[0].finish_reason == "stop"


def test_chat_logprobs(clients, model_id):
    r = clients[1].chat.completions.create(model=model_id, messages=HI, max_tokens=5, temperature=0, logprobs=True,
                                           top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 5
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and bytes(t.bytes).decode("utf-8", "replace") == t.token
        # Greedy: the chosen token is the most likely one.
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-4)


def test_completion_logprobs(clients, model_id):
    r = clients[2].completions.create(model=model_id, prompt="The capital of France is", max_tokens=4, temperature=0,
                                      logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(d) == 2 for d in lp.top_logprobs) and lp.text_offset[0] == 0


def test_errors_raise_the_client_error_types(clients, model_id):
    with pytest.raises(openai.BadRequestError) as e:
        clients[0].chat.completions.create(model=model_id, messages=HI, max_tokens=10**6)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        clients[0].chat.completions.create(model=model_id, messages=HI, temperature=3)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        clients[0].chat.completions.create(model=model_id, messages=HI, n=2)
    with pytest.raises(openai.NotFoundError):
        clients[0].models.retrieve("gpt-4")


def test_extension_fields_through_extra_body(clients, model_id):
    r = clients[0].completions.create(model=model_id, prompt="Hello", max_tokens=5, temperature=0.7, seed=7,
                                      extra_body={"top_k": 20, "min_p": 0.05, "repeat_penalty": 1.1, "ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_async_client_concurrent_streams_on_all_peers(ring, model_id):
    async def one(address: str, i: int) -> str:
        async with openai.AsyncOpenAI(base_url=f"http://{address}/v1", api_key="x", max_retries=0) as c:
            stream = await c.chat.completions.create(model=model_id, messages=HI, max_tokens=6, temperature=0,
                                                     stream=True)
            return "".join([ch.choices[0].delta.content or "" async for ch in stream])

    async def main() -> list[str]:
        return await asyncio.gather(*(one(ring.addresses[i % 3], i) for i in range(6)))

    texts = asyncio.run(main())
    assert len(set(texts)) == 1 and texts[0]
    ring.wait_idle()


def test_api_key_through_the_openai_client(ring, model_id):
    from ringllm.http.app import make_app

    with ring.serving(make_app(ring.peers[1], api_key="k-123")) as address:
        bad = openai.OpenAI(base_url=f"http://{address}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=model_id, messages=HI, max_tokens=2)
        good = openai.OpenAI(base_url=f"http://{address}/v1", api_key="k-123", max_retries=0)
        assert good.chat.completions.create(model=model_id, messages=HI, max_tokens=2).usage.completion_tokens >= 1


def _doc_curl_commands() -> list[str]:
    text = (DOCS / "api.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    cmds = [b.replace("\\\n", " ").strip() for b in blocks if b.lstrip().startswith("curl")]
    assert len(cmds) >= 4, "docs/api.md should show curl for each endpoint"
    return cmds


def test_the_curl_commands_in_the_api_docs_work(ring):
    port = ring.addresses[0].rsplit(":", 1)[1]
    for cmd in _doc_curl_commands():
        cmd = cmd.replace("127.0.0.1:8700", f"127.0.0.1:{port}").replace("$RINGLLM_API_KEY", "unused")
        out = subprocess.run(["bash", "-c", cmd + " --fail-with-body -sS --max-time 120"], capture_output=True,
                             text=True, timeout=150)
        assert out.returncode == 0, (cmd, out.stdout, out.stderr)
        if '"stream": true' in cmd:
            events = [ln for ln in out.stdout.splitlines() if ln.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            for ev in events[:-1]:
                json.loads(ev[6:])
        elif "/ringllm/v1/generate" in cmd:
            events = [json.loads(ln) for ln in out.stdout.splitlines()]
            assert events[0]["event"] == "start" and events[-1]["event"] == "end"
        elif "/metrics" in cmd:
            assert "ringllm_http_requests_total" in out.stdout
        else:
            json.loads(out.stdout)
    ring.wait_idle()
