"""Issue 5, items 2-4: garbage on the peer port, authentication, TLS, and mismatches.

* Property tests (hypothesis) of the sans-IO decoder and of the handshake state machine: any
  input gives frames or a protocol error / a refusal, never another exception, never unbounded
  buffering (extending tests/test_wire.py's fuzzers to byte-by-byte feeding, the TCP link's
  receive-into-place path, and the handshake limits).
* Live tests against rings of real peer processes (the tiny synthetic model, so they start in
  a second or two): every kind of stranger is dropped with a logged reason while the ring keeps
  serving; without the secret, with a wrong one, or replaying a recorded handshake nobody gets
  in; TLS on peer links and HTTP; different models, ring.toml files, ranks and protocol versions
  are refused with messages that name the difference.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import re
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import ringllm
from ringllm.client import connect
from ringllm.errors import HandshakeError, RemoteProtocolError
from ringllm.ring.handshake import (
    HANDSHAKE_MAX_FRAME,
    PROTOCOL_VERSION,
    Handshake,
    HandshakeInfo,
    handshake,
)
from ringllm.ring.tls import http_client_context
from ringllm.ring.wire import Frame, FrameDecoder, encode_frame_bytes
from tests.peer_procs import ROOT, Ring, ring_toml

# -- property tests: decoder -----------------------------------------------------------------
MAX_FRAME, MAX_HEADER = 2048, 256


def _streams() -> st.SearchStrategy[bytes]:
    """Valid frame streams, corrupted at random points, plus pure noise and hostile prefixes."""
    kinds = st.sampled_from(["hello", "auth", "config", "ready", "refuse", "coll", "ping", "bye", "x"])
    headers = st.dictionaries(st.text(max_size=6).filter(lambda k: k != "k"),
                              st.integers(-2**63, 2**63 - 1) | st.text(max_size=8) | st.binary(max_size=8), max_size=3)
    valid = st.lists(st.tuples(kinds, headers, st.binary(max_size=80)), max_size=4).map(
        lambda items: b"".join(encode_frame_bytes(k, h, p or None) for k, h, p in items))

    @st.composite
    def corrupted(draw) -> bytes:
        data = bytearray(draw(valid))
        for _ in range(draw(st.integers(0, 3))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data[:draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)

    hostile_prefix = st.builds(lambda m, v, f, h, n: struct.pack(">2sBBII", m, v, f, h, n),
                               st.sampled_from([b"RL", b"XX", b"GE"]), st.integers(0, 255), st.integers(0, 255),
                               st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
    return st.one_of(st.binary(max_size=600), corrupted(),
                     st.tuples(hostile_prefix, st.binary(max_size=100)).map(lambda t: t[0] + t[1]))


def _decode_bytewise(data: bytes, *, into_place: bool) -> tuple[list[Frame], bool]:
    """Feed one byte at a time (via payload_buffer/payload_received inside payloads when
    ``into_place``, as the TCP link does); returns (frames, broke)."""
    dec = FrameDecoder(max_frame=MAX_FRAME, max_header=MAX_HEADER)
    frames: list[Frame] = []
    try:
        for i in range(len(data)):
            tail = dec.payload_buffer() if into_place else None
            if tail is not None:
                tail[:1] = data[i:i + 1]
                frames += dec.payload_received(1)
            else:
                frames += dec.feed(data[i:i + 1])
            assert dec.buffered <= MAX_FRAME
    except RemoteProtocolError:
        return frames, True
    return frames, False


@given(_streams(), st.booleans())
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_decoder_any_bytes_whole_or_bytewise_same_outcome_bounded(data, into_place):
    try:
        whole, broke = FrameDecoder(max_frame=MAX_FRAME, max_header=MAX_HEADER).feed(data), False
    except RemoteProtocolError:
        whole, broke = None, True
    frames, broke_bytewise = _decode_bytewise(data, into_place=into_place)
    assert broke == broke_bytewise
    if not broke:
        assert frames == whole


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
@settings(max_examples=100, deadline=None)
def test_huge_length_prefixes_are_refused_before_allocating(hlen, plen):
    dec = FrameDecoder(max_frame=HANDSHAKE_MAX_FRAME, max_header=HANDSHAKE_MAX_FRAME)
    prefix = struct.pack(">2sBBII", b"RL", 1, 0, hlen, plen)
    if 12 + hlen + plen <= HANDSHAKE_MAX_FRAME and hlen <= HANDSHAKE_MAX_FRAME:
        return  # a legal size: nothing to refuse
    with pytest.raises(RemoteProtocolError, match="header length|exceeds max"):
        dec.feed(prefix)
    assert dec.buffered == 0


# -- property tests: handshake state machine -------------------------------------------------
SECRET = b"0123456789abcdef-secret"
ME = HandshakeInfo(ring="sec", rank=0, size=2, model="ab" * 32, plan="cd" * 32, config='{"a":1}')

frames_st = st.builds(
    Frame,
    st.sampled_from(["hello", "auth", "config", "ready", "refuse", "coll", "bye"]),
    st.fixed_dictionaries({}, optional={
        "magic": st.sampled_from([b"RINGLLM", b"X"]), "v": st.sampled_from([PROTOCOL_VERSION, 2]) | st.integers(-2, 2**40),
        "ring": st.sampled_from(["sec", "x"]),
        "rank": st.integers(-5, 2**40), "size": st.integers(-5, 2**40), "model": st.sampled_from(["ab" * 32, "zz"]),
        "plan": st.sampled_from(["cd" * 32, ""]), "nonce": st.binary(min_size=32, max_size=32) | st.binary(max_size=40),
        "cfg": st.one_of(st.just('{"a":1}'), st.just('{"a":2}'), st.just("not json"), st.integers(-5, 5)),
        "mac": st.binary(max_size=40), "reason": st.text(max_size=20), "retry": st.booleans()}),
)


@given(st.lists(frames_st, max_size=6), st.booleans())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_handshake_machine_never_raises_and_never_admits_without_the_secret(frames, initiator):
    """Whatever frames a stranger sends (schema-valid or not: the machine must not trust the
    decoder for fields it reads), it is refused or still waiting; never authenticated.  And it
    gets nothing but our hello and a refusal, except the initiator's own proof (issue 15): no
    configuration, and from an acceptor no MAC at all."""
    hs = Handshake(ME, SECRET, initiator=initiator, expect_rank=1)
    hs.start()
    allowed = ("auth", "refuse") if initiator else ("refuse",)
    for frame in frames:
        try:  # only what the real decoder lets through reaches the machine
            (frame,) = FrameDecoder().feed(encode_frame_bytes(frame.kind, frame.header))
        except RemoteProtocolError:
            continue
        out = hs.receive(frame)
        assert all(kind in allowed for kind, _ in out), out
    assert hs.state != "DONE"


# -- live rings of peer processes (tiny model) -----------------------------------------------
def _tiny(path: Path, seed: int = 0) -> Path:
    from tests.synth import write_tiny_model

    return path if path.exists() else write_tiny_model(path, seed=seed)


def _claims(ring: Ring, rank: int, model: Path) -> HandshakeInfo:
    """What a correctly configured peer of ``ring`` at ``rank`` says in its hello."""
    from ringllm import runtime
    from ringllm.launch import ring_config_claim

    info, mf = runtime.open_model(str(model))
    mf.close()
    return HandshakeInfo(ring=ring.cfg.name, rank=rank, size=ring.cfg.size, model=info.fingerprint,
                         plan=runtime.make_plan(info, ring.cfg.weights).digest(),
                         config=ring_config_claim(ring.cfg, "numba"))  # the peers run auto: numba here


async def _greedy(addr: str, ssl_ctx: ssl.SSLContext | None = None) -> list[int]:
    body = {"prompt": "the cat", "raw": True, "temperature": 0, "max_tokens": 8, "ignore_eos": True}
    scheme = "https" if ssl_ctx else "http"
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{scheme}://{addr}/ringllm/v1/generate", json=body, ssl=ssl_ctx or False) as resp:
            assert resp.status == 200, await resp.text()
            events = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert events[-1]["event"] == "end", events[-1]
    return [ev["token"] for ev in events if ev["event"] == "token"]


async def _connect(port: int, src: str | None = None):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0) if src else None)
    return reader, writer, writer.get_extra_info("sockname")[1]


def _dropped(ring: Ring, rank: int, local_port: int, timeout: float = 15.0) -> str:
    """The reason rank logged for dropping our connection from ``local_port``."""
    m = ring.wait_log(rank, rf"dropped connection from 127\.0\.0\.\d+:{local_port}: (.*)", timeout=timeout)
    return m.group(1)


@pytest.fixture(scope="module")
def tiny_ring(tmp_path_factory, tiny_model_path):
    tmp = tmp_path_factory.mktemp("security")
    with Ring(tmp, ring_toml(2, str(tiny_model_path), name="sec", heartbeat=0.3, dead_after=1.0), tag="sec") as r:
        r.start_all()
        r.wait_up(timeout=60)
        r.reference = asyncio.run(_greedy(r.http(0)))
        r.model = tiny_model_path
        yield r


def _assert_still_serving(ring: Ring) -> None:
    assert asyncio.run(_greedy(ring.http(1))) == ring.reference
    for r in range(ring.cfg.size):
        assert "ring lost" not in ring.log(r), ring.log(r)[-2000:]


async def test_garbage_on_the_peer_port_is_dropped_with_a_reason_and_the_ring_keeps_serving(tiny_ring):
    port = tiny_ring.cfg.peers[0].port
    hello = encode_frame_bytes("hello", {"magic": b"RINGLLM", "v": PROTOCOL_VERSION, "nonce": os.urandom(32)})
    cases = {  # name: (bytes to send, close afterwards, expected reason)
        "random bytes": (b"\xff\x00" + os.urandom(4000), False, "not a ringllm peer or protocol error: bad frame magic"),
        "http request": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, "bad frame magic b'GE'"),
        "truncated frame": (hello[:20], True, "connection lost during handshake in state AWAIT_HELLO"),
        "truncated, then silence": (hello[:20], False, "handshake timed out after 3 s in state AWAIT_HELLO"),
        "huge length prefix": (struct.pack(">2sBBII", b"RL", 1, 0, 40, 2**32 - 1), False, "exceeds max 16384"),
        "huge header length": (struct.pack(">2sBBII", b"RL", 1, 0, 2**31, 0), False, "header length 2147483648"),
        "wrong magic": (struct.pack(">2sBBII", b"LR", 1, 0, 4, 0), False, "bad frame magic b'LR'"),
        "wrong codec version": (struct.pack(">2sBBII", b"RL", 9, 0, 4, 0), False, "codec version 9 not supported"),
        "auth before hello": (encode_frame_bytes("auth", {"mac": b"x" * 32}), False,
                              "got a 'auth' frame while waiting for 'hello'"),
        "collective frame": (encode_frame_bytes("coll", {"s": 1, "i": 0, "o": "ar", "n": 4}, b"\0" * 16), False,
                             "got a 'coll' frame while waiting for 'hello'"),
        "bye frame": (encode_frame_bytes("bye", {"reason": "go away", "lost": "rank 1"}), False,
                      "got a 'bye' frame while waiting for 'hello'"),
        "hello, then ready": (hello + encode_frame_bytes("ready"), False, "got a 'ready' frame while waiting for 'auth'"),
        "nothing at all": (b"", False, "handshake timed out after 3 s in state AWAIT_HELLO"),
    }

    async def one(i: int, data: bytes, close: bool) -> int:
        # From 127.0.0.2.. (other sources): one source may only have 4 handshakes at once.
        reader, writer, local = await _connect(port, src=f"127.0.0.{2 + i}")
        writer.write(data)
        if close:
            writer.close()
        else:
            try:
                async with asyncio.timeout(8):
                    await reader.read()  # until the peer drops us
            except (OSError, TimeoutError):
                pass
            writer.close()
        return local

    t0 = time.monotonic()
    locals_ = await asyncio.gather(*[one(i, data, close) for i, (data, close, _) in enumerate(cases.values())])
    for (name, (_, _, reason)), local in zip(cases.items(), locals_):
        got = await asyncio.to_thread(_dropped, tiny_ring, 0, local)
        print(f"\n[{name}] dropped: {got}")
        assert reason in got, (name, got)
    assert time.monotonic() - t0 < 12
    await asyncio.to_thread(_assert_still_serving, tiny_ring)


async def test_a_real_peer_closes_a_slowloris_http_client_within_its_default_header_deadline(tiny_ring):
    """The limits of tests/test_http_limits.py are wired into `ringllm peer` (defaults): a
    client dribbling a request head a byte a second is closed, unanswered, within 30 s."""
    from ringllm.ring.config import HTTP_HEADER_TIMEOUT

    port = tiny_ring.cfg.peers[0].http_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"z" * 200
    t0 = time.monotonic()

    async def dribble():
        for i in range(len(head)):
            writer.write(head[i:i + 1])
            await asyncio.sleep(0.5)

    sender = asyncio.create_task(dribble())
    try:
        async with asyncio.timeout(30):
            got = await reader.read()  # b"" once the peer closes
    finally:
        sender.cancel()
        writer.close()
    took = time.monotonic() - t0
    assert got == b"" and took >= HTTP_HEADER_TIMEOUT * 0.9, (got[:200], took)
    await asyncio.to_thread(_assert_still_serving, tiny_ring)


async def test_a_flood_of_silent_connections_is_bounded_and_the_ring_keeps_serving(tiny_ring):
    conns = [await _connect(tiny_ring.cfg.peers[1].port) for _ in range(24)]
    await asyncio.to_thread(tiny_ring.wait_log, 1, r"handshakes already in progress", 10)
    for _, writer, _ in conns:
        writer.close()
    await asyncio.to_thread(_assert_still_serving, tiny_ring)


async def test_without_the_secret_or_with_a_wrong_one_nobody_gets_in(tiny_ring):
    port = tiny_ring.cfg.peers[0].port
    claims = _claims(tiny_ring, 1, tiny_ring.model)
    # A wrong secret: the real handshake driver with everything else right.
    reader, writer, local = await _connect(port)
    with pytest.raises(HandshakeError, match="peer refused the handshake: authentication failed"):
        await handshake(reader, writer, me=claims, initiator=True, secret=b"not-the-ring-secret!", expect_rank=0, timeout=5)
    assert "wrong secret" in await asyncio.to_thread(_dropped, tiny_ring, 0, local)
    # No secret at all: a correct hello, then a made-up proof.
    reader, writer, local = await _connect(port)
    hs = Handshake(claims, b"x" * 16, initiator=True)
    (kind, hello), = hs.start()
    writer.write(encode_frame_bytes(kind, hello) + encode_frame_bytes("auth", {"mac": os.urandom(32)}))
    refusal = await _read_refusal(reader)
    assert refusal == "authentication failed"  # all it is told; the peer logs the reason
    writer.close()
    assert "wrong secret" in await asyncio.to_thread(_dropped, tiny_ring, 0, local)
    await asyncio.to_thread(_assert_still_serving, tiny_ring)


async def _read_refusal(reader: asyncio.StreamReader) -> str:
    dec = FrameDecoder(max_frame=HANDSHAKE_MAX_FRAME)
    async with asyncio.timeout(10):
        while True:
            for f in dec.feed(await reader.read(4096) or b""):
                if f.kind == "refuse":
                    return f.header["reason"]
            if reader.at_eof():
                return ""


async def test_an_unauthenticated_connection_learns_no_address_plan_or_fingerprint_and_gets_no_mac(tiny_ring):
    """Issue 15's acceptance test, against a real peer process: a stranger connects, reads what
    the peer says first, sends a well-formed hello and a made-up proof, and reads until the peer
    closes.  All it may get is the peer's hello (magic, version, a 32-byte nonce) and a refusal
    that says "authentication failed": no host:port, ring name, plan hash, model fingerprint or
    ring settings, and no MAC."""
    cfg = tiny_ring.cfg
    claims = _claims(tiny_ring, 0, tiny_ring.model)
    reader, writer, local = await _connect(cfg.peers[0].port, src="127.0.0.20")
    received = bytearray()
    dec = FrameDecoder(max_frame=HANDSHAKE_MAX_FRAME)
    frames: list[Frame] = []
    async with asyncio.timeout(10):
        while not frames:  # what the peer sends before we say anything
            chunk = await reader.read(4096)
            assert chunk, "the peer closed without a word"
            received += chunk
            frames += dec.feed(chunk)
        writer.write(encode_frame_bytes("hello", {"magic": b"RINGLLM", "v": PROTOCOL_VERSION, "nonce": os.urandom(32)})
                     + encode_frame_bytes("auth", {"mac": os.urandom(32)}))
        while chunk := await reader.read(4096):  # everything, until the peer closes
            received += chunk
            frames += dec.feed(chunk)
    writer.close()
    assert [f.kind for f in frames] == ["hello", "refuse"], frames
    hello, refusal = frames
    assert set(hello.header) == {"magic", "v", "nonce"} and hello.header["magic"] == b"RINGLLM"
    assert hello.header["v"] == PROTOCOL_VERSION and len(hello.header["nonce"]) == 32
    assert refusal.header == {"reason": "authentication failed", "retry": False}
    assert all(len(f.payload) == 0 for f in frames)
    # Exactly those two frames' bytes, nothing more (no MAC-sized blob anywhere).
    assert bytes(received) == (encode_frame_bytes("hello", hello.header) + encode_frame_bytes("refuse", refusal.header))
    # And, byte for byte, none of the claims (the nonce blanked: 32 random bytes may hold anything).
    rest = bytes(received).replace(hello.header["nonce"], b"")
    leaks = [f"{p.host}:{p.port}" for p in cfg.peers] + [f'"{p.host}",{p.port}' for p in cfg.peers]
    leaks += [p.host for p in cfg.peers] + [str(p.port) for p in cfg.peers]
    leaks += [claims.plan, claims.model, claims.config, cfg.name, "max_batch", "dead_after"]
    for leak in leaks:
        assert leak.encode() not in rest, leak
    for digest in (claims.plan, claims.model):
        assert bytes.fromhex(digest) not in rest, digest
    assert "wrong secret" in await asyncio.to_thread(_dropped, tiny_ring, 0, local)
    await asyncio.to_thread(_assert_still_serving, tiny_ring)


async def test_a_recorded_handshake_cannot_be_replayed(tiny_ring):
    """Record what a peer with the secret sends, then replay it byte for byte: the peer's fresh
    nonce makes the recorded proof worthless."""
    port = tiny_ring.cfg.peers[0].port
    claims = _claims(tiny_ring, 1, tiny_ring.model)
    reader, writer, local = await _connect(port)
    recorded: list[bytes] = []
    real_write = writer.write
    writer.write = lambda data: (recorded.append(bytes(data)), real_write(data))[1]  # type: ignore[method-assign]
    with pytest.raises(HandshakeError, match="already has a live link from rank 1"):
        # The secret is right, so it gets as far as admission: rank 0 already has its rank 1.
        await handshake(reader, writer, me=claims, initiator=True, secret=tiny_ring.cfg.secret, expect_rank=0, timeout=5)
    hello, auth = recorded[0], recorded[1]
    reader, writer, local = await _connect(port)
    writer.write(hello)
    await reader.readexactly(12)  # the peer's hello is on its way: now the old proof
    writer.write(auth)
    writer.close()
    reason = await asyncio.to_thread(_dropped, tiny_ring, 0, local)
    assert "wrong secret" in reason and "replayed" in reason, reason
    await asyncio.to_thread(_assert_still_serving, tiny_ring)


async def test_protocol_version_and_wrong_rank_are_refused_precisely(tiny_ring):
    port = tiny_ring.cfg.peers[0].port
    claims = _claims(tiny_ring, 1, tiny_ring.model)
    cases = [
        (dataclasses.replace(claims, version=PROTOCOL_VERSION + 1),
         f"protocol version {PROTOCOL_VERSION + 1} not supported (we speak {PROTOCOL_VERSION})"),
        (dataclasses.replace(claims, rank=0), "peer rank 0 connected where we expect rank 1"),
        (dataclasses.replace(claims, rank=7), "peer rank 7 connected where we expect rank 1"),
        (dataclasses.replace(claims, size=3), "peer rank 1 has ring size 3 but we have 2"),
        (dataclasses.replace(claims, ring="other"), "peer is in ring 'other' but we are in ring 'sec'"),
    ]
    for info, reason in cases:
        reader, writer, local = await _connect(port)
        with pytest.raises(HandshakeError):  # (we may find fault with its claims first)
            await handshake(reader, writer, me=info, initiator=True, secret=tiny_ring.cfg.secret, expect_rank=0, timeout=5)
        assert reason in await asyncio.to_thread(_dropped, tiny_ring, 0, local)
    await asyncio.to_thread(_assert_still_serving, tiny_ring)


# -- mismatched peers joining (a restarted peer with the wrong file) -------------------------------
def _middles_changed(src: Path, dst: Path) -> Path:
    """A copy of ``src`` with one quant byte flipped in the middle of every tensor over 8 KiB
    (the embeddings and every FFN matrix): outside the first and last 4 KiB, which is all the
    old fingerprint sampled. Offsets from the gguf package's reader, not ours."""
    import gguf

    data = bytearray(src.read_bytes())
    changed = 0
    for t in gguf.GGUFReader(str(src)).tensors:
        if t.n_bytes > 8192 + 64:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0  # blocks of 34 bytes: f16 scale, 32 int8
            pos = t.n_bytes // 2
            while pos % 34 < 2:  # a quant byte, not a scale (which could become NaN)
                pos += 1
            assert 4096 <= pos < t.n_bytes - 4096
            data[t.data_offset + pos] ^= 0x5A
            changed += 1
    assert changed >= 7  # token_embd and the 3 FFN matrices of both layers
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("what", ["model", "weights", "ring.toml", "kernels"])
def test_a_restarted_peer_with_a_different_model_or_ring_toml_is_refused_then_the_right_one_joins(
        what, tmp_path, tiny_model_path):
    from ringllm.ring.config import free_ports

    kw = dict(name="mm", heartbeat=0.3, dead_after=1.0, secret="mismatch-test-secret", ports=free_ports(6))
    with Ring(tmp_path, ring_toml(3, str(tiny_model_path), **kw), tag="mm") as ring:
        ring.start_all()
        ring.wait_up(timeout=60)
        ring.kill(1)
        bad = tmp_path / "bad.toml"
        if what == "model":
            other_model = _tiny(tmp_path / "other.gguf", seed=1)
            bad.write_text(ring_toml(3, str(tiny_model_path), models={1: str(other_model)}, **kw))
            expect = r"peer rank [12] has model fingerprint \w+\.\. but we have \w+\.\. \(a different model file\)"
        elif what == "weights":  # same metadata, tensor table and tensor ends; model_sha256 unset
            other_model = _middles_changed(tiny_model_path, tmp_path / "middles.gguf")
            assert other_model.stat().st_size == tiny_model_path.stat().st_size
            bad.write_text(ring_toml(3, str(tiny_model_path), models={1: str(other_model)}, **kw))
            assert "model_sha256" not in bad.read_text()
            expect = r"peer rank [12] has model fingerprint \w+\.\. but we have \w+\.\. \(a different model file\)"
        elif what == "kernels":  # the others run auto, numba here: sums in another order
            bad.write_text(ring_toml(3, str(tiny_model_path), extra='kernels = "numpy"', **kw))
            expect = (r"peer rank [12] runs a different ring configuration: its ring.toml has kernels = "
                      r"\W?(numpy|numba)\W? but ours has \W?(numba|numpy)")
        else:
            bad.write_text(ring_toml(3, str(tiny_model_path), extra="max_batch = 4", **kw))
            expect = (r"peer rank [12] runs a different ring configuration: its ring.toml has max_batch = (4|16) "
                      r"but ours has (16|4)")
        proc = ring.start(1, ring_path=bad)
        # Both ends check each other: whichever finds the difference first refuses. The newcomer
        # gives up with the reason ('ringllm: error: ...'); the survivor logs it and waits.
        assert proc.wait(60) == 2
        assert re.search(r"ringllm: error: .*" + expect, ring.log(1)), ring.log(1)[-2000:]
        ring.wait_log(2, r"dropped connection from .*: " + expect)
        assert ring.alive(0) and ring.alive(2)
        ring.start(1)  # the right one
        ring.wait_up(timeout=60)
        assert asyncio.run(_greedy(ring.http(1)))


def test_a_duplicate_rank_is_refused(tmp_path, tiny_model_path):
    from ringllm.ring.config import free_ports

    with Ring(tmp_path, ring_toml(2, str(tiny_model_path), name="dup", heartbeat=0.3, dead_after=1.0),
              tag="dup") as ring:
        ring.start_all()
        ring.wait_up(timeout=60)
        # Same ring.toml, same rank, same host: its port is taken.
        dup = Ring(tmp_path, ring.path.read_text(), tag="dup-same")
        proc = dup.start(1)
        try:
            assert proc.wait(60) == 2
        finally:
            dup.stop()
        assert re.search(r"cannot listen on 127\.0\.0\.1:\d+: .*is another peer already running as rank 1\?",
                         dup.log(1)), dup.log(1)[-2000:]
        # Listening elsewhere (and serving HTTP elsewhere, as on another host), it reaches rank 0,
        # which still has a live rank 1: refused.
        http1 = ring.cfg.peers[1].http_port
        dup = Ring(tmp_path, ring.path.read_text().replace(f"http_port = {http1}\n", f"http_port = {free_ports(1)[0]}\n"),
                   tag="dup-other")
        dup.start(1, listen=free_ports(1)[0])
        try:
            ring.wait_log(0, r"dropped connection from .*already has a live link from rank 1 .*duplicate rank 1")
        finally:
            dup.stop()
        assert asyncio.run(_greedy(ring.http(0)))
        assert "ring lost" not in ring.log(0)


# -- TLS ------------------------------------------------------------------------------------------
def _make_certs(d: Path, name: str = "ring") -> dict[str, Path]:
    """A self-signed CA and one peer certificate (for 127.0.0.1) signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer_name, issuer_key, *, ca: bool):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca_cert = cert(f"{name} CA", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    peer_cert = cert(f"{name} peer", key, ca_name, ca_key, ca=False)
    out = {"ca": d / f"{name}-ca.crt", "cert": d / f"{name}-peer.crt", "key": d / f"{name}-peer.key"}
    out["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    out["cert"].write_bytes(peer_cert.public_bytes(serialization.Encoding.PEM))
    out["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    return out


def test_tls_on_peer_links_and_http(tmp_path, tiny_model_path):
    pytest.importorskip("cryptography")
    certs = _make_certs(tmp_path)
    stranger = _make_certs(tmp_path, "stranger")  # a valid certificate from another CA
    tls = f'[tls]\ncert = "{certs["cert"]}"\nkey = "{certs["key"]}"\nca = "{certs["ca"]}"\n'
    text = ring_toml(2, str(tiny_model_path), name="tls", heartbeat=0.3, dead_after=1.0, extra=tls)
    client_ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    with Ring(tmp_path, text, tag="tls") as ring:
        ring.start_all()
        for r in range(2):  # /health over HTTPS (Ring.health speaks plain HTTP)
            ring.wait_log(r, "serving HTTPS on", timeout=60)
        assert "over TLS" in ring.log(0)
        ref = asyncio.run(_greedy(ring.http(0), client_ctx))
        assert asyncio.run(_greedy(ring.http(1), client_ctx)) == ref

        # The CLI and the Python client speak HTTPS too: ring.toml's [tls] brings the CA.
        cli = [sys.executable, "-m", "ringllm"]
        out = subprocess.run(cli + ["prompt", "--ring", str(ring.path), "--rank", "1", "--raw", "the cat",
                                    "--temperature", "0", "--max-tokens", "8", "--ignore-eos", "--json"],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["ids"] == ref
        status = subprocess.run(cli + ["status", "--ring", str(ring.path), "--json"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert status.returncode == 0 and [r["state"] for r in json.loads(status.stdout)] == ["up", "up"]
        by_cacert = subprocess.run(cli + ["status", "--peer", ring.http(0), "--cacert", str(certs["ca"]), "--json"],
                                   capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert by_cacert.returncode == 0, by_cacert.stdout + by_cacert.stderr

        async def python_client() -> list[int]:
            async with connect(ring.http(0), ssl=http_client_context(ring.cfg.tls)) as client:
                done = await client.complete("the cat", raw=True, temperature=0, max_tokens=8, ignore_eos=True)
            return done.ids
        assert asyncio.run(python_client()) == ref

        async def strangers() -> None:
            port = ring.cfg.peers[0].port
            # 1. plaintext ringllm hello on a TLS port
            reader, writer, local = await _connect(port)
            writer.write(encode_frame_bytes("hello", {"magic": b"RINGLLM"}))
            await reader.read()
            assert "TLS handshake failed" in await asyncio.to_thread(_dropped, ring, 0, local)
            # 2. TLS without a client certificate, and 3. with another CA's certificate
            for cert in (None, stranger):
                ctx = ssl.create_default_context(cafile=str(certs["ca"]))
                ctx.check_hostname = False
                if cert:
                    ctx.load_cert_chain(cert["cert"], cert["key"])
                try:
                    r2, w2 = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
                    w2.write(b"x")
                    await r2.read()  # TLS 1.3: the refusal arrives after the handshake "succeeds"
                    w2.close()
                except (ssl.SSLError, OSError):
                    pass
            await asyncio.to_thread(ring.wait_log, 0, r"dropped connection from .*TLS handshake failed.*"
                                                      r"(CERTIFICATE|certificate)", 10)
            # 4. plain HTTP to the HTTPS API
            async with aiohttp.ClientSession() as s:
                with pytest.raises(aiohttp.ClientError):
                    async with s.get(f"http://{ring.http(0)}/health") as resp:
                        await resp.read()

        asyncio.run(strangers())
        assert asyncio.run(_greedy(ring.http(0), client_ctx)) == ref
        assert "ring lost" not in ring.log(0)


async def test_a_flood_of_bytes_is_not_buffered(tiny_ring):
    """Strangers streaming megabytes behind a plausible frame prefix: each is refused at its
    first header and the rest is discarded unread into memory; the peer's memory stays flat
    and the ring keeps serving."""
    pid = tiny_ring.pid(0)

    def rss() -> int:
        return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("VmRSS")).split()[1])

    before = rss()
    conns = [await _connect(tiny_ring.cfg.peers[0].port) for _ in range(8)]
    chunk = struct.pack(">2sBBII", b"RL", 1, 0, 16000, 0) + b"\x81" * (1 << 20)  # a 1 MiB "header"
    for _, writer, _ in conns:
        for _ in range(4):
            writer.write(chunk)
    await asyncio.sleep(1.0)
    assert rss() - before < 16 * 1024  # kB: far less than the 32 MiB sent
    for _, writer, _ in conns:
        writer.close()
    await asyncio.to_thread(_assert_still_serving, tiny_ring)


# -- the HTTP API: what a client sends cannot reach past the boundary ------------------------
# (security issue: a lone surrogate in "stop" broke the ring on every peer; in a prompt it was
# a plain-text 500, and /health then quoted the request.)
def _post_raw(address: str, path: str, data: bytes, timeout: float = 60) -> tuple[int, str, bytes]:
    """POST bytes as JSON; (status, content type, body)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://{address}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def _assert_json_error(status: int, ctype: str, data: bytes, param: str | None = None) -> dict:
    """A 4xx in the error shape both APIs answer refusals in; ``param`` (a prefix) names the field."""
    assert 400 <= status < 500, (status, data[:300])
    assert ctype.startswith("application/json"), (status, ctype, data[:300])
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), err
    if param is not None:
        assert isinstance(err["param"], str) and err["param"].startswith(param), err
    return err


def test_the_reported_surrogate_requests_are_400s_and_the_ring_never_notices(tiny_ring):
    """The issue's requests against real peer processes: each is a JSON 400 naming the field;
    no peer logs a lost ring; /health and the logs never show the request's text."""
    marker = "zq-private-request-text"
    cases = [
        ("/v1/completions", b'{"prompt":"hi","stop":["\\ud800"],"max_tokens":2}', "stop"),
        ("/v1/completions", b'{"prompt":"hi","stop":"' + marker.encode() + b'\\udfff","max_tokens":2}', "stop"),
        ("/v1/chat/completions",
         b'{"messages":[{"role":"user","content":"' + marker.encode() + b'\\ud800"}],"max_tokens":2}',
         "messages[0].content"),
        ("/ringllm/v1/generate", b'{"prompt":"' + marker.encode() + b'\\ud800","max_tokens":2}', "prompt"),
        ("/ringllm/v1/generate", b'{"prompt":"hi","stop":["\\ud800"],"max_tokens":2}', "stop"),
    ]
    for path, data, param in cases:
        _assert_json_error(*_post_raw(tiny_ring.http(0), path, data), param=param)
    _assert_still_serving(tiny_ring)
    for r in range(tiny_ring.cfg.size):
        h = tiny_ring.health(r)
        assert h is not None and h["status"] == "ok" and h["last_error"] is None, h
        assert marker not in json.dumps(h)
        log = tiny_ring.log(r)
        assert marker not in log and "Logging error" not in log and "Traceback" not in log, log[-2000:]


CHAT_OK = [{"role": "user", "content": "hi"}]


def _nested(depth: int) -> Any:
    v: Any = 1
    for _ in range(depth):
        v = {"a": [v]}
    return v


@pytest.fixture(scope="module")
def inproc_ring(tiny_model_path):
    """A live 3-peer ring of the tiny model in this process: TCP ring links and HTTP on
    loopback, as between processes (the fuzz posts to rank 0, the canary asks rank 1)."""
    from tests.ring_thread import RingThread

    with RingThread(peers=3, model=str(tiny_model_path), links="tcp") as rt:
        yield rt


def _normal_request_succeeds(rt) -> None:
    body = json.dumps({"prompt": "the", "max_tokens": 2, "temperature": 0}).encode()
    status, _, data = _post_raw(rt.addresses[1], "/v1/completions", body)
    assert status == 200, data[:300]
    assert json.loads(data)["usage"]["completion_tokens"] >= 1
    assert all(p.failure is None for p in rt.peers), [p.failure for p in rt.peers]


HOSTILE = [  # (path, body (dict, or raw bytes), the field the 400 must name or None)
    ("/v1/completions", {"prompt": "hi", "stop": ["\ud800"], "max_tokens": 2}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udc80"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages[0].content[0].text"),
    ("/v1/chat/completions", {"messages": CHAT_OK, "user": "\ud800"}, "user"),
    ("/v1/chat/completions", {"messages": CHAT_OK, "metadata": {"\ud800": 1}}, "metadata"),
    ("/ringllm/v1/generate", {"prompt": "\ud800"}, "prompt"),
    ("/ringllm/v1/generate", {"prompt": "hi", "system": "a\udfffb"}, "system"),
    ("/ringllm/v1/generate", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ("/ringllm/v1/generate", {"prompt": "hi", "stop": "x\ud800"}, "stop"),
    ("/v1/chat/completions", {"messages": CHAT_OK, "temperature": float("nan")}, "temperature"),
    ("/ringllm/v1/generate", {"prompt": "hi", "temperature": float("inf")}, "temperature"),
    ("/ringllm/v1/generate", {"prompt": "hi", "top_p": float("-inf")}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "metadata": {"x": float("nan")}}, "metadata.x"),
    ("/ringllm/v1/generate", {"prompt": "hi", "seed": 2**70}, "seed"),
    ("/ringllm/v1/generate", {"prompt": "hi", "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**64}, "seed"),
    ("/ringllm/v1/generate", {"prompt": "hi", "max_tokens": -3}, "max_tokens"),
    ("/ringllm/v1/generate", {"prompt": "hi", "top_k": 2**63}, "top_k"),
    ("/ringllm/v1/generate", {"prompt_ids": [1, 2**40]}, "prompt_ids"),
    ("/ringllm/v1/generate", {"prompt_ids": [1, -1]}, "prompt_ids"),
    ("/v1/completions", {"prompt": [5, -1]}, "prompt"),
    ("/ringllm/v1/generate", {"prompt": "hi", "raw": "yes"}, "raw"),
    ("/ringllm/v1/generate", {"prompt": "hi", "ignore_eos": 1}, "ignore_eos"),
    ("/ringllm/v1/generate", {"prompt": "hi", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": CHAT_OK, "metadata": _nested(40)}, "metadata"),
    ("/ringllm/v1/generate", {"prompt": "hi", "stop": [_nested(3)]}, "stop"),
    ("/ringllm/v1/generate", b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", None),  # too long to convert
    ("/v1/completions", b"[" * 5000 + b"]" * 5000, None),
]


@pytest.mark.parametrize("path,body,param", HOSTILE, ids=[f"{p.rsplit('/', 1)[1]}-{i}" for i, (p, _, _) in
                                                         enumerate(HOSTILE)])
def test_hostile_values_are_400s_naming_the_field_and_the_ring_goes_on(inproc_ring, path, body, param):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    _assert_json_error(*_post_raw(inproc_ring.addresses[0], path, data), param=param)
    _normal_request_succeeds(inproc_ring)
    for p in inproc_ring.peers:
        assert p.stats.last_error is None


def _run_requests(rt, requests: list) -> list:
    """Run Requests at once on rank 0's Peer; each result is its Steps or the exception raised."""
    async def one(req):
        try:
            return [s async for s in rt.peers[0].generate(req)]
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            return exc

    async def all_of():
        return await asyncio.gather(*(one(r) for r in requests))

    return rt.call(all_of)


def test_a_request_that_cannot_travel_the_ring_is_refused_at_the_peer(inproc_ring):
    """Past the HTTP validator (a Python caller of Peer.generate), a stop string msgpack cannot
    pack is refused before it joins the news; the request beside it is served."""
    from ringllm.errors import RequestError
    from ringllm.generation import Request
    from ringllm.sampling import SamplingParams

    greedy = SamplingParams(temperature=0)
    bad = Request((5, 6), greedy, max_tokens=4, stop=("\ud800",))
    good = Request((5, 6), greedy, max_tokens=4, ignore_eos=True)
    out = _run_requests(inproc_ring, [bad, good])
    assert isinstance(out[0], RequestError) and "cannot travel the ring" in str(out[0])
    assert isinstance(out[1], list) and len(out[1]) == 4
    assert all(p.failure is None for p in inproc_ring.peers)


def test_a_sequence_that_raises_fails_alone(inproc_ring, monkeypatch, caplog):
    """Isolation in depth: whatever raises while one sequence advances (here a planted bug)
    fails that request on every peer, not the step loop; the request running beside it ends
    normally, /health shows no error, and the log quotes nothing unescaped."""
    import logging

    from ringllm.errors import RequestError
    from ringllm.generation import Request, Sequence
    from ringllm.sampling import SamplingParams

    secret = "zq-secret-\ud800-text"
    real = Sequence.accept

    def accept(self, choice):
        if self.request.max_tokens == 7 and len(self.ids) == 2:
            raise ValueError(secret)
        return real(self, choice)

    monkeypatch.setattr(Sequence, "accept", accept)
    greedy = SamplingParams(temperature=0)
    with caplog.at_level(logging.WARNING):
        out = _run_requests(inproc_ring, [Request((5, 6), greedy, max_tokens=7, ignore_eos=True),
                                          Request((7, 8), greedy, max_tokens=12, ignore_eos=True)])
    assert isinstance(out[0], RequestError) and "ValueError" in str(out[0]) and "zq-secret" not in str(out[0])
    assert isinstance(out[1], list) and len(out[1]) == 12 and out[1][-1].finish_reason == "length"
    assert all(p.failure is None and p.stats.last_error is None for p in inproc_ring.peers)
    inproc_ring.wait_idle()
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert failed, "the failed request should be logged"
    for msg in failed:
        msg.encode("utf-8")  # a lone surrogate would not encode: it must be escaped
        assert "\\ud800" in msg
    monkeypatch.undo()
    _normal_request_succeeds(inproc_ring)


def test_a_sequence_that_raises_on_one_peer_only_fails_alone(inproc_ring, monkeypatch):
    """A failure only one peer sees (as out of memory would be): that peer must not simply
    drop the sequence, or the peers' batches would differ from the next step on. It reports
    the failure in the next step's news and every peer drops the sequence together."""
    from ringllm.errors import RequestError
    from ringllm.generation import Request, Sequence
    from ringllm.sampling import SamplingParams

    real, raised = Sequence.accept, []

    def accept(self, choice):
        if self.request.max_tokens == 9 and len(self.ids) == 3 and not raised:
            raised.append(1)  # the first peer to get here fails; the other goes on
            raise MemoryError()
        return real(self, choice)

    monkeypatch.setattr(Sequence, "accept", accept)
    greedy = SamplingParams(temperature=0)
    out = _run_requests(inproc_ring, [Request((5, 6), greedy, max_tokens=9, ignore_eos=True),
                                      Request((7, 8), greedy, max_tokens=14, ignore_eos=True)])
    assert raised == [1]
    assert isinstance(out[0], RequestError) and "MemoryError" in str(out[0])
    assert isinstance(out[1], list) and len(out[1]) == 14
    assert all(p.failure is None for p in inproc_ring.peers)
    inproc_ring.wait_idle()
    monkeypatch.undo()
    _normal_request_succeeds(inproc_ring)


# Hypothesis: any body, on any of the three POST routes, gives JSON 4xx or a success, and the
# ring serves the next ordinary request.
# Any code point, lone surrogates included (drawn often: among all code points they are rare).
_any_text = st.text(st.characters(codec=None, exclude_categories=()) | st.characters(min_codepoint=0xD800,
                                                                                     max_codepoint=0xDFFF), max_size=6)
_ok_text = st.text(max_size=6)  # valid Unicode: requests that get past the validator
_numbers = (st.integers(-2**70, 2**70) | st.integers(-3, 300)
            | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0, 1, 2**31, 2**63, 2**64, -2**63]))
_values = st.recursive(st.none() | st.booleans() | _numbers | _any_text,
                       lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_any_text, kids, max_size=3),
                       max_leaves=8)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "\ud800"]),
                                  "content": _any_text | _values})
_plausible = {
    "prompt": _any_text | st.lists(st.integers(-2, 400), max_size=4) | _values,
    "messages": st.lists(_message, max_size=3) | _values,
    "prompt_ids": st.lists(st.integers(-2, 400), max_size=4) | _values,
    "stop": _any_text | st.lists(_any_text, max_size=3) | _values,
    "max_tokens": st.integers(-2, 6) | _values,
    "seed": _numbers, "temperature": _numbers, "top_p": _numbers, "top_k": _numbers, "min_p": _numbers,
    "repeat_penalty": _numbers, "top_logprobs": _numbers, "logprobs": st.booleans() | _numbers,
    "stream": st.booleans() | _values, "raw": st.booleans() | _values, "system": _any_text | _values,
    "ignore_eos": st.booleans() | _values, "stream_options": st.just({"include_usage": True}) | _values,
    "model": _any_text | _values, "metadata": _values, "user": _any_text,
}
_bodies = st.one_of(
    st.fixed_dictionaries({}, optional={k: v for k, v in _plausible.items()}),
    st.fixed_dictionaries({"prompt": _ok_text | _any_text},
                          optional={"stop": _ok_text | _plausible["stop"], "max_tokens": st.integers(1, 4),
                                    "temperature": st.floats(0, 2) | _numbers, "seed": _numbers}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": _ok_text})
                                                | _message, min_size=1, max_size=2)},
                          optional={"stop": _ok_text | _plausible["stop"], "max_tokens": st.integers(1, 4),
                                    "stream": st.booleans()}),
    _values,
    st.integers(1, 60).map(_nested),
)


def _assert_success(path: str, ctype: str, data: bytes, stream: bool) -> None:
    text = data.decode("utf-8")  # a success is valid UTF-8 ...
    if path.endswith("/generate"):
        events = [json.loads(line) for line in text.splitlines()]
        assert events[0]["event"] == "start" and events[-1]["event"] == "end", events[-1]
    elif stream:
        assert ctype.startswith("text/event-stream")
        lines = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        assert all("error" not in json.loads(ln) for ln in lines[:-1]), lines
    else:
        assert "choices" in json.loads(text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/ringllm/v1/generate"]), body=_bodies)
def test_fuzz_any_body_is_a_json_4xx_or_a_success_and_the_ring_goes_on(inproc_ring, path, body):
    data = json.dumps(body).encode()  # ensure_ascii: lone surrogates travel as \udXXX escapes
    status, ctype, answer = _post_raw(inproc_ring.addresses[0], path, data)
    event(f"HTTP {status}")
    if status == 200:
        _assert_success(path, ctype, answer, isinstance(body, dict) and body.get("stream") is True)
    else:
        _assert_json_error(status, ctype, answer)
    _normal_request_succeeds(inproc_ring)
