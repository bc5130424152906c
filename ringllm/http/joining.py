"""A peer's HTTP before its ring first forms: the port is bound before anything else, and
``/health`` answers at once while the model loads and the ring forms.

While starting, the chat page (``/`` and its ``/static/`` files) is served as usual, so a page
opened early shows the peer loading or joining; every other route answers 503: ``/health``
with the peer's state (llama-server answers its "loading model" the same way), the others
(the API, the page's own calls included) with an OpenAI-shaped error::

    {"status": "loading" | "joining", "rank": 1, "size": 3, "since": 1733350000.0,
     "waiting_for": [{"rank": 2, "address": "127.0.0.1:7702", "since": 1733350003.1, "seconds": 4.2}],
     "message": "joining the ring: waiting for rank 2 (127.0.0.1:7702) for 4 s"}

``since`` is when the state began, each ``waiting_for`` entry's ``since`` when this peer began
waiting for that neighbour (``time.time()``). Once the ring is up the peer's own app
(:func:`ringllm.http.app.make_app`) takes over the same listening socket.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Any

from aiohttp import web

from ringllm.errors import ConfigError
from ringllm.http.page import add_page_files
from ringllm.ring.formation import FormationProgress


def bind_http(host: str, port: int, rank: int) -> socket.socket:
    """The peer's listening HTTP socket; a busy or unusable address is a one-line ConfigError.

    Bound first thing, so a peer that could not serve HTTP never joins the ring (and cannot
    take the others down with it later)."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=128)
    except OSError as exc:
        if exc.errno is not None and exc.errno < 0:  # getaddrinfo's (EAI_*), not the OS's
            why = f"the host does not resolve ({exc.strerror.split(' (while')[0]})"
        else:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno == errno.EADDRINUSE:
            why += " (is another peer or server using it? pick another http_port)"
        raise ConfigError(f"rank {rank}: cannot serve HTTP on {host}:{port}: {why}") from None


class StartupState:
    """What a starting peer is doing: ``loading`` its shard, then ``joining`` the ring."""

    def __init__(self, rank: int, size: int, progress: FormationProgress) -> None:
        self.rank, self.size, self.progress = rank, size, progress
        self.phase, self.since = "loading", time.time()

    def joining(self) -> None:
        self.phase, self.since = "joining", time.time()

    def waiting_for(self) -> list[dict[str, Any]]:
        return waiting_entries(self.progress)

    def message(self) -> str:
        if self.phase == "loading":
            return "loading the model"
        return "joining the ring" + waiting_text(self.waiting_for())

    def health(self) -> dict[str, Any]:
        return {"status": self.phase, "rank": self.rank, "size": self.size, "since": self.since,
                "waiting_for": self.waiting_for(), "message": self.message()}


def waiting_entries(progress: FormationProgress) -> list[dict[str, Any]]:
    """``progress.waiting_for()`` as /health's ``waiting_for`` entries (see module doc)."""
    now = time.time()
    return [{"rank": r, "address": a, "since": t, "seconds": round(now - t, 1)} for r, a, t in progress.waiting_for()]


def waiting_text(waiting: list[dict[str, Any]]) -> str:
    """``": waiting for rank 2 (127.0.0.1:7702) for 4 s, ..."``, or ``""`` for nobody."""
    return (": waiting for " + ", ".join(f"rank {w['rank']} ({w['address']}) for {w['seconds']:.0f} s"
                                         for w in waiting)) if waiting else ""


def make_joining_app(state: StartupState) -> web.Application:
    """The app served while starting: the chat page, else 503 with ``/health`` saying why
    (see module doc)."""

    async def health(request: web.Request) -> web.Response:
        return web.json_response(state.health(), status=503, headers={"Retry-After": "1"})

    async def unavailable(request: web.Request) -> web.Response:
        body = {"error": {"message": f"the peer is starting ({state.message()}); retry when /health says ok",
                          "type": "unavailable_error", "param": None, "code": state.phase}}
        return web.json_response(body, status=503, headers={"Retry-After": "1"})

    app = web.Application()
    app.router.add_get("/health", health)
    add_page_files(app)
    app.router.add_route("*", "/{tail:.*}", unavailable)
    return app
