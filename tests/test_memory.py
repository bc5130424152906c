"""Process memory housekeeping (ringllm/memory.py), checked in fresh interpreters."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Six threads alive at once, each allocating through malloc (bytearrays beyond pymalloc's small
# objects), then glibc's malloc_stats() prints one "Arena N:" block per heap arena to stderr.
ARENAS = """
import ctypes, sys, threading
if sys.argv[1] == "limit":
    from ringllm.memory import limit_malloc_arenas
    limit_malloc_arenas()
barrier = threading.Barrier(6)
def work():
    keep = [bytearray(100_000) for _ in range(5)]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(6)]
[t.start() for t in threads]
[t.join() for t in threads]
ctypes.CDLL(None).malloc_stats()
"""


def _arenas(mode: str, **env: str) -> int:
    base = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", ARENAS, mode], env={**base, **env}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return sum(line.startswith("Arena ") for line in out.stderr.splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_stats")
def test_a_peer_process_keeps_two_heap_arenas():
    from ringllm.memory import MALLOC_ARENAS

    assert _arenas("none") > MALLOC_ARENAS  # each live thread would get its own
    assert _arenas("limit") == MALLOC_ARENAS
    assert _arenas("limit", MALLOC_ARENA_MAX="4") > MALLOC_ARENAS  # the user's setting wins
