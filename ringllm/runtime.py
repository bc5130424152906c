"""Wiring for one process: open a model, load a peer's shard, turn a user's prompt into ids.

Kept apart from the CLI so the Python API, the peer and the tests share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ringllm.chat import render_chat
from ringllm.fetch import resolve_model
from ringllm.memory import release_free_memory
from ringllm.model import AllReduce, Transformer
from ringllm.model_file import ModelConfig, ModelFile
from ringllm.ops import kernels as kernel_choice
from ringllm.ops.kernels import Kernels
from ringllm.shard.loader import ffn_block_size, load_shard
from ringllm.shard.plan import ShardPlan, plan_shards
from ringllm.tokenizer import Tokenizer

Progress = Callable[[str], None]


@dataclass
class ModelInfo:
    """What every peer knows of the model without holding its weights."""

    path: str
    config: ModelConfig
    fingerprint: str
    tokenizer: Tokenizer
    chat_template: str | None
    ffn_block: int


def open_model(spec: str | None, progress: Progress | None = None) -> tuple[ModelInfo, ModelFile]:
    """Resolve (fetching if needed) and open a model; return its info and the open file."""
    mf = ModelFile(resolve_model(spec, progress=progress))
    tokenizer = Tokenizer.from_metadata(mf.metadata)
    info = ModelInfo(
        path=str(mf.path),
        config=mf.config,
        fingerprint=mf.fingerprint,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,  # the GGUF's, or the family's (Gemma's base GGUF has none)
        ffn_block=ffn_block_size(mf),
    )
    mf.drop_vocabulary()  # the tokenizer has what it needs; ~10 MB of Python strings go
    release_free_memory()  # before the weights arrive, so they reuse the freed pages
    return info, mf


def make_plan(info: ModelInfo, weights: Sequence[float]) -> ShardPlan:
    return plan_shards(info.config, weights, info.ffn_block)


def load_model(mf: ModelFile, plan: ShardPlan, rank: int, allreduce: AllReduce | None = None,
               max_len: int | None = None, kernels: Kernels | None = None) -> Transformer:
    """Load rank's shard out of the open file, for ``kernels`` (default: the ones the last
    :func:`set_threads` chose). ``allreduce`` None: the model runs alone (see Transformer).
    The caller should close ``mf`` afterwards."""
    model = Transformer(load_shard(mf, plan[rank], kernels or _kernels), allreduce, max_len=max_len)
    release_free_memory()
    return model


_kernels: Kernels | None = None


def set_threads(n: int, kernels: str = "auto", say: Progress | None = None) -> Kernels:
    """Choose the kernel family (``auto``: numba where it imports) and use n compute threads;
    BLAS itself stays single-threaded (we split rows). Models loaded afterwards use them."""
    global _kernels
    _kernels = kernel_choice.choose(kernels, n, say)
    return _kernels


def prompt_ids(info: ModelInfo, prompt: str | None = None, *, raw: bool = False, system: str | None = None,
               messages: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
    """Token ids for a prompt: raw text as-is (special tokens parsed), or chat messages rendered
    with the model's chat template (its family's standard one when the GGUF has none)."""
    tok = info.tokenizer
    if raw:
        assert prompt is not None
        return tok.encode(prompt, parse_special=True)
    if messages is None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = render_chat(info.chat_template, list(messages), add_generation_prompt=True,
                       bos_token=tok.token_text(tok.bos_id) if tok.bos_id is not None else "",
                       eos_token=tok.token_text(tok.eos_id) if tok.eos_id is not None else "")
    ids = tok.encode(text, parse_special=True, add_bos=False)
    # Templates that write the BOS token themselves must not get a second one.
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids = [tok.bos_id] + ids
    return ids


def as_ids(x: Sequence[int]) -> np.ndarray:
    return np.asarray(list(x), np.int64)
