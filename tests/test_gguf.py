"""GGUF inputs: files written by the gguf package's own writer, in llama.cpp's layout (names,
row-permuted Q and K, quantized blocks), read under transformers' names and compressed,
restored and merged like safetensors checkpoints."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

import sparsestitch
from sparsestitch.checkpoint import Checkpoint
from sparsestitch.cli import main
from sparsestitch.checkpoint.gguf_file import transformers_name, unpermute_rows
from sparsestitch.core.errors import CheckpointError, OutputError

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


def write_gguf(path, tensors: dict[str, np.ndarray], quantized: dict[str, object] = (),
               metadata: dict[str, tuple] = ()):
    """``tensors`` (transformers names) as llama.cpp would store them; ``quantized`` maps
    names to a GGML quantization type (others F32); ``metadata`` maps keys to ``(value, GGUF
    value type)`` written instead of the usual ones (``(None, None)``: the key left out)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    for key, (value, kind) in dict(metadata).items():
        if kind is None:
            del writer.kv_data[0][key]
        else:
            writer.kv_data[0][key] = gguf.GGUFValue(value=value, type=kind)
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


ARCHITECTURE, HEAD_COUNT = "general.architecture", "llama.attention.head_count"
KV_HEAD_COUNT = "llama.attention.head_count_kv"
V = gguf.GGUFValueType
K_PROJ = "model.layers.0.self_attn.k_proj.weight"


@pytest.mark.parametrize("key, value, kind, tensor", [
    (KV_HEAD_COUNT, 0, V.UINT32, None),        # was a ZeroDivisionError
    (HEAD_COUNT, [4, 4], V.ARRAY, None),       # was a TypeError
    (KV_HEAD_COUNT, 3, V.UINT32, K_PROJ),      # was "cannot reshape array", naming no file
    (HEAD_COUNT, 4.5, V.FLOAT32, None),        # was read as 4
    (HEAD_COUNT, 4.0, V.FLOAT64, None), (HEAD_COUNT, True, V.BOOL, None),
    (HEAD_COUNT, "4", V.STRING, None), (KV_HEAD_COUNT, -2, V.INT32, None),
    (HEAD_COUNT, None, None, None),
    (ARCHITECTURE, 7, V.UINT32, None), (ARCHITECTURE, ["llama"], V.ARRAY, None),
    (ARCHITECTURE, b"\xffllama", V.STRING, None),
])
def test_metadata_of_the_wrong_type_or_value_is_refused_naming_file_and_key(tmp_path, key, value,
                                                                            kind, tensor):
    path = write_gguf(tmp_path / "m.gguf", llama_tensors(4), metadata={key: (value, kind)})
    with pytest.raises(CheckpointError) as caught:
        Checkpoint(path)
    assert (caught.value.path, caught.value.tensor) == (str(path), tensor)
    assert f"{key!r}" in str(caught.value)
    tune = save_checkpoint(tmp_path / "ft.safetensors", {k: torch.from_numpy(v) for k, v in
                                                          llama_tensors(4).items()})
    result = CliRunner().invoke(main, ["compress", str(path), str(tune), "-o",
                                       str(tmp_path / "x.delta")])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert f"file {str(path)!r}" in result.output and f"{key!r}" in result.output
    assert not (tmp_path / "x.delta").exists()


INTEGER_TYPES = {V.UINT8: (0, 2**8 - 1), V.INT8: (-2**7, 2**7 - 1), V.UINT16: (0, 2**16 - 1),
                 V.INT16: (-2**15, 2**15 - 1), V.UINT32: (0, 2**32 - 1),
                 V.INT32: (-2**31, 2**31 - 1), V.UINT64: (0, 2**64 - 1),
                 V.INT64: (-2**63, 2**63 - 1)}


def _metadata_value():
    """A GGUF metadata value of any type: ``(value, type)``, ``(None, None)`` for none; small
    integers (plausible head counts) and 'llama' often, so both outcomes are common."""
    def of(kind, values):
        return values.map(lambda value: (value, kind))

    def integer(kind):
        low, high = INTEGER_TYPES[kind]
        return of(kind, st.one_of(st.integers(max(low, -2), 9), st.integers(low, high)))
    plausible = {0: st.sampled_from(sorted(INTEGER_TYPES)).flatmap(
                     lambda kind: of(kind, st.integers(1, 8))),
                 1: st.just(("llama", V.STRING))}
    anything = st.one_of(
        st.just((None, None)), st.sampled_from(sorted(INTEGER_TYPES)).flatmap(integer),
        of(V.FLOAT32, st.floats(width=32)), of(V.FLOAT64, st.floats()),
        of(V.BOOL, st.booleans()),
        of(V.STRING, st.one_of(st.just("llama"), st.text(max_size=8), st.binary(max_size=6))),
        of(V.ARRAY, st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=3)),
        of(V.ARRAY, st.lists(st.text(max_size=4), min_size=1, max_size=3)))
    return st.integers(0, 3).flatmap(lambda draw: plausible.get(draw, anything))


FUZZ_TENSORS = {"model.layers.0.self_attn.q_proj.weight": np.arange(16 * 8, dtype=np.float32)
                .reshape(16, 8), K_PROJ: np.arange(8 * 8, dtype=np.float32).reshape(8, 8)}
GGUF_CASES = Counter()


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from([ARCHITECTURE, HEAD_COUNT, KV_HEAD_COUNT]), value=_metadata_value())
def test_fuzzed_metadata_is_read_exactly_when_valid_else_refused_by_name(gguf_folder, key, value):
    """Any type in the keys the reader uses: the file reads (every tensor) exactly when the
    value is valid -- the architecture the text 'llama', a head count one integer of 1 or more
    splitting the rows into rotary pairs (16 Q rows, 8 K rows) -- and is otherwise refused by
    a CheckpointError naming the file and the key, never another exception."""
    path = write_gguf(gguf_folder / "fuzzed.gguf", FUZZ_TENSORS, metadata={key: value})
    content, kind = value
    heads = {HEAD_COUNT: HEADS, KV_HEAD_COUNT: KV_HEADS, key: content}
    if kind is None and key == KV_HEAD_COUNT:
        heads[KV_HEAD_COUNT] = heads[HEAD_COUNT]  # llama.cpp's default
    integer = kind in INTEGER_TYPES
    valid = (content == "llama" and kind == V.STRING if key == ARCHITECTURE else
             (integer or (kind is None and key == KV_HEAD_COUNT))
             and heads[key] >= 1 and 16 % (2 * heads[HEAD_COUNT]) == 0
             and 8 % (2 * heads[KV_HEAD_COUNT]) == 0)
    try:
        with Checkpoint(path) as ckpt:
            for name in ckpt.names:
                assert ckpt.read(name).size == FUZZ_TENSORS[name].size
    except CheckpointError as exc:
        assert not valid, exc
        assert exc.path == str(path) and f"{key!r}" in str(exc)
        GGUF_CASES["refused"] += 1
        return
    assert valid, (key, value)
    GGUF_CASES["read"] += 1


@pytest.fixture(scope="module")
def gguf_folder(tmp_path_factory):
    yield tmp_path_factory.mktemp("fuzzed-gguf")
    print(f"\nfuzzed GGUF metadata: {dict(GGUF_CASES)}")


def loadable_metadata() -> dict[str, tuple]:
    """What llama.cpp's converter writes for transformers to rebuild the config and a (tiny,
    byte-pair) tokenizer."""
    kinds = gguf.GGUFValueType
    tokens = ["<s>", "</s>"] + [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(VOCAB - 2)]
    return {"llama.context_length": (128, kinds.UINT32),
            "llama.embedding_length": (HIDDEN, kinds.UINT32),
            "llama.block_count": (2, kinds.UINT32),
            "llama.feed_forward_length": (128, kinds.UINT32),
            "llama.attention.layer_norm_rms_epsilon": (1e-5, kinds.FLOAT32),
            "llama.rope.freq_base": (10000.0, kinds.FLOAT32),
            "llama.vocab_size": (VOCAB, kinds.UINT32),
            "tokenizer.ggml.model": ("gpt2", kinds.STRING),
            "tokenizer.ggml.tokens": (tokens, kinds.ARRAY),
            "tokenizer.ggml.token_type": ([1] * VOCAB, kinds.ARRAY),
            "tokenizer.ggml.merges": (["a a"], kinds.ARRAY),
            "tokenizer.ggml.bos_token_id": (0, kinds.UINT32),
            "tokenizer.ggml.eos_token_id": (1, kinds.UINT32)}


def test_a_gguf_base_writes_a_folder_transformers_loads(tmp_path):
    """An output named as a folder gets config.json and the tokenizer from the GGUF's
    metadata beside the weights, and loads with from_pretrained; a .safetensors name is a
    single file; a .gguf name is refused before anything is written."""
    transformers = pytest.importorskip("transformers")
    tensors = llama_tensors(3)
    base = write_gguf(tmp_path / "base.gguf", tensors, metadata=loadable_metadata())
    generator = torch.Generator().manual_seed(4)
    tune = {k: torch.from_numpy(v) + 0.01 * torch.randn(v.shape, generator=generator)
            for k, v in tensors.items()}
    tune_path = save_checkpoint(tmp_path / "ft.safetensors", tune)
    delta = tmp_path / "ft.delta"
    sparsestitch.compress(base, tune_path, delta, lossless=True)
    folder = sparsestitch.restore(base, delta, tmp_path / "restored")
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= \
        {p.name for p in folder.iterdir()}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    loaded = model.state_dict()
    for name, value in tune.items():
        assert np.array_equal(bits(loaded[name]), bits(value)), name
    assert transformers.AutoTokenizer.from_pretrained(folder)("aa b")["input_ids"]
    single = sparsestitch.restore(base, delta, tmp_path / "restored.safetensors")
    assert single.is_file()
    for run in (lambda out: sparsestitch.restore(base, delta, out),
                lambda out: sparsestitch.stitch(base, [delta], out),
                lambda out: sparsestitch.merge(base, [tune_path], out, keep=0.1)):
        with pytest.raises(OutputError, match="not GGUF"):
            run(tmp_path / "out.gguf")
        assert not (tmp_path / "out.gguf").exists()
