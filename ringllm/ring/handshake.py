"""Peer handshake: mutual HMAC-SHA256 authentication first, then compatibility checks.

The connecting end is the *initiator*, the listening end the *acceptor*.  The handshake runs as
a pure state machine (:class:`Handshake`) plus a thin asyncio driver (:func:`handshake`)::

    both:      --hello-->   magic, protocol version, 32-byte nonce (nothing else)
    initiator: --auth--->   mac_i = HMAC(secret, LABEL || "initiator\\0" || nonce_i || nonce_a)
    acceptor:               verifies mac_i; if wrong: refuse "authentication failed", close
    acceptor:  --auth--->   mac_a = HMAC(secret, LABEL || "acceptor\\0" || nonce_a || nonce_i)
    acceptor:  --config->   ring, rank, size, model, plan, ring-config claim, and
                            mac = HMAC(secret, LABEL || "config\\0" || nonce_mine || nonce_theirs
                                       || C(config))
    initiator:              verifies mac_a; if wrong: refuse "authentication failed", close
    initiator: --config->   (the same, its own)
    both:      --ready-->   after verifying the other's config frame and checking its claims
                            (or --refuse--> with a reason, at any point, then close)

So a party that has not proven it knows the secret sees only magic, version and a random nonce,
and gets no MAC: the initiator proves first, and the acceptor sends its proof and its
configuration only to an initiator whose proof verified; the initiator sends its own
configuration only after the acceptor's proof verified.  The role labels keep a proof from
being reflected back as the other role's; the fresh nonces keep a recorded one from being
replayed; the config MAC binds each configuration to this session and its sender (``C`` is the
canonical encoding of :func:`config_transcript`), so nobody in the middle can swap configs
after authentication.  Hellos with equal nonces are refused.  This authenticates peers; it does
not encrypt or protect the link afterwards (turn on ``[tls]`` in ring.toml, or use a VPN, on
untrusted networks).  Byte layouts are in ``docs/protocol.md``.

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
    "ACCEPTOR",
    "AUTH_FAILED",
    "HANDSHAKE_MAGIC",
    "HANDSHAKE_MAX_FRAME",
    "INITIATOR",
    "PROTOCOL_VERSION",
    "Handshake",
    "HandshakeInfo",
    "compute_mac",
    "config_difference",
    "config_transcript",
    "handshake",
    "read_frame",
]

HANDSHAKE_MAGIC = b"RINGLLM"
PROTOCOL_VERSION = 3
NONCE_BYTES = 32
# Before the peer is authenticated it may only make us buffer this much.
HANDSHAKE_MAX_FRAME = 16 * 1024
_LABEL = b"ringllm-handshake-v3\x00"
# What a MAC proves, right after the label: each purpose its own string, so a MAC made for one
# cannot pass as another (the nonces after it are always 32 bytes, so the message is unambiguous).
INITIATOR, ACCEPTOR, _CONFIG = b"initiator\x00", b"acceptor\x00", b"config\x00"
# The whole reason a peer that failed authentication is told: nothing about us.
AUTH_FAILED = "authentication failed"
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


def config_transcript(info: HandshakeInfo) -> bytes:
    """Canonical bytes of a config frame, independent of msgpack: each field as u32 BE length +
    bytes, in the order ring (UTF-8), rank (u32 BE), size (u32 BE), model (UTF-8), plan (UTF-8),
    config (UTF-8).  ``rank`` and ``size`` must fit in a u32."""
    parts = [info.ring.encode(), struct.pack(">I", info.rank), struct.pack(">I", info.size),
             info.model.encode(), info.plan.encode(), info.config.encode()]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def compute_mac(secret: bytes, purpose: bytes, first: bytes, second: bytes, body: bytes = b"") -> bytes:
    """HMAC-SHA256(secret, LABEL || purpose || first nonce || second nonce || body).

    ``purpose`` is :data:`INITIATOR` or :data:`ACCEPTOR` (a proof, with the prover's nonce
    first) or the config label (a config frame, the sender's nonce first, ``body`` its
    :func:`config_transcript`)."""
    return hmac.new(secret, _LABEL + purpose + first + second + body, hashlib.sha256).digest()


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
START, AWAIT_HELLO, AWAIT_AUTH, AWAIT_CONFIG, AWAIT_VERDICT, DONE, REFUSED = (
    "START", "AWAIT_HELLO", "AWAIT_AUTH", "AWAIT_CONFIG", "AWAIT_VERDICT", "DONE", "REFUSED")
_EXPECTS = {AWAIT_HELLO: "hello", AWAIT_AUTH: "auth", AWAIT_CONFIG: "config", AWAIT_VERDICT: "ready"}

Out = list[tuple[str, dict[str, Any]]]


class Handshake:
    """Sans-IO handshake for one end of one connection.

    Call :meth:`start` once, send what it returns, then feed every received frame to
    :meth:`receive` and send what it returns.  When ``state`` is ``DONE`` the peer is
    authenticated and compatible and ``peer`` holds its claims.  When it is ``REFUSED``,
    ``error`` is the :class:`HandshakeError` to raise (after sending the returned refusal, if any).
    ``initiator``: True on the connecting end (it proves first), False on the listening end.
    """

    def __init__(self, me: HandshakeInfo, secret: bytes, *, initiator: bool,
                 expect_rank: int | None = None, nonce: bytes | None = None,
                 admit: Callable[[HandshakeInfo], str | None] | None = None) -> None:
        """``admit`` is asked last, once the peer is authenticated and compatible: a reason it
        returns refuses the peer for now (a refusal with ``retry``: come back later)."""
        if not secret:
            raise ValueError("the ring secret must not be empty")
        if not (0 <= me.rank < 2**32 and 0 < me.size < 2**32):
            raise ValueError(f"rank {me.rank} / size {me.size} do not fit the handshake's u32 fields")
        self.me = me
        self._secret = secret
        self.initiator = initiator
        self.expect_rank = expect_rank
        self.admit = admit
        self.nonce = nonce if nonce is not None else _secrets.token_bytes(NONCE_BYTES)
        self.state = START
        self.peer: HandshakeInfo | None = None
        self.error: HandshakeError | None = None
        self._their_nonce = b""

    @property
    def finished(self) -> bool:
        return self.state in (DONE, REFUSED)

    def start(self) -> Out:
        assert self.state == START
        self.state = AWAIT_HELLO
        return [("hello", {"magic": HANDSHAKE_MAGIC, "v": self.me.version, "nonce": self.nonce})]

    def refuse(self, reason: str, *, retry: bool = False, mismatch: bool = False,
               tell: str | None = None) -> Out:
        """Give up with ``reason``: returns the refusal frame to send.

        ``retry`` tells the peer that we are not ready for it yet, rather than incompatible.
        ``mismatch``: an authenticated peer's configuration differs (``error`` is then a
        :class:`ConfigMismatchError`).  ``tell``: what the peer is told, if not ``reason``.
        """
        self.state = REFUSED
        self.error = _error(reason, retry, ConfigMismatchError if mismatch else HandshakeError)
        return [("refuse", {"reason": (reason if tell is None else tell)[:1000], "retry": retry})]

    def mismatch(self, reason: str) -> Out:
        """Refuse an authenticated peer whose configuration differs (permanent)."""
        return self.refuse(reason, mismatch=True)

    def receive(self, frame: Frame) -> Out:
        """Advance on one received frame; return the frames to send (possibly a refusal)."""
        if self.finished:
            return []
        if frame.kind == "refuse":
            reason = frame.header["reason"]
            if reason == AUTH_FAILED:
                reason += " (our proof did not verify: is our secret the ring's?)"
            self.state = REFUSED
            self.error = _error(f"peer refused the handshake: {reason}",
                                frame.header.get("retry") is True)
            return []
        expected = _EXPECTS[self.state]
        if frame.kind != expected:
            return self.refuse(f"protocol error: got a {frame.kind!r} frame while waiting for "
                               f"{expected!r}")
        if self.state == AWAIT_HELLO:
            return self._on_hello(frame.header)
        if self.state == AWAIT_AUTH:
            return self._on_auth(frame.header)
        if self.state == AWAIT_CONFIG:
            return self._on_config(frame.header)
        self.state = DONE
        return []

    def _on_hello(self, h: dict[str, Any]) -> Out:
        if h["magic"] != HANDSHAKE_MAGIC:
            return self.refuse(f"not a ringllm peer (handshake magic {h['magic']!r})")
        if h["v"] != self.me.version:
            return self.refuse(f"protocol version {h['v']} not supported (we speak {self.me.version})")
        if len(h["nonce"]) != NONCE_BYTES or h["nonce"] == self.nonce:
            return self.refuse("bad handshake nonce (wrong length or our own nonce reflected)")
        self._their_nonce = h["nonce"]
        self.state = AWAIT_AUTH
        if self.initiator:  # we prove first; the acceptor says nothing more until it verified us
            return [("auth", {"mac": compute_mac(self._secret, INITIATOR, self.nonce, self._their_nonce)})]
        return []

    def _on_auth(self, h: dict[str, Any]) -> Out:
        role = ACCEPTOR if self.initiator else INITIATOR
        expected = compute_mac(self._secret, role, self._their_nonce, self.nonce)
        if not hmac.compare_digest(h["mac"], expected):
            return self.refuse("wrong secret: the peer's proof does not verify "
                               "(different shared secret, or a replayed handshake)", tell=AUTH_FAILED)
        # The peer is authenticated: now it may have our proof (acceptor) and our configuration.
        self.state = AWAIT_CONFIG
        out: Out = []
        if not self.initiator:
            out.append(("auth", {"mac": compute_mac(self._secret, ACCEPTOR, self.nonce, self._their_nonce)}))
        me = self.me
        mac = compute_mac(self._secret, _CONFIG, self.nonce, self._their_nonce, config_transcript(me))
        out.append(("config", {"ring": me.ring, "rank": me.rank, "size": me.size, "model": me.model,
                               "plan": me.plan, "cfg": me.config, "mac": mac}))
        return out

    def _on_config(self, h: dict[str, Any]) -> Out:
        if not (0 <= h["rank"] < 2**32 and 0 < h["size"] < 2**32):
            return self.refuse(f"bad rank {h['rank']} / size {h['size']} in config")
        peer = HandshakeInfo(ring=h["ring"], rank=h["rank"], size=h["size"], model=h["model"],
                             plan=h["plan"], version=self.me.version, config=h["cfg"])
        expected = compute_mac(self._secret, _CONFIG, self._their_nonce, self.nonce,
                               config_transcript(peer))
        if not hmac.compare_digest(h["mac"], expected):
            return self.refuse("the peer's configuration frame does not verify "
                               "(altered in flight, or not from the peer that authenticated)")
        # Authenticated and bound to this session: now the claims can be trusted enough to
        # diagnose mismatches.
        self.peer = peer
        me = self.me
        who = f"peer rank {peer.rank}"
        if peer.ring != me.ring:
            return self.mismatch(f"peer is in ring {peer.ring!r} but we are in ring {me.ring!r}")
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
                    me: HandshakeInfo, secret: bytes, initiator: bool, expect_rank: int | None,
                    timeout: float, peer: str = "peer",
                    admit: Callable[[HandshakeInfo], str | None] | None = None) -> HandshakeInfo:
    """Run the handshake on a fresh connection; return the peer's verified claims.

    On success the streams are positioned just after the handshake and left open for the link.
    On failure a ``refuse`` frame with the reason is sent (unless the peer refused first or the
    connection is gone), the connection is closed, and :class:`HandshakeError` is raised with the
    reason (``peer`` names the other side in messages); its ``retry`` attribute is True when
    the refusal said to come back later.  The whole exchange is bounded by ``timeout``
    seconds.  ``initiator``: True on the end that connected, False on the end that accepted.
    ``admit``: see :class:`Handshake`.  Cancellation closes the connection.
    """
    hs = Handshake(me, secret, initiator=initiator, expect_rank=expect_rank, admit=admit)
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
