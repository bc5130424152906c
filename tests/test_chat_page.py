"""The chat page every peer serves at ``GET /``: its files, the ring view, and the page itself
driven in a real headless chromium over the DevTools protocol (a websocket, through aiohttp,
which ringllm already depends on: no selenium or chromedriver needed).

Without /usr/bin/chromium (Debian: ``apt-get install chromium``) the browser tests are
skipped with that reason. ``RINGLLM_SCREENSHOT=path`` saves the page after a streamed reply
(docs/chat.png was made this way).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from tests.peer_procs import Ring, ring_toml

pytestmark = pytest.mark.model
CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason=f"{CHROMIUM} is absent (Debian: apt-get install chromium)")


@pytest.fixture(scope="module")
def peer(tmp_path_factory, smollm2_path):
    """One SmolLM2 peer (P=1) serving HTTP, as `ringllm peer` runs it."""
    tmp = tmp_path_factory.mktemp("page")
    with Ring(tmp, ring_toml(1, str(smollm2_path)), tag="page") as ring:
        ring.start_all()
        ring.wait_up()
        yield ring


def _get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_page_and_its_files_are_served_without_anything_from_elsewhere(peer):
    base = f"http://{peer.http(0)}"
    status, headers, html = _get(base + "/")
    assert status == 200, html[:300]
    assert headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    text = html.decode()
    refs = re.findall(r'(?:src|href)="([^"]+)"', text)
    assert sorted(refs) == ["/static/chat.css", "/static/chat.js"]
    for ref in refs:
        status, _, body = _get(base + ref)
        assert status == 200 and body, ref
        assert not re.search(rb"https?://", body), f"{ref} refers to another site"
    js = _get(base + "/static/chat.js")[2].decode()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "document.write" not in js
    assert _get(base + "/static/../app.py")[0] == 404


def test_the_ring_view_lists_every_peer_with_its_state(peer):
    with urllib.request.urlopen(f"http://{peer.http(0)}/ringllm/v1/ring", timeout=10) as resp:
        ring = json.load(resp)
    assert ring["self"] == 0
    assert [(p["rank"], p["address"], p["status"]) for p in ring["peers"]] == [(0, peer.http(0), "ok")]


def _get_json(url: str, key: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_the_ring_view_asks_every_peer_and_shows_a_dead_one_down_and_needs_the_api_key(tmp_path, tiny_model_path):
    toml = ring_toml(2, str(tiny_model_path), heartbeat=0.3, dead_after=1.0, extra='[http]\napi_key = "k3y"')
    with Ring(tmp_path, toml, tag="view") as ring:
        ring.start_all()
        ring.wait_up()
        base = f"http://{ring.http(1)}"
        assert _get(base + "/")[0] == 200 and _get(base + "/static/chat.js")[0] == 200  # no key needed
        status, doc = _get_json(base + "/ringllm/v1/ring")
        assert status == 401 and doc["error"]["code"] == "invalid_api_key"
        status, doc = _get_json(base + "/ringllm/v1/ring", "k3y")
        assert status == 200 and doc["self"] == 1
        assert [(p["rank"], p["address"], p["status"]) for p in doc["peers"]] == [
            (0, ring.http(0), "ok"), (1, ring.http(1), "ok")]
        ring.kill(0)
        status, doc = _get_json(base + "/ringllm/v1/ring", "k3y")
        assert status == 200
        dead, alive = doc["peers"]
        assert (dead["rank"], dead["status"]) == (0, "down") and "cannot connect" in dead["error"], dead
        assert alive["rank"] == 1 and alive["address"] == ring.http(1)


# -- a real browser -----------------------------------------------------------------------
class Browser:
    """Headless chromium and one page, driven over the DevTools protocol."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.proc: subprocess.Popen | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.n = 0

    async def __aenter__(self) -> "Browser":
        self.profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--disable-background-networking", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "--window-size=1000,640", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert self.proc.poll() is None, f"chromium exited ({self.proc.returncode})"
            assert time.monotonic() < deadline, "chromium never opened its DevTools port"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            pages = [t for t in await resp.json() if t["type"] == "page"]
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()
        if self.proc is not None:  # chromium and its helpers: the process group it leads
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    async def call(self, method: str, **params) -> dict:
        self.n += 1
        await self.ws.send_json({"id": self.n, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), 60)
            if msg.get("id") == self.n:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg["result"]

    async def js(self, expression: str):
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, f"{expression}: {r['exceptionDetails']}"
        return r["result"].get("value")

    async def open(self, url: str) -> None:
        await self.call("Page.enable")
        await self.call("Page.navigate", url=url)
        await self.until("document.readyState === 'complete' && !!document.getElementById('send')")

    async def until(self, expression: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not await self.js(expression):
            assert time.monotonic() < deadline, f"never true: {expression}"
            await asyncio.sleep(0.05)

    async def click(self, element_id: str) -> None:
        """A real mouse click in the middle of the element."""
        box = await self.js(f"(() => {{ const r = document.getElementById({element_id!r}).getBoundingClientRect();"
                            " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    async def type(self, element_id: str, text: str) -> None:
        await self.click(element_id)
        await self.call("Input.insertText", text=text)

    async def ask(self, question: str, max_tokens: int) -> list[str]:
        """Greedy, at most ``max_tokens``: type ``question``, send it, and watch the reply."""
        await self.js("document.getElementById('temperature').value = '0';"
                      f"document.getElementById('max_tokens').value = '{max_tokens}'")
        await self.type("input", question)
        await self.click("send")
        return await self.watch_reply()

    async def watch_reply(self) -> list[str]:
        """The last reply's text, sampled until the page is idle again (distinct values, in order)."""
        seen: list[str] = []
        deadline = time.monotonic() + 180
        while True:
            text, state = await self.js("[Array.from(document.querySelectorAll('.msg.assistant .body')).pop()"
                                        "?.textContent ?? null, document.body.dataset.state]")
            if text and (not seen or seen[-1] != text):
                seen.append(text)
            if state == "idle" and seen:
                return seen
            assert time.monotonic() < deadline, f"the reply never ended: {seen[-1:]}"
            await asyncio.sleep(0.03)


def _greedy_reply(address: str, content: str, max_tokens: int) -> str:
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": content}], "temperature": 0,
                       "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(f"http://{address}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.load(resp)["choices"][0]["message"]["content"]


def _metric(address: str, name: str) -> float:
    text = _get(f"http://{address}/metrics")[2].decode()
    return sum(float(m) for m in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@needs_chromium
async def test_a_message_typed_in_the_page_streams_its_reply_and_stop_cancels_on_the_server(peer, tmp_path):
    address = peer.http(0)
    async with Browser(tmp_path / "profile") as b:
        await b.open(f"http://{address}/")
        await b.until("document.querySelector('#peers .state')?.textContent === 'ok'")
        question = "Name three colours of the rainbow."
        seen = await b.ask(question, 48)
        # The text grew while it streamed, over several steps, and what stayed is exactly
        # the greedy reply the API gives for the same conversation.
        assert len(seen) >= 3, seen
        assert all(seen[k + 1].startswith(seen[k]) for k in range(len(seen) - 1)), seen
        assert seen[-1] == _greedy_reply(address, question, 48)
        status = await b.js("document.getElementById('status').textContent")
        assert re.match(r"done \((stop|length)\): \d+ tokens, [\d.]+ tokens/s", status), status
        assert re.search(r"[\d.]+ tokens/s", await b.js("document.getElementById('speed').textContent"))
        assert await b.js("document.querySelectorAll('.msg.user').length") == 1
        if shot := os.environ.get("RINGLLM_SCREENSHOT"):
            png = base64.b64decode((await b.call("Page.captureScreenshot", format="png"))["data"])
            Path(shot).write_bytes(png)

        # Stop: the fetch is aborted mid-reply and the peer cancels the sequence.
        cancelled = _metric(address, "ringllm_requests_finished_total")
        await b.js("document.getElementById('max_tokens').value = '2000'")
        await b.type("input", "Write a very long story about a dragon who learns to count.")
        await b.click("send")
        await b.until("(Array.from(document.querySelectorAll('.msg.assistant .body')).pop()"
                      "?.textContent.length ?? 0) > 0")
        await b.click("stop")
        await b.until("document.body.dataset.state === 'idle'")
        status = await b.js("document.getElementById('status').textContent")
        assert status.startswith("stopped: "), status
        stopped_text = await b.js("Array.from(document.querySelectorAll('.msg.assistant .body')).pop().textContent")
        deadline = time.monotonic() + 60
        while not ((h := peer.health(0)) and h["running"] == 0 and h["queue"] == 0
                   and _metric(address, "ringllm_requests_finished_total") > cancelled):
            assert time.monotonic() < deadline, f"the peer still runs the stopped request: {h}"
            await asyncio.sleep(0.1)
        metrics = _get(f"http://{address}/metrics")[2].decode()
        assert re.search(r'ringllm_requests_finished_total\{[^}]*outcome="cancelled"[^}]*\} 1', metrics), metrics
        assert len(stopped_text) < 2000 * 3  # far from a full 2000-token story
        # The conversation goes on after a stop: both replies are kept.
        assert await b.js("JSON.parse(localStorage.getItem('ringllm.chat.v1')).messages.length") == 4


@needs_chromium
async def test_the_page_of_every_peer_of_ringllm_serve_streams_a_reply(tmp_path):
    """Issue 14's acceptance: `ringllm serve --peers 3`, then the page of each peer, in a real
    browser, gets a streamed answer (the same greedy text as the API gives)."""
    from tests.test_serve import Serve, _free_run

    port = _free_run(3)
    serve = Serve("--peers", "3", "--port", str(port))
    try:
        serve.wait_for("ring up: 3 peer(s)")
        async with Browser(tmp_path / "profile") as b:
            for r in range(3):
                address = f"127.0.0.1:{port + r}"
                await b.open(f"http://{address}/")  # its own origin: a fresh conversation
                await b.until("document.querySelectorAll('#peers .state').length === 3 && Array.from("
                              "document.querySelectorAll('#peers .state')).every(e => e.textContent === 'ok')")
                question = "Say hello."
                seen = await b.ask(question, 16)
                assert len(seen) >= 2 and all(seen[k + 1].startswith(seen[k]) for k in range(len(seen) - 1)), (r, seen)
                assert seen[-1] == _greedy_reply(address, question, 16), r
    finally:
        serve.proc.send_signal(signal.SIGINT)
        try:
            serve.proc.wait(60)
        finally:
            serve.close()


@needs_chromium
async def test_a_page_opened_while_the_peer_joins_shows_it_and_then_the_model(tmp_path, tiny_model_path):
    """A starting peer serves the page; the page says the peer is joining, and once the ring is
    up its ring view turns ok and it asks for the model again (it showed "model: ?" before)."""
    with Ring(tmp_path, ring_toml(2, str(tiny_model_path)), tag="early") as ring:
        ring.start(0)  # rank 1 absent: rank 0 stays joining
        deadline = time.monotonic() + 120
        while not ((h := _health_any(ring.http(0))) and h["status"] == "joining"):
            assert time.monotonic() < deadline, h
            await asyncio.sleep(0.2)
        async with Browser(tmp_path / "profile") as b:
            await b.open(f"http://{ring.http(0)}/")
            await b.until("/joining the ring/.test(document.getElementById('peers').textContent)")
            assert (await b.js("document.getElementById('model').textContent")).startswith("model: ?")
            ring.start(1)
            ring.wait_up()
            await b.until("document.querySelector('#peers .state')?.textContent === 'ok'")
            await b.until("/^model: (?!\\?)/.test(document.getElementById('model').textContent)")


def _health_any(address: str) -> dict | None:
    """/health's document, also while it answers 503 (starting); None when nothing answers."""
    try:
        status, _, body = _get(f"http://{address}/health")
    except OSError:
        return None
    return json.loads(body) if status in (200, 503) else None
