"""stitch_into: deltas stitched into a model on its device (torch's CPU device here) give the
bits of ``stitch`` to a file, read back -- for every rule -- with the merge and the value
decoding running in torch (the numpy combiner and the exact codecs' numpy decoders refuse to
run)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import sparsestitch
from sparsestitch.delta.codecs import RawValues, TauValues, XorValues
from sparsestitch.core.errors import BaseMismatchError, SparsestitchError

from .test_device import DEVICES, _numpy_combiner_forbidden
from .test_live import (Tiny, _module_model, _setup, assert_bits, base_bits, live,
                        random_merge_case)
from .test_rules import RULE_OPTIONS
from .test_stitch import load_bits


@contextlib.contextmanager
def _torch_only():
    refuse = AssertionError("decoded or merged by the numpy path")
    with contextlib.ExitStack() as stack:
        stack.enter_context(_numpy_combiner_forbidden())
        for codec in (TauValues, XorValues, RawValues):
            stack.enter_context(mock.patch.object(codec, "decode", side_effect=refuse))
        yield


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(1, 4),
       rule=st.sampled_from(sorted(RULE_OPTIONS)), pick=st.integers(0, 2))
def test_stitch_into_equals_stitch_to_a_file(device, seed, count, rule, pick):
    with tempfile.TemporaryDirectory() as tmp:
        model, deltas, merge, stitched = random_merge_case(Path(tmp), seed, count, rule, pick)
        tensors = live(model, device)
        with _torch_only():
            changed = sparsestitch.stitch_into(tensors, deltas, **merge)
        assert_bits(tensors, model, stitched)
        assert set(changed) <= set(model)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule, options", [("localize-stitch", {}), ("ties", {"density": 0.1}),
                                           ("dare", {"drop": 0.3})])
def test_stitch_into_a_loaded_checkpoint_with_compressed_deltas(tmp_path, rule, options, device):
    """Real compress output (the codecs it picks) into a checkpoint loaded with safetensors."""
    from safetensors.torch import load_file

    from .conftest import bits
    from .test_device import _three_deltas

    deltas = _three_deltas(tmp_path, density=0.3)
    want = sparsestitch.stitch(tmp_path / "base.safetensors", deltas,
                               tmp_path / "out.safetensors", rule=rule, **options)
    tensors = load_file(tmp_path / "base.safetensors", device=device)
    with _torch_only():
        sparsestitch.stitch_into(tensors, deltas, rule=rule, **options)
    for name, tensor in load_file(want).items():
        assert np.array_equal(bits(tensor), bits(tensors[name].cpu())), name


def test_an_nn_module_is_stitched_in_place(tmp_path):
    model = _module_model(np.random.default_rng(3))
    base, deltas, _, _ = _setup(tmp_path, model, 2, seed=3)
    stitched = load_bits(sparsestitch.stitch(base, deltas, tmp_path / "out.safetensors"))
    module = Tiny(live(model))
    weight = module.layer.weight
    sparsestitch.stitch_into(module, deltas)
    assert_bits(module.state_dict(), model, stitched)
    assert module.layer.weight is weight


def test_another_base_is_refused_before_anything_is_written(tmp_path):
    model = _module_model(np.random.default_rng(4))
    _, deltas, _, _ = _setup(tmp_path, model, 2, seed=4)
    tensors = live(model)
    tensors["layer.ids"][0] += 1  # the last tensor differs from the deltas' base
    before = {n: t.clone() for n, t in tensors.items()}
    with pytest.raises(BaseMismatchError):
        sparsestitch.stitch_into(tensors, deltas)
    for name, tensor in tensors.items():
        assert tensor.equal(before[name]), name


def test_a_model_under_a_hot_swap_patch_is_refused(tmp_path):
    model = _module_model(np.random.default_rng(5))
    _, deltas, _, _ = _setup(tmp_path, model, 1, seed=5)
    tensors = live(model)
    with sparsestitch.apply(tensors, deltas):
        with pytest.raises(SparsestitchError, match="revert it"):
            sparsestitch.stitch_into(tensors, deltas)
    sparsestitch.stitch_into(tensors, deltas)
    assert base_bits(model)  # and afterwards it stitches
