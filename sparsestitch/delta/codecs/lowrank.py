"""``lowrank``: a matrix's task vector as a sum of rank-one products of quantized vectors
(lossy, opt-in; format version 4).

The tensor is viewed as ``rows = shape[0]`` by ``cols = numel / rows`` (the record keeps
every element: positions ``all``).  Component ``i`` of ``R`` is a left vector of ``rows``
entries and a right vector of ``cols`` entries, each entry in ``k_i`` bits (a sign, then a
level ``l`` of ``k_i - 1`` bits) and decoded as ``+-step * (2 l + 1)`` with one step per
vector; more bits go to the components carrying more of the change (Delta-CoMe's mixed
precision of singular vectors).  Decoding, in the model's wide type and with no fused
multiply-add, is the spec's fixed order of operations:

    acc = +0.0;  for i in 0 .. R-1:  acc = acc + left[r][i] * right[i][c]
    value = round(wide(base) + acc)

so every reader, thread count and device gives the same bits.  The encoder (see
:mod:`sparsestitch.localize.lowrank`) hands over the codes and steps; this module packs,
checks and decodes them.

Payload: scales stream (the ``R`` left steps, then the ``R`` right steps, ``scale_dtype``
bits in byte planes) | right codes stream (``cols * K`` bits, ``K = sum k_i``: column ``c``'s
entries for components 0 .. R-1 in order) | left codes stream (``rows * K`` bits, row by
row).  A reader holds the right factor (``R * cols`` wide floats) and decodes the left one a
run of rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import native
from ...core.dtypes import DType, from_wide, to_wide
from ...core.dtypes import dtype as lookup_dtype
from ...core.errors import DeltaFormatError, ResourceLimitError
from .base import (
    config_int,
    from_planes,
    pack_stream,
    split_streams,
    to_planes,
    unpack_stream,
)
from .streams import Part, RawStream

#: Bits per vector entry a file may use.
MAX_BITS = 8
#: The right factor a cursor holds may take this many of its stream allowances (each a
#: sixteenth of the reader's budget: a quarter in all), and at least RIGHT_FLOOR bytes
#: (within the fixed buffers the memory bound of format.md section 8 allows for).
RIGHT_STREAMS = 4
RIGHT_FLOOR = 16 << 20


def scale_dtype_for(dt: DType) -> str:
    return "F64" if dt.name == "F64" else "F32"


#: Factor rows whose codes are packed at a time (a multiple of 8, so each run of rows ends
#: on a byte whatever K).
PACK_ROWS = 1 << 12


def pack_codes(codes: list[np.ndarray], bits: list[int]) -> np.ndarray:
    """The entries of one factor (``codes[i]``: component ``i``'s signed levels, ``int``
    arrays of equal length ``n``, ``-1 - l`` for a negative entry of level ``l``) as ``n * K``
    bits, entry by entry, components in order; packed little-endian, PACK_ROWS rows at a
    time."""
    n = codes[0].size if codes else 0
    if not codes or n == 0:
        return np.empty(0, np.uint8)
    width = sum(bits)
    out = np.empty((n * width + 7) // 8, np.uint8)
    for first in range(0, n, PACK_ROWS):
        rows = slice(first, min(n, first + PACK_ROWS))
        table = np.empty((rows.stop - first, width), np.uint8)
        at = 0
        for code, k in zip(codes, bits):
            part = code[rows]
            negative = part < 0
            level = np.where(negative, -1 - part.astype(np.int64), part)
            table[:, at] = negative
            for j in range(k - 1):
                table[:, at + 1 + j] = (level >> j) & 1
            at += k
        packed = np.packbits(table.reshape(-1), bitorder="little")
        out[first * width // 8:first * width // 8 + packed.size] = packed
    return out


def encode_factors(left: list[np.ndarray], right: list[np.ndarray], left_steps: np.ndarray,
                   right_steps: np.ndarray, bits: list[int], rows: int, cols: int, dt: DType,
                   report: dict | None = None) -> tuple[bytes, dict]:
    """The values part and config of a ``lowrank`` record: ``left[i]`` / ``right[i]`` the
    signed levels of component ``i`` (see :func:`pack_codes`), the steps as the scale
    dtype's values (already rounded to it).  ``report``: informative config fields."""
    scale_dt = lookup_dtype(scale_dtype_for(dt))
    steps = np.concatenate([left_steps, right_steps]).astype(
        np.float32 if scale_dt.name == "F32" else np.float64)
    scale_bits = steps.view(scale_dt.bits)
    scales, scales_cfg = pack_stream(to_planes(scale_bits))
    right_raw, right_cfg = pack_stream(pack_codes(right, bits))
    left_raw, left_cfg = pack_stream(pack_codes(left, bits))
    config = {"rows": rows, "cols": cols, "rank": len(bits), "bits": [int(k) for k in bits],
              "scale_dtype": scale_dt.name, "scales": scales_cfg, "right": right_cfg,
              "left": left_cfg, "scales_nbytes": len(scales), "right_nbytes": len(right_raw),
              "left_nbytes": len(left_raw), **(report or {})}
    return scales + right_raw + left_raw, config


@dataclass(frozen=True)
class Layout:
    """A ``lowrank`` record's checked config."""

    rows: int
    cols: int
    bits: tuple[int, ...]
    scale_dt: DType
    sizes: list[int]

    @property
    def rank(self) -> int:
        return len(self.bits)

    @property
    def width(self) -> int:
        """Bits per row of either factor (``K``)."""
        return sum(self.bits)

    @classmethod
    def of(cls, config: dict, dt: DType, count: int, nbytes: int) -> Layout:
        if not dt.is_float:
            raise DeltaFormatError(f"lowrank values need a float dtype, got {dt.name}")
        rows = config_int(config, "rows", 1, max(count, 1))
        cols = config_int(config, "cols", 1, max(count, 1))
        if rows * cols != count:
            raise DeltaFormatError(f"lowrank factors of {rows} x {cols} do not cover the "
                                   f"record's {count} values")
        rank = config_int(config, "rank", 0, min(rows, cols))
        bits = config.get("bits")
        if not isinstance(bits, list) or len(bits) != rank or any(
                type(k) is not int or not 1 <= k <= MAX_BITS for k in bits):
            raise DeltaFormatError(f"lowrank config field 'bits' must list {rank} widths of 1 "
                                   f"to {MAX_BITS} bits, got {bits!r}"[:300])
        scale_name = config.get("scale_dtype")
        if scale_name not in ("F32", "F64"):
            raise DeltaFormatError(f"lowrank scale_dtype must be F32 or F64, got {scale_name!r}")
        sizes = [config_int(config, key, 0, nbytes)
                 for key in ("scales_nbytes", "right_nbytes", "left_nbytes")]
        for key in ("scales", "right", "left"):
            if not isinstance(config.get(key), dict):
                raise DeltaFormatError(f"lowrank config lacks its {key!r} stream config")
        return cls(rows, cols, tuple(bits), lookup_dtype(scale_name), sizes)

    def code_bytes(self, n: int) -> int:
        return (n * self.width + 7) // 8


def entry_values(negative: np.ndarray, level: np.ndarray, step, wide: np.dtype) -> np.ndarray:
    """Factor entries as the spec decodes them: ``step * (2 l + 1)`` rounded once in the wide
    type (``step`` already widened; ``2 l + 1`` is exact), negated where ``negative``."""
    odd = (2 * level.astype(np.int64) + 1).astype(wide)
    with np.errstate(all="ignore"):
        magnitude = step * odd
    return np.where(negative, -magnitude, magnitude)


def unpack_entries(codes: np.ndarray, bit: int, n: int, layout: Layout, steps: np.ndarray,
                   wide: np.dtype) -> np.ndarray:
    """``n`` rows of a factor (``n x R``, wide) from its packed codes starting at bit
    ``bit``: entry ``(r, i)`` is ``+-steps[i] * (2 l + 1)``, rounded once in the wide type."""
    width, rank = layout.width, layout.rank
    out = np.empty((n, rank), wide)
    if rank == 0 or n == 0:
        return out
    table = np.unpackbits(codes, bitorder="little")[bit:bit + n * width].reshape(n, width)
    at = 0
    for i, k in enumerate(layout.bits):
        level = np.zeros(n, np.int64)
        for j in range(1, k):
            level |= table[:, at + j].astype(np.int64) << (j - 1)
        out[:, i] = entry_values(table[:, at].astype(bool), level, steps[i], wide)
        at += k
    return out


def check_tail(codes: np.ndarray, n: int, layout: Layout, what: str) -> None:
    end = n * layout.width
    if codes.size * 8 > end and (int(codes[end // 8]) >> (end % 8) or codes[end // 8 + 1:].any()):
        raise DeltaFormatError(f"lowrank {what} codes have bits set past the last entry")


def accumulate(left: np.ndarray, right: np.ndarray, first_col: int = 0,
               n_cols: int | None = None) -> np.ndarray:
    """``acc[r][c] = sum_i left[r][i] * right[i][c]`` in the spec's order (i ascending,
    from +0.0, every product and sum rounded in the wide type): ``left`` rows by R,
    ``right`` R by cols; columns ``first_col .. first_col + n_cols`` only."""
    n_cols = right.shape[1] - first_col if n_cols is None else n_cols
    acc = np.zeros((left.shape[0], n_cols), left.dtype)
    kernels = native.kernels()
    if kernels is not None and left.size and acc.size:
        kernels.lowrank_accumulate(np.ascontiguousarray(left), np.ascontiguousarray(right),
                                   first_col, acc)
        return acc
    product = np.empty_like(acc)
    with np.errstate(all="ignore"):
        for i in range(left.shape[1]):
            np.multiply(left[:, i:i + 1], right[i:i + 1, first_col:first_col + n_cols],
                        out=product)
            acc += product
    return acc


def restore_run(base: np.ndarray, at: int, left_rows: np.ndarray, first_row: int,
                right: np.ndarray, cols: int, dt: DType) -> np.ndarray:
    """The fine-tuned bits of flat elements ``at .. at + len(base)`` given their base bits,
    the left factor's rows from ``first_row`` on (covering them) and the right factor."""
    n = base.size
    out = np.empty(n, dt.bits)
    done = 0
    while done < n:  # a partial first row, whole rows, a partial last row
        flat = at + done
        row, col = divmod(flat, cols)
        if col == 0 and n - done >= cols:
            whole = (n - done) // cols
            acc = accumulate(left_rows[row - first_row:row - first_row + whole], right)
            take = whole * cols
        else:
            take = min(cols - col, n - done)
            acc = accumulate(left_rows[row - first_row:row - first_row + 1], right, col, take)
        with np.errstate(all="ignore"):
            out[done:done + take] = from_wide(to_wide(base[done:done + take], dt)
                                              + acc.reshape(-1), dt)
        done += take
    return out


@dataclass(frozen=True)
class LowRankValues:
    codec_id: str = "lowrank"
    needs_base: bool = True
    exact: bool = False
    min_version: int = 4
    #: Factors hold far fewer entries than the matrix: a byte may stand for many values.
    values_per_byte: int = 1 << 16
    elementwise: bool = True     # value i depends on base value i (and the factors) alone

    def applies(self, dt: DType) -> bool:
        return dt.is_float

    def encode(self, kept, base, dt):  # pragma: no cover - chosen by the low-rank planner only
        raise NotImplementedError("lowrank records are written from factors: encode_factors")

    @staticmethod
    def _steps(raw, layout: Layout, dt: DType) -> tuple[np.ndarray, np.ndarray]:
        """The left and right steps from the scales stream's raw bytes, widened to the
        model's wide type."""
        rank = layout.rank
        steps = from_planes(raw, layout.scale_dt.bits, 2 * rank)
        wide_steps = to_wide(steps, layout.scale_dt).astype(dt.wide)
        return wide_steps[:rank], wide_steps[rank:]

    def decode(self, payload: bytes, config: dict, base: np.ndarray, dt: DType,
               count: int) -> np.ndarray:
        layout = Layout.of(config, dt, count, len(payload))
        streams = split_streams(payload, layout.sizes)
        left_steps, right_steps = self._steps(
            unpack_stream(streams[0], config["scales"], 2 * layout.rank * layout.scale_dt.itemsize),
            layout, dt)
        right_codes = np.frombuffer(unpack_stream(streams[1], config["right"],
                                                  layout.code_bytes(layout.cols)), np.uint8)
        left_codes = np.frombuffer(unpack_stream(streams[2], config["left"],
                                                 layout.code_bytes(layout.rows)), np.uint8)
        check_tail(right_codes, layout.cols, layout, "right")
        check_tail(left_codes, layout.rows, layout, "left")
        right = unpack_entries(right_codes, 0, layout.cols, layout, right_steps, dt.wide).T.copy()
        left = unpack_entries(left_codes, 0, layout.rows, layout, left_steps, dt.wide)
        return restore_run(np.ascontiguousarray(base), 0, left, 0, right, layout.cols, dt)

    def cursor(self, part: Part, config: dict, dt: DType, count: int) -> LowRankCursor:
        layout = Layout.of(config, dt, count, part.length)
        right_bytes = layout.rank * layout.cols * np.dtype(dt.wide).itemsize
        allowed = max(RIGHT_STREAMS * part.memory_limit, RIGHT_FLOOR)
        if right_bytes > allowed:
            raise ResourceLimitError(
                f"lowrank record's right factor takes {right_bytes:,} bytes, more than the "
                f"{allowed:,} max_memory allows it (a quarter); allow more memory")
        scales, right, left = part.split(layout.sizes)
        steps_stream = scales.stream(config["scales"], 2 * layout.rank * layout.scale_dt.itemsize)
        left_steps, right_steps = self._steps(steps_stream.take(0, steps_stream.nbytes), layout,
                                              dt)
        right_stream = right.stream(config["right"], layout.code_bytes(layout.cols))
        right_codes = right_stream.take(0, right_stream.nbytes)
        check_tail(right_codes, layout.cols, layout, "right")
        right_factor = unpack_entries(right_codes, 0, layout.cols, layout, right_steps,
                                      dt.wide).T.copy()
        right_stream.release()
        return LowRankCursor(left.stream(config["left"], layout.code_bytes(layout.rows)),
                             layout, left_steps, right_factor, dt, count)


class LowRankCursor:
    """``lowrank`` values in order, a run at a time: the left factor's rows the run spans,
    decoded from their codes, against the right factor held whole."""

    def __init__(self, left: RawStream, layout: Layout, left_steps: np.ndarray,
                 right: np.ndarray, dt: DType, count: int):
        self._left, self._layout, self._steps = left, layout, left_steps
        self._right, self._dt, self._count = right, dt, count
        self._at = 0

    def take(self, base: np.ndarray, n: int) -> np.ndarray:
        if n > self._count - self._at:
            raise DeltaFormatError(f"asked for values past the record's {self._count}")
        layout, cols = self._layout, self._layout.cols
        first_row = self._at // cols
        last_row = (self._at + n - 1) // cols + 1 if n else first_row
        lo, hi = first_row * layout.width, last_row * layout.width
        codes = self._left.take(lo // 8, (hi + 7) // 8)
        if last_row == layout.rows:  # the bits after the last row's: none may be set
            tail = self._left.take((layout.rows * layout.width) // 8, self._left.nbytes)
            end_bit = (layout.rows * layout.width) % 8
            if tail.size and (int(tail[0]) >> end_bit or tail[1:].any()):
                raise DeltaFormatError("lowrank left codes have bits set past the last entry")
        left_rows = unpack_entries(codes, lo % 8, last_row - first_row, layout, self._steps,
                                   self._dt.wide)
        values = restore_run(np.ascontiguousarray(base), self._at, left_rows, first_row,
                             self._right, cols, self._dt)
        self._left.release()
        self._at += n
        return values

    def close(self) -> None:
        self._left.close()
