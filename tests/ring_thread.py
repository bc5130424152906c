"""A LocalRing running on its own event loop in a background thread, for tests.

Tests then talk to the peers over HTTP exactly as outside clients do (the sync ``openai``
client, curl, raw sockets, subprocesses) and read the peers' counters directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any, Awaitable, Callable, Iterator

from ringllm.local import LocalRing


class RingThread:
    """``with RingThread(peers=3, links="tcp") as rt:`` -- rt.ring, rt.addresses, rt.call(coro)."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.ring: LocalRing | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="ring-thread", daemon=True)

    def __enter__(self) -> "RingThread":
        self._thread.start()
        self._ready.wait(300)
        if self._error is not None:
            raise self._error
        assert self.ring is not None, "the ring did not start within 300 s"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # surfaced to __enter__
            self._error = exc
            self._ready.set()

    async def _run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with LocalRing(**self.kwargs) as ring:
            self.ring = ring
            self._ready.set()
            await self._stop.wait()

    @property
    def addresses(self) -> list[str]:
        assert self.ring is not None
        return self.ring.addresses

    @property
    def peers(self) -> list[Any]:
        assert self.ring is not None
        return self.ring.peers

    def call(self, fn: Callable[[], Awaitable[Any]], timeout: float = 120) -> Any:
        """Run ``fn()`` on the ring's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    @contextlib.contextmanager
    def serving(self, app: Any) -> Iterator[str]:
        """Serve the aiohttp ``app`` (say ``make_app(peer, api_key=...)``) from the ring's loop
        on a free 127.0.0.1 port; yields its ``host:port``, stops it on exit."""
        from aiohttp import web

        from ringllm.ring.config import free_ports

        port = free_ports(1)[0]

        async def serve() -> web.AppRunner:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            return runner

        runner = self.call(serve)
        try:
            yield f"127.0.0.1:{port}"
        finally:
            self.call(runner.cleanup)

    def wait_idle(self, timeout: float = 30) -> None:
        """Wait until no peer runs or queues a sequence."""
        deadline = time.monotonic() + timeout
        while any(p.running or p.queue_depth for p in self.peers):
            if time.monotonic() > deadline:
                raise AssertionError(f"ring not idle after {timeout} s: running "
                                     f"{[p.running for p in self.peers]}, queued {[p.queue_depth for p in self.peers]}")
            time.sleep(0.05)
