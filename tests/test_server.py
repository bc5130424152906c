"""The HTTP layer: input validation, error shapes, auth, health, metrics, and what happens to
the ring when clients misbehave (disconnect, stop reading, flood the queue).

Validation and error shapes run on a 3-peer ring of the tiny synthetic model (fast, no
download); the memory and slow-client tests use the real model (``pytest.mark.model``).
"""

from __future__ import annotations

import gc
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringllm import runtime
from ringllm.errors import RequestError
from ringllm.metrics import Histogram, Metrics, RequestRecord, render
from ringllm.model import KVCache
from ringllm.generation import Request
from ringllm.http.validate import parse_chat, parse_completion, parse_native
from ringllm.request_wire import from_wire, to_wire
from tests.ring_thread import RingThread


# -- helpers --------------------------------------------------------------------------------
def post(address: str, path: str, body, *, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict, dict]:
    """POST JSON (or raw bytes) and return (status, headers, parsed JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{address}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def get(address: str, path: str, *, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(f"http://{address}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def raw_request(address: str, path: str, body: dict) -> socket.socket:
    """Send a POST on a raw socket and return the socket, unread (to stall or cut the client)."""
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def assert_openai_error(body: dict, param: str | None = None) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, body
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, body


CHAT = [{"role": "user", "content": "hi"}]


# -- pure units -----------------------------------------------------------------------------
def test_histogram_buckets_are_cumulative_and_inclusive():
    h = Histogram([0.1, 1.0])
    for v in (0.05, 0.1, 0.5, 2.0):
        h.observe(v)
    lines = h.samples("x", {"rank": "0"})
    assert lines == ['x_bucket{rank="0",le="0.1"} 2', 'x_bucket{rank="0",le="1.0"} 3', 'x_bucket{rank="0",le="+Inf"} 4',
                     'x_sum{rank="0"} 2.65', 'x_count{rank="0"} 4']


def test_request_record_rates():
    rec = RequestRecord("r0-1", "chat")
    rec.started = 10.0
    rec.first_token = 10.5
    rec.completion_tokens = 11
    rec.ended = 12.5
    assert rec.ttft == 0.5
    assert rec.tokens_per_second == pytest.approx(5.0)


@pytest.fixture(scope="module")
def tiny_info(tiny_model_path):
    info, mf = runtime.open_model(str(tiny_model_path))
    mf.close()
    return info


BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ({"messages": CHAT, "max_tokens": -5}, "max_tokens"),
    ({"messages": CHAT, "max_tokens": 10**9}, "max_tokens"),
    ({"messages": CHAT, "max_tokens": "12"}, "max_tokens"),
    ({"messages": CHAT, "max_completion_tokens": 1.5}, "max_completion_tokens"),
    ({"messages": CHAT, "temperature": -0.1}, "temperature"),
    ({"messages": CHAT, "temperature": 2.5}, "temperature"),
    ({"messages": CHAT, "temperature": "hot"}, "temperature"),
    ({"messages": CHAT, "top_p": 1.5}, "top_p"),
    ({"messages": CHAT, "top_k": -1}, "top_k"),
    ({"messages": CHAT, "top_k": 10**30}, "top_k"),
    ({"messages": CHAT, "min_p": 2}, "min_p"),
    ({"messages": CHAT, "repeat_penalty": 0}, "repeat_penalty"),
    ({"messages": CHAT, "seed": 1.5}, "seed"),
    ({"messages": CHAT, "seed": True}, "seed"),
    ({"messages": CHAT, "n": 2}, "n"),
    ({"messages": CHAT, "stream": "yes"}, "stream"),
    ({"messages": CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": CHAT, "stop": ""}, "stop"),
    ({"messages": CHAT, "stop": ["a"] * 17}, "stop"),
    ({"messages": CHAT, "stop": [1]}, "stop"),
    ({"messages": CHAT, "logprobs": 1}, "logprobs"),
    ({"messages": CHAT, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": CHAT, "presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": CHAT, "logit_bias": {"5": 1}}, "logit_bias"),
    ({"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
    ({"messages": CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": CHAT, "frobnicate": 1}, "frobnicate"),
    ({"messages": CHAT, "prompt": "x"}, "prompt"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT, ids=[p for _, p in BAD_CHAT])
def test_chat_refuses_bad_input_naming_the_field(tiny_info, body, param):
    with pytest.raises(RequestError) as e:
        parse_chat(body, tiny_info, 128)
    assert e.value.param == param


BAD_COMPLETION = [
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 10**6]}, "prompt"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "messages": CHAT}, "messages"),
    ({"prompt": "x" * 400}, "prompt"),  # longer than the tiny model's 128-token context
]


@pytest.mark.parametrize("body,param", BAD_COMPLETION, ids=[p for _, p in BAD_COMPLETION])
def test_completion_refuses_bad_input_naming_the_field(tiny_info, body, param):
    with pytest.raises(RequestError) as e:
        parse_completion(body, tiny_info, 128)
    assert e.value.param == param


def test_openai_defaults_and_greedy_rules(tiny_info):
    a = parse_chat({"messages": CHAT, "seed": -1}, tiny_info, 128)
    s = a.request.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (1.0, 1.0, 0, 0.0, 2**63 - 1)
    assert a.request.max_tokens == 128 - len(a.request.prompt_ids)  # a chat reply may fill the context
    assert parse_chat({"messages": CHAT, "top_p": 0}, tiny_info, 128).request.sampling.greedy
    c = parse_completion({"prompt": "the", "logprobs": 3, "stop": "x", "stream": True,
                          "stream_options": {"include_usage": True}}, tiny_info, 128)
    assert (c.request.max_tokens, c.request.stop, c.top_logprobs, c.stream, c.include_usage) == (16, ("x",), 3, True, True)
    assert parse_completion({"prompt": [[5, 6, 7]], "max_tokens": 4}, tiny_info, 128).request.prompt_ids == (5, 6, 7)


# Text with lone surrogates too (JSON's "\ud800" escape decodes to one; UTF-8 cannot encode it).
any_text = st.text(st.characters(codec=None, exclude_categories=()) | st.characters(min_codepoint=0xD800,
                                                                                    max_codepoint=0xDFFF), max_size=8)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | any_text,
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(any_text, kids, max_size=3),
                           max_leaves=8)
field_names = st.sampled_from(["messages", "prompt", "prompt_ids", "raw", "system", "top_k", "max_tokens", "temperature", "top_p", "stop", "seed", "logprobs",
                               "top_logprobs", "stream", "stream_options", "n", "top_k", "min_p", "model", "x"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(json_values, st.dictionaries(field_names, json_values, max_size=6)))
def test_any_json_body_parses_or_is_a_request_error(tiny_info, body):
    """The h11-style invariant: any JSON gives a request or a RequestError, nothing else; and
    a request that parses can travel the ring (the control all-gather packs it with msgpack)
    and comes out the same on the other side."""
    for parse in (parse_chat, parse_completion, parse_native):
        try:
            req = parse(body, tiny_info, 128).request
        except RequestError:
            continue
        assert isinstance(req, Request)
        wire = msgpack.unpackb(msgpack.packb(to_wire(req), use_bin_type=True), raw=False)
        assert from_wire(wire) == req


# -- HTTP on a tiny ring --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ring(tiny_model_path):
    with RingThread(peers=3, model=str(tiny_model_path), links="tcp", max_batch=2, max_queue=1) as rt:
        yield rt


def test_health_reports_shard_memory_and_state(tiny_ring):
    shares = []
    for rank, address in enumerate(tiny_ring.addresses):
        status, text = get(address, "/health")
        h = json.loads(text)
        assert status == 200 and h["status"] == "ok" and h["rank"] == rank and h["size"] == 3
        assert h["memory"]["weights_bytes"] > 0 and h["memory"]["rss_bytes"] > 0
        assert {"kv_heads", "ffn", "vocab", "share"} <= set(h["shard"])
        assert h["running"] == 0 and h["queue"] == 0 and h["last_error"] is None
        shares.append(h["shard"]["share"])
    assert sum(shares) == pytest.approx(1.0)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", b"{not json", None),
    ("/v1/chat/completions", b"\xff\xfe", None),
    ("/v1/chat/completions", b"[1, 2]", None),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 100000}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": 9}, "temperature"),
    ("/v1/chat/completions", {"messages": CHAT, "bogus": True}, "bogus"),
    ("/v1/completions", {"prompt": "word " * 200}, "prompt"),
    ("/ringllm/v1/generate", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/ringllm/v1/generate", {"prompt": "x", "bogus": 1}, "bogus"),
    ("/ringllm/v1/generate", {"prompt": "word " * 200}, None),
    ("/ringllm/v1/generate", {"prompt": "x", "top_k": 1e30}, "top_k"),
    ("/v1/completions", {"prompt": "x", "top_k": 2**64}, "top_k"),
])
def test_bad_requests_are_400_in_openai_shape(tiny_ring, path, body, param):
    status, _, reply = post(tiny_ring.addresses[0], path, body)
    assert status == 400
    assert_openai_error(reply, param)
    assert all(p.failure is None for p in tiny_ring.peers)  # no request can upset the ring


def test_prompt_longer_than_context_says_so(tiny_ring):
    status, _, reply = post(tiny_ring.addresses[1], "/v1/completions", {"prompt": "word " * 200, "max_tokens": 1})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    assert "context holds only 128" in reply["error"]["message"]


def test_routing_errors_are_json(tiny_ring):
    status, text = get(tiny_ring.addresses[0], "/v1/nothing")
    assert status == 404
    assert_openai_error(json.loads(text))
    status, text = get(tiny_ring.addresses[0], "/v1/chat/completions")
    assert status == 405
    assert_openai_error(json.loads(text))
    status, _, reply = post(tiny_ring.addresses[0], "/v1/completions", b"x" * (5 * 2**20))
    assert status == 413
    assert_openai_error(reply)


def test_models_lists_the_ring_model(tiny_ring):
    status, text = get(tiny_ring.addresses[2], "/v1/models")
    data = json.loads(text)["data"]
    assert status == 200 and [m["id"] for m in data] == ["tiny"] and data[0]["object"] == "model"
    assert get(tiny_ring.addresses[2], "/v1/models/tiny")[0] == 200
    assert get(tiny_ring.addresses[2], "/v1/models/gpt-4")[0] == 404


def test_generation_on_every_peer_and_usage(tiny_ring):
    for address in tiny_ring.addresses:
        status, _, reply = post(address, "/v1/completions", {"prompt": "the", "max_tokens": 3, "temperature": 0,
                                                             "ignore_eos": True})
        assert status == 200, reply
        assert reply["usage"] == {"prompt_tokens": reply["usage"]["prompt_tokens"], "completion_tokens": 3,
                                  "total_tokens": reply["usage"]["prompt_tokens"] + 3}
        assert reply["choices"][0]["finish_reason"] == "length"


def test_full_queue_is_429_with_retry_after(tiny_ring):
    """max_batch 2 + max_queue 1: three long requests fill the ring, the fourth is refused."""
    long = {"messages": CHAT, "max_tokens": 100, "ignore_eos": True, "stream": True}
    socks = [raw_request(tiny_ring.addresses[0], "/v1/chat/completions", long) for _ in range(3)]
    try:
        deadline = time.monotonic() + 30
        p = tiny_ring.peers[0]
        while p.running + p.queue_depth < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        status, headers, reply = post(tiny_ring.addresses[0], "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})
        assert status == 429, reply
        assert headers["Retry-After"] == "1"
        assert reply["error"]["type"] == "rate_limit_error"
        assert_openai_error(reply)
    finally:
        for s in socks:
            s.close()
    tiny_ring.wait_idle()


def test_metrics_exposition(tiny_ring):
    post(tiny_ring.addresses[1], "/v1/completions", {"prompt": "the", "max_tokens": 2})
    post(tiny_ring.addresses[1], "/v1/completions", {"prompt": 1})
    status, text = get(tiny_ring.addresses[1], "/metrics")
    assert status == 200
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.split()[1] in ("HELP", "TYPE")
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    assert samples['ringllm_http_requests_total{rank="1",endpoint="completions",code="200"}'] >= 1
    assert samples['ringllm_http_requests_total{rank="1",endpoint="completions",code="400"}'] >= 1
    assert samples['ringllm_completion_tokens_total{rank="1"}'] >= 1
    assert samples['ringllm_time_to_first_token_seconds_count{rank="1"}'] >= 1
    assert samples['ringllm_ring_peers_up{rank="1"}'] == 3
    assert samples['ringllm_ring_bytes_total{rank="1",direction="sent"}'] > 0
    for name in ("ringllm_sync_seconds_total", "ringllm_compute_seconds_total", "ringllm_kv_cache_bytes",
                 "ringllm_resident_memory_bytes", "ringllm_queue_depth", "ringllm_running_sequences"):
        assert f'{name}{{rank="1"}}' in samples


def test_metrics_render_without_traffic(tiny_ring):
    text = render(Metrics(), tiny_ring.peers[0])
    assert "# TYPE ringllm_time_to_first_token_seconds histogram" in text
    assert 'ringllm_time_to_first_token_seconds_bucket{rank="0",le="+Inf"} 0' in text


def test_api_key(tiny_ring):
    from ringllm.http.app import make_app

    with tiny_ring.serving(make_app(tiny_ring.peers[0], api_key="sekrit-key")) as address:
        body = {"prompt": "the", "max_tokens": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit-key"}):
            status, hdrs, reply = post(address, "/v1/completions", body, headers=headers)
            assert status == 401 and reply["error"]["code"] == "invalid_api_key"
            assert hdrs.get("WWW-Authenticate") == "Bearer"
        assert get(address, "/v1/models")[0] == 401
        assert post(address, "/ringllm/v1/generate", body)[0] == 401
        status, _, reply = post(address, "/v1/completions", body, headers={"Authorization": "Bearer sekrit-key"})
        assert status == 200, reply
        assert get(address, "/health")[0] == 200  # monitoring needs no key
        assert get(address, "/metrics")[0] == 200


def test_cut_before_the_first_token_frees_the_slot(tiny_ring):
    """A client that hangs up while its request waits in the queue is cancelled there."""
    long = {"messages": CHAT, "max_tokens": 100, "ignore_eos": True}
    socks = [raw_request(tiny_ring.addresses[2], "/v1/chat/completions", long) for _ in range(3)]
    time.sleep(0.3)
    for s in socks:
        s.close()
    tiny_ring.wait_idle(10)


def test_a_client_that_accepts_no_bytes_is_cancelled_after_the_write_timeout(tmp_path):
    """Small socket buffers on both sides so that the stall shows after a few KB: the handler
    gives up after write_timeout, and the sequence is cancelled long before max_tokens."""
    from aiohttp import web

    from ringllm.ring.config import free_ports
    from ringllm.http.app import make_app
    from ringllm.http.plumbing import METRICS_KEY
    from tests.synth import write_tiny_model

    model = write_tiny_model(tmp_path / "tiny4k.gguf", context_length=4096)
    with RingThread(peers=1, model=str(model)) as rt:
        port = free_ports(1)[0]
        app = make_app(rt.peers[0], write_timeout=1.0)

        async def serve():
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted sockets inherit it
            listener.bind(("127.0.0.1", port))
            await web.SockSite(runner, listener).start()
            return runner

        runner = rt.call(serve)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        client.connect(("127.0.0.1", port))
        body = json.dumps({"prompt": "the", "max_tokens": 4000, "ignore_eos": True, "stream": True,
                           "logprobs": 20}).encode()
        client.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                       + body)
        try:
            metrics = app[METRICS_KEY]
            deadline = time.monotonic() + 60
            while metrics.in_progress or not metrics.outcomes:
                assert time.monotonic() < deadline, "the stalled stream was never given up"
                time.sleep(0.1)
            assert metrics.outcomes == {"cancelled": 1}
            rt.wait_idle(5)
            assert rt.peers[0].stats.tokens < 4000
        finally:
            client.close()
            rt.call(runner.cleanup)


def test_a_broken_ring_ends_streams_with_an_error_event_then_answers_503(tmp_path):
    import openai

    from tests.synth import write_tiny_model

    model = write_tiny_model(tmp_path / "tiny4k.gguf", context_length=4096)
    with RingThread(peers=2, model=str(model), links="tcp") as rt:
        client = openai.OpenAI(base_url=f"http://{rt.addresses[0]}/v1", api_key="x", max_retries=0)
        stream = client.completions.create(model="tiny", prompt="the", max_tokens=4000, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))

        async def cut():
            rt.peers[1].links.close("test: pulled the plug")

        rt.call(cut)
        with pytest.raises(openai.APIError, match="lost peer"):
            for _ in stream:
                pass
        deadline = time.monotonic() + 30
        while rt.peers[0].failure is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status, headers, reply = post(rt.addresses[0], "/v1/completions", {"prompt": "the", "max_tokens": 2})
        assert status == 503 and headers["Retry-After"] == "5" and "lost peer" in reply["error"]["message"]
        h = json.loads(get(rt.addresses[0], "/health")[1])
        assert h["status"] == "down" and "lost peer" in h["last_error"]
        assert 'ringllm_ring_up{rank="0"} 0' in get(rt.addresses[0], "/metrics")[1]


# -- misbehaving clients on the real model --------------------------------------------------
@pytest.fixture(scope="module")
def ring():
    with RingThread(peers=3, links="tcp") as rt:
        yield rt


def _kv_caches() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, KVCache))


def _kv_cache_holders() -> str:
    """Who refers to the KV caches still alive (for a failing leak check)."""
    gc.collect()
    caches = [o for o in gc.get_objects() if isinstance(o, KVCache)]
    def name(o: object) -> str:
        return type(o).__name__ + (f" {o.f_code.co_name}" if hasattr(o, "f_code") else "")

    chains = []
    for c in caches:
        for r in gc.get_referrers(c):
            if r is not caches:  # one level further up: a __dict__ says little on its own
                chains.append(f"{name(r)} <- {[name(o) for o in gc.get_referrers(r) if o is not caches][:4]}")
    return f"{len(caches)} KV caches alive, held by {chains}"


def _rss() -> int:
    """Resident bytes after handing freed heap back to the OS, so that the number is memory
    still held, not the allocator's slack from whatever ran before in this process."""
    import psutil

    runtime.release_free_memory()
    return psutil.Process().memory_info().rss


def _disconnect_after_first_token(address: str, path: str, body: dict) -> None:
    s = raw_request(address, path, body)
    try:
        s.settimeout(60)
        got = b""
        # Headers are sent with the first token (errors before it are HTTP statuses).
        while b"\r\n\r\n" not in got:
            chunk = s.recv(4096)
            assert chunk, "server closed the connection"
            got += chunk
        assert got.startswith(b"HTTP/1.1 200"), got[:200]
    finally:
        s.close()


@pytest.mark.model
def test_fifty_disconnects_leave_memory_and_queue_where_they_started(ring):
    peers = ring.peers
    bodies = [("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a long story."}],
                                        "max_tokens": 500, "stream": True, "ignore_eos": True}),
              ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 500, "stream": True, "ignore_eos": True}),
              ("/ringllm/v1/generate", {"prompt": "Tell me a long story.", "max_tokens": 500, "ignore_eos": True})]

    def wave(n: int) -> None:
        threads = [threading.Thread(target=_disconnect_after_first_token,
                                    args=(ring.addresses[i % 3], *bodies[i % 3])) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        ring.wait_idle(30)

    wave(10)  # warm-up: buffers and pools a batch of 10 needs
    wave(10)
    base_rss, base_caches = _rss(), _kv_caches()
    rss = []
    for _ in range(5):
        wave(10)
        rss.append(_rss())
    assert [p.running for p in peers] == [0, 0, 0]
    assert [p.queue_depth for p in peers] == [0, 0, 0]
    # Every sequence's KV cache was freed on every peer. Idle is reported when the step loop has
    # dropped its running list; give finished steps a moment to unwind, then name any holder.
    deadline = time.monotonic() + 5
    while _kv_caches() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert base_caches == 0 and _kv_caches() == 0, _kv_cache_holders()
    from ringllm.metrics import kv_cache_bytes

    assert [kv_cache_bytes(p) for p in peers] == [0, 0, 0]
    # One sequence's caches on 3 peers hold ~1 MB per 64 tokens, so 10 leaked sequences per wave
    # would add ~30 MB per wave and 50 would add >150 MB. Measured: the trimmed RSS can step up
    # once after the warm-up (a batch shape not seen before), then stays flat within 1 MB.
    mb = [round((r - base_rss) / 2**20, 1) for r in rss]
    assert max(mb) < 48, f"RSS above the baseline after each wave (MB): {mb}"
    assert mb[-1] - mb[0] < 8, f"RSS keeps growing wave after wave (MB): {mb}"
    _, text = get(ring.addresses[0], "/metrics")
    assert 'ringllm_requests_finished_total{rank="0",outcome="cancelled"}' in text


@pytest.mark.model
def test_a_client_that_stops_reading_does_not_hold_up_others(ring):
    """One client stops reading a long stream; another request on the same peer completes
    meanwhile; when the stalled client finally hangs up, its slot is freed."""
    stalled = raw_request(ring.addresses[0], "/v1/completions",
                          {"prompt": "Once upon a time", "max_tokens": 400, "stream": True, "ignore_eos": True})
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        time.sleep(1.0)
        assert ring.peers[0].running == 1
        t0 = time.monotonic()
        status, _, reply = post(ring.addresses[0], "/v1/completions", {"prompt": "The sky is", "max_tokens": 8,
                                                                       "ignore_eos": True, "temperature": 0})
        took = time.monotonic() - t0
        assert status == 200 and reply["usage"]["completion_tokens"] == 8
        assert ring.peers[0].running == 1, "the stalled stream should still be running"
        assert took < 30
    finally:
        stalled.close()
    ring.wait_idle(10)
