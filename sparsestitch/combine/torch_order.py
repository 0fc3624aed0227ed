"""Which elements torch's CPU sort puts in a range of its order, found without the sort.

mergekit trims a task vector with ``torch.argsort(|tau|, descending=True)[:k]`` (TIES,
DARE-TIES' trims, breadcrumbs' slice of ``torch.sort``): among equal magnitudes at the cut
-- common in bf16 task vectors, 3 to 86 of them at TIES' cut in most large tensors of a real
fine-tune -- it keeps the ones torch's sort happens to place first.  That sort is libstdc++'s
``std::sort`` (introsort) of (value, index) pairs, which is not stable, so no threshold rule
reproduces its choice; but its partitions are deterministic, and which side of a partition
an element lands on never changes afterwards.  :func:`sorted_range_mask` makes the same
partitions with the same pivots and divides only the segments a bound falls inside (the
native ``sort_select``), linear time instead of ``n log n``: mergekit's kept set exactly,
4-6x faster than the sort it stands for.  Where that is not possible (no compiled loops, over
2**32 elements, or a segment that the sort would heap-sort at its depth limit) torch's sort
itself runs -- and so it does everywhere if the torch in use sorts differently: the first call
compares both on arrays full of equal values (:func:`native_matches_torch`).
"""

from __future__ import annotations

import functools

import numpy as np

from ..core import native


def sorted_range_mask(values, lo: int, hi: int, descending: bool):
    """A bool torch tensor (on the CPU) marking the elements at positions ``lo`` to ``hi - 1``
    of ``torch.sort(values, descending=descending)`` (``values`` a flat float32 CPU tensor)
    -- the same elements, equal values included, as the sort's own indices give."""
    import torch

    size = values.numel()
    lo, hi = max(0, min(lo, size)), max(0, min(hi, size))
    mask = _selected(values.contiguous().numpy(), size, lo, hi, descending)
    if mask is not None:
        return mask
    mask = torch.zeros(size, dtype=torch.bool)
    if hi > lo:
        mask[torch.sort(values, descending=descending).indices[lo:hi]] = True
    return mask


def tau_range_mask(kind: int, finetuned: np.ndarray, base: np.ndarray, lo: int, hi: int,
                   descending: bool):
    """:func:`sorted_range_mask` of ``|tau|`` in float32 (``abs_tau``: ``|wide(finetuned) -
    wide(base)|`` where the bits differ, else 0; ``kind`` a native float kind; the compiled
    loops are needed), made from the bits as the native selection copies them, without an
    array of them where it can."""
    import torch

    size = base.size
    lo, hi = max(0, min(lo, size)), max(0, min(hi, size))
    mask = _selected((kind, finetuned, base), size, lo, hi, descending)
    if mask is not None:
        return mask
    magnitudes = torch.empty(size, dtype=torch.float32)
    native.kernels().abs_tau(kind, finetuned, base, magnitudes.numpy())
    return sorted_range_mask(magnitudes, lo, hi, descending)


def _selected(values, size: int, lo: int, hi: int, descending: bool):
    """The native selection's mask of positions ``lo`` to ``hi - 1`` (``values`` as
    ``sort_select`` takes them), or None where it cannot stand for torch's sort."""
    import torch

    kernels = native.kernels()
    if (hi <= lo or kernels is None or size > np.iinfo(np.uint32).max
            or not native_matches_torch()):
        return None
    mask = np.empty(size, np.uint8)
    if not kernels.sort_select(values, lo, hi, descending, sort_depth_limit(size), mask):
        return None  # a segment the sort would heap-sort
    return torch.from_numpy(mask.view(np.bool_))


def sort_depth_limit(size: int) -> int:
    """libstdc++'s introsort depth limit: ``2 * floor(log2(size))`` (0 for an empty array)."""
    return 2 * (size.bit_length() - 1) if size > 0 else 0


@functools.cache
def native_matches_torch() -> bool:
    """Whether the native selection gives this torch's choice among equal values: both
    directions, a few bounds, on arrays of few distinct values (and NaN) at two sizes."""
    import torch

    kernels = native.kernels()
    if kernels is None:
        return False
    rng = np.random.default_rng(20261207)
    for size in (3_001, 70_001):
        values = rng.integers(0, 24, size).astype(np.float32)
        values[rng.random(size) < 0.02] = np.nan
        for descending in (True, False):
            order = torch.sort(torch.from_numpy(values), descending=descending).indices.numpy()
            for lo, hi in ((0, size // 5), (size // 10, size - size // 7)):
                mask = np.empty(size, np.uint8)
                if not kernels.sort_select(values, lo, hi, descending, sort_depth_limit(size),
                                           mask):
                    return False
                want = np.zeros(size, np.uint8)
                want[order[lo:hi]] = 1
                if not np.array_equal(mask, want):
                    return False
    return True
