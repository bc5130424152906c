"""GGUF parsing (against gguf.GGUFReader as the oracle) and one-line errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from ringllm.errors import ModelError, UnsupportedError
from ringllm.fetch import resolve_model
from ringllm.gguf_parse import GGUFFile
from ringllm.model_file import ModelFile
from tests.synth import write_tiny_model


def _oracle(path):
    r = GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type, tuple(int(x) for x in t.shape), bytes(np.asarray(t.data).view(np.uint8).reshape(-1)[:64]))
               for t in r.tensors}
    return meta, tensors


def _check_against_oracle(path):
    meta, tensors = _oracle(path)
    with GGUFFile(path) as f:
        assert f.metadata.keys() == meta.keys()
        for k in meta:
            assert f.metadata[k] == pytest.approx(meta[k]) if isinstance(meta[k], float) else f.metadata[k] == meta[k], k
        assert f.tensors.keys() == tensors.keys()
        for name, (qt, shape, head) in tensors.items():
            t = f.tensors[name]
            assert (t.qtype, t.shape) == (qt, shape), name
            assert bytes(f.data(t)[:64]) == head, name


def test_parser_agrees_with_gguf_reader_on_synthetic(tmp_path):
    _check_against_oracle(write_tiny_model(tmp_path / "t.gguf", tied=False, qtype=Q.Q4_1))


@pytest.mark.model
def test_parser_agrees_with_gguf_reader_on_smollm2(smollm2_path):
    _check_against_oracle(smollm2_path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        ModelFile(tmp_path / "nope.gguf")


def test_directory(tmp_path):
    with pytest.raises(ModelError, match="is a directory"):
        ModelFile(tmp_path)


def test_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(ModelError, match=r"is not a GGUF file \(starts with b'PK\\x03\\x04'"):
        ModelFile(p)


def test_empty_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"")
    with pytest.raises(ModelError, match="empty"):
        ModelFile(p)


@pytest.mark.parametrize("keep", [10, 200, 5000, -100])
def test_truncated_file_is_named(tmp_path, keep):
    src = write_tiny_model(tmp_path / "t.gguf").read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(src[:keep] if keep > 0 else src[:keep])
    with pytest.raises(ModelError, match="truncated"):
        ModelFile(p)


def test_garbage_after_magic_is_a_model_error(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(30):
        p = tmp_path / f"g{i}.gguf"
        p.write_bytes(b"GGUF\x03\x00\x00\x00" + rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
        with pytest.raises(ModelError):
            ModelFile(p)


def test_unsupported_architecture(tmp_path):
    p = write_tiny_model(tmp_path / "t.gguf", arch="gpt2")
    with pytest.raises(UnsupportedError, match=r"architecture 'gpt2' is not supported"):
        ModelFile(p)


def test_unsupported_tensor_type_names_the_tensor(tmp_path):
    p = write_tiny_model(tmp_path / "t.gguf", qtype=Q.IQ4_NL)
    with pytest.raises(UnsupportedError, match=r"tensor 'blk\.0\.attn_q\.weight' has type IQ4_NL"):
        ModelFile(p)


def test_config_of_smollm2_is_read(smollm2_path):
    mf = ModelFile(smollm2_path)
    c = mf.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.tied_embeddings and c.rope_theta == 100000.0
    mf.close()


def test_fetch_unknown_name_lists_known(tmp_path):
    with pytest.raises(ModelError, match=r"neither an existing file nor a known model name \(known: gemma3-270m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, smollm2-135m\)"):
        resolve_model("no-such-model")
