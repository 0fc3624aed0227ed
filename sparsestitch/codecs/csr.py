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

from ..errors import DeltaFormatError
from ..sizes import row_items
from . import rice
from .base import config_int, from_planes, pack_stream, split_streams, to_planes, unpack_stream


@dataclass(frozen=True)
class CSR:
    codec_id: str = "csr"

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
        if len(shape) < 2:  # any 2+-d shape reads, even rows wider than encode takes on
            raise DeltaFormatError(f"csr positions need a tensor of 2+ dimensions, got shape {shape}")
        rows, cols = shape[0], row_items(shape)
        rows_config = config.get("rows")
        if not isinstance(rows_config, dict):
            raise DeltaFormatError("csr config lacks its 'rows' stream config")
        rows_nbytes = config_int(config, "rows_nbytes", 0, len(payload))
        k = rice.config_k(config)
        unary_bits = config_int(config, "unary_bits", count, count + rows * cols)
        unary_nbytes = (unary_bits + 7) // 8
        rows_stream, unary, remainders = split_streams(
            payload, [rows_nbytes, unary_nbytes, max(0, len(payload) - rows_nbytes - unary_nbytes)])
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


