"""Process memory housekeeping: a peer's resident size is what its host pays for."""

from __future__ import annotations

import ctypes
import gc


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise): loading leaves ~100k
    small freed objects behind, and a peer's resident size is what its host pays for."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
