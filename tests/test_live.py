"""Hot-swap: ``apply`` patches live tensors exactly as ``stitch`` + load would; ``revert`` undoes it."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sparsestitch
from sparsestitch.core.errors import BaseMismatchError, SparsestitchError, TensorMismatchError
from sparsestitch.live import patch as live_patch

from .test_rules import FLOAT_DTYPES, RULE_OPTIONS, narrow, random_bits, to_bits, to_torch, widen
from .test_stitch import load_bits, random_deltas, random_model, write_delta, write_model


@contextlib.contextmanager
def patching(mode: str):
    """Tensors patched as ``apply`` chooses (``"auto"``), always at their positions, or
    always whole where they can be (a float CPU tensor under no patch, an elementwise rule)."""
    saved = live_patch.whole_is_smaller
    if mode != "auto":
        live_patch.whole_is_smaller = lambda live, records: mode == "whole" and any(
            r is not None and r.kind == "sparse" and r.count for r in records)
    try:
        yield
    finally:
        live_patch.whole_is_smaller = saved


PATCH_MODES = ("auto", "positions", "whole")


def live(model: dict, device: str = "cpu") -> dict[str, torch.Tensor]:
    return {n: to_torch(bits, d).reshape(shape).to(device) for n, (d, shape, bits) in model.items()}


def bits_of(tensors: dict, model: dict) -> dict[str, np.ndarray]:
    return {n: to_bits(tensors[n].cpu(), model[n][0]).reshape(-1) for n in model}


def assert_bits(tensors: dict, model: dict, want: dict):
    got = bits_of(tensors, model)
    for name in model:
        assert np.array_equal(got[name], want[name]), name


def base_bits(model: dict) -> dict[str, np.ndarray]:
    return {n: bits for n, (_, _, bits) in model.items()}


class Tiny(torch.nn.Module):
    """Parameters (one requiring grad) and a buffer, named like a checkpoint."""

    def __init__(self, tensors: dict):
        super().__init__()
        self.layer = torch.nn.Module()
        self.layer.weight = torch.nn.Parameter(tensors["layer.weight"])
        self.layer.bias = torch.nn.Parameter(tensors["layer.bias"], requires_grad=False)
        self.layer.register_buffer("ids", tensors["layer.ids"])


def _setup(tmp: Path, model: dict, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = write_model(tmp / "base.safetensors", model)
    masks, tunes = random_deltas(rng, model, count)
    deltas = [write_delta(tmp / f"d{i}.delta", model, m, t)
              for i, (m, t) in enumerate(zip(masks, tunes))]
    return base, deltas, masks, tunes


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(0, 4), rule=st.sampled_from(
    sorted(RULE_OPTIONS)), pick=st.integers(0, 2), mode=st.sampled_from(PATCH_MODES),
    max_memory=st.sampled_from([None, 4096]))
def test_apply_equals_stitch_then_load_and_revert_restores_every_bit(seed, count, rule, pick,
                                                                     mode, max_memory):
    with tempfile.TemporaryDirectory() as tmp, patching(mode):
        model, deltas, merge, stitched = random_merge_case(Path(tmp), seed, count, rule, pick)
        tensors = live(model)
        patch = sparsestitch.apply(tensors, deltas, max_memory=max_memory, **merge)
        assert_bits(tensors, model, stitched)
        patch.revert()
        assert_bits(tensors, model, base_bits(model))


def random_merge_case(tmp: Path, seed: int, count: int, rule: str, pick: int):
    """A random model, ``count`` deltas, the merge's arguments and its stitched bits."""
    rng = np.random.default_rng(seed)
    model = random_model(rng, FLOAT_DTYPES + ("I64",), 3)
    options = RULE_OPTIONS[rule][pick % len(RULE_OPTIONS[rule])]
    merge = {"rule": rule, "weights": [float(w) for w in rng.choice([1.0, 0.5, -1.0], count)],
             **options}
    base, deltas, _, _ = _setup(tmp, model, count, seed)
    stitched = load_bits(sparsestitch.stitch(base, deltas, tmp / "out.safetensors", **merge))
    return model, deltas, merge, stitched


def _module_model(rng) -> dict:
    return {"layer.weight": ("BF16", (12, 5), random_bits(rng, "BF16", 60)),
            "layer.bias": ("F32", (12,), random_bits(rng, "F32", 12)),
            "layer.ids": ("I64", (4,), np.arange(4, dtype=np.uint64))}


def test_a_module_is_patched_in_place_and_restored_by_the_with_block(tmp_path):
    model = _module_model(np.random.default_rng(1))
    base, deltas, _, _ = _setup(tmp_path, model, 2, seed=1)
    stitched = load_bits(sparsestitch.stitch(base, deltas, tmp_path / "out.safetensors"))
    module = Tiny(live(model))
    weight = module.layer.weight
    with sparsestitch.apply(module, deltas) as patch:
        assert_bits(module.state_dict(), model, stitched)
        assert module.layer.weight is weight and weight.requires_grad
        assert set(patch.names) <= set(model)
    assert not patch.active
    assert_bits(module.state_dict(), model, base_bits(model))


def test_reverting_twice_does_nothing_the_second_time(tmp_path):
    model = _module_model(np.random.default_rng(2))
    base, deltas, _, _ = _setup(tmp_path, model, 1, seed=2)
    tensors = live(model)
    patch = sparsestitch.apply(tensors, deltas)
    patch.revert()
    tensors["layer.bias"].add_(1)  # a later change the second revert must not undo
    changed = bits_of(tensors, model)
    patch.revert()
    assert_bits(tensors, model, changed)


def test_a_non_contiguous_tensor_is_patched_through_its_strides(tmp_path):
    rng = np.random.default_rng(3)
    model = {"w": ("F32", (6, 4), random_bits(rng, "F32", 24))}
    base, deltas, _, _ = _setup(tmp_path, model, 2, seed=3)
    stitched = load_bits(sparsestitch.stitch(base, deltas, tmp_path / "out.safetensors"))
    storage = live(model)["w"].t().contiguous()          # (4, 6) in memory
    tensors = {"w": storage.t()}                           # (6, 4) view, column-major
    with sparsestitch.apply(tensors, deltas):
        assert_bits(tensors, model, stitched)
    assert_bits(tensors, model, base_bits(model))


def _disjoint_pair(tmp: Path, overlap: bool):
    """A base and two single-tensor deltas, A on the first half, B on the second (or all)."""
    rng = np.random.default_rng(4)
    model = {"w": ("BF16", (8, 8), random_bits(rng, "BF16", 64))}
    base = write_model(tmp / "base.safetensors", model)
    half = np.arange(64) < 32
    masks = [half, np.ones(64, bool) if overlap else ~half]
    tunes = [random_bits(rng, "BF16", 64, near=model["w"][2]) for _ in masks]
    paths = [write_delta(tmp / f"{label}.delta", model, {"w": m}, {"w": t})
             for label, m, t in zip("ab", masks, tunes)]
    return model, base, paths, masks, tunes


@pytest.mark.parametrize("mode", PATCH_MODES)
def test_stacked_patches_revert_last_in_first_out(tmp_path, mode):
    with patching(mode):
        model, base, (a, b), _, _ = _disjoint_pair(tmp_path, overlap=False)
        tensors = live(model)
        only_a = load_bits(sparsestitch.stitch(base, [a], tmp_path / "a.safetensors"))
        both = load_bits(sparsestitch.stitch(base, [a, b], tmp_path / "ab.safetensors"))
        first = sparsestitch.apply(tensors, a)
        second = sparsestitch.apply(tensors, b)   # checked against the base under ``first``
        assert_bits(tensors, model, both)         # disjoint: same as stitching both
        with pytest.raises(SparsestitchError, match="reverse order"):
            first.revert()
        assert first.active and second.active
        assert_bits(tensors, model, both)         # the refused revert changed nothing
        second.revert()
        assert_bits(tensors, model, only_a)
        first.revert()
        assert_bits(tensors, model, base_bits(model))


@pytest.mark.parametrize("mode", PATCH_MODES)
def test_a_patch_over_an_overlapping_one_adds_its_update_to_the_current_values(tmp_path, mode):
    with patching(mode):
        model, base, (a, b), masks, tunes = _disjoint_pair(tmp_path, overlap=True)
        tensors = live(model)
        only_a = load_bits(sparsestitch.stitch(base, [a], tmp_path / "a.safetensors"))
        with sparsestitch.apply(tensors, a):
            with sparsestitch.apply(tensors, b):
                tau_b = widen(tunes[1], "BF16") - widen(model["w"][2], "BF16")
                want = narrow(widen(only_a["w"], "BF16") + tau_b, "BF16")
                assert_bits(tensors, model, {"w": want})
            assert_bits(tensors, model, only_a)
        assert_bits(tensors, model, base_bits(model))


@pytest.mark.parametrize("change", ["shape", "dtype", "missing", "values"])
def test_a_delta_for_another_model_raises_before_any_tensor_changes(tmp_path, change):
    model = _module_model(np.random.default_rng(5))
    base, deltas, _, _ = _setup(tmp_path, model, 2, seed=5)
    tensors = live(model)
    name = "layer.weight"
    if change == "shape":
        tensors[name] = tensors[name].reshape(5, 12)
    elif change == "dtype":
        tensors[name] = tensors[name].to(torch.float16)
    elif change == "missing":
        del tensors[name]
    else:
        tensors[name][-1, -1] += 1
    before = {n: t.clone() for n, t in tensors.items()}
    with pytest.raises(BaseMismatchError):
        sparsestitch.apply(tensors, deltas)
    for n, t in tensors.items():
        assert torch.equal(t.contiguous().view(torch.uint8), before[n].contiguous().view(torch.uint8))


def test_verify_base_false_skips_the_checksum(tmp_path):
    rng = np.random.default_rng(6)
    model = _module_model(rng)
    base = write_model(tmp_path / "base.safetensors", model)
    mask = np.arange(12) > 0                           # leaves bias[0] alone
    delta = write_delta(tmp_path / "d.delta", model, {"layer.bias": mask},
                        {"layer.bias": random_bits(rng, "F32", 12, near=model["layer.bias"][2])})
    want = load_bits(sparsestitch.stitch(base, [delta], tmp_path / "out.safetensors"))
    tensors = live(model)
    tensors["layer.bias"][0] += 1                      # a change the delta does not overlap
    want["layer.bias"][0] = to_bits(tensors["layer.bias"], "F32")[0]
    with pytest.raises(BaseMismatchError):
        sparsestitch.apply(tensors, delta)
    with sparsestitch.apply(tensors, delta, verify_base=False):
        assert_bits(tensors, model, want)


def test_tensors_a_delta_adds_are_refused_or_skipped(tmp_path):
    rng = np.random.default_rng(7)
    model = {"w": ("F32", (3, 3), random_bits(rng, "F32", 9))}
    delta = write_delta(tmp_path / "d.delta", model, {"w": np.ones(9, bool)},
                        {"w": random_bits(rng, "F32", 9)},
                        added={"head": ("F32", (2,), random_bits(rng, "F32", 2))})
    tensors = live(model)
    with pytest.raises(TensorMismatchError, match="added='skip'"):
        sparsestitch.apply(tensors, delta)
    assert_bits(tensors, model, base_bits(model))
    with sparsestitch.apply(tensors, delta, added="skip") as patch:
        assert patch.names == ["w"] and "head" not in tensors


def test_tied_tensors_are_patched_once(tmp_path):
    rng = np.random.default_rng(8)
    bits = random_bits(rng, "BF16", 20)
    model = {"embed": ("BF16", (4, 5), bits), "head": ("BF16", (4, 5), bits)}
    base = write_model(tmp_path / "base.safetensors", model)
    mask, tune = np.ones(20, bool), random_bits(rng, "BF16", 20, near=bits)
    delta = write_delta(tmp_path / "d.delta", model, {"embed": mask, "head": mask},
                        {"embed": tune, "head": tune})
    stitched = load_bits(sparsestitch.stitch(base, [delta], tmp_path / "out.safetensors"))
    shared = to_torch(bits, "BF16").reshape(4, 5)
    tensors = {"embed": shared, "head": shared}
    with sparsestitch.apply(tensors, delta) as patch:
        assert_bits(tensors, model, stitched)
        assert len(patch.names) == 1
    assert_bits(tensors, model, base_bits(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_patched_on_the_device(tmp_path):
    rng = np.random.default_rng(9)
    model = random_model(rng, FLOAT_DTYPES + ("I64",), 4)
    base, deltas, _, _ = _setup(tmp_path, model, 3, seed=9)
    for rule, options in [("localize-stitch", {}), ("dare", {"drop": 0.5, "seed": 1})]:
        stitched = load_bits(sparsestitch.stitch(base, deltas, tmp_path / f"{rule}.safetensors",
                                                 rule=rule, **options))
        tensors = live(model, "cuda")
        with sparsestitch.apply(tensors, deltas, rule=rule, **options):
            assert all(t.is_cuda for t in tensors.values())
            assert_bits(tensors, model, stitched)
        assert_bits(tensors, model, base_bits(model))
