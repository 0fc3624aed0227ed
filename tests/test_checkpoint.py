"""Checkpoint I/O: safetensors files and Hugging Face folders, read and written streaming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsestitch
from sparsestitch.core.atomic import OUTPUT_MARKER
from sparsestitch.checkpoint import INDEX_NAME, Checkpoint, CheckpointWriter, OutputTensor, Shard
from sparsestitch.core.errors import CheckpointError

from .conftest import bits, finetune_of, save_checkpoint, small_model


def every_dtype() -> dict[str, torch.Tensor]:
    """One tensor per safetensors dtype torch writes, plus 0-d and zero-size tensors,
    with the awkward float values (NaN, -0.0, inf, subnormals) in them."""
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-40, 1e-310])
    out = {}
    for name, dt in [("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16),
                     ("f64", torch.float64)]:
        values = torch.randn(5, 6, generator=g, dtype=torch.float64)
        values.view(-1)[:6] = special.to(torch.float64)
        out[name] = values.to(dt)
    for name, dt in [("i64", torch.int64), ("i32", torch.int32), ("i16", torch.int16),
                     ("i8", torch.int8), ("u8", torch.uint8)]:
        out[name] = torch.randint(-100 if dt != torch.uint8 else 0, 100, (3, 4, 2), generator=g,
                                  dtype=dt)
    out["bool"] = torch.rand(7, generator=g) > 0.5
    out["scalar_f32"] = torch.tensor(2.5)
    out["scalar_i64"] = torch.tensor(-7)
    out["empty_rows"] = torch.zeros(0, 3)
    out["empty_cols"] = torch.zeros(4, 0, dtype=torch.bfloat16)
    out["empty_1d"] = torch.zeros(0, dtype=torch.int32)
    return out


SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                     torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
                     torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def assert_same_bits(got: np.ndarray, tensor: torch.Tensor, name: str) -> None:
    assert got.shape == tuple(tensor.shape), name
    assert got.tobytes() == bits(tensor).tobytes(), name


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert bits(got[name]).tobytes() == bits(want[name]).tobytes(), name


def test_single_file_every_dtype(tmp_path):
    tensors = every_dtype()
    path = save_checkpoint(tmp_path / "m.safetensors", tensors)
    with Checkpoint(path) as ckpt:
        assert not ckpt.is_folder
        assert ckpt.names == sorted(tensors)
        assert ckpt.extra_files == []
        for name, tensor in tensors.items():
            assert ckpt.entry(name).dtype == SAFETENSORS_NAMES[tensor.dtype]
            assert ckpt.entry(name).shape == tuple(tensor.shape)
            assert name in ckpt
            assert_same_bits(ckpt.read(name), tensor, name)
        with pytest.raises(CheckpointError, match="not found"):
            ckpt.read("missing")


@pytest.mark.parametrize("shards", [1, 3])
def test_folder_reads_like_the_tensors(tmp_path, shards):
    tensors = every_dtype()
    folder = save_checkpoint(tmp_path / "model", tensors, shards=shards)
    with Checkpoint(folder) as ckpt:
        assert ckpt.is_folder
        assert ckpt.names == sorted(tensors)
        assert len(ckpt.layout) == shards
        assert sorted(n for _, names in ckpt.layout for n in names) == sorted(tensors)
        for name, tensor in tensors.items():
            assert_same_bits(ckpt.read(name), tensor, name)
        assert [p.name for p in ckpt.extra_files] == ["config.json", "tokenizer.json"]


def test_folder_with_one_model_safetensors(tmp_path):
    tensors = small_model()
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    with Checkpoint(folder) as ckpt:
        assert ckpt.layout == [("model.safetensors", sorted(tensors))]
        for name, tensor in tensors.items():
            assert_same_bits(ckpt.read(name), tensor, name)


def test_sharded_layout_follows_the_index(tmp_path):
    folder = save_checkpoint(tmp_path / "model", small_model(), shards=2)
    index = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    with Checkpoint(folder) as ckpt:
        for file_name, names in ckpt.layout:
            assert all(index[n] == file_name for n in names)
            assert names == sorted(names)
        assert {ckpt.locate(n).file.name for n in ckpt.names} == set(index.values())


@pytest.mark.parametrize("name", ["f32", "bf16", "i8", "bool", "scalar_f32", "empty_rows",
                                  "empty_cols"])
def test_row_blocks_equal_the_whole_tensor(tmp_path, name):
    tensors = every_dtype()
    path = save_checkpoint(tmp_path / "m.safetensors", tensors)
    with Checkpoint(path) as ckpt:
        whole = ckpt.read(name).reshape(-1)
        shape = ckpt.entry(name).shape
        rows = shape[0] if shape else 1
        for step in range(1, rows + 2):
            parts = [ckpt.read_rows(name, s, min(rows, s + step)) for s in range(0, rows, step)]
            joined = np.concatenate(parts) if parts else np.empty(0, whole.dtype)
            assert joined.tobytes() == whole.tobytes()
        if rows >= 3:
            assert ckpt.read_rows(name, 1, 3).tobytes() == ckpt.read(name)[1:3].tobytes()


def test_reads_are_fresh_buffers(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", {"w": torch.ones(4)})
    with Checkpoint(path) as ckpt:
        first = ckpt.read("w")
        first[:] = 0
        assert ckpt.read("w").view(np.float32).tolist() == [1.0] * 4


def write_with_writer(target: Path, shards_of: list[dict[str, torch.Tensor]], *, folder: bool,
                      rows_per_write: int = 2, extra_files=()) -> None:
    """Write tensors (raw bits, in row blocks) with CheckpointWriter."""
    shards = [Shard(f"model-{i + 1:05d}-of-{len(shards_of):05d}.safetensors",
                    [OutputTensor(n, SAFETENSORS_NAMES[t.dtype], tuple(t.shape))
                     for n, t in sorted(group.items())], {"format": "pt"})
              for i, group in enumerate(shards_of)]
    with CheckpointWriter(target, shards, folder=folder, extra_files=extra_files) as writer:
        for group in shards_of:
            for name in sorted(group):
                data = bits(group[name])
                if data.size == 0:
                    writer.write(name, data)  # zero bytes: accepted, wherever the tensor lies
                    continue
                data = data.reshape(data.shape[0] if data.ndim else 1, -1)
                for start in range(0, data.shape[0], rows_per_write):
                    writer.write(name, data[start:start + rows_per_write])


def test_writer_single_file_reads_back_with_safetensors(tmp_path):
    tensors = every_dtype()
    target = tmp_path / "out.safetensors"
    write_with_writer(target, [tensors], folder=False)
    assert_same_tensors(load_file(target), tensors)
    assert list(tmp_path.iterdir()) == [target]  # no temporaries left behind


def test_writer_sharded_folder_reads_back_with_safetensors(tmp_path):
    tensors = every_dtype()
    names = sorted(tensors)
    groups = [{n: tensors[n] for n in names[i::3]} for i in range(3)]
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "x"}')
    target = tmp_path / "out"
    write_with_writer(target, groups, folder=True, rows_per_write=1, extra_files=[config])
    shard_files = sorted(p.name for p in target.glob("*.safetensors"))
    assert shard_files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((target / INDEX_NAME).read_text())
    assert index["weight_map"] == {n: shard_files[i] for i, g in enumerate(groups) for n in g}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in tensors.values())
    for file_name, group in zip(shard_files, groups):
        assert_same_tensors(load_file(target / file_name), group)
    assert (target / "config.json").read_text() == '{"model_type": "x"}'
    with Checkpoint(target) as ckpt:
        for name, tensor in tensors.items():
            assert_same_bits(ckpt.read(name), tensor, name)


def test_writer_refuses_out_of_order_and_incomplete_writes(tmp_path):
    shard = Shard("m.safetensors", [OutputTensor("a", "F32", (2,)), OutputTensor("b", "F32", (2,))])
    target = tmp_path / "out.safetensors"
    writer = CheckpointWriter(target, [shard], folder=False)
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        writer.write("b", np.zeros(2, np.uint32))
    writer.write("a", np.zeros(2, np.uint32))
    with pytest.raises(ValueError, match="'b' was never written"):
        writer.close()
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_restored_folder_gets_non_weight_files_only(tmp_path):
    base = small_model()
    base_dir = save_checkpoint(tmp_path / "base", base, shards=2)
    tune_dir = save_checkpoint(tmp_path / "tune", finetune_of(base), shards=2)
    (base_dir / "tokenizer_config.json").write_text('{"a": 1}')
    (base_dir / "generation_config.json").write_text('{"b": 2}')
    (base_dir / "README.md").write_text("model card")
    # Weight files the base folder holds besides its indexed shards: never copied.
    (base_dir / "pytorch_model.bin").write_bytes(b"pickle")
    (base_dir / "old.safetensors").write_bytes(b"stale")
    (base_dir / "pytorch_model.bin.index.json").write_text("{}")
    (base_dir / "flax_model.msgpack").write_bytes(b"flax")
    delta = tmp_path / "t.delta"
    sparsestitch.compress(base_dir, tune_dir, delta, density=0.1)
    out = sparsestitch.restore(base_dir, delta, tmp_path / "restored")
    assert sorted(p.name for p in out.iterdir()) == [
        OUTPUT_MARKER, "README.md", "config.json", "generation_config.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", INDEX_NAME,
        "tokenizer.json", "tokenizer_config.json"]
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base_dir / name).read_bytes()
    # The base's model card describes the base: the output gets its own, as the Hub expects.
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: \"base\"\nbase_model_relation: \"finetune\"\n")
    assert "library_name: \"transformers\"" in card and "sparsestitch restore base t.delta" in card


@pytest.mark.parametrize("file_name", ["pytorch_model.bin", "model.pt", "weights.pth", "x.ckpt"])
def test_pickle_files_are_refused_with_the_conversion(tmp_path, file_name):
    path = tmp_path / file_name
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="save_file") as caught:
        Checkpoint(path)
    assert "never unpickles" in str(caught.value) and "safe_serialization=True" in str(caught.value)
    assert caught.value.path == str(path)


def test_folder_of_pickle_weights_is_refused_with_the_conversion(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    torch.save({"w": torch.ones(2)}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pytorch_model.bin") as caught:
        Checkpoint(folder)
    assert "save_file" in str(caught.value)
    with pytest.raises(CheckpointError, match="never unpickles"):
        sparsestitch.compress(folder, folder, tmp_path / "x.delta")
    assert not (tmp_path / "x.delta").exists()


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file") as caught:
        Checkpoint(tmp_path / "absent.safetensors")
    assert caught.value.path == str(tmp_path / "absent.safetensors")


def test_restored_transformers_model_loads_and_matches(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    base_model = transformers.BertModel(config).eval()
    tuned_model = transformers.BertModel(config).eval()
    with torch.no_grad():
        for base_param, tuned_param in zip(base_model.parameters(), tuned_model.parameters()):
            tuned_param.copy_(base_param + 0.01 * torch.randn_like(base_param))
    base_model.save_pretrained(tmp_path / "base", safe_serialization=True)
    tuned_model.save_pretrained(tmp_path / "tuned", safe_serialization=True)
    delta = tmp_path / "tuned.delta"
    sparsestitch.compress(tmp_path / "base", tmp_path / "tuned", delta, density=1.0)
    restored = sparsestitch.restore(tmp_path / "base", delta, tmp_path / "restored")
    assert (restored / "config.json").read_text() == (tmp_path / "base" / "config.json").read_text()
    loaded = transformers.AutoModel.from_pretrained(restored).eval()
    inputs = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tuned_model(input_ids=inputs).last_hidden_state
        got = loaded(input_ids=inputs).last_hidden_state
        assert not torch.equal(base_model(input_ids=inputs).last_hidden_state, want)
    assert torch.equal(got, want)
