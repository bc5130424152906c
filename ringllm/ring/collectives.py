"""Masterless collectives over the ring: all-reduce (sum), all-gather, broadcast.

Every peer must call the same collectives in the same order with matching arguments (lockstep).
Each call takes the next sequence number; every frame carries it (``s``), the op code (``o``)
and the frame's index on its link within the call (``i``), so a peer that is out of step is a
:class:`RemoteProtocolError` naming it, never silent corruption.

All-reduce algorithms (chosen by message size, identically on every peer):

* ``exchange`` (small messages, decode): every peer's whole vector travels both ways round the
  ring: ``P // 2`` hops clockwise (to ``next``) and ``(P - 1) // 2`` hops counter-clockwise, each
  peer forwarding what it receives, so after ``ceil((P-1)/2)`` hops every peer holds all P
  vectors and sums them in rank order 0..P-1.
* ``ring`` (large messages, prefill): reduce-scatter then all-gather around the ring (the
  vector cut into P segments), each segment sent in chunks so that forwarding chunk k overlaps
  receiving chunk k+1; per-peer traffic 2(P-1)/P of the message.  Segment j is summed in ring
  order starting at rank j; its final owner (rank j-1) sends the result's bytes on unchanged.

Both give bit-identical results on every peer.  With ``wire="q8_0"`` vectors travel as GGML
Q8_0 blocks, a pass over the value and one over its rounding error (see ``codec.py``), and
every peer, the sender included, uses the dequantized values; the ring algorithm requantizes
partial sums at each hop (P-1 roundings instead of 1).

Each collective is written once, as a program (see ``Program``) that two drivers run: on the
event loop over the links' ``recv`` coroutines, or in a worker thread over links lent to it
(blocking socket I/O, see :meth:`Collectives.lend_to_thread`).

Error contract: a collective that raises (PeerLostError, RemoteProtocolError, timeout) or is
cancelled leaves the ring out of step; the object then refuses every later call with the same
error.  Re-form the ring and build a new :class:`Collectives`.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

import numpy as np

from ringllm.errors import LocalProtocolError, RemoteProtocolError, RingError
from ringllm.ring.codec import CODECS, QK8_0, Codec, hadamard_rotate
from ringllm.ring.links import JOIN_MAX, RingLinks
from ringllm.ring.schedule import (NEXT, PREV, Want, check_frame, chunks, exchange_plan, expected_header,
                                   head_templates, segments, want)
from ringllm.ring.tcp import BlockingLink, lend_ring, take_back_ring
from ringllm.ring.wire import Frame, as_bytes_view

__all__ = ["CHUNK_ELEMS", "SMALL_MAX_ELEMS", "Collectives"]

F32 = np.dtype(np.float32)
_EXACT = CODECS["f32"]  # the codec of allreduce(exact=True)

# Largest all-reduce (in float32 elements) that uses the exchange algorithm, per ring size.
# Measured with bench/allreduce.py on 127.0.0.1 (docs/protocol.md, "Crossover"): for P=2 the
# exchange moves the same bytes as the ring in half the hops and won at every size up to 1M
# floats; P=3 crossed between 128K and 512K floats, P=4 between 32K and 64K.  Larger rings use
# an extrapolated value (not measured: P=5 on the 2-core bench box is all oversubscription).
SMALL_MAX_ELEMS: dict[int, int] = {2: 1 << 62, 3: 1 << 18, 4: 1 << 15}
SMALL_MAX_DEFAULT = 1 << 14
# Elements per frame in the ring algorithm (a multiple of the Q8_0 block): 512 KiB of float32.
# Smaller chunks pipeline more finely but cost more per-frame overhead; on the loopback bench
# 64K..512K elements were within the noise of each other.
CHUNK_ELEMS = 1 << 17
BCAST_CHUNK_BYTES = 1 << 18
MAX_BCAST_BYTES = 1 << 36  # refuse to allocate more for a broadcast a peer announces
# uvloop keeps a reference to a written buffer it could not send at once (asyncio copies it),
# so a caller's array could still be in flight after a collective returns.  Payloads up to
# this size are copied by the link anyway (joined with their header).  A call that sent a
# larger caller-owned buffer flushes its links before returning, unless the algorithm already
# guarantees delivery (the ring's reduce-scatter: our last frame in depends on the successor
# having read all of ours).  Flushing is usually free: by then the peers have read our data.
BORROW_MAX = 64 * 1024
# How long a compute thread that drives the sockets itself (lent links) re-tries a read before
# it sleeps in poll, when it may (``Collectives.spin``). Sleeping costs a thread wake-up on
# the reply (~50 us on the bench VM, more after a long sleep) and leaves the core cold; at P=2
# a decode all-reduce mostly waits 0.05-0.3 ms for the other peer. 2 ms covers those waits
# and bounds what a long prefill on another peer costs in spinning.
SPIN_SECONDS = 0.002

# A collective as the I/O-free code both drivers run: a generator that writes frames to
# ``Collectives._io`` (the links of the call, next then prev), yields the Want for each frame
# it needs and is sent that frame, checked (only its payload when the Want carried the
# frame's head); it returns the collective's result.
Program = Generator[Want, Frame, Any]


class Collectives:
    """Collectives for one peer of a ring of ``size`` (see the module docstring).

    ``wire`` is ``"f32"`` (exact bytes) or ``"q8_0"`` (GGML Q8_0 for all-reduce payloads;
    all-gather and broadcast are always exact).  ``small_max_elems`` overrides the measured
    crossover (``0`` forces the ring algorithm, a huge value the exchange).  Calls must not
    overlap: await one before starting the next.  ``spin`` lets a thread driving lent links
    busy-wait briefly for exchange frames (see SPIN_SECONDS).

    Every collective is written once, as a program (see ``Program``) run by one of two
    drivers: :meth:`_run` on the event loop over the links' coroutines, or :meth:`_run_lent`
    in a worker thread over blocking lent links (see :meth:`lend_to_thread`).
    """

    def __init__(self, rank: int, size: int, links: RingLinks, wire: str = "f32", *,
                 small_max_elems: int | None = None, chunk_elems: int = CHUNK_ELEMS,
                 spin: bool = False) -> None:
        if (links.rank, links.size) != (rank, size):
            raise ValueError(f"links are for rank {links.rank}/{links.size}, not {rank}/{size}")
        if wire not in CODECS:
            raise ValueError(f"wire format must be one of {sorted(CODECS)}, not {wire!r}")
        if chunk_elems <= 0 or chunk_elems % QK8_0:
            raise ValueError(f"chunk_elems must be a positive multiple of {QK8_0}")
        self.rank, self.size, self.links, self.wire = rank, size, links, wire
        self.codec: Codec = CODECS[wire]
        self.small_max_elems = (SMALL_MAX_ELEMS.get(size, SMALL_MAX_DEFAULT)
                                if small_max_elems is None else small_max_elems)
        self.chunk_elems = chunk_elems
        self._plan = exchange_plan(rank, size) if size > 1 else ()  # the exchange's hops
        # Busy-wait (up to SPIN_SECONDS) for exchange frames on lent links instead of sleeping:
        # only right when this peer's waiting thread has a core of its own (see Peer).
        self.spin = spin
        self.seq = 0
        self._broken: BaseException | None = None
        self._busy = False
        # The links lent to a worker thread (next, prev); () for a ring of one; None: not lent.
        self._lent: tuple[BlockingLink, ...] | None = None
        self._io: tuple[Any, ...] = ()  # the links the running call writes to (next, prev)
        self._borrowed = False  # this call sent caller memory: flush before returning
        try:
            self.loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None  # bound on the first async call

    def algorithm(self, n: int) -> str:
        """The all-reduce algorithm used for ``n`` elements: ``"exchange"`` or ``"ring"``."""
        return "exchange" if n <= self.small_max_elems else "ring"

    # -- public ops ---------------------------------------------------------------------------
    async def allreduce(self, x: np.ndarray, *, exact: bool = False) -> np.ndarray:
        """Element-wise sum of every peer's ``x`` (float32, any shape; same shape everywhere).

        Returns a new float32 array of ``x``'s shape, bit-identical on every peer.  P=1 returns
        a copy of ``x`` without I/O (and without quantization).  ``exact=True`` sends float32
        whatever the wire format (every peer must pass the same value): for sums that are
        really one peer's vector plus zeros, such as the vocab-parallel embedding, where 8-bit
        rounding would add error and save little.
        """
        x = _contiguous(x, F32)
        if self.size == 1:
            return x.copy()
        codec = _EXACT if exact else self.codec
        if codec.rotate:  # sum in the rotated domain (see hadamard_rotate)
            flat = hadamard_rotate(x.reshape(-1))
            return hadamard_rotate(await self._run(self._allreduce_program(flat.size), flat, codec))[: x.size].reshape(x.shape)
        return (await self._run(self._allreduce_program(x.size), x.reshape(-1), codec)).reshape(x.shape)

    async def allgather(self, x: np.ndarray) -> list[np.ndarray]:
        """Every peer's array, indexed by rank (exact bytes; shapes/dtypes may differ by rank).

        Object dtypes are refused.  The returned arrays are fresh (or read-only views of received
        buffers) and never alias ``x``.
        """
        x = _contiguous(x)
        if x.dtype.hasobject:
            raise LocalProtocolError("cannot all-gather an object array")
        if self.size == 1:
            return [x.copy()]
        return await self._run(self._allgather, x)

    async def broadcast(self, x: np.ndarray | None, root: int) -> np.ndarray:
        """Rank ``root``'s array on every peer (exact bytes).  Other ranks may pass None.

        Returns a new array (a copy at the root).
        """
        x = self._broadcast_input(x, root)
        if self.size == 1:
            return x.copy()  # type: ignore[union-attr]
        return await self._run(self._broadcast, x, root)

    def _broadcast_input(self, x: np.ndarray | None, root: int) -> np.ndarray | None:
        if not 0 <= root < self.size:
            raise LocalProtocolError(f"broadcast root {root} out of range for {self.size} peers")
        if self.rank != root:
            return x
        if x is None:
            raise LocalProtocolError("the broadcast root must pass an array")
        x = _contiguous(x)
        if x.dtype.hasobject:
            raise LocalProtocolError("cannot broadcast an object array")
        return x

    # -- calls from a worker thread (the model's compute thread) ---------------------------
    async def lend_to_thread(self) -> bool:
        """Let a worker thread drive the ring's sockets itself until :meth:`take_back`.

        Call on the loop's thread between collectives (e.g. around a forward pass run in an
        executor).  While lent, ``*_sync`` calls run the collective entirely in the calling
        thread with blocking socket I/O: no event-loop round trip, so no thread wake-ups (the
        dominant cost of a small all-reduce made from a worker thread).  The async methods are
        refused until ``take_back``.  Only TCP links can be lent: with other links (in-memory
        test rings) nothing is lent, ``*_sync`` keeps handing calls to the loop, and False is
        returned.
        """
        if self._lent is not None:
            raise LocalProtocolError("the ring is already lent")
        if self._busy:
            raise LocalProtocolError("cannot lend the ring during a collective")
        if self.size == 1:
            self._lent = ()
            return True
        lent = await lend_ring(self.links)
        if lent is None:
            return False
        self._lent = lent
        return True

    def take_back(self) -> None:
        """End :meth:`lend_to_thread` (loop thread, after the worker is done); idempotent."""
        lent, self._lent = self._lent, None
        if lent:
            take_back_ring(lent)  # type: ignore[arg-type]

    def allreduce_sync(self, x: np.ndarray, *, exact: bool = False) -> np.ndarray:
        """:meth:`allreduce` from a thread other than the event loop's; blocks.

        Lent (see :meth:`lend_to_thread`): runs in this thread with blocking I/O.  Otherwise it
        hands the call to the loop with one lock (about 30 us cheaper per call than
        ``run_coroutine_threadsafe(...).result()`` on the bench box, but still two thread
        wake-ups).  Exceptions propagate.
        """
        if self._lent is None:
            return self._from_thread(functools.partial(self.allreduce, exact=exact), x)
        x = _contiguous(x, F32)
        if self.size == 1:
            return x.copy()
        codec = _EXACT if exact else self.codec
        if codec.rotate:  # as allreduce() does it
            flat = hadamard_rotate(x.reshape(-1))
            return hadamard_rotate(self._run_lent(self._allreduce_program(flat.size), flat, codec))[: x.size].reshape(x.shape)
        return self._run_lent(self._allreduce_program(x.size), x.reshape(-1), codec).reshape(x.shape)

    def allgather_sync(self, x: np.ndarray) -> list[np.ndarray]:
        """:meth:`allgather` from a worker thread (see :meth:`allreduce_sync`)."""
        if self._lent is None:
            return self._from_thread(self.allgather, x)
        x = _contiguous(x)
        if x.dtype.hasobject:
            raise LocalProtocolError("cannot all-gather an object array")
        if self.size == 1:
            return [x.copy()]
        return self._run_lent(self._allgather, x)

    def broadcast_sync(self, x: np.ndarray | None, root: int) -> np.ndarray:
        """:meth:`broadcast` from a worker thread (see :meth:`allreduce_sync`)."""
        if self._lent is None:
            return self._from_thread(self.broadcast, x, root)
        x = self._broadcast_input(x, root)
        if self.size == 1:
            return x.copy()  # type: ignore[union-attr]
        return self._run_lent(self._broadcast, x, root)

    def _from_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = self.loop
        if loop is None:
            raise LocalProtocolError("Collectives has no event loop yet: make one async call "
                                     "first or construct it inside the loop")
        try:
            if asyncio.get_running_loop() is loop:
                raise LocalProtocolError("*_sync collectives would deadlock on the loop's thread")
        except RuntimeError:
            pass
        done = threading.Lock()
        done.acquire()
        box: list[asyncio.Task[Any]] = []

        def finished(task: asyncio.Task[Any]) -> None:
            box.append(task)
            done.release()

        def start() -> None:
            loop.create_task(fn(*args)).add_done_callback(finished)

        loop.call_soon_threadsafe(start)
        done.acquire()
        return box[0].result()

    # -- the two drivers ------------------------------------------------------------------------
    def _begin(self, lent: bool) -> None:
        if self._broken is not None or self._busy or (self._lent is not None) != lent:
            self._refuse(lent)
        self._busy = True
        self.seq += 1

    async def _run(self, program: Callable[..., Program], *args: Any) -> Any:
        """Run a collective's program on the event loop (the links' ``recv`` coroutines)."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        self._begin(lent=False)
        try:
            links = self._io = (self.links.next, self.links.prev)
            seq = self.seq
            steps = program(*args)
            try:
                wanted = next(steps)
                while True:
                    link = links[wanted.side]
                    if wanted.head is not None:  # spare the decoders a parse (FrameDecoder.expect):
                        # an exchange's frame i has this head on either link
                        for hinted in (links if self.size > 2 else (link,)):
                            if not hinted.has_frame:
                                hinted.expect(wanted.head, "coll", expected_header(wanted, seq))
                    frame = check_frame(link.peer, await link.recv(), seq, wanted)
                    wanted = steps.send(frame if wanted.head is None else frame.payload)
            except StopIteration as stop:
                result = stop.value
            if self._must_drain() or self._borrowed:
                await self._drain()
            return result
        except BaseException as exc:
            self._broken = exc
            raise
        finally:
            self._busy = False
            self._borrowed = False

    def _run_lent(self, program: Callable[..., Program], *args: Any) -> Any:
        """Run a collective's program in this worker thread over the lent links (blocking).

        A frame whose encoded head the program knows (the small all-reduce: 61 calls per
        SmolLM2 token) is first awaited by ``BlockingLink.recv_expected``, a byte comparison
        with no decoder; anything else goes through the decoder and :func:`check_frame`.
        """
        self._begin(lent=True)
        try:
            links = self._io = self._lent  # type: ignore[assignment]
            seq = self.seq
            spin_until = time.perf_counter() + SPIN_SECONDS if self.spin else 0.0
            steps = program(*args)
            send = steps.send
            try:
                wanted = next(steps)
                while True:
                    side, _, _, _, nbytes, head = wanted
                    link = links[side]
                    if head is None:
                        wanted = send(check_frame(link.peer, link.recv_now(), seq, wanted))
                        continue
                    payload = link.recv_expected(head, nbytes, spin_until)
                    if payload is None:
                        payload = check_frame(link.peer, link.recv_now(), seq, wanted).payload
                    wanted = send(payload)
            except StopIteration as stop:
                return stop.value
            # Lent writes are complete when write returns: nothing to drain.
        except BaseException as exc:  # as in _run: a context manager would add 1.3 us a call
            self._broken = exc
            raise
        finally:
            self._busy = False
            self._borrowed = False

    def _refuse(self, lent: bool) -> None:
        if self._lent is not None and not lent:
            raise LocalProtocolError("the ring is lent to a worker thread: use the *_sync calls "
                                     "there, or take_back() first")
        if self._broken is not None:
            raise RingError(f"collectives unusable after an earlier failure: {self._broken!r}")
        if self._lent is None and lent:
            raise LocalProtocolError("the ring is not lent to this thread")
        raise LocalProtocolError("collective calls must not overlap")

    def _must_drain(self) -> bool:
        nxt, prv = self.links.next, self.links.prev
        return bool((nxt is not None and nxt.paused) or (prv is not None and prv.paused))

    async def _drain(self) -> None:
        # Only called when a send buffer is above its high-water mark or holds a caller's
        # buffer.  Waiting there after our own receives are complete cannot deadlock: the peer
        # we wait for is still receiving.
        borrowed, self._borrowed = self._borrowed, False
        for link in self.links.links:
            await (link.flush() if borrowed else link.drain())

    def _borrow(self, buf: np.ndarray) -> np.ndarray:
        """Note that ``buf`` (caller memory) is sent as it is; see BORROW_MAX."""
        if buf.nbytes > BORROW_MAX:
            self._borrowed = True
        return buf

    # -- the programs ---------------------------------------------------------------------------
    def _exchange(self, op: str, payload: Any, *, header: dict[str, Any] | None = None,
                  n: int | None = None, nbytes: int | None = None) -> Generator[Want, Any, list[Any]]:
        """Pass ``payload`` both ways round the ring along :func:`exchange_plan`, forwarding
        what arrives; returns what arrived from the other P-1 peers, by origin rank (None at
        our own): their payloads when ``nbytes`` is given, else their frames.

        Frames carry ``header`` (an all-gather's dtype and shape) or, for an all-reduce, the
        element count ``n``.  An all-reduce's frames are all ``nbytes`` long and alike but for
        the call's sequence number and the hop ``i``: their heads come from templates built
        once per (op, n, nbytes) (``schedule.head_templates``), a link compares bytes against
        them, and only payloads travel between driver and program.
        """
        io = self._io
        if header is None and nbytes is not None and nbytes <= JOIN_MAX:
            heads = head_templates(op, n, nbytes, self.size // 2)
            seq = self.seq.to_bytes(8, "big")
            payload = as_bytes_view(payload)  # once: write_head takes flat bytes
            io[NEXT].write_head(heads[0] + seq, payload)
            if self.size > 2:
                io[PREV].write_head(heads[0] + seq, payload)
        else:
            heads = ()
            hdr = {"s": self.seq, "i": 0, "o": op, **(header or {"n": n})}
            io[NEXT].write("coll", hdr, payload)
            if self.size > 2:
                io[PREV].write("coll", hdr, payload)
        got: list[Any] = [None] * self.size
        for side, origin, i, forward in self._plan:
            if heads:
                data = yield want(side, op, i, n, nbytes, heads[i] + seq)  # the payload alone
                if forward:
                    io[1 - side].write_head(heads[i + 1] + seq, data)
            else:
                data = yield want(side, op, i, n, nbytes)
                if forward:
                    io[1 - side].write("coll", {**data.header, "i": i + 1}, data.payload)
                if nbytes is not None:
                    data = data.payload
            got[origin] = data
        return got

    def _allreduce_program(self, n: int) -> Callable[[np.ndarray, Codec], Program]:
        return self._allreduce_exchange if n <= self.small_max_elems else self._allreduce_ring

    def _allreduce_exchange(self, x: np.ndarray, codec: Codec) -> Program:
        n = x.size
        payload = x if codec.exact else codec.encode(x)
        if codec.exact and x.nbytes > BORROW_MAX:
            self._borrowed = True  # see BORROW_MAX
        got = yield from self._exchange("ar", payload, n=n, nbytes=codec.nbytes(n))
        # The sender uses exactly what the others decode (for an exact codec, its own array).
        own = x if codec.exact else codec.decode(payload, n)
        decode = codec.decode
        vals = [own if g is None else decode(g, n) for g in got]
        acc = vals[0] + vals[1]  # fixed order: rank 0, 1, ..., P-1
        for v in vals[2:]:
            acc += v
        return acc

    def _allreduce_ring(self, x: np.ndarray, codec: Codec) -> Program:
        """Reduce-scatter then all-gather around the ring, chunk by chunk (module docstring)."""
        nxt = self._io[NEXT]
        p, r, n = self.size, self.rank, x.size
        encode, decode, nbytes = codec.encode, codec.decode, codec.nbytes
        chunked = [chunks(a, b, self.chunk_elems) for a, b in segments(n, p, QK8_0)]
        out = np.empty(n, F32)
        hdr: dict[str, Any] = {"s": self.seq, "o": "rr", "n": n}
        sent = got = 0

        def send(payload: Any) -> None:
            nonlocal sent
            hdr["i"] = sent
            nxt.write("coll", hdr, payload)
            sent += 1

        # Reduce-scatter: step s, we receive segment (r-1-s) and add ours; the last step leaves
        # us owning segment r+1, which starts its all-gather journey at once (pipelining).
        for a, b in chunked[r]:
            send(encode(x[a:b]))
        for s in range(p - 1):
            for a, b in chunked[(r - 1 - s) % p]:
                frame = yield want(PREV, "rr", got, n, nbytes(b - a))
                got += 1
                acc = decode(frame.payload, b - a) + x[a:b]
                payload = encode(acc)
                if s == p - 2:
                    out[a:b] = acc if codec.exact else decode(payload, b - a)
                send(payload)
        # All-gather: step t, we receive segment (r-t) from its owner's side and pass it on.
        for t in range(p - 1):
            for a, b in chunked[(r - t) % p]:
                frame = yield want(PREV, "rr", got, n, nbytes(b - a))
                got += 1
                out[a:b] = decode(frame.payload, b - a)
                if t < p - 2:
                    send(frame.payload)
        return out

    def _allgather(self, x: np.ndarray) -> Program:
        got = yield from self._exchange("ag", self._borrow(x.reshape(-1).view(np.uint8)),
                                        header={"dt": x.dtype.str, "sh": list(x.shape)})
        came_from = {origin: self._io[side].peer for side, origin, _, _ in self._plan}
        return [x.copy() if g is None else _array_from(came_from[r], g) for r, g in enumerate(got)]

    def _broadcast(self, x: np.ndarray | None, root: int) -> Program:
        nxt, prv = self._io
        cw, ccw = self.size // 2, (self.size - 1) // 2
        dist = (self.rank - root) % self.size
        if x is not None and self.rank == root:
            raw = memoryview(self._borrow(x.reshape(-1).view(np.uint8)))
            nchunks = max(1, -(-len(raw) // BCAST_CHUNK_BYTES))
            for i in range(nchunks):
                piece = raw[i * BCAST_CHUNK_BYTES:(i + 1) * BCAST_CHUNK_BYTES]
                hdr = {"s": self.seq, "i": i, "o": "bc", "dt": x.dtype.str, "sh": list(x.shape),
                       "nb": len(raw)}
                nxt.write("coll", hdr, piece)
                if ccw:
                    prv.write("coll", hdr, piece)
            return x.copy()
            yield  # a program all the same
        # Clockwise receivers hear from prev and pass to next; counter-clockwise ones mirror it.
        if dist <= cw:
            side, dst, forward = PREV, nxt, dist < cw
        else:
            side, dst, forward = NEXT, prv, self.size - dist < ccw
        src = self._io[side].peer
        first = yield want(side, "bc", 0)
        h = first.header
        nb = h.get("nb")
        if not isinstance(nb, int) or not 0 <= nb <= MAX_BCAST_BYTES:
            raise RemoteProtocolError(f"peer {src} sent a bad broadcast size {nb!r}")
        buf = bytearray(nb)
        pos, i, frame = 0, 0, first
        while True:
            if frame.header != {**h, "i": i} or len(frame.payload) > nb - pos or (
                    len(frame.payload) == 0 and nb):
                raise RemoteProtocolError(f"peer {src} sent an inconsistent broadcast frame")
            buf[pos:pos + len(frame.payload)] = frame.payload
            pos += len(frame.payload)
            if forward:
                dst.write("coll", frame.header, frame.payload)
            i += 1
            if pos == nb:
                break
            frame = yield want(side, "bc", i)
        return _array_from(src, Frame("coll", h, memoryview(buf)))


def _contiguous(x: Any, dtype: np.dtype | None = None) -> np.ndarray:
    """``x`` as a C-contiguous array (of ``dtype``), keeping its shape (0-d included)."""
    x = np.asarray(x, dtype=dtype)
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def _array_from(peer: str, frame: Frame) -> np.ndarray:
    """Rebuild an array from a frame carrying ``dt`` (dtype.str) and ``sh`` (shape)."""
    h = frame.header
    try:
        dtype = np.dtype(h["dt"])
        shape = tuple(h["sh"])
        if dtype.hasobject or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError("bad dtype or shape")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * dtype.itemsize != len(frame.payload):
            raise ValueError(f"{len(frame.payload)} bytes for {count} x {dtype}")
        arr = np.frombuffer(frame.payload, dtype, count=count)
    except (KeyError, TypeError, ValueError) as exc:
        raise RemoteProtocolError(f"peer {peer} sent a malformed array: {exc}") from exc
    return arr.reshape(shape)
