"""The union of stored positions: every method agrees with a plain set-based reference."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from sparsestitch.combine.union import marks_union, sorted_union, union_of


def reference(arrays):
    """Union, first occurrence in the concatenation, and per-array indices, from Python sets."""
    union = sorted(set().union(*[a.tolist() for a in arrays]))
    index = {p: i for i, p in enumerate(union)}
    concatenation = [p for a in arrays for p in a.tolist()]
    first = [concatenation.index(p) for p in union]
    where = [[index[p] for p in a.tolist()] for a in arrays]
    return union, first, where


position_sets = st.lists(
    st.sets(st.integers(0, 5000), max_size=60).map(lambda s: np.array(sorted(s), np.int64)),
    max_size=7)


def check(union, arrays):
    positions, first, where = reference(arrays)
    assert union.positions.dtype == np.int64 and union.positions.tolist() == positions
    assert union.first.tolist() == first
    assert [w.tolist() for w in union.where] == where


@settings(max_examples=300, deadline=None)
@given(position_sets, st.integers(1, 70))
def test_every_method_matches_the_reference(arrays, window):
    check(sorted_union(arrays), arrays)
    check(marks_union(arrays, window=window), arrays)
    check(union_of(arrays), arrays)


def test_picks_marks_for_dense_and_sort_for_sparse_with_equal_results():
    rng = np.random.default_rng(0)
    for numel, density in ((1 << 22, 0.05), (1 << 30, 1e-6)):
        arrays = [np.sort(rng.choice(numel, int(numel * density), replace=False))
                  for _ in range(5)]
        arrays.insert(2, np.empty(0, np.int64))
        by_sort, by_marks = sorted_union(arrays), marks_union(arrays, window=1 << 16)
        chosen = union_of(arrays)
        for union in (by_marks, chosen):
            assert np.array_equal(union.positions, by_sort.positions)
            assert np.array_equal(union.first, by_sort.first)
            assert all(np.array_equal(a, b) for a, b in zip(union.where, by_sort.where))


def test_one_nonempty_array_is_its_own_union():
    a = np.array([3, 8, 20], np.int64)
    union = union_of([np.empty(0, np.int64), a, np.empty(0, np.int64)])
    assert union.positions is a
    assert [w.tolist() for w in union.where] == [[], [0, 1, 2], []]
    assert union.first.tolist() == [0, 1, 2]
    empty = union_of([])
    assert empty.positions.size == 0 and empty.where == []
