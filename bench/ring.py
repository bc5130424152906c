"""Ring speed for P = 1..4 peers as separate processes on 127.0.0.1: one JSON line per P.

    python bench/ring.py [--peers 1 2 3 4] [--threads 1] [--wire f32] [--tokens 128]

Each P starts a fresh ring (``--threads`` compute threads per peer), sends one warm-up request
and then one timed greedy request (64-token prompt, ``--tokens`` generated, EOS ignored) to
rank 0, side by side in one run. Reported per P:

- ``tok_s``: decode tokens/s seen by the client (first token excluded);
- ``compute_ms_per_token`` / ``sync_ms_per_token``: rank 0's step time split into waiting in
  collectives and the rest (from the stats line each peer logs when it stops);
- ``bytes_per_token_per_peer``: bytes each peer wrote to sockets during the timed request
  (``wchar`` of /proc/<pid>/io: the ring links, plus rank 0's small HTTP stream), next to
  ``formula_bytes_per_token``, the protocol's own count (docs/performance.md derives it);
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


def formula_bytes(p: int, n_layers: int, dim: int, wire: str, frame_overhead: int) -> float:
    """Bytes one peer sends per decode token with the exchange all-reduce (see docs).

    Each all-reduce of ``dim`` floats: every vector travels floor(P/2) hops clockwise and
    floor((P-1)/2) counter-clockwise, and each peer sends its own vector both ways and forwards
    the others: (P-1) payloads per peer. Per token: 2 all-reduces per layer plus 1 for the
    vocab-parallel embedding (P > 1), plus the step's small gathers (control + sampling).
    """
    if p == 1:
        return 0.0
    payload = dim * 4 if wire == "f32" else -(-dim // 32) * 34
    per_allreduce = (p - 1) * (payload + frame_overhead)
    return (2 * n_layers + 1) * per_allreduce


async def timed_request(port: int, prompt_ids: list[int], tokens: int) -> dict:
    async with connect(f"127.0.0.1:{port}") as client:
        return (await client.complete(prompt_ids=prompt_ids, temperature=0, max_tokens=tokens, ignore_eos=True)).__dict__


def run_ring(p: int, model: str, threads: int, wire: str, tokens: int, prompt_ids: list[int]) -> dict:
    with tempfile.TemporaryDirectory(prefix="ringllm-bench-") as tmp:
        ring_path = Path(tmp) / "ring.toml"
        ring_path.write_text(init_ring_toml(p, model=model, wire=wire))
        cfg = load_ring(ring_path)
        procs = [_spawn_peer(ring_path, r, threads, Path(tmp)) for r in range(p)]
        try:
            _wait_healthy(cfg, procs, Path(tmp))
            port = cfg.peers[0].http_port
            asyncio.run(timed_request(port, prompt_ids, 8))  # warm-up
            w0 = [proc_field(pr.pid, "io", "wchar") for pr in procs]
            done = asyncio.run(timed_request(port, prompt_ids, tokens))
            w1 = [proc_field(pr.pid, "io", "wchar") for pr in procs]
            rss = [proc_field(pr.pid, "status", "VmHWM") / 1024 for pr in procs]
        finally:
            _stop(procs)
        stats = [json.loads(re.search(r"stats (\{.*\})", (Path(tmp) / f"peer{r}.log").read_text()).group(1))
                 for r in range(p)]
    decode_s = done["seconds"] - done["time_to_first_token"]
    n = len(done["ids"])
    s0 = stats[0]
    return {
        "peers": p, "threads_per_peer": threads, "wire": wire,
        "tok_s": round((n - 1) / decode_s, 2),
        "ttft_ms": round(done["time_to_first_token"] * 1000, 1),
        "compute_ms_per_token": round(s0["compute_seconds"] / s0["tokens"] * 1000, 2),
        "sync_ms_per_token": round(s0["sync_seconds"] / s0["tokens"] * 1000, 2),
        "bytes_per_token_per_peer": [round((b - a) / n) for a, b in zip(w0, w1)],
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
        row["formula_bytes_per_token"] = formula_bytes(p, c.n_layers, c.dim, args.wire, frame_overhead=FRAME_OVERHEAD)
        row["machine"] = machine
        print(json.dumps(row), flush=True)


FRAME_OVERHEAD = 0  # set from the wire format below

if __name__ == "__main__":
    from ringllm.ring import wire as _wire

    FRAME_OVERHEAD = getattr(_wire, "ALLREDUCE_FRAME_OVERHEAD", 0)
    main()
