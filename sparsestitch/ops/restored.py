"""A delta read as the fine-tune it restores: a checkpoint whose rows are decoded on the fly.

Merging localizes each fine-tune before the rule (Localize-and-Stitch keeps a fraction of
each task vector).  A zoo stores *default* deltas, made for restoring (15-100% of each
tensor, quantized), and stitching those as they are merges worse than localizing them
first.  :class:`RestoredCheckpoint` lets :func:`sparsestitch.merge` (and ``stitch --keep``)
take a delta wherever it takes a fine-tune: reading rows of a tensor gives the base's rows
with the delta's values put back, exactly what :func:`sparsestitch.restore` writes, without
writing it.  So ``merge(base, deltas, keep=F)`` is bit-identical to restoring every delta
and merging the restored fine-tunes with ``keep=F``.

Rows are decoded by :class:`~sparsestitch.engine.walk.RecordRuns`, one cursor per tensor walking
forward, so reading a tensor in order (as every pass does) decodes each record once, within
the memory budget.  A read before the cursor starts it again; a read after it skips ahead
(entries decoded against zeros and dropped).  When a pass has read a tensor from its first
row to its last in order, the base rows it read are checked against the delta's base
checksum: a delta of another base raises before anything is published.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint
from ..checkpoint.safetensors_file import TensorEntry
from ..core.dtypes import dtype as lookup_dtype
from ..core.errors import CheckpointError
from ..core.sizes import numel, row_items
from ..delta.format import DeltaReader, Record
from ..engine.budget import MemoryBudget
from ..engine.fits import check_delta_fits
from ..engine.walk import BaseHash, RecordRuns, RowBlocks, Stored


class _Walk:
    """One tensor's records being decoded forward, and the base checksum of what was read."""

    def __init__(self, runs: RecordRuns, numel: int, name: str):
        self.runs, self.numel, self.at = runs, numel, 0
        self.base_hash: BaseHash | None = BaseHash(name)  # None once a read skipped rows

    def finish(self, reader: DeltaReader, name: str) -> None:
        """The tensor was read to its end: check the whole record was used and, if every row
        was read in order, that the base was the delta's."""
        try:
            self.runs.finish()
            if self.base_hash is not None:
                self.base_hash.check([(reader.path, reader.record(name))])
        finally:
            self.runs.close()

    def skip_to(self, lo: int, run: int) -> None:
        """Decode and drop the entries before element ``lo``."""
        while self.at < lo:
            hi = min(lo, self.at + run)
            self.runs.block(self.at, None, hi)
            self.at = hi
        self.base_hash = None


class _AddedRuns:
    """A tensor the delta adds (every element stored, no base), decoded forward a block at a
    time: the part of :class:`~sparsestitch.engine.walk.RecordRuns` a :class:`_Walk` uses."""

    def __init__(self, reader: DeltaReader, record: Record, budget: MemoryBudget):
        self._cursor = reader.cursor(record, memory_limit=budget.stream_bytes,
                                     run=budget.run_values)

    def block(self, lo: int, block: None, hi: int) -> list[Stored]:
        if not self._cursor.dense:  # every element, checked as any position list is
            self._cursor.next_positions(hi - lo)
        values = self._cursor.values(None, hi - lo)
        return [Stored(None, values, values, lo)]

    def finish(self) -> None:
        self._cursor.finish()

    def close(self) -> None:
        self._cursor.close()


class RestoredCheckpoint:
    """The fine-tune ``delta`` restores on ``base``, read like a :class:`Checkpoint` (names,
    entries, rows); the delta's records are checked to fit the base when opened."""

    def __init__(self, base: Checkpoint, delta: str | os.PathLike,
                 max_memory: int | str | None = None):
        self.base = base
        self.reader = DeltaReader(delta)
        try:
            check_delta_fits(base, self.reader)
        except BaseException:
            self.reader.close()
            raise
        self.path = Path(delta)
        self.hub_id = None
        self.is_folder = False
        self.metadata: dict[str, dict[str, str]] = {}
        self.budget = MemoryBudget.of(max_memory)
        self._added = {r.name: r for r in self.reader.records if r.kind == "added"}
        self.names = sorted([*base.names, *self._added])
        self._walks: dict[str, _Walk] = {}
        self._lock = threading.Lock()

    # ---- the Checkpoint interface merge and the scanner use ----

    def __enter__(self) -> "RestoredCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            walks, self._walks = list(self._walks.values()), {}
        for walk in walks:
            walk.runs.close()
        self.reader.close()

    def __contains__(self, name: str) -> bool:
        return name in self._added or name in self.base

    @property
    def display_name(self) -> str:
        return self.path.name

    @property
    def extra_files(self) -> list[Path]:
        return []

    def entry(self, name: str) -> TensorEntry:
        record = self._added.get(name)
        if record is None:
            if name not in self.base:
                raise CheckpointError("tensor not found in the restored delta", path=self.path,
                                      tensor=name)
            return self.base.entry(name)
        return TensorEntry(name, record.dtype, record.shape, 0,
                           record.numel * lookup_dtype(record.dtype).itemsize)

    def read(self, name: str) -> np.ndarray:
        entry = self.entry(name)
        return self.read_rows(name, 0, entry.shape[0] if entry.shape else 1).reshape(entry.shape)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Bits of rows ``start:stop`` of the restored tensor (a fresh flat array)."""
        entry = self.entry(name)
        per_row = row_items(entry.shape)
        lo, hi = start * per_row, stop * per_row
        added = name in self._added
        block = None if added else self.base.read_rows(name, start, stop)
        walk = self._walk(name, lo)
        if walk.base_hash is not None and block is not None:
            walk.base_hash.update(block)
        (stored,) = walk.runs.block(lo, block, hi)
        walk.at = hi
        out = block if block is not None else np.zeros(hi - lo, lookup_dtype(entry.dtype).bits)
        if stored is not None:
            if stored.dense:
                out[:] = stored.finetuned
            else:
                out[stored.positions - lo] = stored.finetuned
        if hi >= walk.numel:
            self._finish(name, walk)
        return out

    # ---- the walks ----

    def _record(self, name: str) -> Record | None:
        return self._added.get(name) or self.reader.record(name)

    def _walk(self, name: str, lo: int) -> _Walk:
        """The walk of tensor ``name`` positioned at element ``lo`` (started again if it is
        past it)."""
        with self._lock:
            walk = self._walks.get(name)
            if walk is not None and walk.at > lo:
                walk.runs.close()
                walk = None
            if walk is None:
                record = self._record(name)
                entry = self.entry(name)
                blocks = RowBlocks.of(entry.shape, lookup_dtype(entry.dtype).itemsize,
                                      self.budget.block_bytes)
                base = None if name in self._added else self.base
                runs = (_AddedRuns(self.reader, record, self.budget) if base is None else
                        RecordRuns(base, name, blocks, [self.reader], [record], self.budget))
                walk = self._walks[name] = _Walk(runs, numel(entry.shape), name)
                if base is None:  # a tensor the delta adds: no base to check
                    walk.base_hash = None
        if walk.at < lo:
            walk.skip_to(lo, self.budget.run_values)
        return walk

    def _finish(self, name: str, walk: _Walk) -> None:
        with self._lock:
            self._walks.pop(name, None)
        walk.finish(self.reader, name)
