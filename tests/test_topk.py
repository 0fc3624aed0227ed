"""The streaming top-k of sparsestitch.localize.topk against in-memory references."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparsestitch.core.dtypes import dtype
from sparsestitch.localize import topk as topk_module
from sparsestitch.localize.topk import (TopK, bracket_around, bracket_bins, count_to_keep,
                                        high_histogram, magnitude_keys, resolve_candidates,
                                        topk_positions)
from sparsestitch.core.tiebreak import ranked, tie_order

# Few distinct keys, so ties are common; they share high halves (the low-pass bin) and
# span the whole uint32 range (bin 0 and bin 0xFFFF).
KEY_POOL = [0, 1, 2, 0xFFFF, 0x10000, 0x10001, 0x1FFFF, 0x3F800000, 0x3F800001, 0x3F810000,
            0x7F800000, 0x7FC00000, 0xFFFF0000, 0xFFFFFFFE, 0xFFFFFFFF]


def sorted_reference(keys: np.ndarray, k: int, order: np.ndarray) -> list[int]:
    """Top k by (-key, -tie order, index), by plain sorting: the oracle for topk_positions."""
    ranking = sorted(range(keys.size), key=lambda i: (-int(keys[i]), -int(order[i]), i))
    return sorted(ranking[:k])


def reference(keys: np.ndarray, k: int, name: str = "w") -> np.ndarray:
    return topk_positions(keys, k, tie_order(name, np.arange(keys.size)))


def streaming_topk(chunks: list[np.ndarray], k: int, name: str = "w", order_of=None,
                   estimate: np.ndarray | None = None, passes: list | None = None,
                   shuffle: np.random.Generator | None = None) -> np.ndarray:
    """Run TopK over ``chunks`` exactly as compress does; return global indices.  Tie orders
    are ``tie_order(name, index)``, or ``order_of(index)`` (global indices) when given.
    ``estimate``: a histogram the first pass brackets its counts around (``bracket_around``);
    ``passes``: whether the second counting pass ran is appended to it, then whether the
    selection was order-free; ``shuffle``: chunks are selected in a random order where the
    counter says that order does not matter (``TopK.order_free``), as threads would."""
    topk = TopK(k)
    if estimate is not None:
        bracket_around(topk, estimate)
    starts = np.cumsum([0] + [c.size for c in chunks])
    order_of = order_of or (lambda index: tie_order(name, index))
    orders = [lambda index, start=start: order_of(index + start) for start in starts]
    for chunk in chunks:
        topk.count_high(chunk)
    topk.prepare_low_pass()
    if passes is not None:
        passes.append(topk.needs_low_pass)
    if topk.needs_low_pass:
        for chunk in chunks:
            topk.count_low(chunk)
    while topk.needs_tie_pass:
        for chunk, order in zip(chunks, orders):
            topk.count_ties(chunk, order)
        topk.end_tie_pass()
    if passes is not None:
        passes.append(topk.order_free)
    at = list(range(len(chunks)))
    if shuffle is not None and topk.order_free:
        shuffle.shuffle(at)
    kept = {i: topk.select(chunks[i], orders[i]) + starts[i] for i in at}
    return np.concatenate([kept[i] for i in sorted(kept)]) if kept else np.empty(0, np.int64)


#: Tie orders at the threshold held in memory, or counted in two histogram passes.
TIE_MODES = pytest.mark.parametrize("held_whole", [topk_module.TIES_HELD_WHOLE, 0],
                                    ids=["held whole", "counted"])


@st.composite
def chunked_keys(draw):
    """Keys with many ties, a k from 0 to n, and chunk boundaries anywhere (empty chunks too)."""
    n = draw(st.integers(0, 200))
    pool = draw(st.lists(st.sampled_from(KEY_POOL), min_size=1, max_size=6, unique=True))
    keys = np.array(draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n)), np.uint32)
    k = draw(st.integers(0, n))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=8)))
    chunks = np.split(keys, cuts)
    return keys, k, chunks


@TIE_MODES
@settings(max_examples=150, deadline=None)
@given(chunked_keys())
def test_streaming_equals_reference_over_any_chunking(held_whole, case):
    with mock.patch.object(topk_module, "TIES_HELD_WHOLE", held_whole):
        keys, k, chunks = case
        got = streaming_topk(chunks, k)
        want = reference(keys, k)
        assert got.tolist() == want.tolist()
        assert got.size == k


@TIE_MODES
@settings(max_examples=60, deadline=None)
@given(chunked_keys(), st.integers(0, 2**32 - 1))
def test_equal_tie_orders_go_to_the_earliest_position(held_whole, case, seed):
    """Tie orders that collide (here from a pool of 3 values) fall back to global order."""
    keys, k, chunks = case
    order = np.random.default_rng(seed).integers(0, 3, keys.size).astype(np.uint32)
    with mock.patch.object(topk_module, "TIES_HELD_WHOLE", held_whole):
        got = streaming_topk(chunks, k, order_of=lambda index: order[index])
    assert got.tolist() == sorted_reference(keys, k, order)


@TIE_MODES
@settings(max_examples=150, deadline=None)
@given(chunked_keys(), st.integers(0, 2**32 - 1), st.booleans())
def test_order_free_selections_are_the_same_in_any_order(held_whole, case, seed, colliding):
    """Where the counter says the order of the chunks does not matter (every element at the
    tie cut is kept), selecting them shuffled gives the reference's elements; it says so
    whenever tie orders are distinct (so merge and compress select in threads), and only
    a collision of tie orders at the cut (here from a pool of 3) needs the global order."""
    keys, k, chunks = case
    rng = np.random.default_rng(seed)
    order = (rng.integers(0, 3, keys.size).astype(np.uint32) if colliding
             else tie_order("w", np.arange(keys.size)))
    passes = []
    with mock.patch.object(topk_module, "TIES_HELD_WHOLE", held_whole):
        got = streaming_topk(chunks, k, order_of=lambda index: order[index], passes=passes,
                             shuffle=rng)
    assert got.tolist() == sorted_reference(keys, k, order)
    order_free = passes[-1]
    if not colliding and np.unique(order).size == order.size:
        assert order_free
    if not order_free:  # the k-th element's key and tie order are shared by one not kept
        ranking = sorted(range(keys.size), key=lambda i: (-int(keys[i]), -int(order[i]), i))
        last, first_out = ranking[k - 1], ranking[k]
        assert (keys[last], order[last]) == (keys[first_out], order[first_out])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=60), st.data())
def test_reference_matches_plain_sort(values, data):
    keys = np.array(values, np.uint32)
    k = data.draw(st.integers(0, keys.size))
    order = np.array(data.draw(st.lists(st.integers(0, 3), min_size=keys.size,
                                        max_size=keys.size)), np.uint32)
    assert topk_positions(keys, k, order).tolist() == sorted_reference(keys, k, order)


@TIE_MODES
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 2**31), st.data())
def test_random_keys_many_chunks(held_whole, n, seed, data):
    with mock.patch.object(topk_module, "TIES_HELD_WHOLE", held_whole):
        rng = np.random.default_rng(seed)
        # Draw from a narrow range so keys collide in the high bins and tie exactly.
        keys = rng.integers(0x3F800000, 0x3F800000 + data.draw(st.integers(1, 1 << 18)),
                            size=n, dtype=np.uint32)
        k = data.draw(st.integers(0, n))
        chunk = data.draw(st.integers(1, n))
        got = streaming_topk([keys[i:i + chunk] for i in range(0, n, chunk)], k)
        assert got.size == k
        assert np.array_equal(got, reference(keys, k))


@settings(max_examples=100, deadline=None)
@given(chunked_keys(), st.data())
def test_resolve_candidates_completes_the_topk(case, data):
    """Keys above a split are kept outright; resolving the rest gives the exact top-k."""
    keys, k, _ = case
    high = data.draw(st.sampled_from(KEY_POOL))
    definite = np.flatnonzero(keys > high)
    candidates = np.flatnonzero(keys <= high)
    pick = resolve_candidates(ranked(keys[candidates], "w", candidates), k - definite.size)
    if definite.size > k or k - definite.size > candidates.size:
        assert pick is None
        return
    assert pick.dtype == np.bool_ and pick.size == candidates.size
    got = np.sort(np.concatenate([definite, candidates[pick]]))
    assert got.tolist() == reference(keys, k).tolist()


@settings(max_examples=60, deadline=None)
@given(chunked_keys(), st.floats(0.0, 1e6))
def test_bracket_of_an_exact_histogram_holds_the_kth_key(case, sampled_above):
    keys, k, _ = case
    if k == 0:
        return
    hist = np.bincount(keys >> 16, minlength=1 << 16).astype(np.float64)
    low_bin, high_bin = bracket_bins(hist, k, sampled_above)
    kth = int(np.sort(keys)[::-1][k - 1]) >> 16
    assert 0 <= low_bin <= kth <= high_bin <= 0xFFFF


@TIE_MODES
def test_ties_are_spread_over_the_tensor_not_taken_from_its_first_rows(held_whole):
    """A tie group as large as a real bf16 one (every key equal): the kept 1% lies all over
    the tensor, the same on every run and whatever the chunking."""
    with mock.patch.object(topk_module, "TIES_HELD_WHOLE", held_whole):
        keys = np.full(100_000, 0x3C000000, np.uint32)
        got = streaming_topk([keys[i:i + 7_000] for i in range(0, keys.size, 7_000)], 1_000)
        assert got.size == 1_000
        halves = np.bincount(got // 50_000, minlength=2)
        assert abs(int(halves[0]) - 500) < 100  # about half in each half (binomial sd 16)
        deciles = np.bincount(got // 10_000, minlength=10)
        assert deciles.min() > 50
        assert np.array_equal(got, streaming_topk([keys], 1_000))
        assert not np.array_equal(got, streaming_topk([keys], 1_000, name="another tensor"))


@pytest.mark.parametrize("k", [0, 5])
def test_no_low_pass_needed_at_the_extremes(k):
    keys = np.array([4, 4, 1, 0, 9], np.uint32)
    topk = TopK(k)
    topk.count_high(keys)
    assert not topk.needs_low_pass and not topk.needs_tie_pass
    assert topk.select(keys).tolist() == list(range(k))


def test_select_before_low_pass_is_an_error():
    topk = TopK(2)
    keys = np.array([1, 2, 3], np.uint32)
    topk.count_high(keys)
    assert topk.needs_low_pass
    with pytest.raises(RuntimeError, match="count_low"):
        topk.select(keys)


@pytest.mark.parametrize("density, numel, k", [
    (0.01, 1050, 11),      # 10.5 rounds up
    (0.01, 1049, 10),      # 10.49 rounds down
    (0.5, 3, 2),           # 1.5 rounds up
    (0.25, 2, 1),          # 0.5 rounds up
    (0.1, 4, 0),           # 0.4 rounds down
    (0.0, 10**12, 0),
    (1.0, 10**12, 10**12),
    (1.0, 0, 0),
    (0.7, 0, 0),
])
def test_count_to_keep_rounds_half_up(density, numel, k):
    assert count_to_keep(density, numel) == k


@settings(max_examples=200, deadline=None)
@given(st.floats(0.0, 1.0), st.integers(0, 10**9))
def test_count_to_keep_is_the_nearest_count(density, numel):
    k = count_to_keep(density, numel)
    assert 0 <= k <= numel
    assert abs(k - density * numel) <= 0.5 + 1e-6 * numel


@pytest.mark.parametrize("density", [-0.01, 1.0001, float("nan"), float("inf")])
def test_count_to_keep_refuses_densities_outside_0_1(density):
    with pytest.raises(ValueError, match="density"):
        count_to_keep(density, 100)


def test_magnitude_keys_order_like_abs_tau_with_nan_first():
    f32 = dtype("F32")
    base = np.array([0.0, 1.0, 1.0, -2.0, 0.0, 0.0, 5.0], np.float32)
    tune = np.array([-0.0, 1.5, 0.0, 2.0, np.inf, np.nan, 5.0], np.float32)
    keys = magnitude_keys(tune.view(np.uint32), base.view(np.uint32), f32)
    assert keys[0] == 0 and keys[6] == 0                   # -0.0 vs 0.0 and unchanged: no change
    assert keys[1] < keys[2] < keys[3] < keys[4] < keys[5]  # 0.5 < 1 < 4 < inf < nan
    assert topk_positions(keys, 2).tolist() == [4, 5]


def test_select_before_the_tie_pass_is_an_error():
    keys = np.array([5, 5, 5], np.uint32)
    topk = TopK(2)
    topk.count_high(keys)
    topk.count_low(keys)
    assert topk.needs_tie_pass
    with pytest.raises(RuntimeError, match="count_ties"):
        topk.select(keys, lambda index: tie_order("w", index))


def rounded(values: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``values`` rounded to dtype ``name``: its bits, and their exact float64 values."""
    if name == "BF16":
        bits = (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return bits, (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    narrow = values.astype(np.float16 if name == "F16" else np.float64)
    return narrow.view(dtype(name).bits), narrow.astype(np.float64)


@pytest.mark.parametrize("name", ["F16", "BF16", "F64"])
def test_magnitude_keys_are_float32_abs_tau(name):
    rng = np.random.default_rng(3)
    base = rng.standard_normal(50)
    base_bits, base_values = rounded(base, name)
    tune_bits, tune_values = rounded(base + rng.laplace(0, 0.1, 50), name)
    want = np.abs(tune_values - base_values).astype(np.float32)
    got = magnitude_keys(tune_bits, base_bits, dtype(name)).view(np.float32)
    assert np.array_equal(got, want)


def test_magnitude_keys_beyond_float32_range_are_inf():
    base = np.array([0.0, -1e300, 1.0], np.float64)
    tune = np.array([1e300, 1e300, 1.0], np.float64)
    keys = magnitude_keys(tune.view(np.uint64), base.view(np.uint64), dtype("F64"))
    assert keys.view(np.float32).tolist() == [np.inf, np.inf, 0.0]


@TIE_MODES
@settings(max_examples=150, deadline=None)
@given(case=chunked_keys(), shift=st.integers(-3, 3), data=st.data())
def test_a_bracketed_first_pass_selects_exactly_what_two_passes_select(held_whole, case, shift,
                                                                         data):
    """A first pass that also counts the low bits of a few bins around an estimate (exact,
    shifted by a few bins, or a histogram of other keys) selects exactly the reference's
    elements; where the k-th key lies in the bracket, the second pass does not run."""
    keys, k, chunks = case
    exact = high_histogram(keys)
    if data.draw(st.booleans()):
        estimate = np.roll(exact, shift)
    else:
        estimate = high_histogram(np.array(data.draw(st.lists(st.sampled_from(KEY_POOL),
                                                              min_size=1, max_size=50)),
                                           np.uint32))
    passes = []
    with mock.patch.object(topk_module, "TIES_HELD_WHOLE", held_whole):
        got = streaming_topk(chunks, k, estimate=estimate, passes=passes)
    np.testing.assert_array_equal(got, reference(keys, k))

    def kth_bin(histogram):
        return histogram.size - 1 - int(np.searchsorted(np.cumsum(histogram[::-1]), k))
    if 0 < k < min(keys.size, int(estimate.sum())) and abs(kth_bin(exact) - kth_bin(estimate)) <= 2:
        assert passes[0] is False  # the k-th key's bin was within two bins of the estimate's


def test_fidelity_merge_skips_the_second_counting_pass_and_keeps_its_bytes(tmp_path,
                                                                           monkeypatch):
    """merge by Localize-and-Stitch at 1% (the fidelity scope's exact top-k): the energy
    pass's histograms bracket the threshold, so the model is read twice less (no "localize
    2/3" pass, no tie pass); the merged model is byte-identical to the one without the
    bracket, which needs both."""
    import sparsestitch
    from sparsestitch.localize import selection, selectors

    from .conftest import save_checkpoint

    import torch

    # changes of two sizes only: the 1% kept cuts through thousands of equal keys (ties)
    generator = torch.Generator().manual_seed(3)
    shapes = {"a.weight": (256, 256), "b.weight": (128, 512), "c.weight": (64, 64)}
    base_tensors = {n: torch.zeros(shape, dtype=torch.bfloat16) for n, shape in shapes.items()}
    base = save_checkpoint(tmp_path / "base.safetensors", base_tensors)
    tunes = []
    for i in range(2):
        tune = {n: torch.where(torch.rand(t.shape, generator=generator) < 0.1, 0.125, 0.0625
                               ).to(torch.bfloat16) for n, t in base_tensors.items()}
        tunes.append(save_checkpoint(tmp_path / f"t{i}.safetensors", tune))
    ran = []
    real = selection._pre_pass
    monkeypatch.setattr(selection, "_pre_pass", lambda scanner, index, prepass, *rest:
                        (ran.append(prepass.description), real(scanner, index, prepass, *rest)))
    sparsestitch.merge(base, tunes, tmp_path / "bracketed.safetensors", rule="localize-stitch",
                       keep=0.01)
    assert "localize 2/3" not in ran and "energy" in ran and "localize 1/3" in ran, ran
    assert "ties" not in ran, ran  # the tie orders at the threshold were held by the bracket
    ran.clear()
    monkeypatch.setattr(selectors, "bracket_around", lambda topk, estimate: None)
    sparsestitch.merge(base, tunes, tmp_path / "plain.safetensors", rule="localize-stitch",
                       keep=0.01)
    assert "localize 2/3" in ran and "ties" in ran, ran
    assert (tmp_path / "bracketed.safetensors").read_bytes() == \
        (tmp_path / "plain.safetensors").read_bytes()


@pytest.mark.parametrize("scope", ["fidelity", "global"])
def test_a_cut_through_ties_is_selected_in_threads_with_the_same_bytes(tmp_path, scope):
    """The 1% of a bf16 fine-tune whose changes take two values cuts through thousands of
    equal keys; their tie orders differ, so the counters are order-free and merge and
    compress select blocks in two threads: the same bytes as in one."""
    import sparsestitch
    from sparsestitch.localize import selectors

    from .conftest import save_checkpoint

    import torch

    generator = torch.Generator().manual_seed(5)
    shapes = {"a.weight": (256, 256), "b.weight": (128, 512), "c.weight": (64, 64)}
    base_tensors = {n: torch.zeros(shape, dtype=torch.bfloat16) for n, shape in shapes.items()}
    base = save_checkpoint(tmp_path / "base.safetensors", base_tensors)
    tune = save_checkpoint(tmp_path / "t.safetensors", {
        n: torch.where(torch.rand(t.shape, generator=generator) < 0.1, 0.125, 0.0625
                       ).to(torch.bfloat16) for n, t in base_tensors.items()})
    ordered = []
    real = selectors._TopKSelector.ordered.fget
    with mock.patch.object(selectors._TopKSelector, "ordered",
                           property(lambda self: ordered.append(real(self)) or ordered[-1])):
        for threads in (1, 2):
            sparsestitch.merge(base, [tune], tmp_path / f"m{threads}.safetensors",
                               rule="localize-stitch", keep=0.01, scope=scope, threads=threads,
                               chunk_elements=4096)
            sparsestitch.compress(base, tune, tmp_path / f"c{threads}.delta", density=0.01,
                                  scope=scope, threads=threads)
    assert ordered and not any(ordered)
    assert (tmp_path / "m1.safetensors").read_bytes() == (tmp_path / "m2.safetensors").read_bytes()
    assert (tmp_path / "c1.delta").read_bytes() == (tmp_path / "c2.delta").read_bytes()


@settings(max_examples=60, deadline=None)
@given(case=chunked_keys(), joined=st.integers(0, 8))
def test_bracketed_keys_joined_or_counted_give_the_same_cut(case, joined):
    """The first pass's measures, folded as the pre-passes fold them (``add_first``), join
    the bracket's keys and their tie orders up to ``JOINED_KEYS`` and count the keys into a
    table beyond: either way the threshold and the selection are the reference's, and where
    every bracketed key's tie order was held no tie pass runs."""
    keys, k, chunks = case
    topk = TopK(k)
    bracket_around(topk, high_histogram(keys))
    starts = np.cumsum([0] + [c.size for c in chunks])
    with mock.patch.object(topk_module, "JOINED_KEYS", joined):
        total = None
        for chunk, start in zip(chunks, starts):
            measure = topk.first_histogram(chunk, lambda index, s=start: tie_order("w", index + s))
            total = measure if total is None else topk_module.add_first(total, measure)
    if total is not None:
        topk.add_high(total)
    topk.prepare_low_pass()
    if topk.needs_low_pass:
        for chunk in chunks:
            topk.add_low(topk.low_histogram(chunk))
    order = lambda index: tie_order("w", index)  # noqa: E731
    tie_passes = 0
    while topk.needs_tie_pass:
        topk.count_ties(keys, order)
        topk.end_tie_pass()
        tie_passes += 1
    np.testing.assert_array_equal(topk.select(keys, order), reference(keys, k))
    if keys.size <= joined and 0 < k < keys.size:  # every bracketed key and order held
        assert tie_passes == 0
