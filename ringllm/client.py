"""An asyncio client for any peer of a ring (the native NDJSON endpoint).

    async with ringllm.connect("127.0.0.1:8700") as client:
        async for piece in client.chat([{"role": "user", "content": "Hi!"}]):
            print(piece, end="")

Never blocks the caller's event loop: all I/O is aiohttp. Errors: the peer's refusal is a
:class:`ringllm.errors.RequestError` (4xx) or :class:`RingError` (5xx) with the peer's message;
a ring failure mid-stream raises :class:`PeerLostError` naming the lost peer; a peer that
cannot be reached raises :class:`PeerLostError` naming the address.
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator, Sequence

import aiohttp

from ringllm.errors import PeerLostError, RequestError, RingError
from ringllm.generation import Completion


def _parse_address(address: str) -> str:
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RequestError(f"peer address {address!r} must look like host:port")
    return f"http://{host}:{port}"


class Client:
    """A connection to one peer's HTTP API. Use as an async context manager."""

    def __init__(self, address: str, *, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.base = _parse_address(address)
        self.api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=10)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Client":
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers=headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def events(self, **body: Any) -> AsyncIterator[dict[str, Any]]:
        """Yield the NDJSON events of one generation (see :mod:`ringllm.server`).

        ``body`` takes ``prompt`` (+ ``raw``, ``system``), ``messages`` or ``prompt_ids``, and
        the sampling fields. Closing the iterator early disconnects, which cancels the request.
        """
        assert self._session is not None, "use 'async with connect(...)'"
        body = {k: v for k, v in body.items() if v is not None}
        try:
            async with self._session.post(f"{self.base}/ringllm/v1/generate", json=body) as resp:
                if resp.status != 200:
                    raise _http_error(resp.status, await resp.text())
                async for line in resp.content:
                    if not line.strip():
                        continue
                    ev = json.loads(line)
                    if ev.get("event") == "error":
                        err = ev["error"]
                        cls = PeerLostError if err.get("type") == "PeerLostError" else RingError
                        raise (cls("ring", err["message"]) if cls is PeerLostError else cls(err["message"]))
                    yield ev
        except aiohttp.ClientConnectionError as exc:
            raise PeerLostError(self.base, f"cannot reach the peer: {exc}") from None

    async def complete(self, on_text=None, **body: Any) -> Completion:
        """Run one generation to the end; ``on_text(piece)`` sees the text as it streams."""
        out = Completion([])
        t0 = time.perf_counter()
        async for ev in self.events(**body):
            if ev["event"] == "start":
                out.prompt_ids = ev["prompt_ids"]
            elif ev["event"] == "token":
                if not out.ids:
                    out.time_to_first_token = time.perf_counter() - t0
                out.ids.append(ev["token"])
                out.text += ev["text"]
                out.top_logprobs.append([tuple(x) for x in ev["top_logprobs"]])
                if on_text and ev["text"]:
                    on_text(ev["text"])
            elif ev["event"] == "end":
                out.finish_reason = ev["finish_reason"]
        out.seconds = time.perf_counter() - t0
        return out

    async def chat(self, messages: Sequence[dict[str, Any]], **params: Any) -> AsyncIterator[str]:
        """Stream the text of the assistant's reply to ``messages``."""
        async for ev in self.events(messages=list(messages), **params):
            if ev["event"] == "token" and ev["text"]:
                yield ev["text"]

    async def health(self) -> dict[str, Any]:
        assert self._session is not None
        try:
            async with self._session.get(f"{self.base}/health") as resp:
                return await resp.json()
        except aiohttp.ClientConnectionError as exc:
            raise PeerLostError(self.base, f"cannot reach the peer: {exc}") from None


def _http_error(status: int, text: str) -> RingError:
    try:
        msg = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = text.strip()[:300] or f"HTTP {status}"
    return RequestError(msg) if 400 <= status < 500 else RingError(f"peer error (HTTP {status}): {msg}")


def connect(address: str, *, api_key: str | None = None) -> Client:
    """A client for the peer whose HTTP API listens at ``address`` ("host:port")."""
    return Client(address, api_key=api_key)
