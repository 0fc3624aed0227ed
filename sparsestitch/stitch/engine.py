"""The streaming engine: base tensors in, deltas decoded, a combiner applied, tensors out.

For each base tensor, in output layout order: read it (in row blocks if it
is larger than the block budget), check its checksum against every delta's
record (a delta for another base fails before anything is published), decode
each delta's record, let the *combiner* turn them into ``(positions, bits)``,
and write the base with those positions replaced.  Positions no delta stores
keep the base's bits exactly.  A tensor larger than a block is read twice
(gather, then write).

Float tensors under the elementwise rules skip the union of positions
altogether: the combiner's block merge (``merges_blocks``/``block_merge``)
scatter-adds every delta into dense per-window sums while each output block
is written.  Reader threads prepare the following tensors (read, check,
decode, and merge those that fit in one block) while the caller writes the
current one, as many ahead as fit in half the memory budget (estimated from
the records' stored counts) and at most two per reader; a tensor too large
for that is prepared alone.

Restore and stitch differ only in their combiner; continual composition
(:mod:`.compose`) reuses :func:`gather` and :func:`write_patched` with the
merged model as the source of the bytes it does not recompute.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from ..atomic import check_not_an_input
from ..checkpoint import Checkpoint, CheckpointWriter, OutputTensor, Shard
from ..dtypes import DType, dtype as lookup_dtype
from ..errors import BaseMismatchError, TensorMismatchError
from ..format import DeltaReader, Record
from ..pipeline import DEFAULT_WORKERS, in_order
from ..progress import bar

DEFAULT_BLOCK_BYTES = 256 << 20


def parse_memory(value: int | str | None, default: int = DEFAULT_BLOCK_BYTES * 4) -> int:
    """Bytes in ``512MiB``, ``2GB``, ``4096`` (or ``default`` for None).

    >>> parse_memory("4KiB", 0), parse_memory("1.5 MB", 0), parse_memory(None, 7)
    (4096, 1500000, 7)
    """
    if value is None:
        return default
    if isinstance(value, int):
        return value
    text = value.strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 1000, "MB": 10**6,
             "GB": 10**9, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "B": 1}
    number, factor = text, 1
    for unit, unit_factor in units.items():
        if text.endswith(unit):
            number, factor = text[:-len(unit)], unit_factor
            break
    try:
        size = int(float(number) * factor)
    except ValueError:
        size = -1
    if size <= 0:
        raise ValueError(f"memory size must be a positive number of bytes with an optional "
                         f"unit, like 512MiB, 2GB or 4096; got {value!r}")
    return size


def block_bytes(max_memory: int | str | None) -> int:
    """Bytes per base/output row block for a ``max_memory`` budget: a quarter of it
    (at least one row is always read).

    >>> block_bytes("4KiB")
    1024
    """
    return max(1, parse_memory(max_memory) // 4)


@dataclass(frozen=True)
class Stored:
    """One delta's record of one tensor, decoded."""

    positions: np.ndarray       # sorted int64 flat positions
    finetuned: np.ndarray       # fine-tuned bits there
    base: np.ndarray            # base bits there


#: combiner(name, dtype, numel, stored per delta (None where a delta leaves the tensor alone))
#: -> (sorted positions, new bits there)
Combiner = Callable[[str, DType, int, Sequence["Stored | None"]], tuple[np.ndarray, np.ndarray]]


def run(base: str | os.PathLike, deltas: Sequence[str | os.PathLike], out: str | os.PathLike,
        combiner: Combiner, *, overwrite: bool = False, progress: bool = False,
        block_bytes: int = DEFAULT_BLOCK_BYTES, added: str = "single",
        metadata: dict[str, str] | None = None, description: str = "stitch") -> Path:
    """Stream ``base`` + ``deltas`` through ``combiner`` into ``out``; return ``out``.

    ``added`` says what to do with tensors that deltas add (the base lacks them):
    ``"single"`` copies them (an error if two deltas add the same name with different
    bits), ``"drop"`` leaves them out.  ``metadata`` is added to every output shard's
    safetensors metadata.
    """
    out = Path(out)
    check_not_an_input(out, [base, *deltas])
    with Checkpoint(base) as base_ckpt:
        readers = []
        try:
            for path in deltas:
                readers.append(DeltaReader(path))
            for reader in readers:
                _check_delta_fits(base_ckpt, reader)
            added_records = _added_records(readers) if added == "single" else {}
            shards = _output_shards(base_ckpt, added_records, metadata)
            writer = CheckpointWriter(out, shards, folder=base_ckpt.is_folder,
                                      extra_files=base_ckpt.extra_files, overwrite=overwrite)
            total = sum(base_ckpt.entry(n).nbytes for n in base_ckpt.names)
            try:
                with bar(total, description, progress) as progress_bar:
                    order = [tensor.name for shard in shards for tensor in shard.tensors]
                    tensors = in_order(
                        order,
                        lambda name: _prepare(base_ckpt, readers, added_records, name, combiner,
                                              block_bytes),
                        lambda name: _estimate(base_ckpt, readers, added_records, name, combiner,
                                               block_bytes),
                        budget=2 * block_bytes,
                        workers=READ_WORKERS if 4 * block_bytes >= MIN_THREADED_BUDGET else 0)
                    with closing(tensors):  # on an error, stop the reader before aborting
                        for name, finish in tensors:
                            finish(writer)
                            del finish  # free it before the next tensor is prepared
                            if name not in added_records:
                                progress_bar.update(base_ckpt.entry(name).nbytes)
                writer.close()
            except BaseException as exc:
                writer.abort(exc)
                raise
        finally:
            for reader in readers:
                reader.close()
    return out


@dataclass(frozen=True)
class RowBlocks:
    """A tensor cut into blocks of whole rows (along the first dimension)."""

    bounds: list[tuple[int, int]]   # (first row, row after the last)
    row_items: int                  # elements per row

    @classmethod
    def of(cls, shape: tuple[int, ...], itemsize: int, block_bytes: int) -> "RowBlocks":
        rows = shape[0] if shape else 1
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        row_items = numel // rows if rows else 0
        step = max(1, block_bytes // max(1, row_items * itemsize))
        return cls([(s, min(rows, s + step)) for s in range(0, rows, step)] or [(0, 0)],
                   row_items)


def gather(base: Checkpoint, readers: Sequence[DeltaReader], name: str, blocks: RowBlocks
           ) -> tuple[list[Stored | None], np.ndarray | None]:
    """Read base tensor ``name`` block by block, check every delta's base checksum of it,
    and decode each delta's record.

    Returns the decoded records (None where a delta does not store the tensor) and the
    base tensor's flat bits when it fit in one block (else None: read it again).
    """
    entry = base.entry(name)
    dt = lookup_dtype(entry.dtype)
    records = [reader.record(name) for reader in readers]
    stored_records = [(i, r) for i, r in enumerate(records) if r is not None and r.kind == "sparse"]
    payloads = {i: readers[i].payload(r) for i, r in stored_records}
    positions = {i: readers[i].positions(r, payloads[i]) for i, r in stored_records}
    gathered = {i: [] for i in positions}
    digest = xxhash.xxh3_64()
    whole = None
    for start, stop in blocks.bounds:
        block = base.read_rows(name, start, stop) if stop > start else np.empty(0, dt.bits)
        digest.update(memoryview(block.view(np.uint8)))
        lo, hi = start * blocks.row_items, stop * blocks.row_items
        for i, pos in positions.items():
            a, b = np.searchsorted(pos, [lo, hi])
            # Every position of the block stored (dense records): a copy, not a gather.
            gathered[i].append(block.copy() if b - a == hi - lo else
                               block.take(pos[a:b] if lo == 0 else pos[a:b] - lo))
        whole = block if len(blocks.bounds) == 1 else None
    _check_base(readers, records, name, digest.hexdigest())
    stored: list[Stored | None] = [None] * len(readers)
    for i, record in stored_records:
        base_kept = np.concatenate(gathered[i]) if gathered[i] else np.empty(0, dt.bits)
        values = readers[i].values(record, base_kept, payloads[i])
        stored[i] = Stored(positions[i], values, base_kept)
    return stored, whole


def _check_base(readers: Sequence[DeltaReader], records: Sequence[Record | None], name: str,
                base_hash: str) -> None:
    for reader, record in zip(readers, records):
        if record is not None and record.base_xxh3 != base_hash:
            raise BaseMismatchError("the base tensor's checksum differs from the one the delta was "
                                    "made from: this delta belongs to another base (or the base "
                                    "was modified)", path=reader.path, tensor=name)


def write_patched(writer: CheckpointWriter, name: str, blocks: RowBlocks,
                  read_block: Callable[[int, int], np.ndarray], positions: np.ndarray,
                  bits: np.ndarray) -> None:
    """Write tensor ``name`` block by block: ``read_block(start, stop)`` (a fresh flat
    array, ours to modify) with the sorted flat ``positions`` set to ``bits``."""
    for start, stop in blocks.bounds:
        block = read_block(start, stop)
        lo, hi = start * blocks.row_items, stop * blocks.row_items
        a, b = np.searchsorted(positions, [lo, hi])
        if b - a == hi - lo:
            block = bits[a:b]  # every position replaced
        elif b > a:
            block[positions[a:b] - lo] = bits[a:b]
        writer.write(name, block)


#: Bytes per stored position an in-flight tensor may hold (positions, fine-tuned and
#: base bits, the wide task vector, decoding temporaries) for combiners that do not say
#: (``bytes_per_position``); used to plan the prefetch and the row blocks.
DECODED_BYTES_PER_POSITION = 32


def _bytes_per_position(combiner: Combiner, dt: DType) -> int:
    say = getattr(combiner, "bytes_per_position", None)
    return DECODED_BYTES_PER_POSITION if say is None else say(dt)


Finish = Callable[[CheckpointWriter], None]

#: Threads preparing tensors (the caller writes): numpy, zstd, pread and the C loops release
#: the GIL.
#: 0 prepares in the caller's thread (for profiling).
READ_WORKERS = DEFAULT_WORKERS
#: Below this ``max_memory`` everything runs in one thread: concurrent decoding and the
#: allocator's per-thread arenas cost about 50-130 MiB more peak RSS (measured, 2.27 GB
#: model, 16 deltas: 185 MiB with one reader thread against 134 MiB with none at 128 MiB;
#: 264 MiB with two at 256 MiB).
MIN_THREADED_BUDGET = 512 << 20


def _estimate(base: Checkpoint, readers: Sequence[DeltaReader],
              added: dict[str, tuple[DeltaReader, Record]], name: str, combiner: Combiner,
              block_bytes: int) -> int:
    """Bytes tensor ``name`` holds between being prepared and being finished (a tensor too
    big to decode whole is merged within half the budget, see :func:`_streamed`)."""
    if name in added:
        _, record = added[name]
        return record.numel * lookup_dtype(record.dtype).itemsize
    return min(_decoded_bytes(base, readers, name, combiner, block_bytes), 2 * block_bytes)


def _decoded_bytes(base: Checkpoint, readers: Sequence[DeltaReader], name: str,
                   combiner: Combiner, block_bytes: int) -> int:
    """Bytes held while tensor ``name``'s records are decoded whole: its first block and
    every stored position of every delta."""
    stored = sum(record.count for reader in readers
                 if (record := reader.record(name)) is not None and record.kind == "sparse")
    entry = base.entry(name)
    per_position = _bytes_per_position(combiner, lookup_dtype(entry.dtype))
    return min(entry.nbytes, block_bytes) + per_position * stored


def _prepare(base: Checkpoint, readers: Sequence[DeltaReader],
             added: dict[str, tuple[DeltaReader, Record]], name: str, combiner: Combiner,
             block_bytes: int) -> Finish:
    """Read and decode everything tensor ``name`` needs; return what writes it."""
    if name in added:
        reader, record = added[name]
        bits = reader.decode(record, None)[1]
        return lambda writer: writer.write(name, bits)
    entry = base.entry(name)
    dt = lookup_dtype(entry.dtype)
    merges_blocks = getattr(combiner, "merges_blocks", None)
    block_wise = merges_blocks is not None and merges_blocks(dt)
    if block_wise and _decoded_bytes(base, readers, name, combiner, block_bytes) > 2 * block_bytes:
        return _streamed(base, readers, name, combiner, block_bytes)
    blocks = RowBlocks.of(entry.shape, dt.itemsize, block_bytes)
    stored, whole = gather(base, readers, name, blocks)
    read_block = ((lambda start, stop: whole) if whole is not None else
                  (lambda start, stop: base.read_rows(name, start, stop)))
    # One block (the common case): merge here, in the reader thread, unless the combiner
    # must stay in the writing thread (device work).
    merge_here = whole is not None and getattr(combiner, "runs_in_readers", True)
    if block_wise:
        merge = combiner.block_merge(dt, stored)
        if merge_here:
            merge(whole, 0)
            return lambda writer: writer.write(name, whole)

        def finish_blocks(writer: CheckpointWriter) -> None:
            for start, stop in blocks.bounds:
                block = read_block(start, stop)
                merge(block, start * blocks.row_items)
                writer.write(name, block)
        return finish_blocks
    if merge_here:
        new_positions, new_bits = combiner(name, dt, entry.numel, stored)
        return lambda writer: write_patched(writer, name, blocks, read_block, new_positions,
                                            new_bits)

    def finish(writer: CheckpointWriter) -> None:
        new_positions, new_bits = combiner(name, dt, entry.numel, stored)
        write_patched(writer, name, blocks, read_block, new_positions, new_bits)
    return finish


def _streamed(base: Checkpoint, readers: Sequence[DeltaReader], name: str, combiner: Combiner,
              block_bytes: int) -> Finish:
    """What writes a tensor whose decoded records would not fit in the budget at once.

    The tensor is cut into row blocks that each hold at most a block's worth of base bits
    and of decoded records, from a first pass counting the stored positions per row (one
    record decoded at a time), so skewed records are cut where they are dense.  For every
    block each record is decoded again (whole: the codecs have no random access) and only
    its part inside the block is kept, so the memory held is one block, its share of the
    records, and one decoded record.  Decoding is repeated once per block: slower, never
    over the budget.  Values are decoded with the base bits of this block only (zeros
    elsewhere); every value codec is elementwise, so the part inside the block is exact.  The base checksum is checked after the last block; a
    mismatch raises before anything is published (the output is still temporary).
    """
    entry = base.entry(name)
    dt = lookup_dtype(entry.dtype)
    records = [reader.record(name) for reader in readers]
    sparse = [(i, r) for i, r in enumerate(records) if r is not None and r.kind == "sparse"]
    rows = entry.shape[0] if entry.shape else 1
    widest = RowBlocks.of(entry.shape, dt.itemsize, block_bytes)
    per_row = np.zeros(rows, np.int64)
    for i, record in sparse:  # stored positions per row, one record decoded at a time
        positions = readers[i].positions(record)
        per_row += np.bincount(positions // max(1, widest.row_items), minlength=rows)[:rows]
        del positions
    blocks = RowBlocks(_cut_rows(per_row, widest.bounds[0][1] - widest.bounds[0][0],
                                 max(1, block_bytes // _bytes_per_position(combiner, dt))),
                       widest.row_items)

    def finish(writer: CheckpointWriter) -> None:
        digest = xxhash.xxh3_64()
        for start, stop in blocks.bounds:
            block = base.read_rows(name, start, stop) if stop > start else np.empty(0, dt.bits)
            digest.update(memoryview(block.view(np.uint8)))
            lo, hi = start * blocks.row_items, stop * blocks.row_items
            stored: list[Stored | None] = [None] * len(readers)
            for i, record in sparse:
                payload = readers[i].payload(record)
                positions = readers[i].positions(record, payload)
                a, b = (int(x) for x in np.searchsorted(positions, [lo, hi]))
                base_kept = np.zeros(positions.size, dt.bits)
                base_kept[a:b] = block.take(positions[a:b] - lo)
                values = readers[i].values(record, base_kept, payload)
                stored[i] = Stored(positions[a:b].copy(), values[a:b].copy(),
                                   base_kept[a:b].copy())
                del payload, positions, base_kept, values
            combiner.block_merge(dt, stored)(block, lo)
            del stored
            writer.write(name, block)
        _check_base(readers, records, name, digest.hexdigest())
    return finish


def _cut_rows(per_row: np.ndarray, max_rows: int, max_positions: int) -> list[tuple[int, int]]:
    """Consecutive row ranges of at most ``max_rows`` rows and ``max_positions`` stored
    positions each (a single row may exceed the latter: rows are not split).

    >>> _cut_rows(np.array([5, 0, 0, 5, 1]), 10, 5)
    [(0, 3), (3, 4), (4, 5)]
    """
    rows = per_row.size
    if rows == 0:
        return [(0, 0)]
    cumulative = np.concatenate([[0], np.cumsum(per_row)])
    bounds, start = [], 0
    while start < rows:
        fits = int(np.searchsorted(cumulative, cumulative[start] + max_positions, side="right")) - 1
        stop = min(rows, start + max_rows, max(start + 1, fits))
        bounds.append((start, stop))
        start = stop
    return bounds


def _check_delta_fits(base: Checkpoint, reader: DeltaReader) -> None:
    """Names, dtypes and shapes agree; checked before any output is written."""
    names = {r.name for r in reader.records if r.kind != "added"}
    missing = [n for n in base.names if n not in names]
    if missing:
        raise BaseMismatchError(f"the delta has no record for base tensor {missing[0]!r} "
                                f"({len(missing)} missing): it was made for another base",
                                path=reader.path, tensor=missing[0])
    for record in reader.records:
        if record.kind == "added":
            if record.name in base:
                raise BaseMismatchError("the delta adds a tensor the base already has",
                                        path=reader.path, tensor=record.name)
            continue
        if record.name not in base:
            raise BaseMismatchError("the delta has a tensor the base lacks: it was made for "
                                    "another base", path=reader.path, tensor=record.name)
        entry = base.entry(record.name)
        if (entry.dtype, entry.shape) != (record.dtype, record.shape):
            raise BaseMismatchError(f"base has {entry.dtype}{list(entry.shape)}, delta expects "
                                    f"{record.dtype}{list(record.shape)}", path=reader.path,
                                    tensor=record.name)


def _added_records(readers: list[DeltaReader]) -> dict[str, tuple[DeltaReader, Record]]:
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


def _output_shards(base: Checkpoint, added: dict[str, tuple[DeltaReader, Record]],
                   extra_metadata: dict[str, str] | None = None) -> list[Shard]:
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
