"""ringllm and llama.cpp side by side on the same GGUF: one JSON line per result.

    python bench/compare.py [--model smollm2-135m] [--threads 1 2] [--rounds 5]
                            [--llama-python /work/comp/llamavenv/bin/python]
    python bench/compare.py --concurrency 8 [--threads 2]     # one peer, 8 greedy streams vs 1

llama.cpp is never a ringllm dependency: its side runs in a subprocess under
``--llama-python`` (default: this interpreter if ``import llama_cpp`` works in it), a Python
with llama-cpp-python installed, built for example in a venv outside the repository:

    python -m venv /path/llamavenv
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CPU_REPACK=OFF" /path/llamavenv/bin/pip install llama-cpp-python==0.3.36

For each thread count, one worker process per engine loads the model once and does one
untimed warm-up (prefill and a few decode steps, so no cold mmap page or first-call cost is
counted); then ``--rounds`` rounds each ask both workers for one measurement, alternating
which engine goes first (round 0: ringllm first, round 1: llama.cpp first, ...). A waiting
worker is blocked on its stdin, so only one engine computes at a time. Both engines get the
same token ids (ringllm's tokenizer), greedy, EOS ignored:

- ``prefill_tok_s``: a 128-token prompt in one call into a fresh cache (llama.cpp: one
  ``llama_decode`` of the whole batch, ``n_batch`` 512);
- ``decode_tok_s``: 128 tokens after a 64-token prompt, the prompt's prefill not timed; each
  timed step is one one-token forward plus an argmax over the logits (llama.cpp: ``eval`` of
  one token, argmax of ``llama_get_logits_ith(ctx, -1)``).

llama.cpp runs with ``n_threads`` = ``n_threads_batch`` = ``--threads``, ``n_ctx`` 512.
Lines: ``{"bench": "compare", "engine", "metric", "threads", "round", "tok_s"}`` per
measurement, then per (metric, threads) a ``"ratio"`` line with both medians over rounds and
``ringllm_over_llamacpp`` = the ratio of the medians (> 1: ringllm faster). The first
generated ids of each engine are printed too (``ids_head``), a sanity check that both decode
the same model (they may part after a few tokens: llama.cpp quantizes activations to Q8 in
its dot products).

``--concurrency N`` instead runs bench/serve.py against a single peer (``--peers 1``,
``--threads`` its first value) with ``--concurrency 1 N``, greedy (``--temperature 0``):
aggregate tok/s of N concurrent streams, and its ``speedup`` over one stream.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT = ("The history of the ring network begins with the token ring, a local area network in which each "
        "station passes a small frame to its neighbour; the frame circulates until a station claims it. ")
PREFILL_TOKENS, DECODE_PROMPT, DECODE_TOKENS = 128, 64, 128
LLAMA_BUILD = ('CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CPU_REPACK=OFF" '
               'pip install llama-cpp-python==0.3.36')


# --- workers: each loads its engine once, then answers one measurement per stdin line -----------

class RingllmEngine:
    def __init__(self, model_path: str, threads: int) -> None:
        sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
        import numpy as np

        from ringllm import runtime
        from ringllm.model import Segment

        runtime.set_threads(threads)
        info, mf = runtime.open_model(model_path)
        self.model = runtime.load_model(mf, runtime.make_plan(info, [1.0]), 0)
        mf.close()
        self.np, self.Segment = np, Segment

    def prefill(self, ids: list[int]) -> None:
        self.model.forward([self.Segment(self.model.new_cache(), self.np.array(ids))])

    def decode(self, prompt: list[int], n: int) -> tuple[float, list[int]]:
        np, model = self.np, self.model
        cache = model.new_cache()
        logits = model.forward([self.Segment(cache, np.array(prompt))])[0]
        out = []
        t = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(logits))
            out.append(tok)
            logits = model.forward([self.Segment(cache, np.array([tok]))])[0]
        return time.perf_counter() - t, out


class LlamaCppEngine:
    def __init__(self, model_path: str, threads: int) -> None:
        import numpy as np
        import llama_cpp

        self.np, self.lc = np, llama_cpp
        self.llm = llama_cpp.Llama(model_path=model_path, n_threads=threads, n_threads_batch=threads,
                                   n_ctx=512, n_batch=512, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _last_logits(self):
        ptr = self.lc.llama_get_logits_ith(self.llm.ctx, -1)
        return self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def decode(self, prompt: list[int], n: int) -> tuple[float, list[int]]:
        np, llm = self.np, self.llm
        llm.reset()
        llm.eval(prompt)
        out = []
        t = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(self._last_logits()))
            out.append(tok)
            llm.eval([tok])
        return time.perf_counter() - t, out


def worker(engine: str, model_path: str, threads: int, ids: list[int]) -> None:
    eng = (RingllmEngine if engine == "ringllm" else LlamaCppEngine)(model_path, threads)
    p128, p64 = ids[:PREFILL_TOKENS], ids[:DECODE_PROMPT]
    eng.prefill(p128)  # warm-up: pages of the file, buffers, thread pools
    eng.decode(p64, 4)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            raise SystemExit(f"worker: expected 'run' on stdin, got {line!r}")
        t = time.perf_counter()
        eng.prefill(p128)
        prefill_s = time.perf_counter() - t
        decode_s, out = eng.decode(p64, DECODE_TOKENS)
        print(json.dumps({"prefill_tok_s": PREFILL_TOKENS / prefill_s, "decode_tok_s": DECODE_TOKENS / decode_s,
                          "ids_head": out[:8]}), flush=True)


# --- driver -------------------------------------------------------------------------------------

def default_llama_python() -> str:
    ok = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    return sys.executable if ok else ""


def check_llama_python(path: str) -> None:
    if not path:
        sys.exit("compare: llama_cpp is not importable by this Python; pass --llama-python PATH, a Python "
                 f"with llama-cpp-python installed. Build one in a venv outside the repository:\n"
                 f"  python -m venv /path/llamavenv && {LLAMA_BUILD.replace('pip', '/path/llamavenv/bin/pip', 1)}")
    r = subprocess.run([path, "-c", "import llama_cpp, numpy; print(llama_cpp.__version__)"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"compare: --llama-python {path} cannot import llama_cpp and numpy ({r.stderr.strip()[-200:]}); "
                 f"install them there: {LLAMA_BUILD}")


class Worker:
    def __init__(self, engine: str, python: str, model_path: str, threads: int, ids: list[int]) -> None:
        self.engine = engine
        env = dict(os.environ)
        if engine == "llamacpp":  # the other venv must not see this checkout's packages
            env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker", engine, "--model", model_path,
                                      "--threads", str(threads), "--ids", json.dumps(ids)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._expect("ready")

    def _readline(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.engine} worker exited (code {self.proc.wait()}); see its stderr above")
        return line.strip()

    def _expect(self, word: str) -> None:
        line = self._readline()
        if line != word:
            raise RuntimeError(f"{self.engine} worker said {line!r}, expected {word!r}")

    def run(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return json.loads(self._readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def compare(args: argparse.Namespace, model_path: str, ids: list[int]) -> None:
    machine = f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    for threads in args.threads:
        workers = {}
        try:
            workers["ringllm"] = Worker("ringllm", sys.executable, model_path, threads, ids)
            workers["llamacpp"] = Worker("llamacpp", args.llama_python, model_path, threads, ids)
            results: dict[str, list[dict]] = {"ringllm": [], "llamacpp": []}
            for rnd in range(args.rounds):
                order = ["ringllm", "llamacpp"] if rnd % 2 == 0 else ["llamacpp", "ringllm"]
                for engine in order:
                    r = workers[engine].run()
                    results[engine].append(r)
                    for metric in ("decode_tok_s", "prefill_tok_s"):
                        print(json.dumps({"bench": "compare", "engine": engine, "metric": metric, "threads": threads,
                                          "round": rnd, "tok_s": round(r[metric], 2), "load": os.getloadavg()[0]}),
                              flush=True)
        finally:
            for w in workers.values():
                w.close()
        for metric in ("decode_tok_s", "prefill_tok_s"):
            ours = statistics.median(r[metric] for r in results["ringllm"])
            theirs = statistics.median(r[metric] for r in results["llamacpp"])
            print(json.dumps({"bench": "compare", "ratio": metric, "threads": threads, "rounds": args.rounds,
                              "ringllm_median": round(ours, 2), "llamacpp_median": round(theirs, 2),
                              "ringllm_over_llamacpp": round(ours / theirs, 3),
                              "model": os.path.basename(model_path), "machine": machine}), flush=True)
        print(json.dumps({"bench": "compare", "threads": threads, "ids_head": {
            e: rs[-1]["ids_head"] for e, rs in results.items()}}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a known model name or a GGUF path")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--llama-python", default=None,
                    help="a Python with llama-cpp-python (default: this one, if it can import llama_cpp)")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="instead: one ringllm peer serving this many greedy streams vs one (bench/serve.py)")
    ap.add_argument("--max-tokens", type=int, default=64, help="with --concurrency: tokens per stream")
    ap.add_argument("--worker", choices=["ringllm", "llamacpp"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ids", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker, args.model, args.threads[0], json.loads(args.ids))
        return
    if args.rounds < 1 or any(t < 1 for t in args.threads):
        sys.exit("compare: --rounds and --threads must be >= 1")
    sys.path.insert(0, str(HERE.parent))
    from ringllm.fetch import resolve_model

    model_path = str(resolve_model(args.model))
    if args.concurrency is not None:
        if args.concurrency < 2:
            sys.exit(f"compare: --concurrency must be >= 2 (it is compared with one stream), got {args.concurrency}")
        sys.exit(subprocess.call([sys.executable, str(HERE / "serve.py"), "--model", model_path, "--peers", "1",
                                  "--threads", str(args.threads[0]), "--concurrency", "1", str(args.concurrency),
                                  "--max-tokens", str(args.max_tokens), "--temperature", "0"]))
    if args.llama_python is None:
        args.llama_python = default_llama_python()
    check_llama_python(args.llama_python)
    from ringllm import runtime

    info, mf = runtime.open_model(model_path)
    mf.close()
    ids = info.tokenizer.encode(TEXT * 8, parse_special=False)[:max(PREFILL_TOKENS, DECODE_PROMPT)]
    if len(ids) < PREFILL_TOKENS:
        sys.exit(f"compare: the prompt text is only {len(ids)} tokens with this tokenizer, need {PREFILL_TOKENS}")
    compare(args, model_path, ids)


if __name__ == "__main__":
    main()
