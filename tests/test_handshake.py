"""Handshake: the pure state machine, and the async driver on both ends of a loopback socket."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import os

import pytest

from ringllm.errors import ConfigMismatchError, HandshakeError, PeerLostError
from ringllm.ring.handshake import (
    ACCEPTOR,
    DONE,
    INITIATOR,
    REFUSED,
    Handshake,
    HandshakeInfo,
    PROTOCOL_VERSION,
    compute_mac,
    config_transcript,
    handshake,
)
from ringllm.ring.wire import Frame, FrameDecoder, encode_frame_bytes

SECRET = b"correct horse battery staple"
A = HandshakeInfo(ring="lab", rank=0, size=3, model="ab12" * 16, plan="cd34" * 16, config='{"x":1}')
B = dataclasses.replace(A, rank=1)


def wire(out: list[tuple[str, dict]]) -> list[Frame]:
    """Send frames through the real codec, as the driver does."""
    data = b"".join(encode_frame_bytes(k, h) for k, h in out)
    return FrameDecoder().feed(data)


def initiator(info=A, secret=SECRET, **kw) -> Handshake:
    return Handshake(info, secret, initiator=True, **kw)


def acceptor(info=B, secret=SECRET, **kw) -> Handshake:
    return Handshake(info, secret, initiator=False, **kw)


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


def test_pure_success_is_mutual_and_in_the_v3_order():
    a, b = initiator(expect_rank=1), acceptor(expect_rank=0)
    log_a, log_b = run_pure(a, b)
    assert a.state == b.state == DONE
    assert a.peer == B and b.peer == A
    assert [f.kind for f in log_a] == ["hello", "auth", "config", "ready"]
    assert [f.kind for f in log_b] == ["hello", "auth", "config", "ready"]
    # Hellos carry magic, version and nonce only; the claims travel in the config frames.
    assert [set(log.header) for log in (log_a[0], log_b[0])] == [{"magic", "v", "nonce"}] * 2
    assert log_b[2].header["model"] == A.model and log_b[2].header["cfg"] == '{"x":1}'


def test_proofs_and_config_macs_are_the_documented_hmacs():
    """Recomputed with the standard library from the layout in docs/protocol.md."""
    n_i, n_a = b"\x01" * 32, b"\x02" * 32
    a, b = initiator(nonce=n_i), acceptor(nonce=n_a)
    log_a, log_b = run_pure(a, b)
    label = b"ringllm-handshake-v3\x00"

    def h(msg: bytes) -> bytes:
        return hmac.new(SECRET, label + msg, hashlib.sha256).digest()

    assert log_a[1].header["mac"] == h(b"initiator\x00" + n_i + n_a)
    assert log_b[1].header["mac"] == h(b"acceptor\x00" + n_a + n_i)

    def c(info: HandshakeInfo) -> bytes:
        fields = [info.ring.encode(), info.rank.to_bytes(4, "big"), info.size.to_bytes(4, "big"),
                  info.model.encode(), info.plan.encode(), info.config.encode()]
        return b"".join(len(f).to_bytes(4, "big") + f for f in fields)

    assert log_a[2].header["mac"] == h(b"config\x00" + n_i + n_a + c(A))
    assert log_b[2].header["mac"] == h(b"config\x00" + n_a + n_i + c(B))


def test_a_stranger_gets_only_magic_version_nonce_and_a_bare_refusal():
    b = acceptor()
    (hello,) = wire(b.start())
    assert hello.kind == "hello" and set(hello.header) == {"magic", "v", "nonce"}
    assert wire(b.receive(Frame("hello", {"magic": b"RINGLLM", "v": PROTOCOL_VERSION,
                                          "nonce": os.urandom(32)}))) == []
    (refusal,) = wire(b.receive(Frame("auth", {"mac": os.urandom(32)})))
    assert refusal.kind == "refuse" and refusal.header == {"reason": "authentication failed",
                                                           "retry": False}
    assert b.state == REFUSED and "wrong secret" in str(b.error)  # (our own log says more)


def test_pure_wrong_secret_is_refused_by_the_acceptor_before_it_proves_anything():
    a, b = initiator(), acceptor(secret=b"another secret")
    log_a, log_b = run_pure(a, b)
    assert a.state == b.state == REFUSED
    assert "wrong secret" in str(b.error)
    assert str(a.error).startswith("peer refused the handshake: authentication failed")
    assert [f.kind for f in log_b] == ["hello", "refuse"]
    assert [f.kind for f in log_a] == ["hello", "auth"]  # the initiator never sent its config


def test_an_impostor_acceptor_never_gets_the_initiators_config():
    a = initiator()
    wire(a.start())
    (auth,) = wire(a.receive(Frame("hello", {"magic": b"RINGLLM", "v": PROTOCOL_VERSION,
                                             "nonce": os.urandom(32)})))
    assert auth.kind == "auth"
    out = wire(a.receive(Frame("auth", {"mac": os.urandom(32)})))
    assert [f.kind for f in out] == ["refuse"] and out[0].header["reason"] == "authentication failed"
    assert a.state == REFUSED and "wrong secret" in str(a.error)


def test_replayed_transcripts_are_refused():
    # Record what each side sent in a successful handshake...
    a1, b1 = initiator(), acceptor()
    rec_a, rec_b = run_pure(a1, b1)
    assert a1.state == DONE
    # ...and replay it, byte for byte, to fresh machines: their new nonces make the old proofs
    # useless, so neither says anything beyond its hello (and a refusal).
    for fresh, recorded in ((acceptor(), rec_a), (initiator(), rec_b)):
        sent = wire(fresh.start())
        for frame in recorded:
            sent += wire(fresh.receive(frame))
            if fresh.finished:
                break
        assert fresh.state == REFUSED and "wrong secret" in str(fresh.error)
        assert "config" not in [f.kind for f in sent] and sent[-1].kind == "refuse"


def test_reflected_hello_and_proofs_are_refused():
    a = initiator()
    (hello,) = wire(a.start())
    # Our own hello sent back: same nonce.
    assert wire(a.receive(hello))[0].kind == "refuse"
    assert "nonce" in str(a.error)
    # The initiator's own proof sent back as the acceptor's.
    a = initiator()
    wire(a.start())
    (auth,) = wire(a.receive(Frame("hello", {"magic": b"RINGLLM", "v": PROTOCOL_VERSION,
                                             "nonce": os.urandom(32)})))
    a.receive(auth)
    assert a.state == REFUSED and "wrong secret" in str(a.error)
    # Even a proof made with the secret and the acceptor's nonce order does not pass for the
    # other role: the role label is in the MAC.
    n_i, n_a = os.urandom(32), os.urandom(32)
    a = initiator(nonce=n_i)
    wire(a.start())
    wire(a.receive(Frame("hello", {"magic": b"RINGLLM", "v": PROTOCOL_VERSION, "nonce": n_a})))
    a.receive(Frame("auth", {"mac": compute_mac(SECRET, INITIATOR, n_a, n_i)}))
    assert a.state == REFUSED and "wrong secret" in str(a.error)
    b = acceptor(nonce=n_a)
    wire(b.start())
    wire(b.receive(Frame("hello", {"magic": b"RINGLLM", "v": PROTOCOL_VERSION, "nonce": n_i})))
    b.receive(Frame("auth", {"mac": compute_mac(SECRET, ACCEPTOR, n_i, n_a)}))
    assert b.state == REFUSED and "wrong secret" in str(b.error)


def test_macs_bind_purpose_both_nonces_order_and_config():
    n1, n2, n3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    macs = {compute_mac(SECRET, INITIATOR, n1, n2), compute_mac(SECRET, ACCEPTOR, n1, n2),
            compute_mac(SECRET, INITIATOR, n2, n1), compute_mac(SECRET, INITIATOR, n1, n3),
            compute_mac(SECRET, b"config\x00", n1, n2, config_transcript(A)),
            compute_mac(SECRET, b"config\x00", n1, n2, config_transcript(B))}
    assert len(macs) == 6


def _swap_b_config(replace) -> tuple[Handshake, Handshake]:
    """Run a handshake in which something in the middle rewrites the acceptor's config frame."""
    a, b = initiator(), acceptor()
    sent_a, sent_b = wire(a.start()), wire(b.start())
    while sent_a or sent_b:
        sent_b = [replace(f) if f.kind == "config" else f for f in sent_b]
        next_b = [f for frame in sent_a for f in wire(b.receive(frame))]
        next_a = [f for frame in sent_b for f in wire(a.receive(frame))]
        sent_a, sent_b = next_a, next_b
    return a, b


def test_a_man_in_the_middle_cannot_alter_a_config_after_authentication():
    # Changed fields under the genuine MAC.
    a, _ = _swap_b_config(lambda f: Frame("config", {**f.header, "model": "ef56" * 16}))
    assert a.state == REFUSED and "configuration frame does not verify" in str(a.error)
    assert not isinstance(a.error, ConfigMismatchError)
    # A genuine config frame of B from another session (other nonces).
    other_a, other_b = initiator(), acceptor(info=dataclasses.replace(B, plan="9999" * 16))
    _, rec_b = run_pure(other_a, other_b)
    (old_config,) = [f for f in rec_b if f.kind == "config"]
    a, _ = _swap_b_config(lambda f: old_config)
    assert a.state == REFUSED and "configuration frame does not verify" in str(a.error)


def test_unexpected_frame_is_refused():
    a = initiator()
    a.start()
    assert wire(a.receive(Frame("auth", {"mac": b"x" * 32})))[0].kind == "refuse"
    assert "waiting for 'hello'" in str(a.error)
    b = acceptor()  # a config frame before authentication is a protocol error, not read
    b.start()
    b.receive(Frame("hello", {"magic": b"RINGLLM", "v": PROTOCOL_VERSION, "nonce": os.urandom(32)}))
    out = wire(b.receive(Frame("config", {"ring": "lab", "rank": 0, "size": 3, "model": "m", "plan": "p",
                                          "cfg": "", "mac": b"x" * 32})))
    assert out[0].kind == "refuse" and "got a 'config' frame while waiting for 'auth'" in str(b.error)


def test_config_mismatches_are_config_mismatch_errors_on_both_sides():
    a, b = initiator(expect_rank=1), acceptor(info=dataclasses.replace(B, model="ef56" * 16), expect_rank=0)
    run_pure(a, b)
    assert isinstance(a.error, ConfigMismatchError) and isinstance(b.error, ConfigMismatchError)
    assert "model fingerprint" in str(a.error) and "model fingerprint" in str(b.error)


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
            handshake(ra, wa, initiator=True, me=a, secret=secret_a, expect_rank=expect_a, timeout=5, peer="B"),
            handshake(rb, wb, initiator=False, me=b, secret=secret_b, expect_rank=expect_b, timeout=5, peer="A"),
            return_exceptions=True)
    for w in (wa, wb):
        w.close()
    return results


async def test_driver_success():
    got_a, got_b = await both(expect_a=1, expect_b=0)
    assert got_a == B and got_b == A


@pytest.mark.parametrize("kwargs,reason_a,reason_b", [
    # The acceptor finds the initiator's proof wrong and tells it only that.
    ({"secret_b": b"nope"}, "peer refused the handshake: authentication failed", "wrong secret"),
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
        await handshake(ra, wa, initiator=True, me=A, secret=SECRET, expect_rank=None, timeout=0.3)
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
        await handshake(ra, wa, initiator=True, me=A, secret=SECRET, expect_rank=None, timeout=2)
    wb.close()


async def test_driver_reports_peer_hanging_up():
    (ra, wa), (rb, wb) = await tcp_pair()
    wb.close()
    with pytest.raises(HandshakeError, match="connection lost during handshake"):
        await handshake(ra, wa, initiator=True, me=A, secret=SECRET, expect_rank=None, timeout=2)


async def test_link_takes_over_bytes_buffered_during_handover():
    from ringllm.ring.tcp import TcpLink

    (ra, wa), (rb, wb) = await tcp_pair()
    async with asyncio.timeout(10):
        await asyncio.gather(
            handshake(ra, wa, initiator=True, me=A, secret=SECRET, expect_rank=1, timeout=5),
            handshake(rb, wb, initiator=False, me=B, secret=SECRET, expect_rank=0, timeout=5))
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
