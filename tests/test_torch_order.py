"""sorted_range_mask against torch's own sort: the same elements in a range of its order,
equal values included, in both directions, with the native selection and without it."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsestitch.combine import torch_order
from sparsestitch.combine.torch_order import sort_depth_limit, sorted_range_mask
from sparsestitch.core import native

# Few distinct values, so equal ones are common, with the values torch's comparators treat
# apart (NaN first when descending, last when ascending) or alike (-0.0 and 0.0).
POOL = [0.0, -0.0, 1.0, 2.0, 2.5, -1.0, float("inf"), float("-inf"), float("nan"), 1e-30]


def torch_range(values: torch.Tensor, lo: int, hi: int, descending: bool) -> np.ndarray:
    """The elements at positions lo..hi-1 of torch's sort, as a bool array (the oracle)."""
    mask = np.zeros(values.numel(), bool)
    mask[torch.sort(values, descending=descending).indices[lo:hi].numpy()] = True
    return mask


@st.composite
def ranges(draw):
    values = draw(st.lists(st.sampled_from(POOL) | st.floats(-4, 4, width=32),
                           min_size=0, max_size=600))
    size = len(values)
    lo = draw(st.integers(0, size))
    hi = draw(st.integers(lo, size))
    return torch.tensor(values, dtype=torch.float32), lo, hi, draw(st.booleans())


@settings(max_examples=400, deadline=None)
@given(ranges())
def test_the_same_elements_as_torch_sort(case):
    values, lo, hi, descending = case
    got = sorted_range_mask(values, lo, hi, descending).numpy()
    assert got.dtype == bool
    assert np.array_equal(got, torch_range(values, lo, hi, descending))


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("size", [17, 1000, 200_003])
def test_bf16_task_vectors_with_many_ties(size, descending):
    """Magnitudes of bf16 values: thousands equal at the cut of a large tensor."""
    rng = np.random.default_rng(size)
    values = torch.from_numpy(rng.standard_normal(size).astype(np.float32) * 0.01)
    values = values.bfloat16().abs().float()
    for lo, hi in [(0, int(0.2 * size)), (int(0.1 * size), size - int(0.01 * size)),
                   (0, size), (size // 2, size // 2 + 1)]:
        got = sorted_range_mask(values, lo, hi, descending).numpy()
        assert np.array_equal(got, torch_range(values, lo, hi, descending))
    if size > 1000:  # TIES' cut falls inside a run of equal values: some kept, some not
        hi = int(0.2 * size)
        at_cut = values == torch.sort(values, descending=descending).values[hi - 1]
        kept = torch.from_numpy(sorted_range_mask(values, 0, hi, descending).numpy())
        assert 0 < int((at_cut & kept).sum()) < int(at_cut.sum())


def test_a_segment_at_the_depth_limit_falls_back_to_the_sort():
    """Where std::sort would heap-sort a segment, the native selection says so, and the
    result comes from torch's sort."""
    kernels = native.kernels()
    if kernels is None:
        pytest.skip("the compiled loops are not built")
    values = torch.from_numpy(np.random.default_rng(1).integers(0, 9, 5000).astype(np.float32))
    mask = np.empty(values.numel(), np.uint8)
    assert not kernels.sort_select(values.numpy(), 0, 1234, True, 0, mask)
    with mock.patch.object(torch_order, "sort_depth_limit", lambda size: 0):
        got = sorted_range_mask(values, 0, 1234, True).numpy()
    assert np.array_equal(got, torch_range(values, 0, 1234, True))


def test_without_compiled_loops_the_sort_runs():
    values = torch.from_numpy(np.random.default_rng(2).integers(0, 5, 3000).astype(np.float32))
    with mock.patch.object(native, "kernels", lambda: None):
        got = sorted_range_mask(values, 10, 900, False).numpy()
    assert np.array_equal(got, torch_range(values, 10, 900, False))


def test_depth_limit_is_libstdcxx():
    assert [sort_depth_limit(n) for n in (0, 1, 2, 3, 16, 17, 1 << 20)] == [0, 0, 2, 2, 8, 8, 40]


def test_bad_arguments_are_refused():
    kernels = native.kernels()
    if kernels is None:
        pytest.skip("the compiled loops are not built")
    values = np.zeros(10, np.float32)
    with pytest.raises(ValueError):
        kernels.sort_select(values, 0, 11, True, 6, np.empty(10, np.uint8))
    with pytest.raises(ValueError):
        kernels.sort_select(values, 0, 5, True, 6, np.empty(9, np.uint8))
    with pytest.raises(TypeError):
        kernels.sort_select(values.astype(np.float64), 0, 5, True, 6, np.empty(10, np.uint8))


def test_the_installed_torch_sorts_as_the_native_selection_assumes():
    """The first call's check passes here (else every trim falls back to torch's sort)."""
    if native.kernels() is None:
        pytest.skip("the compiled loops are not built")
    assert torch_order.native_matches_torch()


def test_a_torch_that_sorts_otherwise_gets_its_own_sort():
    """Where the check fails, the result is still torch's (its sort runs)."""
    values = torch.from_numpy(np.random.default_rng(3).integers(0, 7, 4000).astype(np.float32))
    with mock.patch.object(torch_order, "native_matches_torch", lambda: False), \
            mock.patch.object(torch, "sort", wraps=torch.sort) as sort:
        got = sorted_range_mask(values, 0, 1500, True).numpy()
    assert sort.call_count == 1
    assert np.array_equal(got, torch_range(values, 0, 1500, True))


@pytest.mark.parametrize("dtype_name", ["BF16", "F16", "F32", "F64"])
def test_ranked_from_the_bits_as_from_the_magnitudes(dtype_name):
    """tau_range_mask (the values made from the bits as they are copied) against torch's sort
    of abs_tau's float32 magnitudes: unchanged elements, equal steps, NaN and infinities."""
    from sparsestitch.core.dtypes import dtype, from_wide

    kernels = native.kernels()
    if kernels is None:
        pytest.skip("the compiled loops are not built")
    dt = dtype(dtype_name)
    rng = np.random.default_rng(len(dtype_name))
    base_wide = (rng.standard_normal(20_000) * 0.05).astype(dt.wide)
    base = from_wide(base_wide, dt)
    tune = from_wide(base_wide + (rng.integers(-5, 6, 20_000) * 0.004).astype(dt.wide), dt)
    tune[:3] = from_wide(np.array([np.nan, np.inf, -np.inf], dt.wide), dt)
    kind = native.FLOAT_KINDS[dtype_name]
    magnitudes = torch.empty(20_000, dtype=torch.float32)
    kernels.abs_tau(kind, tune, base, magnitudes.numpy())
    for lo, hi, descending in ((0, 6_000, True), (2_000, 19_000, False), (0, 20_000, True)):
        got = torch_order.tau_range_mask(kind, tune, base, lo, hi, descending).numpy()
        assert np.array_equal(got, torch_range(magnitudes, lo, hi, descending))
