"""The ``ringllm`` command line.

Generation flags are a stable interface that other tools script against; ``--json`` prints
one object: {"prompt_ids", "ids", "text", "top_logprobs", "finish_reason"}.
Errors a user can cause print one line ``ringllm: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Sequence

from ringllm.errors import RingError
from ringllm.ring.config import KERNEL_FAMILIES

if TYPE_CHECKING:  # the CLI imports what a command needs when it runs: `ringllm --help` stays fast
    from ringllm.generation import Completion


def _progress(msg: str) -> None:
    print(f"ringllm: {msg}", file=sys.stderr, flush=True)


def add_generation_flags(p: argparse.ArgumentParser, *, prompt_optional: bool = False) -> None:
    """The generation flags of ``local`` and ``prompt``. ``prompt_optional``: ``prompt``'s form,
    which talks to a running ring, so the model and threads are not its to choose (refused)."""
    g = p.add_argument_group("generation")
    if prompt_optional:
        g.add_argument("prompt", nargs="?", default=None,
                       help="the prompt (a user message unless --raw); read from stdin when omitted "
                            "(with --chat: the first message, then one message per stdin line)")
    else:
        g.add_argument("prompt", help="the prompt (a user message unless --raw)")
    if prompt_optional:  # accepted only to be refused with the reason (see cmd_prompt)
        g.add_argument("--model", default=None, help=argparse.SUPPRESS)
        g.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    else:
        g.add_argument("--model", default=None, help="known model name or GGUF path (default: smollm2-135m)")
        g.add_argument("--threads", type=int, default=None,
                       help="compute threads per peer (default: this machine's cores shared out among the peers)")
    g.add_argument("--raw", action="store_true", help="use the prompt as-is: no chat template, special tokens parsed")
    g.add_argument("--system", default=None, help="system message (chat mode)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 means greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="0 disables (default 40)")
    g.add_argument("--top-p", type=float, default=0.95, help="1 disables (default 0.95)")
    g.add_argument("--min-p", type=float, default=0.05, help="0 disables (default 0.05)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="1 disables (default 1.0)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    g.add_argument("--max-tokens", type=int, default=256,
                   help="most tokens to generate (default 256); fewer when the context fills first, which is said")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="end-of-generation tokens do not stop")
    g.add_argument("--top-logprobs", type=int, default=0, metavar="K", help="report the K most likely tokens per step")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def build_request(args: argparse.Namespace, ids: list[int]):
    from ringllm.generation import Request
    from ringllm.sampling import SamplingParams

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(7), "little")
    sp = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                        repeat_penalty=args.repeat_penalty, seed=seed, top_logprobs=args.top_logprobs)
    return Request(tuple(ids), sp, max_tokens=args.max_tokens, stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def cmd_pull(args: argparse.Namespace) -> int:
    from ringllm.fetch import pull, terminal_bar

    if args.name is None:
        _print_known_models()
        print("ringllm: error: give a model name to pull: ringllm pull NAME", file=sys.stderr)
        return 2
    print(pull(args.name, progress=_progress, bar=terminal_bar(f"ringllm: {args.name}")))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ringllm.fetch import cached_files
    from ringllm.paths import cache_dir

    _print_known_models()
    files = cached_files()
    print(f"\ncached in {cache_dir() / 'models'}:" + ("" if files else " nothing"))
    for f in files:
        what = f"{f.model}, verified" if f.verified else f"{f.model}, NOT verified" if f.model else "by path"
        print(f"  {f.path.name:<44} {f.size / 1e6:>7,.0f} MB  ({what})")
    return 0


def _print_known_models() -> None:
    from ringllm.fetch import DEFAULT_MODEL, KNOWN_MODELS, is_cached

    print(f"{'NAME':<20} {'SIZE':>8}  CACHED  DESCRIPTION")
    for m in KNOWN_MODELS.values():
        default = " (default)" if m.name == DEFAULT_MODEL else ""
        print(f"{m.name:<20} {m.size / 1e6:>5,.0f} MB  {'yes' if is_cached(m) else 'no':<6}  {m.description}{default}")


def cmd_local(args: argparse.Namespace) -> int:
    if args.peers != 1:
        from ringllm.launch import run_local_ring

        done = run_local_ring(args.peers, args.model, args.threads, body_from_args(args),
                              on_text=None if args.json else _stream, kernels=args.kernels)
        return print_completion(args, done)
    from ringllm.generation import LocalEngine, collect
    from ringllm import runtime

    from ringllm.launch import default_threads

    runtime.set_threads(args.threads or default_threads(1), args.kernels, say=_progress)
    info, mf = runtime.open_model(args.model, progress=_progress)
    ids = runtime.prompt_ids(info, args.prompt, raw=args.raw, system=args.system)
    request = build_request(args, ids)
    request.check_fits(info.config.context_length)
    model = runtime.load_model(mf, runtime.make_plan(info, [1.0]), 0)
    mf.close()
    engine = LocalEngine(model, info.tokenizer)
    return print_completion(args, collect(engine.generate(request), ids, on_text=None if args.json else _stream))


def _stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def body_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The native endpoint's body for the generation flags (see add_generation_flags)."""
    return {"prompt": args.prompt, "raw": args.raw, "system": args.system, "temperature": args.temperature,
            "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p, "repeat_penalty": args.repeat_penalty,
            "seed": args.seed, "max_tokens": args.max_tokens, "stop": args.stop or None,
            "ignore_eos": args.ignore_eos, "top_logprobs": args.top_logprobs}


def print_completion(args: argparse.Namespace, done: Completion) -> int:
    if args.json:
        print(json.dumps(done.to_json(), ensure_ascii=False))
    else:
        print()
    if done.finish_reason == "length" and len(done.ids) < args.max_tokens:
        # Only the context's end stops a generation at "length" short of max_tokens.
        _progress(f"the context is full: generated {len(done.ids)} of the {args.max_tokens} tokens asked "
                  f"(--max-tokens) after a {len(done.prompt_ids)}-token prompt")
    print(f"ringllm: {len(done.ids)} tokens, first after {done.time_to_first_token * 1000:.0f} ms, "
          f"{done.tokens_per_second:.1f} tokens/s, finish: {done.finish_reason}", file=sys.stderr)
    return 0


DEFAULT_SERVE_PORT = 8080  # llama-server's default, so tools pointed at it find rank 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ringllm.launch import run_serve

    return run_serve(args.peers, args.model, port=args.port, threads=args.threads, kernels=args.kernels,
                     host=args.host, api_key_env=args.api_key_env, say=_progress)


def cmd_peer(args: argparse.Namespace) -> int:
    from ringllm.launch import run_peer

    return run_peer(args)


def _prompt_address(args: argparse.Namespace) -> str:
    """The peer's HTTP address; also sets ``args.tls`` (the client TLS context, or None)."""
    if args.peer is not None:
        args.tls = _client_tls(None, args.cacert)
        return args.peer
    from ringllm.ring.config import load_ring

    cfg = load_ring(args.ring)
    address = cfg.http_address(args.rank)  # refuses a rank out of range first
    if args.api_key is None:
        args.api_key = cfg.api_key
    args.tls = _client_tls(cfg, args.cacert)
    return address


def _client_tls(cfg: Any, cacert: str | None) -> Any:
    """TLS for the HTTP API: a ring with [tls] serves HTTPS under its own CA; --cacert trusts
    a CA file for a single --peer (an https:// address without it uses the system's CAs)."""
    if cfg is not None and cfg.tls is not None:
        from ringllm.ring.tls import http_client_context

        return http_client_context(cfg.tls)
    if cacert:
        import ssl

        return ssl.create_default_context(cafile=cacert)
    return None


def cmd_prompt(args: argparse.Namespace) -> int:
    """Stream one reply (or, with --chat, one per stdin line, keeping the history)."""
    import asyncio

    for flag, value, why in (("--model", args.model, "the ring serves the model its ring.toml names"),
                             ("--threads", args.threads, "each peer's threads are set when it starts "
                                                         "(ringllm peer/serve --threads)")):
        if value is not None:
            raise RingError(f"prompt does not take {flag}: it asks a running ring, and {why}")
    if args.chat:
        return cmd_chat(args)
    address = _prompt_address(args)
    if args.prompt is None:
        if sys.stdin.isatty():
            _progress("reading the prompt from stdin (end it with Ctrl-D)")
        args.prompt = sys.stdin.read()
        if not args.prompt.strip():
            raise RingError("no prompt: give it as an argument or on stdin")
    return asyncio.run(_prompt_once(args, address))


async def _prompt_once(args: argparse.Namespace, address: str) -> int:
    from ringllm.client import connect

    async with connect(address, api_key=args.api_key, ssl=args.tls) as client:
        done = await client.complete(on_text=None if args.json else _stream, **body_from_args(args))
    return print_completion(args, done)


def _chat_body(args: argparse.Namespace) -> dict:
    body = body_from_args(args)
    for key in ("prompt", "raw", "system"):
        body.pop(key, None)
    return body


def cmd_chat(args: argparse.Namespace) -> int:
    """The interactive chat (:mod:`ringllm.repl`); also ``prompt --chat``."""
    from ringllm.repl import Chat

    if args.raw:
        raise RingError("--raw cannot be used with --chat (chat messages always use the chat template)")
    address = _prompt_address(args)
    return Chat(address, api_key=args.api_key, ssl=args.tls, system=args.system, params=_chat_body(args),
                json_out=args.json).run(args.prompt)


def cmd_status(args: argparse.Namespace) -> int:
    """Ask every peer's /health and print one row per peer; exit 1 if any peer is not up."""
    import asyncio

    from ringllm.client import ring_health

    if args.ring:
        from ringllm.ring.config import is_loopback, load_ring

        cfg = load_ring(args.ring)
        targets = [(p.rank, cfg.http_address(p.rank)) for p in cfg.peers]
        loopback_only = is_loopback(cfg.http_host)
        tls = _client_tls(cfg, args.cacert)
    else:
        targets = [(None, a) for a in args.peer]
        loopback_only = False
        tls = _client_tls(None, args.cacert)
    healths = asyncio.run(ring_health([a for _, a in targets], timeout=args.timeout, ssl=tls))
    rows = [_status_row(rank, addr, h, loopback_only) for (rank, addr), h in zip(targets, healths)]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
    else:
        sys.stdout.write(_status_table(rows))
    return 0 if all(r["state"] == "up" for r in rows) else 1


def _status_row(rank: int | None, address: str, h: dict, loopback_only: bool) -> dict:
    """One peer's row: state "up", "loading" or "joining" (answers, its ring not formed yet:
    last_error says whom it waits for), "failed" (answers, but its ring broke) or "down" (no
    answer)."""
    if "error" in h and "status" not in h:
        err = h["error"]
        from ringllm.ring.config import is_loopback

        if loopback_only and not is_loopback(address.rpartition(":")[0].strip("[]")):
            err += " (the ring's [http] host is loopback-only, so this peer answers only on its own machine)"
        return {"rank": rank, "address": address, "state": "down", "last_error": err}
    if h.get("status") in ("loading", "joining"):
        return {"rank": h.get("rank", rank), "address": address, "state": h["status"], "size": h.get("size"),
                "waiting_for": h.get("waiting_for") or [], "last_error": h.get("message")}
    shard, mem = h.get("shard") or {}, h.get("memory") or {}
    return {"rank": h.get("rank", rank), "address": address, "state": "up" if h.get("status") == "ok" else "failed",
            "size": h.get("size"), "share": shard.get("share"), "kv_heads": shard.get("kv_heads"),
            "ffn": shard.get("ffn"), "vocab": shard.get("vocab"), "weights_bytes": mem.get("weights_bytes"),
            "kv_cache_bytes": mem.get("kv_cache_bytes"), "rss_bytes": mem.get("rss_bytes"),
            "running": h.get("running"), "queue": h.get("queue"), "last_error": h.get("last_error")}


def _status_table(rows: list[dict]) -> str:
    def mb(x) -> str:
        return "-" if x is None else f"{x / 2**20:.1f}M"

    def rng(r) -> str:
        return "-" if not r else f"{r[0]}-{r[1]}"

    head = ("RANK", "ADDRESS", "STATE", "SHARE", "KV HEADS", "FFN ROWS", "WEIGHTS", "KV CACHE", "RSS", "RUN", "QUEUE",
            "LAST ERROR")
    table = [head]
    for r in rows:
        table.append(("-" if r["rank"] is None else str(r["rank"]), r["address"], r["state"],
                      "-" if r.get("share") is None else f"{100 * r['share']:.0f}%", rng(r.get("kv_heads")),
                      rng(r.get("ffn")), mb(r.get("weights_bytes")), mb(r.get("kv_cache_bytes")), mb(r.get("rss_bytes")),
                      "-" if r.get("running") is None else str(r["running"]),
                      "-" if r.get("queue") is None else str(r["queue"]), r.get("last_error") or "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    return "".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] + "\n" for row in table)


def cmd_ring_init(args: argparse.Namespace) -> int:
    from ringllm.ring.config import init_ring_toml

    hosts = [h.strip() for h in args.hosts.split(",")] if args.hosts is not None else None
    if hosts is not None and args.peers is not None and args.peers != len(hosts):
        raise RingError(f"--peers {args.peers} but --hosts names {len(hosts)} hosts: give one of them, or agree")
    peers = len(hosts) if hosts is not None else args.peers
    if peers is None:
        raise RingError("ring init needs --peers N or --hosts a,b,c")
    text = init_ring_toml(peers, name=args.name, model=args.model, wire=args.wire, host=args.host, hosts=hosts,
                          base_port=args.base_port, http_base_port=args.http_base_port)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        if os.path.exists(args.out) and not args.force:
            raise RingError(f"{args.out} exists; pass --force to overwrite it")
        with open(args.out, "w") as f:
            f.write(text)
        print(f"ringllm: wrote {args.out} ({peers} peers on {', '.join(dict.fromkeys(hosts or [args.host]))})",
              file=sys.stderr)
    return 0


def _add_peer_flags(p: argparse.ArgumentParser) -> None:
    """Which peer to ask: --peer or --ring/--rank, and how (TLS CA, API key): `prompt` and `chat`."""
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--peer", help="the peer's HTTP address host:port")
    where.add_argument("--ring", help="ring.toml (with --rank, default 0)")
    p.add_argument("--rank", type=int, default=0, help="with --ring: which peer to ask (default 0)")
    p.add_argument("--cacert", default=None, help="CA file to trust for an HTTPS peer (a ring.toml with [tls] "
                                                   "brings its own)")
    p.add_argument("--api-key", default=os.environ.get("RINGLLM_API_KEY"),
                   help="bearer key when the ring sets [http] api_key (default: $RINGLLM_API_KEY, or ring.toml's)")


def make_parser() -> argparse.ArgumentParser:
    from ringllm import __version__
    from ringllm.fetch import DEFAULT_MODEL, KNOWN_MODELS

    names = ", ".join(KNOWN_MODELS)
    p = argparse.ArgumentParser(prog="ringllm", description="Run one LLM across several peers over a TCP ring.")
    p.add_argument("--version", action="version", version=f"ringllm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("pull", help="fetch a known model into the cache", epilog=f"known models: {names}")
    pp.add_argument("name", nargs="?", default=None, help=f"one of: {names} (without one: list them)")
    pp.set_defaults(func=cmd_pull)
    pm = sub.add_parser("models", help="list the known models (size, cached or not) and the cached files",
                        epilog=f"known models: {names}")
    pm.set_defaults(func=cmd_models)

    pl = sub.add_parser("local", help="start an N-peer ring on 127.0.0.1 and stream one reply")
    pl.add_argument("--peers", type=int, default=1, help="how many peer processes (default 1: in this process)")
    pl.add_argument("--kernels", choices=KERNEL_FAMILIES, default="auto",
                    help="compiled (numba) or numpy kernels; auto: numba where it imports (default)")
    add_generation_flags(pl)
    pl.set_defaults(func=cmd_local)

    sv = sub.add_parser("serve", help="start an N-peer ring on 127.0.0.1 and keep it serving until Ctrl-C",
                        epilog=f"known models: {names}")
    sv.add_argument("--peers", type=int, default=3, help="how many peer processes (default 3)")
    sv.add_argument("--model", default=None, help=f"known model name or GGUF path (default: {DEFAULT_MODEL})")
    sv.add_argument("--port", type=int, default=DEFAULT_SERVE_PORT,
                    help=f"HTTP port of rank 0; rank r serves on port + r (default {DEFAULT_SERVE_PORT})")
    sv.add_argument("--host", default="127.0.0.1",
                    help="the address the peers' HTTP listens on (default 127.0.0.1; 0.0.0.0: every "
                         "interface); the ring's own links stay on 127.0.0.1")
    sv.add_argument("--api-key-env", default=None, metavar="VAR",
                    help="require the API key held in environment variable VAR (clients send "
                         "'Authorization: Bearer KEY'); advised with any --host beyond loopback")
    sv.add_argument("--threads", type=int, default=None,
                    help="compute threads per peer (default: this machine's cores shared out among the peers)")
    sv.add_argument("--kernels", choices=KERNEL_FAMILIES, default="auto",
                    help="compiled (numba) or numpy kernels; auto: numba where it imports (default)")
    sv.set_defaults(func=cmd_serve)

    pe = sub.add_parser("peer", help="run one peer of the ring described by ring.toml")
    pe.add_argument("--ring", required=True, help="path to ring.toml")
    pe.add_argument("--rank", type=int, required=True, help="this peer's position in ring.toml")
    pe.add_argument("--threads", type=int, default=None,
                    help="compute threads (default: this machine's cores shared out among ring.toml's peers on "
                         "this host)")
    pe.add_argument("--kernels", choices=KERNEL_FAMILIES, default=None,
                    help="compiled (numba) or numpy kernels (default: ring.toml's kernels, itself auto)")
    pe.add_argument("-v", "--verbose", action="store_true", help="log debug messages too (every connection attempt)")
    pe.set_defaults(func=cmd_peer)

    pr = sub.add_parser("prompt", help="stream a completion from any peer of a running ring")
    _add_peer_flags(pr)
    pr.add_argument("--chat", action="store_true", help="the interactive chat: the same as 'ringllm chat'")
    add_generation_flags(pr, prompt_optional=True)
    pr.set_defaults(func=cmd_prompt)

    pc = sub.add_parser("chat", help="chat with any peer of a running ring (line editing, history, /help)",
                        description="Interactive chat; /help inside lists the commands. Piped stdin: each "
                                    "line is a user message.")
    _add_peer_flags(pc)
    add_generation_flags(pc, prompt_optional=True)
    pc.set_defaults(func=cmd_prompt, chat=True)  # cmd_prompt's checks, then cmd_chat

    st = sub.add_parser("status", help="show every peer of a ring: up/joining/down, rank, shard, memory, queue, "
                                       "last error")
    st_where = st.add_mutually_exclusive_group(required=True)
    st_where.add_argument("--ring", help="ring.toml: ask every peer it lists")
    st_where.add_argument("--peer", action="append", help="a peer's HTTP address host:port (repeatable)")
    st.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for each peer (default 3)")
    st.add_argument("--cacert", default=None, help="CA file to trust for HTTPS peers (a ring.toml with [tls] "
                                                    "brings its own)")
    st.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    st.set_defaults(func=cmd_status)

    ri = sub.add_parser("ring", help="ring.toml tools")
    rsub = ri.add_subparsers(dest="ring_command", required=True)
    init = rsub.add_parser("init", help="write a ready ring.toml (ports, a fresh secret)")
    init.add_argument("--peers", type=int, default=None, help="how many peers (default: one per --hosts entry)")
    init.add_argument("--hosts", default=None,
                      help="comma-separated hosts in ring order, one peer each (default: --host for every peer)")
    init.add_argument("--host", default="127.0.0.1", help="the host of every peer when --hosts is not given "
                                                          "(default 127.0.0.1)")
    init.add_argument("--base-port", type=int, default=None,
                      help="ring ports from here on each host, HTTP ports right after them (default: free ports "
                           "on this machine; 7700 with --hosts)")
    init.add_argument("--http-base-port", type=int, default=None,
                      help="HTTP ports from here on each host instead (needs --base-port or --hosts)")
    init.add_argument("--out", default="ring.toml", help="file to write, or - for stdout")
    init.add_argument("--name", default="local", help="the ring's name, checked at the handshake (default local)")
    init.add_argument("--model", default="smollm2-135m", help=f"known model name or GGUF path (known: {names})")
    init.add_argument("--wire", default="f32", choices=["f32", "q8_0"],
                      help="activations on the wire: f32 (exact, default) or q8_0 (fewer bytes, for slow links)")
    init.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    init.set_defaults(func=cmd_ring_init)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except RingError as exc:
        print(f"ringllm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ringllm: interrupted", file=sys.stderr)
        return 130
