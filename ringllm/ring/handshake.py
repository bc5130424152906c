"""Peer handshake: compatibility checks and mutual HMAC-SHA256 challenge-response.

Both ends run the same symmetric protocol (no client/server roles), as a pure state machine
(:class:`Handshake`) plus a thin asyncio driver (:func:`handshake`)::

    both:  --hello-->   magic, protocol version, ring, rank, size, model, plan, ring-config
                        claim, 32-byte nonce
    both:  --auth--->   mac = HMAC-SHA256(secret, LABEL || T(mine) || T(theirs))
    both:  --ready-->   (or --refuse--> with a reason, at any point, then close)

``T(h)`` is the SHA-256 of the canonical transcript of hello ``h`` (see :func:`transcript`), so
the MAC binds both nonces and every hello field: a recorded handshake cannot be replayed (the
other side's fresh nonce changes the expected MAC) and the prover's own hello comes first, so a
proof cannot be reflected back to its author.  Hellos with equal nonces are refused.  This
authenticates peers; it does not encrypt or protect the link afterwards (turn on ``[tls]`` in
ring.toml, or use a VPN, on untrusted networks).  Byte layouts are in ``docs/protocol.md``.

A refusal is final (a configuration mismatch) unless it carries ``retry = true``: then the
other side was only not ready for us yet (e.g. it still holds a live link to our rank) and we
connect again after a back-off.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets as _secrets
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ringllm.errors import ConfigMismatchError, HandshakeError, RemoteProtocolError
from ringllm.ring.wire import Frame, FrameDecoder, encode_frame_bytes

__all__ = [
    "HANDSHAKE_MAGIC",
    "HANDSHAKE_MAX_FRAME",
    "PROTOCOL_VERSION",
    "Handshake",
    "HandshakeInfo",
    "compute_mac",
    "config_difference",
    "handshake",
    "read_frame",
    "transcript",
]

HANDSHAKE_MAGIC = b"RINGLLM"
PROTOCOL_VERSION = 2
NONCE_BYTES = 32
# Before the peer is authenticated it may only make us buffer this much.
HANDSHAKE_MAX_FRAME = 16 * 1024
_LABEL = b"ringllm-handshake-v1\x00"
_LINGER = 1.0  # seconds to wait for the peer to read our refusal before closing


@dataclass(frozen=True)
class HandshakeInfo:
    """What a peer claims about itself.  Every field must match across the ring (except rank).

    ``model`` is the model fingerprint and ``plan`` the shard-plan hash, both as hex strings.
    ``config`` is the ring-config claim: canonical JSON (sorted keys, no spaces) of the
    ring.toml settings every peer must share (see ``launch.ring_config_claim``), so a peer
    started from a different ring.toml is refused with the differing setting named.
    """

    ring: str
    rank: int
    size: int
    model: str
    plan: str
    version: int = PROTOCOL_VERSION
    config: str = ""


def transcript(info: HandshakeInfo, nonce: bytes, magic: bytes = HANDSHAKE_MAGIC) -> bytes:
    """Canonical bytes of a hello, independent of msgpack: each field as u32 BE length + bytes.

    Order: magic, version (u32 BE), ring (UTF-8), rank (u32 BE), size (u32 BE), model (UTF-8),
    plan (UTF-8), nonce, config (UTF-8).
    """
    parts = [magic, struct.pack(">I", info.version), info.ring.encode(),
             struct.pack(">I", info.rank), struct.pack(">I", info.size),
             info.model.encode(), info.plan.encode(), nonce, info.config.encode()]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def compute_mac(secret: bytes, prover: bytes, verifier: bytes) -> bytes:
    """HMAC-SHA256(secret, LABEL || sha256(prover transcript) || sha256(verifier transcript))."""
    msg = _LABEL + hashlib.sha256(prover).digest() + hashlib.sha256(verifier).digest()
    return hmac.new(secret, msg, hashlib.sha256).digest()


def _short(h: str) -> str:
    return h[:12] + ".." if len(h) > 14 else h


def config_difference(theirs: str, ours: str) -> str:
    """Name the first setting on which two ring-config claims differ ('' if they agree)."""
    if theirs == ours:
        return ""
    try:
        a, b = json.loads(theirs), json.loads(ours)
    except ValueError:
        return "its ring settings are unreadable"
    if not isinstance(a, dict) or not isinstance(b, dict):
        return "its ring settings are unreadable"
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return (f"its ring.toml has {key} = {json.dumps(a.get(key))[:80]} "
                    f"but ours has {json.dumps(b.get(key))[:80]}")
    return "its ring settings are encoded differently"


# States of the pure machine; the table of which frame is legal where is in docs/protocol.md.
START, AWAIT_HELLO, AWAIT_AUTH, AWAIT_VERDICT, DONE, REFUSED = (
    "START", "AWAIT_HELLO", "AWAIT_AUTH", "AWAIT_VERDICT", "DONE", "REFUSED")

Out = list[tuple[str, dict[str, Any]]]


class Handshake:
    """Sans-IO handshake for one end of one connection.

    Call :meth:`start` once, send what it returns, then feed every received frame to
    :meth:`receive` and send what it returns.  When ``state`` is ``DONE`` the peer is
    authenticated and compatible and ``peer`` holds its claims.  When it is ``REFUSED``,
    ``error`` is the :class:`HandshakeError` to raise (after sending the returned refusal, if any).
    """

    def __init__(self, me: HandshakeInfo, secret: bytes, *, expect_rank: int | None = None,
                 nonce: bytes | None = None,
                 admit: Callable[[HandshakeInfo], str | None] | None = None) -> None:
        """``admit`` is asked last, once the peer is authenticated and compatible: a reason it
        returns refuses the peer for now (a refusal with ``retry``: come back later)."""
        if not secret:
            raise ValueError("the ring secret must not be empty")
        self.me = me
        self._secret = secret
        self.expect_rank = expect_rank
        self.admit = admit
        self.nonce = nonce if nonce is not None else _secrets.token_bytes(NONCE_BYTES)
        self.state = START
        self.peer: HandshakeInfo | None = None
        self.error: HandshakeError | None = None
        self._mine = transcript(me, self.nonce)
        self._theirs = b""

    @property
    def finished(self) -> bool:
        return self.state in (DONE, REFUSED)

    def start(self) -> Out:
        assert self.state == START
        self.state = AWAIT_HELLO
        me = self.me
        return [("hello", {"magic": HANDSHAKE_MAGIC, "v": me.version, "ring": me.ring,
                           "rank": me.rank, "size": me.size, "model": me.model,
                           "plan": me.plan, "nonce": self.nonce, "cfg": me.config})]

    def refuse(self, reason: str, *, retry: bool = False, mismatch: bool = False) -> Out:
        """Give up with ``reason``: returns the refusal frame to send.

        ``retry`` tells the peer that we are not ready for it yet, rather than incompatible.
        ``mismatch``: an authenticated peer's configuration differs (``error`` is then a
        :class:`ConfigMismatchError`).
        """
        self.state = REFUSED
        self.error = _error(reason, retry, ConfigMismatchError if mismatch else HandshakeError)
        return [("refuse", {"reason": reason[:1000], "retry": retry})]

    def mismatch(self, reason: str) -> Out:
        """Refuse an authenticated peer whose configuration differs (permanent)."""
        return self.refuse(reason, mismatch=True)

    def receive(self, frame: Frame) -> Out:
        """Advance on one received frame; return the frames to send (possibly a refusal)."""
        if self.finished:
            return []
        if frame.kind == "refuse":
            self.state = REFUSED
            self.error = _error(f"peer refused the handshake: {frame.header['reason']}",
                                frame.header.get("retry") is True)
            return []
        expected = {AWAIT_HELLO: "hello", AWAIT_AUTH: "auth", AWAIT_VERDICT: "ready"}[self.state]
        if frame.kind != expected:
            return self.refuse(f"protocol error: got a {frame.kind!r} frame while waiting for "
                               f"{expected!r}")
        if self.state == AWAIT_HELLO:
            return self._on_hello(frame.header)
        if self.state == AWAIT_AUTH:
            return self._on_auth(frame.header)
        self.state = DONE
        return []

    def _on_hello(self, h: dict[str, Any]) -> Out:
        me = self.me
        if h["magic"] != HANDSHAKE_MAGIC:
            return self.refuse(f"not a ringllm peer (handshake magic {h['magic']!r})")
        if h["v"] != me.version:
            return self.refuse(f"protocol version {h['v']} not supported (we speak {me.version})")
        if h["ring"] != me.ring:
            return self.refuse(f"peer is in ring {h['ring']!r} but we are in ring {me.ring!r}")
        if len(h["nonce"]) != NONCE_BYTES or h["nonce"] == self.nonce:
            return self.refuse("bad handshake nonce (wrong length or our own nonce reflected)")
        if not (0 <= h["rank"] < 2**32 and 0 < h["size"] < 2**32):
            return self.refuse(f"bad rank {h['rank']} / size {h['size']} in hello")
        config = h.get("cfg", "")
        if type(config) is not str:
            return self.refuse(f"bad ring-config claim in hello (a {type(config).__name__})")
        self.peer = HandshakeInfo(ring=h["ring"], rank=h["rank"], size=h["size"],
                                  model=h["model"], plan=h["plan"], version=h["v"],
                                  config=config)
        self._theirs = transcript(self.peer, h["nonce"])
        self.state = AWAIT_AUTH
        return [("auth", {"mac": compute_mac(self._secret, self._mine, self._theirs)})]

    def _on_auth(self, h: dict[str, Any]) -> Out:
        expected = compute_mac(self._secret, self._theirs, self._mine)
        if not hmac.compare_digest(h["mac"], expected):
            return self.refuse("wrong secret: the peer's proof does not verify "
                               "(different shared secret, or a replayed handshake)")
        # Authenticated: now the claims can be trusted enough to diagnose mismatches.
        me, peer = self.me, self.peer
        assert peer is not None
        who = f"peer rank {peer.rank}"
        if self.expect_rank is not None and peer.rank != self.expect_rank:
            return self.mismatch(f"{who} connected where we expect rank {self.expect_rank}")
        if peer.size != me.size:
            return self.mismatch(f"{who} has ring size {peer.size} but we have {me.size}")
        if peer.rank >= me.size:
            return self.mismatch(f"{who} is out of range for a ring of {me.size}")
        if peer.rank == me.rank:
            return self.mismatch(f"{who} has the same rank as we do")
        if peer.model != me.model:
            return self.mismatch(f"{who} has model fingerprint {_short(peer.model)} "
                               f"but we have {_short(me.model)} (a different model file)")
        if diff := config_difference(peer.config, me.config):
            return self.mismatch(f"{who} runs a different ring configuration: {diff}")
        if peer.plan != me.plan:
            return self.mismatch(f"{who} has shard-plan hash {_short(peer.plan)} "
                               f"but we have {_short(me.plan)}")
        if self.admit is not None and (reason := self.admit(peer)):
            return self.refuse(reason, retry=True)
        self.state = AWAIT_VERDICT
        return [("ready", {})]


def _error(reason: str, retry: bool, cls: type[HandshakeError] = HandshakeError) -> HandshakeError:
    err = cls(reason)
    err.retry = retry  # type: ignore[attr-defined]  # read by the connecting side's back-off
    return err


async def read_frame(reader: asyncio.StreamReader, decoder: FrameDecoder) -> Frame:
    """Read exactly one frame from ``reader`` without reading past its end.

    Raises :class:`asyncio.IncompleteReadError` on EOF and :class:`RemoteProtocolError` on bad
    bytes.  Cancellation may leave a partial frame consumed (the stream is then unusable).
    """
    frames: list[Frame] = []
    while not frames:
        frames = decoder.feed(await reader.readexactly(decoder.needed))
    return frames[0]


def _send(writer: asyncio.StreamWriter, out: Out) -> None:
    for kind, header in out:
        writer.write(encode_frame_bytes(kind, header, max_frame=HANDSHAKE_MAX_FRAME))


async def _linger_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close so the peer can still read our last frame.

    Closing with unread input makes the kernel send RST, which can destroy our refusal in flight;
    so half-close, discard input until the peer closes too (or a short timeout), then close.
    """
    try:
        async with asyncio.timeout(_LINGER):
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            while await reader.read(65536):
                pass
    except (TimeoutError, OSError):
        pass
    finally:
        writer.close()


async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    me: HandshakeInfo, secret: bytes, expect_rank: int | None,
                    timeout: float, peer: str = "peer",
                    admit: Callable[[HandshakeInfo], str | None] | None = None) -> HandshakeInfo:
    """Run the handshake on a fresh connection; return the peer's verified claims.

    On success the streams are positioned just after the handshake and left open for the link.
    On failure a ``refuse`` frame with the reason is sent (unless the peer refused first or the
    connection is gone), the connection is closed, and :class:`HandshakeError` is raised with the
    reason (``peer`` names the other side in messages); its ``retry`` attribute is True when
    the refusal said to come back later.  The whole exchange is bounded by ``timeout``
    seconds.  ``admit``: see :class:`Handshake`.  Cancellation closes the connection.
    """
    hs = Handshake(me, secret, expect_rank=expect_rank, admit=admit)
    decoder = FrameDecoder(max_frame=HANDSHAKE_MAX_FRAME, max_header=HANDSHAKE_MAX_FRAME)
    error: HandshakeError | None = None
    try:
        async with asyncio.timeout(timeout):
            _send(writer, hs.start())
            await writer.drain()
            while not hs.finished:
                frame = await read_frame(reader, decoder)
                _send(writer, hs.receive(frame))
                await writer.drain()
    except TimeoutError:
        # Worth retrying: the peer may only have been stalled, or busy loading.
        _send(writer, hs.refuse(f"handshake timed out after {timeout:g} s in state {hs.state}",
                                retry=True))
    except RemoteProtocolError as exc:
        hint = " (it speaks TLS: is [tls] missing from our ring.toml?)" if "b'\\x16\\x03'" in str(exc) else ""
        _send(writer, hs.refuse(f"not a ringllm peer or protocol error: {exc}{hint}"))
    except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
        error = _error(f"{peer}: connection lost during handshake in state {hs.state} "
                       f"({type(exc).__name__})", True)
        error.__cause__ = exc  # lets a connecting caller tell "retry" from "refused"
    except BaseException:
        writer.close()
        raise
    if hs.state == DONE and error is None:
        assert hs.peer is not None
        return hs.peer
    if error is None:
        assert hs.error is not None
        error = _error(f"{peer}: {hs.error}", getattr(hs.error, "retry", False), type(hs.error))
    await _linger_close(reader, writer)
    raise error
