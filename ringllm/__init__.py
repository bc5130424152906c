"""ringllm: one LLM split across several peers over a TCP ring."""

__version__ = "0.1.0"
