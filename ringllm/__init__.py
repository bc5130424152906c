"""ringllm: one LLM split across several peers over a TCP ring.

The Python API (imported lazily, so ``import ringllm`` stays cheap):

- :func:`ringllm.connect` — an asyncio client for any peer's HTTP API.
- :class:`ringllm.LocalRing` — a whole ring inside this process.
- :class:`ringllm.Request`, :class:`ringllm.SamplingParams` — what to generate.
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "connect": "ringllm.client",
    "Client": "ringllm.client",
    "LocalRing": "ringllm.local",
    "Request": "ringllm.generation",
    "SamplingParams": "ringllm.sampling",
    "RingError": "ringllm.errors",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ringllm' has no attribute {name!r}")
