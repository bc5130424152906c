"""Processes: ``ringllm peer`` (one peer from ring.toml) and ``ringllm local --peers N``.

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
from pathlib import Path

from ringllm.errors import ConfigError, ModelError, RingError
from ringllm.fetch import resolve_model, sha256_file
from ringllm.ring.config import RingConfig, init_ring_toml, load_ring

log = logging.getLogger("ringllm.peer")


def default_threads(peers_on_this_machine: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, peers_on_this_machine))


async def serve_peer(cfg: RingConfig, rank: int, *, threads: int = 1) -> None:
    """Load rank's shard, join the ring, serve HTTP, and drive steps until stopped."""
    from aiohttp import web

    from ringllm import runtime
    from ringllm.peer import Peer
    from ringllm.ring.handshake import HandshakeInfo
    from ringllm.ring.links import open_tcp_ring
    from ringllm.server import make_app

    me_cfg = cfg.peer(rank)
    runtime.set_threads(threads)
    t0 = time.perf_counter()
    path = resolve_model(cfg.model_for(rank), progress=lambda m: log.info("rank %d: %s", rank, m))
    if cfg.model_sha256 and (digest := await asyncio.to_thread(sha256_file, path)) != cfg.model_sha256:
        raise ModelError(f"rank {rank}: model file {path} has sha256 {digest}, but {cfg.source} says {cfg.model_sha256}")
    info, mf = await asyncio.to_thread(runtime.open_model, str(path))
    plan = runtime.make_plan(info, cfg.weights)
    model = await asyncio.to_thread(runtime.load_model, mf, plan, rank, max_len=cfg.context_length)
    mf.close()
    sh = plan[rank]
    log.info("rank %d: loaded shard in %.1f s: kv heads %s, ffn %s, vocab %s, %.1f MB of weights", rank,
             time.perf_counter() - t0, sh.kv_heads, sh.ffn, sh.vocab, model.w.nbytes / 2**20)
    me = HandshakeInfo(ring=cfg.name, rank=rank, size=cfg.size, model=info.fingerprint, plan=plan.digest())
    log.info("rank %d: joining ring %r (%d peers) at %s", rank, cfg.name, cfg.size, me_cfg.address)
    links = await open_tcp_ring(rank, [(p.host, p.port) for p in cfg.peers], me=me, secret=cfg.secret,
                                timeout=600.0, recv_timeout=max(30.0, cfg.dead_after))
    log.info("rank %d: ring up", rank)
    peer = Peer(model, info, links, wire=cfg.wire, max_batch=cfg.max_batch, max_queue=cfg.max_queue)
    runner = web.AppRunner(make_app(peer), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.http_host, me_cfg.http_port, reuse_address=True)
    await site.start()
    log.info("rank %d: serving HTTP on %s:%d", rank, cfg.http_host, me_cfg.http_port)
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(peer.run())
            tg.create_task(links.keepalive(cfg.heartbeat_interval, cfg.dead_after))
    except* RingError as eg:
        log.error("rank %d: ring lost: %s", rank, eg.exceptions[0])
        raise eg.exceptions[0] from None
    finally:
        links.close("peer shutting down")
        await runner.cleanup()
        log.info("rank %d: stats %s", rank, json.dumps(peer.stats.as_dict()))


def run_peer(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    cfg = load_ring(args.ring)
    cfg.peer(args.rank)  # a wrong rank is refused before anything loads
    threads = args.threads or default_threads(1)
    _run_until_signal(serve_peer(cfg, args.rank, threads=threads))
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
def run_local_ring(args: argparse.Namespace) -> int:
    """Start N peer processes on 127.0.0.1, stream one reply from rank 0, stop them all."""
    from ringllm.client import connect

    n = args.peers
    if n < 1:
        raise ConfigError(f"--peers must be at least 1, got {n}")
    model = str(resolve_model(args.model, progress=lambda m: print(f"ringllm: {m}", file=sys.stderr)))
    threads = args.threads or default_threads(n)
    with tempfile.TemporaryDirectory(prefix="ringllm-local-") as tmp:
        ring_path = Path(tmp) / "ring.toml"
        ring_path.write_text(init_ring_toml(n, model=model))
        cfg = load_ring(ring_path)
        procs = [_spawn_peer(ring_path, r, threads, Path(tmp)) for r in range(n)]
        try:
            _wait_healthy(cfg, procs, Path(tmp))
            body = _body_from_args(args)

            async def go():
                async with connect(f"127.0.0.1:{cfg.peers[0].http_port}") as client:
                    return await client.complete(on_text=None if args.json else _stream, **body)

            from ringllm.cli import print_completion

            return print_completion(args, asyncio.run(go()))
        finally:
            _stop(procs)


def _spawn_peer(ring_path: Path, rank: int, threads: int, logdir: Path) -> subprocess.Popen:
    logf = open(logdir / f"peer{rank}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "ringllm", "peer", "--ring", str(ring_path), "--rank", str(rank),
                             "--threads", str(threads)], stdout=logf, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _wait_healthy(cfg: RingConfig, procs: list[subprocess.Popen], logdir: Path, timeout: float = 300.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    pending = set(range(len(procs)))
    while pending:
        for r in sorted(pending):
            if procs[r].poll() is not None:
                tail = (logdir / f"peer{r}.log").read_text(errors="replace").strip().splitlines()[-5:]
                raise RingError(f"peer {r} exited with status {procs[r].returncode}: " + " | ".join(tail))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{cfg.peers[r].http_port}/health", timeout=1) as resp:
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


def _stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _body_from_args(args: argparse.Namespace) -> dict:
    body = {"prompt": args.prompt, "raw": args.raw, "system": args.system, "temperature": args.temperature,
            "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p, "repeat_penalty": args.repeat_penalty,
            "seed": args.seed, "max_tokens": args.max_tokens, "stop": args.stop or None,
            "ignore_eos": args.ignore_eos, "top_logprobs": args.top_logprobs}
    return body
