"""In-memory links, the test double of TCP: frames are encoded and decoded exactly as on TCP."""

from __future__ import annotations

import asyncio
from typing import Any

from ringllm.ring.links import Link, RingLinks

__all__ = ["MemoryLink", "memory_link_pair", "memory_ring"]


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

    def _write_buffers(self, head: bytes, view: bytes | memoryview | None) -> None:
        data = head if view is None else head + view  # copy, as a socket would
        if self._stalled:
            self._held.append(data)
        else:
            self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        other = self.other
        if other is None or other.closed:
            return
        step = self.chunk or len(data)
        for i in range(0, len(data), step):
            other.feed(data[i:i + step])

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
        self.eof(reason)
        if other is not None:
            other.eof(reason)

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
        if other is not None and not other.closed:
            # The peer sees EOF, as after a socket close.
            other.eof()


def memory_link_pair(a_name: str, b_name: str, **kwargs: Any) -> tuple[MemoryLink, MemoryLink]:
    """Two connected in-memory links: ``a`` talks to the peer named ``b_name`` and vice versa."""
    a, b = MemoryLink(b_name, **kwargs), MemoryLink(a_name, **kwargs)
    a.other, b.other = b, a
    return a, b


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
