"""The fidelity scope's energy pass takes the bracket's sample (FidelityTopK): the counts it
gives are the sample pass's, bit for bit, with one read of the model less; tensors too large
to hold their sample still get it from the sample pass."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from sparsestitch.checkpoint import Checkpoint
from sparsestitch.localize import selection as selection_module
from sparsestitch.localize import selectors as selectors_module
from sparsestitch.localize.keep import make_selectors
from sparsestitch.localize.selection import TensorPlan, TensorScanner, run_pre_passes
from sparsestitch.localize.selectors import FidelityTopK

from .support.models import save_checkpoint

SHAPES = [(37, 5), (300,), (64, 3, 2), (1,), (129, 16), (5, 7)]


def write_pair(folder, shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = {f"model.t{i}.weight": torch.randn(shape, generator=g).to(dtype)
            for i, shape in enumerate(shapes)}
    tune = {name: (t.float() + 0.02 * torch.randn(t.shape, generator=g)).to(dtype)
            for name, t in base.items()}
    return (save_checkpoint(folder / "base.safetensors", base),
            save_checkpoint(folder / "tune.safetensors", tune))


def sampled(base_path, tune_path, chunk: int, held_limit: int):
    """The fidelity selector after its pre-passes, and which pre-passes read the model."""
    passes = []
    real_pre_pass = selection_module._pre_pass

    def recorded(scanner, index, *args):
        passes.append(index)
        return real_pre_pass(scanner, index, *args)

    with Checkpoint(base_path) as base, Checkpoint(tune_path) as tune, \
            mock.patch.object(selectors_module, "SAMPLE_HELD_LIMIT", held_limit), \
            mock.patch.object(selection_module, "_pre_pass", recorded):
        plan = TensorPlan.of(base, None, None, None)
        (selector,) = make_selectors(plan, 0.05, "fidelity", None, 1)
        assert isinstance(selector, FidelityTopK)
        run_pre_passes(TensorScanner(base, [tune], plan, chunk), [selector], 2, False)
    return selector, passes


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4),
       chunk=st.sampled_from([7, 64, 1000]), sample_block=st.sampled_from([16, 40, 96]),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]), seed=st.integers(0, 1000))
def test_the_energy_pass_counts_what_the_sample_pass_counts(tmp_path_factory, shapes, chunk,
                                                             sample_block, dtype, seed):
    folder = tmp_path_factory.mktemp("pair")
    shapes = [(129, 16)] + shapes  # enough elements that 5% is something, and not all
    pair = write_pair(folder, shapes, dtype, seed)
    with mock.patch.object(selectors_module, "SAMPLE_BLOCK", sample_block):
        alone, alone_passes = sampled(*pair, chunk, held_limit=-1)   # nothing held
        held, held_passes = sampled(*pair, chunk, held_limit=1 << 22)
        # the first tensor's sample held, the others' left to the sample pass
        first = int(np.prod(shapes[0])) // selectors_module.SAMPLE_EVERY
        mixed, mixed_passes = sampled(*pair, chunk, held_limit=first)
    assert alone_passes == [0, 1] and held_passes == [0]
    assert np.array_equal(held._sample.histogram, alone._sample.histogram)
    assert held._sample.count == alone._sample.count > 0
    assert held._brackets() == alone._brackets()
    assert held._scales == alone._scales and held._energies == alone._energies
    # added in another order where some tensors come later: the same counts, sums to rounding
    assert mixed._sample.count == alone._sample.count
    np.testing.assert_allclose(mixed._sample.histogram, alone._sample.histogram, rtol=1e-12)
    assert mixed_passes == ([0] if all(int(np.prod(s)) // selectors_module.SAMPLE_EVERY <= first
                                       for s in shapes) else [0, 1])


@pytest.mark.parametrize("sample_block", [3, 30, 100])
@pytest.mark.parametrize("block_rows", [1, 7, 16, 333, 1000])
def test_a_blocks_sampled_keys_are_those_of_the_sample_rows(sample_block, block_rows):
    """sampled_keys against sample_rows: every sampled row's keys once, in order, whatever
    the blocks' edges."""
    shape, keys = (1000, 3), np.arange(3000, dtype=np.uint32)
    parts = []
    with mock.patch.object(selectors_module, "SAMPLE_BLOCK", sample_block):
        rows = selectors_module.sample_rows(shape)
        for first in range(0, 1000, block_rows):
            stop = min(1000, first + block_rows)
            block = mock.Mock(offset=first * 3, base=np.empty((stop - first) * 3),
                              magnitudes=keys[first * 3:stop * 3])
            parts += selectors_module.sampled_keys(block, shape)
    assert len(rows) > 1
    want = np.concatenate([keys[start * 3:stop * 3] for start, stop in rows])
    assert np.array_equal(np.concatenate(parts), want)
