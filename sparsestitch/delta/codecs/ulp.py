"""``ulp``: how many representable values the fine-tuned value moved from the base, grouped by
the base's exponent (format version 3).

Floats are ordered by the *order key* of their bits (the sign-magnitude bits mapped to an
unsigned integer that increases with the value), so ``key(finetuned) - key(base)`` is the
signed distance in units in the last place: 1 for a bfloat16 weight that one optimizer step
moved by one ulp, a few thousand for a float32 one.  The distances are zigzagged (small
magnitudes of either sign become small unsigned numbers) and stored in byte planes.

What makes them compress is the order: a training step moves weights by about the same
*absolute* amount whatever their size, so the distance in ulps is set by the base's exponent
(a weight twice as large has ulps twice as coarse).  The values are stored sorted by the base's
exponent field (stably, so kept order within an exponent), which the decoder recomputes from
the base: each exponent's distances then sit together, where zstd's block-wise entropy tables
and matches fit them.  It is exact for every bit pattern (NaN payloads, -0.0, infinities: the
key is a bijection and the arithmetic is modulo 2**width), so there are no exceptions.

Payload: one stream (like ``xor``).  Config: the stream config.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zstandard

from ...core import native
from ...core.dtypes import DType
from ...core.errors import DeltaFormatError
from .base import from_planes, to_planes, unpack_stream
from .streams import Part, RawStream

#: Mantissa bits of each float dtype: the exponent field starts above them.
MANTISSA_BITS = {"F64": 52, "F32": 23, "F16": 10, "BF16": 7}

#: zstd settings for the stream, by element width (the format does not depend on them:
#: decoding is the same zstd decoder, at the same speed, whatever the writer chose).  16-bit
#: distances are low-entropy bytes with long runs, where the optimal parser (btopt, short
#: searches) saves 5-10 % over the default levels at a few times their encoding time; wider
#: distances have incompressible low planes, where it gains 1 % at 20 times the time, so
#: those get the fast double-hash matcher with long minimum matches (smaller than level 3).
ZSTD_PARAMETERS = {
    2: dict(window_log=20, min_match=7, strategy=zstandard.STRATEGY_BTOPT, search_log=1,
            hash_log=17, chain_log=17, target_length=32),
    4: dict(window_log=20, min_match=7, strategy=zstandard.STRATEGY_DFAST, search_log=1,
            hash_log=17, chain_log=17),
}
ZSTD_PARAMETERS[8] = ZSTD_PARAMETERS[4]


def exponent_bits(dt: DType) -> int:
    """Width of the exponent field of float dtype ``dt``."""
    return 8 * dt.itemsize - 1 - MANTISSA_BITS[dt.name]


def exponent_field(base: np.ndarray, dt: DType) -> np.ndarray:
    """The base's biased exponent fields (the codec's contexts), as uint16."""
    mant = MANTISSA_BITS[dt.name]
    field = (base >> base.dtype.type(mant)) & base.dtype.type((1 << exponent_bits(dt)) - 1)
    return field.astype(np.uint16)


def exponent_order(base: np.ndarray, dt: DType) -> np.ndarray:
    """The stored order of the kept values: indices sorted by the base's exponent field, stable."""
    return np.argsort(exponent_field(base, dt), kind="stable")


def exponent_counts(base: np.ndarray, dt: DType) -> np.ndarray:
    """How many of ``base`` have each exponent field (int64, ``2**exponent_bits`` entries):
    what a part of a record contributes to the stored order of the parts after it."""
    kernels, kind = native.float_kernels(dt.name)
    if kernels is not None:  # one pass, no field array
        counts = np.zeros(1 << exponent_bits(dt), np.int64)
        kernels.exponent_counts(kind, np.ascontiguousarray(base), counts)
        return counts
    return np.bincount(exponent_field(base, dt), minlength=1 << exponent_bits(dt)).astype(np.int64)


def order_key(bits: np.ndarray) -> np.ndarray:
    """The bits as an unsigned integer increasing with the float's value (a bijection):
    negative values have all bits flipped, the others only the sign bit."""
    kind = bits.dtype.type
    width = 8 * bits.dtype.itemsize
    top = kind(1 << (width - 1))
    flip = (kind(0) - (bits >> kind(width - 1))) | top   # all ones if negative, else the top bit
    return bits ^ flip


def from_order_key(key: np.ndarray) -> np.ndarray:
    """Inverse of :func:`order_key`."""
    kind = key.dtype.type
    width = 8 * key.dtype.itemsize
    top = kind(1 << (width - 1))
    flip = (kind(0) - ((key >> kind(width - 1)) ^ kind(1))) | top
    return key ^ flip


def zigzag(distance: np.ndarray) -> np.ndarray:
    """Two's-complement distances (modulo 2**width) as unsigned: 0, -1, 1, -2, ... -> 0, 1, 2, 3."""
    kind = distance.dtype.type
    return (distance << kind(1)) ^ (kind(0) - (distance >> kind(8 * distance.dtype.itemsize - 1)))


def unzigzag(z: np.ndarray) -> np.ndarray:
    kind = z.dtype.type
    return (z >> kind(1)) ^ (kind(0) - (z & kind(1)))


def stored_planes(kept: np.ndarray, base: np.ndarray, dt: DType) -> np.ndarray:
    """The raw stream: zigzagged distances in the stored order, as byte planes (uint8)."""
    kernels, kind = native.float_kernels(dt.name)
    if kernels is not None:  # the same bytes: a counting sort, no index array
        planes = np.empty(kept.size * dt.itemsize, np.uint8)
        kernels.ulp_encode(kind, np.ascontiguousarray(kept), np.ascontiguousarray(base), planes)
        return planes
    with np.errstate(over="ignore"):
        z = zigzag(order_key(kept) - order_key(base))
    return to_planes(z[exponent_order(base, dt)]).reshape(-1)


@dataclass(frozen=True)
class UlpValues:
    codec_id: str = "ulp"
    needs_base: bool = True
    exact: bool = True          # decodes to the fine-tuned bits exactly
    min_version: int = 3         # the format version that added it
    values_per_byte: int = 1     # at least one stream byte per value
    elementwise: bool = False   # the stored order comes from every kept base value

    def applies(self, dt: DType) -> bool:
        return dt.is_float

    def encode(self, kept: np.ndarray, base: np.ndarray, dt: DType) -> tuple[bytes, dict]:
        raw = stored_planes(kept, base, dt)
        if raw.size == 0:
            return b"", {"zstd": False, "raw_nbytes": 0}
        packed = self.stream_compressor(dt, raw.size).compress(raw)
        if len(packed) < raw.size:
            return packed, {"zstd": True, "raw_nbytes": int(raw.size)}
        return raw.tobytes(), {"zstd": False, "raw_nbytes": int(raw.size)}

    def stream_compressor(self, dt: DType, raw_nbytes: int, threads: int = 0
                          ) -> zstandard.ZstdCompressor:
        """The stream's compressor (``threads`` >= 1: zstd's workers, for a stream written
        from a temporary file: one frame still, the bytes a little different from one-thread
        zstd's and the same for any number of workers)."""
        params = zstandard.ZstdCompressionParameters(
            write_content_size=True, threads=max(0, threads),
            **ZSTD_PARAMETERS[dt.itemsize])
        return zstandard.ZstdCompressor(compression_params=params)

    def run_planes(self, kept: np.ndarray, base: np.ndarray, dt: DType) -> np.ndarray:
        """A run of kept values' stream bytes (``itemsize`` rows, one per byte plane), sorted
        by the base's exponent stably within the run: value ``j`` of the run's values of
        exponent ``e`` goes to slot ``start(e) + before(e) + j`` of the record, ``before(e)``
        the :meth:`run_contexts` of the runs before it (an exact record streamed,
        :mod:`...delta.spooled`)."""
        return stored_planes(kept, base, dt).reshape(dt.itemsize, kept.size)

    def run_contexts(self, base: np.ndarray, dt: DType) -> np.ndarray:
        """How many of a run's kept values have each exponent (see :meth:`run_planes`)."""
        return self.part_counts(base, dt)

    def decode(self, payload: bytes, config: dict, base: np.ndarray, dt: DType,
               count: int) -> np.ndarray:
        if not dt.is_float:
            raise DeltaFormatError(f"ulp values need a float dtype, got {dt.name}")
        raw = unpack_stream(payload, config, count * dt.itemsize)
        kernels, kind = native.float_kernels(dt.name)
        if kernels is not None:  # the same bits: a counting sort and one pass
            values = np.empty(count, dt.bits)
            kernels.ulp_decode(kind, raw, np.ascontiguousarray(base), values)
            return values
        z = np.empty(count, dt.bits)
        z[exponent_order(base, dt)] = from_planes(raw, dt.bits, count)
        with np.errstate(over="ignore"):
            return from_order_key(order_key(base) + unzigzag(z))

    def part_counts(self, base_part: np.ndarray, dt: DType) -> np.ndarray:
        """What a run of kept values contributes to the stored order (see decode_part)."""
        if not dt.is_float:
            raise DeltaFormatError(f"ulp values need a float dtype, got {dt.name}")
        return exponent_counts(np.ascontiguousarray(base_part), dt)

    def decode_part(self, payload: bytes, config: dict, base_part: np.ndarray, dt: DType,
                    count: int, before: np.ndarray, total: np.ndarray) -> np.ndarray:
        """The values of a run of consecutive kept values (kept indices ``a .. b - 1``),
        given the base bits of that run only, ``before`` = :func:`exponent_counts` of the
        base at kept indices ``0 .. a - 1`` and ``total`` = that of every kept value.

        Value ``i`` of exponent ``e`` is stored at slot ``start(e) + (kept values before i
        with exponent e)``, ``start(e)`` the number of kept values with a smaller exponent:
        so a run decodes from its own base bits and two histograms, without the base bits
        elsewhere (what row-block restores of large tensors use: the base read once for
        the histograms and once for the blocks).  The stream is decoded whole.
        """
        if not dt.is_float:
            raise DeltaFormatError(f"ulp values need a float dtype, got {dt.name}")
        raw = np.frombuffer(unpack_stream(payload, config, count * dt.itemsize), np.uint8)
        start = _starts(total, count, before)
        return _decode_run(raw, np.ascontiguousarray(base_part), dt, count, start + before,
                           start + total)

    def cursor(self, part: Part, config: dict, dt: DType, count: int, total: np.ndarray
               ) -> "UlpCursor":
        """Values in order, a run at a time; ``total`` is :func:`exponent_counts` of the base
        at every kept position (a pass over the base before decoding)."""
        if not dt.is_float:
            raise DeltaFormatError(f"ulp values need a float dtype, got {dt.name}")
        return UlpCursor(part.stream(config, count * dt.itemsize), dt, count, total)


def _starts(total: np.ndarray, count: int, before: np.ndarray) -> np.ndarray:
    """Where each exponent's values start in the stored order, after checking the counts."""
    if int(total.sum()) != count or (before > total).any():
        raise DeltaFormatError("ulp: the base's exponents do not match the record "
                               "(a different base?)")
    return np.concatenate([[0], np.cumsum(total)[:-1]]).astype(np.int64)


def _decode_run(raw: np.ndarray, base_part: np.ndarray, dt: DType, count: int,
                first_slot: np.ndarray, end_slot: np.ndarray) -> np.ndarray:
    """The values of a run of kept values whose exponent ``e`` values take stored slots from
    ``first_slot[e]`` on (and must end by ``end_slot[e]``), from the whole stream ``raw``."""
    kernels, kind = native.float_kernels(dt.name)
    if kernels is not None:  # the same bits: one pass, slots counted from first_slot
        values = np.empty(base_part.size, dt.bits)
        try:
            kernels.ulp_decode(kind, raw, base_part, values,
                               np.ascontiguousarray(first_slot, np.int64),
                               np.ascontiguousarray(end_slot, np.int64))
        except ValueError as exc:
            raise DeltaFormatError("ulp: the base's exponents do not match the record "
                                   "(a different base?)") from exc
        return values
    field = exponent_field(base_part, dt)
    order = np.argsort(field, kind="stable")
    ranked = field[order]
    # rank of each value among the run's values of the same exponent, in kept order
    rank = np.arange(field.size, dtype=np.int64) - np.searchsorted(ranked, ranked)
    slots = np.empty(field.size, np.int64)
    slots[order] = first_slot[ranked] + rank
    if field.size and (slots[order] >= end_slot[ranked]).any():
        raise DeltaFormatError("ulp: the base's exponents do not match the record "
                               "(a different base?)")
    planes = raw[:dt.itemsize * count].reshape(dt.itemsize, count)
    z = np.zeros(field.size, dt.bits)
    for i in range(dt.itemsize):  # gather the run's bytes plane by plane
        z |= planes[i].take(slots).astype(dt.bits) << dt.bits.type(8 * i)
    with np.errstate(over="ignore"):
        return from_order_key(order_key(base_part) + unzigzag(z))


class UlpCursor:
    """``ulp`` values in order, a run at a time: each run's slots come from the exponent
    counts of the runs before it, which the cursor keeps (see :meth:`UlpValues.decode_part`)."""

    def __init__(self, stream: RawStream, dt: DType, count: int, total: np.ndarray):
        self._stream, self._dt, self._count = stream, dt, count
        self._total = np.asarray(total, np.int64)
        self._before = np.zeros_like(self._total)
        self._start = _starts(self._total, count, self._before)
        self._at = 0

    def take(self, base: np.ndarray, n: int) -> np.ndarray:
        if n > self._count - self._at:
            raise DeltaFormatError(f"asked for values past the record's {self._count}")
        base = np.ascontiguousarray(base)
        values = _decode_run(self._stream.data, base, self._dt, self._count,
                             self._start + self._before, self._start + self._total)
        self._stream.release()
        self._before += exponent_counts(base, self._dt)
        self._at += n
        return values

    def close(self) -> None:
        self._stream.close()
