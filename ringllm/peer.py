"""One ring member: its shard of the model, its ring links, and the masterless step loop.

How P peers agree on the work without a coordinator
---------------------------------------------------
Every peer runs the same loop. A *step* is:

1. **Control all-gather.** Each peer contributes its news since the last step: requests that
   arrived at it (with ids ``"<rank>-<n>"``), cancellations of its own requests, and sequences
   that raised while advancing on it (``(id, exception type)``). All peers receive the same
   list (rank order) and apply the same rule: new requests join the waiting line in (rank,
   arrival) order; cancelled and failed ones leave (a failed one's origin reports a
   RequestError); the waiting line's head is admitted while fewer than ``max_batch``
   sequences run. News is a msgpack map ``{"new": [[id, wire request], ...], "cancel": [id,
   ...], "failed": [[id, type name], ...]}`` (:mod:`ringllm.request_wire` for the requests).
2. **Forward.** The running sequences' new tokens (a whole prompt for a new sequence, one token
   otherwise) go through the model as one batch: two all-reduces per layer.
3. **Choose.** Every peer applies the sampling rule (:mod:`ringllm.sampling`) to its vocabulary
   slice and all pick the same token per sequence.
4. **Advance.** Each sequence's state machine (:class:`~ringllm.generation.Sequence`) takes its
   token; being deterministic, it finishes at the same step on every peer. The peer where a
   request arrived streams its text to the client.

An idle ring sends nothing: a peer with no running sequences waits until it has news or a
neighbour's first control frame arrives, then joins the step. Compute runs in one worker
thread per peer (both kernel families release the GIL), so the event loop keeps moving bytes
and serving clients meanwhile; over plain TCP the compute thread drives the ring's sockets
itself for the step (lent, see :meth:`Peer._compute_lent`), over TLS it reaches the
collectives through the loop.

When the ring breaks
--------------------
A lost neighbour (EOF, silence past ``dead_after``, a ``bye``) makes :meth:`Peer.run` fail
every in-flight request with a :class:`PeerLostError` naming the lost peer, close both links
with a ``bye`` that names it too (so the news goes round the ring at once), and raise. The
peer keeps its model and keeps serving HTTP; until :meth:`Peer.rebind` hands it a re-formed
ring, new requests are refused at once with a PeerLostError saying the ring is down. Every
peer re-forms the whole ring (fresh links, fresh collectives), so no state of the old ring
survives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator

import msgpack
import numpy as np

from ringllm.errors import PeerLostError, QueueFullError, RequestError, RingError
from ringllm.generation import Request, Sequence, Step
from ringllm.model import Segment, Transformer
from ringllm.request_wire import from_wire, to_wire
from ringllm.ring.collectives import Collectives
from ringllm.ring.links import RingLinks
from ringllm.runtime import ModelInfo
from ringllm.sampling import choose_batch

log = logging.getLogger("ringllm.peer")

_DONE = object()  # end-of-stream marker in a request's queue


@dataclass
class _Running:
    rid: str
    origin: int
    seq: Sequence
    out: asyncio.Queue | None = None  # on the origin peer: Steps, then _DONE or an exception


@dataclass
class PeerStats:
    """Counters since start. ``sync_seconds`` is time spent waiting in collectives (the control
    all-gather and the compute thread's all-reduces and gathers); ``compute_seconds`` is the
    rest of the steps' time."""

    steps: int = 0
    tokens: int = 0
    requests: int = 0
    step_seconds: float = 0.0
    sync_seconds: float = 0.0
    bytes_sent: int = 0  # frame bytes written to the ring links
    last_error: str | None = None
    started: float = field(default_factory=time.time)

    @property
    def compute_seconds(self) -> float:
        return self.step_seconds - self.sync_seconds

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["compute_seconds"] = self.compute_seconds
        return d


class Peer:
    """A peer over already-open ring links with an already-loaded shard.

    Use :meth:`generate` from any task on the peer's event loop to run a request; run
    :meth:`run` as a task to drive the ring. Every peer of the ring must run :meth:`run`.
    """

    def __init__(self, model: Transformer, info: ModelInfo, links: RingLinks, *, wire: str = "f32",
                 max_batch: int = 16, max_queue: int = 64, spin: bool = False) -> None:
        self.info = info
        self.links = links
        self.rank, self.size = links.rank, links.size
        self.wire = wire
        self.spin = spin  # see Collectives: only when this peer's waiting thread has a core to itself
        self.coll = Collectives(links.rank, links.size, links, wire, spin=spin)
        # In a ring, the peer's model is built over the given one's shard with this ring's
        # all-reduces (building one is cheap: it shares the weights); alone, it is the given one.
        self.model = model if self.size == 1 else Transformer(
            model.w, self.model_allreduce, max_len=model.max_len, allreduce_exact=self.model_allreduce_exact)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.stats = PeerStats()
        self._counter = itertools.count()
        self._news_new: list[tuple[str, dict]] = []
        self._news_cancel: list[str] = []
        self._news_failed: list[tuple[str, str]] = []  # (rid, exception type) of sequences that raised here
        self._news = asyncio.Event()
        self._outs: dict[str, asyncio.Queue] = {}
        self._waiting: list[tuple[str, int, dict]] = []
        self._running: list[_Running] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"ringllm-compute-{self.rank}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failed: BaseException | None = None
        self.down_since: float | None = None  # time.time() of the last ring failure while down
        self._bytes_before = 0  # bytes_sent on the links of earlier rings
        self.ring_formations = 1  # how many rings this peer has run on (1 + rebinds)

    def rebind(self, links: RingLinks) -> None:
        """Continue on a re-formed ring after :meth:`run` raised: new links and collectives
        (the model, its weights and the counters are kept). Call :meth:`run` next: requests
        are accepted again once every peer has joined the new ring. Raises ValueError for
        links of another rank or ring size."""
        if (links.rank, links.size) != (self.rank, self.size):
            raise ValueError(f"links are for rank {links.rank}/{links.size}, not {self.rank}/{self.size}")
        self._bytes_before += sum(link.bytes_sent for link in self.links.links)
        self.stats.bytes_sent = self._bytes_before
        self.links = links
        self.coll = Collectives(links.rank, links.size, links, self.wire, spin=self.spin)
        if getattr(self._pool, "_shutdown", False):
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"ringllm-compute-{self.rank}")
        self.ring_formations += 1

    # -- the client side --------------------------------------------------------------------
    async def generate(self, request: Request) -> AsyncIterator[Step]:
        """Run ``request`` on the ring; yield its Steps as they are chosen.

        Raises RequestError before anything runs if the prompt does not fit the context or
        the request cannot travel the ring (:func:`ringllm.request_wire.to_wire`),
        QueueFullError if the waiting line is full, and PeerLostError (naming the peer) if the
        ring breaks mid-request. A request that fails on its own (see :meth:`_step`) raises
        RequestError; the others go on. Closing the iterator early cancels the request on
        every peer and frees its KV cache.
        """
        if self._failed is not None:
            raise self._down_error()
        request.check_fits(self.model.max_len)
        wire = to_wire(request)
        if len(self._waiting) + len(self._news_new) >= self.max_queue + max(0, self.max_batch - len(self._running)):
            raise QueueFullError(f"the ring's queue is full ({self.max_queue} waiting); retry later")
        rid = f"{self.rank}-{next(self._counter)}"
        out: asyncio.Queue = asyncio.Queue()
        self._outs[rid] = out
        self._news_new.append((rid, wire))
        self._news.set()
        self.stats.requests += 1
        finished = False
        try:
            while True:
                item = await out.get()
                if item is _DONE:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            self._outs.pop(rid, None)
            if not finished and self._failed is None:
                self._news_cancel.append(rid)
                self._news.set()

    @property
    def failure(self) -> BaseException | None:
        """Why the ring stopped on this peer, or None while it runs."""
        return self._failed

    @property
    def ring_up(self) -> bool:
        """False from a ring failure until every peer has joined a re-formed ring (see
        :meth:`run`): requests are refused meanwhile."""
        return self._failed is None

    def _down_error(self) -> PeerLostError:
        failed = self._failed
        if isinstance(failed, PeerLostError):
            peer, why = failed.peer, failed.reason
        else:
            peer, why = "ring", str(failed)
        return PeerLostError(peer, f"the ring is down ({why}); it re-forms when every peer is back, retry later")

    @property
    def queue_depth(self) -> int:
        return len(self._waiting) + len(self._news_new)

    @property
    def running(self) -> int:
        return len(self._running)

    # -- the ring side ----------------------------------------------------------------------
    async def run(self) -> None:
        """Drive the ring until it breaks (raises the failure) or the task is cancelled.

        On failure, or cancellation, every in-flight request on this peer gets the error (a
        PeerLostError naming the lost peer; "shutting down" on cancellation) and both links are
        closed with a ``bye`` giving the reason; a compute thread blocked on the ring is
        released first. Afterwards :attr:`ring_up` is False until the next :meth:`run` (after
        :meth:`rebind`) has seen every peer join.
        """
        self._loop = asyncio.get_running_loop()
        try:
            await self._whole()
            self._failed = self.down_since = None
            while True:
                await self._step()
        except BaseException as exc:
            if isinstance(exc, RingError):
                err: RingError = exc
            elif isinstance(exc, asyncio.CancelledError):
                err = PeerLostError(f"rank {self.rank}", "the peer is shutting down")
            else:
                # Only the exception's type: its text may quote a request (it reaches /health).
                err = PeerLostError(f"rank {self.rank}", f"the peer's step loop failed: {type(exc).__name__}")
            self._fail_all(err)
            self.links.abandon(err)
            raise
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _whole(self) -> None:
        """Wait until every peer runs this ring: one empty all-gather, the first collective of
        every peer's new ring. A peer whose own two links are up may still have neighbours
        waiting for theirs (e.g. for a restarting peer still loading its model), so until this
        returns requests stay refused rather than wait in a step nobody else has started.
        Silence is still judged by keepalive, so the usual recv deadline is lifted meanwhile."""
        if self.size == 1:
            return
        saved = [(link, link.recv_timeout) for link in self.links.links]
        for link, _ in saved:
            link.recv_timeout = 86400.0
        try:
            await self._gather_obj(None)
        finally:
            for link, timeout in saved:
                link.recv_timeout = timeout

    async def _step(self) -> None:
        if not self._running and not self._waiting:
            await self._wait_for_work()
        news = {"new": self._news_new, "cancel": self._news_cancel, "failed": self._news_failed}
        self._news_new, self._news_cancel, self._news_failed = [], [], []
        self._news.clear()
        t0 = time.perf_counter()
        union = await self._gather_obj(news)
        t1 = time.perf_counter()
        self._apply(union)
        if not self._running:
            return
        batch = list(self._running)
        choices = await self._compute_lent(batch)
        self.stats.step_seconds += time.perf_counter() - t0
        self.stats.sync_seconds += t1 - t0
        self.stats.steps += 1
        self.stats.bytes_sent = self._bytes_before + sum(link.bytes_sent for link in self.links.links)
        for run, choice in zip(batch, choices):
            try:
                step = run.seq.accept(choice)
            except Exception as exc:  # noqa: BLE001 - one sequence's failure must not stop the ring
                self._failed_here(run, exc)
                continue
            self.stats.tokens += 1
            if run.out is not None:
                run.out.put_nowait(step)
            if step.finish_reason is not None:
                self._finish(run)

    async def _wait_for_work(self) -> None:
        """Idle: wait for local news or a neighbour starting a step (its frame arriving)."""
        waits = [asyncio.ensure_future(self._news.wait())]
        waits += [asyncio.ensure_future(link.wait_incoming()) for link in self.links.links]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _apply(self, union: list[dict]) -> None:
        """The deterministic rule every peer applies to the gathered news (see module doc)."""
        failed = {rid: why for part in union for rid, why in part["failed"]}
        cancelled = {rid for part in union for rid in part["cancel"]} | set(failed)
        for origin, part in enumerate(union):
            for rid, req in part["new"]:
                self._waiting.append((rid, origin, req))
        self._waiting = [w for w in self._waiting if w[0] not in cancelled]
        for run in [r for r in self._running if r.rid in cancelled]:
            if run.rid in failed:
                self._fail_one(run, failed[run.rid])
            else:
                self._finish(run)
        while self._waiting and len(self._running) < self.max_batch:
            rid, origin, req = self._waiting.pop(0)
            out = self._outs.get(rid) if origin == self.rank else None
            try:
                seq = Sequence(from_wire(req), self.info.tokenizer, self.model.new_cache(), self.model.max_len)
            except Exception as exc:  # noqa: BLE001 - a bad request must not stop the ring
                # Every peer refuses the same request the same way; only its origin reports it.
                log.warning("rank %d: request %s refused: %s", self.rank, rid, _describe(exc))
                if out is not None:
                    out.put_nowait(exc if isinstance(exc, RequestError) else
                                   RequestError(f"the request failed on the ring: {type(exc).__name__}"))
                continue
            self._running.append(_Running(rid, origin, seq, out))

    def _finish(self, run: _Running) -> None:
        self._running.remove(run)
        if run.out is not None:
            run.out.put_nowait(_DONE)

    def _failed_here(self, run: _Running, exc: Exception) -> None:
        """A sequence raised while advancing on this peer: tell every peer in the next step's
        news, where all drop it together (:meth:`_apply`, before that step's forward).

        Dropping it here at once would leave the peers with different batches if the
        failure were this peer's alone (e.g. out of memory); a Sequence is a pure function of
        its request and the chosen tokens, so usually every peer fails it at the same step.
        Only the exception's type travels: its text may quote the request.
        """
        log.warning("rank %d: request %s failed: %s", self.rank, run.rid, _describe(exc))
        self._news_failed.append((run.rid, type(exc).__name__))

    def _fail_one(self, run: _Running, why: str) -> None:
        """Drop a sequence some peer reported failed; its origin's client gets the error."""
        self._running.remove(run)
        if run.out is not None:
            run.out.put_nowait(RequestError(f"the request failed on the ring: {why}"))

    def _fail_all(self, exc: BaseException) -> None:
        self._failed = exc
        self.down_since = time.time()
        self.stats.last_error = str(exc)
        for q in self._outs.values():
            q.put_nowait(exc)
        self._running.clear()
        self._waiting.clear()
        # News not yet gathered belongs to requests that have just been failed.
        self._news_new, self._news_cancel, self._news_failed = [], [], []

    async def _compute_lent(self, batch: list[_Running]) -> list:
        """Run :meth:`_compute` in the compute thread with the ring's sockets lent to it.

        Lending lets the thread's all-reduces do their socket I/O directly, with no event-loop
        round trip per call (~110 us saved per all-reduce at P=2, 61 per token). The step must
        end before the sockets return to the loop, so cancellation waits for the thread.
        """
        await self.coll.lend_to_thread()
        fut = self._loop.run_in_executor(self._pool, self._compute, batch)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The thread holds the sockets until its step ends; shutting them down wakes it
            # at once if it is blocked on a stalled neighbour.
            for link in self.links.links:
                link.abort("the peer is shutting down")
            await asyncio.wait([fut])
            raise
        finally:
            self.coll.take_back()

    # -- compute thread ---------------------------------------------------------------------
    def _compute(self, batch: list[_Running]) -> list:
        """Forward the batch and choose one token per sequence (runs in the compute thread)."""
        segments = [Segment(r.seq.cache, r.seq.next_tokens()) for r in batch]
        logits = self.model.forward(segments)
        v0 = self.model.vocab_range[0]
        return choose_batch(logits, v0, [r.seq.request.sampling for r in batch], [len(r.seq.ids) for r in batch],
                            [r.seq.history for r in batch], self._gather_sync)

    def model_allreduce_exact(self, x: np.ndarray) -> np.ndarray:
        """The model's all-reduce for one-owner sums (the embedding): float32 on any wire."""
        return self.model_allreduce(x, exact=True)

    def model_allreduce(self, x: np.ndarray, exact: bool = False) -> np.ndarray:
        """The model's all-reduce, called from the compute thread."""
        if self.size == 1:
            return x
        t = time.perf_counter()
        out = self.coll.allreduce_sync(x, exact=exact)
        self.stats.sync_seconds += time.perf_counter() - t  # only the compute thread writes here
        return out

    def _gather_sync(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        t = time.perf_counter()
        blob = np.frombuffer(msgpack.packb(obj, use_bin_type=True), np.uint8)
        parts = self.coll.allgather_sync(blob)
        self.stats.sync_seconds += time.perf_counter() - t
        return [_unpack(p) for p in parts]

    async def _gather_obj(self, obj: Any) -> list[Any]:
        """All-gather of small msgpack-able objects, in rank order."""
        if self.size == 1:
            return [obj]
        blob = np.frombuffer(msgpack.packb(obj, use_bin_type=True), np.uint8)
        return [_unpack(p) for p in await self.coll.allgather(blob)]


def _describe(exc: BaseException) -> str:
    """An exception for a log line, escaped: its text may hold what a client sent."""
    return f"{type(exc).__name__}: {ascii(str(exc))[:300]}"


def _unpack(part: np.ndarray) -> Any:
    return msgpack.unpackb(np.asarray(part, np.uint8).tobytes(), raw=False, strict_map_key=False)
