"""compress -> restore: exact top-k against a dense reference, and bit-exact restores."""

from __future__ import annotations

import contextlib
import importlib
import json
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

import sparsestitch
from sparsestitch.checkpoint import INDEX_NAME, Checkpoint
from sparsestitch.core.errors import TensorMismatchError
from sparsestitch.delta.codecs.bitmap import Bitmap
from sparsestitch.delta.format import DeltaReader
from sparsestitch.localize.topk import count_to_keep
from sparsestitch.core.sizes import numel as count_elements
from sparsestitch.core.tiebreak import tie_order

from .conftest import bits, finetune_of, save_checkpoint, small_model
from .test_checkpoint import assert_same_tensors

TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "F64": torch.float64, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}
SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

# Zeros of both signs, infinities, quiet/signalling/negative NaNs with payloads, smallest and
# largest subnormals, smallest normal, largest finite, one.
SPECIAL_BITS = {
    "F32": [0x0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7FC12345, 0x7F800001,
            0xFFC00000, 0x1, 0x807FFFFF, 0x00800000, 0x7F7FFFFF, 0x3F800000],
    "F16": [0x0, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7E55, 0x7C01, 0xFE00, 0x1, 0x83FF, 0x0400,
            0x7BFF, 0x3C00],
    "BF16": [0x0, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7FC5, 0x7F81, 0xFFC0, 0x1, 0x807F, 0x0080,
             0x7F7F, 0x3F80],
    "F64": [0x0, 0x8000000000000000, 0x7FF0000000000000, 0xFFF0000000000000, 0x7FF8000000000000,
            0x7FF80000DEADBEEF, 0x7FF0000000000001, 0xFFF8000000000000, 0x1, 0x800FFFFFFFFFFFFF,
            0x0010000000000000, 0x7FEFFFFFFFFFFFFF, 0x3FF0000000000000],
}
FLOATS = tuple(SPECIAL_BITS)
# Simple values whose differences are exact in every dtype, so |tau| ties across tensors.
SIMPLE = np.array([0.0, 1.0, -1.0, 0.5, 2.0, -0.25, 3.0])
STEPS = np.array([0.5, -0.5, 0.25, 1.0, -2.0])
NAME_POOL = ["a", "B.weight", "layer.10.w", "layer.2.w", "z_head", "m"]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 3, 4), (4, 0), (16, 2)]


# ---- building checkpoints from raw bits -------------------------------------------------------

def ubits(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bits as unsigned integers of its width (flat)."""
    raw = bits(tensor).reshape(-1)
    return raw.view(UNSIGNED[raw.itemsize])


def from_ubits(raw: np.ndarray, dtype_name: str, shape) -> torch.Tensor:
    torch_dtype = TORCH_DTYPES[dtype_name]
    if torch_dtype == torch.bool:
        return torch.from_numpy(raw.astype(bool).reshape(shape))
    return torch.from_numpy(raw.view(SIGNED[raw.itemsize]).reshape(shape).copy()).view(torch_dtype)


def wide(tensor: torch.Tensor) -> np.ndarray:
    """Exact float32 (float64 for F64) values of a float tensor's bits, flat."""
    raw = ubits(tensor)
    if tensor.dtype == torch.bfloat16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if tensor.dtype == torch.float16:
        return raw.view(np.float16).astype(np.float32)
    return raw.view(np.float32 if tensor.dtype == torch.float32 else np.float64)


def random_pair(rng: np.random.Generator, dtype_name: str, shape
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A base tensor and its fine-tune: unchanged elements, exact steps (ties), small noise,
    special bit patterns and random bits, in random places."""
    numel = count_elements(shape)
    torch_dtype = TORCH_DTYPES[dtype_name]
    if dtype_name not in SPECIAL_BITS:
        base = torch.from_numpy(rng.integers(0, 3, numel)).to(torch_dtype)
        tune = base.clone()
        changed = rng.random(numel) < 0.3
        tune[torch.from_numpy(changed)] = torch.from_numpy(rng.integers(0, 5, int(changed.sum()))
                                                           ).to(torch_dtype)
        return base.reshape(shape), tune.reshape(shape)
    values = np.where(rng.random(numel) < 0.5, rng.choice(SIMPLE, numel),
                      rng.standard_normal(numel))
    base_bits = ubits(torch.from_numpy(values).to(torch_dtype))
    special = np.array(SPECIAL_BITS[dtype_name], dtype=base_bits.dtype)
    where = rng.random(numel) < 0.15
    base_bits[where] = rng.choice(special, int(where.sum()))
    base = from_ubits(base_bits, dtype_name, (numel,))

    kind = rng.integers(0, 5, numel)
    with np.errstate(all="ignore"):  # NaN and inf inputs are the point here
        moved = wide(base).astype(np.float64)
        moved = np.where(kind == 1, moved + rng.choice(STEPS, numel),
                         moved + rng.laplace(0, 0.01, numel))
    tune_bits = ubits(torch.from_numpy(moved).to(torch_dtype))
    tune_bits[kind == 0] = base_bits[kind == 0]
    tune_bits[kind == 3] = rng.choice(special, int((kind == 3).sum()))
    random_bits = rng.integers(0, np.iinfo(base_bits.dtype).max, numel, dtype=base_bits.dtype,
                               endpoint=True)
    tune_bits[kind == 4] = random_bits[kind == 4]
    return base.reshape(shape), from_ubits(tune_bits, dtype_name, shape)


@st.composite
def model_pairs(draw, float_only: bool = False):
    """(base tensors, fine-tuned tensors) with 1-4 tensors of random dtype and shape."""
    names = draw(st.lists(st.sampled_from(NAME_POOL), min_size=1, max_size=4, unique=True))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtypes = FLOATS if float_only else FLOATS + ("I32", "BOOL")
    base, tune = {}, {}
    for name in names:
        base[name], tune[name] = random_pair(rng, draw(st.sampled_from(dtypes)),
                                             draw(st.sampled_from(SHAPES)))
    return base, tune


# Densities so small that k rounds to 0 still keep nothing (5e-7 of a small model).
DENSITIES = st.sampled_from([5e-7, 0.05, 0.3, 1.0]) | st.floats(0.0, 1.0, exclude_min=True)
SELECTORS_MODULE = importlib.import_module("sparsestitch.localize.selectors")


def global_topk_path(path: str):
    """Steer compress's global top-k: "auto"; "exact" (as if the sampled bracket missed, so
    the histogram passes run); "wide" (a bracket of every key: all elements are candidates)."""
    if path == "exact":
        return mock.patch.object(SELECTORS_MODULE, "resolve_candidates", return_value=None)
    if path == "wide":
        return mock.patch.object(SELECTORS_MODULE, "bracket_bins", return_value=(0, 0xFFFF))
    return contextlib.nullcontext()


# ---- the dense reference ----------------------------------------------------------------------

def magnitude(base: torch.Tensor, tune: torch.Tensor) -> np.ndarray:
    """uint32 ranking keys: |tau| in the wide type, as float32 bits; 0 where the bits are equal
    (so an unchanged inf or NaN, whose tau is NaN, never outranks a real change)."""
    with np.errstate(all="ignore"):
        keys = np.abs(wide(tune) - wide(base)).astype(np.float32).view(np.uint32).reshape(-1)
    keys[bits(tune).reshape(-1) == bits(base).reshape(-1)] = 0
    return keys


def reference_topk(base: dict, tune: dict, names: list[str], k: int) -> dict[str, np.ndarray]:
    """Global top-k of |tau| over ``names``; equal keys by tie order (a hash of name and
    position, larger first), then by (tensor name order, flat index)."""
    names = sorted(names)
    keys = [magnitude(base[n], tune[n]) for n in names]
    flat = np.concatenate(keys) if keys else np.empty(0, np.uint32)
    ties = [tie_order(n, np.arange(key.size)) for n, key in zip(names, keys)]
    tie_flat = np.concatenate(ties) if ties else np.empty(0, np.uint32)
    order = np.lexsort((np.arange(flat.size), -tie_flat.astype(np.int64), -flat.astype(np.int64)))
    chosen = np.zeros(flat.size, bool)
    chosen[order[:k]] = True
    out, at = {}, 0
    for name, key in zip(names, keys):
        out[name] = np.flatnonzero(chosen[at:at + key.size])
        at += key.size
    return out


def stored_positions(delta: Path) -> dict[str, np.ndarray]:
    """Kept positions of every stored record (kinds other than "base")."""
    with DeltaReader(delta) as reader:
        return {r.name: reader.positions(r) for r in reader.records if r.kind != "base"}


def record_kinds(delta: Path) -> dict[str, str]:
    with DeltaReader(delta) as reader:
        return {r.name: r.kind for r in reader.records}


def expected_restore(base: torch.Tensor, tune: torch.Tensor, positions: np.ndarray) -> np.ndarray:
    out = ubits(base).copy()
    out[positions] = ubits(tune)[positions]
    return out


def assert_restored(restored: dict, base: dict, tune: dict, stored: dict) -> None:
    """Fine-tuned bits at every stored position, base bits everywhere else."""
    assert restored.keys() == tune.keys()
    for name, tensor in tune.items():
        got = restored[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        if name not in base:
            want = ubits(tensor)
        else:
            want = expected_restore(base[name], tensor, stored.get(name, np.empty(0, np.int64)))
        assert np.array_equal(ubits(got), want), name


def roundtrip(folder: Path, base: dict, tune: dict, **options):
    """Save, compress, restore; return (summary, stored positions, restored tensors)."""
    base_path = save_checkpoint(folder / "base.safetensors", base)
    tune_path = save_checkpoint(folder / "tune.safetensors", tune)
    delta = folder / "tune.delta"
    (summary,) = sparsestitch.compress(base_path, tune_path, delta, **options)
    out = sparsestitch.restore(base_path, delta, folder / "restored.safetensors")
    return summary, stored_positions(delta), load_file(out)


# ---- properties -------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(model_pairs(), DENSITIES, st.sampled_from([1, 5, 64, 1 << 23]), st.booleans(),
       st.sampled_from(["auto", "exact", "wide"]))
def test_global_topk_is_exact_and_restore_is_bit_exact(pair, density, chunk, add_tensor, path):
    base, tune = pair
    if add_tensor:
        tune = dict(tune, extra=torch.tensor([float("nan"), -0.0, 1e-45]))
    with tempfile.TemporaryDirectory() as folder, global_topk_path(path):
        summary, stored, restored = roundtrip(Path(folder), base, tune, density=density,
                                              scope="global",
                                              chunk_elements=chunk)
    floats = [n for n in base if base[n].is_floating_point()]
    candidates = sum(base[n].numel() for n in floats)
    k = count_to_keep(density, candidates)
    want = reference_topk(base, tune, floats, k)
    if k == candidates:  # keeping everything keeps exactly the changed elements
        want = {n: np.flatnonzero(ubits(base[n]) != ubits(tune[n])) for n in floats}
        k = sum(w.size for w in want.values())
    for name in floats:
        got = stored.get(name, np.empty(0, np.int64))
        assert got.tolist() == want[name].tolist(), name
    assert sum(stored.get(n, np.empty(0)).size for n in floats) == k
    assert (summary.kept, summary.candidates) == (k, candidates)
    for name in base:
        if not base[name].is_floating_point():  # carried exactly: every changed element
            changed = np.flatnonzero(ubits(base[name]) != ubits(tune[name]))
            assert stored.get(name, np.empty(0, np.int64)).tolist() == changed.tolist(), name
    if add_tensor:
        assert stored["extra"].tolist() == [0, 1, 2]
    assert_restored(restored, base, tune, stored)
    if density == 1.0:
        assert_same_tensors(restored, tune)


@settings(max_examples=30, deadline=None)
@given(model_pairs(float_only=True), DENSITIES)
def test_per_tensor_scope_keeps_density_of_each_tensor(pair, density):
    base, tune = pair
    with tempfile.TemporaryDirectory() as folder:
        _, stored, restored = roundtrip(Path(folder), base, tune, density=density,
                                        scope="per-tensor", chunk_elements=4)
    for name in base:
        k = count_to_keep(density, base[name].numel())
        want = reference_topk(base, tune, [name], k)[name]
        assert stored.get(name, np.empty(0, np.int64)).tolist() == want.tolist(), name
    assert_restored(restored, base, tune, stored)


def test_density_one_is_bit_identical_for_every_dtype_and_special_value(tmp_path):
    rng = np.random.default_rng(7)
    base, tune = {}, {}
    for dtype_name in FLOATS + ("I32", "I64", "BOOL"):
        for shape in [(), (33,), (5, 9)]:
            name = f"{dtype_name}.{len(shape)}"
            base[name], tune[name] = random_pair(rng, dtype_name, shape)
    tune["new.head"] = torch.randn(3, 4).to(torch.bfloat16)
    base_dir = save_checkpoint(tmp_path / "base", base, shards=3)
    tune_dir = save_checkpoint(tmp_path / "tune", tune, shards=2)
    sparsestitch.compress(base_dir, tune_dir, tmp_path / "t.delta", density=1.0)
    out = sparsestitch.restore(base_dir, tmp_path / "t.delta", tmp_path / "restored")
    restored = {}
    for shard in out.glob("*.safetensors"):
        restored.update(load_file(shard))
    assert_same_tensors(restored, tune)


@pytest.mark.parametrize("target", ["base.safetensors", "base"])
def test_zero_size_tensors_anywhere_in_the_layout(tmp_path, target):
    base = {"a_empty": torch.zeros(0, 4), "m": torch.ones(3),
            "m_empty": torch.zeros(2, 0, dtype=torch.bfloat16), "z_empty": torch.zeros(0)}
    tune = dict(base, m=torch.full((3,), 2.0), zz_added_empty=torch.zeros(0, dtype=torch.int64))
    base_path = save_checkpoint(tmp_path / target, base, shards=2)
    tune_path = save_checkpoint(tmp_path / "tune.safetensors", tune)
    sparsestitch.compress(base_path, tune_path, tmp_path / "t.delta", density=1.0)
    out = sparsestitch.restore(base_path, tmp_path / "t.delta", tmp_path / ("restored-" + target))
    restored = {}
    for shard in [out] if out.is_file() else out.glob("*.safetensors"):
        restored.update(load_file(shard))
    assert_same_tensors(restored, tune)


# ---- options ----------------------------------------------------------------------------------

def small_pair(seed: int = 1) -> tuple[dict, dict]:
    base = small_model()
    tune = finetune_of(base, seed=seed)
    tune["position_ids"] = tune["position_ids"].clone()
    tune["position_ids"][[2, 9]] = 99
    tune["mask"] = tune["mask"].clone()
    tune["mask"][5] = False
    return base, tune


def test_include_exclude_and_dense_patterns(tmp_path):
    base, tune = small_pair()
    summary, stored, restored = roundtrip(
        tmp_path, base, tune, density=0.1, include=["layer.*", "embed.*"],
        exclude="*norm*", dense=["embed.*"], scope="global")
    localized = ["layer.0.attn.weight", "layer.0.conv.weight", "layer.0.mlp.weight"]
    candidates = sum(base[n].numel() for n in localized)
    want = reference_topk(base, tune, localized, count_to_keep(0.1, candidates))
    for name in localized:
        assert stored[name].tolist() == want[name].tolist(), name
    # dense: every changed element, exactly; excluded and not-included floats: left at the base
    changed = np.flatnonzero(ubits(base["embed.weight"]) != ubits(tune["embed.weight"]))
    assert stored["embed.weight"].tolist() == changed.tolist()
    assert "layer.0.norm.weight" not in stored and "scalar" not in stored
    assert torch.equal(restored["layer.0.norm.weight"], base["layer.0.norm.weight"])
    assert torch.equal(restored["scalar"], base["scalar"])
    assert not torch.equal(tune["scalar"], base["scalar"])
    # non-float tensors are never localized: their changes are carried whatever the patterns
    assert stored["position_ids"].tolist() == [2, 9] and stored["mask"].tolist() == [5]
    assert (summary.kept, summary.candidates) == (sum(v.size for v in want.values()), candidates)
    assert_restored(restored, base, tune, stored)


def test_unchanged_tensors_are_base_records(tmp_path):
    base = small_model()
    tune = dict(base, **{"layer.0.attn.weight": base["layer.0.attn.weight"] + 1})
    save_checkpoint(tmp_path / "b.safetensors", base)
    save_checkpoint(tmp_path / "t.safetensors", tune)
    sparsestitch.compress(tmp_path / "b.safetensors", tmp_path / "t.safetensors",
                          tmp_path / "t.delta", density=0.1)  # k below the 1024 changed
    kinds = record_kinds(tmp_path / "t.delta")
    assert kinds.pop("layer.0.attn.weight") == "sparse"
    assert set(kinds.values()) == {"base"}


def test_added_tensors_are_stored_whole_and_restored(tmp_path):
    base, tune = small_pair()
    tune["new.classifier.weight"] = torch.randn(5, 32).to(torch.bfloat16)
    tune["new.classifier.bias"] = torch.arange(5, dtype=torch.int64)
    summary, stored, restored = roundtrip(tmp_path, base, tune, density=0.02)
    kinds = record_kinds(tmp_path / "tune.delta")
    assert kinds["new.classifier.weight"] == kinds["new.classifier.bias"] == "added"
    assert stored["new.classifier.weight"].tolist() == list(range(160))
    assert summary.stored_tensors == len(stored)
    assert_restored(restored, base, tune, stored)


def test_several_finetunes_in_one_call_equal_one_call_each(tmp_path):
    base = small_model()
    base_path = save_checkpoint(tmp_path / "base.safetensors", base)
    tunes = [save_checkpoint(tmp_path / f"ft{i}.safetensors", small_pair(seed=i)[1])
             for i in (1, 2, 3)]
    together = [tmp_path / "together" / t.name for t in tunes]
    (tmp_path / "together").mkdir()
    (tmp_path / "alone").mkdir()
    for scope in ("global", "per-tensor"):
        summaries = sparsestitch.compress(base_path, tunes, together, density=0.05, scope=scope,
                                          overwrite=True)
        for tune, path, summary in zip(tunes, together, summaries):
            alone = tmp_path / "alone" / tune.name
            (single,) = sparsestitch.compress(base_path, tune, alone, density=0.05, scope=scope,
                                              overwrite=True)
            assert path.read_bytes() == alone.read_bytes()
            assert (summary.kept, summary.nbytes) == (single.kept, single.nbytes)
    assert len({p.read_bytes() for p in together}) == 3


@pytest.mark.parametrize("as_torch", [False, True])
def test_masks_keep_exactly_the_given_positions(tmp_path, as_torch):
    base, tune = small_pair()
    rng = np.random.default_rng(0)
    masks = {"embed.weight": rng.random((64, 32)) < 0.1,
             "layer.0.conv.weight": np.zeros((4, 3, 5), bool),
             "scalar": np.ones((), bool)}
    masks["layer.0.conv.weight"][1, 2, 3] = True
    given = {n: torch.from_numpy(m) for n, m in masks.items()} if as_torch else masks
    _, stored, restored = roundtrip(tmp_path, base, tune, masks=given)
    for name, mask in masks.items():
        assert stored[name].tolist() == np.flatnonzero(mask).tolist(), name
    for name in ("layer.0.attn.weight", "layer.0.mlp.weight", "layer.0.norm.weight"):
        assert name not in stored  # floats without a mask stay at the base
    assert stored["position_ids"].tolist() == [2, 9]  # non-floats are still carried exactly
    assert_restored(restored, base, tune, stored)
    header = sparsestitch.info(tmp_path / "tune.delta").header
    assert header["method"] == "mask" and header["density"] is None


def test_one_mask_set_per_finetune(tmp_path):
    base = small_model()
    base_path = save_checkpoint(tmp_path / "b.safetensors", base)
    tunes = [save_checkpoint(tmp_path / f"t{i}.safetensors", finetune_of(base, seed=i))
             for i in (1, 2)]
    first = np.zeros((32, 32), bool)
    first[0, :3] = True
    second = np.zeros(32, bool)
    second[-1] = True
    outs = [tmp_path / "t1.delta", tmp_path / "t2.delta"]
    sparsestitch.compress(base_path, tunes, outs,
                          masks=[{"layer.0.attn.weight": first}, {"layer.0.norm.weight": second}])
    assert {n: p.tolist() for n, p in stored_positions(outs[0]).items()} == {
        "layer.0.attn.weight": [0, 1, 2]}
    assert {n: p.tolist() for n, p in stored_positions(outs[1]).items()} == {
        "layer.0.norm.weight": [31]}


def test_tiny_chunks_give_byte_identical_deltas(tmp_path):
    base, tune = small_pair()
    base_path = save_checkpoint(tmp_path / "b.safetensors", base)
    tune_path = save_checkpoint(tmp_path / "t.safetensors", tune)
    for options in ({"density": 0.03}, {"density": 0.2, "scope": "per-tensor"},
                    {"density": 0.5, "dense": "layer.0.norm*"}):
        files = []
        for chunk in (1, 7, 100, 1 << 23):
            out = tmp_path / f"{len(files)}.delta"
            sparsestitch.compress(base_path, tune_path, out, chunk_elements=chunk,
                                  overwrite=True, **options)
            files.append(out.read_bytes())
        assert all(f == files[-1] for f in files), options


def test_tiny_restore_blocks_give_identical_output(tmp_path):
    base, tune = small_pair()
    base_path = save_checkpoint(tmp_path / "b.safetensors", base)
    tune_path = save_checkpoint(tmp_path / "t.safetensors", tune)
    delta = tmp_path / "t.delta"
    sparsestitch.compress(base_path, tune_path, delta, density=0.05)
    outputs = [sparsestitch.restore(base_path, delta, tmp_path / f"r{size}.safetensors",
                                    block_bytes=size).read_bytes()
               for size in (1, 64, 1000, 256 << 20)]
    assert all(out == outputs[-1] for out in outputs)
    assert_restored(load_file(tmp_path / "r1.safetensors"), base, tune, stored_positions(delta))


def test_sharded_folders_and_mirrored_layout(tmp_path):
    base, tune = small_pair()
    tune2 = finetune_of(base, seed=5)
    base_dir = save_checkpoint(tmp_path / "base", base, shards=3)
    tune_dirs = [save_checkpoint(tmp_path / "tune", tune, shards=2),
                 save_checkpoint(tmp_path / "tune2.safetensors", tune2)]
    deltas = [tmp_path / "tune.delta", tmp_path / "tune2.delta"]
    sparsestitch.compress(base_dir, tune_dirs, deltas, density=0.05)
    for want, delta in zip((tune, tune2), deltas):
        out = sparsestitch.restore(base_dir, delta, tmp_path / f"{delta.stem}-restored")
        assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(
            p.name for p in base_dir.glob("*.safetensors"))
        base_index = json.loads((base_dir / INDEX_NAME).read_text())["weight_map"]
        assert json.loads((out / INDEX_NAME).read_text())["weight_map"] == base_index
        with Checkpoint(base_dir) as b, Checkpoint(out) as o:
            assert o.layout == b.layout
        restored = {}
        for shard in out.glob("*.safetensors"):
            part = load_file(shard)
            assert all(base_index[n] == shard.name for n in part)
            restored.update(part)
        assert_restored(restored, base, want, stored_positions(delta))


# ---- mismatched inputs ------------------------------------------------------------------------

@pytest.mark.parametrize("change", ["shape", "dtype", "missing"])
def test_mismatched_finetune_is_refused(tmp_path, change):
    base = small_model()
    tune = finetune_of(base)
    if change == "shape":
        tune["layer.0.attn.weight"] = tune["layer.0.attn.weight"][:16]
    elif change == "dtype":
        tune["layer.0.attn.weight"] = tune["layer.0.attn.weight"].to(torch.float32)
    else:
        del tune["layer.0.attn.weight"]
    save_checkpoint(tmp_path / "b.safetensors", base)
    save_checkpoint(tmp_path / "t.safetensors", tune)
    with pytest.raises(TensorMismatchError) as caught:
        sparsestitch.compress(tmp_path / "b.safetensors", tmp_path / "t.safetensors",
                              tmp_path / "t.delta")
    assert caught.value.tensor == "layer.0.attn.weight"
    assert caught.value.path == str(tmp_path / "t.safetensors")
    assert not (tmp_path / "t.delta").exists()


@pytest.mark.parametrize("mask", [np.ones((32, 31), bool), np.ones((32, 32), np.uint8)])
def test_mask_of_wrong_shape_or_dtype_is_refused(zoo, tmp_path, mask):
    with pytest.raises(TensorMismatchError, match="bool array of shape") as caught:
        sparsestitch.compress(zoo["base"], zoo["ft1"], tmp_path / "x.delta",
                              masks={"layer.0.attn.weight": mask})
    assert caught.value.tensor == "layer.0.attn.weight"
    assert not (tmp_path / "x.delta").exists()


def test_mask_for_unknown_tensor_is_refused(zoo, tmp_path):
    with pytest.raises(TensorMismatchError, match="lacks") as caught:
        sparsestitch.compress(zoo["base"], zoo["ft1"], tmp_path / "x.delta",
                              masks={"no.such.weight": np.ones(3, bool)})
    assert caught.value.tensor == "no.such.weight"


def test_density_zero_is_refused_before_anything_is_written(tmp_path):
    base = save_checkpoint(tmp_path / "b.safetensors", small_model())
    tune = save_checkpoint(tmp_path / "t.safetensors", finetune_of(small_model()))
    with pytest.raises(ValueError, match="density 0 keeps nothing"):
        sparsestitch.compress(base, tune, tmp_path / "t.delta", density=0.0)
    assert not (tmp_path / "t.delta").exists()


def test_max_memory_bounds_what_compress_holds_and_changes_no_byte(tmp_path):
    """Four full fine-tunes of an 8 MiB tensor, lossless: under a budget below their four
    selections, compress selects and encodes them one at a time and holds no more than the
    budget (measured with tracemalloc over every thread: what numpy and Python allocate),
    writing the same bytes; under a budget below one selection (60 MiB, where selecting the
    tensor whole needs 66 MiB) the tensor streams through temporary files instead
    (tests/test_streamed_exact.py): within the budget, and every fine-tune restores exactly."""
    import tracemalloc

    generator = torch.Generator().manual_seed(0)
    base = {"big": torch.randn(2048, 1024, generator=generator), "small": torch.randn(8, 8)}
    base_path = save_checkpoint(tmp_path / "base.safetensors", base)
    tunes = [save_checkpoint(tmp_path / f"ft{i}.safetensors",
                             {k: v + 0.01 * torch.randn(v.shape, generator=generator)
                              for k, v in base.items()}) for i in range(4)]
    peaks = {}
    for budget in (None, "72MiB", "60MiB"):
        tracemalloc.start()
        try:
            sparsestitch.compress(base_path, tunes, [tmp_path / f"{budget}-{i}.delta"
                                                     for i in range(4)],
                                  lossless=True, max_memory=budget)
            peaks[budget] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peaks["60MiB"] <= 60 << 20 and peaks["72MiB"] <= 72 << 20 < peaks[None], peaks
    for i in range(4):
        assert (tmp_path / f"None-{i}.delta").read_bytes() == \
            (tmp_path / f"72MiB-{i}.delta").read_bytes()
        restored = sparsestitch.restore(base_path, tmp_path / f"60MiB-{i}.delta",
                                        tmp_path / f"restored-{i}.safetensors")
        assert_same_tensors(load_file(restored), load_file(tunes[i]))


def test_without_max_memory_a_lossless_tensor_above_the_default_streams(
        tmp_path, monkeypatch, caplog):
    """The default budget below what the largest tensor selected whole needs: compress no
    longer grows the budget (before: a warning naming the tensor, and that much memory); the
    tensor streams, silently, and restores to the fine-tune's exact bits."""
    import logging

    from sparsestitch.engine import budget

    generator = torch.Generator().manual_seed(1)
    base = {"big": torch.randn(2048, 1024, generator=generator)}
    base_path = save_checkpoint(tmp_path / "base.safetensors", base)
    tune = save_checkpoint(tmp_path / "ft.safetensors",
                           {"big": base["big"] + 0.01 * torch.randn(2048, 1024, generator=generator)})
    monkeypatch.setattr(budget, "DEFAULT_MEMORY", 40 << 20)
    with caplog.at_level(logging.WARNING, logger="sparsestitch"):
        sparsestitch.compress(base_path, tune, tmp_path / "streamed.delta", lossless=True)
    assert "exactly needs" not in caplog.text
    restored = sparsestitch.restore(base_path, tmp_path / "streamed.delta",
                                    tmp_path / "restored.safetensors")
    assert_same_tensors(load_file(restored), load_file(tune))


@pytest.mark.parametrize("options", [{}, {"lossless": True}, {"density": 0.3}])
def test_a_restored_folders_card_says_what_is_exact_and_it_is_true(tmp_path, options):
    """The card states what the restored model holds: exact bits at every stored position
    only where the delta's values are exact; a quantized delta's card says how many are not,
    and the count is checked against the restored bits."""
    base = small_model()
    base_dir = save_checkpoint(tmp_path / "base", base, shards=1)
    tune = finetune_of(base)
    tune_dir = save_checkpoint(tmp_path / "tune", tune, shards=1)
    delta = tmp_path / "t.delta"
    sparsestitch.compress(base_dir, tune_dir, delta, **options)
    held = sparsestitch.ops.describe.exactness(delta)
    card = (sparsestitch.restore(base_dir, delta, tmp_path / "out") / "README.md").read_text()
    assert held.sentence() in card
    (shard,) = (tmp_path / "out").glob("*.safetensors")
    restored = {n: bits(t) for n, t in load_file(shard).items()}
    stored_unequal = 0
    with DeltaReader(delta) as reader:
        for record in reader.records:
            if record.kind != "sparse":
                continue
            positions = sparsestitch.engine.walk.stored_positions(reader, record)
            got, want = restored[record.name].reshape(-1), bits(tune[record.name]).reshape(-1)
            at = slice(None) if positions is None else positions
            stored_unequal += int((got[at] != want[at]).sum())
    if held.approximate:
        assert "quantized values" in card and "exact bits at" not in card
        assert 0 < stored_unequal <= held.approximate
    else:
        assert "every parameter the delta stores has the fine-tune's exact bits" in card
        assert stored_unequal == 0


@pytest.mark.parametrize("options", [{"density": 0.6}, {"max_error": 0.3}, {"lossless": True}])
def test_bitmap_records_restore_without_positions(tmp_path, options):
    """Records stored as bitmaps are put back where their bits are set (walk.put_marks):
    no position list is made of them (Bitmap.decode never runs), in one block or many,
    and the output is what their positions say."""
    base, tune = small_pair()
    base_path = save_checkpoint(tmp_path / "b.safetensors", base)
    tune_path = save_checkpoint(tmp_path / "t.safetensors", tune)
    delta = tmp_path / "t.delta"
    sparsestitch.compress(base_path, tune_path, delta, **options)
    with DeltaReader(delta) as reader:
        assert any(r.kind == "sparse" and r.positions["codec"] == "bitmap" for r in reader.records)
    outputs = []
    listed = mock.patch.object(Bitmap, "decode", side_effect=AssertionError("positions listed"))
    with listed:
        for size in (64, 1000, 256 << 20):
            outputs.append(sparsestitch.restore(base_path, delta, tmp_path / f"r{size}.safetensors",
                                                block_bytes=size).read_bytes())
    assert all(out == outputs[-1] for out in outputs)
    restored = load_file(tmp_path / f"r{256 << 20}.safetensors")
    with DeltaReader(delta) as reader:
        for record in reader.records:
            if record.kind != "sparse":
                continue
            got = ubits(restored[record.name])
            want = ubits(base[record.name]).copy()
            positions = reader.positions(record)
            want[positions] = reader.values(record, want[positions])
            assert np.array_equal(got, want), record.name


@settings(max_examples=100, deadline=None)
@given(numel=st.integers(1, 300), density=st.floats(0, 1), bit=st.integers(0, 7),
       cuts=st.lists(st.integers(0, 300), max_size=6), in_order=st.booleans(),
       seed=st.integers(0, 99))
def test_a_bitmap_record_is_put_back_block_by_block_as_its_positions_say(
        numel, density, bit, cuts, in_order, seed):
    """The restore's put-back of a bitmap record (Marked) over any cut into blocks, taken in
    order (each block from the last one's count) or not (counted again): the dense reference
    writes the fine-tuned bits at the marked positions."""
    from sparsestitch.core.dtypes import dtype as lookup_dtype
    from sparsestitch.engine.walk import Marked
    from sparsestitch.ops.restore import RestoreCombiner
    rng = np.random.default_rng(seed)
    mask = rng.random(numel) < density
    bits = np.packbits(np.concatenate([np.zeros(bit, bool), mask]), bitorder="little")
    base = rng.integers(0, 1 << 16, numel, dtype=np.uint16)
    finetuned = rng.integers(0, 1 << 16, int(mask.sum()), dtype=np.uint16)
    want = base.copy()
    want[mask] = finetuned
    edges = sorted({0, numel, *[c % (numel + 1) for c in cuts]})
    blocks = list(zip(edges, edges[1:]))
    if not in_order:
        rng.shuffle(blocks)
    put_back = RestoreCombiner().block_merge(lookup_dtype("BF16"),
                                             [Marked(bits, bit, finetuned, base[mask])])
    got = base.copy()
    for lo, hi in blocks:
        block = got[lo:hi].copy()
        put_back(block, lo)
        got[lo:hi] = block
    assert np.array_equal(got, want)
