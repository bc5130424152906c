"""Bidirectional frame links between ring neighbours: TCP (asyncio streams) and in-memory.

A :class:`Link` moves frames (see ``wire.py``) to and from one peer.  Received frames go to an
inbox as bytes arrive, so a link never stops reading while its owner is busy writing (no
flow-control deadlock when every peer of a ring writes at once), EOF is noticed at once even on
an idle link, and ``ping`` frames are answered without the owner's help.

A :class:`TcpLink` can be lent to a worker thread (:meth:`TcpLink.lend`): the thread then
drives the socket itself through a :class:`BlockingLink`, with no event-loop round trip.
Links over TLS are :class:`StreamLink` (same behaviour, but never lent: the TLS state lives in
the event loop's transport).

:class:`RingListener` is a peer's listening socket for its whole life: it handshakes every
newcomer with a deadline, drops strangers with a logged reason, and hands the verified
predecessor to :func:`open_tcp_ring`, which (re-)forms the ring as often as it breaks.

Error contract of every link:
  * once a link fails (EOF, reset, ``recv`` timeout, silence past the keepalive limit, a ``bye``
    from the peer, or :meth:`Link.close`) it stays failed; ``recv`` first returns the frames that
    arrived before the failure, then raises the failure; ``write``/``send`` raise it at once;
  * loss of the peer is :class:`PeerLostError` naming the peer; bytes that break the wire
    protocol are :class:`RemoteProtocolError` naming the peer (the link is closed);
  * a ``bye`` that names a lost peer (``lost``) fails the link with PeerLostError naming *that*
    peer, so a loss is reported by the same name all round the ring.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import select
import socket
import ssl as _ssl
import threading
import time
from collections.abc import Sequence
from typing import Any

from ringllm.errors import (
    ConfigError,
    HandshakeError,
    LocalProtocolError,
    PeerLostError,
    RemoteProtocolError,
    RingError,
)
from ringllm.ring.handshake import HANDSHAKE_MAX_FRAME, HandshakeInfo, handshake
from ringllm.ring.wire import DEFAULT_MAX_FRAME, Frame, FrameDecoder, encode_frame, encode_frame_bytes

__all__ = [
    "DEFAULT_RECV_TIMEOUT",
    "BlockingLink",
    "Link",
    "MemoryLink",
    "Pump",
    "RingLinks",
    "RingListener",
    "StreamLink",
    "TcpLink",
    "memory_link_pair",
    "memory_ring",
    "open_tcp_ring",
]

log = logging.getLogger(__name__)

DEFAULT_RECV_TIMEOUT = 30.0
# BlockingLink.recv_expected waits this long at most before leaving a frame to the general path.
_EXPECT_WAIT = 0.05
# Frames with a payload up to this size are written as one buffer (one syscall, one segment
# with TCP_NODELAY); larger payloads are written separately to avoid copying them into a join.
_JOIN_MAX = 64 * 1024
# The stream reader only serves the handshake (a link then reads the socket itself). It pauses
# the socket above 2x this many unread bytes, so an unauthenticated sender cannot make us
# buffer much more than one handshake frame.
_STREAM_LIMIT = HANDSHAKE_MAX_FRAME


def _write_chunks(head: bytes, view: memoryview | None) -> tuple[bytes | memoryview, ...]:
    """What to write for one frame: small frames as one buffer (one syscall, one segment with
    TCP_NODELAY), large payloads apart so they are not copied into a join."""
    if view is None:
        return (head,)
    if view.nbytes <= _JOIN_MAX:
        return (head + view,)
    return (head, view)


class Link:
    """One full-duplex frame link to a peer.  Subclasses move bytes; this class owns the inbox.

    Only one task may ``recv`` at a time; any number may ``write``.  Frames written by one task
    arrive in the order written.
    """

    def __init__(self, peer: str, *, recv_timeout: float = DEFAULT_RECV_TIMEOUT,
                 max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.peer = peer
        self.recv_timeout = recv_timeout
        self.max_frame = max_frame
        self._decoder = FrameDecoder(max_frame=max_frame)
        self._inbox: collections.deque[Frame] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._closed_event = asyncio.Event()
        self._incoming_waiters: list[asyncio.Future[None]] = []
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_at = self._deadline = self._delay = 0.0
        self.last_rx = self.last_tx = time.monotonic()
        # Set by keepalive(): a link silent this long is lost (also bounds a lent link's waits).
        self.dead_after: float | None = None
        self.bytes_sent = 0  # every frame byte this link wrote (prefix, header, payload)

    # -- state ------------------------------------------------------------------------------
    @property
    def error(self) -> Exception | None:
        """The failure that closed the link, or None while it is up."""
        return self._error

    @property
    def closed(self) -> bool:
        return self._error is not None

    async def wait_closed(self) -> Exception:
        """Wait until the link fails or is closed; return the failure."""
        await self._closed_event.wait()
        assert self._error is not None
        return self._error

    async def wait_incoming(self) -> None:
        """Wait until a frame is ready for ``recv`` or the link has failed (consumes nothing).

        For an idle owner that must notice a neighbour starting work; cancellation-safe.
        """
        if self._inbox or self._error is not None:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._incoming_waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._incoming_waiters:
                self._incoming_waiters.remove(waiter)

    def _wake_incoming(self) -> None:
        waiters, self._incoming_waiters = self._incoming_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        """Record the first failure, wake a waiting ``recv`` and release the transport."""
        if self._error is not None:
            return
        self._error = exc
        self._closed_event.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._wake_incoming()
        self._close_transport()

    def close(self, reason: str = "closed locally") -> None:
        """Close the link (idempotent).  Later calls raise PeerLostError(peer, reason)."""
        self._fail(PeerLostError(self.peer, reason))

    def abort(self, reason: str) -> None:
        """Close at once, also waking a worker thread blocked on a lent socket (idempotent)."""
        self.close(reason)

    # -- receiving --------------------------------------------------------------------------
    def _on_bytes(self, data: bytes) -> None:
        """Feed received bytes to the decoder and route the frames (called by the transport)."""
        if self._error is not None:
            return
        self.last_rx = time.monotonic()
        try:
            frames = self._decoder.feed(data)
        except RemoteProtocolError as exc:
            self._fail(RemoteProtocolError(f"from peer {self.peer}: {exc}"))
            return
        self._route(frames)

    def _on_payload_bytes(self, n: int) -> None:
        """``n`` bytes were received straight into the decoder's payload buffer."""
        if self._error is not None:
            return
        self.last_rx = time.monotonic()
        self._route(self._decoder.payload_received(n))

    def _route(self, frames: list[Frame]) -> None:
        for frame in frames:
            kind = frame.kind
            if kind == "ping":
                try:
                    self._write_frame("pong", frame.header, None)
                except RingError:
                    pass  # the link is going down; recv will report why
            elif kind == "pong":
                pass
            elif kind == "bye":
                self._fail(_goodbye_error(self.peer, frame.header))
                return
            else:
                self._inbox.append(frame)
        if self._inbox:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            if self._incoming_waiters:
                self._wake_incoming()

    def _on_eof(self, reason: str = "connection closed by peer (EOF)") -> None:
        self._fail(PeerLostError(self.peer, reason))

    async def recv(self, timeout: float | None = None) -> Frame:
        """Return the next frame (other than ping/pong/bye).

        Waits at most ``timeout`` seconds (default ``recv_timeout``); on timeout the link is
        closed and PeerLostError is raised.  Raises the link's failure once the frames that
        arrived before it are consumed.  Cancellation loses no frame.
        """
        inbox = self._inbox
        if inbox:
            return inbox.popleft()
        if self._error is not None:
            raise self._error
        if self._waiter is not None:
            raise LocalProtocolError(f"concurrent recv on the link to {self.peer}")
        loop = asyncio.get_running_loop()
        self._arm_watchdog(loop, self.recv_timeout if timeout is None else timeout)
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        if inbox:
            return inbox.popleft()
        assert self._error is not None
        raise self._error

    # A timer per recv costs more than the rest of a small all-reduce under uvloop, so one
    # lazily re-armed watchdog per link enforces the deadline of whichever recv is waiting: it
    # fires at most once per timeout period while frames keep arriving.
    def _arm_watchdog(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self._delay = delay
        self._deadline = deadline = loop.time() + delay
        if self._watchdog is None or deadline < self._watchdog_at:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._watchdog_at = deadline
            self._watchdog = loop.call_at(deadline, self._on_watchdog, loop)

    def _on_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        self._watchdog = None
        waiter = self._waiter
        if waiter is None or waiter.done() or self._error is not None:
            return
        if loop.time() >= self._deadline - 0.001:
            self._fail(PeerLostError(self.peer, f"no frame within {self._delay:g} s"))
        else:
            self._watchdog_at = self._deadline
            self._watchdog = loop.call_at(self._deadline, self._on_watchdog, loop)

    # -- sending ----------------------------------------------------------------------------
    def write(self, kind: str, header: dict[str, Any] | None = None, payload: Any = None) -> None:
        """Queue one frame without waiting; the payload must stay unchanged until ``drain``.

        Raises the link's failure if it is closed, LocalProtocolError if the frame is invalid.
        Never blocks, so a task can keep reading while its writes are in flight; call
        :meth:`drain` at a point where waiting cannot deadlock the ring.
        """
        if self._error is not None:
            raise self._error
        self._write_frame(kind, header, payload)

    def _write_frame(self, kind: str, header: dict[str, Any] | None, payload: Any) -> None:
        head, view = encode_frame(kind, header, payload, max_frame=self.max_frame)
        self.last_tx = time.monotonic()
        self.bytes_sent += len(head) + (view.nbytes if view is not None else 0)
        self._write_buffers(head, view)

    async def send(self, kind: str, header: dict[str, Any] | None = None,
                   payload: Any = None) -> None:
        """``write`` then ``drain``."""
        self.write(kind, header, payload)
        await self.drain()

    @property
    def paused(self) -> bool:
        """True while the send buffer is above its high-water mark (``drain`` would wait)."""
        return False

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every written byte has left our buffers (so payloads may be reused)."""
        await self.drain()

    async def drain(self) -> None:
        """Wait until the transport's send buffer is below its high-water mark.

        Raises the link's failure (PeerLostError) if it closes meanwhile.
        """
        raise NotImplementedError

    def _write_buffers(self, head: bytes, view: memoryview | None) -> None:
        raise NotImplementedError

    def _close_transport(self) -> None:
        raise NotImplementedError

    # -- liveness ---------------------------------------------------------------------------
    async def keepalive(self, interval: float, dead_after: float) -> None:
        """Send a ping whenever nothing was sent for ``interval`` s; fail the link with
        PeerLostError when nothing was received for ``dead_after`` s.

        Returns when the link closes (for whatever reason); run it in the owner's TaskGroup.
        While the link is lent to a worker thread, pings still go out (see
        :meth:`BlockingLink.ping_from_loop`) and the thread enforces ``dead_after``.
        """
        self.dead_after = dead_after
        # Silence counts from now: the link may have waited (its pings answered) while the
        # ring was still forming elsewhere.
        self.last_rx = max(self.last_rx, time.monotonic())
        closed = asyncio.ensure_future(self._closed_event.wait())
        try:
            while not self.closed:
                await asyncio.wait([closed], timeout=interval)
                now = time.monotonic()
                if self.closed:
                    break
                lent = getattr(self, "_lent", None)
                if lent is not None:
                    # A worker thread owns the socket and judges silence itself when it waits
                    # (it is the only reader).  Ping anyway: the thread may be computing for
                    # longer than the neighbour's dead_after without sending anything.
                    if now - self.last_tx >= interval * 0.9:
                        lent.ping_from_loop()
                    continue
                if now - self.last_rx > dead_after:
                    self._fail(PeerLostError(self.peer, f"silent for {now - self.last_rx:.1f} s"))
                    break
                if now - self.last_tx >= interval * 0.9:
                    try:
                        self._write_frame("ping", {"t": time.monotonic_ns()}, None)
                    except RingError:
                        break  # the link failed; its error is recorded
        finally:
            closed.cancel()

    def say_goodbye(self, reason: str, *, close: bool = True, lost: str | None = None,
                    by: str | None = None) -> None:
        """Tell the peer we are leaving on purpose (it sees PeerLostError with ``reason``).

        ``lost`` names a peer whose loss makes us leave, ``by`` the peer that noticed it: the
        neighbour then reports that peer (not us) as lost.  With ``close=False`` the link stays
        open until the peer answers or closes.  Never raises for a link that is already down.
        """
        if self._error is None and getattr(self, "_lent", None) is None:
            header = {"reason": reason[:1000]}
            if lost is not None:
                header |= {"lost": lost[:200], "by": (by or "")[:200]}
            try:
                self._write_frame("bye", header, None)
            except RingError:
                pass
        if close:
            self.close(reason if lost is None else f"lost peer {lost}: {reason}")


def _goodbye_error(peer: str, header: dict[str, Any]) -> PeerLostError:
    """The failure a ``bye`` from ``peer`` means (see :meth:`RingLinks.abandon`)."""
    lost, reason, by = header.get("lost"), header["reason"], header.get("by")
    if type(lost) is str and lost:
        by = by if type(by) is str and by else peer
        err = PeerLostError(lost, f"{reason} (reported by {by})")
        # Kept apart so the news can be passed on without growing at every hop.
        err.reporter, err.cause = by, reason  # type: ignore[attr-defined]
        return err
    return PeerLostError(peer, f"peer said goodbye: {reason}")


class StreamLink(Link):
    """A link over a TCP (or TLS) connection that has passed the handshake.  Sets TCP_NODELAY.

    Built from the handshake's asyncio stream pair, then takes the transport over with its own
    (buffered) protocol: received bytes go straight into the decoder (no reader task, no
    StreamReader copy), which measured ~2x cheaper per small frame.  Bytes the
    StreamReader had already buffered are fed first.  ``drain`` follows the transport's
    pause/resume_writing flow control.  ``close`` aborts nothing: it closes the transport after
    the queued bytes are written.  Over TLS use this class; plain TCP uses :class:`TcpLink`,
    which can also be lent to a worker thread.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str,
                 **kwargs: Any) -> None:
        super().__init__(peer, **kwargs)
        transport = writer.transport
        self._transport = transport
        self._writer = writer  # keep the stream objects alive with the transport
        self._paused = False
        self._lent: BlockingLink | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Hand-over: stop the stream protocol, take what it buffered, then read ourselves.
        transport.pause_reading()
        leftover = reader._buffer  # noqa: SLF001 - bytes already read off the socket
        data = bytes(leftover)
        leftover.clear()
        transport.set_protocol(_LinkProtocol(self))
        if data:
            self._on_bytes(data)
        if reader.at_eof():
            self._on_eof()
        elif self._error is None:
            transport.resume_reading()

    @property
    def paused(self) -> bool:
        return self._paused

    def _write_buffers(self, head: bytes, view: memoryview | None) -> None:
        transport = self._transport
        if transport.is_closing():
            self._on_eof("connection closed")
            raise self._error  # type: ignore[misc]
        for chunk in _write_chunks(head, view):
            transport.write(chunk)

    async def drain(self) -> None:
        if self._error is not None:
            raise self._error
        if self._paused:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter
            if self._error is not None:
                raise self._error

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _close_transport(self) -> None:
        self._transport.close()
        self._wake_drainers()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until the transport has handed every queued byte to the kernel."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.recv_timeout if timeout is None else timeout)
        while self._error is None and self._transport.get_write_buffer_size():
            if loop.time() > deadline:
                self._fail(PeerLostError(self.peer, "send buffer did not empty"))
                break
            await asyncio.sleep(0.0005)
        if self._error is not None:
            raise self._error

    def abort(self, reason: str) -> None:
        sock = self._transport.get_extra_info("socket")
        if sock is not None and self._error is None:
            try:
                # shutdown (unlike close) acts on the socket, not on one descriptor: it wakes a
                # worker thread polling its duplicate descriptor of a lent link at once.
                with socket.socket(fileno=os.dup(sock.fileno())) as dup:
                    dup.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.close(reason)


class TcpLink(StreamLink):
    """A :class:`StreamLink` over plain TCP, which can be lent to a worker thread."""

    def lend(self, pump: Pump) -> BlockingLink:
        """Hand the socket to a worker thread until :meth:`take_back` (loop thread only).

        Reading is paused on the event loop and the thread reads and writes the socket itself
        (see :class:`BlockingLink`).  The send buffer must be empty (``await flush()``).
        """
        if self._error is not None:
            raise self._error
        if self._lent is not None:
            raise LocalProtocolError(f"the link to {self.peer} is already lent")
        if self._transport.get_write_buffer_size():
            raise LocalProtocolError(f"flush the link to {self.peer} before lending it")
        self._transport.pause_reading()
        fd = self._transport.get_extra_info("socket").fileno()
        self._lent = BlockingLink(self, socket.socket(fileno=os.dup(fd)), pump)
        return self._lent

    def take_back(self) -> None:
        """End a loan (loop thread only, after the worker thread is done with the link).

        A failure the thread met becomes the link's failure; otherwise reading resumes and
        frames the thread received but did not consume are still returned by ``recv``.
        """
        lent, self._lent = self._lent, None
        if lent is None:
            return
        with lent.wlock:
            tail, lent.tail = lent.tail, b""
            lent.sock.close()  # our duplicate descriptor only
        if lent.error is not None:
            self._fail(lent.error)
        elif self._error is None:
            if tail:
                self._transport.write(tail)  # the rest of a ping sent from the loop
            # Nobody read the socket while the thread computed: give the neighbour a fresh
            # dead_after window rather than judging it by our own pause.
            self.last_rx = max(self.last_rx, time.monotonic())
            self._transport.resume_reading()
            if self._inbox:
                self._route([])


class Pump:
    """The poller the lent links of one worker thread share.

    While the thread waits to send on one link it keeps reading every lent link, so peers that
    all write at once cannot deadlock on full socket buffers (the event loop's reading does the
    same job for unlent links).
    """

    def __init__(self) -> None:
        self._poll = select.poll()
        self._links: dict[int, BlockingLink] = {}

    def add(self, link: BlockingLink) -> None:
        self._poll.register(link.fd, select.POLLIN)
        self._links[link.fd] = link

    def wait(self, link: BlockingLink, *, write: bool, deadline: float) -> None:
        """Service reads until ``link`` can be written (``write``) or has a frame in its inbox.

        Fails the link (PeerLostError) at ``deadline``, or as soon as it has been silent (no
        byte at all, pings included) for the link's ``dead_after`` seconds counted from the
        start of this wait: a stalled neighbour is noticed within seconds, while a live one
        that computes for a long time keeps us waiting (its event loop pings meanwhile).
        """
        inbox = link.link._inbox
        silent_limit = link.link.dead_after
        start = time.monotonic()
        if write:
            self._poll.modify(link.fd, select.POLLIN | select.POLLOUT)
        try:
            while True:
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0:
                    what = "could not send" if write else "no frame"
                    raise link.lost(f"{what} within {link.recv_timeout:g} s")
                if silent_limit is not None:
                    quiet_since = max(start, link.link.last_rx)
                    if now - quiet_since >= silent_limit:
                        raise link.lost(f"silent for {now - quiet_since:.1f} s")
                    remaining = min(remaining, quiet_since + silent_limit - now)
                ready = False
                for fd, events in self._poll.poll(remaining * 1000 + 1):
                    other = self._links[fd]
                    if events & (select.POLLIN | select.POLLERR | select.POLLHUP):
                        other.read_some()
                    if write and fd == link.fd and events & select.POLLOUT:
                        ready = True
                if ready or (not write and inbox):
                    return
        finally:
            if write:
                self._poll.modify(link.fd, select.POLLIN)


class BlockingLink:
    """A lent :class:`TcpLink`, driven synchronously by one worker thread.

    Same API as :class:`Link` but ``recv`` never suspends (it blocks the thread in ``poll``), so
    a collective's coroutine can be run to completion in the thread with no event-loop round
    trip: this removes the two cross-thread wake-ups per call of ``run_coroutine_threadsafe``.
    Shares the link's decoder and inbox, so no byte or frame is lost across a loan.  While lent,
    pings are not answered (any frame keeps a neighbour's keepalive happy) and errors raise at
    once; :meth:`TcpLink.take_back` turns them into the link's failure.

    Writes hold ``wlock`` for a whole frame, so the event loop can slip a ``ping`` in between
    (:meth:`ping_from_loop`) while the thread computes; a ping the kernel took only in part
    leaves its ``tail``, which the next writer sends first.
    """

    paused = False

    def __init__(self, link: TcpLink, sock: socket.socket, pump: Pump) -> None:
        self.link, self.sock, self.pump = link, sock, pump
        self.peer, self.recv_timeout, self.max_frame = link.peer, link.recv_timeout, link.max_frame
        self.fd = sock.fileno()
        self.error: Exception | None = None
        self.wlock = threading.Lock()
        self.tail = b""
        self._scratch = memoryview(bytearray(_LinkProtocol._SCRATCH))
        self._readable = select.poll()  # this socket alone, for recv_expected
        self._readable.register(self.fd, select.POLLIN)
        sock.setblocking(False)
        pump.add(self)

    def lost(self, reason: str) -> Exception:
        if self.error is None:
            self.error = PeerLostError(self.peer, reason)
        return self.error

    def write(self, kind: str, header: dict[str, Any] | None = None, payload: Any = None) -> None:
        head, view = encode_frame(kind, header, payload, max_frame=self.max_frame)
        self.write_encoded(*_write_chunks(head, view))

    def write_encoded(self, *chunks: bytes | memoryview) -> None:
        """Send one frame already encoded (by ``wire.encode_frame``), in one or more chunks."""
        if self.error is not None:
            raise self.error
        with self.wlock:
            if self.tail:  # the rest of a ping the loop sent in part goes first
                tail, self.tail = self.tail, b""
                self._sendall(tail)
            for chunk in chunks:
                self.link.bytes_sent += len(chunk)
                self._sendall(chunk)
        self.link.last_tx = time.monotonic()

    def ping_from_loop(self) -> None:
        """Send a keepalive ping from the event loop's thread, unless the worker is writing
        (its frames show we are alive).  Never blocks; errors are left for the worker."""
        if self.error is not None or not self.wlock.acquire(blocking=False):
            return
        try:
            data = self.tail + encode_frame_bytes("ping", {"t": time.monotonic_ns()})
            try:
                n = self.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                return  # the worker meets the failure at its next read or write
            self.tail = data[n:]
            self.link.bytes_sent += n
            self.link.last_tx = time.monotonic()
        finally:
            self.wlock.release()

    async def send(self, kind: str, header: dict[str, Any] | None = None,
                   payload: Any = None) -> None:
        self.write(kind, header, payload)

    async def drain(self) -> None:
        if self.error is not None:
            raise self.error

    async def flush(self, timeout: float | None = None) -> None:
        await self.drain()  # sends complete before write() returns

    def _sendall(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        deadline = 0.0
        while view.nbytes:
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                deadline = deadline or time.monotonic() + self.recv_timeout
                self.pump.wait(self, write=True, deadline=deadline)
                continue
            except OSError as exc:
                raise self.lost(f"connection error: {exc!r}") from None
            view = view[n:]

    async def recv(self, timeout: float | None = None) -> Frame:
        """Blocking in disguise: returns without ever suspending (see the class docstring)."""
        return self.recv_now(timeout)

    def recv_now(self, timeout: float | None = None) -> Frame:
        """The next frame, blocking the thread (deadline ``timeout`` or the link's recv timeout)."""
        inbox = self.link._inbox
        if not inbox:
            if self.error is not None:
                raise self.error
            delay = self.recv_timeout if timeout is None else timeout
            self.pump.wait(self, write=False, deadline=time.monotonic() + delay)
        return inbox.popleft()

    def recv_expected(self, head: bytes, nbytes: int, spin_until: float = 0.0) -> memoryview | None:
        """The payload of the next frame if that frame is exactly ``head`` (its encoded prefix
        and header) followed by ``nbytes`` of payload; None if it is anything else.

        The all-reduce's fast path: both sides encode the same header identically, so the bytes
        are read straight from the socket into a fresh buffer and compared with ``head``; no
        decoder, no msgpack, no Frame objects (with Collectives' lent exchange: P=2 all-reduce
        of 576 floats 75-100 us -> 48-65 us on the bench box).
        Waits by re-trying the read until ``time.perf_counter()`` passes ``spin_until`` (a core
        that would idle anyway answers without a thread wake-up), then in ``poll``. Returns
        None, having given the bytes read so far to the decoder, when something else arrives
        first (a ping, a frame out of step, garbage) or nothing has come within
        ``_EXPECT_WAIT`` seconds: the caller then uses :meth:`recv`, which applies the usual
        deadline and silence rules and checks the frame field by field.
        """
        link = self.link
        if self.error is not None or link._inbox or not link._decoder.at_frame_start:
            return None
        hl, total = len(head), len(head) + nbytes
        buf = memoryview(bytearray(total))
        got, checked = 0, False
        sock, readable = self.sock, self._readable
        give_up = 0.0
        while got < total:
            try:
                n = sock.recv_into(buf[got:])
            except BlockingIOError:
                now = time.perf_counter()
                if now < spin_until:
                    continue
                give_up = give_up or now + _EXPECT_WAIT
                if now < give_up and readable.poll((give_up - now) * 1000 + 1):
                    continue
                break
            except OSError:
                break  # read_some meets it again and reports it
            if n == 0:
                break
            got += n
            if not checked and got >= hl:
                if buf[:hl] != head:
                    break
                checked = True
        else:
            link.last_rx = time.monotonic()
            return buf[hl:]
        if got:
            link.last_rx = time.monotonic()
            self._deliver(bytes(buf[:got]))
        return None

    def read_some(self) -> None:
        """Read what the socket has into the decoder; route the frames (Pump only)."""
        if self.error is not None:
            raise self.error
        decoder = self.link._decoder
        tail = decoder.payload_buffer()
        try:
            if tail is not None and len(tail) >= _LinkProtocol._DIRECT_MIN:
                n = self.sock.recv_into(tail)
                if n:
                    self._route(decoder.payload_received(n))
            else:
                n = self.sock.recv_into(self._scratch)
                if n:
                    self._deliver(bytes(self._scratch[:n]))
        except BlockingIOError:
            return
        except OSError as exc:
            raise self.lost(f"connection error: {exc!r}") from None
        if n == 0:
            raise self.lost("connection closed by peer (EOF)")
        self.link.last_rx = time.monotonic()

    def _deliver(self, data: bytes) -> None:
        """Decode received bytes and route the frames they complete."""
        try:
            frames = self.link._decoder.feed(data)
        except RemoteProtocolError as exc:
            self.error = RemoteProtocolError(f"from peer {self.peer}: {exc}")
            raise self.error from None
        self._route(frames)

    def _route(self, frames: list[Frame]) -> None:
        inbox = self.link._inbox
        for frame in frames:
            if frame.kind == "bye":
                if self.error is None:
                    self.error = _goodbye_error(self.peer, frame.header)
                raise self.error
            if frame.kind not in ("ping", "pong"):
                inbox.append(frame)


class _LinkProtocol(asyncio.BufferedProtocol):
    """Routes transport events to a :class:`TcpLink`.

    Large payloads are received straight into the decoder's payload buffer (saving two copies
    per byte over ``data_received``); everything else lands in a small scratch buffer and is
    fed to the decoder.
    """

    _SCRATCH = 64 * 1024
    _DIRECT_MIN = 16 * 1024

    def __init__(self, link: TcpLink) -> None:
        self.link = link
        self.scratch = memoryview(bytearray(self._SCRATCH))
        self.direct = False

    def get_buffer(self, sizehint: int) -> memoryview:
        tail = self.link._decoder.payload_buffer()
        self.direct = tail is not None and len(tail) >= self._DIRECT_MIN
        return tail if self.direct else self.scratch  # type: ignore[return-value]

    def buffer_updated(self, nbytes: int) -> None:
        if self.direct:
            self.link._on_payload_bytes(nbytes)
        else:
            # bytes, so that whole small frames decode without further copies
            self.link._on_bytes(bytes(self.scratch[:nbytes]))

    def eof_received(self) -> bool:
        self.link._on_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        why = "connection closed" if exc is None else f"connection error: {exc!r}"
        self.link._fail(PeerLostError(self.link.peer, why))
        self.link._wake_drainers()

    def pause_writing(self) -> None:
        self.link._paused = True

    def resume_writing(self) -> None:
        self.link._paused = False
        self.link._wake_drainers()


class MemoryLink(Link):
    """In-memory link for tests: frames are encoded and decoded exactly as on TCP.

    ``stall()`` holds everything written (the peer sees silence) until ``unstall()``;
    ``cut(reason)`` breaks both ends as a lost connection would; ``chunk`` (if set) delivers the
    bytes in pieces of that size to exercise the decoder.
    """

    def __init__(self, peer: str, *, chunk: int | None = None, **kwargs: Any) -> None:
        super().__init__(peer, **kwargs)
        self.other: MemoryLink | None = None
        self.chunk = chunk
        self._stalled = False
        self._held: list[bytes] = []
        self._unstalled = asyncio.Event()
        self._unstalled.set()

    def _write_buffers(self, head: bytes, view: memoryview | None) -> None:
        data = head if view is None else head + view  # copy, as a socket would
        if self._stalled:
            self._held.append(data)
        else:
            self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        other = self.other
        if other is None or other._error is not None:
            return
        step = self.chunk or len(data)
        for i in range(0, len(data), step):
            other._on_bytes(data[i:i + step])

    @property
    def paused(self) -> bool:
        return bool(self._held)

    def stall(self) -> None:
        """Hold every frame written from now on (``drain`` blocks) until ``unstall``."""
        self._stalled = True
        self._unstalled.clear()

    def unstall(self) -> None:
        self._stalled = False
        held, self._held = self._held, []
        for data in held:
            self._deliver(data)
        self._unstalled.set()

    def cut(self, reason: str = "connection cut") -> None:
        """Break the connection: both ends fail with PeerLostError naming the other."""
        other = self.other
        self._on_eof(reason)
        if other is not None:
            other._on_eof(reason)

    async def drain(self) -> None:
        if self._error is not None:
            raise self._error
        if self._held:
            closed = asyncio.ensure_future(self._closed_event.wait())
            unstalled = asyncio.ensure_future(self._unstalled.wait())
            try:
                await asyncio.wait([closed, unstalled], return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
                unstalled.cancel()
        if self._error is not None:
            raise self._error

    def _close_transport(self) -> None:
        other = self.other
        self._held = []
        self._unstalled.set()
        if other is not None and other._error is None:
            # The peer sees EOF, as after a socket close.
            other._on_eof()


def memory_link_pair(a_name: str, b_name: str, **kwargs: Any) -> tuple[MemoryLink, MemoryLink]:
    """Two connected in-memory links: ``a`` talks to the peer named ``b_name`` and vice versa."""
    a, b = MemoryLink(b_name, **kwargs), MemoryLink(a_name, **kwargs)
    a.other, b.other = b, a
    return a, b


class RingLinks:
    """A peer's two ring links: ``next`` to its successor, ``prev`` to its predecessor.

    For a ring of one both are None.  For a ring of two they are two distinct connections to
    the same peer (one per direction of the ring).  Closing closes both.
    """

    def __init__(self, rank: int, size: int, next: Link | None, prev: Link | None) -> None:
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"rank {rank} out of range for ring size {size}")
        if (size == 1) != (next is None) or (size == 1) != (prev is None):
            raise ValueError("a ring of one has no links; larger rings need both")
        self.rank, self.size, self.next, self.prev = rank, size, next, prev

    @property
    def links(self) -> list[Link]:
        return [link for link in (self.next, self.prev) if link is not None]

    @property
    def up(self) -> bool:
        """True while neither link has failed."""
        return not any(link.closed for link in self.links)

    def close(self, reason: str = "closed locally") -> None:
        for link in self.links:
            link.close(reason)

    def abandon(self, exc: BaseException) -> None:
        """Leave a broken ring: tell both neighbours why and fail both links with ``exc``.

        The ``bye`` names the lost peer (when ``exc`` is a PeerLostError) and the peer that
        noticed, so a neighbour that has not noticed the loss yet reports the same peer to its
        clients, and passes the news on at once.  The lost peer itself, if this link still
        reaches it (e.g. only its link to another peer broke), is told that the peer which
        noticed lost contact with it.  Links still lent to a worker thread are aborted (their
        sockets shut down) so that a thread blocked on them wakes up.  Idempotent; never raises.
        """
        if isinstance(exc, PeerLostError):
            lost, reason = exc.peer, getattr(exc, "cause", exc.reason)
            by = getattr(exc, "reporter", None) or f"rank {self.rank}"
        else:
            lost, reason, by = None, str(exc) or type(exc).__name__, None
        err = exc if isinstance(exc, RingError) else PeerLostError(lost or "ring", reason)
        for link in self.links:
            if link.closed:
                continue
            if lost is not None and by is not None and _rank_name(link.peer) == _rank_name(lost):
                link.say_goodbye(f"{by} lost contact with you ({reason})", close=False, lost=by, by=by)
            else:
                link.say_goodbye(reason, close=False, lost=lost, by=by)
            if getattr(link, "_lent", None) is not None:
                link.abort(reason)
            link._fail(err)

    async def keepalive(self, interval: float = 1.0, dead_after: float = 5.0) -> None:
        """Keep both links alive; returns (raising the failure) as soon as either fails.

        The first failure is also the other link's failure (see :meth:`abandon`), so whoever
        waits on either link sees the same error, naming the same peer.
        """
        if not self.links:
            await asyncio.Event().wait()  # a ring of one never loses a neighbour
        async with asyncio.TaskGroup() as tg:
            for link in self.links:
                tg.create_task(link.keepalive(interval, dead_after))
            waits = [asyncio.ensure_future(link.wait_closed()) for link in self.links]
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for fut in pending:
                fut.cancel()
            first = next(iter(done)).result()
            self.abandon(first)
        raise first

    async def shutdown(self, reason: str = "shutting down", timeout: float = 5.0) -> None:
        """Leave the ring cleanly: say goodbye on both links, wait (at most ``timeout`` s) until
        both neighbours have said goodbye or closed too, then close.

        Waiting lets neighbours that are still finishing the last collective complete it: they
        only see our goodbye after they have received everything we sent.
        """
        for link in self.links:
            link.say_goodbye(reason, close=False)
        try:
            async with asyncio.timeout(timeout):
                for link in self.links:
                    await link.wait_closed()
        except TimeoutError:
            pass
        self.close(reason)

    async def __aenter__(self) -> RingLinks:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _rank_name(peer: str) -> str:
    """``"rank 2 (10.0.0.3:7000)"`` -> ``"rank 2"``: the same peer seen through two sockets."""
    return peer.split(" (", 1)[0]


def memory_ring(size: int, **kwargs: Any) -> list[RingLinks]:
    """In-memory links for a whole ring: element r is rank r's :class:`RingLinks`."""
    if size == 1:
        return [RingLinks(0, 1, None, None)]
    nexts: list[MemoryLink] = []
    prevs: list[MemoryLink] = []
    for r in range(size):
        a, b = memory_link_pair(f"rank {r}", f"rank {(r + 1) % size}", **kwargs)
        nexts.append(a)  # r -> r+1
        prevs.append(b)  # (r+1) sees it as its prev
    return [RingLinks(r, size, nexts[r], prevs[(r - 1) % size]) for r in range(size)]


_MAX_PENDING_HANDSHAKES = 16


class RingListener:
    """Rank ``rank``'s listening socket, open for the peer's whole life.

    Every incoming connection is handshaked within ``handshake_timeout`` seconds (after a TLS
    handshake, with ``ssl``), at most ``max_pending`` at once (later ones are closed unread).
    Whatever fails — bytes that are not our protocol, silence, a wrong secret, a replayed
    handshake, a different model, ring.toml or protocol version, a wrong rank — is logged with
    its reason and dropped; the running ring never notices.  Only the predecessor (rank - 1)
    is admitted, and only while we hold no live link to it: otherwise it is refused with
    ``retry`` (a duplicate rank, or a reconnect that beat our failure detection, which then
    connects again after a back-off).  An admitted link waits for :meth:`accept_prev`; a newer
    one replaces it.
    """

    def __init__(self, rank: int, size: int, *, me: HandshakeInfo, secret: bytes,
                 handshake_timeout: float = 10.0, recv_timeout: float = DEFAULT_RECV_TIMEOUT,
                 max_frame: int = DEFAULT_MAX_FRAME, ssl: _ssl.SSLContext | None = None,
                 max_pending: int = _MAX_PENDING_HANDSHAKES) -> None:
        if size < 2 or not 0 <= rank < size:
            raise ValueError(f"a listener needs a ring of 2 or more, not rank {rank} of {size}")
        self.rank, self.size, self.pred = rank, size, (rank - 1) % size
        self.me, self._secret, self.ssl = me, secret, ssl
        self.handshake_timeout, self.max_pending = handshake_timeout, max_pending
        self._link_kw = {"recv_timeout": recv_timeout, "max_frame": max_frame}
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._slot: Link | None = None  # an admitted predecessor waiting for accept_prev
        self._current: Link | None = None  # the predecessor link of the ring in use
        self._changed = asyncio.Event()
        self._handshaking = 0
        self.refused = 0  # connections dropped so far (for tests and logs)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually listened on."""
        assert self._sock is not None, "start() the listener first"
        return self._sock.getsockname()[:2]

    async def start(self, host: str | None = None, port: int | None = None, *,
                    sock: socket.socket | None = None) -> RingListener:
        """Listen on ``host:port`` (or the already bound ``sock``); returns self.

        Raises ConfigError when the address is taken (e.g. by another peer of the same rank).
        """
        if sock is None:
            try:
                family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
                sock = socket.create_server((host or "", port or 0), family=family, backlog=64)
            except OSError as exc:
                raise ConfigError(f"rank {self.rank}: cannot listen on {host}:{port}: {exc.strerror or exc} "
                                  f"(is another peer already running as rank {self.rank}?)") from None
        else:
            sock.listen(64)
        sock.setblocking(False)
        self._sock = sock
        self._accepting = asyncio.ensure_future(self._accept_loop())
        return self

    async def _accept_loop(self) -> None:
        # Our own accept loop (not asyncio.start_server) so that a failed TLS handshake reaches
        # us as an exception we can log: a server's transports handle it silently.
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # e.g. out of descriptors: log, breathe, go on
                log.warning("rank %d: accept failed: %r", self.rank, exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.ensure_future(self._on_accept(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """Stop listening, abandon handshakes in progress and drop a predecessor link that was
        never taken (idempotent)."""
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        for task in list(self._tasks):
            task.cancel()
        if self._sock is not None:
            self._sock.close()
        if self._slot is not None:
            self._slot.close("the peer stopped listening")
            self._slot = None

    async def __aenter__(self) -> RingListener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def accept_prev(self) -> Link:
        """Wait for a verified link from the predecessor and make it the current one.

        Cancellation-safe: an admitted link stays in the slot for the next call.
        """
        while True:
            link, self._slot = self._slot, None
            if link is not None and not link.closed:
                self._current = link
                return link
            self._changed.clear()
            await self._changed.wait()

    def _admit(self, peer: HandshakeInfo) -> str | None:
        cur = self._current
        if cur is not None and not cur.closed:
            quiet = time.monotonic() - cur.last_rx
            return (f"rank {self.rank} already has a live link from rank {peer.rank} (last frame "
                    f"{quiet:.1f} s ago): a duplicate rank {peer.rank}, or a reconnect before "
                    f"the old link failed; retry later")
        return None

    def _refused(self, why: object) -> None:
        self.refused += 1
        log.warning("rank %d dropped %s", self.rank, why)

    async def _on_accept(self, conn: socket.socket) -> None:
        try:
            where = conn.getpeername()
            name = f"{where[0]}:{where[1]}"
        except OSError:
            conn.close()
            return
        if self._handshaking >= self.max_pending:
            self._refused(f"connection from {name}: {self._handshaking} handshakes already in progress")
            conn.close()
            return
        self._handshaking += 1
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_STREAM_LIMIT)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            try:
                async with asyncio.timeout(self.handshake_timeout):
                    transport, _ = await loop.connect_accepted_socket(
                        lambda: protocol, conn, ssl=self.ssl,
                        ssl_handshake_timeout=self.handshake_timeout if self.ssl is not None else None)
            except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
                what = "TLS handshake failed" if self.ssl is not None else "connection failed"
                self._refused(f"connection from {name}: {what}: {exc!r}")
                conn.close()
                return
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            try:
                await self._handshake(reader, writer, name)
            except asyncio.CancelledError:
                transport.abort()
                raise
        finally:
            self._handshaking -= 1

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         name: str) -> None:
        try:
            await handshake(reader, writer, me=self.me, secret=self._secret, expect_rank=self.pred,
                            timeout=self.handshake_timeout, peer=f"connection from {name}", admit=self._admit)
        except HandshakeError as exc:
            self._refused(exc)
            return
        except OSError as exc:
            self._refused(f"connection from {name}: connection failed: {exc!r}")
            writer.close()
            return
        cls = StreamLink if self.ssl is not None else TcpLink
        link = cls(reader, writer, f"rank {self.pred} ({name})", **self._link_kw)
        if self._current is not None and not self._current.closed:  # appeared meanwhile: rare
            link.say_goodbye(f"rank {self.rank} already has a live link from rank {self.pred}")
            self._refused(f"connection from {name}: a live link from rank {self.pred} appeared during the handshake")
            return
        if self._slot is not None:
            self._slot.say_goodbye("superseded by a newer connection from the same rank")
        self._slot = link
        self._changed.set()
        log.info("rank %d: accepted rank %d from %s", self.rank, self.pred, name)


async def open_tcp_ring(rank: int, addrs: Sequence[tuple[str, int]], *, me: HandshakeInfo,
                        secret: bytes, timeout: float | None = 60.0, handshake_timeout: float = 10.0,
                        recv_timeout: float = DEFAULT_RECV_TIMEOUT,
                        listen_sock: socket.socket | None = None,
                        max_frame: int = DEFAULT_MAX_FRAME, listener: RingListener | None = None,
                        ssl_client: _ssl.SSLContext | None = None,
                        ssl_server: _ssl.SSLContext | None = None,
                        refusals_are_final: bool = True) -> RingLinks:
    """Join (or re-join) a TCP ring: connect to the successor, take the predecessor.

    ``addrs[r]`` is rank r's listening address.  With ``listener`` (a started
    :class:`RingListener` that the caller keeps for the peer's life) the predecessor comes
    from it and the ring can be formed again after every loss, while strangers keep being
    handshaked and dropped; without one, a listener on ``addrs[rank]`` (or on the already bound
    ``listen_sock``, with ``ssl_server``) is opened for this call and closed once both links
    are up.  ``ssl_client`` makes the outgoing connection TLS.

    Connection failures, handshake timeouts and refusals marked ``retry`` are retried with
    exponential back-off (50 ms .. 2 s) until ``timeout`` s have passed (None: forever), then
    PeerLostError is raised.  A refusal by the successor that is a configuration mismatch
    raises :class:`HandshakeError` when ``refusals_are_final`` (retrying cannot fix it);
    otherwise it is logged and retried, so a survivor waits until the misconfigured peer is
    fixed.  Cancellation closes everything opened by this call.
    """
    size = len(addrs)
    if size == 1:
        return RingLinks(0, 1, None, None)
    succ, pred = (rank + 1) % size, (rank - 1) % size
    link_kw = {"recv_timeout": recv_timeout, "max_frame": max_frame}
    own = listener is None
    if listener is None:
        listener = RingListener(rank, size, me=me, secret=secret, handshake_timeout=handshake_timeout,
                                ssl=ssl_server, **link_kw)
        if listen_sock is not None:
            await listener.start(sock=listen_sock)
        else:
            await listener.start(*addrs[rank])
    next_link: Link | None = None
    prev_link: Link | None = None
    try:
        async with asyncio.timeout(timeout):
            # A link that dies before both are up (e.g. its other end was still leaving an
            # older ring) is replaced quietly: failing now would close the other, live link
            # and push a neighbour that has just re-formed into another round.
            while True:
                if next_link is None or next_link.closed:
                    next_link = await _connect(addrs[succ], succ, me=me, secret=secret, ssl=ssl_client,
                                               handshake_timeout=handshake_timeout, link_kw=link_kw,
                                               refusals_are_final=refusals_are_final, rank=rank)
                if prev_link is None or prev_link.closed:
                    prev_link = await listener.accept_prev()
                if not next_link.closed and not prev_link.closed:
                    break
    except TimeoutError:
        for link in (next_link, prev_link):
            if link is not None:
                link.close()
        missing = succ if next_link is None or next_link.closed else pred
        raise PeerLostError(f"rank {missing}", f"ring not whole after {timeout:g} s") from None
    except BaseException:
        if next_link is not None:
            next_link.close()
        if prev_link is not None:
            prev_link.close()
        raise
    finally:
        if own:
            listener.close()
    return RingLinks(rank, size, next_link, prev_link)


async def _connect(addr: tuple[str, int], succ: int, *, me: HandshakeInfo, secret: bytes,
                   handshake_timeout: float, link_kw: dict[str, Any], ssl: _ssl.SSLContext | None,
                   refusals_are_final: bool, rank: int) -> Link:
    delay = 0.05
    host, port = addr
    name = f"rank {succ} ({host}:{port})"
    said = ""  # the last refusal logged, so a peer that keeps refusing is logged once
    while True:
        try:
            reader, writer = await asyncio.open_connection(
                host, port, limit=_STREAM_LIMIT, ssl=ssl,
                ssl_handshake_timeout=handshake_timeout if ssl is not None else None)
        except (OSError, TimeoutError) as exc:  # includes ssl.SSLError
            log.debug("connect to %s failed (%r); retrying", name, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            continue
        try:
            await handshake(reader, writer, me=me, secret=secret, expect_rank=succ,
                            timeout=handshake_timeout, peer=name)
        except HandshakeError as exc:
            if not getattr(exc, "retry", False) and refusals_are_final:
                raise
            if str(exc) != said:  # each distinct reason once; a mismatch is worth a warning
                said = str(exc)
                log.log(logging.INFO if getattr(exc, "retry", False) else logging.WARNING,
                        "rank %d: %s; retrying", rank, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            continue
        return (StreamLink if ssl is not None else TcpLink)(reader, writer, name, **link_kw)
