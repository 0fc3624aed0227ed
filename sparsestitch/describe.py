"""Describe and verify delta files: what each record stores, and whether it all checks out."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint
from .dtypes import dtype as lookup_dtype
from .format import DeltaReader, Record
from .walk import RowBlocks, check_delta_fits, decode_tensor, refuse_delta

#: Bytes of a base tensor read at a time by :func:`verify`.
VERIFY_BLOCK_BYTES = 64 << 20


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


def verify(delta: str | os.PathLike, base: str | os.PathLike | None = None) -> DeltaInfo:
    """Check a delta completely: header and payload checksums, every record decodes to
    valid positions and values; with ``base``, also that it belongs to that base.
    Raises a :class:`~sparsestitch.errors.SparsestitchError` naming file and tensor.
    """
    with DeltaReader(delta) as reader:
        if base is None:
            for record in reader.records:
                if record.kind == "added":
                    reader.decode(record, None)
                elif record.kind == "sparse":
                    # Without the base, decode against zeros at the kept positions: checks
                    # structure and sizes, allocating for the payload, not the declared shape.
                    payload = reader.payload(record)
                    kept = reader.positions(record, payload)
                    reader.values(record, np.zeros(kept.size, record.dt.bits), payload)
        else:
            with Checkpoint(base) as ckpt:
                refuse_delta(ckpt)
                check_delta_fits(ckpt, reader)
                for record in reader.records:
                    if record.kind == "added":
                        reader.decode(record, None)
                        continue
                    # Hashes the base tensor block by block, checks it, decodes the record.
                    blocks = RowBlocks.of(record.shape, record.dt.itemsize, VERIFY_BLOCK_BYTES)
                    decode_tensor(ckpt, [reader], record.name, blocks)
        return DeltaInfo(reader.path, reader.file_size, reader.header,
                         [_tensor_info(r) for r in reader.records])


def _tensor_info(record: Record) -> TensorInfo:
    return TensorInfo(record.name, record.dtype, record.shape, record.kind, record.count,
                      record.numel, (record.positions or {}).get("codec"),
                      (record.values or {}).get("codec"), record.nbytes, record.fidelity)
