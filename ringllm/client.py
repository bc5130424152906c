"""An asyncio client for any peer of a ring (the native NDJSON endpoint).

    async with ringllm.connect("127.0.0.1:8700") as client:
        async for piece in client.chat([{"role": "user", "content": "Hi!"}], max_tokens=64):
            print(piece, end="")
        done = await client.complete("The capital of France is", raw=True, temperature=0)

Never blocks the caller's event loop: all I/O is aiohttp, and it runs under plain asyncio and
uvloop alike. Errors: the peer's refusal is a :class:`ringllm.errors.RequestError` (4xx; a
full queue is :class:`ringllm.errors.QueueFullError`) or :class:`RingError` (5xx) with the
peer's message; a ring failure mid-stream raises :class:`PeerLostError` naming the lost peer;
a peer that cannot be reached raises :class:`PeerLostError` naming the address. Leaving an
iterator early (``break``) disconnects, which cancels the request on the ring.

For OpenAI-style clients, point them at :attr:`Client.openai_base_url`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl as ssl_module
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Sequence

import aiohttp

from ringllm.errors import PeerLostError, QueueFullError, RequestError, RingError

if TYPE_CHECKING:  # generation imports the model (numpy): loaded only when a generation is collected
    from ringllm.generation import Completion

# Keyword arguments every generation method takes (None means the peer's default).
GENERATION_PARAMS = frozenset({"max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed",
                               "stop", "ignore_eos", "top_logprobs"})
_INPUTS = frozenset({"prompt", "raw", "system", "messages", "prompt_ids"})


def _parse_address(address: str, tls: bool = False) -> str:
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise RequestError(f"peer address {address!r} must look like host:port")
    return f"{'https' if tls else 'http'}://{host}:{port}"


class Client:
    """A connection to one peer's HTTP API. Use as an async context manager.

    ``ssl``: the TLS context for a peer whose ring.toml has ``[tls]`` (a bare ``host:port``
    then means https); ``ringllm.ring.tls.http_client_context(cfg.tls)`` trusts the ring's CA.
    """

    def __init__(self, address: str, *, api_key: str | None = None, timeout: float = 600.0,
                 ssl: ssl_module.SSLContext | None = None) -> None:
        self.base = _parse_address(address, tls=ssl is not None)
        self.api_key = api_key
        self._ssl = ssl
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=10)
        self._session: aiohttp.ClientSession | None = None

    @property
    def openai_base_url(self) -> str:
        """The base URL for OpenAI clients, e.g. ``openai.AsyncOpenAI(base_url=client.openai_base_url)``."""
        return f"{self.base}/v1"

    async def __aenter__(self) -> "Client":
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        connector = aiohttp.TCPConnector(ssl=self._ssl) if self._ssl is not None else None
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers=headers, connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def events(self, **body: Any) -> AsyncIterator[dict[str, Any]]:
        """Yield the NDJSON events of one generation (see :mod:`ringllm.http.native`).

        ``body`` takes ``prompt`` (+ ``raw``, ``system``), ``messages`` or ``prompt_ids``, and
        the generation fields (:data:`GENERATION_PARAMS`); None values are left out. Closing
        the iterator early disconnects, which cancels the request.
        """
        if self._session is None:
            raise RingError("the client is not open: use 'async with ringllm.connect(...) as client'")
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
                        if err.get("type") == "PeerLostError":
                            raise PeerLostError.from_message(err["message"])
                        raise RingError(err["message"])
                    yield ev
        except aiohttp.ClientConnectionError as exc:
            raise PeerLostError(self.base, _unreachable(exc)) from None

    async def complete(self, prompt: str | None = None, *, on_text: Callable[[str], Any] | None = None,
                       **params: Any) -> Completion:
        """Run one generation to the end and return it with its timing.

        Give ``prompt`` (a user message, or raw text with ``raw=True``; ``system`` adds a
        system message) or ``messages=[...]`` or ``prompt_ids=[...]``, plus any of
        :data:`GENERATION_PARAMS`. ``on_text(piece)`` sees the text as it streams.
        """
        from ringllm.generation import Completion

        body = _body(params, prompt=prompt)
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

    async def stream(self, prompt: str, **params: Any) -> AsyncIterator[str]:
        """Stream the text generated for ``prompt`` (same arguments as :meth:`complete`)."""
        async for ev in self.events(**_body(params, prompt=prompt)):
            if ev["event"] == "token" and ev["text"]:
                yield ev["text"]

    async def chat(self, messages: Sequence[dict[str, Any]], **params: Any) -> AsyncIterator[str]:
        """Stream the text of the assistant's reply to ``messages`` ({"role", "content"} dicts);
        ``params`` are any of :data:`GENERATION_PARAMS`."""
        async for ev in self.events(**_body(params, messages=list(messages))):
            if ev["event"] == "token" and ev["text"]:
                yield ev["text"]

    async def health(self) -> dict[str, Any]:
        """The peer's /health document (state, rank, shard, memory, queue); also when it
        answers 503 with one (a peer still loading or joining its ring)."""
        return await self._get_json("/health", also=(503,))

    async def models(self) -> list[dict[str, Any]]:
        """The models the peer serves (``GET /v1/models``): one, the ring's."""
        return (await self._get_json("/v1/models"))["data"]

    async def _get_json(self, path: str, also: tuple[int, ...] = ()) -> Any:
        """GET path's JSON; a status other than 200 (or one of ``also`` with a ``status``
        document) raises the error it carries."""
        if self._session is None:
            raise RingError("the client is not open: use 'async with ringllm.connect(...) as client'")
        try:
            async with self._session.get(f"{self.base}{path}") as resp:
                text = await resp.text()
                if resp.status != 200:
                    if resp.status in also:
                        with contextlib.suppress(ValueError):
                            doc = json.loads(text)
                            if isinstance(doc, dict) and "status" in doc:
                                return doc
                    raise _http_error(resp.status, text)
                return json.loads(text)
        except aiohttp.ClientConnectionError as exc:
            raise PeerLostError(self.base, _unreachable(exc)) from None


async def ring_health(addresses: Sequence[str], *, timeout: float = 3.0,
                      ssl: ssl_module.SSLContext | None = None) -> list[dict[str, Any]]:
    """Every address's ``/health`` document, asked concurrently, in the order given.

    A peer that does not answer within ``timeout`` seconds (or answers garbage) gives
    ``{"error": "<why>"}`` instead; this never raises for a down peer.
    """

    async def one(address: str) -> dict[str, Any]:
        try:
            async with Client(address, timeout=timeout, ssl=ssl) as client:
                h = await client.health()
                return h if isinstance(h, dict) and "status" in h else {"error": f"unexpected answer {str(h)[:80]}"}
        except asyncio.TimeoutError:
            return {"error": f"no answer within {timeout:g} s"}
        except PeerLostError as exc:
            return {"error": exc.reason}
        except (RingError, aiohttp.ClientError, ValueError) as exc:
            return {"error": str(exc) or type(exc).__name__}

    return list(await asyncio.gather(*(one(a) for a in addresses)))


def _unreachable(exc: aiohttp.ClientConnectionError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the peer closed the connection"
    return f"cannot reach the peer: {exc}"


def _body(params: dict[str, Any], **inputs: Any) -> dict[str, Any]:
    unknown = sorted(set(params) - GENERATION_PARAMS - _INPUTS)
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r} (allowed: {', '.join(sorted(GENERATION_PARAMS | _INPUTS))})")
    return {**{k: v for k, v in inputs.items() if v is not None}, **params}


def _http_error(status: int, text: str) -> RingError:
    param = code = None
    try:
        err = json.loads(text)["error"]
        msg, param, code = err["message"], err.get("param"), err.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        msg = text.strip()[:300] or f"HTTP {status}"
    if status == 429:
        return QueueFullError(msg)
    if status == 503:
        return PeerLostError.from_message(msg)
    if 400 <= status < 500:
        return RequestError(msg, param=param if isinstance(param, str) else None,
                            code=code if isinstance(code, str) else None)
    return RingError(f"peer error (HTTP {status}): {msg}")


def connect(address: str, *, api_key: str | None = None, timeout: float = 600.0,
            ssl: ssl_module.SSLContext | None = None) -> Client:
    """A client for the peer whose HTTP API listens at ``address`` ("host:port" or a URL).

    ``api_key`` is sent as a bearer token (needed when the ring sets ``[http] api_key``);
    ``timeout`` bounds one whole request in seconds; ``ssl`` is the TLS context for a ring
    with ``[tls]`` (see :class:`Client`).
    """
    return Client(address, api_key=api_key, timeout=timeout, ssl=ssl)
