"""Ring speed for P = 1..4 peers as separate processes on 127.0.0.1: one JSON line per P.

    python bench/ring.py [--peers 1 2 3 4] [--threads 1] [--wire f32] [--tokens 128]

Each P starts a fresh ring (``--threads`` compute threads per peer), sends one warm-up request
and then one timed greedy request (64-token prompt, ``--tokens`` generated, EOS ignored) to
rank 0, side by side in one run. Reported per P:

- ``tok_s``: decode tokens/s seen by the client (first token excluded);
- ``compute_ms_per_token`` / ``sync_ms_per_token``: rank 0's decode step time split into
  waiting in collectives and the rest (peer counters from /health; decode-only figures are
  the difference between a long request and a one-token request);
- ``bytes_per_token_per_peer``: frame bytes each peer wrote to its ring links per decode
  token (its own counter), next to ``formula_bytes_per_token`` (docs/performance.md derives it);
- ``peak_rss_mb``: each peer's VmHWM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ringllm.client import connect  # noqa: E402
from ringllm.fetch import resolve_model  # noqa: E402
from ringllm.launch import _spawn_peer, _stop, _wait_healthy  # noqa: E402
from ringllm.ring.config import init_ring_toml, load_ring  # noqa: E402

TEXT = ("The history of the ring network begins with the token ring, a local area network in which each "
        "station passes a small frame to its neighbour; the frame circulates until a station claims it. ")


def proc_field(pid: int, name: str, field: str) -> int:
    text = Path(f"/proc/{pid}/{name}").read_text()
    return int(re.search(rf"^{field}:\s+(\d+)", text, re.M).group(1))


def frame_bytes(payload: int, kind: str = "coll", header: dict | None = None) -> int:
    """Bytes of one frame on the wire, measured with the real encoder."""
    from ringllm.ring.wire import encode_frame

    head, view = encode_frame(kind, header or {"s": 100_000, "i": 0, "o": "ar", "n": 576}, b"x" * payload)
    return len(head) + (view.nbytes if view is not None else 0)


def formula_bytes(p: int, n_layers: int, dim: int, wire: str) -> float:
    """Bytes one peer sends per decode token (docs/performance.md derives it).

    Exchange all-reduce: every vector travels floor(P/2) hops one way and floor((P-1)/2) the
    other, so each peer sends P-1 vector frames per all-reduce. Per token: 2 per layer plus
    one for the vocab-parallel embedding. The step's two small all-gathers (control news and
    greedy candidates) add P-1 frames each of under 100 bytes.
    """
    if p == 1:
        return 0.0
    payload = dim * 4 if wire == "f32" else -(-dim // 64) * 64 // 32 * 34
    layers = 2 * n_layers * (p - 1) * frame_bytes(payload)
    embedding = (p - 1) * frame_bytes(dim * 4)  # always float32, whatever the wire format
    small = 2 * (p - 1) * frame_bytes(60, header={"s": 100_000, "i": 0, "o": "ag"})
    return layers + embedding + small


async def peer_stats(ports: list[int]) -> list[dict]:
    out = []
    for port in ports:
        async with connect(f"127.0.0.1:{port}") as client:
            out.append((await client.health())["stats"])
    return out


async def timed_request(port: int, prompt_ids: list[int], tokens: int) -> dict:
    async with connect(f"127.0.0.1:{port}") as client:
        return (await client.complete(prompt_ids=prompt_ids, temperature=0, max_tokens=tokens, ignore_eos=True)).__dict__


def run_ring(p: int, model: str, threads: int, wire: str, tokens: int, prompt_ids: list[int]) -> dict:
    """Decode-only figures come from the difference of a long and a one-token request."""
    with tempfile.TemporaryDirectory(prefix="ringllm-bench-") as tmp:
        ring_path = Path(tmp) / "ring.toml"
        ring_path.write_text(init_ring_toml(p, model=model, wire=wire))
        cfg = load_ring(ring_path)
        procs = [_spawn_peer(ring_path, r, threads, Path(tmp)) for r in range(p)]
        ports = [pc.http_port for pc in cfg.peers]
        try:
            _wait_healthy(cfg, procs, Path(tmp))
            asyncio.run(timed_request(ports[0], prompt_ids, 8))  # warm-up
            s0 = asyncio.run(peer_stats(ports))
            asyncio.run(timed_request(ports[0], prompt_ids, 1))
            s1 = asyncio.run(peer_stats(ports))
            done = asyncio.run(timed_request(ports[0], prompt_ids, tokens))
            s2 = asyncio.run(peer_stats(ports))
            rss = [proc_field(pr.pid, "status", "VmHWM") / 1024 for pr in procs]
        finally:
            _stop(procs)

    def decode_delta(r: int, key: str) -> float:
        return (s2[r][key] - s1[r][key]) - (s1[r][key] - s0[r][key])

    decode_steps = decode_delta(0, "steps")
    decode_s = done["seconds"] - done["time_to_first_token"]
    n = len(done["ids"])
    return {
        "peers": p, "threads_per_peer": threads, "wire": wire,
        "tok_s": round((n - 1) / decode_s, 2),
        "ttft_ms": round(done["time_to_first_token"] * 1000, 1),
        "step_ms": round(decode_delta(0, "step_seconds") / decode_steps * 1000, 2),
        "compute_ms_per_token": round((decode_delta(0, "step_seconds") - decode_delta(0, "sync_seconds")) / decode_steps * 1000, 2),
        "sync_ms_per_token": round(decode_delta(0, "sync_seconds") / decode_steps * 1000, 2),
        "bytes_per_token_per_peer": [round(decode_delta(r, "bytes_sent") / decode_steps) for r in range(p)],
        "peak_rss_mb": [round(x, 1) for x in rss],
        "ids_head": done["ids"][:8],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wire", default="f32", choices=["f32", "q8_0"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    from ringllm import runtime

    model = str(resolve_model(args.model))
    info, mf = runtime.open_model(model)
    mf.close()
    c = info.config
    prompt_ids = info.tokenizer.encode(TEXT * 8, parse_special=False)[:64]
    machine = f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    for p in args.peers:
        row = run_ring(p, model, args.threads, args.wire, args.tokens, prompt_ids)
        row["formula_bytes_per_token"] = round(formula_bytes(p, c.n_layers, c.dim, args.wire))
        row["machine"] = machine
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
