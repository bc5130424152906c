"""A peer's loader copies exactly its planned slices out of the file (and every 1-D tensor whole).

The expected bytes come from the plan and gguf.GGUFReader's tensor table, not from the loader;
the measured ones are every byte handed to the weight constructors (QuantMatrix.from_raw and
JitMatrix.from_raw), which is how all weight bytes leave the file map. bench/load_rss.py
measures the same on a real model, with the disk reads and peak RSS beside it.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as Q

from ringllm.model_file import ModelFile
from ringllm.ops.kernels import Kernels
from ringllm.ops.quant import QuantMatrix
from ringllm.shard.loader import ffn_block_size, load_shard
from ringllm.shard.plan import plan_shards
from tests.synth import write_tiny_model


def expected_bytes(path, shard) -> dict[str, int]:
    hd = shard.head_dim
    (h0, h1), (k0, k1), (f0, f1), (v0, v1) = shard.heads, shard.kv_heads, shard.ffn, shard.vocab
    out = {}
    for t in GGUFReader(path).tensors:
        cols, rows = int(t.shape[0]), int(np.prod(t.shape[1:]))
        block, size = GGML_QUANT_SIZES[t.tensor_type]
        row_bytes = cols // block * size
        part = t.name.split(".")[-2]
        if len(t.shape) == 1:
            n = int(t.n_bytes)
        elif part in ("attn_q", "attn_k", "attn_v"):
            lo, hi = (h0 * hd, h1 * hd) if part == "attn_q" else (k0 * hd, k1 * hd)
            n = (hi - lo) * row_bytes if h1 > h0 else 0
        elif part in ("ffn_gate", "ffn_up"):
            n = (f1 - f0) * row_bytes
        elif part in ("attn_output", "ffn_down"):  # input columns, widened to whole blocks
            lo, hi = (h0 * hd, h1 * hd) if part == "attn_output" else (f0, f1)
            n = rows * (-(-hi // block) - lo // block) * size if hi > lo else 0
        else:  # token_embd, output: vocabulary rows
            n = (v1 - v0) * row_bytes
        out[t.name] = n
    return out


@pytest.fixture
def copied(monkeypatch):
    """The bytes every weight constructor was handed, summed."""
    from ringllm.ops.jit_matrix import JitMatrix

    total = [0]
    for cls in (QuantMatrix, JitMatrix):
        orig = cls.from_raw

        def counted(qtype, raw, rows, cols, rows_done=None, _orig=orig):
            total[0] += int(raw.nbytes)
            return _orig(qtype, raw, rows, cols, rows_done=rows_done)

        monkeypatch.setattr(cls, "from_raw", staticmethod(counted))
    return total


@pytest.mark.parametrize("family", ["numpy", "numba"])
@pytest.mark.parametrize("peers", [1, 3, 4])
def test_each_rank_copies_only_its_slices(tmp_path, copied, family, peers):
    # head_dim 16 with Q8_0's 32-value blocks: at P=3 and 4 a peer's attn_output columns are
    # cut inside a block and must be widened; untied, so output.weight is split too.
    path = write_tiny_model(tmp_path / "t.gguf", dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128,
                            qtype=Q.Q8_0, tied=False)
    mf = ModelFile(path)
    plan = plan_shards(mf.config, [1.0] * peers, ffn_block_size(mf))
    whole = sum(expected_bytes(path, plan_shards(mf.config, [1.0], ffn_block_size(mf))[0]).values())
    for rank in range(peers):
        want = expected_bytes(path, plan[rank])
        copied[0] = 0
        load_shard(mf, plan[rank], Kernels(family, 1))
        assert copied[0] == sum(want.values()), (rank, want)
        if peers > 1:
            assert copied[0] < whole / 2
    mf.close()
