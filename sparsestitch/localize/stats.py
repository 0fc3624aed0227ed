"""What a planner needs to know of a tensor's change, gathered in one bounded pass.

A target (``max_error``, ``max_size``) decides per tensor how much of its task vector a delta
keeps and in how many bits.  It needs no ranking of the tensor's elements: a histogram of
their ranking keys (:func:`~.topk.magnitude_keys`, the float32 bits of |tau|) by the keys'
high 16 bits, with the count and the sum of tau squared of each bin, says exactly how many
elements and how much of the change any threshold at a bin edge keeps; a strided sample of
the elements tells what their values cost in each encoding and what quantizing them loses.
:class:`TensorStats` holds both: a few hundred kilobytes whatever the tensor's size, gathered
block by block (:meth:`TensorStats.add`), so a tensor is never held whole to plan it.

Keeping "every key at or above a bin's lower edge" is a threshold that needs no tie order:
whole bins are in or out, so the kept count and the dropped energy are known exactly before
anything is selected, and the selection pass (:func:`keys_at_least`) is a comparison.

>>> import numpy as np
>>> from sparsestitch.core.dtypes import dtype
>>> f32 = dtype("F32")
>>> base = np.zeros(6, np.float32).view(np.uint32)
>>> tune = np.array([0.1, -2.0, 0.0, 3.0, 0.5, -0.25], np.float32).view(np.uint32)
>>> stats = TensorStats.empty("w", f32, 6)
>>> stats.add(tune, base, 0)
>>> stats.changed, round(stats.energy, 4)
(5, 13.3225)
>>> cut = stats.cut(2)              # the two largest changes: 3.0 and 2.0
>>> cut.kept, round(cut.kept_energy, 4)
(2, 13.0)
>>> keys_at_least(stats_keys(tune, base, f32), cut.threshold).tolist()
[1, 3]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core import native
from ..core.dtypes import DType
from .activations import squared_weights, weighted_keys
from .topk import magnitude_keys

BINS = 1 << 16
#: Elements sampled per tensor (every ``numel // SAMPLE``-th, at least every one).
SAMPLE = 1 << 15
_INF_KEY = 0x7F800000


def stats_keys(finetuned: np.ndarray, base: np.ndarray, dt: DType) -> np.ndarray:
    """The ranking keys the statistics and the selection use (:func:`~.topk.magnitude_keys`)."""
    return magnitude_keys(np.ascontiguousarray(finetuned).reshape(-1),
                          np.ascontiguousarray(base).reshape(-1), dt)


def key_histogram(keys: np.ndarray, counts: np.ndarray, energy: np.ndarray) -> None:
    """Add ``keys`` to the histograms of their high 16 bits: ``counts`` (int64) one per key,
    ``energy`` (float64) the key's value squared for finite keys, added in key order (the C
    loop and numpy give the same bits)."""
    kernels = native.kernels()
    if kernels is not None:
        kernels.key_histogram(np.ascontiguousarray(keys, np.uint32), counts, energy)
        return
    bins = keys >> np.uint32(16)
    counts += np.bincount(bins, minlength=BINS).astype(np.int64)
    finite = keys < _INF_KEY
    values = keys[finite].view(np.float32).astype(np.float64)
    energy += np.bincount(bins[finite], weights=values * values, minlength=BINS)


def keyed_histogram(finetuned: np.ndarray, base: np.ndarray, dt: DType, counts: np.ndarray,
                    energy: np.ndarray) -> tuple[np.ndarray, int]:
    """``(keys, changed)``: :func:`stats_keys` of flat bits, added to the histograms as
    :func:`key_histogram` adds them, and :func:`count_changed` -- in one pass where the C
    loops handle the dtype (the keys binned and the bits compared while they are cached)."""
    kernels, kind = native.float_kernels(dt.name)
    if kernels is None:
        keys = stats_keys(finetuned, base, dt)
        key_histogram(keys, counts, energy)
        return keys, count_changed(finetuned, base)
    finetuned, base = np.ascontiguousarray(finetuned), np.ascontiguousarray(base)
    keys = np.empty(finetuned.size, np.uint32)
    changed = kernels.keyed_histogram(kind, finetuned, base, keys, counts, energy)
    return keys, changed


def keys_energy(keys: np.ndarray) -> float:
    """Sum of tau squared over the finite ``keys``, summed as :class:`TensorStats` sums it
    (per key bin in key order, then over the bins in bin order), so any set of whole bins of
    a tensor, and the tensor itself, give exactly what its statistics say."""
    counts, energy = np.zeros(BINS, np.int64), np.zeros(BINS, np.float64)
    key_histogram(keys, counts, energy)
    return float(energy.sum())


def keys_at_least(keys: np.ndarray, threshold: int) -> np.ndarray:
    """Indices (int64, increasing) of the ``keys`` at or above ``threshold``."""
    kernels = native.kernels()
    if kernels is not None:  # one pass into room for every key (a block's worth)
        keys = np.ascontiguousarray(keys, np.uint32)
        out = np.empty(keys.size, np.int64)
        return out[:kernels.keys_at_least(keys, threshold, out)].copy()
    return np.flatnonzero(keys >= np.uint32(threshold)).astype(np.int64)


def count_changed(finetuned: np.ndarray, base: np.ndarray) -> int:
    """How many elements' bits differ (flat arrays of the same dtype bits)."""
    kernels = native.kernels()
    if kernels is not None and finetuned.dtype.itemsize in (2, 4, 8):
        return kernels.count_unequal(np.ascontiguousarray(finetuned), np.ascontiguousarray(base))
    return int(np.count_nonzero(finetuned != base))


def select_at_least(keys: np.ndarray, threshold: int, finetuned: np.ndarray, base: np.ndarray,
                    window: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One block's selection by threshold: the fine-tuned and base bits and the keys of the
    elements whose ``keys`` are at least ``threshold`` (in order), their bits set in
    ``window`` (element ``i`` at bit ``first + i``, as :meth:`BitmapBuilder.mark` hands it)."""
    kernels = native.kernels()
    finetuned, base = finetuned.reshape(-1), base.reshape(-1)
    if kernels is not None:  # one pass, no index array
        keys = np.ascontiguousarray(keys, np.uint32)
        finetuned, base = np.ascontiguousarray(finetuned), np.ascontiguousarray(base)
        kept_ft, kept_base = np.empty_like(finetuned), np.empty_like(base)
        kept_keys = np.empty_like(keys)
        count = kernels.select_at_least(keys, threshold, finetuned, base, kept_ft, kept_base,
                                        kept_keys, window, first)
        # views: their one taker, a QuantStream, copies them into its own buffers
        return kept_ft[:count], kept_base[:count], kept_keys[:count]
    mask = keys >= np.uint32(threshold)
    bits = np.packbits(np.concatenate([np.zeros(first, bool), mask]), bitorder="little")
    window[:bits.size] |= bits
    return finetuned[mask], base[mask], keys[mask]


@dataclass(frozen=True)
class Cut:
    """Keeping every changed element whose key is at least ``threshold`` (0: every change)."""

    threshold: int
    kept: int            # elements kept
    kept_energy: float   # their sum of tau squared


@dataclass
class TensorStats:
    """One fine-tune's change of one tensor, summarized (see the module docstring)."""

    name: str
    dt: DType
    numel: int
    counts: np.ndarray = field(repr=False)     # int64 per key bin
    bin_energy: np.ndarray = field(repr=False)  # float64 per key bin
    changed: int = 0          # elements whose bits changed (a zero |tau| among them too)
    step: int = 1             # the sample takes every ``step``-th element
    sample_finetuned: list = field(default_factory=list, repr=False)
    sample_base: list = field(default_factory=list, repr=False)
    # each column's activation weight (:mod:`.activations`): the keys the blocks were added
    # with are weighted by it, and so are the sample's (:meth:`sample_keys`); None: plain
    column_weights: np.ndarray | None = field(default=None, repr=False)
    # the counts summed from the top bin down, once per tensor (None: not yet, or stale)
    _from_top: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def empty(cls, name: str, dt: DType, numel: int,
              column_weights: np.ndarray | None = None) -> "TensorStats":
        return cls(name, dt, numel, np.zeros(BINS, np.int64), np.zeros(BINS, np.float64),
                   step=max(1, numel // SAMPLE), column_weights=column_weights)

    def add(self, finetuned: np.ndarray, base: np.ndarray, offset: int,
            keys: np.ndarray | None = None, changed: int | None = None,
            binned: bool = False) -> None:
        """Fold in one block: flat bits of elements ``offset, offset + 1, ...`` (``keys``:
        their ranking keys, if already computed; ``binned``: already added to
        :attr:`counts` and :attr:`bin_energy`, by :func:`keyed_histogram`)."""
        finetuned, base = finetuned.reshape(-1), base.reshape(-1)
        if keys is None:
            keys = stats_keys(finetuned, base, self.dt)
            if self.column_weights is not None:
                keys = weighted_keys(keys, self.column_weights,
                                     np.arange(offset, offset + keys.size, dtype=np.int64))
        if not binned:
            key_histogram(keys, self.counts, self.bin_energy)
        self._from_top = None
        self.changed += count_changed(finetuned, base) if changed is None else changed
        first = (-offset) % self.step
        self.sample_finetuned.append(finetuned[first::self.step].copy())
        self.sample_base.append(base[first::self.step].copy())

    @property
    def energy(self) -> float:
        """Sum of tau squared over the finite changes (from the bins, in bin order)."""
        return float(self.bin_energy.sum())

    def cut(self, target: int) -> Cut:
        """The threshold at a bin's lower edge keeping at least ``target`` changed elements
        (every changed one when ``target`` reaches them): whole bins, the largest first."""
        if target >= self.changed:
            return Cut(0, self.changed, self.energy)
        if self._from_top is None:  # every cut of the tensor reads the same sums
            self._from_top = np.cumsum(self.counts[::-1])
        from_top = self._from_top
        above = int(np.searchsorted(from_top, max(target, 1)))  # bins above the cut's bin
        edge_bin = BINS - 1 - above
        if edge_bin == 0:  # the lowest bin holds unchanged elements: keep the changed ones
            return Cut(0, self.changed, self.energy)
        return Cut(edge_bin << 16, int(from_top[above]),
                   float(self.bin_energy[edge_bin:].sum()))

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """The strided sample: ``(fine-tuned bits, base bits)``."""
        dtype = self.dt.bits
        join = lambda parts: np.concatenate(parts) if parts else np.empty(0, dtype)  # noqa: E731
        return join(self.sample_finetuned), join(self.sample_base)

    def sample_positions(self, count: int) -> np.ndarray:
        """Flat positions of the sample's first ``count`` elements: every ``step``-th."""
        return np.arange(count, dtype=np.int64) * self.step

    def sample_keys(self, finetuned: np.ndarray, base: np.ndarray) -> np.ndarray:
        """The ranking keys of the sample (:meth:`sample`'s bits), as the blocks' keys were
        made: weighted by their columns' weights where the tensor has them."""
        keys = stats_keys(finetuned, base, self.dt)
        if self.column_weights is None:
            return keys
        return weighted_keys(keys, self.column_weights, self.sample_positions(keys.size))

    def sample_weights(self, count: int) -> np.ndarray | None:
        """What each of the sample's first ``count`` elements' squared error counts (None:
        one each)."""
        if self.column_weights is None:
            return None
        return squared_weights(self.column_weights, self.sample_positions(count))
