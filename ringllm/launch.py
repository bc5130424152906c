"""Processes: ``ringllm peer`` (one peer from ring.toml), ``ringllm local --peers N`` (one
reply) and ``ringllm serve --peers N`` (a local ring until Ctrl-C).

A peer process logs one line per state change (loading, joining, ring up, ring lost, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ringllm.errors import ConfigError, ModelError, RingError
from ringllm.fetch import resolve_model
from ringllm.file_hash import file_sha256
from ringllm.memory import limit_malloc_arenas
from ringllm.ring.config import WILDCARD_HOSTS, RingConfig, init_ring_toml, is_loopback, load_ring

if TYPE_CHECKING:  # loaded when a command runs (the model's modules take a while to import)
    from ringllm.generation import Completion

log = logging.getLogger("ringllm.peer")


def default_threads(peers_on_this_machine: int) -> int:
    """The cores this process may run on (its CPU affinity: a container's share, not the
    host's count), shared out among the peers on this machine; at least 1."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, peers_on_this_machine))


def may_spin(cfg: RingConfig, rank: int) -> bool:
    """Whether rank's compute thread may busy-wait for decode all-reduce frames: only if every
    peer ring.toml puts on this peer's host can have a core of its own (P=2 on 2 cores,
    side by side: 1.13x -> 1.21x the speed of one peer; a peer spinning on a core another
    peer needs slows both)."""
    host = cfg.peer(rank).host
    return sum(p.host == host for p in cfg.peers) <= len(os.sched_getaffinity(0))


def ring_config_claim(cfg: RingConfig, kernels: str) -> str:
    """The ring.toml settings every peer must share, as canonical JSON for the handshake.

    A peer started from a different ring.toml is refused with the differing key named. Left
    out: the secret (the handshake's MAC proves it), model names and paths (the model
    fingerprint covers the file), and the per-host [http] and [tls] file paths. ``kernels`` is
    the family this peer computes with (numba and numpy sum in other orders, so a mixed ring
    would not be bit-identical): the one chosen, not ring.toml's ``auto``.
    """
    shared = {"name": cfg.name, "wire": cfg.wire, "kernels": kernels, "context_length": cfg.context_length,
              "max_batch": cfg.max_batch, "max_queue": cfg.max_queue,
              "heartbeat_interval": cfg.heartbeat_interval, "dead_after": cfg.dead_after,
              "tls": cfg.tls is not None, "peers": [[p.host, p.port, p.weight] for p in cfg.peers]}
    return json.dumps(shared, sort_keys=True, separators=(",", ":"))


def ring_timeouts(cfg: RingConfig) -> tuple[float, float]:
    """(handshake timeout, recv timeout) derived from ``dead_after``.

    A newcomer gets a few heartbeats' time to finish its handshake (bounded, so a silent
    connection is dropped quickly); a collective may wait long for a neighbour that keeps
    pinging (e.g. one computing a long prefill), while silence fails it after ``dead_after``.
    """
    return min(10.0, max(3.0, 2 * cfg.dead_after)), max(30.0, 6 * cfg.dead_after)


async def serve_peer(cfg: RingConfig, rank: int, *, threads: int = 1, kernels: str | None = None,
                     listen: tuple[str, int] | None = None) -> None:
    """Bind rank's HTTP port, load its shard, join the ring, and drive steps until cancelled.

    HTTP answers from the start (:mod:`ringllm.http.joining`: ``/health`` is 503 ``loading``,
    then ``joining`` with whom it waits for, logged every WAIT_LOG_SECONDS); a busy ring or
    HTTP port raises ConfigError before anything else happens. Once the ring is up the peer's own app
    serves on the same socket.

    A broken ring does not end it: in-flight requests fail with PeerLostError naming the lost
    peer, the model stays loaded, HTTP keeps answering (``/health`` says ``down``, requests get
    503), the ring is formed again with back-off, and work resumes when every peer is back.
    The listening port stays open throughout, so strangers are handshaked and dropped with a
    logged reason at any time. Raises on the first formation if a neighbour refuses us for a
    configuration mismatch (retrying cannot fix that). ``listen`` overrides the address this
    peer listens on (e.g. behind a proxy); others still connect to ring.toml's address.
    ``kernels`` overrides ring.toml's kernel family.
    """

    from ringllm.http.app import make_app
    from ringllm.http.serve import HttpLimits, serve_http
    from ringllm.http.joining import StartupState, bind_http, make_joining_app
    from ringllm.peer import Peer
    from ringllm.ring.formation import FormationProgress, RingListener, bind_ring_port, open_tcp_ring
    from ringllm.ring.handshake import HandshakeInfo
    from ringllm.ring.tls import http_server_context, peer_contexts

    me_cfg = cfg.peer(rank)
    addrs = [(p.host, p.port) for p in cfg.peers]
    # Both ports first: a busy one stops this peer before it loads or joins anything.
    ring_sock = bind_ring_port(rank, *(listen or addrs[rank])) if cfg.size > 1 else None
    try:
        http_sock = bind_http(cfg.http_host, me_cfg.http_port, rank)
    except BaseException:
        if ring_sock is not None:
            ring_sock.close()
        raise
    progress = FormationProgress()
    state = StartupState(rank, cfg.size, progress)
    http_ssl = http_server_context(cfg.tls) if cfg.tls else None
    limits = HttpLimits(cfg.http_header_timeout, cfg.http_body_timeout, cfg.http_max_connections)
    starting = http = listener = waiter = None
    try:
        # Served on a duplicate of the socket: stopping this app closes only the duplicate, so
        # the port stays bound while the peer's own app takes over.
        starting = await serve_http(make_joining_app(state), sock=http_sock.dup(), ssl=http_ssl, limits=limits)
        log.info("rank %d: HTTP%s on %s:%d answers /health while starting", rank, "S" if http_ssl else "",
                 cfg.http_host, me_cfg.http_port)
        waiter = asyncio.create_task(_log_waiting(rank, progress))
        model, info, plan, chosen = await _load(cfg, rank, threads, kernels)
        me = HandshakeInfo(ring=cfg.name, rank=rank, size=cfg.size, model=info.fingerprint, plan=plan.digest(),
                           config=ring_config_claim(cfg, chosen.family))
        hs_timeout, recv_timeout = ring_timeouts(cfg)
        server_ssl, client_ssl = peer_contexts(cfg.tls) if cfg.tls else (None, None)
        if ring_sock is not None:
            listener = RingListener(rank, cfg.size, me=me, secret=cfg.secret, handshake_timeout=hs_timeout,
                                    recv_timeout=recv_timeout, ssl=server_ssl, peer_hosts=[h for h, _ in addrs])
            await listener.start(sock=ring_sock)
            ring_sock = None  # the listener's now

        async def form(first: bool):
            return await open_tcp_ring(rank, addrs, me=me, secret=cfg.secret, timeout=600.0 if first else None,
                                       handshake_timeout=hs_timeout, recv_timeout=recv_timeout, listener=listener,
                                       ssl_client=client_ssl, refusals_are_final=first, progress=progress)

        state.joining()
        log.info("rank %d: joining ring %r (%d peers) at %s%s", rank, cfg.name, cfg.size, me_cfg.address,
                 " over TLS" if cfg.tls else "")
        links = await form(True)
        log.info("rank %d: ring up", rank)
        spin = may_spin(cfg, rank)
        peer = Peer(model, info, links, wire=cfg.wire, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                    spin=spin)
        log.info("rank %d: %s for decode all-reduces", rank, "busy-waits" if spin else "sleeps")
        http_peers = [cfg.http_address(p.rank) for p in cfg.peers]  # the chat page's ring view
        app = make_app(peer, api_key=cfg.api_key, body_timeout=cfg.http_body_timeout, ring_addresses=http_peers,
                       progress=progress)
        http = await serve_http(app, sock=http_sock, ssl=http_ssl, limits=limits)
        await starting.close()
        starting = None
        log.info("rank %d: serving HTTP%s on %s:%d", rank, "S" if http_ssl else "", cfg.http_host, me_cfg.http_port)
        try:
            while True:
                try:
                    await _run_ring(peer, cfg)
                except RingError as exc:
                    log.error("rank %d: ring lost: %s; re-forming", rank, exc)
                except Exception as exc:  # a bug in a step: requests were failed; keep the peer up
                    # The frames, and the message escaped: it may quote what a client sent.
                    log.error("rank %d: step loop failed: %s: %s; re-forming the ring\n%s", rank, type(exc).__name__,
                              ascii(str(exc))[:300], "".join(traceback.format_tb(exc.__traceback__)).rstrip())
                t1 = time.monotonic()
                peer.rebind(await form(False))
                log.info("rank %d: ring re-formed after %.1f s", rank, time.monotonic() - t1)
        finally:
            peer.links.close("peer shutting down")
            log.info("rank %d: stats %s", rank, json.dumps(peer.stats.as_dict()))
    finally:
        if waiter is not None:
            waiter.cancel()
        if listener is not None:
            listener.close()
        if ring_sock is not None:
            ring_sock.close()
        for server in (http, starting):
            if server is not None:
                await server.close()
        http_sock.close()


async def _load(cfg: RingConfig, rank: int, threads: int, kernels: str | None):
    """rank's shard of ring.toml's model: (model, info, plan, chosen kernels)."""
    from ringllm import runtime

    # In threads (fetching the model or compiling the kernels takes minutes): /health answers.
    t0 = time.perf_counter()
    path = await asyncio.to_thread(resolve_model, cfg.model_for(rank),
                                   progress=lambda m: log.info("rank %d: %s", rank, m))
    if cfg.model_sha256 and (digest := await asyncio.to_thread(file_sha256, path)) != cfg.model_sha256:
        raise ModelError(f"rank {rank}: model file {path} has sha256 {digest}, but {cfg.source} says {cfg.model_sha256}")
    # The tokenizer before the kernels: numba's long-lived objects then fill the holes its
    # build left in the heap (qwen2.5-coder-1.5b: 227 MB resident after both, 240 the other
    # way round; docs/performance.md, "Loading a shard").
    info, mf = await asyncio.to_thread(runtime.open_model, str(path))
    chosen = await asyncio.to_thread(runtime.set_threads, threads, kernels or cfg.kernels,
                                     lambda m: log.warning("rank %d: %s", rank, m))
    log.info("rank %d: %s kernels on %d thread(s)", rank, chosen.family, threads)
    plan = runtime.make_plan(info, cfg.weights)
    model = await asyncio.to_thread(runtime.load_model, mf, plan, rank, max_len=cfg.context_length)
    mf.close()
    sh = plan[rank]
    log.info("rank %d: loaded shard in %.1f s: heads %s (kv %s), ffn %s, vocab %s, %.1f MB of weights",
             rank, time.perf_counter() - t0, sh.heads, sh.kv_heads, sh.ffn, sh.vocab, model.w.nbytes / 2**20)
    return model, info, plan, chosen


# How often a peer waiting for its neighbours says whom it waits for (INFO, without -v): the
# first line comes this long after the wait began, so a ring that forms at once logs none.
WAIT_LOG_SECONDS = 5.0


async def _log_waiting(rank: int, progress) -> None:
    """Every WAIT_LOG_SECONDS while a formation waits: one line naming whom it waits for."""
    from ringllm.http.joining import waiting_entries, waiting_text

    while True:
        await asyncio.sleep(WAIT_LOG_SECONDS)
        waiting = [w for w in waiting_entries(progress) if w["seconds"] >= WAIT_LOG_SECONDS]
        if waiting:
            log.info("rank %d: forming the ring%s", rank, waiting_text(waiting))


async def _run_ring(peer, cfg: RingConfig) -> None:
    """Drive ``peer`` on its current ring with keepalive until the ring breaks (raises)."""
    keepalive = asyncio.create_task(peer.links.keepalive(cfg.heartbeat_interval, cfg.dead_after))

    def check(task: asyncio.Task) -> None:
        # A keepalive that died of a bug would leave an idle ring blind to a silent neighbour:
        # break the ring instead (it re-forms, with a fresh keepalive).
        exc = None if task.cancelled() else task.exception()
        if exc is not None and not isinstance(exc, RingError):  # a lost link is a RingError
            log.error("rank %d: keepalive failed: %r", peer.rank, exc)
            peer.links.abandon(RingError(f"keepalive failed: {exc!r}"))

    keepalive.add_done_callback(check)
    try:
        # A keepalive failure fails the links, so peer.run() raises the same error; waiting
        # on the peer alone keeps one error, with its in-flight requests failed, per loss.
        await peer.run()
    finally:
        keepalive.cancel()
        await asyncio.wait([keepalive])
        if not keepalive.cancelled():
            keepalive.exception()  # retrieved: it is the same failure peer.run() raised


def run_peer(args: argparse.Namespace) -> int:
    limit_malloc_arenas()  # before any thread starts
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    cfg = load_ring(args.ring)
    cfg.peer(args.rank)  # a wrong rank is refused before anything loads
    host = cfg.peer(args.rank).host
    threads = args.threads or default_threads(sum(p.host == host for p in cfg.peers))
    _run_until_signal(serve_peer(cfg, args.rank, threads=threads, kernels=args.kernels))
    return 0


def _run_until_signal(coro) -> None:
    """Run ``coro`` on uvloop when available; SIGTERM and SIGINT stop it cleanly."""
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        runner = asyncio.Runner()
    with runner:
        loop = runner.get_loop()
        task = loop.create_task(coro)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            runner.run(_await(task))


async def _await(task: asyncio.Task) -> None:
    await task


# -- ringllm local --peers N ------------------------------------------------------------------
def run_local_ring(n: int, model: str | None, threads: int | None, body: dict[str, Any],
                   on_text: Callable[[str], Any] | None = None, kernels: str = "auto") -> Completion:
    """Start ``n`` peer processes of ``model`` on 127.0.0.1, run one generation of ``body`` (the
    native endpoint's fields) on rank 0, calling ``on_text(piece)`` as text streams, stop them
    all, and return the generation. ``threads``: per peer (default: the cores shared out)."""
    from ringllm.client import connect

    if n < 1:
        raise ConfigError(f"--peers must be at least 1, got {n}")
    model = str(resolve_model(model, progress=lambda m: print(f"ringllm: {m}", file=sys.stderr)))
    threads = threads or default_threads(n)
    with tempfile.TemporaryDirectory(prefix="ringllm-local-") as tmp:
        ring_path = Path(tmp) / "ring.toml"
        ring_path.write_text(init_ring_toml(n, model=model, kernels=kernels))
        cfg = load_ring(ring_path)
        procs = [_spawn_peer(ring_path, r, threads, Path(tmp)) for r in range(n)]
        try:
            _wait_healthy(cfg, procs, Path(tmp))

            async def go() -> Completion:
                async with connect(cfg.http_address(0)) as client:
                    return await client.complete(on_text=on_text, **body)

            return asyncio.run(go())
        finally:
            _stop(procs)


def _spawn_peer(ring_path: Path, rank: int, threads: int, logdir: Path,
                prefix: Sequence[str] = ()) -> subprocess.Popen:
    """Start ``ringllm peer`` for rank as a child process (``prefix``: a command to run it
    under, e.g. ``ip netns exec NS``), its output in ``logdir/peer<rank>.log``."""
    logf = open(logdir / f"peer{rank}.log", "wb")
    return subprocess.Popen([*prefix, sys.executable, "-m", "ringllm", "peer", "--ring", str(ring_path),
                             "--rank", str(rank), "--threads", str(threads)], stdout=logf, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _wait_healthy(cfg: RingConfig, procs: list[subprocess.Popen], logdir: Path, timeout: float = 300.0) -> None:
    import urllib.request

    scheme, ctx = "http", None
    if cfg.tls is not None:
        from ringllm.ring.tls import http_client_context

        scheme, ctx = "https", http_client_context(cfg.tls)
    deadline = time.monotonic() + timeout
    pending = set(range(len(procs)))
    while pending:
        for r in sorted(pending):
            if procs[r].poll() is not None:
                logfile = logdir / f"peer{r}.log"  # none when the peer logs to our stderr (serve)
                tail = logfile.read_text(errors="replace").strip().splitlines()[-5:] if logfile.exists() else []
                raise RingError(f"peer {r} exited with status {procs[r].returncode}: " + " | ".join(tail))
            try:
                url = f"{scheme}://{cfg.http_address(r)}/health"
                with urllib.request.urlopen(url, timeout=1, context=ctx) as resp:
                    if json.load(resp).get("status") == "ok":
                        pending.discard(r)
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise RingError(f"the local ring did not come up within {timeout:g} s (waiting for ranks {sorted(pending)})")
        if pending:
            time.sleep(0.1)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()



# -- ringllm serve --peers N -------------------------------------------------------------------
def serve_ring_toml(n: int, model: str, *, port: int, kernels: str = "auto", host: str = "127.0.0.1",
                    api_key_env: str | None = None) -> str:
    """The ring.toml ``ringllm serve`` runs: ``n`` peers on 127.0.0.1 (ring links), HTTP on
    ``host`` at ``port``, ``port + 1``, ..., with the API key from ``$api_key_env`` if given."""
    http = [f'host = "{host}"'] + ([f'api_key_env = "{api_key_env}"'] if api_key_env else [])
    return (init_ring_toml(n, name="serve", model=model, http_ports=[port + r for r in range(n)], kernels=kernels)
            + "\n[http]\n" + "\n".join(http) + "\n")


def run_serve(n: int, model: str | None, *, port: int, threads: int | None = None, kernels: str = "auto",
              host: str = "127.0.0.1", api_key_env: str | None = None,
              say: Callable[[str], Any] = print, ready: Callable[[], Any] | None = None) -> int:
    """Run ``n`` peer processes of ``model`` on this machine, HTTP on ``host`` at ``port``,
    ``port + 1``, ... (ring links on 127.0.0.1), until Ctrl-C or SIGTERM (returns 0), or until a
    peer exits (RingError naming it). Peers log to our stderr; ``say`` gets our own lines (the
    URLs, then "ring up"). Every HTTP port is checked first (a busy one is a ConfigError naming
    it, before any peer starts), and ``$api_key_env`` too. HTTP beyond loopback without an API
    key is served with a warning saying so (docs/security.md). The peers die with us even if
    we are killed (SIGTERM from the kernel: PR_SET_PDEATHSIG)."""
    from ringllm.http.joining import bind_http

    if n < 1:
        raise ConfigError(f"--peers must be at least 1, got {n}")
    if not 1 <= port <= 65536 - n:
        raise ConfigError(f"--port must leave room for {n} ports in 1..65535, got {port}")
    if not host or any(c in host for c in '"\\ \n'):
        raise ConfigError(f"--host must be a host name or address, got {host!r}")
    if api_key_env is not None and not os.environ.get(api_key_env):
        raise ConfigError(f"--api-key-env {api_key_env}: that environment variable is not set")
    for r in range(n):
        bind_http(host, port + r, r).close()
    model = str(resolve_model(model, progress=say))
    threads = threads or default_threads(n)
    stop = _SignalStop()
    with tempfile.TemporaryDirectory(prefix="ringllm-serve-") as tmp, stop:
        ring_path = Path(tmp) / "ring.toml"
        ring_path.write_text(serve_ring_toml(n, model, port=port, kernels=kernels, host=host, api_key_env=api_key_env))
        cfg = load_ring(ring_path)
        if not is_loopback(host) and api_key_env is None:
            say(f"warning: HTTP on {host} without an API key: anyone who can reach these ports can "
                "generate text (--api-key-env VAR sets one; docs/security.md)")
        procs: list[subprocess.Popen] = []
        try:
            for r in range(n):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "ringllm", "peer", "--ring", str(ring_path), "--rank", str(r),
                     "--threads", str(threads)], stdin=subprocess.DEVNULL, start_new_session=True,
                    preexec_fn=_die_with_parent))
            for p in cfg.peers:
                address = cfg.http_address(p.rank)
                say(f"rank {p.rank}: http://{address}/  (chat page; OpenAI API at http://{address}/v1)")
            if host in WILDCARD_HOSTS:
                say(f"listening on every interface ({host}): from elsewhere use this machine's address")
            _wait_healthy(cfg, procs, Path(tmp), timeout=900.0)
            say(f"ring up: {n} peer(s) of {Path(model).name}, {threads} thread(s) each; Ctrl-C stops them")
            if ready is not None:
                ready()
            while (dead := [r for r, p in enumerate(procs) if p.poll() is not None]) == []:
                time.sleep(0.2)
            raise RingError(f"peer {dead[0]} exited with status {procs[dead[0]].returncode}; stopped the others")
        except KeyboardInterrupt:
            say("stopping the ring")
            return 0
        finally:
            stop.ignore()  # a second Ctrl-C must not leave peers behind
            _stop(procs)


class _SignalStop:
    """Within: SIGTERM raises KeyboardInterrupt, as Ctrl-C does; ``ignore()`` then ignores
    both until the block ends. The previous handlers come back afterwards."""

    def __enter__(self) -> "_SignalStop":
        self._saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        signal.signal(signal.SIGTERM, self._interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    @staticmethod
    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def ignore(self) -> None:
        for sig in self._saved:
            signal.signal(sig, signal.SIG_IGN)


def _die_with_parent() -> None:
    """In a child before exec: the kernel sends it SIGTERM when its parent dies (Linux)."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
