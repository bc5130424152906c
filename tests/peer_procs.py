"""Rings of real peer processes on 127.0.0.1, for the reliability, security and soak tests.

Each peer is its own process, started as ``ringllm peer --ring ring.toml --rank N`` is (or,
with a listen override, through :func:`ringllm.launch.serve_peer` with ``listen=``, so a test
proxy can sit in front of it). Its log goes to a file the test can search. Also a small TCP
proxy that can drop or freeze its connections (a cut link), and ring.toml writers.

Run as ``python -m tests.peer_procs --ring R --rank N --listen PORT`` to start a peer that
listens on PORT instead of its ring.toml port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from ringllm.ring.config import free_ports, load_ring

ROOT = Path(__file__).resolve().parent.parent


def ring_toml(n: int, model: str, *, name: str = "test", secret: str | None = None, heartbeat: float = 0.5,
              dead_after: float = 2.5, extra: str = "", models: dict[int, str] | None = None,
              ports: list[int] | None = None) -> str:
    """The text of a loopback ring.toml with free ports (or ``ports``: 2 per peer)."""
    ports = ports or free_ports(2 * n)
    lines = [f'name = "{name}"', f'model = "{model}"', f'secret = "{secret or secrets.token_hex(16)}"',
             f"heartbeat_interval = {heartbeat}", f"dead_after = {dead_after}", extra, ""]
    for r in range(n):
        lines += ["[[peer]]", 'host = "127.0.0.1"', f"port = {ports[2 * r]}", f"http_port = {ports[2 * r + 1]}"]
        if models and r in models:
            lines.append(f'model = "{models[r]}"')
        lines.append("")
    return "\n".join(lines)


class Ring:
    """Peer processes of one ring.toml. ``start(rank)``, ``kill(rank)``, ``log(rank)``,
    ``wait_up()``; ``stop()`` (always: use as a context manager) ends them all."""

    def __init__(self, tmp: Path, toml: str, *, tag: str = "ring") -> None:
        self.dir = tmp
        self.path = tmp / f"{tag}.toml"
        self.path.write_text(toml)
        self.cfg = load_ring(self.path)
        self.tag = tag
        self.procs: dict[int, subprocess.Popen] = {}
        self.listen: dict[int, int] = {}
        self.starts: dict[int, int] = {}

    def __enter__(self) -> "Ring":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def http(self, rank: int) -> str:
        return f"127.0.0.1:{self.cfg.peers[rank].http_port}"

    def logfile(self, rank: int) -> Path:
        return self.dir / f"{self.tag}-peer{rank}.log"

    def log(self, rank: int) -> str:
        try:
            return self.logfile(rank).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, rank: int, *, ring_path: Path | None = None, listen: int | None = None) -> subprocess.Popen:
        """Start (or restart) rank's process; its log is appended to :meth:`logfile`."""
        ring_path = ring_path or self.path
        if listen is not None:
            self.listen[rank] = listen
        listen = self.listen.get(rank)
        if listen is None:
            cmd = [sys.executable, "-m", "ringllm", "peer", "--ring", str(ring_path), "--rank", str(rank),
                   "--threads", "1"]
        else:
            cmd = [sys.executable, "-m", "tests.peer_procs", "--ring", str(ring_path), "--rank", str(rank),
                   "--listen", str(listen)]
        logf = open(self.logfile(rank), "ab")
        self.starts[rank] = self.starts.get(rank, 0) + 1
        logf.write(f"==== start {self.starts[rank]} ====\n".encode())
        logf.flush()
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=ROOT, env=env)
        logf.close()
        self.procs[rank] = proc
        return proc

    def start_all(self) -> None:
        for r in range(self.cfg.size):
            self.start(r)

    def pid(self, rank: int) -> int:
        return self.procs[rank].pid

    def alive(self, rank: int) -> bool:
        return rank in self.procs and self.procs[rank].poll() is None

    def signal(self, rank: int, sig: int) -> None:
        os.kill(self.procs[rank].pid, sig)

    def kill(self, rank: int) -> None:
        """SIGKILL rank's process and reap it."""
        proc = self.procs[rank]
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)

    def health(self, rank: int, timeout: float = 2.0) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://{self.http(rank)}/health", timeout=timeout) as resp:
                return json.load(resp)
        except (OSError, ValueError):
            return None

    def wait_up(self, ranks: list[int] | None = None, timeout: float = 120.0) -> float:
        """Wait until every rank's /health says ok; returns the seconds waited.

        Raises AssertionError with the tail of the log of a peer that exited or never came up.
        """
        ranks = list(range(self.cfg.size)) if ranks is None else ranks
        t0 = time.monotonic()
        pending = set(ranks)
        while pending:
            for r in sorted(pending):
                if r in self.procs and self.procs[r].poll() is not None:
                    raise AssertionError(f"peer {r} exited ({self.procs[r].returncode}):\n{self.log(r)[-3000:]}")
                h = self.health(r, timeout=1.0)
                if h is not None and h.get("status") == "ok":
                    pending.discard(r)
            if time.monotonic() - t0 > timeout:
                tails = "\n".join(f"--- peer {r}:\n{self.log(r)[-2000:]}" for r in sorted(pending))
                raise AssertionError(f"ranks {sorted(pending)} not up after {timeout:g} s\n{tails}")
            if pending:
                time.sleep(0.2)
        return time.monotonic() - t0

    def wait_log(self, rank: int, pattern: str, timeout: float = 30.0, after: int = 0) -> re.Match:
        """Wait until rank's log (from character ``after`` on) matches ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.log(rank)[after:])
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"rank {rank}'s log never matched {pattern!r}:\n{self.log(rank)[after:][-3000:]}")
            time.sleep(0.1)

    def rss_kb(self, rank: int) -> int:
        for line in Path(f"/proc/{self.pid(rank)}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        """SIGCONT (in case a test stopped one) and SIGTERM every peer; SIGKILL stragglers."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                    proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Proxy:
    """A TCP proxy on 127.0.0.1 (a cut link): forwards each connection to ``target``.

    Runs its own event loop in a thread, so it outlives any test's loop. ``drop()`` resets
    every current connection (both ends see a reset, as when a middlebox drops the flow);
    ``freeze()`` stops forwarding on them but keeps them open (both ends see silence). New
    connections are forwarded normally either way, so the ring can form again through it.
    """

    def __init__(self, target: tuple[str, int], port: int) -> None:
        self.target, self.port = target, port
        self._conns: list[dict[str, Any]] = []
        self._frozen: list[dict[str, Any]] = []  # closed only when the proxy stops
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def __enter__(self) -> "Proxy":
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.drop()
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._on_conn, "127.0.0.1", self.port, reuse_address=True)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in self._frozen:
            for w in c["writers"]:
                w.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        conn = {"frozen": False, "writers": (writer, uw)}
        self._conns.append(conn)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    if conn["frozen"]:
                        continue  # swallowed: the far end hears nothing
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                if not conn["frozen"]:
                    with contextlib.suppress(Exception):
                        w.close()

        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))

    def freeze(self) -> int:
        """Stop forwarding on every open connection; returns how many."""

        async def go() -> int:
            for c in self._conns:
                c["frozen"] = True
            self._frozen += self._conns
            n, self._conns = len(self._conns), []
            return n

        return self._call(go())

    def drop(self) -> int:
        """Reset every open connection; returns how many."""

        async def go() -> int:
            for c in self._conns:
                for w in c["writers"]:
                    sock = w.get_extra_info("socket")
                    if sock is not None:
                        with contextlib.suppress(OSError):
                            # SO_LINGER 0: the close sends RST.
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    w.transport.abort()
            n, self._conns = len(self._conns), []
            return n

        return self._call(go())


def main() -> None:
    from ringllm.launch import _run_until_signal, serve_peer

    ap = argparse.ArgumentParser()
    ap.add_argument("--ring", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--listen", type=int, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    cfg = load_ring(args.ring)
    _run_until_signal(serve_peer(cfg, args.rank, threads=1, listen=("127.0.0.1", args.listen)))


if __name__ == "__main__":
    main()
