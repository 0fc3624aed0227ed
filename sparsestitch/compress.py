"""Compress fine-tuned checkpoints into sparse delta files against their base.

A small driver over the walk: base and fine-tune row blocks
(:mod:`sparsestitch.walk`) -> a selector per fine-tune choosing what to keep
(:mod:`sparsestitch.localize.selectors`) -> :func:`~sparsestitch.format.encode_record`
-> one :class:`~sparsestitch.format.DeltaWriter` per fine-tune.  Every pass walks
tensors in name order and each tensor in row blocks of at most ``chunk_elements``
elements, reading each base block once for all fine-tunes, so memory stays near one
block per input plus the kept values of the tensors being encoded.

How many passes depends on the selector: given masks and density 1.0 need one; exact
top-k two counting passes first; the bracketed global top-k a 1/16 sample first, then
one pass whose undecided candidates are parked in a spool until the threshold is known.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._version import __version__
from .atomic import check_not_an_input
from .checkpoint import Checkpoint
from .dtypes import DType, dtype as lookup_dtype
from .errors import CheckpointError, TensorMismatchError
from .format import HEADER_KEY, DeltaWriter, Record, digest, encode_record
from .localize.selectors import (BracketedTopK, Choice, GivenMasks, GlobalTopK, KeepAll,
                                 PerTensorTopK, Selector, TuneBlock, changed_positions)
from .localize.topk import count_to_keep
from .patterns import as_patterns, matches, selected
from .progress import bar
from .readahead import DEFAULT_WORKERS, in_order
from .sizes import numel
from .spool import ArraySpool
from .walk import BaseHash, RowBlocks, read_blocks

#: Elements per block and checkpoint read at a time.  Small blocks keep the per-block
#: passes in cache: compressing the 2.27 GB benchmark model took 3.9 s with 1 << 20 against
#: 5.0 s with 1 << 23 (two threads).
CHUNK_ELEMENTS = 1 << 20
#: Threads scanning and encoding tensors ahead of the writer (0: the caller's thread).
WORKERS = min(2, DEFAULT_WORKERS)
SCOPES = ("global", "per-tensor")


@dataclass(frozen=True)
class DeltaSummary:
    """What one compress run wrote for one fine-tune."""

    path: Path
    nbytes: int
    kept: int             # kept positions over all tensors
    candidates: int       # elements of the included float tensors
    stored_tensors: int
    seconds: float

    @property
    def density(self) -> float:
        return self.kept / self.candidates if self.candidates else 0.0


def compress(base: str | os.PathLike, finetuned: str | os.PathLike | Sequence[str | os.PathLike],
             out: str | os.PathLike | Sequence[str | os.PathLike], *, density: float = 0.01,
             scope: str = "global", include: str | Iterable[str] | None = None,
             exclude: str | Iterable[str] | None = None, dense: str | Iterable[str] | None = None,
             masks: Mapping | Sequence[Mapping] | None = None, overwrite: bool = False,
             progress: bool = False, chunk_elements: int = CHUNK_ELEMENTS) -> list[DeltaSummary]:
    """Write one delta file per fine-tuned checkpoint.

    Parameters
    ----------
    base, finetuned:
        ``.safetensors`` files or Hugging Face folders; ``finetuned`` may be a list
        (the base is then read once per pass for all of them).
    out:
        One output path per fine-tune.
    density:
        Fraction of the included float elements to keep (exactly ``k = round(density * N)``).
    scope:
        ``"global"`` ranks |tau| over all included tensors together (the paper's rule);
        ``"per-tensor"`` keeps ``density`` of each tensor.
    include, exclude:
        Shell patterns over tensor names choosing which float tensors are localized;
        excluded tensors are left at the base value (not stored).
    dense:
        Patterns of tensors stored exactly (every changed element), e.g. a new head.
    masks:
        Instead of top-k, a mapping ``{tensor name: bool array}`` (or one per fine-tune)
        of positions to keep, e.g. from :func:`sparsestitch.localize.trained.learn_masks`;
        tensors not in it are left at the base value.

    Non-float tensors are never localized: those that differ from the base are stored
    exactly.  Tensors the fine-tune has and the base lacks are stored whole ("added").

    Examples
    --------
    >>> compress("base.safetensors", ["math.safetensors", "code.safetensors"],
    ...          ["math.delta", "code.delta"], density=0.01)  # doctest: +SKIP
    """
    started = time.perf_counter()
    finetuned_paths = _as_path_list(finetuned)
    out_paths = _as_path_list(out)
    if len(out_paths) != len(finetuned_paths):
        raise ValueError(f"{len(finetuned_paths)} fine-tuned checkpoints but {len(out_paths)} outputs")
    for path in out_paths:
        check_not_an_input(path, [base, *finetuned_paths])
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    mask_sets = _as_mask_list(masks, len(finetuned_paths))
    if masks is None:
        count_to_keep(density, 0)  # validates the range
    with Checkpoint(base) as base_ckpt:
        _refuse_delta(base_ckpt)
        tunes = [Checkpoint(p) for p in finetuned_paths]
        try:
            for tune in tunes:
                _refuse_delta(tune)
                _check_compatible(base_ckpt, tune)
            plan = TensorPlan.of(base_ckpt, include, exclude, dense)
            selectors = _make_selectors(plan, density, scope, mask_sets, len(tunes))
            job = CompressJob(base_ckpt, tunes, plan, chunk_elements, progress)
            results = job.run(selectors, out_paths, overwrite,
                              fallback=lambda: _make_selectors(plan, density, scope, None,
                                                               len(tunes), exact=True))
        finally:
            for tune in tunes:
                tune.close()
    seconds = time.perf_counter() - started
    return [DeltaSummary(path, r.nbytes, r.kept, plan.candidates, r.stored_tensors, seconds)
            for path, r in zip(out_paths, results)]


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


def _make_selectors(plan: TensorPlan, density: float, scope: str, mask_sets, count: int,
                    exact: bool = False) -> list[Selector]:
    """One selector per fine-tune for these options (``exact``: never the bracketed one)."""
    if mask_sets is not None:
        return [GivenMasks(masks, plan.shapes, plan.base_path) for masks in mask_sets]
    candidates = plan.candidates
    if scope == "per-tensor":
        sizes = {n: numel(plan.shapes[n]) for n in plan.localized}
        return [PerTensorTopK(density, sizes) for _ in range(count)]
    if count_to_keep(density, candidates) == candidates:
        return [KeepAll(density) for _ in range(count)]
    if not exact and BracketedTopK.applies(density, candidates):
        return [BracketedTopK(density, candidates, plan.shapes) for _ in range(count)]
    return [GlobalTopK(density, candidates) for _ in range(count)]


@dataclass
class Candidates:
    """Entries a selector left undecided in one tensor: positions, bits, ranking keys."""

    positions: np.ndarray
    finetuned: np.ndarray
    base: np.ndarray
    keys: np.ndarray          # uint64 (:func:`~sparsestitch.tiebreak.ranked`)


@dataclass
class Selection:
    """What one fine-tune keeps of one tensor: sorted positions (None: every element) and the
    fine-tuned and base bits there, plus undecided candidates."""

    positions: np.ndarray | None
    finetuned: np.ndarray
    base: np.ndarray
    candidates: Candidates | None = None


@dataclass
class _SelectionParts:
    """A :class:`Selection` gathered block by block."""

    kept: list[Choice] = field(default_factory=list)
    blocks: list[TuneBlock] = field(default_factory=list)

    def add(self, block: TuneBlock, choice: Choice) -> None:
        self.kept.append(choice)
        self.blocks.append(block)

    def finish(self, dt: DType) -> Selection:
        if self.kept and all(c.kept is None for c in self.kept):  # every element
            return Selection(None, _concat([b.finetuned for b in self.blocks], dt.bits),
                             _concat([b.base for b in self.blocks], dt.bits))
        positions, finetuned, base = [], [], []
        for choice, block in zip(self.kept, self.blocks):
            kept = np.arange(block.base.size) if choice.kept is None else choice.kept
            positions.append(kept + block.offset)
            finetuned.append(block.finetuned[kept])
            base.append(block.base[kept])
        selection = Selection(_concat(positions, np.int64), _concat(finetuned, dt.bits),
                              _concat(base, dt.bits))
        undecided = [(c, b) for c, b in zip(self.kept, self.blocks) if c.candidates is not None]
        if undecided:
            selection.candidates = Candidates(
                _concat([c.candidates + b.offset for c, b in undecided], np.int64),
                _concat([b.finetuned[c.candidates] for c, b in undecided], dt.bits),
                _concat([b.base[c.candidates] for c, b in undecided], dt.bits),
                _concat([c.candidate_keys for c, _ in undecided], np.uint64))
        return selection


@dataclass
class _Written:
    """What one writer received: its records, the kept count, the file size."""

    records: list[Record] = field(default_factory=list)
    kept: int = 0
    nbytes: int = 0

    @property
    def stored_tensors(self) -> int:
        return sum(r.kind != "base" for r in self.records)


class CompressJob:
    """One compress run: the passes over the tensors and one writer per fine-tune."""

    def __init__(self, base: Checkpoint, tunes: list[Checkpoint], plan: TensorPlan,
                 chunk_elements: int, progress: bool):
        self.base, self.tunes, self.plan = base, tunes, plan
        self.chunk_elements, self.progress = chunk_elements, progress
        self.workers = WORKERS

    def run(self, selectors: list[Selector], out_paths: list[Path], overwrite: bool,
            fallback: Callable[[], list[Selector]]) -> list[_Written]:
        writers = [DeltaWriter(p, overwrite=overwrite) for p in out_paths]
        written = [_Written() for _ in self.tunes]
        try:
            self._pre_passes(selectors)
            if not self._main_pass(selectors, writers, written):
                selectors = fallback()  # the bracket missed: redo the selection exactly
                self._pre_passes(selectors)
                self._main_pass(selectors, writers, written)
            for i, tune in enumerate(self.tunes):
                for name in tune.names:
                    if name not in self.base:
                        self._add(writers, written, i, *self._encode_added(tune, name))
            for i, writer in enumerate(writers):
                written[i].nbytes = writer.close(self._meta(i, selectors[i], written[i]))
        except BaseException as exc:
            for writer in writers:
                writer.abort(exc)
            raise
        return written

    # -- passes --

    def _pre_passes(self, selectors: list[Selector]) -> None:
        for index, prepass in enumerate(selectors[0].pre_passes()):
            if not any([s.pass_needed(index) for s in selectors]):
                continue
            wanted = set()
            for selector in selectors:
                wanted.update(selector.pass_tensors(index, self.plan.localized))
            names = [n for n in self.plan.localized if n in wanted]
            self._pre_pass(index, prepass, selectors, names)
            for selector in selectors:
                selector.end_pass(index)
        for selector in selectors:
            selector.start_main_pass()

    def _pre_pass(self, index: int, prepass, selectors: list[Selector], names: list[str]) -> None:
        """Pre-pass ``index`` over tensors ``names``: measured in worker threads, absorbed in
        tensor order."""
        def scan(name: str) -> list[np.ndarray | None]:
            totals = [None] * len(self.tunes)
            for block in self._tune_blocks(name, rows=prepass.rows):
                selector = selectors[block.tune]
                measure = selector.measure(index, block)
                if measure is not None:
                    total = totals[block.tune]
                    totals[block.tune] = measure if total is None else \
                        selector.merge(index, total, measure)
            return totals

        total_bytes = sum(self.base.entry(n).nbytes for n in names)
        with bar(total_bytes, prepass.description, self.progress) as progress:
            with closing(in_order(names, scan, workers=self.workers)) as scanned:
                for name, totals in scanned:
                    for selector, total in zip(selectors, totals):
                        if total is not None:
                            selector.absorb(index, name, total)
                    progress.update(self.base.entry(name).nbytes)

    def _main_pass(self, selectors: list[Selector], writers, written) -> bool:
        """Select and encode every tensor; False if a selector's candidates could not be
        resolved (nothing was written then)."""
        ordered = any(s.ordered for s in selectors)
        total_bytes = sum(self.base.entry(n).nbytes for n in self.base.names)
        if not selectors[0].undecided:
            def select_and_encode(name):
                base_xxh3, selections = self._select(name, selectors)
                return [self._encode(name, base_xxh3, s) for s in selections]

            with bar(total_bytes, "encode", self.progress) as progress:
                with closing(in_order(self.base.names, select_and_encode,
                                      workers=0 if ordered else self.workers)) as encoded:
                    for name, records in encoded:
                        for i, (record, payload) in enumerate(records):
                            self._add(writers, written, i, record, payload)
                        progress.update(self.base.entry(name).nbytes)
            return True
        return self._resolved_pass(selectors, writers, written, total_bytes)

    def _resolved_pass(self, selectors, writers, written, total_bytes) -> bool:
        """The main pass of selectors that leave candidates: selections are spooled until
        every candidate is known, then resolved and encoded."""
        spools = [ArraySpool(w.path) for w in writers]
        try:
            hashes, candidate_keys, candidate_counts = {}, [[] for _ in spools], {}
            kept = [0] * len(spools)
            with bar(total_bytes, "localize", self.progress) as progress:
                with closing(in_order(self.base.names, lambda n: self._select(n, selectors),
                                      workers=self.workers)) as scanned:
                    for name, (hashes[name], selections) in scanned:
                        candidate_counts[name] = self._spool(name, selections, spools,
                                                             candidate_keys, kept)
                        progress.update(self.base.entry(name).nbytes)
            for spool in spools:  # the encode pass reads them with pread
                spool.flush()
            chosen = []
            for i, selector in enumerate(selectors):
                pick = selector.resolve(_concat(candidate_keys[i], np.uint64), kept[i])
                if pick is None:
                    return False  # the sample misled; the exact path recomputes everything
                chosen.append(pick)
            first = [dict(zip(self.base.names, np.cumsum([0] + [candidate_counts[n][i]
                                                               for n in self.base.names])))
                     for i in range(len(spools))]

            def encode(name):
                records = []
                for i, spool in enumerate(spools):
                    start = int(first[i][name])
                    pick = chosen[i][start:start + candidate_counts[name][i]]
                    selection = _with_candidates(*spool.get(name), pick)
                    records.append(self._encode(name, hashes[name], selection))
                return records

            with bar(total_bytes, "encode", self.progress) as progress:
                with closing(in_order(self.base.names, encode, workers=self.workers)) as encoded:
                    for name, records in encoded:
                        for i, (record, payload) in enumerate(records):
                            self._add(writers, written, i, record, payload)
                        progress.update(self.base.entry(name).nbytes)
            return True
        finally:
            for spool in spools:
                spool.close()

    def _spool(self, name, selections, spools, candidate_keys, kept) -> list[int]:
        """Park one tensor's selections; returns the number of candidates per fine-tune."""
        counts = []
        for i, selection in enumerate(selections):
            undecided = selection.candidates
            arrays = [selection.positions, selection.finetuned, selection.base]
            if undecided is not None:
                arrays += [undecided.positions, undecided.finetuned, undecided.base]
                candidate_keys[i].append(undecided.keys)
            spools[i].put(name, arrays)
            counts.append(0 if undecided is None else undecided.positions.size)
            if name in self.plan.localized:
                kept[i] += selection.positions.size
        return counts

    # -- one tensor --

    def _tune_blocks(self, name: str, rows=None, base_hash: BaseHash | None = None):
        """Every fine-tune's :class:`TuneBlock` of tensor ``name``, block by block (the rows
        ``rows(shape)`` selects, or all of them in the run's blocks); ``tune`` is set on
        each to the fine-tune's index."""
        entry = self.base.entry(name)
        dt = lookup_dtype(entry.dtype)
        blocks = RowBlocks.of_elements(entry.shape, self.chunk_elements)
        if rows is not None:
            blocks = RowBlocks(rows(entry.shape), blocks.row_items)
        for start, stop, base_block in read_blocks(self.base, name, blocks, base_hash):
            offset = blocks.elements(start, stop)[0]
            for i, tune in enumerate(self.tunes):
                yield TuneBlock(name, dt, offset, base_block, tune.read_rows(name, start, stop), i)

    def _select(self, name: str, selectors: list[Selector]) -> tuple[str, list[Selection]]:
        """Read one tensor block by block; each fine-tune's selector picks what to keep.

        Returns the base tensor's checksum and each fine-tune's :class:`Selection`.
        """
        dt = lookup_dtype(self.base.entry(name).dtype)
        exact = self.plan.stored_exactly(name, dt)
        localized = name in self.plan.localized
        masks = isinstance(selectors[0], GivenMasks)
        parts = [_SelectionParts() for _ in self.tunes]
        base_hash = BaseHash(name)
        for block in self._tune_blocks(name, base_hash=base_hash):
            if exact:
                choice = changed_positions(block)
            elif localized or masks:
                choice = selectors[block.tune].choose(block)
            else:  # an excluded float tensor stays at the base
                choice = Choice.nothing()
            parts[block.tune].add(block, choice)
        return base_hash.hexdigest(), [p.finish(dt) for p in parts]

    def _encode(self, name: str, base_xxh3: str, selection: Selection) -> tuple[Record, bytes]:
        entry = self.base.entry(name)
        if selection.finetuned.size == 0:
            return Record(name, entry.dtype, entry.shape, "base", base_xxh3), b""
        return encode_record(name, lookup_dtype(entry.dtype), entry.shape, selection.positions,
                             selection.finetuned, selection.base, base_xxh3)

    def _encode_added(self, tune: Checkpoint, name: str) -> tuple[Record, bytes]:
        entry = tune.entry(name)
        bits = tune.read(name).reshape(-1)
        return encode_record(name, lookup_dtype(entry.dtype), entry.shape, None, bits, None, None)

    def _add(self, writers, written, i: int, record: Record, payload: bytes) -> None:
        writers[i].add(record, payload)
        written[i].records.append(record)
        written[i].kept += record.count if record.name in self.plan.localized else 0

    def _meta(self, tune_index: int, selector: Selector, written: _Written) -> dict:
        identity = [[r.name, r.dtype, list(r.shape), r.base_xxh3] for r in written.records
                    if r.kind != "added"]
        masks = isinstance(selector, GivenMasks)
        return {
            "library_version": __version__,
            "method": selector.method,
            "density": None if masks else selector.density,
            "kept": written.kept,
            "candidates": self.plan.candidates,
            "base_identity": digest(json.dumps(identity, separators=(",", ":")).encode()),
            "sources": {"base": self.base.display_name,
                        "finetuned": self.tunes[tune_index].display_name},
            "localized_tensors": None if masks else len(self.plan.localized),
            "dense_patterns": list(self.plan.dense),
        }


def _with_candidates(positions, finetuned, base, *candidates_and_pick) -> Selection:
    """A spooled selection with its chosen candidates merged in, in position order."""
    if len(candidates_and_pick) == 1:  # no candidates were spooled for this tensor
        return Selection(positions, finetuned, base)
    cand_positions, cand_finetuned, cand_base, pick = candidates_and_pick
    all_positions = np.concatenate([positions, cand_positions[pick]])
    order = np.argsort(all_positions, kind="stable")
    return Selection(all_positions[order], np.concatenate([finetuned, cand_finetuned[pick]])[order],
                     np.concatenate([base, cand_base[pick]])[order])


def _check_compatible(base: Checkpoint, tune: Checkpoint) -> None:
    missing = [n for n in base.names if n not in tune]
    if missing:
        raise TensorMismatchError(f"the fine-tuned checkpoint lacks {len(missing)} base tensor(s), "
                                  f"e.g. {missing[0]!r}; is it a fine-tune of this base?",
                                  path=tune.path, tensor=missing[0])
    for name in base.names:
        b, t = base.entry(name), tune.entry(name)
        if (b.dtype, b.shape) != (t.dtype, t.shape):
            raise TensorMismatchError(f"base has {b.dtype}{list(b.shape)}, fine-tune has "
                                      f"{t.dtype}{list(t.shape)}; convert the fine-tune to the base's "
                                      "dtype, or compare against the right base", path=tune.path,
                                      tensor=name)


def _refuse_delta(ckpt: Checkpoint) -> None:
    if any(HEADER_KEY in meta for meta in ckpt.metadata.values()):
        raise CheckpointError("this is a sparsestitch delta, not a model checkpoint", path=ckpt.path)


def _as_path_list(value) -> list[Path]:
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value]


def _as_mask_list(masks, count: int):
    if masks is None:
        return None
    if isinstance(masks, Mapping):
        masks = [masks]
    masks = list(masks)
    if len(masks) != count:
        raise ValueError(f"{count} fine-tuned checkpoints but {len(masks)} mask sets")
    return masks


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
