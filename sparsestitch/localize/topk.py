"""Dataless localization: exact top-k of |tau| by streaming radix selection.

Ranking uses a *key* per element: the bits of |tau| as float32 (tau computed
in the wide type, see :mod:`sparsestitch.dtypes`), read as uint32.  For
non-negative floats the bit order is the value order, and NaN sorts above
infinity, so changed-to-NaN elements rank first (elements whose bits did not
change get key 0, even when tau = inf - inf is NaN).  Exactly ``k`` elements are
kept: every key above the threshold ``T``, then elements equal to ``T`` in
*global order* (tensors by name, then flat index) until ``k`` is reached.

:class:`TopK` finds ``T`` without holding the model: pass 1 counts keys by
their high 16 bits (a 64 Ki-bin histogram), which fixes the bin holding the
k-th largest key; pass 2 counts the low 16 bits of keys in that bin only; the
selection pass then keeps keys above ``T`` and hands out the tie quota in
call order.  Memory is two histograms, whatever the model size.
"""

from __future__ import annotations

import numpy as np

from .. import native
from ..dtypes import DType, to_wide

_BINS = 1 << 16
_INF_KEY = 0x7F800000


def magnitude_keys(finetuned_bits: np.ndarray, base_bits: np.ndarray, dt: DType) -> np.ndarray:
    """uint32 ranking keys of |fine-tuned - base|.

    >>> from sparsestitch.dtypes import dtype
    >>> f32 = dtype("F32")
    >>> a = np.array([1.0, 2.0, 3.0], np.float32).view(np.uint32)
    >>> b = np.array([1.5, 2.0, 1.0], np.float32).view(np.uint32)
    >>> magnitude_keys(a, b, f32).view(np.float32).tolist()
    [0.5, 0.0, 2.0]
    >>> inf = np.array([np.inf], np.float32).view(np.uint32)
    >>> magnitude_keys(inf, inf, f32).tolist()  # unchanged: never outranks a real change
    [0]
    """
    kernels, kind = native.float_kernels(dt.name)
    if kernels is not None:  # the same keys, in one pass
        keys = np.empty(np.shape(finetuned_bits), np.uint32)
        kernels.magnitude_keys(kind, np.ascontiguousarray(finetuned_bits),
                               np.ascontiguousarray(base_bits), keys)
        return keys
    with np.errstate(all="ignore"):
        tau = np.subtract(to_wide(finetuned_bits, dt), to_wide(base_bits, dt))
        np.abs(tau, out=tau)
        if tau.dtype != np.float32:  # |tau| beyond float32's range becomes inf, silently
            tau = tau.astype(np.float32)
    keys = tau.view(np.uint32)
    # An unchanged inf or NaN gives tau = NaN, which would outrank every real change.
    nan = np.flatnonzero(keys > _INF_KEY)
    if nan.size:
        keys[nan[finetuned_bits.reshape(-1)[nan] == base_bits.reshape(-1)[nan]]] = 0
    return keys


def split_bracket(keys: np.ndarray, low_key: int, high_key: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(indices of keys above high_key, indices of keys in [low_key, high_key], those
    keys)``, indices in increasing order, of a flat ``keys`` array.

    >>> [a.tolist() for a in split_bracket(np.array([5, 1, 9, 3], np.uint32), 3, 5)]
    [[2], [0, 3], [5, 3]]
    """
    kernels = native.kernels()
    if kernels is not None:
        above, inside = np.empty(keys.size, np.int64), np.empty(keys.size, np.int64)
        inside_keys = np.empty(keys.size, np.uint32)
        n_above, n_inside = kernels.select_bracket(np.ascontiguousarray(keys, np.uint32),
                                                   low_key, high_key, above, inside, inside_keys)
        # Copies: the outputs are sized for the worst case; only their first pages were used.
        return above[:n_above].copy(), inside[:n_inside].copy(), inside_keys[:n_inside].copy()
    inside = np.flatnonzero(keys >= low_key)
    above = keys[inside] > high_key
    return inside[above], inside[~above], keys[inside[~above]]


def count_to_keep(density: float, numel: int) -> int:
    """``k = floor(density * numel + 1/2)``, the number of elements a density keeps.

    >>> count_to_keep(0.01, 1050)
    11
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be within [0, 1], got {density}")
    return min(numel, int(np.floor(density * numel + 0.5)))


class TopK:
    """Exact streaming top-k over chunks of keys (see module docstring).

    Feed every chunk to :meth:`count_high`, then (if :attr:`needs_low_pass`)
    every chunk to :meth:`count_low`, then every chunk, in global order, to
    :meth:`select`.  The counting passes can also run in worker threads: each computes
    :func:`high_histogram` / :meth:`low_histogram` of its chunks (after
    :meth:`prepare_low_pass`, for the second pass) and the caller adds them in with
    :meth:`add_high` / :meth:`add_low`.

    >>> keys = np.array([5, 1, 5, 9, 5], np.uint32)
    >>> topk = TopK(3)
    >>> topk.count_high(keys); topk.count_low(keys)
    >>> topk.select(keys).tolist()
    [0, 2, 3]
    """

    def __init__(self, k: int):
        self.k = k
        self._high = np.zeros(_BINS, dtype=np.int64)
        self._low = None
        self._bin = None
        self.threshold = None
        self._ties_left = 0

    def count_high(self, keys: np.ndarray) -> None:
        self.add_high(high_histogram(keys))

    def add_high(self, histogram: np.ndarray) -> None:
        self._high += histogram

    @property
    def needs_low_pass(self) -> bool:
        return 0 < self.k < int(self._high.sum())

    def prepare_low_pass(self) -> None:
        """Fix the bin the second pass looks into (after every chunk was counted high)."""
        if self._bin is None:
            self._bin, _ = _kth_bin(self._high, self.k)
            self._low = np.zeros(_BINS, dtype=np.int64)

    def count_low(self, keys: np.ndarray) -> None:
        self.prepare_low_pass()
        if self.needs_low_pass:
            self.add_low(self.low_histogram(keys))

    def low_histogram(self, keys: np.ndarray) -> np.ndarray:
        """Counts of the low 16 bits of the keys inside the threshold's bin (after
        :meth:`prepare_low_pass`)."""
        in_bin = keys[(keys >> 16) == self._bin]
        return np.bincount(in_bin & 0xFFFF, minlength=_BINS)

    def add_low(self, histogram: np.ndarray) -> None:
        self._low += histogram

    def select(self, keys: np.ndarray) -> np.ndarray:
        """Flat indices (into this chunk) of the kept elements, in order."""
        if self.threshold is None:
            self._finish()
        if self.k == 0:
            return np.empty(0, dtype=np.int64)
        if self.threshold < 0:  # keep everything
            return np.arange(keys.size, dtype=np.int64)
        above = keys > self.threshold
        if self._ties_left:
            ties = np.flatnonzero(keys == self.threshold)[:self._ties_left]
            self._ties_left -= ties.size
            above[ties] = True
        return np.flatnonzero(above)

    def _finish(self) -> None:
        total = int(self._high.sum())
        if self.k >= total:
            self.threshold, self._ties_left = -1, 0
            return
        if self.k == 0:
            self.threshold, self._ties_left = 1 << 32, 0
            return
        if self._bin is None:
            raise RuntimeError("count_low must see every chunk before select")
        high_bin, above_bin = _kth_bin(self._high, self.k)
        low_bin, above_in_bin = _kth_bin(self._low, self.k - above_bin)
        self.threshold = (high_bin << 16) | low_bin
        self._ties_left = self.k - above_bin - above_in_bin


def high_histogram(keys: np.ndarray) -> np.ndarray:
    """Counts of the high 16 bits of ``keys`` (the first counting pass; additive).

    >>> int(high_histogram(np.array([0x10000, 0x1FFFF, 5], np.uint32))[1])
    2
    """
    return np.bincount(keys >> 16, minlength=_BINS)


def _kth_bin(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element, and how many elements lie above it."""
    from_top = np.cumsum(hist[::-1])
    position = int(np.searchsorted(from_top, k))  # first index with cumulative >= k
    bin_index = hist.size - 1 - position
    above = int(from_top[position - 1]) if position else 0
    return bin_index, above


def topk_positions(keys: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k of one array of keys, ties by index (the in-memory reference).

    >>> topk_positions(np.array([5, 1, 5, 9, 5], np.uint32), 3).tolist()
    [0, 2, 3]
    """
    order = np.lexsort((np.arange(keys.size), -keys.astype(np.int64)))
    return np.sort(order[:k])


# --- One-pass global top-k: a bracket from a sample, then exact resolution of candidates ---
#
# Reading the model three times (two histogram passes, then selection) dominates compress
# time.  Instead, a cheap sampled pass estimates the k-th largest key and brackets it;
# a single full pass then sorts every element into "definitely kept" (above the bracket),
# "candidate" (inside it) or dropped; finally the exact threshold is found among the
# candidates alone.  The result is identical to :class:`TopK` -- the bracket only decides
# which elements need a second look.  If the sample misled (the k-th key lies outside the
# bracket), :func:`resolve_candidates` says so and the caller falls back to :class:`TopK`.


def bracket_bins(weighted_high: np.ndarray, k: int, sampled_above: float, margin: float = 0.12
                 ) -> tuple[int, int]:
    """High-16-bit bins ``(low_bin, high_bin)`` that should contain the k-th largest key:
    keys in higher bins are kept, keys in ``low_bin..high_bin`` are candidates.

    ``weighted_high`` is a histogram of sampled keys by high 16 bits, each sample weighted
    by the inverse of its sampling rate, so it estimates the full histogram.  The bracket
    spans estimated ranks ``k (1 - d)`` to ``k (1 + d)``, ``d = margin + 4 / sqrt(n)`` where
    ``n`` is the number of sampled keys expected above the threshold.

    >>> hist = np.zeros(1 << 16); hist[[10, 20, 30]] = [100, 100, 100]
    >>> bracket_bins(hist, 150, sampled_above=150)  # keys in bins 10..30 need a second look
    (10, 30)
    """
    spread = margin + 4.0 / np.sqrt(max(sampled_above, 1.0))
    from_top = np.cumsum(weighted_high[::-1])
    last = weighted_high.size - 1
    high_bin = last - int(np.searchsorted(from_top, k * (1.0 - spread)))
    low_bin = last - int(np.searchsorted(from_top, k * (1.0 + spread)))
    return max(low_bin, 0), max(min(high_bin, last), 0)


def resolve_candidates(candidate_keys: np.ndarray, needed: int) -> np.ndarray | None:
    """Which candidates (in global order) complete the top-k; None if the bracket missed.

    ``needed`` is ``k`` minus the elements kept above the bracket.  Ties at the threshold
    go to the earliest candidates, matching :class:`TopK`.

    >>> resolve_candidates(np.array([5, 7, 5, 6], np.uint32), 2).tolist()
    [False, True, False, True]
    """
    if needed < 0 or needed > candidate_keys.size:
        return None
    chosen = np.zeros(candidate_keys.size, dtype=bool)
    if needed == 0:
        return chosen
    threshold = np.partition(candidate_keys, candidate_keys.size - needed)[candidate_keys.size - needed]
    chosen = candidate_keys > threshold
    ties = np.flatnonzero(candidate_keys == threshold)[:needed - int(chosen.sum())]
    chosen[ties] = True
    return chosen
