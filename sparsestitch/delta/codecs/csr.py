"""``csr``: for tensors of 2 or more dimensions, viewed as ``rows x (numel / rows)``.

Row counts (the differences of CSR row pointers) as little-endian uint32,
byte planes split, zstd; then column indices, gap-coded within each row and
Rice coded.  Wins when kept positions cluster in some rows (whole-row or
attention-head structure), where row counts carry most of the information.
Config: ``rows`` (stream config of the row counts), ``k``, ``unary_bits``,
``rows_nbytes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core.errors import DeltaFormatError
from ...core.sizes import numel as count_elements
from ...core.sizes import row_items
from . import rice
from .base import (LIST_BELOW, config_int, from_planes, pack_stream, split_streams, to_planes,
                   unpack_stream)
from .streams import Part, RawStream


@dataclass(frozen=True)
class CSR:
    codec_id: str = "csr"

    def worth_trying(self, positions: np.ndarray, shape: tuple[int, ...]) -> bool:
        """Where a bitmap is not certainly smaller and rows carry structure to use."""
        return positions.size * LIST_BELOW < count_elements(shape) and _rows_are_uneven(positions, shape)

    def applies(self, shape: tuple[int, ...], count: int) -> bool:
        return len(shape) >= 2 and shape[0] < 1 << 32 and row_items(shape) < 1 << 32

    def encode(self, positions: np.ndarray, shape: tuple[int, ...]) -> tuple[bytes, dict]:
        cols = row_items(shape)
        row_of, col_of = np.divmod(positions.astype(np.int64), cols)
        counts = np.bincount(row_of, minlength=shape[0]).astype("<u4")
        rows_stream, rows_config = pack_stream(to_planes(counts))
        gaps = np.diff(col_of, prepend=-1) - 1
        starts = np.cumsum(counts, dtype=np.int64) - counts
        nonempty = counts > 0
        gaps[starts[nonempty]] = col_of[starts[nonempty]]  # first column of each row, absolute
        gaps = gaps.astype(np.uint64)
        k = rice.best_k(gaps)
        unary, remainders, unary_bits = rice.encode(gaps, k)
        config = {"rows": rows_config, "rows_nbytes": len(rows_stream), "k": k,
                  "unary_bits": unary_bits}
        return rows_stream + unary + remainders, config

    def decode(self, payload: bytes, config: dict, shape: tuple[int, ...], count: int) -> np.ndarray:
        rows, cols, rows_config, k, unary_bits, sizes = self._layout(config, shape, count,
                                                                    len(payload))
        rows_stream, unary, remainders = split_streams(payload, sizes)
        counts_raw = unpack_stream(rows_stream, rows_config, rows * 4)
        counts = from_planes(counts_raw, np.dtype("<u4"), rows).astype(np.int64)
        if int(counts.sum()) != count or (rows and int(counts.max()) > cols):
            raise DeltaFormatError(f"csr row counts sum to {int(counts.sum())}, the record says {count}")
        gaps = rice.decode(unary, remainders, count, k, unary_bits).astype(np.int64)
        steps = gaps + 1
        running = np.cumsum(steps)
        starts = np.cumsum(counts) - counts
        before_row = np.repeat(running[starts[counts > 0]] - steps[starts[counts > 0]], counts[counts > 0])
        col_of = running - before_row - 1
        if col_of.size and int(col_of.max()) >= cols:
            raise DeltaFormatError(f"csr column {int(col_of.max())} is outside a row of {cols}")
        row_of = np.repeat(np.arange(rows, dtype=np.int64), counts)
        return row_of * cols + col_of


    def cursor(self, part: Part, config: dict, shape: tuple[int, ...], count: int) -> "CsrCursor":
        rows, cols, rows_config, k, unary_bits, sizes = self._layout(config, shape, count,
                                                                    part.length)
        rows_part, unary, remainders = part.split(sizes)
        return CsrCursor(rows_part.stream(rows_config, rows * 4),
                         rice.RiceReader(unary.raw(), remainders.raw(), count, k, unary_bits),
                         rows, cols, count)

    @staticmethod
    def _layout(config: dict, shape: tuple[int, ...], count: int, nbytes: int):
        """The checked config: rows, columns, the row counts' stream config, ``k``, the unary
        bits, and the sizes of the three streams."""
        if len(shape) < 2:  # any 2+-d shape reads, even rows wider than encode takes on
            raise DeltaFormatError(f"csr positions need a tensor of 2+ dimensions, got shape {shape}")
        rows, cols = shape[0], row_items(shape)
        rows_config = config.get("rows")
        if not isinstance(rows_config, dict):
            raise DeltaFormatError("csr config lacks its 'rows' stream config")
        rows_nbytes = config_int(config, "rows_nbytes", 0, nbytes)
        k = rice.config_k(config)
        unary_bits = config_int(config, "unary_bits", count, count + rows * cols)
        unary_nbytes = (unary_bits + 7) // 8
        sizes = [rows_nbytes, unary_nbytes, max(0, nbytes - rows_nbytes - unary_nbytes)]
        return rows, cols, rows_config, k, unary_bits, sizes


class CsrCursor:
    """The positions of a ``csr`` record in order, a bounded run at a time: row counts are
    read a window of rows at a time (rows holding values queue up), column gaps through a
    :class:`~.rice.RiceReader`.  The checks are :meth:`CSR.decode`'s: row counts at most a
    row's width and summing to the record's count, every column inside its row."""

    #: Row counts read at a time.
    WINDOW = 1 << 16

    def __init__(self, rows_stream: RawStream, columns: "rice.RiceReader", rows: int, cols: int,
                 count: int):
        self._rows_stream, self._columns = rows_stream, columns
        self._rows, self._cols, self._count = rows, cols, count
        self._next_row, self._seen, self._done = 0, 0, 0
        self._queue_rows = np.empty(0, np.int64)    # rows read that still hold values
        self._queue_left = np.empty(0, np.int64)    # values each still holds
        self._col = -1   # column of the last value taken from the first queued row, if any

    def next(self, limit: int) -> np.ndarray:
        n = min(limit, self._count - self._done)
        if n <= 0:
            self._fill(self._count + 1)  # reads every remaining row: all must be empty
            return np.empty(0, np.int64)
        self._fill(n)
        cumulative = np.cumsum(self._queue_left)
        used = int(np.searchsorted(cumulative, n)) + 1      # queued rows this run touches
        takes = self._queue_left[:used].copy()
        takes[-1] -= int(cumulative[used - 1]) - n
        gaps = self._columns.next(n).astype(np.int64)
        steps = gaps + 1
        running = np.cumsum(steps)
        starts = np.concatenate([[0], np.cumsum(takes)[:-1]]).astype(np.int64)
        before = np.full(used, -1, np.int64)
        before[0] = self._col
        col_of = running + np.repeat(before - (running[starts] - steps[starts]), takes)
        if int(col_of.max()) >= self._cols:
            raise DeltaFormatError(f"csr column {int(col_of.max())} is outside a row of {self._cols}")
        positions = np.repeat(self._queue_rows[:used], takes) * self._cols + col_of
        left = int(self._queue_left[used - 1] - takes[-1])
        self._queue_rows = self._queue_rows[used - 1 if left else used:]
        self._queue_left = (np.concatenate([[left], self._queue_left[used:]]) if left
                            else self._queue_left[used:])
        self._col = int(col_of[-1]) if left else -1
        self._done += n
        return positions

    def _fill(self, n: int) -> None:
        """Queue rows until they hold ``n`` values (or every row is read, which is checked)."""
        while int(self._queue_left.sum()) < n and self._next_row < self._rows:
            stop = min(self._rows, self._next_row + self.WINDOW)
            counts = from_planes(self._rows_stream.planes(4, self._rows, self._next_row, stop),
                                 np.dtype("<u4"), stop - self._next_row).astype(np.int64)
            self._rows_stream.release()
            self._seen += int(counts.sum())
            if self._seen > self._count or (counts.size and int(counts.max()) > self._cols):
                raise DeltaFormatError(f"csr row counts sum to {self._seen}+, the record says "
                                       f"{self._count}")
            nonzero = np.flatnonzero(counts)
            self._queue_rows = np.concatenate([self._queue_rows, nonzero + self._next_row])
            self._queue_left = np.concatenate([self._queue_left, counts[nonzero]])
            self._next_row = stop
        if self._next_row >= self._rows and self._seen != self._count:
            raise DeltaFormatError(f"csr row counts sum to {self._seen}, the record says {self._count}")

    def close(self) -> None:
        self._rows_stream.close()
        self._columns.close()


def _rows_are_uneven(positions: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether the kept positions' rows differ enough for ``csr`` (row counts, then columns
    within rows) to possibly beat one gap list: some rows empty while others are not, or
    some holding several times the mean.  Spread evenly over the rows, their counts cost
    more than the row boundaries save."""
    rows = shape[0]
    if positions.size == 0 or rows < 2:
        return True
    counts = np.bincount(positions // max(1, count_elements(shape) // rows), minlength=rows)
    mean = positions.size / rows
    return bool((counts == 0).mean() > 0.01 or counts.max() > 3 * mean + 8)
