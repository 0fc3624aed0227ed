"""Inspect and verify delta files."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint
from .errors import BaseMismatchError
from .format import DeltaReader, Record, digest
from .stitch.engine import _check_delta_fits


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

    @property
    def density(self) -> float:
        return self.count / self.numel if self.numel else 0.0

    @property
    def bits_per_kept(self) -> float:
        return 8 * self.nbytes / self.count if self.count else 0.0


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
        from .dtypes import dtype
        return sum(t.numel * dtype(t.dtype).itemsize for t in self.tensors)

    @property
    def bits_per_kept(self) -> float:
        return 8 * self.file_size / self.kept if self.kept else 0.0


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
        ckpt = Checkpoint(base) if base is not None else None
        try:
            if ckpt is not None:
                _check_delta_fits(ckpt, reader)
            for record in reader.records:
                base_bits = None
                if ckpt is not None and record.kind != "added":
                    base_bits = ckpt.read(record.name)
                    if digest(base_bits) != record.base_xxh3:
                        raise BaseMismatchError("base tensor differs from the delta's base",
                                                path=reader.path, tensor=record.name)
                if record.kind == "base":
                    continue
                if base_bits is None and record.kind != "added":
                    # Without the base, decode against zeros at the kept positions: checks
                    # structure and sizes, allocating for the payload, not the declared shape.
                    payload = reader.payload(record)
                    kept = reader.positions(record, payload)
                    reader.values(record, np.zeros(kept.size, record.dt.bits), payload)
                    continue
                reader.decode(record, base_bits)
        finally:
            if ckpt is not None:
                ckpt.close()
        return DeltaInfo(reader.path, reader.file_size, reader.header,
                         [_tensor_info(r) for r in reader.records])


def _tensor_info(record: Record) -> TensorInfo:
    return TensorInfo(record.name, record.dtype, record.shape, record.kind, record.count,
                      record.numel, (record.positions or {}).get("codec"),
                      (record.values or {}).get("codec"), record.nbytes)
