"""``tau``: the task vector tau = fine-tuned - base, in the wide float type, plus exceptions.

Kept positions are the largest |tau|, so their tau values share few exponents
and, for 16-bit models, use few of float32's mantissa bits: byte planes of
tau compress far better than the fine-tuned values themselves.

Decoding computes ``round(wide(base) + tau)`` in the model dtype.  That equals
the fine-tuned bits almost everywhere but not always (double rounding, sign
flips with large relative change, NaN payloads, -0.0), so the encoder checks
every position and stores the ones that differ, and every one whose sum is NaN
(its payload is the implementation's choice), as *exceptions*: their index
within the kept list (gap coded, uint32 byte planes) and their exact bits.
The result is bit-exact by construction, on any IEEE 754 implementation.

Payload: tau stream | exception-index stream | exception-bits stream.
Config: ``tau``, ``exc_index``, ``exc_bits`` (stream configs), the three
stream sizes in bytes (``*_nbytes``) and ``exceptions`` (their count).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import native
from ...core.dtypes import DType, from_wide, to_wide
from ...core.errors import DeltaFormatError
from .base import (
    ExceptionCursor,
    config_int,
    from_planes,
    gap_decode,
    gap_encode,
    pack_stream,
    split_streams,
    to_planes,
    unpack_stream,
)
from .streams import Part, RawStream

#: Exceptions decoded at a time by a cursor.
EXCEPTION_CHUNK = 1 << 18


@dataclass(frozen=True)
class TauValues:
    codec_id: str = "tau"
    needs_base: bool = True
    exact: bool = True          # decodes to the fine-tuned bits exactly
    min_version: int = 1         # the format version that added it
    values_per_byte: int = 1     # at least one stream byte per value
    elementwise: bool = True    # value i depends on base value i alone

    def applies(self, dt: DType) -> bool:
        return dt.is_float

    def encode(self, kept: np.ndarray, base: np.ndarray, dt: DType) -> tuple[bytes, dict]:
        base_wide = to_wide(base, dt)
        with np.errstate(all="ignore"):
            tau = to_wide(kept, dt) - base_wide
            summed = base_wide + tau
            rebuilt = from_wide(summed, dt)
        # A NaN sum is always an exception: IEEE 754 leaves its payload to the implementation
        # (numpy itself picks the base's NaN in SIMD lanes and tau's in a loop's scalar tail).
        exceptions = np.flatnonzero((rebuilt != kept) | np.isnan(summed))
        tau_stream, tau_config = pack_stream(to_planes(tau.view(dt.wide.str.replace("f", "u"))))
        index_stream, index_config = pack_stream(to_planes(gap_encode(exceptions).astype("<u4")))
        bits_stream, bits_config = pack_stream(to_planes(kept[exceptions]))
        config = {"exceptions": int(exceptions.size),
                  "tau": tau_config, "tau_nbytes": len(tau_stream),
                  "exc_index": index_config, "exc_index_nbytes": len(index_stream),
                  "exc_bits": bits_config, "exc_bits_nbytes": len(bits_stream)}
        return tau_stream + index_stream + bits_stream, config

    def decode(self, payload: bytes, config: dict, base: np.ndarray, dt: DType,
               count: int) -> np.ndarray:
        planes, exc_index, exc_bits = self.streams(payload, config, dt, count)
        values = _tau_sum(planes, base, dt, count)
        values[exc_index] = exc_bits
        return values

    def cursor(self, part: Part, config: dict, dt: DType, count: int) -> "TauCursor":
        n_exc, sizes = _layout(config, dt, count, part.length)
        tau_part, index_part, bits_part = part.split(sizes)
        exceptions = ExceptionCursor(index_part.stream(config["exc_index"], n_exc * 4),
                                     bits_part.stream(config["exc_bits"], n_exc * dt.itemsize),
                                     n_exc, count, dt.bits, EXCEPTION_CHUNK)
        return TauCursor(tau_part.stream(config["tau"], count * _wide_bits(dt).itemsize),
                         exceptions, dt, count)

    def decode_on_device(self, payload: bytes | memoryview, config: dict, base_kept, dt: DType,
                         count: int, send):
        """The fine-tuned bits on the device of ``base_kept``: tau's planes go there, are
        added to the widened base and rounded, then the exceptions (a handful, decoded on the
        host) are scattered over the result."""
        import torch

        from ...core.torch_bits import from_wide, planes_to_values, to_wide, wide_type
        planes, exc_index, exc_bits = self.streams(payload, config, dt, count)
        wide = wide_type(dt)
        wide_size = torch.empty(0, dtype=wide).element_size()
        tau = planes_to_values(send(np.frombuffer(planes, np.uint8)), wide_size, count).view(wide)
        bits = from_wide(to_wide(base_kept, dt) + tau, dt)
        if exc_index.size:
            bits[send(exc_index)] = send(exc_bits)
        return bits

    def streams(self, payload: bytes, config: dict, dt: DType, count: int
                ) -> tuple[bytes, np.ndarray, np.ndarray]:
        """The checked, decompressed parts of a payload: tau's byte planes (in the wide
        type), and the exceptions' indices and bits (decoding without the base; the device
        decoder adds the base on the device)."""
        n_exc, sizes = _layout(config, dt, count, len(payload))
        tau_stream, index_stream, bits_stream = split_streams(payload, sizes)
        wide_bits = _wide_bits(dt)
        planes = unpack_stream(tau_stream, config["tau"], count * wide_bits.itemsize)
        index_raw = unpack_stream(index_stream, config["exc_index"], n_exc * 4)
        index = gap_decode(from_planes(index_raw, np.dtype("<u4"), n_exc), max(count, 1))
        bits_raw = unpack_stream(bits_stream, config["exc_bits"], n_exc * dt.itemsize)
        return planes, index, from_planes(bits_raw, dt.bits, n_exc)


def _layout(config: dict, dt: DType, count: int, nbytes: int) -> tuple[int, list[int]]:
    """The checked config: the number of exceptions and the sizes of the three streams."""
    if not dt.is_float:
        raise DeltaFormatError(f"tau values need a float dtype, got {dt.name}")
    n_exc = config_int(config, "exceptions", 0, count)
    sizes = [config_int(config, key, 0, nbytes)
             for key in ("tau_nbytes", "exc_index_nbytes", "exc_bits_nbytes")]
    for key in ("tau", "exc_index", "exc_bits"):
        if not isinstance(config.get(key), dict):
            raise DeltaFormatError(f"tau config lacks its {key!r} stream config")
    return n_exc, sizes


def _wide_bits(dt: DType) -> np.dtype:
    return np.dtype(dt.wide.str.replace("f", "u"))


def _tau_sum(planes, base: np.ndarray, dt: DType, count: int) -> np.ndarray:
    """``round(wide(base) + tau)`` for tau given as the byte planes of its wide bits."""
    kernels, kind = native.float_kernels(dt.name)
    if kernels is not None:  # the same bits, one pass
        values = np.empty(count, dt.bits)
        if not kernels.tau_decode(kind, planes, np.ascontiguousarray(base), values):
            return values
        # a NaN met a NaN: numpy's own choice of payload, as written
    tau = from_planes(planes, _wide_bits(dt), count).view(dt.wide)
    with np.errstate(all="ignore"):
        return from_wide(to_wide(base, dt) + tau, dt)


class TauCursor:
    """``tau`` values in order, the next run at a time (see :class:`TauValues`)."""

    def __init__(self, stream: RawStream, exceptions: ExceptionCursor, dt: DType, count: int):
        self._stream, self._exceptions, self._dt, self._count = stream, exceptions, dt, count
        self._at = 0

    def take(self, base: np.ndarray, n: int) -> np.ndarray:
        if n > self._count - self._at:
            raise DeltaFormatError(f"asked for values past the record's {self._count}")
        planes = self._stream.planes(_wide_bits(self._dt).itemsize, self._count, self._at,
                                     self._at + n)
        self._stream.release()
        values = _tau_sum(planes, base, self._dt, n)
        index, bits = self._exceptions.upto(self._at + n)
        values[index - self._at] = bits
        self._at += n
        return values

    def close(self) -> None:
        self._stream.close()
        self._exceptions.close()
