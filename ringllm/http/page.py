"""The chat web page every peer serves at ``GET /``, and the ring view it shows.

- ``GET /``: ``static/index.html``; ``GET /static/<file>``: its script and style sheet. Plain
  files shipped in the package (no build step, nothing fetched from elsewhere: the
  Content-Security-Policy header allows this origin only). They need no API key: they hold
  no data, and the page sends the key the user types with its API calls.
- ``GET /ringllm/v1/ring``: every peer of the ring and its state, asked by this peer (a page
  cannot ask the other peers itself: they are other origins). The answer is
  ``{"self": rank, "peers": [{"rank", "address", "status", "model", "running", "queue",
  "last_error"} | {"rank", "address", "status": "down", "error"}]}``; ``status`` is the peer's
  own /health status (``ok``, ``down``, ...) or ``down`` when it does not answer.

The page itself (``static/chat.js``) talks only to ``/v1/chat/completions`` (streaming),
``/v1/models`` and ``/ringllm/v1/ring``, and inserts model output and peer names as text,
never as HTML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from aiohttp import web

from ringllm.http.plumbing import PEER_KEY

STATIC = Path(__file__).resolve().parent / "static"
PUBLIC_PREFIX = "/static/"
RING_KEY = web.AppKey("ring_http_addresses", tuple)
HEALTH_KEY = web.AppKey("health_document", object)  # peer -> its /health document
# A down peer costs the ring view this long; the page polls every 3 s, so a shorter wait
# keeps one slow answer from piling up polls (loopback and LAN peers answer in milliseconds).
HEALTH_TIMEOUT = 1.5
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def is_public(path: str) -> bool:
    """The page's own files, which need no API key."""
    return path == "/" or path.startswith(PUBLIC_PREFIX)


async def handle_index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": _CSP,
                                                            "Cache-Control": "no-cache"})


async def handle_ring(request: web.Request) -> web.Response:
    from ringllm.client import ring_health

    peer = request.app[PEER_KEY]
    addresses: Sequence[str] = request.app[RING_KEY]
    others = [(r, a) for r, a in enumerate(addresses) if r != peer.rank]
    answers = await ring_health([a for _, a in others], timeout=HEALTH_TIMEOUT)
    rows = {r: _row(r, a, h) for (r, a), h in zip(others, answers)}
    me = addresses[peer.rank] if peer.rank < len(addresses) else request.host
    rows[peer.rank] = _row(peer.rank, me, request.app[HEALTH_KEY](peer))
    return web.json_response({"self": peer.rank, "peers": [rows[r] for r in sorted(rows)]})


def _row(rank: int, address: str, h: dict[str, Any]) -> dict[str, Any]:
    if "status" not in h:
        return {"rank": rank, "address": address, "status": "down", "error": h.get("error")}
    return {"rank": rank, "address": address, "status": h["status"], "model": h.get("model"),
            "running": h.get("running"), "queue": h.get("queue"), "last_error": h.get("last_error")}


def add_routes(app: web.Application, health: Callable[[Any], dict[str, Any]],
               ring_addresses: Sequence[str] = ()) -> None:
    """The page's routes. ``health(peer)`` is this peer's /health document; ``ring_addresses``
    the HTTP ``host:port`` of every peer in rank order (empty: the view shows this peer only)."""
    app[RING_KEY] = tuple(ring_addresses)
    app[HEALTH_KEY] = health
    add_page_files(app)
    app.router.add_get("/ringllm/v1/ring", handle_ring)


def add_page_files(app: web.Application) -> None:
    """``/`` and ``/static/*`` alone: also served while the peer starts (``joining.py``), so a
    page opened then shows the peer loading or joining (its API calls answer 503 meanwhile)."""
    app.router.add_get("/", handle_index)
    app.router.add_static(PUBLIC_PREFIX, STATIC, follow_symlinks=False, append_version=False)
