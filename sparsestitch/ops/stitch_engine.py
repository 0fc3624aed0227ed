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

Reading, hashing and decoding go through :mod:`sparsestitch.engine.walk`.  Restore and
stitch differ only in their combiner (:class:`~sparsestitch.combine.combiners.Combiner`); continual
composition (:mod:`.compose`) reuses :func:`~sparsestitch.engine.walk.decode_tensor` and
:func:`write_patched` with the merged model as the source of the bytes it does not
recompute.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Protocol

import numpy as np

from ..checkpoint import Checkpoint, CheckpointWriter
from ..checkpoint.gguf_folder import check_output_name, model_files, writes_folder
from ..checkpoint.guard import Inputs
from ..combine.combiners import Combiner, merge_in_parts
from ..core.dtypes import DType
from ..core.dtypes import dtype as lookup_dtype
from ..core.native import keep_freed_blocks, one_malloc_arena
from ..core.progress import bar
from ..delta.format import DeltaReader, Record
from ..engine.budget import MemoryBudget
from ..engine.fits import check_delta_fits
from ..engine.readahead import DEFAULT_WORKERS, in_order, workers_for
from ..engine.walk import (
    BaseHash,
    RecordRuns,
    RowBlocks,
    added_records,
    added_runs,
    decode_tensor,
    output_shards,
    read_blocks,
    refuse_delta,
    stored_per_row,
)

#: What writes one prepared output tensor.
Finish = Callable[[CheckpointWriter], None]


def run(base: str | os.PathLike, deltas: Sequence[str | os.PathLike | DeltaReader],
        out: str | os.PathLike, combiner: Combiner, *, overwrite: bool = False,
        progress: bool = False, budget: MemoryBudget | None = None, added: str = "single",
        metadata: dict[str, str] | None = None, description: str = "stitch",
        card: Callable[[Checkpoint], str] | None = None, threads: int | None = None) -> Path:
    """Stream ``base`` + ``deltas`` (paths, or readers the caller opened and closes) through
    ``combiner`` into ``out`` within ``budget`` (default 1 GiB); return ``out``.

    ``added`` says what to do with tensors that deltas add (the base lacks them):
    ``"single"`` copies them (an error if two deltas add the same name with different
    bits), ``"drop"`` leaves them out.  ``metadata`` is added to every output shard's
    safetensors metadata.  A folder output gets ``card(base)`` as its README.md (the model
    card, replacing the base's).  ``threads`` (default: up to 4 of the usable cores) read and
    decode ahead of the caller, who writes; 1 runs everything in the caller's thread.
    """
    out, budget = Path(out), budget or MemoryBudget.of(None)
    inputs = Inputs()
    base = inputs.add(base, "base")
    for delta in deltas:
        inputs.add_local(delta.path if isinstance(delta, DeltaReader) else delta, "delta")
    inputs.check_output(out)
    check_output_name(out)
    with Checkpoint(base) as base_ckpt, contextlib.ExitStack() as opened:
        refuse_delta(base_ckpt)
        readers = [delta if isinstance(delta, DeltaReader) else
                   opened.enter_context(DeltaReader(delta)) for delta in deltas]
        for reader in readers:
            check_delta_fits(base_ckpt, reader)
        added_tensors = added_records(readers) if added == "single" else {}
        workers = workers_for(threads, READ_WORKERS)
        plan = _Plan(base_ckpt, readers, added_tensors, combiner, budget,
                     threads=max(1, threaded_workers(budget, workers)))
        one_malloc_arena()  # decoded records freed by the writer: see its docstring
        keep_freed_blocks()  # and blocks' arrays reuse freed memory
        write_model(base_ckpt, out, plan, added_tensors, overwrite=overwrite,
                    progress=progress, budget=budget, metadata=metadata,
                    description=description, card=card, workers=workers)
    return out


class TensorSource(Protocol):
    """What :func:`write_model` needs to make each output tensor: ``prepare(name)`` (run in
    reader threads, in any order) returns what writes it (called in order, in the caller's
    thread); ``estimate(name)`` is the bytes held in between."""

    def prepare(self, name: str) -> Finish: ...

    def estimate(self, name: str) -> int: ...


def write_model(base: Checkpoint, out: Path, source: TensorSource, added: dict, *,
                overwrite: bool, progress: bool, budget: MemoryBudget, workers: int,
                metadata: dict[str, str] | None = None, description: str = "stitch",
                card: Callable[[Checkpoint], str] | None = None,
                before_publishing: Callable[[], None] | None = None) -> None:
    """Write every tensor of the output -- the base's, in its layout, then ``added`` (name ->
    ``(source, record or entry)`` with the tensor's dtype and shape) -- as ``source`` makes
    them, reading ahead within the memory budget; publish the output atomically after
    ``before_publishing()`` (nothing is published if anything raises)."""
    shards = output_shards(base, added, metadata)
    folder = writes_folder(base, out)
    texts = model_files(base.path) if folder and base.is_gguf else {}
    if card and folder:
        texts["README.md"] = card(base)
    writer = CheckpointWriter(out, shards, folder=folder,
                              extra_files=base.extra_files, overwrite=overwrite,
                              extra_texts=texts, index=base.has_index)
    total = sum(base.entry(n).nbytes for n in base.names)
    try:
        with bar(total, description, progress) as progress_bar:
            order = [tensor.name for shard in shards for tensor in shard.tensors]
            tensors = in_order(order, source.prepare, source.estimate, budget=budget.tensor_bytes,
                               workers=threaded_workers(budget, workers))
            with closing(tensors):  # on an error, stop the reader before aborting
                for name, finish in tensors:
                    finish(writer)
                    del finish  # free it before the next tensor is prepared
                    if name not in added:
                        progress_bar.update(base.entry(name).nbytes)
        if before_publishing is not None:
            before_publishing()
        writer.close()
    except BaseException as exc:
        writer.abort(exc)
        raise


def write_patched(writer: CheckpointWriter, name: str, blocks: RowBlocks,
                  read_block: Callable[[int, int], np.ndarray], positions: np.ndarray,
                  bits: np.ndarray) -> None:
    """Write tensor ``name`` block by block: ``read_block(start, stop)`` (a fresh flat
    array, ours to modify) with the sorted flat ``positions`` set to ``bits``."""
    for start, stop in blocks.bounds:
        block = read_block(start, stop)
        lo, hi = blocks.elements(start, stop)
        a, b = np.searchsorted(positions, [lo, hi])
        if b - a == hi - lo:
            block = bits[a:b]  # every position replaced
        elif b > a:
            block[positions[a:b] - lo] = bits[a:b]
        writer.write(name, block)


#: Threads preparing tensors (the caller writes): numpy, zstd, pread and the C loops release
#: the GIL.
#: 0 prepares in the caller's thread (for profiling).
READ_WORKERS = DEFAULT_WORKERS
#: Below this ``max_memory`` everything runs in one thread: concurrent decoding and the
#: allocator's per-thread arenas cost about 50-130 MiB more peak RSS (measured, 2.27 GB
#: model, 16 deltas: 185 MiB with one reader thread against 134 MiB with none at 128 MiB;
#: 264 MiB with two at 256 MiB).
MIN_THREADED_BUDGET = 512 << 20


def threaded_workers(budget: MemoryBudget, workers: int) -> int:
    """The worker threads a run within ``budget`` takes (0: everything in the caller's
    thread, below :data:`MIN_THREADED_BUDGET`)."""
    return workers if budget.total >= MIN_THREADED_BUDGET else 0


class _Plan:
    """How each output tensor is prepared (read, checked, decoded, maybe merged: a large one
    ``threads`` records or parts at a time) in a reader thread and written by the caller."""

    def __init__(self, base: Checkpoint, readers: Sequence[DeltaReader],
                 added: dict[str, tuple[DeltaReader, Record]], combiner: Combiner,
                 budget: MemoryBudget, threads: int = 1):
        self.base, self.readers, self.added = base, readers, added
        self.combiner, self.budget, self.threads = combiner, budget, threads
        self.block_bytes, self.tensor_bytes = budget.block_bytes, budget.tensor_bytes

    def estimate(self, name: str) -> int:
        """Bytes tensor ``name`` holds between being prepared and being finished (a tensor too
        big to decode whole is merged within half the budget, see :meth:`streamed`)."""
        if name in self.added:
            _, record = self.added[name]
            return min(record.numel * lookup_dtype(record.dtype).itemsize, self.tensor_bytes)
        return min(self.decoded_bytes(name), self.tensor_bytes)

    def decoded_bytes(self, name: str) -> int:
        """Bytes held while tensor ``name``'s records are decoded whole: its first block and
        every stored position of every delta."""
        stored = sum(record.count for reader in self.readers
                     if (record := reader.record(name)) is not None and record.kind == "sparse")
        entry = self.base.entry(name)
        per_position = self.combiner.bytes_per_position(lookup_dtype(entry.dtype))
        return min(entry.nbytes, self.block_bytes) + per_position * stored

    def prepare(self, name: str) -> Finish:
        """Read and decode everything tensor ``name`` needs; return what writes it."""
        if name in self.added:
            reader, record = self.added[name]
            if record.numel * record.dt.itemsize > self.tensor_bytes:
                def write_added(writer: CheckpointWriter) -> None:
                    for bits in added_runs(reader, record, self.budget):
                        writer.write(name, bits)
                return write_added
            bits = reader.decode(record, None)[1]
            return lambda writer: writer.write(name, bits)
        base, combiner = self.base, self.combiner
        entry = base.entry(name)
        dt = lookup_dtype(entry.dtype)
        block_wise = combiner.merges_blocks(dt)
        if block_wise and self.decoded_bytes(name) > self.tensor_bytes:
            return self.streamed(name, dt)
        blocks = RowBlocks.of(entry.shape, dt.itemsize, self.block_bytes)
        stored, whole = decode_tensor(base, self.readers, name, blocks,
                                      marked=self.combiner.takes_marks(dt),
                                      threads=self.threads)
        read_block = ((lambda start, stop: whole) if whole is not None else
                      (lambda start, stop: base.read_rows(name, start, stop)))
        # One block (the common case): merge here, in the reader thread, unless the combiner
        # must stay in the writing thread (device work).
        merge_here = whole is not None and combiner.runs_in_readers
        if block_wise:
            merge = combiner.block_merge(dt, stored)
            if merge_here:
                merge_in_parts(merge, whole, 0, self.threads)
                return lambda writer: writer.write(name, whole)

            def finish_blocks(writer: CheckpointWriter) -> None:
                for start, stop in blocks.bounds:
                    block = read_block(start, stop)
                    merge(block, blocks.elements(start, stop)[0])
                    writer.write(name, block)
            return finish_blocks
        if merge_here:
            new_positions, new_bits = combiner.combine(name, dt, entry.numel, stored)
            return lambda writer: write_patched(writer, name, blocks, read_block, new_positions,
                                                new_bits)

        def finish(writer: CheckpointWriter) -> None:
            new_positions, new_bits = combiner.combine(name, dt, entry.numel, stored)
            write_patched(writer, name, blocks, read_block, new_positions, new_bits)
        return finish

    def streamed(self, name: str, dt: DType) -> Finish:
        """What writes a tensor whose decoded records would not fit in the budget at once.

        The tensor is cut into row blocks that each hold at most a block's worth of base
        bits and of decoded entries, from a first pass counting the stored positions per
        row (positions decoded a run at a time), so skewed records are cut where they are
        dense.  Then every record is decoded once, in order, alongside the blocks
        (:class:`~sparsestitch.engine.walk.RecordRuns`): what is held is one block, its entries
        and a run of each record.  Records whose value codec is not elementwise (``ulp``)
        need the base's exponent counts first: one more pass over the base tensor, so it is
        read twice.  The base checksum is checked after the last block; a mismatch raises
        before anything is published (the output is still temporary).
        """
        base, readers = self.base, self.readers
        entry = base.entry(name)
        records = [reader.record(name) for reader in readers]
        rows = entry.shape[0] if entry.shape else 1
        widest = RowBlocks.of(entry.shape, dt.itemsize, self.block_bytes)
        per_row = stored_per_row(readers, records, rows, widest.row_items, self.budget)
        per_position = self.combiner.bytes_per_position(dt)
        blocks = RowBlocks(cut_rows(per_row, widest.bounds[0][1] - widest.bounds[0][0],
                                    max(1, self.block_bytes // per_position)),
                           widest.row_items)

        marked = self.combiner.takes_marks(dt)

        def finish(writer: CheckpointWriter) -> None:
            base_hash = BaseHash(name)
            with RecordRuns(base, name, blocks, readers, records, self.budget) as runs:
                lone = runs.lone
                replace = lone is not None and self.combiner.replaces_lone(dt, lone)
                for start, stop, block in read_blocks(base, name, blocks, base_hash):
                    lo = blocks.elements(start, stop)[0]
                    if replace:
                        runs.replace_into(lo, block)
                    else:
                        stored = runs.block(lo, block, marked=marked)
                        merge_in_parts(self.combiner.block_merge(dt, stored), block, lo,
                                       self.threads)
                        del stored
                    writer.write(name, block)
                runs.finish()
            base_hash.check(zip([r.path for r in readers], records))
        return finish


def cut_rows(per_row: np.ndarray, max_rows: int, max_positions: int) -> list[tuple[int, int]]:
    """Consecutive row ranges of at most ``max_rows`` rows and ``max_positions`` stored
    positions each (a single row may exceed the latter: rows are not split).

    >>> cut_rows(np.array([5, 0, 0, 5, 1]), 10, 5)
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
