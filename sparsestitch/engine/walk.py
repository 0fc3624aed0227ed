"""The one way to walk tensors: row blocks within a budget, base blocks hashed as they are
read, delta records decoded (whole, or the part inside one block), and the checks that a
delta fits a base.

Every consumer -- compress, restore, stitch, continual composition, hot-swap and verify --
reads base tensors and decodes records through this module, so the base identity check, the
block arithmetic and the handling of dense records live in one place:

* :class:`RowBlocks` cuts a tensor into blocks of whole rows (along the first dimension).
* :func:`read_blocks` reads a base tensor block by block, feeding a :class:`BaseHash`,
  whose :meth:`~BaseHash.check` compares the bytes read with the checksum every record
  carries (a delta made from another base fails before anything is published).
* :class:`Stored` is one delta's decoded entries in a tensor: sorted flat positions and the
  fine-tuned and base bits there.  A record that stores every element (positions codec
  ``all``: density 1.0 and exact records) has ``positions=None`` -- no position array is
  ever built for it, and merges can treat it as a dense array.
* :func:`decode_tensor` and :func:`decode_at` decode records whole against the base bits
  they need (the value codecs predict from the base); :class:`RecordRuns` decodes records
  too large for the budget alongside a walk over the row blocks, a run at a time
  (:func:`kept_totals` gives a codec that is not elementwise, ``ulp``, what it needs
  besides), and :func:`added_runs` does the same for tensors a delta adds.
* :func:`added_records` and :func:`output_shards` plan an output (what fits what:
  :mod:`.fits`)
  before any byte of it is written.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from ..checkpoint import Checkpoint, OutputTensor, Shard
from ..core.dtypes import dtype as lookup_dtype
from ..core.errors import BaseMismatchError, CheckpointError, TensorMismatchError
from ..core.sizes import row_items
from ..delta.codecs.bitmap import gather_marked, marked_count, put_marked
from ..delta.format import HEADER_KEY, DeltaReader, Record, RecordCursor
from .budget import MemoryBudget
from .parallel import PARALLEL_MIN, each


@dataclass(frozen=True)
class RowBlocks:
    """A tensor cut into blocks of whole rows (along the first dimension).

    >>> blocks = RowBlocks.of((10, 4), itemsize=2, block_bytes=24)
    >>> blocks.bounds, blocks.elements(3, 6)
    ([(0, 3), (3, 6), (6, 9), (9, 10)], (12, 24))
    """

    bounds: list[tuple[int, int]]   # (first row, row after the last)
    row_items: int                  # elements per row

    @classmethod
    def of(cls, shape: tuple[int, ...], itemsize: int, block_bytes: int) -> "RowBlocks":
        """Blocks of at most ``block_bytes`` bytes each (at least one row)."""
        return cls.of_elements(shape, max(1, block_bytes // max(1, itemsize)))

    @classmethod
    def of_elements(cls, shape: tuple[int, ...], elements: int) -> "RowBlocks":
        """Blocks of at most ``elements`` elements each (at least one row)."""
        rows = shape[0] if shape else 1
        per_row = row_items(shape)
        step = max(1, elements // max(1, per_row))
        return cls([(s, min(rows, s + step)) for s in range(0, rows, step)] or [(0, 0)], per_row)

    def elements(self, start: int, stop: int) -> tuple[int, int]:
        """Flat element range ``[lo, hi)`` of rows ``start:stop``."""
        return start * self.row_items, stop * self.row_items


#: What a base checksum mismatch means, in the user's terms.
MISMATCH = ("the base tensor's checksum differs from the one the delta was made from: this "
            "delta belongs to another base (or the base was modified)")


class BaseHash:
    """xxh3-64 of one base tensor's bytes, fed block by block in order as they are read,
    and compared with the base checksum that delta records carry."""

    def __init__(self, name: str):
        self.name = name
        self._digest = xxhash.xxh3_64()

    def update(self, bits: np.ndarray) -> None:
        self._digest.update(memoryview(np.ascontiguousarray(bits).reshape(-1).view(np.uint8)))

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def check(self, sources: Iterable[tuple[str | os.PathLike, Record | None]],
              message: str = MISMATCH) -> None:
        """Raise :class:`BaseMismatchError` naming the first delta (its path) whose record of
        this tensor was made from other bytes; records that are None are skipped."""
        found = self.hexdigest()
        for path, record in sources:
            if record is not None and record.base_xxh3 != found:
                raise BaseMismatchError(message, path=path, tensor=self.name)


def read_blocks(ckpt: Checkpoint, name: str, blocks: RowBlocks, base_hash: BaseHash | None = None
                ) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(first row, row after the last, flat bits)`` of tensor ``name`` block by block (fresh
    arrays the caller owns), each fed to ``base_hash`` first."""
    bits = lookup_dtype(ckpt.entry(name).dtype).bits
    for start, stop in blocks.bounds:
        block = ckpt.read_rows(name, start, stop) if stop > start else np.empty(0, bits)
        if base_hash is not None:
            base_hash.update(block)
        yield start, stop, block


@dataclass(frozen=True)
class Stored:
    """One delta's decoded entries in one tensor, or in one block of it.

    ``positions`` are sorted flat positions in the tensor; ``None`` means every element of
    ``first, first + 1, ...`` (a dense record: no position array is built).  ``finetuned``
    and ``base`` are the bits at those positions.
    """

    positions: np.ndarray | None
    finetuned: np.ndarray
    base: np.ndarray
    first: int = 0

    @property
    def dense(self) -> bool:
        return self.positions is None

    @property
    def count(self) -> int:
        return int(self.finetuned.size)

    @classmethod
    def of_changes(cls, base: np.ndarray, finetuned: np.ndarray, first: int = 0
                   ) -> "Stored | None":
        """The entries a record keeping exactly the changed elements holds in a block of
        ``base`` bits starting at element ``first`` (None: nothing changed)."""
        changed = np.flatnonzero(finetuned != base)
        if not changed.size:
            return None
        return cls(changed + first, finetuned[changed], base[changed])

    def position_array(self) -> np.ndarray:
        """The positions as an array, built for a dense record (for code without a dense path)."""
        if self.positions is not None:
            return self.positions
        return np.arange(self.first, self.first + self.count, dtype=np.int64)

    def within(self, lo: int, hi: int) -> "Stored":
        """The entries at positions in ``[lo, hi)``."""
        if self.positions is None:
            a = min(max(lo - self.first, 0), self.count)
            b = min(max(hi - self.first, a), self.count)
            return Stored(None, self.finetuned[a:b], self.base[a:b], self.first + a)
        a, b = (int(x) for x in np.searchsorted(self.positions, [lo, hi]))
        return Stored(self.positions[a:b], self.finetuned[a:b], self.base[a:b])


@dataclass(frozen=True)
class Marked:
    """One delta's decoded entries given by a bitmap instead of positions: bit ``bit`` of
    ``bits`` (uint8) is element ``first``, and ``finetuned`` and ``base`` are the bits of
    the marked elements from there on.  Combiners that say so take it (``takes_marks``: the
    C block merge, a restore's put-back, :func:`put_marks`); it spares a record of many
    entries its int64 positions, their gathers and their order check."""

    bits: np.ndarray
    bit: int
    finetuned: np.ndarray
    base: np.ndarray
    first: int = 0

    @property
    def count(self) -> int:
        return int(self.finetuned.size)


def put_stored(stored: Stored, block: np.ndarray, first: int) -> None:
    """``stored``'s fine-tuned bits written into ``block`` (elements ``first, ...``) at its
    positions there (a restore; one delta whose entries keep their bits)."""
    part = stored.within(first, first + block.size)
    if part.dense:
        block[part.first - first:part.first - first + part.count] = part.finetuned
    elif part.count:
        block[part.positions - first] = part.finetuned


def put_marks(marked: Marked, block: np.ndarray, first: int, before: int | None = None) -> int:
    """``marked``'s fine-tuned bits written into ``block`` (elements ``first, ...``) where its
    bits are set (a restore's :func:`put_stored` for a bitmap record); ``before``: how many
    marked elements precede ``first`` (None: counted here).  Returns how many precede the
    block's end, the next block's ``before``."""
    start = marked.bit + first - marked.first
    if before is None:
        before = marked_count(marked.bits, marked.bit, first - marked.first)
    window = marked.bits[start // 8:(start + block.size + 7) // 8]
    count = marked_count(window, start % 8, block.size)
    put_marked(window, start % 8, block, marked.finetuned[before:before + count])
    return before + count


def stored_positions(reader: DeltaReader, record: Record, payload: bytes | None = None
                     ) -> np.ndarray | None:
    """A sparse record's checked flat positions; None for a record of every element."""
    if reader.stores_all(record):
        return None
    return reader.positions(record, payload)


def decode_at(reader: DeltaReader, record: Record, positions: np.ndarray | None,
              base_kept: np.ndarray, payload: bytes | None = None) -> Stored:
    """The record's entries, given its ``positions`` (from :func:`stored_positions`) and the
    base bits there (the whole tensor's for a dense record)."""
    values = reader.values(record, base_kept, payload)
    return Stored(positions, values, base_kept)


def decode_tensor(base: Checkpoint, readers: Sequence[DeltaReader], name: str, blocks: RowBlocks,
                  marked: bool = False, threads: int = 1
                  ) -> tuple[list[Stored | Marked | None], np.ndarray | None]:
    """Read base tensor ``name`` block by block, check every delta's base checksum of it, and
    decode each delta's record of it (``marked``: a ``bitmap`` record as :class:`Marked`);
    records of many entries are gathered and decoded ``threads`` at a time.

    Returns the decoded records (None where a delta does not store the tensor) and the base
    tensor's flat bits when it fit in one block (else None: read it again).
    """
    records = [reader.record(name) for reader in readers]
    sparse = [(i, r) for i, r in enumerate(records) if r is not None and r.kind == "sparse"]
    payloads = {i: readers[i].payload(r) for i, r in sparse}
    bitmaps = {i: readers[i].bitmap(r, payloads[i]) for i, r in sparse} if marked else {}
    bitmaps = {i: bits for i, bits in bitmaps.items() if bits is not None}
    positions = {i: stored_positions(readers[i], r, payloads[i]) for i, r in sparse
                 if i not in bitmaps}
    gathered: dict[int, list[np.ndarray]] = {i: [] for i, _ in sparse}
    base_hash = BaseHash(name)
    whole = None
    # Several large records: their gathers and decodes side by side (zstd and C release the GIL).
    threads = threads if sum(r.count for _, r in sparse) >= PARALLEL_MIN else 1
    for start, stop, block in read_blocks(base, name, blocks, base_hash):
        lo, hi = blocks.elements(start, stop)
        found = each([functools.partial(_gather_bitmap, bits, lo, hi, block)
                      for bits in bitmaps.values()] +
                     [functools.partial(_gather_positions, pos, lo, hi, block)
                      for pos in positions.values()], threads)
        for i, kept in zip([*bitmaps, *positions], found):
            gathered[i].append(kept)
        whole = block if len(blocks.bounds) == 1 else None
    base_hash.check(zip([r.path for r in readers], records))
    stored: list[Stored | None] = [None] * len(readers)
    dt = lookup_dtype(base.entry(name).dtype)

    def decode(i: int, record: Record) -> Stored | Marked:
        pieces = gathered[i]  # one block (the common case): its gather, not a copy of it
        base_kept = (pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else
                     np.empty(0, dt.bits))
        if i in bitmaps:
            return Marked(bitmaps[i], 0, readers[i].values(record, base_kept, payloads[i]),
                          base_kept)
        return decode_at(readers[i], record, positions[i], base_kept, payloads[i])
    for (i, _), entries in zip(sparse, each([functools.partial(decode, i, record)
                                              for i, record in sparse], threads)):
        stored[i] = entries
    return stored, whole


def _gather_bitmap(bits: np.ndarray, lo: int, hi: int, block: np.ndarray) -> np.ndarray:
    """The base bits a bitmap marks among elements ``lo .. hi - 1`` (``block``)."""
    window = bits[lo // 8:(hi + 7) // 8]
    return gather_marked(window, lo % 8, block, marked_count(window, lo % 8, hi - lo))


def _gather_positions(pos: np.ndarray | None, lo: int, hi: int, block: np.ndarray
                      ) -> np.ndarray:
    """The base bits at the sorted positions among elements ``lo .. hi - 1`` (``block``;
    None: every element)."""
    if pos is None:
        return block.copy()
    a, b = np.searchsorted(pos, [lo, hi])
    # Every position of the block stored: a copy, not a gather.
    return (block.copy() if b - a == hi - lo else
            block.take(pos[a:b] if lo == 0 else pos[a:b] - lo))


class RecordRuns:
    """The records several deltas hold of one tensor, decoded alongside a walk over its row
    blocks in order: each through a :class:`~sparsestitch.delta.format.RecordCursor`, so what is
    held is one block's entries and a run of each record, whatever the records' sizes, and
    each record is decoded once (not once per block).

    Records whose value codec is not elementwise (``ulp``) first need the base's exponent
    counts at every kept position: :func:`kept_totals` reads the base tensor once more for
    them (not hashed: the blocks' own pass checks the base).  Use as a context manager; call
    :meth:`finish` after the last block (every entry read, nothing left over).
    """

    def __init__(self, ckpt: Checkpoint | None, name: str, blocks: RowBlocks,
                 readers: Sequence[DeltaReader], records: Sequence[Record | None],
                 budget: MemoryBudget):
        self._run = budget.run_values
        self._cursors: dict[int, RecordCursor] = {}
        sparse = sum(1 for r in records if r is not None and r.kind == "sparse")
        # the records are open at once: they share what streams may keep in memory (each
        # has up to four streams); larger ones are read by range from the file or a spool
        memory_limit = max(1 << 20, budget.stream_bytes // (4 * max(sparse, 1)))
        try:
            for i, record in enumerate(records):
                if record is None or record.kind != "sparse":
                    continue
                totals = None
                if not readers[i].value_codec(record).elementwise:
                    totals = kept_totals(ckpt, name, blocks, readers[i], record, budget)
                self._cursors[i] = readers[i].cursor(record, memory_limit=memory_limit,
                                                     run=budget.run_values, totals=totals)
        except BaseException:
            self.close()
            raise
        self._count = len(records)
        # the bitmap records, which :meth:`block` may read as windows (decided before any is read)
        self._bitmaps = {i for i, c in self._cursors.items() if c.marks and not c.dense}

    def block(self, lo: int, block: np.ndarray | None, hi: int | None = None,
              marked: bool = False) -> list[Stored | Marked | None]:
        """Every record's entries in the block of elements ``lo, lo + 1, ...`` with base bits
        ``block`` (None: no base, zeros are decoded against -- for checking a delta alone,
        with ``hi`` the block's end); ``marked``: a bitmap record's as :class:`Marked`."""
        hi = lo + block.size if block is not None else hi
        stored: list[Stored | Marked | None] = [None] * self._count
        for i, cursor in self._cursors.items():
            if marked and block is not None and i in self._bitmaps:
                window, bit, values, base = cursor.marked(lo, block)
                stored[i] = Marked(window, bit, values, base, lo)
                continue
            if cursor.dense:
                part = block.copy() if block is not None else np.zeros(hi - lo, cursor.record.dt.bits)
                values = cursor.values(part if cursor.needs_base else None, hi - lo)
                stored[i] = Stored(None, values, part, lo)
                continue
            positions = cursor.positions_below(hi, self._run)
            kept = (block.take(positions - lo) if block is not None
                    else np.zeros(positions.size, cursor.record.dt.bits))
            values = cursor.values(kept if cursor.needs_base else None, positions.size)
            stored[i] = Stored(positions, values, kept)
        return stored

    @property
    def lone(self) -> int | None:
        """The index of the only record open, when one is and :meth:`replace_into` applies
        to it (its positions are every element or a bitmap); else None."""
        if len(self._cursors) != 1:
            return None
        (index, cursor), = self._cursors.items()
        return index if cursor.marks else None

    def replace_into(self, lo: int, block: np.ndarray, keep=None) -> None:
        """The :attr:`lone` record's entries in the block of elements ``lo, ...`` written
        over ``block`` (a restore, or the merge of one delta whose lone entries keep their
        bits): the same bits as :meth:`block` and that merge, with no position arrays;
        ``keep`` as for :meth:`~sparsestitch.delta.format.RecordCursor.replace_into`."""
        (cursor,) = self._cursors.values()
        cursor.replace_into(lo, block, keep)

    def finish(self) -> None:
        for cursor in self._cursors.values():
            cursor.finish()

    def close(self) -> None:
        for cursor in self._cursors.values():
            cursor.close()
        self._cursors = {}

    def __enter__(self) -> "RecordRuns":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def kept_totals(ckpt: Checkpoint | None, name: str, blocks: RowBlocks, reader: DeltaReader,
                record: Record, budget: MemoryBudget) -> np.ndarray:
    """What a record whose value codec is not elementwise (``ulp``) needs before decoding in
    runs: the codec's counts over the base at every kept position, from one pass over the
    base (zeros without a base) and the record's positions, a run at a time."""
    dt = record.dt
    total = None
    with reader.cursor(record, memory_limit=budget.stream_bytes, positions_only=True) as cursor:
        def add(part: np.ndarray) -> None:
            nonlocal total
            counts = reader.part_counts(record, part, dt)
            total = counts if total is None else total + counts
        marks = not cursor.dense and cursor.marks  # a bitmap: windows of bits, no positions
        for start, stop in blocks.bounds:
            lo, hi = blocks.elements(start, stop)
            if ckpt is None:  # no base: the counts of zeros
                block = np.zeros(hi - lo, dt.bits)
            else:
                block = ckpt.read_rows(name, start, stop) if stop > start else np.empty(0, dt.bits)
            if cursor.dense:
                add(block)
            elif marks:
                add(cursor.marked_base(lo, block))
            else:
                add(block.take(cursor.positions_below(hi, budget.run_values) - lo))
    return total if total is not None else reader.part_counts(record, np.empty(0, dt.bits), dt)


def stored_per_row(readers: Sequence[DeltaReader], records: Sequence[Record | None], rows: int,
                   row_items: int, budget: MemoryBudget) -> np.ndarray:
    """How many entries the records store in each row of a tensor (positions decoded a run
    at a time, one record after the other)."""
    per_row = np.zeros(rows, np.int64)
    for reader, record in zip(readers, records):
        if record is None or record.kind != "sparse":
            continue
        if record.positions.get("codec") in ("all", "bitmap"):
            # at least 1/32 of the elements: counting them would cost a decoding of the
            # positions; count each row as full (blocks sized for the worst case instead)
            per_row += row_items
            continue
        with reader.cursor(record, memory_limit=budget.stream_bytes,
                           positions_only=True) as cursor:
            if cursor.dense:
                per_row += row_items
                continue
            while (positions := cursor.next_positions(budget.run_values)).size:
                per_row += np.bincount(positions // max(1, row_items), minlength=rows)[:rows]
    return per_row


def added_runs(reader: DeltaReader, record: Record, budget: MemoryBudget):
    """The bits of a tensor a delta adds (every element stored), a block at a time."""
    step = max(1, budget.block_bytes // max(1, record.dt.itemsize))
    with reader.cursor(record, memory_limit=budget.stream_bytes, run=budget.run_values) as cursor:
        for lo in range(0, record.count, step):
            n = min(step, record.count - lo)
            if not cursor.dense:  # every element, checked as any position list is
                cursor.next_positions(n)
            yield cursor.values(None, n)
        cursor.finish()


def refuse_delta(ckpt: Checkpoint, role: str = "base") -> None:
    """A delta file given where a model checkpoint belongs (arguments swapped?) is refused
    with the order the commands take."""
    if any(HEADER_KEY in meta for meta in ckpt.metadata.values()):
        raise CheckpointError(f"this is a sparsestitch delta file, not a model checkpoint; the "
                              f"{role} must be a model (.safetensors file or folder), and "
                              "the base comes first: sparsestitch restore BASE DELTA -o OUT",
                              path=ckpt.path)


def added_records(readers: Sequence[DeltaReader]) -> dict[str, tuple[DeltaReader, Record]]:
    """Tensors the deltas add (the base lacks them), by name, with the delta holding each; two
    deltas adding different bits under one name are refused."""
    found: dict[str, tuple[DeltaReader, Record]] = {}
    for reader in readers:
        for record in reader.records:
            if record.kind != "added":
                continue
            if record.name in found:
                first, first_record = found[record.name]
                if first_record.payload_xxh3 != record.payload_xxh3:
                    raise TensorMismatchError(
                        f"two deltas add different tensors under this name ({first.path.name} "
                        f"and {reader.path.name}); stitch them without it or rename one",
                        path=reader.path, tensor=record.name)
                continue
            found[record.name] = (reader, record)
    return found


def output_shards(base: Checkpoint, added: dict[str, tuple[DeltaReader, Record]],
                  extra_metadata: dict[str, str] | None = None) -> list[Shard]:
    """The output's layout: the base's shards and tensors in order, then the added tensors in
    the last shard; every shard's metadata plus ``extra_metadata``."""
    shards = []
    for file_name, names in base.layout:
        tensors = [OutputTensor(n, base.entry(n).dtype, base.entry(n).shape) for n in names]
        metadata = dict(base.metadata.get(file_name) or {"format": "pt"}, **(extra_metadata or {}))
        shards.append(Shard(file_name, tensors, metadata))
    if added:
        last = shards[-1]
        extra = [OutputTensor(name, record.dtype, record.shape)
                 for name, (_, record) in sorted(added.items())]
        shards[-1] = Shard(last.file_name, last.tensors + extra, last.metadata)
    return shards
