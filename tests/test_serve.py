"""From the first command to daily use: ``ringllm serve``, a ring you can watch form (``/health``
while joining, ``status``), a busy HTTP port refused up front, ``ring init`` without hand edits,
and every CLI option either working or refused with a reason. Peers run as real processes."""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request

import psutil
import pytest

from ringllm import __version__
from ringllm.cli import make_parser
from ringllm.fetch import KNOWN_MODELS
from ringllm.ring.config import free_ports
from tests.peer_procs import ROOT, Ring, ring_toml
from tests.ring_thread import RingThread
from tests.test_client_cli import cli


# -- every option works or is refused ----------------------------------------------------------
def _subparsers(p: argparse.ArgumentParser, path: str = "ringllm"):
    yield path, p
    for action in p._actions:  # argparse offers no public walk over its tree
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, f"{path} {name}")


# prompt asks a running ring: these are accepted only to be refused with the reason.
REFUSED = {(cmd, flag) for cmd in ("ringllm prompt", "ringllm chat") for flag in ("--model", "--threads")}


def test_every_option_of_every_subcommand_has_help():
    missing = []
    for path, p in _subparsers(make_parser()):
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = action.option_strings[-1] if action.option_strings else action.dest
            if (path, name) in REFUSED:
                assert action.help == argparse.SUPPRESS, (path, name)
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {name}")
    assert not missing, f"options without help: {missing}"


def test_version():
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"ringllm {__version__}"


@pytest.mark.parametrize("command", ["pull", "models", "serve"])
def test_help_lists_the_known_model_names(command):
    out = cli(command, "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # argparse wraps lines
    assert all(name in text for name in KNOWN_MODELS), text


@pytest.mark.parametrize("flag, value", [("--model", "qwen2.5-coder-0.5b"), ("--threads", "4")])
def test_prompt_refuses_model_and_threads_with_the_reason(flag, value):
    out = cli("prompt", "--peer", "127.0.0.1:1", flag, value, "hi")
    assert out.returncode == 2
    assert out.stderr.startswith(f"ringllm: error: prompt does not take {flag}: it asks a running ring")
    assert len(out.stderr.splitlines()) == 1


def test_threads_default_to_the_cores_this_process_may_use(monkeypatch):
    from ringllm import launch

    monkeypatch.setattr(launch.os, "cpu_count", lambda: 64)  # the host's; a container gets fewer
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert [launch.default_threads(n) for n in (1, 2, 3, 8)] == [4, 2, 1, 1]


def test_the_cli_says_when_the_context_cuts_max_tokens(tiny_model_path):
    with RingThread(peers=1, model=str(tiny_model_path)) as rt:
        prompt = "the " * 40  # the tiny model's context is 128 tokens
        out = cli("prompt", "--peer", rt.addresses[0], "--raw", "--ignore-eos", "--max-tokens", "120", "--json", prompt)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        got, n_prompt = len(doc["ids"]), len(doc["prompt_ids"])
        assert n_prompt + 120 > 128 and got < 120 and doc["finish_reason"] == "length"
        assert (f"the context is full: generated {got} of the 120 tokens asked (--max-tokens) after a "
                f"{n_prompt}-token prompt") in out.stderr
        out = cli("prompt", "--peer", rt.addresses[0], "--raw", "--ignore-eos", "--max-tokens", "3", prompt)
        assert out.returncode == 0 and "context is full" not in out.stderr


# -- ring init --------------------------------------------------------------------------------
def test_ring_init_base_port_and_hosts_need_no_hand_edits(tmp_path):
    def init(*args: str) -> dict:
        out = cli("ring", "init", "--out", "-", *args)
        assert out.returncode == 0, out.stderr
        return tomllib.loads(out.stdout)

    def ports(doc: dict) -> list[tuple[str, int, int]]:
        return [(p["host"], p["port"], p["http_port"]) for p in doc["peer"]]

    assert ports(init("--peers", "3", "--base-port", "9000")) == [
        ("127.0.0.1", 9000, 9003), ("127.0.0.1", 9001, 9004), ("127.0.0.1", 9002, 9005)]
    assert ports(init("--hosts", "10.0.0.1,10.0.0.2,10.0.0.3")) == [
        ("10.0.0.1", 7700, 7701), ("10.0.0.2", 7700, 7701), ("10.0.0.3", 7700, 7701)]
    assert ports(init("--hosts", "a,b,a", "--base-port", "5000", "--http-base-port", "6000")) == [
        ("a", 5000, 6000), ("b", 5000, 6000), ("a", 5001, 6001)]
    for args, msg in [(("--peers", "2", "--hosts", "a,b,c"), "--peers 2 but --hosts names 3 hosts"),
                      (("--peers", "2", "--base-port", "65535"), "ports must be in 1..65535"),
                      (("--peers", "2", "--http-base-port", "9000"), "--http-base-port needs --base-port"),
                      (("--peers", "2", "--base-port", "9000", "--http-base-port", "9001"), "already used by peer[0]"),
                      ((), "needs --peers N or --hosts")]:
        out = cli("ring", "init", "--out", "-", *args)
        assert out.returncode == 2 and msg in out.stderr and len(out.stderr.splitlines()) == 1, (args, out.stderr)


# -- a ring you can watch form; a busy HTTP port -------------------------------------------------
def _status(ring: Ring) -> tuple[int, list[dict]]:
    out = cli("status", "--ring", str(ring.path), "--json")
    return out.returncode, json.loads(out.stdout)


def _health(ring: Ring, rank: int) -> dict | None:
    """rank's /health document, also when it answers 503 (starting); None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{ring.http(rank)}/health", timeout=2) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        assert exc.code == 503, exc.code
        return json.load(exc)
    except OSError:
        return None


def _wait_health(ring: Ring, rank: int, status: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = _health(ring, rank)
        if h is not None and h.get("status") == status:
            return h
        assert time.monotonic() < deadline, f"rank {rank} never said {status!r} (last: {h})\n{ring.log(rank)[-2000:]}"
        time.sleep(0.2)


def test_status_tells_joining_up_and_down_apart(tmp_path, tiny_model_path):
    with Ring(tmp_path, ring_toml(2, str(tiny_model_path))) as ring:
        ring.start(0)  # its neighbour (rank 1, both ways round) is absent
        h = _wait_health(ring, 0, "joining")
        assert h["rank"] == 0 and h["size"] == 2
        assert [(w["rank"], w["address"]) for w in h["waiting_for"]] == [(1, ring.cfg.peers[1].address)]
        assert h["waiting_for"][0]["since"] <= time.time()
        code, rows = _status(ring)
        assert code == 1 and [r["state"] for r in rows] == ["joining", "down"]
        assert f"waiting for rank 1 ({ring.cfg.peers[1].address})" in rows[0]["last_error"]
        # The chat page is served while joining (it then shows the peer's state); the API is not.
        for path, kind in (("/", "text/html"), ("/static/chat.js", "javascript")):
            with urllib.request.urlopen(f"http://{ring.http(0)}{path}", timeout=5) as resp:
                assert resp.status == 200 and kind in resp.headers["Content-Type"], (path, resp.headers)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://{ring.http(0)}/v1/models", timeout=5)
        assert err.value.code == 503
        assert json.loads(err.value.read())["error"]["code"] == "joining"
        # Said in the log without -v, again while the wait lasts.
        ring.wait_log(0, r"forming the ring: waiting for rank 1 \(127\.0\.0\.1:\d+\) for \d+ s")
        ring.start(1)
        ring.wait_up()
        code, rows = _status(ring)
        assert code == 0 and [r["state"] for r in rows] == ["up", "up"]
        ring.kill(1)
        h = _wait_health(ring, 0, "down", timeout=60)  # noticed within dead_after
        code, rows = _status(ring)
        assert code == 1 and [r["state"] for r in rows] == ["failed", "down"]
        deadline = time.monotonic() + 30
        while not (_health(ring, 0) or {}).get("waiting_for"):  # re-forming: whom it waits for
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_a_busy_http_port_stops_only_that_peer_before_it_joins(tmp_path, tiny_model_path):
    with Ring(tmp_path, ring_toml(2, str(tiny_model_path))) as ring:
        ring.start(1)
        _wait_health(ring, 1, "joining")
        held = socket.create_server(("127.0.0.1", ring.cfg.peers[0].http_port))
        try:
            proc = ring.start(0)
            assert proc.wait(120) == 2
            log = ring.log(0).split("==== start 1 ====\n", 1)[1]
            assert log == (f"ringllm: error: rank 0: cannot serve HTTP on {ring.http(0)}: Address already in use "
                           "(is another peer or server using it? pick another http_port)\n")
        finally:
            held.close()
        assert ring.alive(1) and _health(ring, 1)["status"] == "joining"  # nothing else disturbed
        ring.start(0)
        ring.wait_up()


# -- ringllm serve -----------------------------------------------------------------------------
def _free_run(n: int) -> int:
    """A port p with p..p+n-1 free a moment ago."""
    for _ in range(50):
        base = free_ports(1)[0]
        socks = []
        try:
            for k in range(n):
                socks.append(socket.create_server(("127.0.0.1", base + k)))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no run of free ports")


class Serve:
    """``ringllm serve`` as a subprocess; its stderr lines arrive in ``lines``."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, "-m", "ringllm", "serve", *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)  # end of its stderr

    def wait_for(self, text: str, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in s for s in self.seen):
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"serve never said {text!r}:\n{''.join(self.seen)[-3000:]}") from None
            if line is None:
                self.lines.put(None)
                raise AssertionError(f"serve ended ({self.proc.wait()}) without saying {text!r}:\n"
                                     f"{''.join(self.seen)[-3000:]}")
            self.seen.append(line)

    def peers(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.model
def test_serve_three_peers_streams_to_the_openai_client_from_each_peer():
    from openai import OpenAI

    port = _free_run(3)
    serve = Serve("--peers", "3", "--port", str(port))
    try:
        for r in range(3):
            serve.wait_for(f"rank {r}: http://127.0.0.1:{port + r}/")
        serve.wait_for("ring up: 3 peer(s)")
        peers = serve.peers()
        assert len(peers) == 3
        for r in range(3):
            client = OpenAI(base_url=f"http://127.0.0.1:{port + r}/v1", api_key="none")
            model = client.models.list().data[0].id
            stream = client.chat.completions.create(model=model, stream=True, max_tokens=8, temperature=0,
                                                    messages=[{"role": "user", "content": "Say hello."}])
            pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
            assert len(pieces) >= 2 and "".join(pieces).strip(), (r, pieces)
        serve.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends it
        assert serve.proc.wait(60) == 0
        _, alive = psutil.wait_procs(peers, timeout=30)
        assert not alive, f"orphan peers: {alive}"
        serve.wait_for("stopping the ring")
    finally:
        serve.close()


def test_serve_refuses_a_busy_port_and_its_peers_die_with_it(tiny_model_path):
    port = _free_run(2)
    held = socket.create_server(("127.0.0.1", port + 1))
    try:
        out = cli("serve", "--peers", "2", "--port", str(port), "--model", str(tiny_model_path))
        assert out.returncode == 2
        assert out.stderr == (f"ringllm: error: rank 1: cannot serve HTTP on 127.0.0.1:{port + 1}: Address already in "
                              "use (is another peer or server using it? pick another http_port)\n")
    finally:
        held.close()
    serve = Serve("--peers", "2", "--port", str(port), "--model", str(tiny_model_path))
    try:
        serve.wait_for("ring up: 2 peer(s)")
        peers = serve.peers()
        assert len(peers) == 2
        serve.proc.kill()  # no chance to clean up: the kernel tells the peers
        serve.proc.wait()
        _, alive = psutil.wait_procs(peers, timeout=60)
        assert not alive, f"orphan peers: {alive}"
    finally:
        serve.close()


def test_serve_host_and_api_key(tiny_model_path, monkeypatch):
    """``serve --host 0.0.0.0 --api-key-env VAR``: HTTP on every interface, the key required;
    an unset VAR, or a busy port on that host, refused before any peer starts."""
    port = _free_run(1)
    out = cli("serve", "--peers", "1", "--port", str(port), "--host", "0.0.0.0", "--api-key-env", "RINGLLM_TEST_NO_SUCH_VAR",
              "--model", str(tiny_model_path))
    assert out.returncode == 2
    assert "--api-key-env RINGLLM_TEST_NO_SUCH_VAR: that environment variable is not set" in out.stderr
    monkeypatch.setenv("RINGLLM_TEST_KEY", "k-serve")
    serve = Serve("--peers", "1", "--port", str(port), "--host", "0.0.0.0", "--api-key-env", "RINGLLM_TEST_KEY",
                  "--model", str(tiny_model_path))
    try:
        serve.wait_for(f"rank 0: http://127.0.0.1:{port}/")
        serve.wait_for("listening on every interface (0.0.0.0)")
        serve.wait_for("ring up: 1 peer(s)")
        assert not any("without an API key" in s for s in serve.seen)
        url = f"http://127.0.0.1:{port}/v1/models"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=10)
        assert err.value.code == 401
        req = urllib.request.Request(url, headers={"Authorization": "Bearer k-serve"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
    finally:
        serve.close()


def test_serve_on_another_loopback_address_shows_every_peer_there(tiny_model_path):
    """``serve --host 127.0.0.2``: the URLs, the wait for the ring and the chat page's ring
    view all use the peers' HTTP host, not their ring host (127.0.0.1, where nothing serves
    HTTP); a loopback host needs no API key and gets no warning."""
    port = _free_run(2)
    serve = Serve("--peers", "2", "--port", str(port), "--host", "127.0.0.2", "--model", str(tiny_model_path))
    try:
        serve.wait_for(f"rank 1: http://127.0.0.2:{port + 1}/")
        serve.wait_for("ring up: 2 peer(s)")
        assert not any("without an API key" in s for s in serve.seen)
        with urllib.request.urlopen(f"http://127.0.0.2:{port}/ringllm/v1/ring", timeout=30) as resp:
            rows = json.load(resp)["peers"]
        assert [(r["rank"], r["address"], r["status"]) for r in rows] == [
            (0, f"127.0.0.2:{port}", "ok"), (1, f"127.0.0.2:{port + 1}", "ok")]
    finally:
        serve.close()


def test_serve_ring_toml_puts_http_on_the_host_and_links_on_loopback(tmp_path, monkeypatch):
    from ringllm.launch import serve_ring_toml
    from ringllm.ring.config import load_ring

    monkeypatch.setenv("RINGLLM_TEST_KEY", "k")
    path = tmp_path / "ring.toml"
    path.write_text(serve_ring_toml(2, "m.gguf", port=9100, host="0.0.0.0", api_key_env="RINGLLM_TEST_KEY"))
    cfg = load_ring(path)
    assert cfg.http_host == "0.0.0.0" and cfg.api_key == "k"
    assert [(p.host, p.http_port) for p in cfg.peers] == [("127.0.0.1", 9100), ("127.0.0.1", 9101)]
    path.write_text(serve_ring_toml(1, "m.gguf", port=9100))
    cfg = load_ring(path)
    assert cfg.http_host == "127.0.0.1" and cfg.api_key is None


@pytest.mark.parametrize("host,why", [
    ("no-such-host.invalid", "the host does not resolve (Name or service not known)"),
    ("192.0.2.10", "Cannot assign requested address"),  # TEST-NET: not an address of this machine
])
def test_bind_http_names_why_a_host_cannot_serve(host, why):
    from ringllm.errors import ConfigError
    from ringllm.http.joining import bind_http

    with pytest.raises(ConfigError) as err:
        bind_http(host, 8123, 2)
    assert str(err.value) == f"rank 2: cannot serve HTTP on {host}:8123: {why}"
