"""A whole ring inside one process: for tests, notebooks and embedding.

    async with ringllm.LocalRing(peers=3) as ring:
        async for step in ring.peers[1].generate(request): ...
        async with ringllm.connect(ring.addresses[0]) as client: ...

Each peer loads only its own shard and runs its own step loop and compute thread, exactly as
separate processes would; the links between them are in-memory (``links="memory"``, the
default) or real TCP sockets on 127.0.0.1 (``links="tcp"``). Every peer also serves its HTTP
API on a free 127.0.0.1 port unless ``http=False``.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from ringllm import runtime
from ringllm.errors import ConfigError
from ringllm.peer import Peer
from ringllm.ring.config import free_ports


class LocalRing:
    """``peers`` peers of ``model`` in this process. Use as an async context manager."""

    def __init__(self, peers: int = 3, model: str | None = None, *, weights: list[float] | None = None,
                 wire: str = "f32", links: str = "memory", http: bool = True, threads: int = 1,
                 max_batch: int = 16, max_queue: int = 64, context_length: int | None = None,
                 api_key: str | None = None) -> None:
        if peers < 1:
            raise ConfigError(f"peers must be at least 1, got {peers}")
        if links not in ("memory", "tcp"):
            raise ConfigError(f"links must be 'memory' or 'tcp', got {links!r}")
        self.size, self.model_spec, self.wire, self.link_kind = peers, model, wire, links
        self.weights = weights or [1.0] * peers
        self.http, self.threads, self.api_key = http, threads, api_key
        self.max_batch, self.max_queue, self.context_length = max_batch, max_queue, context_length
        self.peers: list[Peer] = []
        self.addresses: list[str] = []
        self._tasks: list[asyncio.Task] = []
        self._runners: list[Any] = []

    async def __aenter__(self) -> "LocalRing":
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self) -> None:
        runtime.set_threads(self.threads)
        info, mf = await asyncio.to_thread(runtime.open_model, self.model_spec)
        plan = runtime.make_plan(info, self.weights)
        models = []
        for r in range(self.size):
            if r:
                _, mf = await asyncio.to_thread(runtime.open_model, info.path)
            models.append(await asyncio.to_thread(runtime.load_model, mf, plan, r, max_len=self.context_length))
            mf.close()
        rings = await self._links(info, plan)
        self.peers = [Peer(m, info, rings[r], wire=self.wire, max_batch=self.max_batch, max_queue=self.max_queue)
                      for r, m in enumerate(models)]
        self._tasks = [asyncio.create_task(p.run(), name=f"ringllm-peer-{p.rank}") for p in self.peers]
        if self.http:
            await self._serve_http()

    async def _links(self, info, plan):
        from ringllm.ring.formation import open_tcp_ring
        from ringllm.ring.memory import memory_ring

        if self.link_kind == "memory" or self.size == 1:
            return memory_ring(self.size)
        from ringllm.ring.handshake import HandshakeInfo

        ports = free_ports(self.size)
        secret = secrets.token_bytes(24)
        addrs = [("127.0.0.1", p) for p in ports]
        return await asyncio.gather(*[
            open_tcp_ring(r, addrs, secret=secret, me=HandshakeInfo(ring="local", rank=r, size=self.size,
                                                                   model=info.fingerprint, plan=plan.digest()))
            for r in range(self.size)])

    async def _serve_http(self) -> None:
        from ringllm.http.app import make_app
        from ringllm.http.serve import serve_http

        for peer, port in zip(self.peers, free_ports(self.size)):
            self._runners.append(await serve_http(make_app(peer, api_key=self.api_key), "127.0.0.1", port))
            self.addresses.append(f"127.0.0.1:{port}")

    async def close(self) -> None:
        """Stop every peer and HTTP server (idempotent)."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except BaseException:
                pass
        self._tasks = []
        for p in self.peers:
            p.links.close("local ring closed")
        for r in self._runners:
            await r.close()
        self._runners = []
