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

import aiohttp
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
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
    kinds = st.sampled_from(["hello", "auth", "ready", "refuse", "coll", "ping", "bye", "x"])
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
    st.sampled_from(["hello", "auth", "ready", "refuse", "coll", "bye"]),
    st.fixed_dictionaries({}, optional={
        "magic": st.sampled_from([b"RINGLLM", b"X"]), "v": st.integers(-2, 2**40), "ring": st.sampled_from(["sec", "x"]),
        "rank": st.integers(-5, 2**40), "size": st.integers(-5, 2**40), "model": st.sampled_from(["ab" * 32, "zz"]),
        "plan": st.sampled_from(["cd" * 32, ""]), "nonce": st.binary(min_size=0, max_size=40),
        "cfg": st.one_of(st.just('{"a":1}'), st.just('{"a":2}'), st.just("not json"), st.integers(-5, 5)),
        "mac": st.binary(max_size=40), "reason": st.text(max_size=20), "retry": st.booleans()}),
)


@given(st.lists(frames_st, max_size=6))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_handshake_machine_never_raises_and_never_admits_without_the_secret(frames):
    """Whatever frames a stranger sends (schema-valid or not: the machine must not trust the
    decoder for fields it reads), it is refused or still waiting; never authenticated."""
    hs = Handshake(ME, SECRET, expect_rank=1)
    hs.start()
    for frame in frames:
        try:  # only what the real decoder lets through reaches the machine
            (frame,) = FrameDecoder().feed(encode_frame_bytes(frame.kind, frame.header))
        except RemoteProtocolError:
            continue
        out = hs.receive(frame)
        assert all(kind in ("auth", "ready", "refuse") for kind, _ in out)
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
                         plan=runtime.make_plan(info, ring.cfg.weights).digest(), config=ring_config_claim(ring.cfg))


async def _greedy(addr: str, ssl_ctx: ssl.SSLContext | None = None) -> list[int]:
    body = {"prompt": "the cat", "raw": True, "temperature": 0, "max_tokens": 8, "ignore_eos": True}
    scheme = "https" if ssl_ctx else "http"
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{scheme}://{addr}/ringllm/v1/generate", json=body, ssl=ssl_ctx or False) as resp:
            assert resp.status == 200, await resp.text()
            events = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert events[-1]["event"] == "end", events[-1]
    return [ev["token"] for ev in events if ev["event"] == "token"]


async def _connect(port: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return reader, writer, writer.get_extra_info("sockname")[1]


def _dropped(ring: Ring, rank: int, local_port: int, timeout: float = 15.0) -> str:
    """The reason rank logged for dropping our connection from ``local_port``."""
    m = ring.wait_log(rank, rf"dropped connection from 127\.0\.0\.1:{local_port}: (.*)", timeout=timeout)
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
    hello = encode_frame_bytes("hello", {"magic": b"RINGLLM", "v": PROTOCOL_VERSION, "ring": "sec", "rank": 1, "size": 2,
                                         "model": "m", "plan": "p", "nonce": os.urandom(32), "cfg": ""})
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

    async def one(data: bytes, close: bool) -> int:
        reader, writer, local = await _connect(port)
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
    locals_ = await asyncio.gather(*[one(data, close) for data, close, _ in cases.values()])
    for (name, (_, _, reason)), local in zip(cases.items(), locals_):
        got = await asyncio.to_thread(_dropped, tiny_ring, 0, local)
        print(f"\n[{name}] dropped: {got}")
        assert reason in got, (name, got)
    assert time.monotonic() - t0 < 12
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
    with pytest.raises(HandshakeError, match="wrong secret"):
        await handshake(reader, writer, me=claims, secret=b"not-the-ring-secret!", expect_rank=0, timeout=5)
    assert "wrong secret" in await asyncio.to_thread(_dropped, tiny_ring, 0, local)
    # No secret at all: a correct hello, then a made-up proof.
    reader, writer, local = await _connect(port)
    hs = Handshake(claims, b"x" * 16)
    (kind, hello), = hs.start()
    writer.write(encode_frame_bytes(kind, hello) + encode_frame_bytes("auth", {"mac": os.urandom(32)}))
    refusal = await _read_refusal(reader)
    assert "wrong secret" in refusal
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
        await handshake(reader, writer, me=claims, secret=tiny_ring.cfg.secret, expect_rank=0, timeout=5)
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
            await handshake(reader, writer, me=info, secret=tiny_ring.cfg.secret, expect_rank=0, timeout=5)
        assert reason in await asyncio.to_thread(_dropped, tiny_ring, 0, local)
    await asyncio.to_thread(_assert_still_serving, tiny_ring)


# -- mismatched peers joining (a restarted peer with the wrong file) -------------------------------
@pytest.mark.parametrize("what", ["model", "ring.toml"])
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
        # Listening elsewhere, it reaches rank 0, which still has a live rank 1: refused.
        dup = Ring(tmp_path, ring.path.read_text(), tag="dup-other")
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
