"""ringllm and distributed-llama alternately on the same synthetic model: one JSON line per result.

    python bench/vs_dllama.py --dllama /work/comp/dllama/dllama \\
        --bench-dllama /work/shared/tools/dllama/bench_dllama.py \\
        --gguf /work/comp/bench_d1024_l16.gguf --dllama-model /work/comp/bench_q40.m \\
        --dllama-tokenizer /work/comp/bench.t [--peers 1 2 4] [--rounds 2] [--tokens 64]

Nothing of distributed-llama is in this repository: every piece is a path argument (a
``dllama`` executable built from a snapshot, its driver ``bench_dllama.py``, the model in both
formats; /work/shared/tools/dllama/README.md makes them). Each round runs both sides over
every P, alternating which goes first (round 0: dllama first):

- dllama: ``bench_dllama.py --nodes P.. --reps 1 --nthreads 1 --buffer-float-type q80
  --net-turbo 1 --steps 12+tokens`` ("Hello world", 12 tokens with BOS, then ``--tokens``
  generated); its ``wall_tok_s`` is the rate between consecutive per-token lines on the root's
  stdout (sampling and control included);
- ringllm: ``bench/ring.py --model GGUF --peers P.. --rounds 1 --threads 1 --tokens N``
  (64-token prompt); its ``tok_s`` is the client-seen decode rate (first token excluded).

Per P and round a line with both figures; at the end per P a ``ratio`` line:
``ringllm_over_dllama`` = median over rounds of (ringllm tok_s / dllama wall tok_s) from the
same round, and both medians. All peers and nodes share this machine's cores, one thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DLLAMA_PROMPT_TOKENS = 12  # bench_dllama.py's "Hello world" with BOS, as its --steps help says


def run_dllama(a: argparse.Namespace, tmp: Path, rnd: int) -> dict[int, dict]:
    out = tmp / f"dllama_r{rnd}.jsonl"
    cmd = [sys.executable, a.bench_dllama, "--dllama", a.dllama, "--model", a.dllama_model,
           "--tokenizer", a.dllama_tokenizer, "--nodes", *map(str, a.peers), "--reps", "1", "--nthreads", "1",
           "--buffer-float-type", "q80", "--net-turbo", "1", "--steps", str(DLLAMA_PROMPT_TOKENS + a.tokens),
           "--base-port", str(a.base_port + 100 * rnd), "--logdir", str(tmp / "dllama_logs"), "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return {r["nodes"]: r for r in rows}


def run_ringllm(a: argparse.Namespace) -> dict[int, dict]:
    cmd = [sys.executable, str(HERE / "ring.py"), "--model", a.gguf, "--peers", *map(str, a.peers),
           "--rounds", "1", "--threads", "1", "--tokens", str(a.tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["peers"]: r for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dllama", required=True, help="a dllama executable (make dllama in a snapshot)")
    ap.add_argument("--bench-dllama", required=True, help="path of bench_dllama.py")
    ap.add_argument("--gguf", required=True, help="the model as GGUF, for ringllm")
    ap.add_argument("--dllama-model", required=True, help="the same model in dllama's format")
    ap.add_argument("--dllama-tokenizer", required=True)
    ap.add_argument("--peers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per request on both sides")
    ap.add_argument("--base-port", type=int, default=9900, help="dllama workers' first port")
    a = ap.parse_args()
    for name in ("dllama", "bench_dllama", "gguf", "dllama_model", "dllama_tokenizer"):
        if not Path(getattr(a, name)).is_file():
            sys.exit(f"vs_dllama: --{name.replace('_', '-')} {getattr(a, name)} is not a file")
    if a.rounds < 1 or a.tokens < 2 or any(p < 1 for p in a.peers):
        sys.exit("vs_dllama: --rounds and --peers must be >= 1, --tokens >= 2")
    per_round: list[tuple[dict, dict]] = []
    with tempfile.TemporaryDirectory(prefix="ringllm-vs-dllama-") as tmp:
        for rnd in range(a.rounds):
            if rnd % 2 == 0:
                theirs = run_dllama(a, Path(tmp), rnd)
                ours = run_ringllm(a)
            else:
                ours = run_ringllm(a)
                theirs = run_dllama(a, Path(tmp), rnd)
            per_round.append((ours, theirs))
            for p in a.peers:
                print(json.dumps({"bench": "vs_dllama", "round": rnd, "peers": p,
                                  "ringllm_tok_s": ours[p]["tok_s"], "ringllm_sync_ms": ours[p]["sync_ms_per_token"],
                                  "dllama_wall_tok_s": round(theirs[p]["wall_tok_s"], 2),
                                  "dllama_pred_tok_s": theirs[p]["pred_tok_s"],
                                  "dllama_sync_ms": round(theirs[p]["sync_ms"], 1),
                                  "load": os.getloadavg()[0]}), flush=True)
    for p in a.peers:
        ours_p = [o[p]["tok_s"] for o, _ in per_round]
        theirs_p = [t[p]["wall_tok_s"] for _, t in per_round]
        print(json.dumps({"bench": "vs_dllama", "ratio": "ringllm_tok_s/dllama_wall_tok_s", "peers": p,
                          "rounds": a.rounds, "tokens": a.tokens,
                          "ringllm_tok_s_median": round(statistics.median(ours_p), 2),
                          "dllama_wall_tok_s_median": round(statistics.median(theirs_p), 2),
                          "ringllm_over_dllama": round(statistics.median(o / t for o, t in zip(ours_p, theirs_p)), 3),
                          "model": os.path.basename(a.gguf)}), flush=True)


if __name__ == "__main__":
    main()
