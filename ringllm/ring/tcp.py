"""Links over TCP (and TLS) on the event loop, and lending a TCP socket to the compute thread.

:class:`StreamLink` is a :class:`~ringllm.ring.links.Link` over an asyncio transport (TCP or
TLS), which it reads itself as the transport's protocol.  :class:`TcpLink` (plain TCP) can
also be lent to a worker thread (:meth:`TcpLink.lend`): the thread then drives the socket
itself through a :class:`BlockingLink`, with no event-loop round trip; the lent links of one
thread share a :class:`Pump`.  :func:`lend_ring` / :func:`take_back_ring` lend and take back a
peer's two links at once.  TLS links are never lent: the TLS state lives in the event loop's
transport.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading
import time
from typing import Any

from ringllm.errors import LocalProtocolError, PeerLostError, RemoteProtocolError
from ringllm.ring.links import JOIN_MAX, Link, RingLinks, goodbye_error, write_chunks
from ringllm.ring.wire import Frame, encode_frame, encode_frame_bytes

__all__ = ["BlockingLink", "Pump", "StreamLink", "TcpLink", "lend_ring", "take_back_ring"]

# BlockingLink.recv_expected waits this long at most before leaving a frame to the general
# path (the caller's recv then applies the link's deadline and silence rules).
_EXPECT_WAIT = 0.05


class StreamLink(Link, asyncio.BufferedProtocol):
    """A link over a TCP (or TLS) connection that has passed the handshake.  Sets TCP_NODELAY.

    Built from the handshake's asyncio stream pair, then takes the transport over as its
    (buffered) protocol: received bytes go straight into the decoder (no reader task, no
    StreamReader copy), which measured ~2x cheaper per small frame; large payloads are received
    straight into place (see ``Link.receive_buffer``).  Bytes the
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
        self._direct = False  # the last receive_buffer was the payload's own
        self._drain_waiters: list[asyncio.Future[None]] = []
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Hand-over: stop the stream protocol, take what it buffered, then read ourselves.
        transport.pause_reading()
        leftover = reader._buffer  # noqa: SLF001 - asyncio's: bytes already read off the socket
        data = bytes(leftover)
        leftover.clear()
        transport.set_protocol(self)
        if data:
            self.feed(data)
        if reader.at_eof():
            self.eof()
        elif self._error is None:
            transport.resume_reading()

    @property
    def paused(self) -> bool:
        return self._paused

    def _write_buffers(self, head: bytes, view: bytes | memoryview | None) -> None:
        transport = self._transport
        if transport.is_closing():
            self.eof("connection closed")
            raise self._error  # type: ignore[misc]
        for chunk in write_chunks(head, view):
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

    # -- asyncio.BufferedProtocol: the transport's events ---------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        buf, self._direct = self.receive_buffer()
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        self.feed_received(nbytes, self._direct)

    def eof_received(self) -> bool:
        self.eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        why = "connection closed" if exc is None else f"connection error: {exc!r}"
        self.fail(PeerLostError(self.peer, why))
        self._wake_drainers()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drainers()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until the transport has handed every queued byte to the kernel."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.recv_timeout if timeout is None else timeout)
        while self._error is None and self._transport.get_write_buffer_size():
            if loop.time() > deadline:
                self.fail(PeerLostError(self.peer, "send buffer did not empty"))
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
        if self.lent is not None:
            raise LocalProtocolError(f"the link to {self.peer} is already lent")
        if self._transport.get_write_buffer_size():
            raise LocalProtocolError(f"flush the link to {self.peer} before lending it")
        self._transport.pause_reading()
        fd = self._transport.get_extra_info("socket").fileno()
        lent = self.lent = BlockingLink(self, socket.socket(fileno=os.dup(fd)), pump)
        return lent

    def take_back(self) -> None:
        """End a loan (loop thread only, after the worker thread is done with the link).

        A failure the thread met becomes the link's failure; otherwise reading resumes and
        frames the thread received but did not consume are still returned by ``recv``.
        """
        lent, self.lent = self.lent, None
        if not isinstance(lent, BlockingLink):
            return
        with lent.wlock:
            tail, lent.tail = lent.tail, b""
            lent.sock.close()  # our duplicate descriptor only
        if lent.error is not None:
            self.fail(lent.error)
        elif self._error is None:
            if tail:
                self._transport.write(tail)  # the rest of a ping sent from the loop
            # Nobody read the socket while the thread computed: give the neighbour a fresh
            # dead_after window rather than judging it by our own pause.
            self.last_rx = max(self.last_rx, time.monotonic())
            self._transport.resume_reading()
            self._wake_receiver()


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
        owner = link.link
        silent_limit = owner.dead_after
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
                    quiet_since = max(start, owner.last_rx)
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
                if ready or (not write and owner.has_frame):
                    return
        finally:
            if write:
                self._poll.modify(link.fd, select.POLLIN)


class BlockingLink:
    """A lent :class:`TcpLink`, driven synchronously by one worker thread.

    ``write``/``write_head`` send whole frames and ``recv_now``/``recv_expected`` block the
    thread (in ``poll``), so the collectives' lent driver runs a whole collective in the thread
    with no event-loop round trip: this removes the two cross-thread wake-ups per call of
    ``run_coroutine_threadsafe``.  Decodes into the link's own decoder and inbox (through
    ``Link``'s receive-side methods), so no byte or frame is lost across a loan.  While lent,
    pings are not answered (any frame keeps a neighbour's keepalive happy) and errors raise at
    once; :meth:`TcpLink.take_back` turns them into the link's failure.

    Writes hold ``wlock`` for a whole frame, so the event loop can slip a ``ping`` in between
    (:meth:`ping_from_loop`) while the thread computes; a ping the kernel took only in part
    leaves its ``tail``, which the next writer sends first.
    """

    def __init__(self, link: TcpLink, sock: socket.socket, pump: Pump) -> None:
        self.link, self.sock, self.pump = link, sock, pump
        self.peer, self.recv_timeout, self.max_frame = link.peer, link.recv_timeout, link.max_frame
        self.fd = sock.fileno()
        self.error: Exception | None = None
        self.wlock = threading.Lock()
        self.tail = b""
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
        self.write_encoded(*write_chunks(head, view))

    def write_head(self, head: bytes, payload: bytes | memoryview) -> None:
        """Send one frame whose prefix and header are already encoded (``wire.head_template``);
        ``payload`` is a flat byte buffer (``bytes``, or a memoryview from ``wire.as_bytes_view``
        or a received frame), so the lent all-reduce joins it here without converting again.
        Written out rather than through ``links.write_chunks`` and ``_sendall`` (the same join
        and send): on this hot path the two calls cost 4-8 us per P=3 all-reduce (one
        side-by-side bench/allreduce.py run)."""
        if len(payload) <= JOIN_MAX:
            self.write_encoded(head + payload)
        else:
            self.write_encoded(head, payload)

    def write_encoded(self, *chunks: bytes | memoryview) -> None:
        """Send one frame already encoded (by ``wire.encode_frame``), in one or more chunks."""
        if self.error is not None:
            raise self.error
        with self.wlock:
            if self.tail:  # the rest of a ping the loop sent in part goes first
                tail, self.tail = self.tail, b""
                self._sendall(tail)
            for chunk in chunks:
                size = len(chunk)
                self.link.bytes_sent += size
                try:  # the usual case first: the whole chunk in one send (no memoryview, no loop)
                    sent = self.sock.send(chunk)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    raise self.lost(f"connection error: {exc!r}") from None
                if sent < size:
                    self._sendall(memoryview(chunk)[sent:])
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

    def recv_now(self, timeout: float | None = None) -> Frame:
        """The next frame, blocking the thread (deadline ``timeout`` or the link's recv timeout)."""
        link = self.link
        if not link.has_frame:
            if self.error is not None:
                raise self.error
            delay = self.recv_timeout if timeout is None else timeout
            self.pump.wait(self, write=False, deadline=time.monotonic() + delay)
        return link.pop_frame()

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
        if self.error is not None or not link.between_frames:
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
            self._route(self._decode(link.decode, bytes(buf[:got])))
        return None

    def read_some(self) -> None:
        """Read what the socket has into the decoder; file the frames (Pump only)."""
        if self.error is not None:
            raise self.error
        link = self.link
        buf, direct = link.receive_buffer()
        try:
            n = self.sock.recv_into(buf)
        except BlockingIOError:
            return
        except OSError as exc:
            raise self.lost(f"connection error: {exc!r}") from None
        if n == 0:
            raise self.lost("connection closed by peer (EOF)")
        self._route(self._decode(link.decode_received, n, direct))

    def _decode(self, decode: Any, *args: Any) -> list[Frame]:
        try:
            return decode(*args)
        except RemoteProtocolError as exc:
            self.error = RemoteProtocolError(f"from peer {self.peer}: {exc}")
            raise self.error from None

    def _route(self, frames: list[Frame]) -> None:
        """File the frames; a ``bye`` is this link's failure, raised at once (pings are not
        answered while lent: any frame keeps a neighbour's keepalive happy)."""
        _, bye = self.link.file(frames)
        if bye is not None:
            if self.error is None:
                self.error = goodbye_error(self.peer, bye.header)
            raise self.error


async def lend_ring(links: RingLinks) -> tuple[BlockingLink, BlockingLink] | None:
    """Lend a peer's two links to the calling worker thread-to-be: ``(next, prev)`` as
    :class:`BlockingLink` sharing one :class:`Pump`, or None (nothing lent) unless both are
    :class:`TcpLink`.  Flushes them first; on the loop's thread, between collectives."""
    pair = (links.next, links.prev)
    if not all(isinstance(link, TcpLink) for link in pair):
        return None
    tcp = [link for link in pair if isinstance(link, TcpLink)]
    for link in tcp:
        await link.flush()
    pump = Pump()
    lent: list[BlockingLink] = []
    try:
        for link in tcp:
            lent.append(link.lend(pump))
    except BaseException:
        for link in tcp[:len(lent)]:
            link.take_back()
        raise
    return lent[0], lent[1]


def take_back_ring(lent: tuple[BlockingLink, BlockingLink]) -> None:
    """End :func:`lend_ring` (loop thread, after the worker is done)."""
    for blocking in lent:
        blocking.link.take_back()
