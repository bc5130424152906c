"""Small synthetic llama GGUF files written with the ``gguf`` package, for fast unit tests.

The tokenizer is byte-level BPE over the 256 byte symbols (GPT-2's byte-to-unicode map) plus a
few merges and ChatML special tokens, so prompts encode without the real model.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    b2u = _bytes_to_unicode()
    tokens = list(SPECIALS) + [b2u[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    for m in merges:
        tokens.append(m.replace(" ", ""))
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, merges


def write_tiny_model(path: Path, *, n_layers: int = 2, dim: int = 64, n_heads: int = 4, n_kv_heads: int = 2,
                     ffn_dim: int = 128, qtype: Q = Q.Q8_0, embd_qtype: Q = Q.Q8_0, tied: bool = True,
                     context_length: int = 128, seed: int = 0, arch: str = "llama",
                     head_dim: int | None = None) -> Path:
    """Write a random GGUF of a llama-like architecture; weights are quantized with gguf.quants.

    ``arch="qwen3"`` adds its per-head q/k RMSNorm weights (attn_q_norm, attn_k_norm);
    ``head_dim`` (default dim // n_heads) is written as attention.key_length/value_length.
    """
    rng = np.random.default_rng(seed)
    tokens, types, merges = tiny_vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_block_count(n_layers)
    w.add_context_length(context_length)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn_dim)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    hd = head_dim or dim // n_heads
    w.add_rope_dimension_count(hd)
    if head_dim is not None:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def mat(name: str, rows: int, cols: int, qt: Q, scale: float) -> None:
        data = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        if qt == Q.F32:
            w.add_tensor(name, data)
        else:
            try:
                raw = gguf.quants.quantize(data, qt)
            except NotImplementedError:  # a type gguf cannot write (e.g. IQ*): random bytes
                block, size = gguf.GGML_QUANT_SIZES[qt]
                raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=qt)

    def vec(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    mat("token_embd.weight", vocab, dim, embd_qtype, 1.0)
    for i in range(n_layers):
        vec(f"blk.{i}.attn_norm.weight", dim)
        mat(f"blk.{i}.attn_q.weight", n_heads * hd, dim, qtype, dim ** -0.5)
        mat(f"blk.{i}.attn_k.weight", n_kv_heads * hd, dim, qtype, dim ** -0.5)
        mat(f"blk.{i}.attn_v.weight", n_kv_heads * hd, dim, qtype, dim ** -0.5)
        mat(f"blk.{i}.attn_output.weight", dim, n_heads * hd, qtype, dim ** -0.5)
        if arch == "qwen3":
            vec(f"blk.{i}.attn_q_norm.weight", hd)
            vec(f"blk.{i}.attn_k_norm.weight", hd)
        vec(f"blk.{i}.ffn_norm.weight", dim)
        mat(f"blk.{i}.ffn_gate.weight", ffn_dim, dim, qtype, dim ** -0.5)
        mat(f"blk.{i}.ffn_up.weight", ffn_dim, dim, qtype, dim ** -0.5)
        mat(f"blk.{i}.ffn_down.weight", dim, ffn_dim, qtype, ffn_dim ** -0.5)
    vec("output_norm.weight", dim)
    if not tied:
        mat("output.weight", vocab, dim, embd_qtype, dim ** -0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
