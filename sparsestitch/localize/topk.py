"""Dataless localization: exact top-k of |tau| by streaming radix selection.

Ranking uses a *key* per element: the bits of |tau| as float32 (tau computed
in the wide type, see :mod:`sparsestitch.core.dtypes`), read as uint32.  For
non-negative floats the bit order is the value order, and NaN sorts above
infinity, so changed-to-NaN elements rank first (elements whose bits did not
change get key 0, even when tau = inf - inf is NaN).  Exactly ``k`` elements are
kept: every key above the threshold ``T``; among keys equal to ``T``, those with the
largest *tie order* (:func:`sparsestitch.core.tiebreak.tie_order`, a hash of tensor name
and position, so ties are spread over a tensor instead of taken from its first rows);
where tie orders are equal too, the earlier in global order (tensors by name, then
flat index).

:class:`TopK` finds the cut without holding the model: pass 1 counts keys by
their high 16 bits (a 64 Ki-bin histogram), which fixes the bin holding the
k-th largest key; pass 2 counts the low 16 bits of keys in that bin only, which
fixes ``T``.  When only some of the keys equal to ``T`` are kept, pass 3 does the
same for their tie orders (collected whole when there are few, else counted by their
high and then low 16 bits in passes 3 and 4).  The selection pass keeps what ranks
above the cut and hands the rest of the quota out in call order.  Memory is a few
histograms, whatever the model size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..core import native
from ..core.dtypes import DType, to_wide
from ..core.errors import OptionError

_BINS = 1 << 16
_INF_KEY = 0x7F800000
_MAX_KEY = 0xFFFFFFFF


def magnitude_keys(finetuned_bits: np.ndarray, base_bits: np.ndarray, dt: DType,
                   scale: float = 1.0) -> np.ndarray:
    """uint32 ranking keys of |fine-tuned - base| (times ``scale``, see :func:`scaled_keys`).

    >>> from sparsestitch.core.dtypes import dtype
    >>> f32 = dtype("F32")
    >>> a = np.array([1.0, 2.0, 3.0], np.float32).view(np.uint32)
    >>> b = np.array([1.5, 2.0, 1.0], np.float32).view(np.uint32)
    >>> magnitude_keys(a, b, f32).view(np.float32).tolist()
    [0.5, 0.0, 2.0]
    >>> inf = np.array([np.inf], np.float32).view(np.uint32)
    >>> magnitude_keys(inf, inf, f32).tolist()  # unchanged: never outranks a real change
    [0]
    >>> magnitude_keys(a, b, f32, 0.25).view(np.float32).tolist()
    [0.125, 0.0, 0.5]
    """
    kernels, kind = native.float_kernels(dt.name)
    if kernels is not None:  # the same keys, in one pass
        keys = np.empty(np.shape(finetuned_bits), np.uint32)
        kernels.magnitude_keys(kind, np.ascontiguousarray(finetuned_bits),
                               np.ascontiguousarray(base_bits), keys, float(scale))
        return keys
    return scaled_keys(_plain_keys(finetuned_bits, base_bits, dt), scale)


def scaled_keys(keys: np.ndarray, scale: float) -> np.ndarray:
    """Ranking ``keys`` (float32 bits) times ``scale``, rounded to float32 (as they are)."""
    if scale == 1.0:
        return keys
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):  # IEEE's inf, 0, NaN
        return (keys.view(np.float32) * np.float32(scale)).view(np.uint32)


def _plain_keys(finetuned_bits: np.ndarray, base_bits: np.ndarray, dt: DType) -> np.ndarray:
    """:func:`magnitude_keys` by numpy (no C loops, or ``SPARSESTITCH_NATIVE=0``)."""
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


def kept_at_least(keys: np.ndarray, threshold: int, ties: "TieCut | None",
                  order: TieOrder | None) -> np.ndarray:
    """Indices of the ``keys`` above ``threshold`` and of those equal to it that the tie cut
    ``ties`` keeps (all of them without one), in order: one pass over the keys, no mask.

    >>> kept_at_least(np.array([5, 1, 9, 3], np.uint32), 3, None, None).tolist()
    [0, 2, 3]
    """
    _, kept, kept_keys = split_bracket(keys, threshold, _MAX_KEY)
    if ties is not None:
        tied = np.flatnonzero(kept_keys == threshold)
        if tied.size:
            keep = np.ones(kept.size, bool)
            keep[tied] = False
            keep[tied[ties.select(order(kept[tied]))]] = True
            kept = kept[keep]
    return kept


def count_to_keep(density: float, numel: int) -> int:
    """``k = floor(density * numel + 1/2)``, the number of elements a density keeps.

    >>> count_to_keep(0.01, 1050)
    11
    """
    if not 0.0 <= density <= 1.0:
        raise OptionError(f"density must be within [0, 1], got {density}")
    return min(numel, int(np.floor(density * numel + 0.5)))


#: Tie orders (uint32) of a chunk's elements at the given chunk-relative indices.
TieOrder = Callable[[np.ndarray], np.ndarray]

#: Up to this many elements tied at the threshold, pass 3 collects their tie orders whole
#: (4 bytes each) instead of counting them in two passes.
TIES_HELD_WHOLE = 1 << 24


class TopK:
    """Exact streaming top-k over chunks of keys (see module docstring).

    Feed every chunk to :meth:`count_high`, then, if :attr:`needs_low_pass`, to
    :meth:`count_low`, then, while :attr:`needs_tie_pass`, to :meth:`count_ties` and
    :meth:`end_tie_pass`, then, in global order, to :meth:`select`.  (Threads: compute the
    ``*_histogram`` of each chunk after ``prepare_*_pass`` and ``add_*`` them.)

    >>> keys = np.array([5, 1, 5, 9, 5], np.uint32)
    >>> order = lambda index: np.array([3, 0, 1, 0, 2], np.uint32)[index]
    >>> topk = TopK(3)
    >>> topk.count_high(keys); topk.count_low(keys)
    >>> while topk.needs_tie_pass:
    ...     topk.count_ties(keys, order); topk.end_tie_pass()
    >>> topk.select(keys, order).tolist()  # 9, then the two 5s of largest tie order
    [0, 3, 4]
    """

    def __init__(self, k: int):
        self.k = k
        self._high = np.zeros(_BINS, dtype=np.int64)
        self._low = None
        self._bin = None
        self.bracket: LowBracket | None = None   # see bracket_around
        self._low_known = False
        self.threshold = None        # T: every key above it is kept
        self._ties: TieCut | None = None   # which keys equal to T are kept

    def count_high(self, keys: np.ndarray) -> None:
        self.add_high(self.first_histogram(keys))

    def first_histogram(self, keys: np.ndarray, order: TieOrder | None = None):
        """A chunk's :func:`high_histogram`; with a :attr:`bracket`, ``(that, the keys in the
        bracket and their tie orders, LowBracket.measure)`` (add them with :func:`add_first`)."""
        counts = high_histogram(keys)
        return counts if self.bracket is None else (counts, *self.bracket.measure(keys, order))

    def add_high(self, histogram) -> None:  # one chunk's first_histogram, or add_first's
        if isinstance(histogram, tuple):
            histogram, *inside = histogram
            self.bracket.add(*inside)
        self._high += histogram

    @property
    def needs_low_pass(self) -> bool:
        return 0 < self.k < int(self._high.sum()) and not self._low_known

    def prepare_low_pass(self) -> None:
        """Fix the second pass's bin (after the first pass); the bracket may have counted it."""
        if self._bin is None:
            self._bin, _ = _kth_bin(self._high, self.k)
            self._low = np.zeros(_BINS, dtype=np.int64)
            known = None if self.bracket is None else self.bracket.low_of(self._bin)
            if known is not None:  # and the tie orders at T, if it held those of its keys
                self._low, self._low_known = known, True
                self._find_threshold()
                self.bracket.settle(self._ties, self.threshold)
            self.bracket = None

    def count_low(self, keys: np.ndarray) -> None:
        self.prepare_low_pass()
        if self.needs_low_pass:
            self.add_low(self.low_histogram(keys))

    def low_histogram(self, keys: np.ndarray) -> np.ndarray:
        """Counts of the low 16 bits of the keys in the threshold's bin (prepare_low_pass)."""
        in_bin = keys[(keys >> 16) == self._bin]
        return np.bincount(in_bin & 0xFFFF, minlength=_BINS)

    def add_low(self, histogram: np.ndarray) -> None:
        self._low += histogram

    @property
    def needs_tie_pass(self) -> bool:
        """Whether a tie pass must run: some, not all, keys equal to T kept, the cut unknown."""
        self._find_threshold()
        return self._ties is not None and not self._ties.done

    def prepare_tie_pass(self) -> None:  # fixes what the next tie pass looks for
        self._find_threshold()

    def tie_histogram(self, keys: np.ndarray, order: TieOrder) -> np.ndarray:
        """This tie pass's measure of a chunk (see :class:`TieCut`)."""
        tied = np.flatnonzero(keys == self.threshold)
        return self._ties.measure(order(tied) if tied.size else np.empty(0, np.uint32))

    def count_ties(self, keys: np.ndarray, order: TieOrder) -> None:  # then end_tie_pass
        self.add_ties(self.tie_histogram(keys, order), final=False)

    def add_ties(self, measure: np.ndarray, final: bool = True) -> None:
        """Add a tie measure; ``final``: it covers every chunk (the pass ends here)."""
        self._ties.add(measure)
        if final:
            self.end_tie_pass()

    def end_tie_pass(self) -> None:
        self._ties.end_pass()

    @property
    def order_free(self) -> bool:
        """Whether chunks may be selected in any order, by any thread (see TieCut)."""
        if self.threshold is None and not self._high.any():
            return False  # nothing counted yet: no threshold
        self._find_threshold()
        return self._ties is None or self._ties.order_free

    def select(self, keys: np.ndarray, order: TieOrder | None = None) -> np.ndarray:
        """Flat indices (into this chunk) of the kept elements, in order."""
        self._find_threshold()  # 2^32 where k is 0: nothing is kept
        if self.threshold < 0:  # keep everything
            return np.arange(keys.size, dtype=np.int64)
        if self._ties is not None and not self._ties.done:
            raise RuntimeError("count_ties must see every chunk before select")
        return kept_at_least(keys, self.threshold, self._ties, order)

    def _find_threshold(self) -> None:
        if self.threshold is None:
            if 0 < self.k < int(self._high.sum()) and self._bin is None:
                raise RuntimeError("count_low must see every chunk before select")
            self.threshold, self._ties = _threshold(self._high, self._low, self.k)


#: Bins a bracket spans (:func:`bracket_around`), and the bracketed keys two first-pass
#: measures join as a list before they are counted into a table of them (4 MiB).
BRACKET_BINS = 5
JOINED_KEYS = 1 << 20


def add_first(total, measure):
    """Two first-pass measures of :meth:`TopK.first_histogram` added: histograms summed,
    bracketed keys joined -- or counted, past :data:`JOINED_KEYS` (a tensor whose keys
    crowd into the bracket, such as one-ulp bfloat16 steps, would otherwise be held whole)."""
    if not isinstance(total, tuple):
        return total + measure
    first, second = total[1], measure[1]
    if first.dtype == np.uint32 and second.dtype == np.uint32 and \
            first.size + second.size <= JOINED_KEYS:
        orders = None if total[2] is None or measure[2] is None else \
            np.concatenate([total[2], measure[2]])
        return total[0] + measure[0], np.concatenate([first, second]), orders
    return total[0] + measure[0], _key_table(first) + _key_table(second), None


def _key_table(inside: np.ndarray) -> np.ndarray:
    """Bracketed keys (uint32 offsets) as counts per offset; a table as it is."""
    if inside.dtype == np.int64:
        return inside
    return np.bincount(inside, minlength=BRACKET_BINS * _BINS).astype(np.int64)


def bracket_around(topk: TopK, estimate: np.ndarray, bins: int = BRACKET_BINS) -> None:
    """Before ``topk``'s first pass: have it also count the low 16 bits of keys in ``bins``
    high bins centred on the one that holds the k-th largest key by ``estimate`` (a
    histogram approximating the first pass's; nothing where every key or none is kept);
    if the k-th key lies there, its second pass is not needed (:class:`LowBracket`)."""
    if 0 < topk.k < int(estimate.sum()):
        centre, _ = _kth_bin(estimate, topk.k)
        topk.bracket = LowBracket(centre - bins // 2, bins)


class LowBracket:
    """The low-16-bit counts of the keys in ``bins`` consecutive high bins from ``first``,
    taken in :class:`TopK`'s first pass (where the k-th key is expected)."""

    def __init__(self, first: int, bins: int):
        self.first = max(0, first)
        self.bins = max(1, min(bins, BRACKET_BINS, _BINS - self.first))
        self._low: np.ndarray | None = None
        # every bracketed key with its tie order, while they are few (None: given up)
        self._pairs: list[tuple[np.ndarray, np.ndarray]] | None = []
        self._held = 0

    def measure(self, keys: np.ndarray, order: TieOrder | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """A chunk's keys in the bracket, each as its offset from the bracket's first key
        (uint32: ``(bin - first) * 65,536 + low 16 bits``), and their tie orders (``order``
        of their indices in the chunk; None without it)."""
        low = self.first << 16
        _, inside, inside_keys = split_bracket(keys, low, low + self.bins * _BINS - 1)
        return inside_keys - np.uint32(low), None if order is None else order(inside)

    def add(self, inside: np.ndarray, orders: np.ndarray | None = None) -> None:
        """Count keys given by :meth:`measure` (or a table of them, :func:`add_first`), and
        hold their tie orders while at most :data:`TIES_HELD_WHOLE` / 2 are held."""
        counts = _key_table(inside)[:self.bins * _BINS]
        self._low = counts.copy() if self._low is None else self._low + counts
        if self._pairs is not None and (orders is None or inside.dtype != np.uint32 or
                                        self._held + inside.size > TIES_HELD_WHOLE // 2):
            self._pairs = None  # the tie pass, if one is needed, reads them instead
        elif self._pairs is not None and inside.size:
            self._pairs.append((inside, orders))
            self._held += inside.size

    def settle(self, ties: "TieCut | None", threshold: int) -> None:
        """Cut ``ties`` (the keys equal to ``threshold``, inside the bracket) from the tie
        orders held, where every one of them is held: no tie pass then."""
        if ties is None or self._pairs is None or not ties.held_whole:
            return
        at = threshold - (self.first << 16)
        orders = [o[i == at] for i, o in self._pairs]
        found = np.concatenate(orders) if orders else np.empty(0, np.uint32)
        if found.size == ties.tied:
            ties.add(found)
            ties.end_pass()

    def low_of(self, high_bin: int) -> np.ndarray | None:
        """The low-16-bit counts of ``high_bin`` (as the second pass counts them), None
        outside the bracket."""
        if self._low is None or not self.first <= high_bin < self.first + self.bins:
            return None
        at = (high_bin - self.first) * _BINS
        return self._low[at:at + _BINS].copy()


def _threshold(high: np.ndarray, low: np.ndarray | None, k: int) -> tuple[int, "TieCut | None"]:
    """The threshold key T from the two passes' histograms (-1: keep all; 2^32: none), and
    the cut among keys equal to T when only some of them are kept."""
    if k >= int(high.sum()):
        return -1, None
    if k == 0:
        return 1 << 32, None
    high_bin, above_bin = _kth_bin(high, k)
    low_bin, above_in_bin = _kth_bin(low, k - above_bin)
    tied, need = int(low[low_bin]), k - above_bin - above_in_bin
    return (high_bin << 16) | low_bin, TieCut(need, tied) if need < tied else None


class TieCut:
    """Which ``need`` of ``tied`` elements (keys equal to the threshold) are kept: those of
    the largest tie orders.  Up to :data:`TIES_HELD_WHOLE` the tie orders are collected in
    one pass and cut in memory; beyond, a pass counts their high 16 bits and another the low
    16 bits in the bin found, like the key passes.  Elements whose tie order equals the cut
    ``threshold`` are handed out in call order (``quota`` of them)."""

    def __init__(self, need: int, tied: int):
        self.need, self.tied, self.held_whole = need, tied, tied <= TIES_HELD_WHOLE
        self.stage = 1                 # 1: first pass, 2: second (counting only), 3: done
        self._found = None
        self._bin = self._above = 0
        self.threshold = None
        self.quota = 0
        self.at_cut = 0                # tied elements whose tie order equals the cut

    @property
    def done(self) -> bool:
        return self.stage == 3

    def measure(self, orders: np.ndarray) -> np.ndarray:
        """This pass's measure of one chunk's tie orders (of its keys equal to T)."""
        if self.held_whole:
            return orders
        if self.stage == 1:
            return np.bincount(orders >> 16, minlength=_BINS)
        return np.bincount(orders[(orders >> 16) == self._bin] & 0xFFFF, minlength=_BINS)

    def add(self, measure: np.ndarray) -> None:
        if self._found is None:
            self._found = measure
        elif self.held_whole:
            self._found = np.concatenate([self._found, measure])
        else:
            self._found = self._found + measure

    def end_pass(self) -> None:
        found, self._found = self._found, None
        if found is None:
            found = np.empty(0, np.uint32) if self.held_whole else np.zeros(_BINS, np.int64)
        if self.held_whole:  # every tie order at hand: the cut in memory
            self.threshold = int(np.sort(found)[::-1][self.need - 1])
            self.quota = self.need - int(np.count_nonzero(found > self.threshold))
            self.at_cut = int(np.count_nonzero(found == self.threshold))
            self.stage = 3
        elif self.stage == 1:
            self._bin, self._above = _kth_bin(found, self.need)
            self.stage = 2
        else:
            low, above = _kth_bin(found, self.need - self._above)
            self.threshold = (self._bin << 16) | low
            self.quota = self.need - self._above - above
            self.at_cut = int(found[low])
            self.stage = 3

    @property
    def order_free(self) -> bool:
        """Whether every element at the cut is kept (tie orders are hashes: they are unequal
        but for collisions), so that chunks may be selected in any order, by any thread."""
        return self.done and self.quota == self.at_cut

    def select(self, orders: np.ndarray) -> np.ndarray:
        """Which of one chunk's tied elements (their tie orders, in call order) are kept."""
        if self.order_free:
            return orders >= self.threshold
        keep = orders > self.threshold
        at_cut = np.flatnonzero(orders == self.threshold)[:self.quota]
        self.quota -= at_cut.size
        keep[at_cut] = True
        return keep


def high_histogram(keys: np.ndarray) -> np.ndarray:
    """Counts of the high 16 bits of ``keys`` (the first counting pass; additive).

    >>> int(high_histogram(np.array([0x10000, 0x1FFFF, 5], np.uint32))[1])
    2
    """
    kernels = native.kernels()
    if kernels is not None:  # one pass, no shifted copy
        counts = np.zeros(_BINS, np.int64)
        kernels.key_counts(np.ascontiguousarray(keys, np.uint32), counts)
        return counts
    return np.bincount(keys >> 16, minlength=_BINS)


def _kth_bin(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element, and how many elements lie above it."""
    from_top = np.cumsum(hist[::-1])
    position = int(np.searchsorted(from_top, k))  # first index with cumulative >= k
    bin_index = hist.size - 1 - position
    above = int(from_top[position - 1]) if position else 0
    return bin_index, above


def topk_positions(keys: np.ndarray, k: int, order: np.ndarray | None = None) -> np.ndarray:
    """Exact top-k of one array of keys (any real or integer type): largest key first, then
    largest tie ``order`` (uint32, one per key; default all equal), then lowest index -- the
    in-memory reference, and the cut for keys already in memory.

    >>> topk_positions(np.array([5, 1, 5, 9, 5], np.uint32), 3).tolist()
    [0, 2, 3]
    >>> topk_positions(np.array([5, 1, 5, 9, 5], np.uint32), 3, np.array([3, 0, 1, 0, 2])).tolist()
    [0, 3, 4]
    """
    keys = np.asarray(keys)
    negated = -keys.astype(np.float64 if keys.dtype.kind == "f" else np.int64)
    columns = [np.arange(keys.size)]
    if order is not None:
        columns.append(-np.asarray(order, np.int64))
    ranking = np.lexsort(columns + [negated])
    return np.sort(ranking[:k])


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

    ``needed`` is ``k`` minus the elements kept above the bracket.  Keys are uint64
    (:func:`sparsestitch.core.tiebreak.ranked`: the key, then the tie order) or uint32; equal
    keys go to the earliest candidates, matching :class:`TopK`.

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
