"""Selection: one tensor at a time, what each fine-tune's selector keeps, and the passes
over the model that get the selectors there.

:class:`TensorScanner` walks a tensor's row blocks for the base and every fine-tune
(:mod:`sparsestitch.engine.walk`), asks each fine-tune's selector (:mod:`.selectors`)
what to keep, and encodes the result (:func:`~sparsestitch.delta.format.encode_record`);
:func:`run_pre_passes` runs the selectors' counting and sampling passes; and
:class:`SpooledSelection` handles selectors that leave candidates undecided until the whole
model was seen (parking each tensor's selection in a spool, then resolving).  The driver
(:mod:`sparsestitch.compress`) only orders these and hands records to the writers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint
from ..core.dtypes import DType
from ..core.dtypes import dtype as lookup_dtype
from ..core.options import Range, number
from ..core.patterns import as_patterns, matches, selected
from ..core.progress import bar
from ..core.sizes import numel
from ..delta.codecs import PackedPositions
from ..delta.codecs.bitmap import BitmapBuilder
from ..delta.format import Record, encode_record
from ..engine.readahead import in_order
from ..engine.spool import ArraySpool
from ..engine.walk import BaseHash, RowBlocks, read_blocks
from .activations import weighted_keys
from .selectors import Choice, GivenMasks, PrePass, Selector, TuneBlock, changed_positions
from .stats import BINS, key_histogram
from .topk import magnitude_keys

#: One fine-tune's encoded record of one tensor, with its payload.
Encoded = tuple[Record, bytes]


@dataclass(frozen=True)
class TensorPlan:
    """What happens to each base tensor: localized (ranked by a selector), stored exactly
    (non-float, or matching a ``dense`` pattern: every changed element), or left out."""

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    localized: list[str]
    dense: tuple[str, ...]
    base_path: Path

    @classmethod
    def of(cls, base: Checkpoint, include, exclude, dense) -> "TensorPlan":
        include, exclude, dense = as_patterns(include), as_patterns(exclude), as_patterns(dense)
        localized = [n for n in base.names
                     if lookup_dtype(base.entry(n).dtype).is_float
                     and selected(n, include, exclude) and not matches(n, dense)]
        return cls(list(base.names), {n: base.entry(n).shape for n in base.names}, localized,
                   dense, base.path)

    @property
    def candidates(self) -> int:
        """Elements of the localized tensors."""
        return sum(numel(self.shapes[n]) for n in self.localized)

    def stored_exactly(self, name: str, dt: DType) -> bool:
        return not dt.is_float or matches(name, self.dense)


@dataclass
class Candidates:
    """Entries a selector left undecided in one tensor: positions, bits, ranking keys."""

    positions: np.ndarray
    finetuned: np.ndarray
    base: np.ndarray
    keys: np.ndarray          # uint64 (:func:`~sparsestitch.core.tiebreak.ranked`)


@dataclass
class Selection:
    """What one fine-tune keeps of one tensor: sorted positions (None: every element) and the
    fine-tuned and base bits there, plus undecided candidates."""

    positions: np.ndarray | None
    finetuned: np.ndarray
    base: np.ndarray
    candidates: Candidates | None = None
    energy: float | None = None   # sum of tau squared over the whole tensor (None: not measured)


class SelectionParts:
    """A :class:`Selection` gathered block by block: each block's kept entries are taken out
    as it comes (the block itself is not held), except when every element is kept."""

    def __init__(self):
        self.every = True        # so far, every element of every block was kept
        self.positions, self.finetuned, self.base = [], [], []
        self.candidates: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, block: TuneBlock, choice: Choice) -> None:
        if choice.kept is None and self.every:  # the whole block, as is
            self.positions.append(None)
            self.finetuned.append(block.finetuned)
            self.base.append(block.base)
            return
        if self.every and self.positions:  # earlier whole blocks: now as explicit positions
            self._explicit()
        self.every = False
        kept = np.arange(block.base.size) if choice.kept is None else choice.kept
        self.positions.append((kept + block.offset, block.offset))
        self.finetuned.append(block.finetuned[kept])
        self.base.append(block.base[kept])
        if choice.candidates is not None:
            where = choice.candidates
            self.candidates.append((where + block.offset, block.finetuned[where],
                                    block.base[where], choice.candidate_keys))

    def _explicit(self) -> None:
        start, positions = 0, []
        for bits in self.finetuned:
            positions.append((np.arange(start, start + bits.size, dtype=np.int64), start))
            start += bits.size
        self.positions = positions

    def finish(self, dt: DType) -> Selection:
        if self.every and self.positions:  # every element
            return Selection(None, _concat(self.finetuned, dt.bits), _concat(self.base, dt.bits))
        selection = Selection(_concat([p for p, _ in self.positions], np.int64),
                              _concat(self.finetuned, dt.bits), _concat(self.base, dt.bits))
        if self.candidates:
            parts = list(zip(*self.candidates))
            selection.candidates = Candidates(
                _concat(list(parts[0]), np.int64), _concat(list(parts[1]), dt.bits),
                _concat(list(parts[2]), dt.bits), _concat(list(parts[3]), np.uint64))
        return selection


class PackedParts:
    """A decided :class:`Selection` gathered block by block into arrays of the tensor's size
    (pages the kept values do not reach are never touched) and a bitmap of the kept positions:
    about ``2 * itemsize + 1/8`` bytes per element at worst, where :class:`SelectionParts`
    holds eight more per kept element (its int64 positions) and concatenates at the end."""

    def __init__(self, numel: int, dt: DType):
        self.bitmap = BitmapBuilder(numel)
        self.finetuned, self.base = np.empty(numel, dt.bits), np.empty(numel, dt.bits)
        self.count = 0

    def add(self, block: TuneBlock, choice: Choice) -> None:
        if choice.candidates is not None:
            raise AssertionError("a packed selection takes decided choices only")
        n, kept = block.base.size, choice.kept
        if kept is None:
            self.finetuned[self.count:self.count + n] = block.finetuned
            self.base[self.count:self.count + n] = block.base
            self.bitmap.add(None, n)
            self.count += n
            return
        k = kept.size
        np.take(block.finetuned, kept, out=self.finetuned[self.count:self.count + k])
        np.take(block.base, kept, out=self.base[self.count:self.count + k])
        mask = choice.mask
        if mask is None:
            mask = np.zeros(n, bool)
            mask[kept] = True
        self.bitmap.add(mask, n, k)
        self.count += k

    def finish(self, dt: DType) -> Selection:
        packed = self.bitmap.finish()
        end = self.count
        if end == self.bitmap.numel:  # every element
            return Selection(None, self.finetuned, self.base)
        return Selection(PackedPositions(packed, end), self.finetuned[:end], self.base[:end])


class TensorScanner:
    """Reads tensors of the base and the fine-tunes block by block, selects and encodes."""

    def __init__(self, base: Checkpoint, tunes: list[Checkpoint], plan: TensorPlan,
                 chunk_elements: int, quantize: dict | None = None, planner=None,
                 column_weights: Mapping[str, np.ndarray] | None = None):
        self.base, self.tunes, self.plan = base, tunes, plan
        # per tensor, its columns' activation weights (:mod:`.activations`); others: plain
        self.column_weights = dict(column_weights or {})
        self.chunk_elements = number("chunk_elements", chunk_elements, Range(1, whole=True),
                                     "elements read at a time")
        self.quantize = quantize  # {"bits", "group"}: localized tensors' values in k bits
        # Decides each localized tensor's record from a selection of every change
        # (:mod:`sparsestitch.localize.targets`); None: encode the selection as it is.
        self.planner = planner

    def tune_blocks(self, name: str, rows=None, base_hash: BaseHash | None = None,
                    scales: Sequence[float] | None = None) -> Iterator[TuneBlock]:
        """Every fine-tune's :class:`TuneBlock` of tensor ``name``, block by block (the rows
        ``rows(shape)`` selects, or all of them in the run's blocks), each fine-tune's keys
        scaled by ``scales`` (default 1)."""
        scales = scales or [1.0] * len(self.tunes)
        entry = self.base.entry(name)
        dt = lookup_dtype(entry.dtype)
        blocks = RowBlocks.of_elements(entry.shape, self.chunk_elements)
        if rows is not None:
            blocks = RowBlocks(rows(entry.shape), blocks.row_items)
        weights = self.column_weights.get(name)
        for start, stop, base_block in read_blocks(self.base, name, blocks, base_hash):
            offset = blocks.elements(start, stop)[0]
            for i, tune in enumerate(self.tunes):
                yield TuneBlock(name, dt, offset, base_block, tune.read_rows(name, start, stop), i,
                                scales[i], weights)

    def choices(self, name: str, selectors: Sequence[Selector],
                base_hash: BaseHash | None = None) -> Iterator[tuple[TuneBlock, Choice]]:
        """Every fine-tune's block of tensor ``name`` with what its selector keeps of it, block
        by block (each base block once, for every fine-tune in order)."""
        dt = lookup_dtype(self.base.entry(name).dtype)
        exact = self.plan.stored_exactly(name, dt)
        localized = name in self.plan.localized
        masks = isinstance(selectors[0], GivenMasks)
        scales = [selector.key_scale(name) for selector in selectors]
        for block in self.tune_blocks(name, base_hash=base_hash, scales=scales):
            if exact:
                yield block, changed_positions(block)
            elif localized or masks:
                yield block, selectors[block.tune].choose(block)
            else:  # an excluded float tensor stays at the base
                yield block, Choice.nothing()

    def select(self, name: str, selectors: Sequence[Selector], packed: bool = False
               ) -> tuple[str, list[Selection]]:
        """The base tensor's checksum and each fine-tune's :class:`Selection` of tensor ``name``,
        read block by block (``packed``: :class:`PackedParts`, for selections only encoded)."""
        entry = self.base.entry(name)
        dt = lookup_dtype(entry.dtype)
        exact, localized = self.plan.stored_exactly(name, dt), name in self.plan.localized
        parts = [PackedParts(entry.numel, dt) if packed else SelectionParts() for _ in self.tunes]
        measured = [localized and not exact and s.measures_energy for s in selectors]
        # a pre-pass's sum for the tensor, else summed here block by block (the same sum)
        known = [s.tensor_energy(name) if m else None for s, m in zip(selectors, measured)]
        energy, base_hash = [0.0] * len(known), BaseHash(name)
        for block, choice in self.choices(name, selectors, base_hash):
            parts[block.tune].add(block, choice)
            if measured[block.tune] and known[block.tune] is None:
                energy[block.tune] += block.energy
        selections = [p.finish(dt) for p in parts]
        for selection, total, measure, given in zip(selections, energy, measured, known):
            selection.energy = (total if given is None else given) if measure else None
        return base_hash.hexdigest(), selections

    def encode(self, name: str, base_xxh3: str, selection: Selection, tune: int = 0) -> Encoded:
        entry = self.base.entry(name)
        dt = lookup_dtype(entry.dtype)
        localized = name in self.plan.localized and dt.is_float
        if self.planner is not None and localized:
            return self.planner.encode(
                name, dt, entry.numel, selection,
                lambda kept, quantize: self.encode_as(name, base_xxh3, kept, quantize), tune)
        return self.encode_as(name, base_xxh3, selection, self.quantize if localized else None)

    def encode_as(self, name: str, base_xxh3: str, selection: Selection,
                  quantize: dict | None, rank_on_sample: bool = False) -> Encoded:
        """The record of ``selection``, values quantized with ``quantize`` (None: exact);
        ``rank_on_sample``: a planner's record (see :func:`~.delta.format.encode_record`)."""
        entry = self.base.entry(name)
        dt = lookup_dtype(entry.dtype)
        if selection.finetuned.size == 0:
            return Record(name, entry.dtype, entry.shape, "base", base_xxh3, fidelity=None if
                          selection.energy is None else fidelity_report(selection.energy, 0.0)), b""
        record, payload = encode_record(name, dt, entry.shape, selection.positions,
                                        selection.finetuned, selection.base, base_xxh3,
                                        quantize=quantize, rank_on_sample=rank_on_sample)
        return _reported(record, selection, dt, quantize, self.column_weights.get(name),
                         entry.numel), payload

    def select_and_encode(self, name: str, selectors: Sequence[Selector],
                          one_at_a_time: bool = False) -> list[Encoded]:
        """Every fine-tune's record of tensor ``name``; ``one_at_a_time`` selects and encodes
        the fine-tunes in turn, reading the base once for each (one selection held at once)."""
        packed = self.planner is None or name not in self.plan.localized
        if not one_at_a_time:
            base_xxh3, selections = self.select(name, selectors, packed)
            return [self.encode(name, base_xxh3, s, tune) for tune, s in enumerate(selections)]
        encoded = []
        for tune, selector in zip(self.tunes, selectors):
            alone = TensorScanner(self.base, [tune], self.plan, self.chunk_elements,
                                  self.quantize, self.planner)
            base_xxh3, (selection,) = alone.select(name, [selector], packed)
            encoded.append(self.encode(name, base_xxh3, selection, len(encoded)))
            del selection
        return encoded


def _reported(record: Record, selection: Selection, dt: DType, quantize: dict | None,
              weights: np.ndarray | None, numel: int) -> Record:
    """``record`` of ``selection`` with its fidelity report (where the tensor's energy is
    known, or measured here: every element kept and quantized)."""
    energy = selection.energy
    if quantize is not None and weights is not None:  # localize.planned streams those
        raise AssertionError(f"{record.name}: a weighted quantized record taken whole")
    if quantize is not None and energy is None:  # every element kept: measure it here
        energy = kept_energy(selection, dt)
    if energy is None:
        return record
    error = record.values.get("error_sq") if quantize is not None else None
    return replace(record, fidelity=fidelity_report(
        energy, kept_energy(selection, dt, weights, numel), error))


def encode_added(tune: Checkpoint, name: str) -> Encoded:
    """A tensor the fine-tune has and the base lacks: stored whole."""
    entry = tune.entry(name)
    return encode_record(name, lookup_dtype(entry.dtype), entry.shape, None,
                         tune.read(name).reshape(-1), None, None)


def kept_energy(selection: Selection, dt: DType, weights: np.ndarray | None = None,
                numel: int = 0) -> float:
    """Sum of tau squared at the kept positions (finite values), summed as the statistics
    sum (:func:`~.localize.stats.keys_energy`), a million values at a time; with column
    ``weights`` (:mod:`.activations`), of each tau times its column's weight (the positions
    of a tensor of ``numel`` elements)."""
    counts, energy = np.zeros(BINS, np.int64), np.zeros(BINS, np.float64)
    positions = None
    if weights is not None:
        positions = selection.positions
        if positions is None:
            positions = np.arange(numel, dtype=np.int64)
        elif isinstance(positions, PackedPositions):
            positions = positions.listed(numel)
    for at in range(0, selection.finetuned.size, 1 << 20):
        keys = magnitude_keys(selection.finetuned[at:at + (1 << 20)],
                              selection.base[at:at + (1 << 20)], dt)
        if positions is not None:
            keys = weighted_keys(keys, weights, positions[at:at + (1 << 20)])
        key_histogram(keys, counts, energy)
    return float(energy.sum())


def fidelity_report(energy: float, kept: float, error: float | None = None) -> dict:
    """A record's report: the share of the tensor's change (sum of tau squared) at the kept
    positions, and the relative L2 error ||tau - tau_kept|| / ||tau|| (``error``: the squared
    error, when the kept values are not exact).

    >>> fidelity_report(4.0, 3.0)
    {'energy_kept': 0.75, 'relative_error': 0.5, 'tau_norm': 2.0}
    """
    if energy <= 0:
        return {"energy_kept": 1.0, "relative_error": 0.0, "tau_norm": 0.0}
    lost = max(0.0, energy - kept) + (error or 0.0)
    return {"energy_kept": round(min(1.0, kept / energy), 9),
            "relative_error": round(float(np.sqrt(lost / energy)), 9),
            "tau_norm": float(f"{np.sqrt(energy):.7g}")}


def run_pre_passes(scanner: TensorScanner, selectors: Sequence[Selector], workers: int,
                   progress: bool) -> None:
    """Every pre-pass the selectors need, each over the localized tensors it must read:
    measured in worker threads, absorbed in tensor order."""
    localized = scanner.plan.localized
    for index, prepass in enumerate(selectors[0].pre_passes()):
        if not any([s.pass_needed(index) for s in selectors]):
            continue
        wanted = set()
        for selector in selectors:
            wanted.update(selector.pass_tensors(index, localized))
        _pre_pass(scanner, index, prepass, selectors, [n for n in localized if n in wanted],
                  workers, progress)
        for selector in selectors:
            selector.end_pass(index)
    for selector in selectors:
        selector.start_main_pass()


def _pre_pass(scanner: TensorScanner, index: int, prepass: PrePass, selectors, names, workers,
              progress) -> None:
    def scan(name: str) -> list[np.ndarray | None]:
        totals = [None] * len(scanner.tunes)
        scales = [selector.key_scale(name) for selector in selectors]
        for block in scanner.tune_blocks(name, rows=prepass.rows, scales=scales):
            selector = selectors[block.tune]
            measure = selector.measure(index, block)
            if measure is not None:
                total = totals[block.tune]
                totals[block.tune] = measure if total is None else \
                    selector.merge(index, total, measure)
        return [None if total is None else selector.tensor_measured(index, name, total)
                for selector, total in zip(selectors, totals)]

    total_bytes = sum(scanner.base.entry(n).nbytes for n in names)
    with bar(total_bytes, prepass.description, progress) as progress_bar:
        with closing(in_order(names, scan, workers=workers)) as scanned:
            for name, totals in scanned:
                for selector, total in zip(selectors, totals):
                    if total is not None:
                        selector.absorb(index, name, total)
                progress_bar.update(scanner.base.entry(name).nbytes)


class SpooledSelection:
    """The main pass of selectors that leave candidates: every tensor's selection is parked
    in a spool beside its output (:meth:`collect`) until all candidates are known, then
    resolved and encoded (:meth:`encoded`)."""

    def __init__(self, scanner: TensorScanner, selectors: Sequence[Selector],
                 outputs: Sequence[Path], workers: int, progress: bool):
        self.scanner, self.selectors = scanner, selectors
        self.workers, self.progress = workers, progress
        self.spools = [ArraySpool(path) for path in outputs]
        self.names = scanner.base.names
        self.hashes: dict[str, str] = {}
        self.candidate_keys: list[list[np.ndarray]] = [[] for _ in outputs]
        self.candidate_counts: dict[str, list[int]] = {}
        self.energies: dict[str, list[float | None]] = {}
        self.kept = [0] * len(outputs)
        self.chosen: list[np.ndarray] = []

    def close(self) -> None:
        for spool in self.spools:
            spool.close()

    def collect(self) -> bool:
        """Select every tensor into the spools and resolve the candidates; False if a
        selector could not (its sample misled it: redo the selection exactly)."""
        total_bytes = sum(self.scanner.base.entry(n).nbytes for n in self.names)
        with bar(total_bytes, "localize", self.progress) as progress:
            select = lambda n: self.scanner.select(n, self.selectors)  # noqa: E731
            with closing(in_order(self.names, select, workers=self.workers)) as scanned:
                for name, (self.hashes[name], selections) in scanned:
                    self._park(name, selections)
                    progress.update(self.scanner.base.entry(name).nbytes)
        for spool in self.spools:  # the encode pass reads them with pread
            spool.flush()
        for i, selector in enumerate(self.selectors):
            pick = selector.resolve(_concat(self.candidate_keys[i], np.uint64), self.kept[i])
            if pick is None:
                return False
            self.chosen.append(pick)
        return True

    def _park(self, name: str, selections: list[Selection]) -> None:
        counts = []
        for i, selection in enumerate(selections):
            undecided = selection.candidates
            arrays = [selection.positions, selection.finetuned, selection.base]
            if undecided is not None:
                arrays += [undecided.positions, undecided.finetuned, undecided.base]
                self.candidate_keys[i].append(undecided.keys)
            self.spools[i].put(name, arrays)
            counts.append(0 if undecided is None else undecided.positions.size)
            if name in self.scanner.plan.localized:
                self.kept[i] += selection.positions.size
        self.candidate_counts[name] = counts
        self.energies[name] = [selection.energy for selection in selections]

    def encoded(self) -> Iterator[tuple[str, list[Encoded]]]:
        """``(name, every fine-tune's record)`` in tensor order, encoded in worker threads."""
        first = [dict(zip(self.names, np.cumsum([0] + [self.candidate_counts[n][i]
                                                       for n in self.names])))
                 for i in range(len(self.spools))]

        def encode(name: str) -> list[Encoded]:
            records = []
            for i, spool in enumerate(self.spools):
                start = int(first[i][name])
                pick = self.chosen[i][start:start + self.candidate_counts[name][i]]
                selection = _with_candidates(*spool.get(name), pick)
                selection.energy = self.energies[name][i]
                records.append(self.scanner.encode(name, self.hashes[name], selection, i))
            return records

        with closing(in_order(self.names, encode, workers=self.workers)) as encoded:
            yield from encoded


def _with_candidates(positions, finetuned, base, *candidates_and_pick) -> Selection:
    """A spooled selection with its chosen candidates merged in, in position order."""
    if len(candidates_and_pick) == 1:  # no candidates were spooled for this tensor
        return Selection(positions, finetuned, base)
    cand_positions, cand_finetuned, cand_base, pick = candidates_and_pick
    all_positions = np.concatenate([positions, cand_positions[pick]])
    order = np.argsort(all_positions, kind="stable")
    return Selection(all_positions[order], np.concatenate([finetuned, cand_finetuned[pick]])[order],
                     np.concatenate([base, cand_base[pick]])[order])


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    """The parts joined, each released once copied (``parts`` is emptied): at most one
    part and the result are held at once, not all parts and the result."""
    if len(parts) == 1:
        return parts.pop()
    total = sum(part.size for part in parts)
    out = np.empty(total, dtype=parts[0].dtype if parts else dtype)
    at = 0
    while parts:
        part = parts.pop(0)
        out[at:at + part.size] = part
        at += part.size
    return out
