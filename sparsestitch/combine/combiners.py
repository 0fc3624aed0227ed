"""From one tensor's decoded delta records to its new bits: the combiner protocol, and the
combiner of every merge.

A *combiner* (:class:`Combiner`) turns the deltas' decoded records of one tensor
(:class:`~sparsestitch.engine.walk.Stored`) into new bits, either as ``(positions, bits)``
(:meth:`Combiner.combine`) or, where it says so (:meth:`Combiner.merges_blocks`), by
merging straight into row blocks of the base (:meth:`Combiner.block_merge`).
:class:`RuleCombiner` is the one every merge uses -- the file stitcher, hot-swap and
continual composition -- so the three agree bit for bit: float tensors go through a
rule of :data:`~.rules.RULES` in the wide float type and are rounded once; a NaN
result becomes the dtype's canonical quiet NaN (:data:`CANONICAL_NAN`), so every device
agrees; non-float tensors are never merged arithmetically (a stored position takes the
fine-tuned bits, and deltas storing the same position must agree).

A stitched output records how it was made (rule, options, weights and each
delta's identity) under :data:`RECIPE_KEY` in its safetensors metadata, so a
later :func:`~sparsestitch.ops.compose.stitch_add` can check it continues the same merge.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from ..core import native
from ..core.dtypes import DType, from_wide, to_wide
from ..core.errors import OptionError, TensorMismatchError
from ..core.options import weights as checked_weights
from ..delta.format import DeltaReader, digest
from ..engine.parallel import each, parts
from ..engine.walk import Marked, Stored, put_stored
from .rules import MergeRule, TaskVector, get_rule
from .union import PositionUnion, union_of

RECIPE_KEY = "sparsestitch.stitch"

#: The bits a merged float element gets when the merge arithmetic yields NaN.
CANONICAL_NAN = {"BF16": 0x7FC0, "F16": 0x7E00, "F32": 0x7FC00000, "F64": 0x7FF8000000000000}

#: A block merge: called with the flat base bits of elements ``first, first + 1, ...`` (a
#: C-contiguous array it modifies in place) and ``first``.
BlockMergeFunction = Callable[[np.ndarray, int], None]


class Combiner(Protocol):
    """What the engine needs from whatever turns decoded records into new bits."""

    #: Whether the engine may run merges in its reader threads (False keeps device work in
    #: the writing thread).
    runs_in_readers: bool

    def combine(self, name: str, dt: DType, numel: int, stored: Sequence[Stored | None]
                ) -> tuple[np.ndarray, np.ndarray]:
        """``(sorted flat positions, new bits there)`` for one tensor."""

    def merges_blocks(self, dt: DType) -> bool:
        """Whether :meth:`block_merge` applies to tensors of this dtype."""

    def block_merge(self, dt: DType, stored: Sequence[Stored | None]) -> BlockMergeFunction:
        """The same result as :meth:`combine`, merged into row blocks in place."""

    def replaces_lone(self, dt: DType, index: int) -> bool:
        """Whether the block merge of delta ``index`` alone is its stored bits written over
        the base's (a walk may then skip building positions)."""

    def takes_marks(self, dt: DType) -> bool:
        """Whether :meth:`block_merge` takes ``bitmap`` records as
        :class:`~sparsestitch.engine.walk.Marked` (their bits, no position array)."""

    def bytes_per_position(self, dt: DType) -> int:
        """Bytes a tensor's decoded records hold per stored position until merged (the
        engine plans read-ahead and row blocks with it)."""


@dataclass(frozen=True)
class RuleCombiner:
    """The combiner applying merge ``rule`` with per-delta ``weights`` and ``options``."""

    rule: MergeRule
    weights: tuple[float, ...]
    options: dict
    runs_in_readers: ClassVar[bool] = True

    def combine(self, name: str, dt: DType, numel: int, stored: Sequence[Stored | None],
                onto: np.ndarray | None = None, union: PositionUnion | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """``(positions, new bits)`` for one tensor.

        ``onto`` holds the bits the update is added to at the sorted union of the
        stored positions (default: the base bits there); hot-swap passes the live
        values when patches are stacked.  ``union``, when the caller already has it, must
        be :func:`~.union.union_of` the stored positions (None for an absent delta: empty).
        """
        present = [s for s in stored if s is not None]
        if not present:
            return np.empty(0, np.int64), np.empty(0, dt.bits)
        nothing = np.empty(0, np.int64)
        if union is None:
            union = union_of([nothing if s is None else s.position_array() for s in stored])
        if not dt.is_float:
            return union.positions, _agreed_bits(name, present, union.positions, union.first)
        start = np.concatenate([s.base for s in present])[union.first] if onto is None else onto
        empty = TaskVector(nothing, np.empty(0, dt.wide))
        elementwise = {"union": union} if self.rule.elementwise else {}
        with np.errstate(all="ignore"):
            vectors = [empty if s is None else
                       TaskVector(s.position_array(), to_wide(s.finetuned, dt) - to_wide(s.base, dt))
                       for s in stored]
            positions, update = self.rule.update(vectors, self.weights, name, numel,
                                                 **self.options, **elementwise)
            if not elementwise:  # the rule changed a subset of the union
                start = start[np.searchsorted(union.positions, positions)]
            start_wide = to_wide(start, dt)
            merged = start_wide + update
            bits = from_wide(merged, dt)
            # NaN payloads from arithmetic differ between numpy, torch and GPUs: canonical NaN.
            bits[np.isnan(merged)] = CANONICAL_NAN[dt.name]
        if elementwise and onto is None and self.rule.block_form(self.options).lone_exact:
            _put_lone_bits(bits, stored, self.weights, union)
        return positions, bits

    def merges_blocks(self, dt: DType) -> bool:
        """Whether :meth:`block_merge` applies: elementwise rules on float tensors."""
        return dt.is_float and self.rule.elementwise

    def replaces_lone(self, dt: DType, index: int) -> bool:
        """Delta ``index`` alone keeps its bits: weight 1, lone entries exact (L&S)."""
        form = self.rule.block_form(self.options) if self.merges_blocks(dt) else None
        return form is not None and form.mean and form.lone_exact and self.weights[index] == 1

    def block_merge(self, dt: DType, stored: Sequence[Stored | None]) -> "BlockMerge":
        """The same merge as :meth:`combine`, applied row block by row block in place."""
        return BlockMerge(self, dt, stored)

    def takes_marks(self, dt: DType) -> bool:
        """The C loop of an elementwise rule (:class:`BlockMerge`) takes bitmaps."""
        return self.merges_blocks(dt) and native.float_kernels(dt.name)[0] is not None

    def merge_changed(self, dt: DType, block: np.ndarray, first: int,
                      finetuned: Sequence[np.ndarray]) -> None:
        """:meth:`block_merge` for records that store exactly the elements of ``block`` (the
        base bits of elements ``first, ...``, merged in place) whose bits differ, given every
        record's fine-tuned bits over the whole block: full fine-tunes merged straight, with
        no position arrays (the C loop; numpy builds the positions)."""
        kernels, kind = native.float_kernels(dt.name)
        if kernels is None or not self.merges_blocks(dt):
            stored = [Stored.of_changes(block, bits, first) for bits in finetuned]
            self.block_merge(dt, stored)(block, first)
            return
        form = self.rule.block_form(self.options)
        kernels.merge_changed(kind, block, [(np.ascontiguousarray(bits), w)
                                            for bits, w in zip(finetuned, self.weights)],
                              form.mean, float(form.scale), form.lone_exact,
                              CANONICAL_NAN[dt.name])

    def has_dense_form(self, dt: DType) -> bool:
        """Whether :meth:`combine_changed` applies: float tensors, a rule with a dense form."""
        return dt.is_float and self.rule.has_dense_update

    def combine_changed(self, dt: DType, base: np.ndarray, finetuned: Sequence[np.ndarray],
                        name: str = "") -> np.ndarray:
        """The merged tensor's bits from records that store exactly the elements whose bits
        differ from ``base`` (a whole tensor's bits), given every record's fine-tuned bits of
        the whole tensor: the same bits as :meth:`combine` of those records (elements no
        record changes keep the base's).  The rule's merge from the bits by compiled loops
        where it has one (:meth:`MergeRule.merged_changed`), else its dense form on whole
        task vectors (zero where a record stores nothing, as its sparse form makes them),
        then the same rounding."""
        kernels, kind = native.float_kernels(dt.name)
        if kernels is not None:
            merged = self.rule.merged_changed(kind, base, finetuned, self.weights,
                                              CANONICAL_NAN[dt.name], name=name, **self.options)
            if merged is not None:
                return merged
        return _dense_form_merge(self.rule, self.weights, self.options, dt, base, finetuned,
                                 name)

    def bytes_per_position(self, dt: DType) -> int:
        """Bytes a tensor's decoded records hold per stored position until it is merged:
        the int64 position and the fine-tuned and base bits, plus, unless the C merge runs,
        the wide task vector and the numpy merge's temporaries."""
        if self.merges_blocks(dt) and native.float_kernels(dt.name)[0] is not None:
            return 8 + 2 * dt.itemsize + 4
        return 32

    def recipe(self, readers: Sequence[DeltaReader]) -> str:
        """The metadata value describing a merge of ``readers`` with this combiner."""
        return json.dumps({"rule": self.rule.name, "options": self.options,
                           "weights": list(self.weights),
                           "deltas": [delta_identity(r) for r in readers]},
                          sort_keys=True, separators=(",", ":"))


class BlockMerge:
    """An elementwise rule merged straight into base blocks, by dense accumulation.

    The file stitcher's fast path.  Each delta's weighted task vector is
    scatter-added into a window-sized wide buffer (added as a slice for a dense
    record), with a count of the deltas covering each element; the count's nonzero
    elements are the union.  No sort and no tensor-sized union arrays: the working
    set is a few window-sized buffers that stay in cache, and every access runs in
    increasing position order.  The float operations per position, and their order,
    are those of the rule's reference math through :class:`RuleCombiner` (weights
    multiply tau, sums run in delta order, the mean divides the finished sum, one
    rounding), so the bits are identical.
    """

    #: Elements per accumulation window of the C loop (a wide sum and a count each; 16 x 1%
    #: records on 2^25 elements: 5.7 ns per position, 6.0 at 2^18).
    WINDOW = 1 << 16

    def __init__(self, combiner: RuleCombiner, dt: DType, stored: Sequence[Stored | None]):
        self.dt = dt
        self.form = combiner.rule.block_form(combiner.options)
        present = [(s, w) for s, w in zip(stored, combiner.weights) if s is not None]
        # One delta alone whose entries keep their bits (Localize-and-Stitch of one skill):
        # every stored position takes the record's bits, a copy or a scatter, no arithmetic.
        indices = [i for i, s in enumerate(stored) if s is not None]
        self.lone = stored[indices[0]] if (len(indices) == 1 and combiner.replaces_lone(
            dt, indices[0]) and isinstance(stored[indices[0]], Stored)) else None
        # The C loop (native.py) does the same operations in one pass per record; the numpy
        # code (NumpyWindowMerge) is its fallback and its reference.
        self.kernels, self.kind = native.float_kernels(dt.name)
        if self.kernels is None:
            self.numpy = NumpyWindowMerge(dt, self.form, present)
            return
        self.total = np.empty(self.WINDOW, dt.wide)
        self.count = np.empty(self.WINDOW, np.uint32)
        self.records = [(np.ascontiguousarray(s.bits), np.ascontiguousarray(s.finetuned),
                         np.ascontiguousarray(s.base), float(w), s.first, s.bit)
                        if isinstance(s, Marked) else
                        (None if s.dense else np.ascontiguousarray(s.positions, np.int64),
                         np.ascontiguousarray(s.finetuned), np.ascontiguousarray(s.base),
                         float(w), s.first) for s, w in present]

    def __call__(self, block: np.ndarray, first: int) -> None:
        """Merge into ``block``: the flat base bits of elements ``first, first + 1, ...``
        (C-contiguous: the C loop refuses anything else rather than merge into a copy)."""
        if self.lone is not None:
            if not block.flags.c_contiguous:  # as the C loop: the caller's block, not a copy
                raise ValueError("block is not C-contiguous")
            put_stored(self.lone, block, first)
        elif self.kernels is None:
            self.numpy(block, first)
        elif block.size:
            self._native(block, first, self.total, self.count)

    def in_parts(self, block: np.ndarray, first: int, threads: int) -> None:
        """``self(block, first)`` in up to ``threads`` parts merged side by side (the C
        loop's, each with its own window scratch: the elements' operations do not depend
        on where windows start, so the bits are the same)."""
        cuts = ([(0, block.size)] if self.kernels is None or self.lone is not None else
                parts(block.size, threads, self.WINDOW))
        if len(cuts) == 1:
            self(block, first)
            return
        if not block.flags.c_contiguous:
            raise ValueError("block is not C-contiguous")

        def merge_part(a: int, b: int) -> None:
            self._native(block[a:b], first + a, np.empty(self.WINDOW, self.dt.wide),
                         np.empty(self.WINDOW, np.uint32))
        each([functools.partial(merge_part, a, b) for a, b in cuts], threads)

    def _native(self, block: np.ndarray, first: int, total: np.ndarray, count: np.ndarray
                ) -> None:
        self.kernels.merge_block(self.kind, block, first, self.records, self.form.mean,
                                 float(self.form.scale), self.form.lone_exact,
                                 CANONICAL_NAN[self.dt.name], total, count)


def merge_in_parts(merge: BlockMergeFunction, block: np.ndarray, first: int,
                   threads: int) -> None:
    """``merge(block, first)``, in up to ``threads`` parts side by side where ``merge`` is
    a :class:`BlockMerge` that can (:meth:`BlockMerge.in_parts`)."""
    if isinstance(merge, BlockMerge) and threads > 1:
        merge.in_parts(block, first, threads)
    else:
        merge(block, first)


class NumpyWindowMerge:
    """:class:`BlockMerge` in numpy, window by window: the C loop's reference."""

    #: Elements per accumulation window.
    WINDOW = 1 << 18

    def __init__(self, dt: DType, form, present: list[tuple[Stored, float]]):
        self.dt = dt
        self.scale = dt.wide.type(form.scale)
        self.counting = form.mean  # the mean needs a count
        self.lone_exact = form.lone_exact
        self.total = np.empty(self.WINDOW, dt.wide)
        self.vectors = [(s.positions, s.first, _weighted_tau(s, w, dt), s.finetuned, w == 1.0)
                        for s, w in present]
        self.touched = np.empty(self.WINDOW, bool)
        if self.counting:
            self.covering = np.empty(self.WINDOW, dt.wide)
            self.ones = np.ones(self.WINDOW, dt.wide)
            self.lone = np.empty(self.WINDOW, dt.bits)
            self.unit = np.empty(self.WINDOW, bool)

    def __call__(self, block: np.ndarray, first: int) -> None:
        edges = np.arange(first, first + block.size + self.WINDOW, self.WINDOW)
        edges[-1] = min(edges[-1], first + block.size)
        if edges.size > 1 and edges[-2] == edges[-1]:
            edges = edges[:-1]
        cuts = [None if positions is None else np.searchsorted(positions, edges)
                for positions, *_ in self.vectors]
        for w in range(edges.size - 1):
            start, size = int(edges[w]), int(edges[w + 1] - edges[w])
            live = []
            for (positions, dense_first, tau, finetuned, unit), c in zip(self.vectors, cuts):
                if positions is None:  # a dense record: the slice overlapping this window
                    a = min(max(start - dense_first, 0), tau.size)
                    b = min(max(start + size - dense_first, a), tau.size)
                    if b > a:
                        live.append((slice(dense_first + a - start, dense_first + b - start),
                                     tau[a:b], finetuned[a:b], unit))
                elif c[w + 1] > c[w]:
                    live.append((positions[c[w]:c[w + 1]] - start, tau[c[w]:c[w + 1]],
                                 finetuned[c[w]:c[w + 1]], unit))
            if live:
                self._merge_window(block, start - first, size, live)

    def _merge_window(self, block: np.ndarray, offset: int, size: int, live: list) -> None:
        dt = self.dt
        total, touched = self.total[:size], self.touched[:size]
        counting = self.counting
        total.fill(0)
        if counting:
            covering = self.covering[:size]
            covering.fill(0)
        else:
            touched.fill(False)
        lone_exact = counting and self.lone_exact
        with np.errstate(all="ignore"):
            # ufunc.at with array operands is numpy's fastest scatter-add (about 1.7 ns per
            # element here against 2.7 for ``a[i] += v``); positions within one delta are
            # unique, so each is one addition, in delta order, exactly as in the rules.
            for index, tau, finetuned, unit in live:
                if lone_exact:  # the bits of the first delta at each element, and its weight
                    first_here = covering[index] == 0
                    at = index if isinstance(index, slice) else index[first_here]
                    if isinstance(index, slice):
                        self.lone[at][first_here] = finetuned[first_here]
                        self.unit[at][first_here] = unit
                    else:
                        self.lone[at] = finetuned[first_here]
                        self.unit[at] = unit
                if isinstance(index, slice):
                    total[index] += tau
                    if counting:
                        covering[index] += 1
                    else:
                        touched[index] = True
                    continue
                np.add.at(total, index, tau)
                if counting:
                    np.add.at(covering, index, self.ones[:index.size])
                else:
                    touched[index] = True
            if counting:  # nonzero() of a bool array is several times faster than of a float
                union = np.flatnonzero(np.not_equal(covering, 0, out=touched))
                update = total[union] / covering[union]
            else:
                union = np.flatnonzero(touched)
                update = self.scale * total[union]
            target = block[offset:offset + size]
            merged = to_wide(target[union], dt) + update
            bits = from_wide(merged, dt)
            bits[np.isnan(merged)] = CANONICAL_NAN[dt.name]
            if lone_exact:
                alone = (covering[union] == 1) & self.unit[union]
                bits[alone] = self.lone[union[alone]]
            target[union] = bits


def _put_lone_bits(bits: np.ndarray, stored: Sequence[Stored | None], weights: Sequence[float],
                   union: PositionUnion) -> None:
    """Where one delta of weight 1 alone covers a union position, its fine-tuned bits."""
    covering = np.zeros(bits.size, np.int32)
    for s, where in zip(stored, union.where):
        if s is not None:
            covering[where] += 1
    for s, where, weight in zip(stored, union.where, weights):
        if s is not None and weight == 1.0:
            alone = covering[where] == 1
            bits[where[alone]] = s.finetuned[alone]


def _weighted_tau(stored: Stored, weight: float, dt: DType) -> np.ndarray:
    """``wide(weight) * (wide(fine-tuned) - wide(base))``, as the rules compute it."""
    with np.errstate(all="ignore"):
        # A fresh array: to_wide returns views of the records' bits for F32 and F64.
        tau = np.subtract(to_wide(stored.finetuned, dt), to_wide(stored.base, dt))
        if weight != 1.0:  # x * 1.0 == x for every x (NaN payloads are made canonical anyway)
            tau *= dt.wide.type(weight)
    return tau


def rule_combiner(rule: str, weights: Sequence[float] | None, count: int,
                  **options) -> RuleCombiner:
    """The combiner for ``count`` deltas merged with ``rule``; checks rule, options and
    weights (:func:`~sparsestitch.core.options.weights`: finite, of any sign), which every merge of
    the API, the command line and merge configs goes through.

    >>> rule_combiner("task-arithmetic", None, 2, scale=0.5).options
    {'scale': 0.5}
    """
    merge_rule = get_rule(rule)
    resolved = merge_rule.check_options(options)
    for key, value in resolved.items():  # one value per delta (see TiesMergekit)
        if isinstance(value, tuple) and len(value) != count:
            raise OptionError(f"{key} gives {len(value)} values (one per delta) for {count} "
                              f"delta(s)", option=key)
        if isinstance(value, tuple) and len(set(value)) == 1 and not isinstance(value[0], tuple):
            resolved[key] = value[0]  # the same number for all: the recipe of the same merge
    checked = tuple(checked_weights(weights, count))
    if "layer_weights" in resolved and any(w != 1.0 for w in checked):
        raise OptionError("layer_weights gives each delta's weight: leave weights out",
                          option="layer_weights")
    return RuleCombiner(merge_rule, checked, resolved)


def delta_identity(reader: DeltaReader) -> str:
    """xxh3-64 of a delta's header: it names every record's payload checksum."""
    text = json.dumps(reader.header, sort_keys=True, separators=(",", ":"))
    return digest(text.encode("utf-8"))


def _dense_form_merge(rule: MergeRule, weights: Sequence[float], options: dict, dt: DType,
                      base: np.ndarray, finetuned: Sequence[np.ndarray], name: str) -> np.ndarray:
    """:meth:`RuleCombiner.combine_changed` through the rule's dense form: whole task vectors
    (zero where a record stores nothing), its update, rounded at the changed elements."""
    import torch

    changed = np.zeros(base.size, bool)
    wide = torch.float64 if np.dtype(dt.wide) == np.float64 else torch.float32
    deltas = torch.zeros((len(finetuned), base.size), dtype=wide)
    base_wide = to_wide(base, dt)
    with np.errstate(all="ignore"):
        for row, bits in zip(deltas, finetuned):
            stored = bits != base
            changed |= stored
            tau = row.numpy()
            np.subtract(to_wide(bits, dt), base_wide, out=tau, where=stored)
        positions = np.flatnonzero(changed)
        update = rule.dense_update(deltas, weights, name=name, **options)
        merged = base_wide[positions] + update.numpy()[positions]
        new_bits = from_wide(merged, dt)
        new_bits[np.isnan(merged)] = CANONICAL_NAN[dt.name]
    out = base.copy()
    out[positions] = new_bits
    return out


def _agreed_bits(name: str, present: Sequence[Stored], union: np.ndarray,
                 first: np.ndarray) -> np.ndarray:
    bits = np.concatenate([s.finetuned for s in present])[first]
    for stored in present:
        if not np.array_equal(bits[np.searchsorted(union, stored.position_array())],
                              stored.finetuned):
            raise TensorMismatchError(
                "deltas store different values for this non-float tensor, which cannot be "
                "averaged: merge without one of them (or exclude the tensor when compressing)",
                tensor=name)
    return bits
