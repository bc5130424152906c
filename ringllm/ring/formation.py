"""Ring formation over TCP: a peer's listening socket, and joining (or re-joining) the ring.

:class:`RingListener` is a peer's listening socket for its whole life: it handshakes every
newcomer with a deadline, drops strangers with a logged reason, and hands the verified
predecessor to :func:`open_tcp_ring`, which (re-)forms the ring as often as it breaks.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl as _ssl
import time
from collections.abc import Sequence
from typing import Any

from ringllm.errors import ConfigError, ConfigMismatchError, HandshakeError, PeerLostError
from ringllm.ring.admission import Admission, DropLog, log_emitter
from ringllm.ring.handshake import HANDSHAKE_MAX_FRAME, HandshakeInfo, handshake
from ringllm.ring.links import DEFAULT_RECV_TIMEOUT, Link, RingLinks
from ringllm.ring.tcp import StreamLink, TcpLink
from ringllm.ring.wire import DEFAULT_MAX_FRAME

__all__ = ["FormationProgress", "RingListener", "bind_ring_port", "open_tcp_ring"]

log = logging.getLogger(__name__)

# The stream reader only serves the handshake (a link then reads the socket itself). It pauses
# the socket above 2x this many unread bytes, so an unauthenticated sender cannot make us
# buffer much more than one handshake frame.
_STREAM_LIMIT = HANDSHAKE_MAX_FRAME


def bind_ring_port(rank: int, host: str | None, port: int | None) -> socket.socket:
    """rank's ring socket, bound but not yet listening (give it to :meth:`RingListener.start`
    as ``sock``): the port is ours, while a neighbour connecting meanwhile is refused (and
    retries) rather than left waiting in a handshake nobody answers.

    Raises ConfigError when the address is taken (e.g. by another peer of the same rank)."""
    family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host or "", port or 0))
        return sock
    except OSError as exc:
        sock.close()
        raise ConfigError(f"rank {rank}: cannot listen on {host}:{port}: {exc.strerror or exc} "
                          f"(is another peer already running as rank {rank}?)") from None


class FormationProgress:
    """Whom a ring formation in progress still waits for: give one to :func:`open_tcp_ring`
    (``progress=``) and read :meth:`waiting_for` from the same event loop at any time (for
    ``/health`` and the peer's log). Empty when no formation is running."""

    def __init__(self) -> None:
        self._next: tuple[int, str, float] | None = None  # (rank, "host:port", since) until connected
        self._prev: tuple[int, str, float] | None = None
        self._listener: RingListener | None = None

    def waiting_for(self) -> list[tuple[int, str, float]]:
        """(rank, "host:port", since: time.time()) of each neighbour not linked yet."""
        out = [self._next] if self._next is not None else []
        if self._prev is not None and not (self._listener is not None and self._listener.has_prev):
            out.append(self._prev)
        return sorted(set(out))


class RingListener:
    """Rank ``rank``'s listening socket, open for the peer's whole life.

    Every incoming connection is handshaked within ``handshake_timeout`` seconds (after a TLS
    handshake, with ``ssl``); how many may run at once, per source address and for hosts that
    are not in ``peer_hosts`` (the configured peers' hosts), is :class:`Admission`'s rule
    (later ones are closed unread), so a flood from elsewhere cannot starve a neighbour.
    Whatever fails — bytes that are not our protocol, silence, a wrong secret, a replayed
    handshake, a different model, ring.toml or protocol version, a wrong rank — is logged with
    its reason and dropped (rate-limited: :class:`DropLog`); the running ring never notices.  Only the predecessor (rank - 1)
    is admitted, and only while we hold no live link to it: otherwise it is refused with
    ``retry`` (a duplicate rank, or a reconnect that beat our failure detection, which then
    connects again after a back-off).  An admitted link waits for :meth:`accept_prev`; a newer
    one replaces it.
    """

    def __init__(self, rank: int, size: int, *, me: HandshakeInfo, secret: bytes,
                 handshake_timeout: float = 10.0, recv_timeout: float = DEFAULT_RECV_TIMEOUT,
                 max_frame: int = DEFAULT_MAX_FRAME, ssl: _ssl.SSLContext | None = None,
                 peer_hosts: Sequence[str] = (), admission: Admission | None = None) -> None:
        if size < 2 or not 0 <= rank < size:
            raise ValueError(f"a listener needs a ring of 2 or more, not rank {rank} of {size}")
        self.rank, self.size, self.pred = rank, size, (rank - 1) % size
        self.me, self._secret, self.ssl = me, secret, ssl
        self.handshake_timeout = handshake_timeout
        self.admission = admission if admission is not None else Admission(peer_hosts)
        self.drops = DropLog(log_emitter(log, rank))
        self._link_kw = {"recv_timeout": recv_timeout, "max_frame": max_frame}
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Future[None] | None = None
        self._ticker: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._slot: Link | None = None  # an admitted predecessor waiting for accept_prev
        self._current: Link | None = None  # the predecessor link of the ring in use
        self._changed = asyncio.Event()
        self._mismatched = asyncio.Event()
        self.mismatch: ConfigMismatchError | None = None  # the first one an admitted peer showed
        self.refused = 0  # connections dropped so far (for tests and logs)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually listened on."""
        assert self._sock is not None, "start() the listener first"
        return self._sock.getsockname()[:2]

    @property
    def has_prev(self) -> bool:
        """Whether a verified link from the predecessor is waiting for accept_prev or in use."""
        return any(link is not None and not link.closed for link in (self._slot, self._current))

    async def start(self, host: str | None = None, port: int | None = None, *,
                    sock: socket.socket | None = None) -> RingListener:
        """Listen on ``host:port`` (or the already bound ``sock``); returns self.

        Raises ConfigError when the address is taken (e.g. by another peer of the same rank).
        """
        if sock is None:
            sock = bind_ring_port(self.rank, host, port)
        try:
            sock.listen(64)
        except OSError as exc:  # bound while another socket started listening on the port
            where = sock.getsockname()
            sock.close()
            raise ConfigError(f"rank {self.rank}: cannot listen on {where[0]}:{where[1]}: {exc.strerror or exc} "
                              f"(is another peer already running as rank {self.rank}?)") from None
        sock.setblocking(False)
        self._sock = sock
        self._accepting = asyncio.ensure_future(self._accept_loop())
        self._ticker = asyncio.ensure_future(self._tick_drops())
        return self

    async def _tick_drops(self) -> None:
        while True:  # a summary of held drop lines is written even when the flood stops
            await asyncio.sleep(self.drops.every / 2)
            self.drops.tick()

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
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
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

    async def wait_mismatch(self) -> ConfigMismatchError:
        """Wait until an authenticated peer is refused for a configuration mismatch; return it."""
        await self._mismatched.wait()
        assert self.mismatch is not None
        return self.mismatch

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
        self.drops.drop(str(why), str(why))

    async def _on_accept(self, conn: socket.socket) -> None:
        try:
            where = conn.getpeername()
            host, name = where[0], f"{where[0]}:{where[1]}"
        except OSError:
            conn.close()
            return
        if busy := self.admission.enter(host):
            self._refused(f"connection from {name}: {busy}")
            conn.close()
            return
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
            self.admission.leave(host)

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         name: str) -> None:
        try:
            await handshake(reader, writer, me=self.me, secret=self._secret, initiator=False,
                            expect_rank=self.pred, timeout=self.handshake_timeout,
                            peer=f"connection from {name}", admit=self._admit)
        except HandshakeError as exc:
            self._refused(exc)
            if isinstance(exc, ConfigMismatchError) and self.mismatch is None:
                self.mismatch = exc
                self._mismatched.set()
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
                        refusals_are_final: bool = True,
                        progress: FormationProgress | None = None) -> RingLinks:
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
    raises :class:`HandshakeError` when ``refusals_are_final`` (retrying cannot fix it), and so
    does a :class:`ConfigMismatchError` our listener finds with an authenticated peer meanwhile
    (a 4-peer ring.toml against a 3-peer ring: the successor may never come up at all);
    otherwise it is logged and retried, so a survivor waits until the misconfigured peer is
    fixed.  Cancellation closes everything opened by this call.  ``progress`` says meanwhile
    whom the call still waits for.
    """
    size = len(addrs)
    if size == 1:
        return RingLinks(0, 1, None, None)
    succ, pred = (rank + 1) % size, (rank - 1) % size
    link_kw = {"recv_timeout": recv_timeout, "max_frame": max_frame}
    own = listener is None
    if listener is None:
        listener = RingListener(rank, size, me=me, secret=secret, handshake_timeout=handshake_timeout,
                                ssl=ssl_server, peer_hosts=[h for h, _ in addrs], **link_kw)
        if listen_sock is not None:
            await listener.start(sock=listen_sock)
        else:
            await listener.start(*addrs[rank])
    next_link: Link | None = None
    prev_link: Link | None = None
    progress = progress or FormationProgress()
    now = time.time()
    progress._listener = listener
    waiting_next = (succ, f"{addrs[succ][0]}:{addrs[succ][1]}", now)
    progress._prev = (pred, f"{addrs[pred][0]}:{addrs[pred][1]}", now)
    # Joining for the first time, a mismatch our listener finds is as final as one the
    # successor reports: the peer that connected to us is configured differently.
    watch = asyncio.ensure_future(listener.wait_mismatch()) if refusals_are_final else None
    try:
        async with asyncio.timeout(timeout):
            # A link that dies before both are up (e.g. its other end was still leaving an
            # older ring) is replaced quietly: failing now would close the other, live link
            # and push a neighbour that has just re-formed into another round.
            while True:
                if next_link is None or next_link.closed:
                    progress._next = waiting_next
                    next_link = await _unless(watch, _connect(
                        addrs[succ], succ, me=me, secret=secret, ssl=ssl_client, handshake_timeout=handshake_timeout,
                        link_kw=link_kw, refusals_are_final=refusals_are_final, rank=rank))
                    progress._next = None
                if prev_link is None or prev_link.closed:
                    prev_link = await _unless(watch, listener.accept_prev())
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
        progress._next = progress._prev = progress._listener = None
        if watch is not None:
            watch.cancel()
        if own:
            listener.close()
    return RingLinks(rank, size, next_link, prev_link)


async def _unless(watch: asyncio.Future[ConfigMismatchError] | None, coro: Any) -> Any:
    """Await ``coro``; but if ``watch`` completes first, cancel it and raise what it returned."""
    if watch is None:
        return await coro
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is None:
        task.result().close()  # a link made in the same instant: not ours to keep
    raise watch.result()


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
            await handshake(reader, writer, me=me, secret=secret, initiator=True, expect_rank=succ,
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
