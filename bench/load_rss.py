"""Each peer's peak memory and file reads for its shard of a P-peer plan: one JSON line per peer.

    python bench/load_rss.py [--model qwen2.5-coder-1.5b] [--peers 4] [--threads 1] [--tokens 16]
                             [--fixed-mb MB] [--factor 1.35] [--warm] [--fixed-only]

1. ``read``, per rank, each in a fresh process of its own, one rank at a time: the model file is
   dropped from the page cache first (``posix_fadvise(DONTNEED)``; ``cached_mb_before`` is what
   stayed, i.e. pages another process has mapped; ``--warm`` skips the drop), then the model is
   opened (header, tokenizer, fingerprint) and rank r's shard loaded as a peer loads it
   (``runtime.open_model``, ``runtime.load_model``). Reported:

   - ``slice_bytes``: the GGUF bytes of the rank's slices, computed here from the plan and the
     tensor table (``gguf_parse.GGUFFile``), not from the loader: the owned rows of attn_q/k/v,
     ffn_gate/up, token_embd and output; the owned input columns of attn_output and ffn_down,
     widened to whole quant blocks, in every row; every 1-D tensor (norms, qkv biases) whole.
   - ``copied_bytes``: the bytes the loader handed to the weight constructors
     (``QuantMatrix.from_raw`` and ``JitMatrix.from_raw``, wrapped in the worker process: every
     weight byte copied out of the file map passes through one of them, once).
   - ``page_bytes``: the 4 KiB pages that hold those slices, the least any page-granular read
     (mmap or read(2) through the page cache) can fetch.
   - ``disk_read_bytes`` / ``open_disk_read_bytes``: ``/proc/self/io`` read_bytes over the load
     and over the open: real disk reads, page faults on the map and the kernel's readahead
     included; meaningful only from a cold cache (see ``cached_mb_before``).
   - ``rchar``: ``/proc/self/io`` rchar over the load: bytes through read(2)-like calls only.
     The loader reads through a memory map, whose page faults rchar does not count, so it is
     ~0 and is not a measure of what was read (reported to show exactly that).

2. ``rss``: a real ring of P peer processes on 127.0.0.1 (bench/ring.py's ``Ring``, ``--threads``
   each), one greedy request of a 64-token prompt and ``--tokens`` generated, then each peer's
   VmHWM (its peak RSS, loading included).

0. ``fixed``: the per-process cost that does not grow with a peer's share, for this model: in a
   fresh process, in a peer's order, RSS after ``import numpy``, after ``import numba``, with
   everything a peer imports (what ``launch.serve_peer`` imports: the peer, the ring, the HTTP
   server, uvloop), with the model opened (``runtime.open_model``: header, metadata, tokenizer;
   no weights) and with the kernels loaded and run once (``runtime.set_threads``):
   ``fixed_mb``, the RSS at that point. It depends on the
   model through its vocabulary (docs/performance.md states it per known model).

Then one line per peer: ``share_bytes`` (= slice_bytes), ``peak_rss``, ``limit`` = share_bytes x
``--factor`` + the fixed cost (``fixed_mb`` measured above, or ``--fixed-mb``), ``within_limit``,
and the read figures. ``--fixed-only`` stops after part 0. Run as root for the cache drop of a
file you do not own.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import mmap
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

MB = 1 << 20
PAGE = mmap.PAGESIZE
# The numba layout holds Q4_K at 1.33 and Q6_K at 1.22 times its GGUF bytes (tests/test_jit.py).
FACTOR = 1.35

ROW_SPLIT = ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")  # column-parallel: owned output rows
COL_SPLIT = ("attn_output", "ffn_down")  # row-parallel: owned input columns, in every row
VOCAB_SPLIT = ("token_embd", "output")  # vocabulary rows


def io_counters() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        key, _, val = line.partition(":")
        out[key] = int(val)
    return out


def cached_bytes(path: str) -> int:
    """Bytes of ``path`` in the page cache now (mincore over a fresh map of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = os.path.getsize(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = np.frombuffer(mm, np.uint8)
        vec = (ctypes.c_ubyte * (-(-size // PAGE)))()
        rc = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
        del view
        if rc != 0:
            raise OSError(ctypes.get_errno(), f"mincore on {path}")
    return int((np.frombuffer(vec, np.uint8) & 1).sum()) * PAGE


def drop_from_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def slice_ranges(path: str, shard) -> list[tuple[str, int, int, int, int, int]]:
    """The byte ranges of the file that hold ``shard``'s slices, one (name, offset, row_bytes,
    row0, row1, byte0, byte1) per tensor: bytes [byte0, byte1) of rows [row0, row1), the row
    starting at offset + row * row_bytes. From the plan and the tensor table only."""
    from gguf import GGML_QUANT_SIZES

    from ringllm.gguf_parse import GGUFFile

    hd = shard.head_dim
    (h0, h1), (k0, k1), (f0, f1), (v0, v1) = shard.heads, shard.kv_heads, shard.ffn, shard.vocab
    out = []
    with GGUFFile(path) as g:
        for name, t in g.tensors.items():
            cols = t.shape[0]
            rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
            row_bytes = t.nbytes // rows
            part = name.split(".")[-2]
            if len(t.shape) == 1:  # norms, biases: every peer reads them whole
                rng = (0, rows, 0, row_bytes)
            elif part in ROW_SPLIT:
                lo, hi = {"attn_q": (h0 * hd, h1 * hd), "attn_k": (k0 * hd, k1 * hd), "attn_v": (k0 * hd, k1 * hd),
                          "ffn_gate": (f0, f1), "ffn_up": (f0, f1)}[part]
                if part.startswith("attn") and h1 <= h0:
                    lo = hi = 0
                rng = (lo, hi, 0, row_bytes)
            elif part in COL_SPLIT:
                lo, hi = (h0 * hd, h1 * hd) if part == "attn_output" else (f0, f1)
                block, size = GGML_QUANT_SIZES[t.qtype]
                if hi <= lo:
                    rng = (0, 0, 0, 0)
                else:  # whole quant blocks
                    rng = (0, rows, lo // block * size, -(-hi // block) * size)
            elif name.split(".")[0] in VOCAB_SPLIT:
                rng = (v0, v1, 0, row_bytes)
            else:
                raise SystemExit(f"load_rss: no slicing rule for tensor {name!r} (shape {t.shape})")
            out.append((name, t.offset, row_bytes, *rng))
    return out


def slice_bytes(ranges) -> int:
    return sum((r1 - r0) * (b1 - b0) for _, _, _, r0, r1, b0, b1 in ranges)


def page_bytes(ranges, file_size: int) -> int:
    """Bytes of the distinct pages that hold the ranges."""
    touched = np.zeros(-(-file_size // PAGE), bool)
    for _, off, row_bytes, r0, r1, b0, b1 in ranges:
        if r1 <= r0 or b1 <= b0:
            continue
        starts = off + np.arange(r0, r1, dtype=np.int64) * row_bytes + b0
        first, last = starts // PAGE, (starts + (b1 - b0) - 1) // PAGE
        if b1 - b0 == row_bytes:  # whole rows: one contiguous run
            touched[first[0]: last[-1] + 1] = True
            continue
        for a, b in zip(first, last):
            touched[a: b + 1] = True
    return int(touched.sum()) * PAGE


def count_copies() -> list[int]:
    """Wrap the weight constructors so that the bytes handed to them are summed in the result."""
    from ringllm.ops.jit_matrix import JitMatrix
    from ringllm.ops.quant import QuantMatrix

    total = [0]
    for cls in (QuantMatrix, JitMatrix):
        orig = cls.from_raw

        def counted(qtype, raw, rows, cols, rows_done=None, _orig=orig):
            total[0] += int(raw.nbytes)
            return _orig(qtype, raw, rows, cols, rows_done=rows_done)

        cls.from_raw = staticmethod(counted)
    return total


def read_worker(model_path: str, p: int, rank: int, threads: int, warm: bool) -> None:
    from ringllm import runtime

    if not warm:
        drop_from_cache(model_path)
    cached_before = cached_bytes(model_path)
    runtime.set_threads(threads)
    copied = count_copies()
    io0 = io_counters()
    info, mf = runtime.open_model(model_path)
    io1 = io_counters()
    plan = runtime.make_plan(info, [1.0] * p)
    model = runtime.load_model(mf, plan, rank, max_len=256)
    mf.close()
    io2 = io_counters()
    ranges = slice_ranges(model_path, plan[rank])
    print(json.dumps({
        "rank": rank, "slice_bytes": slice_bytes(ranges), "copied_bytes": copied[0],
        "page_bytes": page_bytes(ranges, os.path.getsize(model_path)),
        "disk_read_bytes": io2["read_bytes"] - io1["read_bytes"],
        "open_disk_read_bytes": io1["read_bytes"] - io0["read_bytes"],
        "rchar": io2["rchar"] - io1["rchar"], "cached_mb_before": round(cached_before / MB, 1),
        "weights_bytes": model.w.nbytes,
        "worker_peak_rss_mb": round(int(_status("VmHWM")) / 1024, 1),
    }), flush=True)


def _status(field: str, pid: str = "self") -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split()[1]
    raise KeyError(field)


# Run as its own interpreter (python -c), so that nothing but numpy is imported before the baseline.
FIXED_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
from ringllm.memory import limit_malloc_arenas
limit_malloc_arenas()  # as a peer process does first
import numpy
base = rss()
import numba
nb = rss()
import uvloop  # everything a peer process imports (launch.serve_peer): the loop, peer, ring, HTTP
import ringllm.launch, ringllm.http.app, ringllm.http.serve, ringllm.http.joining, ringllm.peer
import ringllm.ring.formation, ringllm.ring.handshake, ringllm.ring.tls
from ringllm import runtime
imp = rss()
info, mf = runtime.open_model(sys.argv[2])  # header, metadata, tokenizer: no weights
opened = rss()
runtime.set_threads(1)  # then the numba kernels, loaded from the cache and each run once, as a peer does
k = rss()
print(json.dumps({"numpy_rss_mb": round(base, 1), "numba_import_above_numpy_mb": round(nb - base, 1),
                  "peer_imports_mb": round(imp - nb, 1), "model_opened_mb": round(opened - imp, 1),
                  "kernels_mb": round(k - opened, 1), "fixed_mb": round(k, 1)}))
"""


def measure_fixed(model_path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", FIXED_SCRIPT, str(HERE.parent), model_path],
                         check=True, capture_output=True, text=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    print(json.dumps({"bench": "load_rss", "part": "fixed", "model": os.path.basename(model_path), **row}),
          flush=True)
    return row


def measure_reads(model_path: str, p: int, threads: int, warm: bool) -> list[dict]:
    rows = []
    for rank in range(p):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--read-worker", f"{p}:{rank}", "--model", model_path,
               "--threads", str(threads)] + (["--warm"] if warm else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps({"bench": "load_rss", "part": "read", "peers": p, **rows[-1]}), flush=True)
    return rows


def measure_rss(model_path: str, p: int, threads: int, tokens: int) -> list[float]:
    from ring import TEXT, Ring, timed_request

    from ringllm import runtime

    info, mf = runtime.open_model(model_path)
    mf.close()
    prompt_ids = info.tokenizer.encode(TEXT * 8, parse_special=False)[:64]
    ring = Ring(p, model_path, threads, "f32")
    try:
        ring.wait()
        done = asyncio.run(timed_request(ring.ports[0], prompt_ids, tokens, ring.hosts[0]))
        rss = ring.peak_rss_mb()
        print(json.dumps({"bench": "load_rss", "part": "rss", "peers": p, "tokens": len(done["ids"]),
                          "peak_rss_mb": rss, "load": round(os.getloadavg()[0], 2)}), flush=True)
        return rss
    finally:
        ring.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help="a known model name or a GGUF path")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="compute threads per peer")
    ap.add_argument("--tokens", type=int, default=16, help="tokens the ring generates before RSS is read")
    ap.add_argument("--fixed-mb", type=float, default=None,
                    help="fixed per-process cost of the limit (default: as measured in part 0)")
    ap.add_argument("--fixed-only", action="store_true", help="measure the fixed cost only")
    ap.add_argument("--factor", type=float, default=FACTOR, help="the limit's multiple of the share")
    ap.add_argument("--warm", action="store_true", help="do not drop the model file from the page cache")
    ap.add_argument("--read-worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peers < 1 or a.threads < 1 or a.tokens < 1:
        sys.exit("load_rss: --peers, --threads and --tokens must be >= 1")
    if a.read_worker is not None:
        p, rank = map(int, a.read_worker.split(":"))
        read_worker(a.model, p, rank, a.threads, a.warm)
        return
    from ringllm.fetch import resolve_model

    model_path = str(resolve_model(a.model))
    fixed = measure_fixed(model_path)
    if a.fixed_only:
        return
    fixed_mb = fixed["fixed_mb"] if a.fixed_mb is None else a.fixed_mb
    reads = measure_reads(model_path, a.peers, a.threads, a.warm)
    rss = measure_rss(model_path, a.peers, a.threads, a.tokens)
    machine = f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    for rank, (rd, peak) in enumerate(zip(reads, rss)):
        share = rd["slice_bytes"]
        limit = share * a.factor / MB + fixed_mb
        print(json.dumps({
            "bench": "load_rss", "model": os.path.basename(model_path), "peers": a.peers, "rank": rank,
            "file_bytes": os.path.getsize(model_path), "share_bytes": share, "peak_rss_mb": peak,
            "limit_mb": round(limit, 1), "within_limit": peak <= limit,
            "limit": f"share x {a.factor} + {fixed_mb} MB",
            "weights_bytes": rd["weights_bytes"], "peak_above_weights_mb": round(peak - rd["weights_bytes"] / MB, 1),
            "copied_bytes": rd["copied_bytes"], "page_bytes": rd["page_bytes"],
            "disk_read_bytes": rd["disk_read_bytes"], "open_disk_read_bytes": rd["open_disk_read_bytes"],
            "rchar": rd["rchar"], "cached_mb_before": rd["cached_mb_before"], "machine": machine,
        }), flush=True)


if __name__ == "__main__":
    main()
