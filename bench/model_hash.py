"""What model identity by content costs at start-up: the whole-file hash, first run and cached.

    python bench/model_hash.py [--models smollm2-135m,qwen2.5-coder-1.5b] [--rounds 3]

For each model and round prints JSON lines:

- ``{"what": "first_run", ...}``: :func:`ringllm.file_hash.file_sha256` with an empty cache
  (a fresh ``RINGLLM_CACHE``): ms and MB/s, the hash read from the page cache (the file was
  just read; a cold disk adds its own read time, the same the shard loader would pay).
- ``{"what": "second_run", ...}``: the same call again, answered from the cache entry (ms).
- ``{"what": "algo", "algo": "sha256"|"blake2b", ...}``: plain hashlib over the same file,
  the two algorithms alternated in each round, to compare as a ratio on a busy box.

``load`` is the 1-minute load average when the line was written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ringllm.fetch import resolve_model  # noqa: E402
from ringllm.file_hash import file_sha256  # noqa: E402


def _hashlib(path: Path, algo: str) -> float:
    h = hashlib.new(algo)
    buf = bytearray(4 * 2**20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    h.hexdigest()
    return time.perf_counter() - t0


def _line(**kw) -> None:
    print(json.dumps({**kw, "load": round(os.getloadavg()[0], 2)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-1.5b")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for name in args.models.split(","):
        path = resolve_model(name)
        mb = path.stat().st_size / 1e6
        _hashlib(path, "sha256")  # into the page cache
        for r in range(args.rounds):
            with tempfile.TemporaryDirectory() as cache:
                os.environ["RINGLLM_CACHE"] = cache
                t0 = time.perf_counter()
                file_sha256(path)
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                file_sha256(path)
                second = time.perf_counter() - t0
            _line(what="first_run", model=name, round=r, mb=round(mb, 1), ms=round(first * 1e3, 1),
                  mb_per_s=round(mb / first))
            _line(what="second_run", model=name, round=r, ms=round(second * 1e3, 3))
            for algo in (("sha256", "blake2b") if r % 2 == 0 else ("blake2b", "sha256")):
                dt = _hashlib(path, algo)
                _line(what="algo", algo=algo, model=name, round=r, ms=round(dt * 1e3, 1), mb_per_s=round(mb / dt))


if __name__ == "__main__":
    main()
