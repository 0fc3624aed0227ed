"""Prepared hot-swap: ``prepare(...).apply`` writes exactly what ``apply`` writes, checks the
model first, and reverts bit for bit."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sparsestitch
from sparsestitch.core.errors import BaseMismatchError, SparsestitchError

from .test_live import (PATCH_MODES, Tiny, _disjoint_pair, _module_model, _setup, assert_bits,
                        base_bits, bits_of, live, patching, random_merge_case)
from .test_rules import FLOAT_DTYPES, RULE_OPTIONS, random_bits
from .test_stitch import load_bits, random_model, write_delta, write_model


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(0, 3), rule=st.sampled_from(
    sorted(RULE_OPTIONS)), pick=st.integers(0, 2), mode=st.sampled_from(PATCH_MODES))
def test_prepared_apply_equals_apply_and_stitch_and_reverts_every_bit(seed, count, rule, pick,
                                                                      mode):
    with tempfile.TemporaryDirectory() as tmp, patching(mode):
        model, deltas, merge, stitched = random_merge_case(Path(tmp), seed, count, rule, pick)
        tensors = live(model)
        prepared = sparsestitch.prepare(tensors, deltas, **merge)
        assert_bits(tensors, model, base_bits(model))       # prepare leaves the model alone
        for _ in range(2):                                    # switch on and off twice
            patch = prepared.apply(tensors)
            assert_bits(tensors, model, stitched)
            patch.revert()
            assert_bits(tensors, model, base_bits(model))
        assert prepared.count <= sum(bits.size for _, _, bits in model.values())


def test_a_prepared_patch_works_as_a_with_block_on_a_module_and_keeps_its_parameters(tmp_path):
    model = _module_model(np.random.default_rng(11))
    base, deltas, _, _ = _setup(tmp_path, model, 2, seed=11)
    stitched = load_bits(sparsestitch.stitch(base, deltas, tmp_path / "out.safetensors"))
    module = Tiny(live(model))
    weight = module.layer.weight
    skill = sparsestitch.prepare(module, deltas, resident=True)
    assert skill.nbytes > 0 and set(skill.names) <= set(model)
    with skill.apply(module):
        assert_bits(module.state_dict(), model, stitched)
        assert module.layer.weight is weight
    assert_bits(module.state_dict(), model, base_bits(model))


@pytest.mark.parametrize("mode", ["positions", "whole"])
def test_changed_values_at_the_positions_are_refused_before_anything_is_written(tmp_path, mode):
    model, base, (a, _), masks, _ = _disjoint_pair(tmp_path, overlap=False)
    tensors = live(model)
    with patching(mode):
        skill = sparsestitch.prepare(tensors, a)
    position = int(np.flatnonzero(masks[0])[0])
    tensors["w"].view(-1)[position] += 1
    before = bits_of(tensors, model)
    with pytest.raises(BaseMismatchError, match="changed since it was prepared") as caught:
        skill.apply(tensors)
    assert caught.value.tensor == "w"
    assert_bits(tensors, model, before)


def test_a_disjoint_patch_applied_since_stacks_and_reverts_in_order(tmp_path):
    model, base, (a, b), _, _ = _disjoint_pair(tmp_path, overlap=False)
    tensors = live(model)
    both = load_bits(sparsestitch.stitch(base, [a, b], tmp_path / "ab.safetensors"))
    with patching("positions"):  # prepared at its positions (whole: the next test)
        skill_b = sparsestitch.prepare(tensors, b)
    first = sparsestitch.apply(tensors, a)
    second = skill_b.apply(tensors)                 # disjoint from ``a``: the same as both
    assert_bits(tensors, model, both)
    with pytest.raises(SparsestitchError, match="reverse order"):
        first.revert()
    second.revert()
    first.revert()
    assert_bits(tensors, model, base_bits(model))


def test_a_prepared_whole_tensor_is_refused_over_another_patch_and_stacks_under_one(tmp_path):
    model, base, (a, b), _, _ = _disjoint_pair(tmp_path, overlap=False)
    tensors = live(model)
    both = load_bits(sparsestitch.stitch(base, [a, b], tmp_path / "ab.safetensors"))
    with patching("whole"):
        skill_b = sparsestitch.prepare(tensors, b)
    assert skill_b._entries[0].positions is None
    with sparsestitch.apply(tensors, a):
        patched = bits_of(tensors, model)
        with pytest.raises(SparsestitchError, match="changes it whole: revert that one first"):
            skill_b.apply(tensors)
        assert_bits(tensors, model, patched)
    with skill_b.apply(tensors):          # first, then ``a`` over it: both
        with sparsestitch.apply(tensors, a):
            assert_bits(tensors, model, both)
    assert_bits(tensors, model, base_bits(model))


def test_an_overlapping_patch_applied_since_is_refused(tmp_path):
    model, base, (a, b), _, _ = _disjoint_pair(tmp_path, overlap=True)
    tensors = live(model)
    skill_b = sparsestitch.prepare(tensors, b)
    with sparsestitch.apply(tensors, a):
        patched = bits_of(tensors, model)
        with pytest.raises(BaseMismatchError, match="changed since it was prepared"):
            skill_b.apply(tensors)
        assert_bits(tensors, model, patched)


def test_a_replaced_tensor_is_refused(tmp_path):
    model = _module_model(np.random.default_rng(12))
    base, deltas, _, _ = _setup(tmp_path, model, 1, seed=12)
    module = Tiny(live(model))
    skill = sparsestitch.prepare(module, deltas)
    module.layer.weight = torch.nn.Parameter(module.layer.weight.detach().clone())
    with pytest.raises(SparsestitchError, match="not the one this patch was prepared for"):
        skill.apply(module)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("resident", [False, True])
def test_prepared_apply_on_cuda_equals_the_cpu_result(tmp_path, resident):
    rng = np.random.default_rng(13)
    model = random_model(rng, FLOAT_DTYPES, 3)
    base, deltas, _, _ = _setup(tmp_path, model, 3, seed=13)
    stitched = load_bits(sparsestitch.stitch(base, deltas, tmp_path / "out.safetensors"))
    tensors = live(model, "cuda")
    skill = sparsestitch.prepare(tensors, deltas, resident=resident)
    for entry in skill._entries:
        for array in (entry.positions, entry.expected, entry.new):
            assert array.is_cuda == resident and (resident or array.is_pinned())
    with skill.apply(tensors):
        assert_bits(tensors, model, stitched)
    assert_bits(tensors, model, base_bits(model))


def test_a_non_contiguous_tensor_is_prepared_and_switched_through_its_strides(tmp_path):
    rng = np.random.default_rng(14)
    model = {"w": ("F32", (6, 4), random_bits(rng, "F32", 24))}
    base, deltas, _, _ = _setup(tmp_path, model, 2, seed=14)
    stitched = load_bits(sparsestitch.stitch(base, deltas, tmp_path / "out.safetensors"))
    tensors = {"w": live(model)["w"].t().contiguous().t()}   # (6, 4) view, column-major
    assert not tensors["w"].is_contiguous()
    skill = sparsestitch.prepare(tensors, deltas)
    with skill.apply(tensors):
        assert_bits(tensors, model, stitched)
    assert_bits(tensors, model, base_bits(model))


def test_ties_guards_the_stored_positions_it_trims_away(tmp_path):
    """TIES ranks every stored entry of a tensor, so a change at a stored position it left
    unchanged alters the merge elsewhere: the prepared patch must refuse it."""
    rng = np.random.default_rng(15)
    model = {"w": ("F32", (8, 8), random_bits(rng, "F32", 64))}
    base = write_model(tmp_path / "base.safetensors", model)
    tune = random_bits(rng, "F32", 64, near=model["w"][2])
    delta = write_delta(tmp_path / "d.delta", model, {"w": np.ones(64, bool)}, {"w": tune})
    tensors = live(model)
    skill = sparsestitch.prepare(tensors, delta, rule="ties", density=0.25)
    (entry,) = skill._entries
    assert entry.guard is not None and entry.guard.numel() + entry.positions.numel() == 64
    trimmed = int(entry.guard[0])
    tensors["w"].view(-1)[trimmed] = 1e30
    before = bits_of(tensors, model)
    with pytest.raises(BaseMismatchError, match="changed since it was prepared"):
        skill.apply(tensors)
    assert_bits(tensors, model, before)
    assert base.exists()
