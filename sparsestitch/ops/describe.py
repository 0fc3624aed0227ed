"""Describe and verify delta files: what each record stores, and whether it all checks out."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint
from ..core.dtypes import dtype as lookup_dtype
from ..delta.format import DeltaReader, Record
from ..engine.budget import RUN_BYTES_PER_VALUE, MemoryBudget
from ..engine.fits import check_delta_fits
from ..engine.walk import (
    BaseHash,
    RecordRuns,
    RowBlocks,
    added_runs,
    decode_tensor,
    read_blocks,
    refuse_delta,
)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    count: int
    numel: int
    positions_codec: str | None
    values_codec: str | None
    nbytes: int
    fidelity: dict | None = None   # the record's report (relative_error, energy_kept, ...)

    @property
    def density(self) -> float:
        return self.count / self.numel if self.numel else 0.0

    @property
    def bits_per_kept(self) -> float:
        return 8 * self.nbytes / self.count if self.count else 0.0

    @property
    def relative_error(self) -> float | None:
        """||tau - tau kept|| / ||tau|| of this tensor, where the writer reported it."""
        return None if not self.fidelity else self.fidelity.get("relative_error")


@dataclass(frozen=True)
class DeltaInfo:
    path: Path
    file_size: int
    header: dict = field(repr=False)
    tensors: list[TensorInfo] = field(repr=False)

    @property
    def kept(self) -> int:
        return sum(t.count for t in self.tensors if t.kind == "sparse")

    @property
    def dense_bytes(self) -> int:
        """Size of the full fine-tuned tensors this delta describes."""
        return sum(t.numel * lookup_dtype(t.dtype).itemsize for t in self.tensors)

    @property
    def bits_per_kept(self) -> float:
        return 8 * self.file_size / self.kept if self.kept else 0.0

    @property
    def fidelity(self) -> dict:
        """The header's fidelity summary (empty for deltas written before it existed)."""
        value = self.header.get("fidelity")
        return value if isinstance(value, dict) else {}


def info(delta: str | os.PathLike) -> DeltaInfo:
    """Per-tensor density, encodings and bytes of a delta file (reads only its header).

    >>> info("math.delta").bits_per_kept  # doctest: +SKIP
    17.9
    """
    with DeltaReader(delta) as reader:
        tensors = [_tensor_info(r) for r in reader.records]
        return DeltaInfo(reader.path, reader.file_size, reader.header, tensors)


@dataclass(frozen=True)
class Exactness:
    """How exactly a delta restores its fine-tune: of the parameters it stores, how many hold
    the fine-tune's exact bits and how many approximate values (a lossy value codec:
    ``quant``)."""

    stored: int
    approximate: int
    relative_error: float | None = None   # the header's fidelity summary, where it has one
    lossless: bool = False                # the header says: the fine-tune bit for bit

    @property
    def exact(self) -> int:
        return self.stored - self.approximate

    def sentence(self) -> str:
        """What a model restored from the delta holds, in one sentence (for cards and help)."""
        if not self.approximate:
            return ("every parameter the delta stores has the fine-tune's exact bits, every "
                    "other one the base's"
                    + (": this is the fine-tune bit for bit" if self.lossless else ""))
        error = (f" (relative error {self.relative_error:.3g} of the fine-tune's change)"
                 if self.relative_error is not None else "")
        exact = (f"; the other {self.exact:,} it stores have the fine-tune's exact bits"
                 if self.exact else "")
        return (f"{self.approximate:,} of the {self.stored:,} parameters the delta stores hold "
                f"quantized values, close to the fine-tune's but not its bits{error}{exact}; "
                "every parameter it does not store is the base's")


def exactness(delta: str | os.PathLike) -> Exactness:
    """:class:`Exactness` of a delta file (reads only its header)."""
    with DeltaReader(delta) as reader:
        stored = approximate = 0
        for record in reader.records:
            if record.kind != "sparse":
                continue
            stored += record.count
            if not reader.value_codec(record).exact:
                approximate += record.count
        summary = reader.header.get("fidelity")
        summary = summary if isinstance(summary, dict) else {}
        error = summary.get("relative_error")
        return Exactness(stored, approximate,
                         float(error) if isinstance(error, (int, float)) and approximate else None,
                         summary.get("lossless") is True and not approximate)


def verify(delta: str | os.PathLike, base: str | os.PathLike | None = None, *,
           max_memory: int | str | None = None) -> DeltaInfo:
    """Check a delta completely: header and payload checksums, every record decodes to
    valid positions and values; with ``base``, also that it belongs to that base.
    Raises a :class:`~sparsestitch.core.errors.SparsestitchError` naming file and tensor.

    Records are decoded in runs within ``max_memory`` (default 1 GiB; see
    :class:`~sparsestitch.engine.budget.MemoryBudget`), whatever sizes the file declares: without
    a base, against zeros at the kept positions.
    """
    budget = MemoryBudget.of(max_memory)
    with DeltaReader(delta) as reader, contextlib.ExitStack() as stack:
        ckpt = None
        if base is not None:
            ckpt = stack.enter_context(Checkpoint(base))
            refuse_delta(ckpt)
            check_delta_fits(ckpt, reader)
        for record in reader.records:
            if record.kind == "base" and ckpt is None:
                continue
            if not _fits_whole(record, budget):
                if record.kind == "added":
                    for _ in added_runs(reader, record, budget):
                        pass
                else:
                    _walk_record(reader, record, ckpt, budget)
            elif record.kind == "added":
                reader.decode(record, None)
            elif ckpt is not None:  # hashes the base tensor block by block, checks, decodes
                decode_tensor(ckpt, [reader], record.name,
                              RowBlocks.of(record.shape, record.dt.itemsize, budget.block_bytes))
            else:  # against zeros at the kept positions: allocates for the payload, not the shape
                payload = reader.payload(record)
                kept = reader.positions(record, payload)
                reader.values(record, np.zeros(kept.size, record.dt.bits), payload)
        return DeltaInfo(reader.path, reader.file_size, reader.header,
                         [_tensor_info(r) for r in reader.records])


def _fits_whole(record: Record, budget: MemoryBudget) -> bool:
    """Whether decoding the record whole (positions, values, the decoders' temporaries)
    stays within half the budget; larger records are decoded in runs."""
    return (record.count * RUN_BYTES_PER_VALUE <= budget.total // 2
            and record.nbytes <= budget.block_bytes)


def _walk_record(reader: DeltaReader, record: Record, ckpt: Checkpoint | None,
                 budget: MemoryBudget) -> None:
    """Decode a record in runs, row block by row block; with a base, hash the base tensor
    as it is read and check it against the record."""
    blocks = RowBlocks.of(record.shape, record.dt.itemsize, budget.block_bytes)
    base_hash = BaseHash(record.name) if ckpt is not None else None
    with RecordRuns(ckpt, record.name, blocks, [reader], [record], budget) as runs:
        if ckpt is not None:
            for start, stop, block in read_blocks(ckpt, record.name, blocks, base_hash):
                runs.block(blocks.elements(start, stop)[0], block)
        else:
            for start, stop in blocks.bounds:
                lo, hi = blocks.elements(start, stop)
                runs.block(lo, None, hi)
        runs.finish()
    if base_hash is not None:
        base_hash.check([(reader.path, record)])


def _tensor_info(record: Record) -> TensorInfo:
    return TensorInfo(record.name, record.dtype, record.shape, record.kind, record.count,
                      record.numel, (record.positions or {}).get("codec"),
                      (record.values or {}).get("codec"), record.nbytes, record.fidelity)
