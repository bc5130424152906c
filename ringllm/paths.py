"""Where ringllm keeps its files: one cache directory for models, file hashes, compiled
kernels and the chat history.

``$RINGLLM_CACHE`` if set, else ``$XDG_CACHE_HOME/ringllm``, else ``~/.cache/ringllm``.
Its own module so that the kernels and the hash cache do not depend on the model downloader.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The ringllm cache directory (not created here: each user makes its subdirectory)."""
    if env := os.environ.get("RINGLLM_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ringllm"
