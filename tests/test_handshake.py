"""Handshake: the pure state machine, and the async driver on both ends of a loopback socket."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from ringllm.errors import HandshakeError, PeerLostError
from ringllm.ring.handshake import (
    DONE,
    REFUSED,
    Handshake,
    HandshakeInfo,
    PROTOCOL_VERSION,
    compute_mac,
    handshake,
    transcript,
)
from ringllm.ring.wire import Frame, FrameDecoder, encode_frame_bytes

SECRET = b"correct horse battery staple"
A = HandshakeInfo(ring="lab", rank=0, size=3, model="ab12" * 16, plan="cd34" * 16)
B = dataclasses.replace(A, rank=1)


def wire(out: list[tuple[str, dict]]) -> list[Frame]:
    """Send frames through the real codec, as the driver does."""
    data = b"".join(encode_frame_bytes(k, h) for k, h in out)
    return FrameDecoder().feed(data)


def run_pure(a: Handshake, b: Handshake) -> tuple[list[Frame], list[Frame]]:
    """Drive two machines against each other; return the frames each one sent."""
    sent_a, sent_b = wire(a.start()), wire(b.start())
    log_a, log_b = list(sent_a), list(sent_b)
    while sent_a or sent_b:
        next_b = [f for frame in sent_a for f in wire(b.receive(frame))]
        next_a = [f for frame in sent_b for f in wire(a.receive(frame))]
        sent_a, sent_b = next_a, next_b
        log_a += sent_a
        log_b += sent_b
    return log_a, log_b


def test_pure_success_is_mutual():
    a, b = Handshake(A, SECRET, expect_rank=1), Handshake(B, SECRET, expect_rank=0)
    run_pure(a, b)
    assert a.state == b.state == DONE
    assert a.peer == B and b.peer == A


def test_pure_wrong_secret_refused_on_both_sides():
    a, b = Handshake(A, SECRET), Handshake(B, b"another secret")
    log_a, log_b = run_pure(a, b)
    assert a.state == b.state == REFUSED
    assert "wrong secret" in str(a.error) and "wrong secret" in str(b.error)
    assert [f.kind for f in log_a][-1] == "refuse"


def test_replayed_transcript_is_refused():
    # Record everything B sent in a successful handshake with one A...
    a1, b = Handshake(A, SECRET), Handshake(B, SECRET)
    _, recorded = run_pure(a1, b)
    assert a1.state == DONE
    # ...and replay it, byte for byte, to a fresh A: its new nonce makes the old proof useless.
    a2 = Handshake(A, SECRET)
    replies = wire(a2.start())
    for frame in recorded:
        replies = wire(a2.receive(frame))
        if a2.finished:
            break
    assert a2.state == REFUSED and "wrong secret" in str(a2.error)
    assert replies[-1].kind == "refuse"


def test_reflected_hello_and_proof_are_refused():
    a = Handshake(A, SECRET)
    (hello,) = wire(a.start())
    # Our own hello sent back: same nonce.
    assert wire(a.receive(hello))[0].kind == "refuse"
    assert "nonce" in str(a.error)
    # A proof is bound to its prover's hello first, so A's own proof cannot pass as the peer's.
    a = Handshake(A, SECRET)
    wire(a.start())
    fake = Handshake(B, SECRET)
    (peer_hello,) = wire(fake.start())
    (auth,) = wire(a.receive(peer_hello))
    a.receive(auth)
    assert a.state == REFUSED and "wrong secret" in str(a.error)


def test_mac_binds_both_nonces_and_order():
    t1, t2 = transcript(A, b"\x01" * 32), transcript(B, b"\x02" * 32)
    assert compute_mac(SECRET, t1, t2) != compute_mac(SECRET, t2, t1)
    assert compute_mac(SECRET, t1, t2) != compute_mac(SECRET, t1, transcript(B, b"\x03" * 32))


def test_unexpected_frame_is_refused():
    a = Handshake(A, SECRET)
    a.start()
    assert wire(a.receive(Frame("auth", {"mac": b"x" * 32})))[0].kind == "refuse"
    assert "waiting for 'hello'" in str(a.error)


# -- async driver over loopback TCP -----------------------------------------------------------
async def tcp_pair():
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()
    server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ra, wa = await asyncio.open_connection("127.0.0.1", port)
    rb, wb = await accepted
    server.close()
    return (ra, wa), (rb, wb)


async def both(a=A, b=B, secret_a=SECRET, secret_b=SECRET, expect_a=None, expect_b=None):
    (ra, wa), (rb, wb) = await tcp_pair()
    async with asyncio.timeout(10):
        results = await asyncio.gather(
            handshake(ra, wa, me=a, secret=secret_a, expect_rank=expect_a, timeout=5, peer="B"),
            handshake(rb, wb, me=b, secret=secret_b, expect_rank=expect_b, timeout=5, peer="A"),
            return_exceptions=True)
    for w in (wa, wb):
        w.close()
    return results


async def test_driver_success():
    got_a, got_b = await both(expect_a=1, expect_b=0)
    assert got_a == B and got_b == A


@pytest.mark.parametrize("kwargs,reason_a,reason_b", [
    ({"secret_b": b"nope"}, "wrong secret", "wrong secret"),
    ({"b": dataclasses.replace(B, version=PROTOCOL_VERSION + 1)},
     f"protocol version {PROTOCOL_VERSION + 1} not supported (we speak {PROTOCOL_VERSION})",
     f"protocol version {PROTOCOL_VERSION} not supported (we speak {PROTOCOL_VERSION + 1})"),
    ({"b": dataclasses.replace(B, ring="other")},
     "peer is in ring 'other' but we are in ring 'lab'", "peer is in ring 'lab' but we are in ring 'other'"),
    ({"b": dataclasses.replace(B, model="ef56" * 16)},
     "peer rank 1 has model fingerprint ef56ef56ef56.. but we have ab12ab12ab12..",
     "peer rank 0 has model fingerprint ab12ab12ab12.. but we have ef56ef56ef56.."),
    ({"b": dataclasses.replace(B, plan="9999" * 16)},
     "peer rank 1 has shard-plan hash 999999999999.. but we have cd34cd34cd34..",
     "peer rank 0 has shard-plan hash cd34cd34cd34.. but we have 999999999999.."),
    ({"b": dataclasses.replace(B, size=4)}, "peer rank 1 has ring size 4 but we have 3",
     "peer rank 0 has ring size 3 but we have 4"),
    # Only A checks the rank; B learns the reason from A's refusal.
    ({"expect_a": 2}, "peer rank 1 connected where we expect rank 2",
     "peer refused the handshake: peer rank 1 connected where we expect rank 2"),
    ({"b": A}, "peer rank 0 has the same rank as we do", "same rank"),
])
async def test_driver_refusals_reach_both_sides(kwargs, reason_a, reason_b):
    err_a, err_b = await both(**kwargs)
    assert isinstance(err_a, HandshakeError) and isinstance(err_b, HandshakeError), (err_a, err_b)
    assert reason_a in str(err_a)
    assert reason_b in str(err_b)


async def test_driver_times_out_on_silent_peer():
    (ra, wa), (rb, wb) = await tcp_pair()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(HandshakeError, match="timed out after 0.3 s in state AWAIT_HELLO"):
        await handshake(ra, wa, me=A, secret=SECRET, expect_rank=None, timeout=0.3)
    assert loop.time() - t0 < 3
    # The silent side still gets told why.
    data = await asyncio.wait_for(rb.read(65536), 2)
    frames = FrameDecoder().feed(data)
    assert frames[-1].kind == "refuse" and "timed out" in frames[-1].header["reason"]
    wb.close()


async def test_driver_refuses_non_ringllm_client():
    (ra, wa), (rb, wb) = await tcp_pair()
    wb.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(HandshakeError, match="not a ringllm peer"):
        await handshake(ra, wa, me=A, secret=SECRET, expect_rank=None, timeout=2)
    wb.close()


async def test_driver_reports_peer_hanging_up():
    (ra, wa), (rb, wb) = await tcp_pair()
    wb.close()
    with pytest.raises(HandshakeError, match="connection lost during handshake"):
        await handshake(ra, wa, me=A, secret=SECRET, expect_rank=None, timeout=2)


async def test_link_takes_over_bytes_buffered_during_handover():
    from ringllm.ring.tcp import TcpLink

    (ra, wa), (rb, wb) = await tcp_pair()
    async with asyncio.timeout(10):
        await asyncio.gather(
            handshake(ra, wa, me=A, secret=SECRET, expect_rank=1, timeout=5),
            handshake(rb, wb, me=B, secret=SECRET, expect_rank=0, timeout=5))
        # B starts talking at once; the bytes land in A's StreamReader before A's link exists.
        wb.write(encode_frame_bytes("x-early", {"n": 1}) + encode_frame_bytes("x-early", {"n": 2}))
        await asyncio.sleep(0.05)
        link_a = TcpLink(ra, wa, "B", recv_timeout=2)
        link_b = TcpLink(rb, wb, "A", recv_timeout=2)
        assert [(await link_a.recv()).header["n"] for _ in range(2)] == [1, 2]
        await link_b.send("x-late", {"n": 3}, b"payload")
        frame = await link_a.recv()
        assert frame.header == {"n": 3} and bytes(frame.payload) == b"payload"
        link_b.close("bye now")
        with pytest.raises(PeerLostError, match="lost peer B: connection closed"):
            await link_a.recv()
