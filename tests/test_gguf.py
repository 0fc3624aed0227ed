"""GGUF inputs: files written by the gguf package's own writer, in llama.cpp's layout (names,
row-permuted Q and K, quantized blocks), read under transformers' names and compressed,
restored and merged like safetensors checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sparsestitch
from sparsestitch.checkpoint import Checkpoint
from sparsestitch.checkpoint.gguf_file import transformers_name, unpermute_rows
from sparsestitch.errors import CheckpointError

from .conftest import bits, save_checkpoint

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
HEADS, KV_HEADS, HIDDEN, VOCAB = 4, 2, 64, 96


def llama_tensors(seed: int) -> dict[str, np.ndarray]:
    """A two-layer Llama's float32 weights under transformers' names (tied embeddings)."""
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        shapes.update({prefix + "input_layernorm.weight": (HIDDEN,),
                       prefix + "post_attention_layernorm.weight": (HIDDEN,),
                       prefix + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
                       prefix + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
                       prefix + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
                       prefix + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                       prefix + "mlp.gate_proj.weight": (128, HIDDEN),
                       prefix + "mlp.up_proj.weight": (128, HIDDEN),
                       prefix + "mlp.down_proj.weight": (HIDDEN, 128)})
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def llama_cpp_permute(array: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for Q and K (the inverse of unpermute_rows)."""
    rows = array.shape[0]
    return (array.reshape(heads, 2, rows // heads // 2, *array.shape[1:])
            .swapaxes(1, 2).reshape(array.shape))


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
              "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def write_gguf(path, tensors: dict[str, np.ndarray], quantized: dict[str, object] = ()):
    """``tensors`` (transformers names) as llama.cpp would store them; ``quantized`` maps
    names to a GGML quantization type (others F32)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    reverse = {v: k for k, v in {**{f"blk.{i}.{b}.weight": f"model.layers.{i}.{h}.weight"
                                    for i in range(2) for b, h in BLOCKS.items()}}.items()}
    for name, array in tensors.items():
        gguf_name = GGUF_NAMES.get(name) or reverse[name]
        if ".attn_q." in gguf_name or ".attn_k." in gguf_name:
            array = llama_cpp_permute(array, HEADS if ".attn_q." in gguf_name else KV_HEADS)
        kind = dict(quantized).get(name)
        if kind is None:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array))
        else:
            data = gguf.quants.quantize(np.ascontiguousarray(array), kind)
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


BLOCKS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def test_names_and_the_rotary_row_order_round_trip():
    assert transformers_name("blk.1.ffn_down.weight") == "model.layers.1.mlp.down_proj.weight"
    assert transformers_name("output.weight") == "lm_head.weight"
    assert transformers_name("blk.0.attn_q.bias") is None
    array = np.arange(16 * 3).reshape(16, 3)
    assert np.array_equal(unpermute_rows(llama_cpp_permute(array, 4), 4), array)
    assert not np.array_equal(llama_cpp_permute(array, 4), array)


def test_a_gguf_reads_as_the_transformers_checkpoint(tmp_path):
    tensors = llama_tensors(0)
    q8 = "model.layers.0.mlp.up_proj.weight"
    path = write_gguf(tmp_path / "m.gguf", tensors, {q8: Q.Q8_0})
    with Checkpoint(path) as ckpt:
        assert sorted(ckpt.names) == sorted(tensors)
        for name, array in tensors.items():
            entry = ckpt.entry(name)
            assert entry.dtype == "F32" and entry.shape == array.shape, name
            got = ckpt.read(name).view(np.float32)
            if name == q8:  # dequantized: Q8_0's error, not a permutation's
                expected = gguf.quants.dequantize(gguf.quants.quantize(array, Q.Q8_0), Q.Q8_0)
                assert np.array_equal(got, expected)
                assert 0 < np.abs(got - array).max() < 0.05
            else:
                assert np.array_equal(got, array), name
            rows = ckpt.read_rows(name, 1, 3) if len(array.shape) > 1 else None
            if rows is not None:
                assert np.array_equal(rows, got[1:3].reshape(-1).view(np.uint32))


def test_compress_restore_and_merge_from_a_gguf_base(tmp_path):
    """A GGUF base (tied embeddings: no output.weight) with safetensors fine-tunes: restore
    gives the fine-tune bit for bit; a fine-tune storing lm_head adds it."""
    tensors = llama_tensors(1)
    base = write_gguf(tmp_path / "base.gguf", tensors)
    generator = torch.Generator().manual_seed(2)
    tune = {k: torch.from_numpy(v) + 0.01 * torch.randn(v.shape, generator=generator)
            for k, v in tensors.items()}
    tune["lm_head.weight"] = tune["model.embed_tokens.weight"].clone()
    tune_path = save_checkpoint(tmp_path / "ft.safetensors", tune)
    sparsestitch.compress(base, tune_path, tmp_path / "ft.delta", lossless=True)
    restored = load_file(sparsestitch.restore(base, tmp_path / "ft.delta",
                                              tmp_path / "restored.safetensors"))
    assert restored.keys() == tune.keys()
    for name in tune:
        assert np.array_equal(bits(restored[name]), bits(tune[name])), name
    merged = load_file(sparsestitch.merge(base, [tune_path, tune_path],
                                          tmp_path / "merged.safetensors", keep=0.1))
    assert merged.keys() == tune.keys()


def test_asked_dtype_and_refusals(tmp_path, monkeypatch):
    tensors = llama_tensors(2)
    path = write_gguf(tmp_path / "m.gguf", tensors)
    monkeypatch.setenv("SPARSESTITCH_GGUF_DTYPE", "bf16")
    with Checkpoint(path) as ckpt:
        name = "model.layers.1.self_attn.k_proj.weight"
        assert ckpt.entry(name).dtype == "BF16"
        expected = bits(torch.from_numpy(tensors[name]).to(torch.bfloat16))
        assert np.array_equal(ckpt.read(name), expected.view(np.uint16))
    monkeypatch.delenv("SPARSESTITCH_GGUF_DTYPE")
    writer = gguf.GGUFWriter(str(tmp_path / "other.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        Checkpoint(tmp_path / "other.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(CheckpointError, match="not a readable GGUF file") as caught:
        Checkpoint(tmp_path / "bad.gguf")
    assert caught.value.path == str(tmp_path / "bad.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        Checkpoint(truncated)


def test_an_unmapped_tensor_and_a_bad_asked_dtype_are_refused(tmp_path, monkeypatch):
    writer = gguf.GGUFWriter(str(tmp_path / "extra.gguf"), "llama")
    writer.add_head_count(HEADS)
    writer.add_tensor("blk.0.attn_q.bias", np.zeros(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="'blk.0.attn_q.bias' has no transformers name"):
        Checkpoint(tmp_path / "extra.gguf")
    path = write_gguf(tmp_path / "m.gguf", llama_tensors(3))
    monkeypatch.setenv("SPARSESTITCH_GGUF_DTYPE", "int8")
    with pytest.raises(ValueError, match="SPARSESTITCH_GGUF_DTYPE must be F32, F16 or BF16"):
        Checkpoint(path)
