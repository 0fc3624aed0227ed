"""Selectors: which positions of a fine-tune a delta keeps.

A compress run (:mod:`sparsestitch.compress`) walks every tensor of the base and the
fine-tunes in row blocks and asks one :class:`Selector` per fine-tune what to keep of
each block (:class:`TuneBlock`: the base's and the fine-tune's bits, with their ranking
keys).  A selector may first need passes over the model (:meth:`Selector.pre_passes`:
histograms, samples); those scan tensors in worker threads (:meth:`Selector.measure`,
pure, returning arrays that :meth:`Selector.merge` combines over a tensor's blocks) and
fold each tensor's total in, in tensor order (:meth:`Selector.absorb`).  The main pass
then calls :meth:`Selector.choose` on every block, in global order when the selector is
``ordered``.  A choice may leave *candidates* undecided (their keys straddle the
threshold); :meth:`Selector.resolve` picks among all of them at the end.

Strategies, one class each:

* :class:`GivenMasks` -- positions given by the caller (e.g. trained masks);
* :class:`KeepAll` -- every element (density 1.0): no ranking, no position arrays;
* :class:`PerTensorTopK` -- exact top-k of |tau| within each tensor;
* :class:`GlobalTopK` -- exact top-k over all localized tensors, two histogram passes;
* :class:`BracketedTopK` -- the same result, reading the model about once: a sample
  brackets the threshold, the main pass keeps keys above it and holds those inside as
  candidates, :meth:`~BracketedTopK.resolve` finishes exactly (or reports a miss, and
  the caller falls back to :class:`GlobalTopK`).

Tensors a selector does not rank -- non-float ones, ``--dense`` patterns -- keep every
changed element (:func:`changed_positions`); excluded tensors keep nothing.  Adding a
strategy is one class here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..core.cached import cached_attribute
from ..core.dtypes import DType
from ..core.errors import TensorMismatchError
from ..core.sizes import numel, row_items
from ..core.tiebreak import ranked, tie_order
from .activations import weighted_keys
from .stats import BINS, count_changed, key_histogram, keyed_histogram, keys_energy
from .topk import (
    TopK,
    add_first,
    bracket_around,
    bracket_bins,
    count_to_keep,
    high_histogram,
    magnitude_keys,
    resolve_candidates,
    scaled_keys,
    split_bracket,
)

#: The bracketed top-k samples every SAMPLE_EVERY-th block of about SAMPLE_BLOCK elements
#: of every localized tensor (blocks of whole rows; larger blocks cost fewer reads for the
#: same fraction sampled: 2^18 against 2^16 made the global scope's sample pass 2-4x shorter,
#: `--density 0.01 --scope global` 6% faster on a 1.83 GB model and 20% on SmolLM2-135M,
#: with brackets as tight and the same bytes).
SAMPLE_BLOCK = 1 << 18
SAMPLE_EVERY = 16
#: :class:`FidelityTopK`'s energy pass holds a tensor's sampled keys (4 bytes each, a
#: sixteenth of its elements) for tensors of at most this many sampled elements (16 MiB).
SAMPLE_HELD_LIMIT = 1 << 22


@dataclass
class TuneBlock:
    """One fine-tune's row block of one tensor, beside the base's."""

    name: str
    dt: DType
    offset: int               # flat index of the block's first element in the tensor
    base: np.ndarray          # flat base bits
    finetuned: np.ndarray     # flat fine-tuned bits
    tune: int = 0             # which fine-tune of the run
    key_scale: float = 1.0    # the selector's factor for this tensor's keys
    # each column's activation weight (:mod:`.activations`), or None: the error is plain
    column_weights: np.ndarray | None = None

    @cached_attribute
    def magnitudes(self) -> np.ndarray:
        """Ranking keys of |tau| (see :func:`~.topk.magnitude_keys`), computed once; with
        :attr:`column_weights`, of |tau| times each column's weight."""
        keys = magnitude_keys(self.finetuned, self.base, self.dt)
        if self.column_weights is None:
            return keys
        return weighted_keys(keys, self.column_weights)

    @cached_attribute
    def changed(self) -> int:
        """How many of the block's elements changed their bits, counted once."""
        return count_changed(self.finetuned.reshape(-1), self.base.reshape(-1))

    def binned_into(self, counts: np.ndarray, energy: np.ndarray) -> bool:
        """Add the block's :attr:`magnitudes` to a tensor's key histograms
        (:func:`~.stats.keyed_histogram`), computing them and :attr:`changed` in the same
        pass; False (nothing added) where they are weighted or already computed."""
        if self.column_weights is not None or "magnitudes" in self.__dict__:
            return False
        keys, changed = keyed_histogram(self.finetuned.reshape(-1), self.base.reshape(-1),
                                        self.dt, counts, energy)
        # where cached_attribute keeps them: the block's keys and count, made once
        self.__dict__["magnitudes"] = keys.reshape(np.shape(self.finetuned))
        self.__dict__.setdefault("changed", changed)
        return True

    @cached_attribute
    def keys(self) -> np.ndarray:
        """The keys the selector ranks: :attr:`magnitudes` times ``key_scale`` (as float32),
        in one pass where the magnitudes themselves are not made (nor weighted)."""
        if self.key_scale != 1.0 and self.column_weights is None and \
                "magnitudes" not in self.__dict__:
            return magnitude_keys(self.finetuned, self.base, self.dt, self.key_scale)
        return scaled_keys(self.magnitudes, self.key_scale)

    @cached_attribute
    def energy(self) -> float:
        """Sum of tau squared over the block's finite changes (float64, from the float32 keys:
        enough for a fidelity report; summed as :func:`~.stats.keys_energy` sums)."""
        return keys_energy(self.magnitudes)

    def tie_orders(self, index: np.ndarray) -> np.ndarray:
        """Tie orders (:func:`~sparsestitch.core.tiebreak.tie_order`) of the elements at
        block-relative ``index``."""
        return tie_order(self.name, index + self.offset)


@dataclass(frozen=True)
class Choice:
    """What a selector keeps of one block: block-relative indices, increasing."""

    kept: np.ndarray | None                  # kept for sure; None: every element
    candidates: np.ndarray | None = None     # decided by :meth:`Selector.resolve`
    candidate_keys: np.ndarray | None = None
    mask: np.ndarray | None = None           # ``kept`` as a bool array, where the selector had it

    @classmethod
    def nothing(cls) -> "Choice":
        return cls(np.empty(0, np.int64))


@dataclass(frozen=True)
class PrePass:
    """A pass over the localized tensors before the main one: which rows of each tensor it
    reads (None: all, in the run's blocks) and what the progress bar calls it."""

    description: str
    rows: object = None      # callable(shape) -> list of (start, stop) row ranges, or None


class Selector:
    """The interface every strategy implements (see the module docstring)."""

    #: The header's ``method``.
    method: str = ""
    #: ``choose`` must see every block once, in global order (tensors by name, then rows),
    #: from one thread.
    ordered: bool = False
    #: ``choose`` may leave candidates for :meth:`resolve`.
    undecided: bool = False
    #: Measure each tensor's change (sum of tau squared) for the fidelity report (not worth
    #: it where every element is kept: nothing is lost).
    measures_energy: bool = True

    @property
    def density(self) -> float | None:
        """The density asked for (the header's ``density``); None for given masks."""
        return None

    def pre_passes(self) -> Sequence[PrePass]:
        return ()

    def start_main_pass(self) -> None:
        """Called once after the pre-passes, before :meth:`choose` (in the caller's thread)."""

    def key_scale(self, name: str) -> float:
        """The factor this selector's keys of tensor ``name`` carry (1: plain |tau|)."""
        return 1.0

    def tensor_energy(self, name: str) -> float | None:
        """Tensor ``name``'s sum of tau squared if a pre-pass measured it (summed block by
        block as the main pass would sum it), else None."""
        return None

    def pass_needed(self, index: int) -> bool:
        """Whether pre-pass ``index`` must run (checked just before it would)."""
        return True

    def pass_tensors(self, index: int, names: Sequence[str]) -> Sequence[str]:
        """Which of the localized tensors pre-pass ``index`` reads (default: all)."""
        return names

    def tensor_measured(self, index: int, name: str, total):
        """Pre-pass ``index``'s combined measures of one tensor, finished in the worker thread
        once its last block was measured (default: as they are), before :meth:`absorb`."""
        return total

    def measure(self, index: int, block: TuneBlock) -> np.ndarray | None:
        """Pre-pass ``index`` over one block: a pure function (runs in worker threads)
        returning an array, or None when this block tells the selector nothing."""
        raise NotImplementedError

    def merge(self, index: int, total: np.ndarray, measure: np.ndarray) -> np.ndarray:
        """Two measures of one tensor combined (default: added)."""
        return total + measure

    def absorb(self, index: int, name: str, total: np.ndarray) -> None:
        """Fold in one tensor's combined measures of pre-pass ``index`` (in tensor order,
        in the caller's thread)."""
        raise NotImplementedError

    def end_pass(self, index: int) -> None:
        """Called after pre-pass ``index`` has absorbed every tensor."""

    def choose(self, block: TuneBlock) -> Choice:
        raise NotImplementedError

    def resolve(self, candidate_keys: np.ndarray, kept: int) -> np.ndarray | None:
        """Which candidates (all of them, in global order) are kept, as a bool array, given
        the number ``kept`` for sure in localized tensors; None if the selection must be
        redone exactly (the bracket missed)."""
        raise TypeError(f"{type(self).__name__} leaves no candidates")


def changed_positions(block: TuneBlock) -> Choice:
    """Every element whose bits changed (non-float and exactly stored tensors)."""
    changed = block.finetuned != block.base
    return Choice(np.flatnonzero(changed), mask=changed)


class GivenMasks(Selector):
    """Positions given as ``{tensor name: bool array}``; tensors not in it keep nothing."""

    method = "mask"

    def __init__(self, masks: Mapping, shapes: Mapping[str, tuple[int, ...]], base_path=None):
        unknown = sorted(set(masks) - set(shapes))
        if unknown:
            raise TensorMismatchError(f"masks name {len(unknown)} tensor(s) the base lacks",
                                      path=base_path, tensor=unknown[0])
        self._masks = masks
        self._shapes = shapes

    def _mask(self, name: str) -> np.ndarray | None:
        mask = self._masks.get(name)
        if mask is None:
            return None
        mask = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask)
        if tuple(mask.shape) != self._shapes[name] or mask.dtype != np.bool_:
            raise TensorMismatchError(f"mask has shape {tuple(mask.shape)} and dtype {mask.dtype}; "
                                      f"expected a bool array of shape {self._shapes[name]}",
                                      tensor=name)
        return mask.reshape(-1)

    def choose(self, block: TuneBlock) -> Choice:
        mask = self._mask(block.name)
        if mask is None:
            return Choice.nothing()
        return Choice(np.flatnonzero(mask[block.offset:block.offset + block.base.size]))


class KeepAll(Selector):
    """Every changed element of every localized tensor (a density that keeps them all): no
    ranking passes, and no position arrays where every element changed."""

    method = "changed"
    measures_energy = False

    def __init__(self, density: float = 1.0):
        self._density = density

    @property
    def density(self) -> float:
        return self._density

    def choose(self, block: TuneBlock) -> Choice:
        changed = block.finetuned != block.base
        return Choice(None) if changed.all() else Choice(np.flatnonzero(changed), mask=changed)


class _TopKSelector(Selector):
    """Exact top-k with :class:`~.topk.TopK` counters: two counting passes for the threshold
    key and, where only part of the keys equal to it are kept, one or two for their tie
    orders; then selection with the last of the quota handed out in global order (only
    where the cut falls among elements of equal tie orders, a hash collision: otherwise
    blocks may be chosen in any order, by any thread)."""

    def __init__(self, density: float):
        self._density = density

    @property
    def density(self) -> float:
        return self._density

    @property
    def ordered(self) -> bool:  # known after the pre-passes, which is when it is asked
        return not all(c.order_free for c in self._counters())

    def _counter(self, name: str) -> TopK:
        raise NotImplementedError

    def _counters(self) -> list[TopK]:
        raise NotImplementedError

    def pre_passes(self) -> Sequence[PrePass]:
        return (PrePass("localize 1/3"), PrePass("localize 2/3"), PrePass("ties"),
                PrePass("ties, second pass"))

    def pass_needed(self, index: int) -> bool:
        if index == 0:
            return True
        counters = self._counters()
        for counter in counters:  # fixes what each counter looks for before threads read it
            counter.prepare_low_pass() if index == 1 else counter.prepare_tie_pass()
        if index == 1:
            return any(c.needs_low_pass for c in counters)
        return any(c.needs_tie_pass for c in counters)

    def pass_tensors(self, index: int, names: Sequence[str]) -> Sequence[str]:
        if index < 2:
            return names
        return [n for n in names if self._counter(n).needs_tie_pass]

    def measure(self, index: int, block: TuneBlock) -> np.ndarray | None:
        counter = self._counter(block.name)
        if index == 0:
            return counter.first_histogram(block.keys, block.tie_orders)
        if index == 1:
            return counter.low_histogram(block.keys) if counter.needs_low_pass else None
        if not counter.needs_tie_pass:
            return None
        return counter.tie_histogram(block.keys, block.tie_orders)

    def merge(self, index: int, total: np.ndarray, measure: np.ndarray) -> np.ndarray:
        if index == 0:
            return add_first(total, measure)
        if index >= 2 and total.dtype == np.uint32:  # tie orders held whole
            return np.concatenate([total, measure])
        return total + measure

    def absorb(self, index: int, name: str, total: np.ndarray) -> None:
        counter = self._counter(name)
        if index == 0:
            counter.add_high(total)
        elif index == 1:
            counter.add_low(total)
        else:
            counter.add_ties(total, final=False)

    def end_pass(self, index: int) -> None:
        if index >= 2:
            for counter in self._counters():
                if counter.needs_tie_pass:
                    counter.end_tie_pass()

    def choose(self, block: TuneBlock) -> Choice:
        return Choice(self._counter(block.name).select(block.keys, block.tie_orders))


class GlobalTopK(_TopKSelector):
    """Exact global top-k of |tau| over all localized tensors (the paper's rule)."""

    method = "topk-global"

    def __init__(self, density: float, candidates: int):
        super().__init__(density)
        self._topk = TopK(count_to_keep(density, candidates))

    def _counter(self, name: str) -> TopK:
        return self._topk

    def _counters(self) -> list[TopK]:
        return [self._topk]


class PerTensorTopK(_TopKSelector):
    """Exact top-k of |tau| within each localized tensor, ``density`` of each."""

    method = "topk-per-tensor"

    def __init__(self, density: float, sizes: Mapping[str, int]):
        super().__init__(density)
        self._topk = {name: TopK(count_to_keep(density, size)) for name, size in sizes.items()}

    def _counter(self, name: str) -> TopK:
        return self._topk[name]

    def _counters(self) -> list[TopK]:
        return list(self._topk.values())


@dataclass
class _Sample:
    """The bracketed top-k's sample: a weighted histogram of the high 16 key bits."""

    histogram: np.ndarray = field(default_factory=lambda: np.zeros(1 << 16))
    count: int = 0


class BracketedTopK(Selector):
    """Exact global top-k reading the model about once (see :mod:`~.topk`): the result is
    identical to :class:`GlobalTopK` whenever :meth:`resolve` succeeds."""

    method = "topk-global"
    undecided = True

    def __init__(self, density: float, candidates: int, shapes: Mapping[str, tuple[int, ...]]):
        self._density = density
        self._k = count_to_keep(density, candidates)
        self._candidates = candidates
        self._shapes = shapes
        self._sample = _Sample()
        self._bracket: tuple[int, int] | None = None

    @property
    def density(self) -> float:
        return self._density

    @staticmethod
    def applies(density: float, candidates: int) -> bool:
        """Worth it: something to rank and something to leave out."""
        return 0 < count_to_keep(density, candidates) < candidates

    def pre_passes(self) -> Sequence[PrePass]:
        return (PrePass("sample", sample_rows),)

    def measure(self, index: int, block: TuneBlock) -> np.ndarray:
        return high_histogram(block.keys)

    def absorb(self, index: int, name: str, total: np.ndarray) -> None:
        shape = self._shapes[name]
        rows = shape[0] if shape else 1
        sampled_rows = sum(stop - start for start, stop in sample_rows(shape))
        weight = rows / sampled_rows if sampled_rows else 0.0
        self._sample.histogram += weight * total
        self._sample.count += int(total.sum())

    def _brackets(self) -> tuple[int, int]:
        if self._bracket is None:
            expected_above = self._k * self._sample.count / max(self._candidates, 1)
            low_bin, high_bin = bracket_bins(self._sample.histogram, self._k, expected_above)
            self._bracket = (low_bin << 16, (high_bin << 16) | 0xFFFF)
        return self._bracket

    def start_main_pass(self) -> None:
        """Fix the bracket (from the finished sample) before threads call :meth:`choose`."""
        self._brackets()

    def choose(self, block: TuneBlock) -> Choice:
        above, inside, inside_keys = split_bracket(block.keys, *self._brackets())
        return Choice(above, inside, ranked(inside_keys, block.name, inside + block.offset))

    def resolve(self, candidate_keys: np.ndarray, kept: int) -> np.ndarray | None:
        return resolve_candidates(candidate_keys, self._k - kept)


def sample_rows(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """The row ranges the bracketed top-k samples of a tensor: every SAMPLE_EVERY-th block of
    about SAMPLE_BLOCK elements.

    >>> sample_rows((5000, 4096))[:2]
    [(0, 64), (1024, 1088)]
    """
    rows, step = shape[0] if shape else 1, _sample_step(shape)
    return [(start, min(rows, start + step)) for start in range(0, rows, step * SAMPLE_EVERY)]


def _sample_step(shape: tuple[int, ...]) -> int:
    """Rows in each of :func:`sample_rows`' ranges."""
    return max(1, SAMPLE_BLOCK // max(1, row_items(shape)))


def sampled_keys(block: TuneBlock, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Copies of the block's :attr:`~TuneBlock.magnitudes` in the rows :func:`sample_rows`
    takes of a tensor of ``shape`` (the block: whole rows of it, from ``block.offset``)."""
    width = max(1, row_items(shape))
    rows, step = shape[0] if shape else 1, _sample_step(shape)
    period = step * SAMPLE_EVERY
    first = block.offset // width
    stop = first + block.base.size // width
    keys, parts = block.magnitudes.reshape(-1), []
    for start in range(first // period * period, stop, period):
        lo, hi = max(start, first), min(start + step, rows, stop)
        if lo < hi:
            parts.append(keys[(lo - first) * width:(hi - first) * width].copy())
    return parts


def norm_scale(energy: float) -> float:
    """The factor of a tensor's keys under :class:`_Normalized`: 1 / ||tau_t||, from its sum
    of tau squared.  An unchanged tensor keeps factor 1 (its keys are 0); an infinite norm
    cannot be divided by, and its non-finite keys rank first anyway."""
    norm = float(np.sqrt(energy))
    return 1.0 / norm if 0.0 < norm < np.inf else 1.0


class _Normalized:
    """Keys divided by their tensor's ||tau|| (after a first pass that measures it): a global
    top-k of |tau| / ||tau_t|| keeps, for a count budget, what minimizes the sum over tensors
    of the relative squared error ||tau_t - kept_t||^2 / ||tau_t||^2 -- each element's share of
    its own tensor's change, so no tensor's update is lost because another tensor (an
    embedding, a head) has larger |tau|.  A mixin before a top-k selector: its passes come
    after the energy pass (indices shifted by one)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._scales: dict[str, float] = {}
        self._energies: dict[str, float] = {}

    def pre_passes(self) -> Sequence[PrePass]:
        return (PrePass("energy"),) + tuple(super().pre_passes())

    def pass_needed(self, index: int) -> bool:
        return index == 0 or super().pass_needed(index - 1)

    def pass_tensors(self, index: int, names: Sequence[str]) -> Sequence[str]:
        return names if index == 0 else super().pass_tensors(index - 1, names)

    def measure(self, index: int, block: TuneBlock) -> np.ndarray | None:
        if index == 0:
            return np.array([block.energy])
        return super().measure(index - 1, block)

    def merge(self, index: int, total: np.ndarray, measure: np.ndarray) -> np.ndarray:
        return total + measure if index == 0 else super().merge(index - 1, total, measure)

    def absorb(self, index: int, name: str, total: np.ndarray) -> None:
        if index == 0:
            self._energies[name] = float(total[0])
            self._scales[name] = norm_scale(float(total[0]))
        else:
            super().absorb(index - 1, name, total)

    def end_pass(self, index: int) -> None:
        if index > 0:
            super().end_pass(index - 1)

    def key_scale(self, name: str) -> float:
        return self._scales.get(name, 1.0)

    def tensor_energy(self, name: str) -> float | None:
        return self._energies.get(name)


class FidelityTopK(_Normalized, BracketedTopK):
    """The default: top-k of |tau| / ||tau_t|| over all localized tensors (see
    :class:`_Normalized`), reading the model about once after the energy pass.

    The energy pass also takes the bracket's sample (:func:`sample_rows`) of each tensor of
    at most :data:`SAMPLE_HELD_LIMIT` sampled elements: their keys are held until the end of
    the tensor, when its norm is known, then scaled and counted -- the sample pass's counts,
    without its read of the model.  Larger tensors are sampled in the sample pass."""

    method = "topk-fidelity"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sampled: set[str] = set()     # by the energy pass
        self._unsampled: set[str] = set()   # left to the sample pass

    def _holds_sample(self, name: str) -> bool:
        return numel(self._shapes[name]) // SAMPLE_EVERY <= SAMPLE_HELD_LIMIT

    def measure(self, index: int, block: TuneBlock):
        if index == 0 and self._holds_sample(block.name):
            return np.array([block.energy]), sampled_keys(block, self._shapes[block.name])
        return super().measure(index, block)

    def merge(self, index: int, total, measure):
        if index == 0 and isinstance(total, tuple):
            return total[0] + measure[0], total[1] + measure[1]
        return super().merge(index, total, measure)

    def tensor_measured(self, index: int, name: str, total):
        if index == 0 and isinstance(total, tuple):
            energy, parts = total
            scale, counts = norm_scale(float(energy[0])), np.zeros(BINS, np.int64)
            for keys in parts:
                counts += high_histogram(scaled_keys(keys, scale))
            return energy, counts
        return total

    def absorb(self, index: int, name: str, total) -> None:
        if index == 0 and isinstance(total, tuple):
            super().absorb(0, name, total[0])
            BracketedTopK.absorb(self, 0, name, total[1])  # the sample pass's absorb
            self._sampled.add(name)
            return
        if index == 0:
            self._unsampled.add(name)
        super().absorb(index, name, total)

    def pass_needed(self, index: int) -> bool:
        return bool(self._unsampled) if index == 1 else super().pass_needed(index)

    def pass_tensors(self, index: int, names: Sequence[str]) -> Sequence[str]:
        if index == 1:
            return [n for n in names if n not in self._sampled]
        return super().pass_tensors(index, names)


class FidelityExactTopK(_Normalized, GlobalTopK):
    """:class:`FidelityTopK` by the exact counting passes (its fallback, and merge's).

    The energy pass also counts each tensor's keys by their high 16 bits; scaled by the
    tensor's factor (each bin by its middle value) they estimate where the k-th normalized
    key lies, and the first counting pass also counts the low 16 bits of the bins around it
    (:func:`~.topk.bracket_around`) and holds their tie orders, which leaves the second
    counting pass and the tie pass out whenever the k-th key lies there: two reads of the
    model less, the same selection."""

    method = "topk-fidelity"

    def __init__(self, density: float, candidates: int):
        super().__init__(density, candidates)
        self._estimate = np.zeros(BINS, np.int64)

    def measure(self, index: int, block: TuneBlock) -> np.ndarray | None:
        if index == 0:  # the energy as TuneBlock.energy sums it, and the bins' counts
            counts, energy = np.zeros(BINS, np.int64), np.zeros(BINS, np.float64)
            key_histogram(block.magnitudes, counts, energy)
            return np.array([float(energy.sum())]), counts
        return super().measure(index, block)

    def merge(self, index: int, total, measure):
        if index == 0:
            return total[0] + measure[0], total[1] + measure[1]
        return super().merge(index, total, measure)

    def absorb(self, index: int, name: str, total) -> None:
        super().absorb(index, name, total[0] if index == 0 else total)
        if index == 0:
            counts = total[1]
            filled = np.flatnonzero(counts)
            middles = ((filled << 16) | 0x8000).astype(np.uint32).view(np.float32)
            with np.errstate(over="ignore", invalid="ignore"):
                scaled = (middles * np.float32(self.key_scale(name))).view(np.uint32)
            scaled >>= np.uint32(16)
            np.add.at(self._estimate, scaled.astype(np.int64), counts[filled])

    def end_pass(self, index: int) -> None:
        if index == 0:
            bracket_around(self._topk, self._estimate)
            self._estimate = None
        super().end_pass(index)
