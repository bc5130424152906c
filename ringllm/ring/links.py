"""The link contract: a bidirectional frame link to one ring neighbour, and a peer's pair.

A :class:`Link` moves frames (see ``wire.py``) to and from one peer.  Received frames go to an
inbox as bytes arrive, so a link never stops reading while its owner is busy writing (no
flow-control deadlock when every peer of a ring writes at once), EOF is noticed at once even on
an idle link, and ``ping`` frames are answered without the owner's help.  Transports subclass
it: ``tcp.py`` (TCP/TLS over asyncio, and lending a TCP socket to the compute thread) and
``memory.py`` (the in-memory double for tests); ``formation.py`` forms a ring of TCP links.
:class:`RingLinks` is one peer's two links, ``next`` and ``prev``.

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
import time
from typing import Any, Protocol

from ringllm.errors import LocalProtocolError, PeerLostError, RemoteProtocolError, RingError
from ringllm.ring.wire import DEFAULT_MAX_FRAME, Frame, FrameDecoder, encode_frame

__all__ = ["DEFAULT_RECV_TIMEOUT", "Lent", "Link", "RingLinks", "goodbye_error", "write_chunks"]

DEFAULT_RECV_TIMEOUT = 30.0
# Frames with a payload up to this size are written as one buffer (one syscall, one segment
# with TCP_NODELAY); larger payloads are written separately to avoid copying them into a join.
JOIN_MAX = 64 * 1024
# Received bytes land in a scratch buffer of this size and are fed to the decoder, except the
# rest of a payload of at least DIRECT_MIN bytes, which is received straight into place (two
# copies per byte fewer than feeding it; below 16 KiB the saving did not pay for the extra
# read call).
SCRATCH_BYTES = 64 * 1024
DIRECT_MIN = 16 * 1024


def write_chunks(head: bytes, view: bytes | memoryview | None) -> tuple[bytes | memoryview, ...]:
    """What to write for one frame (``view`` a flat byte buffer): small frames as one buffer
    (one syscall, one segment with TCP_NODELAY), large payloads apart so they are not copied
    into a join."""
    if view is None:
        return (head,)
    if len(view) <= JOIN_MAX:
        return (head + view,)
    return (head, view)


class Lent(Protocol):
    """What the event loop may do with a link lent to a worker thread (see ``tcp.py``)."""

    def ping_from_loop(self) -> None: ...


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
        # The worker thread's handle while the link is lent to one (see tcp.py), else None.
        self.lent: Lent | None = None
        self._scratch: memoryview | None = None

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

    def fail(self, exc: Exception) -> None:
        """Record the first failure, wake a waiting ``recv`` and release the transport
        (idempotent: a later failure is ignored)."""
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
        self.fail(PeerLostError(self.peer, reason))

    def abort(self, reason: str) -> None:
        """Close at once, also waking a worker thread blocked on a lent socket (idempotent)."""
        self.close(reason)

    # -- receiving: what transports call ------------------------------------------------------
    def receive_buffer(self) -> tuple[memoryview, bool]:
        """Where a transport should receive the next bytes, and whether that is the payload's
        own buffer (``direct``): the unfilled rest of a payload of DIRECT_MIN bytes or more,
        else a scratch buffer.  Report what arrived with :meth:`decode_received`."""
        tail = self._decoder.payload_buffer()
        if tail is not None and len(tail) >= DIRECT_MIN:
            return tail, True
        if self._scratch is None:
            self._scratch = memoryview(bytearray(SCRATCH_BYTES))
        return self._scratch, False

    def decode_received(self, n: int, direct: bool) -> list[Frame]:
        """Decode ``n`` bytes received into :meth:`receive_buffer`; return the frames they
        complete.  Raises the decoder's RemoteProtocolError (it does not fail the link)."""
        self.last_rx = time.monotonic()
        if direct:
            return self._decoder.payload_received(n)
        # bytes, so that whole small frames decode without further copies
        return self._decoder.feed(bytes(self._scratch[:n]))  # type: ignore[index]

    def decode(self, data: bytes) -> list[Frame]:
        """Decode bytes received some other way (see :meth:`decode_received`)."""
        self.last_rx = time.monotonic()
        return self._decoder.feed(data)

    @property
    def at_frame_start(self) -> bool:
        """True when no byte of a next frame has been decoded yet."""
        return self._decoder.at_frame_start

    def file(self, frames: list[Frame]) -> tuple[list[Frame], Frame | None]:
        """Put received data frames in the inbox for ``recv``; return the pings among them
        (for the caller to answer or not) and the first ``bye`` (the frames after it are
        dropped: the peer has left).  ``pong`` frames only prove the peer is alive."""
        pings: list[Frame] = []
        for frame in frames:
            kind = frame.kind
            if kind == "ping":
                pings.append(frame)
            elif kind == "bye":
                return pings, frame
            elif kind != "pong":
                self._inbox.append(frame)
        return pings, None

    def expect(self, head: bytes, kind: str, header: dict[str, Any]) -> None:
        """Tell the decoder the kind and header behind frame head bytes we encoded ourselves,
        so that a frame arriving with exactly those bytes skips parsing them
        (``FrameDecoder.expect``): the loop's exchange all-reduce, ~2 us a frame."""
        self._decoder.expect(head, kind, header)

    @property
    def between_frames(self) -> bool:
        """True when the inbox is empty and no byte of a next frame has been decoded: the next
        bytes on the wire begin a frame nobody has seen (what ``recv_expected`` needs)."""
        return not self._inbox and self._decoder.at_frame_start

    @property
    def has_frame(self) -> bool:
        """True when ``recv`` would return a frame at once."""
        return bool(self._inbox)

    def pop_frame(self) -> Frame:
        """The oldest received frame (only when :attr:`has_frame`)."""
        return self._inbox.popleft()

    def feed(self, data: bytes) -> None:
        """Decode received bytes and act on the frames (the event loop's transports)."""
        if self._error is not None:
            return
        try:
            frames = self.decode(data)
        except RemoteProtocolError as exc:
            self.fail(RemoteProtocolError(f"from peer {self.peer}: {exc}"))
            return
        self._route(frames)

    def feed_received(self, n: int, direct: bool) -> None:
        """:meth:`feed` for ``n`` bytes received into :meth:`receive_buffer`."""
        if self._error is not None:
            return
        try:
            frames = self.decode_received(n, direct)
        except RemoteProtocolError as exc:
            self.fail(RemoteProtocolError(f"from peer {self.peer}: {exc}"))
            return
        self._route(frames)

    def _route(self, frames: list[Frame]) -> None:
        """Answer pings, fail on a bye, wake whoever waits for the frames filed."""
        pings, bye = self.file(frames)
        for ping in pings:
            try:
                self._write_frame("pong", ping.header, None)
            except RingError:
                pass  # the link is going down; recv will report why
        if bye is not None:
            self.fail(goodbye_error(self.peer, bye.header))
            return
        self._wake_receiver()

    def _wake_receiver(self) -> None:
        if self._inbox:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            if self._incoming_waiters:
                self._wake_incoming()

    def eof(self, reason: str = "connection closed by peer (EOF)") -> None:
        """The peer closed the connection (transports call this)."""
        self.fail(PeerLostError(self.peer, reason))

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
            self.fail(PeerLostError(self.peer, f"no frame within {self._delay:g} s"))
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

    def write_head(self, head: bytes, payload: Any) -> None:
        """Queue one frame whose prefix and header are already encoded (``wire.head_template``)
        for ``payload``, a flat byte buffer (``bytes``, or a memoryview from
        ``wire.as_bytes_view`` or a received frame); as :meth:`write` otherwise."""
        if self._error is not None:
            raise self._error
        self.last_tx = time.monotonic()
        self.bytes_sent += len(head) + len(payload)
        self._write_buffers(head, payload)

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

    def _write_buffers(self, head: bytes, view: bytes | memoryview | None) -> None:
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
                lent = self.lent
                if lent is not None:
                    # A worker thread owns the socket and judges silence itself when it waits
                    # (it is the only reader).  Ping anyway: the thread may be computing for
                    # longer than the neighbour's dead_after without sending anything.
                    if now - self.last_tx >= interval * 0.9:
                        lent.ping_from_loop()
                    continue
                if now - self.last_rx > dead_after:
                    self.fail(PeerLostError(self.peer, f"silent for {now - self.last_rx:.1f} s"))
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
        if self._error is None and self.lent is None:
            header = {"reason": reason[:1000]}
            if lost is not None:
                header |= {"lost": lost[:200], "by": (by or "")[:200]}
            try:
                self._write_frame("bye", header, None)
            except RingError:
                pass
        if close:
            self.close(reason if lost is None else f"lost peer {lost}: {reason}")


def goodbye_error(peer: str, header: dict[str, Any]) -> PeerLostError:
    """The failure a ``bye`` from ``peer`` means (see :meth:`RingLinks.abandon`)."""
    lost, reason, by = header.get("lost"), header["reason"], header.get("by")
    if type(lost) is str and lost:
        by = by if type(by) is str and by else peer
        err = PeerLostError(lost, f"{reason} (reported by {by})")
        # Kept apart so the news can be passed on without growing at every hop.
        err.reporter, err.cause = by, reason  # type: ignore[attr-defined]
        return err
    return PeerLostError(peer, f"peer said goodbye: {reason}")


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
            if link.lent is not None:
                link.abort(reason)
            link.fail(err)

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
