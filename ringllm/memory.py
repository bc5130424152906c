"""Process memory housekeeping: a peer's resident size is what its host pays for."""

from __future__ import annotations

import ctypes
import gc
import os

# glibc gives every thread that allocates a heap arena of its own (up to 8 per core), and each
# keeps the memory freed into it; a peer's threads (event loop, compute, kernel pool, tokenizer)
# would hold several. Two arenas, measured side by side with bench/load_rss.py and
# bench/ring.py (MALLOC_ARENA_MAX=2 against glibc's default): peak RSS 2.0 MB lower per peer
# (qwen2.5-coder-1.5b, P=4) and 3.3-4.4 MB lower (SmolLM2, P=1 and 2), decode tok/s within noise.
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt() parameter number for the arena limit


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise): loading leaves ~100k
    small freed objects behind, and a peer's resident size is what its host pays for."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> None:
    """Cap glibc's heap arenas (see MALLOC_ARENAS); call before the process starts threads.
    ``$MALLOC_ARENA_MAX``, when set, is glibc's to apply and wins; not glibc: nothing to do."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass
