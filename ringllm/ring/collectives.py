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
Q8_0 blocks, a pass over the value and one over its rounding error (see
:func:`quantize_q8_0_residual`), and every peer, the sender included, uses the dequantized
values; the ring algorithm requantizes partial sums at each hop (P-1 roundings instead of 1).

Error contract: a collective that raises (PeerLostError, RemoteProtocolError, timeout) or is
cancelled leaves the ring out of step; the object then refuses every later call with the same
error.  Re-form the ring and build a new :class:`Collectives`.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ringllm.errors import LocalProtocolError, RemoteProtocolError, RingError
from ringllm.ring.links import BlockingLink, Link, Pump, RingLinks, TcpLink
from ringllm.ring.wire import Frame, encode_head

__all__ = [
    "CHUNK_ELEMS",
    "SMALL_MAX_ELEMS",
    "Collectives",
    "dequantize_q8_0",
    "quantize_q8_0",
    "q8_0_nbytes",
    "quantize_q8_0_residual",
    "dequantize_q8_0_residual",
]

F32 = np.dtype(np.float32)
QK8_0 = 32
# GGML block_q8_0: { ggml_half d; int8_t qs[32]; } = 34 bytes, little-endian, no padding.
Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", (QK8_0,))])
assert Q8_0_BLOCK.itemsize == 34

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


# -- Q8_0 ---------------------------------------------------------------------------------
# Orthonormal Sylvester-Hadamard matrix of order 64 (symmetric, so it is its own inverse).
_H64 = np.array([[1.0]], np.float32)
while _H64.shape[0] < 64:
    _H64 = np.block([[_H64, _H64], [_H64, -_H64]])
_H64 = (_H64 / 8.0).astype(np.float32)


def hadamard_rotate(x: np.ndarray) -> np.ndarray:
    """Rotate a flat float32 vector block-wise by H64 (zero-padded to a multiple of 64).

    Applying it twice gives the vector back (cropped to the original length by the caller).
    With ``wire = "q8_0"`` every peer rotates its partial before quantizing and the sum after:
    activations of LLMs carry a few huge channels, and a Q8_0 block holding one rounds its 31
    neighbours to nothing; rotated, each 64-value block shares the outlier's energy evenly.
    On SmolLM2 this cuts the logit error of Q8_0 all-reduces from ~0.6 to ~0.15 and keeps
    greedy output within the reference fixture's tolerance (plain Q8_0 does not).
    """
    n = x.size
    pad = -n % 64
    if pad:
        x = np.concatenate([x, np.zeros(pad, np.float32)])
    return (x.reshape(-1, 64) @ _H64).reshape(-1)


def q8_0_nbytes(n: int) -> int:
    """Bytes of ``n`` values in Q8_0 (the tail block is zero-padded)."""
    return -(-n // QK8_0) * Q8_0_BLOCK.itemsize


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """Quantize float32 values to GGML Q8_0 blocks, bit-exact with ggml / gguf-py.

    Returns a ``(ceil(n/32), 34)`` uint8 array of blocks; the tail is padded with zeros.  Same
    math as ``quantize_row_q8_0_ref``: d = amax/127, q = roundf(x/d).
    """
    x = np.ascontiguousarray(x, dtype=F32).reshape(-1)
    n = x.size
    nb = -(-n // QK8_0)
    out = np.empty((nb, Q8_0_BLOCK.itemsize), np.uint8)
    if nb == 0:
        return out
    if n % QK8_0:
        x = np.concatenate([x, np.zeros(nb * QK8_0 - n, F32)])
    blocks = x.reshape(nb, QK8_0)
    v = np.abs(blocks)
    d = v.max(axis=1, keepdims=True)
    d /= F32.type(127)
    d16 = d.astype("<f2")
    # A scale that is 0 in float16 (d <= 2**-25) decodes its block to zeros whatever the codes,
    # so its codes are written as zeros: 1/d would overflow there (and gguf-py's codes for such
    # a block are whatever NaN and inf cast to). Every other block is exactly gguf-py's.
    inv = np.zeros_like(d)
    np.divide(F32.type(1), d, out=inv, where=d16 != 0)
    np.multiply(blocks, inv, out=v)
    # roundf (half away from zero) exactly as gguf-py's np_roundf: floor(a) + floor(2*frac(a)).
    # (trunc(v + 0.5) is not exact: 0.49999997 + 0.5 rounds up to 1.0 in float32.)
    a = np.abs(v)
    fl = np.floor(a)
    a -= fl
    a *= 2
    np.floor(a, out=a)
    a += fl
    np.copysign(a, v, out=a)
    out[:, :2] = d16.view(np.uint8)
    out[:, 2:] = a.astype(np.int8).view(np.uint8)
    return out


def dequantize_q8_0(buf: Any, n: int) -> np.ndarray:
    """Dequantize Q8_0 blocks (any bytes-like or block array) to ``n`` float32 values."""
    raw = np.frombuffer(buf, np.uint8)
    nb = raw.size // Q8_0_BLOCK.itemsize
    if nb * QK8_0 < n or raw.size % Q8_0_BLOCK.itemsize:
        raise ValueError(f"{raw.size} bytes are not Q8_0 blocks holding {n} values")
    raw = raw.reshape(nb, Q8_0_BLOCK.itemsize)
    d = raw[:, :2].copy().view("<f2").astype(F32)  # (nb, 1)
    y = raw[:, 2:].view(np.int8).astype(F32)
    y *= d
    return y.reshape(-1)[:n]


def quantize_q8_0_residual(x: np.ndarray) -> np.ndarray:
    """The ``q8_0`` wire payload: Q8_0 blocks of ``x``, then Q8_0 blocks of what they left out
    (``x - dequantize(first)``), as ``(2 * ceil(n/32), 34)`` uint8 blocks.

    Why two passes: one Q8_0 pass, even Hadamard-rotated, moved SmolLM2's first-step top-20
    log-probs by up to 0.20 (the fixture allows 0.05: the model's residual stream has a few
    huge channels, so a block's scale is coarse for the rest). The residual pass divides the
    rounding error by ~254: measured 0.0004-0.0006 at P=2..4, for 2.125 bytes a value instead
    of 4 (f32) or 1.0625 (one pass).
    """
    x = np.ascontiguousarray(x, dtype=F32).reshape(-1)
    first = quantize_q8_0(x)
    rest = x - dequantize_q8_0(first, x.size)
    return np.concatenate([first, quantize_q8_0(rest)])


def dequantize_q8_0_residual(buf: Any, n: int) -> np.ndarray:
    """Values of a :func:`quantize_q8_0_residual` payload (both halves summed)."""
    raw = np.frombuffer(buf, np.uint8)
    half = raw.size // 2
    if raw.size != 2 * q8_0_nbytes(n):
        raise ValueError(f"{raw.size} bytes are not two Q8_0 passes over {n} values")
    return dequantize_q8_0(raw[:half], n) + dequantize_q8_0(raw[half:], n)


# -- payload codecs: (encode: f32 array -> bytes-like, decode: (payload, n) -> f32 array) ------
def _f32_encode(x: np.ndarray) -> np.ndarray:
    return x


def _f32_decode(payload: Any, n: int) -> np.ndarray:
    return np.frombuffer(payload, F32, count=n)


_CODECS: dict[str, tuple[Callable[[np.ndarray], Any], Callable[[Any, int], np.ndarray],
                         Callable[[int], int]]] = {
    "f32": (_f32_encode, _f32_decode, lambda n: 4 * n),
    "q8_0": (quantize_q8_0_residual, dequantize_q8_0_residual, lambda n: 2 * q8_0_nbytes(n)),
}


def _segments(n: int, parts: int) -> list[tuple[int, int]]:
    """Cut ``range(n)`` into ``parts`` contiguous pieces with block-aligned inner boundaries."""
    cuts = [min(n, (n * j // parts) // QK8_0 * QK8_0) for j in range(parts)] + [n]
    return [(cuts[j], cuts[j + 1]) for j in range(parts)]


def _chunks(a: int, b: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(b, s + size)) for s in range(a, b, size)]


class Collectives:
    """Collectives for one peer of a ring of ``size`` (see the module docstring).

    ``wire`` is ``"f32"`` (exact bytes) or ``"q8_0"`` (GGML Q8_0 for all-reduce payloads;
    all-gather and broadcast are always exact).  ``small_max_elems`` overrides the measured
    crossover (``0`` forces the ring algorithm, a huge value the exchange).  Calls must not
    overlap: await one before starting the next.  ``spin`` lets a thread driving lent links
    busy-wait briefly for exchange frames (see SPIN_SECONDS).
    """

    def __init__(self, rank: int, size: int, links: RingLinks, wire: str = "f32", *,
                 small_max_elems: int | None = None, chunk_elems: int = CHUNK_ELEMS,
                 spin: bool = False) -> None:
        if (links.rank, links.size) != (rank, size):
            raise ValueError(f"links are for rank {links.rank}/{links.size}, not {rank}/{size}")
        if wire not in _CODECS:
            raise ValueError(f"wire format must be one of {sorted(_CODECS)}, not {wire!r}")
        if chunk_elems <= 0 or chunk_elems % QK8_0:
            raise ValueError(f"chunk_elems must be a positive multiple of {QK8_0}")
        self.rank, self.size, self.links, self.wire = rank, size, links, wire
        self.small_max_elems = (SMALL_MAX_ELEMS.get(size, SMALL_MAX_DEFAULT)
                                if small_max_elems is None else small_max_elems)
        self.chunk_elems = chunk_elems
        # Busy-wait (up to SPIN_SECONDS) for exchange frames on lent links instead of sleeping:
        # only right when this peer's waiting thread has a core of its own (see Peer).
        self.spin = spin
        self.seq = 0
        self._encode, self._decode, self._nbytes = _CODECS[wire]
        self._broken: BaseException | None = None
        self._busy = False
        self._lent: RingLinks | None = None  # the loop's links while lent to a thread
        self._borrowed = False  # this call sent caller memory: flush before returning
        self._driving = False
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
        if exact and self.wire != "f32":
            saved = self.wire, self._encode, self._decode, self._nbytes
            self.wire = "f32"
            self._encode, self._decode, self._nbytes = _CODECS["f32"]
            try:
                return (await self._allreduce_flat(x.reshape(-1))).reshape(x.shape)
            finally:
                self.wire, self._encode, self._decode, self._nbytes = saved
        if self.wire == "q8_0":
            # Sum in the Hadamard-rotated domain (see hadamard_rotate): sums commute with the
            # rotation, and the rotation spreads outlier channels before 8-bit rounding.
            flat = await self._allreduce_flat(hadamard_rotate(x.reshape(-1)))
            return hadamard_rotate(flat)[: x.size].reshape(x.shape)
        return (await self._allreduce_flat(x.reshape(-1))).reshape(x.shape)

    async def _allreduce_flat(self, x: np.ndarray) -> np.ndarray:
        n = x.size
        if n > self.small_max_elems:
            return await self._run(self._allreduce_ring, x)
        return await self._run(self._allreduce_exchange, x, n)

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
        if not 0 <= root < self.size:
            raise LocalProtocolError(f"broadcast root {root} out of range for {self.size} peers")
        if self.rank == root:
            if x is None:
                raise LocalProtocolError("the broadcast root must pass an array")
            x = _contiguous(x)
            if x.dtype.hasobject:
                raise LocalProtocolError("cannot broadcast an object array")
            if self.size == 1:
                return x.copy()
        return await self._run(self._broadcast, x, root)

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
            self._lent = self.links
            return True
        links = self.links.links
        if not all(isinstance(link, TcpLink) for link in links):
            return False
        for link in links:
            await link.flush()  # type: ignore[attr-defined]
        pump = Pump()
        lent = []
        try:
            for link in links:
                lent.append(link.lend(pump))  # type: ignore[attr-defined]
        except BaseException:
            for link in links[:len(lent)]:
                link.take_back()  # type: ignore[attr-defined]
            raise
        nxt, prv = lent
        self._lent = self.links
        self.links = RingLinks(self.rank, self.size, nxt, prv)  # type: ignore[arg-type]
        return True

    def take_back(self) -> None:
        """End :meth:`lend_to_thread` (loop thread, after the worker is done); idempotent."""
        lent, self._lent = self._lent, None
        if lent is None or lent is self.links:
            return
        self.links = lent
        for link in lent.links:
            link.take_back()  # type: ignore[attr-defined]

    def allreduce_sync(self, x: np.ndarray, *, exact: bool = False) -> np.ndarray:
        """:meth:`allreduce` from a thread other than the event loop's; blocks.

        Lent (see :meth:`lend_to_thread`): runs in this thread with blocking I/O.  Otherwise it
        hands the call to the loop with one lock (about 30 us cheaper per call than
        ``run_coroutine_threadsafe(...).result()`` on the bench box, but still two thread
        wake-ups).  Exceptions propagate.
        """
        if self._lent is not None:
            x = _contiguous(x, F32)
            if (self.size > 1 and isinstance(self.links.next, BlockingLink)
                    and x.size <= min(self.small_max_elems, BORROW_MAX // 4)):
                # As allreduce() does it, without its coroutines (see _allreduce_exchange_lent).
                if self.wire == "f32" or exact:
                    return self._allreduce_exchange_lent(x.reshape(-1), *_CODECS["f32"]).reshape(x.shape)
                flat = self._allreduce_exchange_lent(hadamard_rotate(x.reshape(-1)), self._encode,
                                                     self._decode, self._nbytes)
                return hadamard_rotate(flat)[: x.size].reshape(x.shape)
            return self._drive(self.allreduce(x, exact=exact))
        return self._from_thread(functools.partial(self.allreduce, exact=exact), x)

    def allgather_sync(self, x: np.ndarray) -> list[np.ndarray]:
        """:meth:`allgather` from a worker thread (see :meth:`allreduce_sync`)."""
        if self._lent is not None:
            return self._drive(self.allgather(x))
        return self._from_thread(self.allgather, x)

    def broadcast_sync(self, x: np.ndarray | None, root: int) -> np.ndarray:
        """:meth:`broadcast` from a worker thread (see :meth:`allreduce_sync`)."""
        if self._lent is not None:
            return self._drive(self.broadcast(x, root))
        return self._from_thread(self.broadcast, x, root)

    def _drive(self, coro: Any) -> Any:
        """Run a collective's coroutine to completion in this thread.

        With lent links nothing in it ever suspends (BlockingLink.recv blocks instead), so one
        ``send(None)`` finishes it.
        """
        self._driving = True
        try:
            coro.send(None)
        except StopIteration as stop:
            return stop.value
        finally:
            self._driving = False
        coro.close()
        raise LocalProtocolError("a collective on lent links tried to wait on the event loop")

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

    # -- machinery ------------------------------------------------------------------------------
    def _refuse(self) -> None:
        if self._lent is not None and not self._driving:
            raise LocalProtocolError("the ring is lent to a worker thread: use the *_sync calls "
                                     "there, or take_back() first")
        if self._broken is not None:
            raise RingError(f"collectives unusable after an earlier failure: {self._broken!r}")
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

    async def _run(self, op: Callable[..., Any], *args: Any) -> Any:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        if self._broken is not None or self._busy or (self._lent is not None
                                                     and not self._driving):
            self._refuse()
        self._busy = True
        self.seq += 1
        try:
            result = await op(*args)
            if self._must_drain() or self._borrowed:
                await self._drain()
            return result
        except BaseException as exc:
            self._broken = exc
            raise
        finally:
            self._busy = False
            self._borrowed = False

    async def _recv(self, link: Link, op: str, i: int) -> Frame:
        frame = await link.recv()
        h = frame.header
        if frame.kind != "coll" or h["s"] != self.seq or h["o"] != op or h["i"] != i:
            got = (f"{frame.kind!r} frame" if frame.kind != "coll"
                   else f"seq {h['s']} op {h['o']!r} frame {h['i']}")
            raise RemoteProtocolError(f"peer {link.peer} is out of step: got {got}, expected "
                                      f"seq {self.seq} op {op!r} frame {i}")
        return frame

    def _check_len(self, link: Link, frame: Frame, h: dict[str, Any], n: int, nbytes: int) -> None:
        if frame.header.get("n") != h["n"]:
            raise RemoteProtocolError(f"peer {link.peer} all-reduces {frame.header.get('n')!r} "
                                      f"elements but we have {h['n']}")
        if len(frame.payload) != nbytes:
            raise RemoteProtocolError(f"peer {link.peer} sent {len(frame.payload)} payload bytes "
                                      f"for {n} elements (expected {nbytes} in {self.wire})")

    def _hops(self) -> tuple[int, int]:
        """Hops each vector travels clockwise (to next) and counter-clockwise (to prev)."""
        return self.size // 2, (self.size - 1) // 2

    async def _exchange(self, op: str, header: dict[str, Any], payload: Any,
                        on_frame: Callable[[int, Link, Frame], None]) -> None:
        """Pass ``payload`` both ways round the ring, forwarding what arrives; call
        ``on_frame(origin_rank, link, frame)`` for each of the other P-1 vectors."""
        nxt, prv = self.links.next, self.links.prev
        assert nxt is not None and prv is not None
        cw, ccw = self._hops()
        r, p = self.rank, self.size
        hdr = {"s": self.seq, "i": 0, "o": op, **header}
        nxt.write("coll", hdr, payload)
        if ccw:
            prv.write("coll", hdr, payload)
        for hop in range(1, cw + 1):
            # Clockwise vectors arrive from prev, in order of distance; counter-clockwise ones
            # from next.  Interleaving keeps both directions moving.
            frame = await self._recv(prv, op, hop - 1)
            on_frame((r - hop) % p, prv, frame)
            if hop < cw:
                nxt.write("coll", {**frame.header, "i": hop}, frame.payload)
            if hop <= ccw:
                frame = await self._recv(nxt, op, hop - 1)
                on_frame((r + hop) % p, nxt, frame)
                if hop < ccw:
                    prv.write("coll", {**frame.header, "i": hop}, frame.payload)

    async def _allreduce_exchange(self, x: np.ndarray, n: int) -> np.ndarray:
        # Written out flat rather than via _exchange: this is the latency-critical decode path.
        nxt, prv = self.links.next, self.links.prev
        assert nxt is not None and prv is not None
        r, p, seq = self.rank, self.size, self.seq
        cw, ccw = p // 2, (p - 1) // 2
        f32 = self.wire == "f32"
        decode, nbytes = self._decode, self._nbytes(n)
        payload = x if f32 else self._encode(x)
        if f32 and x.nbytes > BORROW_MAX:
            self._borrowed = True
        vals: list[Any] = [None] * p
        # The sender uses exactly what the others will decode (identity for f32).
        vals[r] = x.reshape(-1) if f32 else decode(payload, n)
        hdr = {"s": seq, "i": 0, "o": "ar", "n": n}
        nxt.write("coll", hdr, payload)
        if ccw:
            prv.write("coll", hdr, payload)
        for hop in range(1, cw + 1):
            # Clockwise vectors arrive from prev, nearest first; counter-clockwise ones from next.
            frame = await prv.recv()
            vals[(r - hop) % p] = decode(self._ar_payload(prv, frame, hop - 1, n, nbytes), n)
            if hop < cw:
                hdr["i"] = hop
                nxt.write("coll", hdr, frame.payload)
            if hop <= ccw:
                frame = await nxt.recv()
                vals[(r + hop) % p] = decode(self._ar_payload(nxt, frame, hop - 1, n, nbytes), n)
                if hop < ccw:
                    hdr["i"] = hop
                    prv.write("coll", hdr, frame.payload)
        acc = vals[0] + vals[1]  # fixed order: rank 0, 1, ..., P-1
        for v in vals[2:]:
            acc += v
        return acc.reshape(x.shape)

    def _allreduce_exchange_lent(self, x: np.ndarray, encode: Callable[..., Any], decode: Callable[..., Any],
                                 nbytes_of: Callable[[int], int]) -> np.ndarray:
        """The exchange all-reduce on lent links, as plain blocking code: the decode hot path
        (61 calls per SmolLM2 token). Same frames, order and sum as :meth:`_allreduce_exchange`
        (keep the two in step); frames go out pre-encoded and come in by
        ``BlockingLink.recv_expected`` when they are byte for byte what this peer would send
        at that point, else through the general decoder and its field-by-field checks. Why a
        second copy of the hop loop: the same frame handling inside :meth:`_allreduce_exchange`,
        reached through allreduce()'s coroutines, measured 67 vs 51 us median per call (P=2,
        576 floats, six runs each), ~1 ms of a 52 ms token.
        """
        if self._broken is not None or self._busy:
            self._refuse()
        self._busy = True
        self.seq += 1
        try:
            nxt, prv = self.links.next, self.links.prev
            r, p, seq, n = self.rank, self.size, self.seq, x.size
            cw, ccw = p // 2, (p - 1) // 2
            f32 = encode is _f32_encode
            nbytes = nbytes_of(n)
            payload = memoryview(x if f32 else encode(x)).cast("B")
            vals: list[Any] = [None] * p
            vals[r] = x if f32 else decode(payload, n)
            heads = [encode_head("coll", {"s": seq, "i": i, "o": "ar", "n": n}, nbytes) for i in range(cw)]
            spin_until = time.perf_counter() + SPIN_SECONDS if self.spin else 0.0

            def recv(link: BlockingLink, i: int) -> Any:
                got = link.recv_expected(heads[i], nbytes, spin_until)
                return got if got is not None else self._ar_payload(link, link.recv_now(), i, n, nbytes)

            nxt.write_encoded(heads[0] + payload)
            if ccw:
                prv.write_encoded(heads[0] + payload)
            for hop in range(1, cw + 1):
                got = recv(prv, hop - 1)
                vals[(r - hop) % p] = decode(got, n)
                if hop < cw:
                    nxt.write_encoded(heads[hop] + got)
                if hop <= ccw:
                    got = recv(nxt, hop - 1)
                    vals[(r + hop) % p] = decode(got, n)
                    if hop < ccw:
                        prv.write_encoded(heads[hop] + got)
            acc = vals[0] + vals[1]  # fixed order: rank 0, 1, ..., P-1
            for v in vals[2:]:
                acc += v
            return acc
        except BaseException as exc:
            self._broken = exc
            raise
        finally:
            self._busy = False

    def _ar_payload(self, link: Any, frame: Frame, i: int, n: int, nbytes: int) -> Any:
        """The payload of exchange frame ``i`` of this all-reduce, or the precise error."""
        h = frame.header
        if (frame.kind != "coll" or h["s"] != self.seq or h["o"] != "ar" or h["i"] != i
                or h.get("n") != n or len(frame.payload) != nbytes):
            self._mismatch(link, frame, "ar", i, n, nbytes)
        return frame.payload

    def _mismatch(self, link: Link, frame: Frame, op: str, i: int, n: int, nbytes: int) -> None:
        """Raise the precise RemoteProtocolError for a frame that is not the expected one."""
        h = frame.header
        if frame.kind != "coll" or h["s"] != self.seq or h["o"] != op or h["i"] != i:
            got = (f"{frame.kind!r} frame" if frame.kind != "coll"
                   else f"seq {h['s']} op {h['o']!r} frame {h['i']}")
            raise RemoteProtocolError(f"peer {link.peer} is out of step: got {got}, expected "
                                      f"seq {self.seq} op {op!r} frame {i}")
        if h.get("n") != n:
            raise RemoteProtocolError(f"peer {link.peer} all-reduces {h.get('n')!r} elements "
                                      f"but we have {n}")
        raise RemoteProtocolError(f"peer {link.peer} sent {len(frame.payload)} payload bytes "
                                  f"(expected {nbytes} in {self.wire})")

    async def _allreduce_ring(self, x: np.ndarray) -> np.ndarray:
        nxt, prv = self.links.next, self.links.prev
        assert nxt is not None and prv is not None
        p, r, n = self.size, self.rank, x.size
        encode, decode, nbytes = self._encode, self._decode, self._nbytes
        segs = _segments(n, p)
        chunks = [_chunks(a, b, self.chunk_elems) for a, b in segs]
        out = np.empty(n, F32)
        hdr: dict[str, Any] = {"s": self.seq, "o": "rr", "n": n}
        sent = 0

        def send(payload: Any) -> None:
            nonlocal sent
            hdr["i"] = sent
            nxt.write("coll", hdr, payload)
            sent += 1

        got = 0

        async def recv(a: int, b: int) -> Frame:
            nonlocal got
            frame = await self._recv(prv, "rr", got)
            got += 1
            self._check_len(prv, frame, hdr, b - a, nbytes(b - a))
            return frame

        # Reduce-scatter: step s, we receive segment (r-1-s) and add ours; the last step leaves
        # us owning segment r+1, which starts its all-gather journey at once (pipelining).
        for a, b in chunks[r]:
            send(encode(x[a:b]))
        for s in range(p - 1):
            for a, b in chunks[(r - 1 - s) % p]:
                frame = await recv(a, b)
                acc = decode(frame.payload, b - a) + x[a:b]
                payload = encode(acc)
                if s == p - 2:
                    out[a:b] = acc if self.wire == "f32" else decode(payload, b - a)
                send(payload)
        # All-gather: step t, we receive segment (r-t) from its owner's side and pass it on.
        for t in range(p - 1):
            for a, b in chunks[(r - t) % p]:
                frame = await recv(a, b)
                out[a:b] = decode(frame.payload, b - a)
                if t < p - 2:
                    send(frame.payload)
        return out

    async def _allgather(self, x: np.ndarray) -> list[np.ndarray]:
        parts: list[np.ndarray | None] = [None] * self.size
        parts[self.rank] = x.copy()

        def on_frame(origin: int, link: Link, frame: Frame) -> None:
            parts[origin] = _array_from(link, frame)

        await self._exchange("ag", {"dt": x.dtype.str, "sh": list(x.shape)},
                             self._borrow(x.reshape(-1).view(np.uint8)), on_frame)
        return parts  # type: ignore[return-value]

    async def _broadcast(self, x: np.ndarray | None, root: int) -> np.ndarray:
        nxt, prv = self.links.next, self.links.prev
        assert nxt is not None and prv is not None
        cw, ccw = self._hops()
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
        # Clockwise receivers hear from prev and pass to next; counter-clockwise ones mirror it.
        if dist <= cw:
            src, dst, forward = prv, nxt, dist < cw
        else:
            src, dst, forward = nxt, prv, self.size - dist < ccw
        first = await self._recv(src, "bc", 0)
        h = first.header
        nb = h.get("nb")
        if not isinstance(nb, int) or not 0 <= nb <= MAX_BCAST_BYTES:
            raise RemoteProtocolError(f"peer {src.peer} sent a bad broadcast size {nb!r}")
        buf = bytearray(nb)
        pos, i, frame = 0, 0, first
        while True:
            if frame.header != {**h, "i": i} or len(frame.payload) > nb - pos or (
                    len(frame.payload) == 0 and nb):
                raise RemoteProtocolError(f"peer {src.peer} sent an inconsistent broadcast frame")
            buf[pos:pos + len(frame.payload)] = frame.payload
            pos += len(frame.payload)
            if forward:
                dst.write("coll", frame.header, frame.payload)
            i += 1
            if pos == nb:
                break
            frame = await self._recv(src, "bc", i)
        return _array_from(src, Frame("coll", h, memoryview(buf)))


def _contiguous(x: Any, dtype: np.dtype | None = None) -> np.ndarray:
    """``x`` as a C-contiguous array (of ``dtype``), keeping its shape (0-d included)."""
    x = np.asarray(x, dtype=dtype)
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def _array_from(link: Link, frame: Frame) -> np.ndarray:
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
        raise RemoteProtocolError(f"peer {link.peer} sent a malformed array: {exc}") from exc
    return arr.reshape(shape)
