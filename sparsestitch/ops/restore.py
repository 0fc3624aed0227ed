"""Restore a fine-tuned checkpoint from its base and delta, bit for bit at stored positions."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..core.dtypes import DType
from ..engine.budget import MemoryBudget
from ..engine.walk import Marked, Stored, put_marks, put_stored
from . import stitch_engine as engine
from .cards import restore_card


class RestoreCombiner:
    """The combiner of a restore: every stored position takes the fine-tuned bits.

    Block-wise for every dtype, so a record too large for the memory budget is restored
    row block by row block like any stitch.
    """

    runs_in_readers: ClassVar[bool] = True

    def combine(self, name: str, dt: DType, numel: int, stored: Sequence[Stored | None]
                ) -> tuple[np.ndarray, np.ndarray]:
        (record,) = stored
        if record is None:
            return np.empty(0, np.int64), np.empty(0, dt.bits)
        return record.position_array(), record.finetuned

    def merges_blocks(self, dt: DType) -> bool:
        return True

    def replaces_lone(self, dt: DType, index: int) -> bool:
        return True

    def takes_marks(self, dt: DType) -> bool:
        """Yes: a bitmap record's bits are put back where its bits are set (:func:`put_marks`),
        with no position array."""
        return True

    def block_merge(self, dt: DType, stored: Sequence[Stored | Marked | None]):
        (record,) = stored
        if isinstance(record, Marked):
            return _MarkedPutBack(record)

        def put_back(block: np.ndarray, first: int) -> None:
            if record is not None:
                put_stored(record, block, first)
        return put_back

    def bytes_per_position(self, dt: DType) -> int:
        """The int64 position, the fine-tuned and base bits and the value decoders'
        temporaries (a wide task vector for ``tau``), rounded up."""
        return 32


class _MarkedPutBack:
    """A bitmap record put back block by block: the blocks come in order, so each starts
    where the last one's marked elements ended (counted again for any other block)."""

    def __init__(self, record: Marked):
        self.record, self._end, self._before = record, record.first, 0

    def __call__(self, block: np.ndarray, first: int) -> None:
        before = self._before if first == self._end else None
        self._before, self._end = put_marks(self.record, block, first, before), first + block.size


def restore(base: str | os.PathLike, delta: str | os.PathLike, out: str | os.PathLike, *,
            overwrite: bool = False, progress: bool = False,
            block_bytes: int | None = None, max_memory: int | str | None = None,
            threads: int | None = None) -> Path:
    """Write the fine-tuned model a delta describes: the base with the stored values put back.

    Every stored position gets the value the delta stores there: the fine-tuned bits
    exactly where its value codec is exact (``lossless=True`` deltas restore the fine-tune
    bit for bit), a quantized value within the delta's reported error where it is not (the
    default delta: see :func:`~sparsestitch.ops.describe.exactness`); every other position
    keeps the base's bits.
    The output mirrors the base: a ``.safetensors`` file, or a folder with the same
    shards, index and non-weight files, and a model card (README.md) saying how it was made.
    ``max_memory`` and ``threads`` are those of :func:`~sparsestitch.ops.stitch.stitch`
    (``block_bytes``, the row block size, overrides the one ``max_memory`` implies).

    >>> restore("base.safetensors", "math.delta", "math.safetensors")  # doctest: +SKIP
    """
    budget = MemoryBudget.of(max_memory) if block_bytes is None else \
        MemoryBudget(4 * int(block_bytes))  # blocks are a quarter of a budget
    return engine.run(base, [delta], out, RestoreCombiner(), overwrite=overwrite,
                      progress=progress, description="restore", budget=budget,
                      card=restore_card(delta), threads=threads)
