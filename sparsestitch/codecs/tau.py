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

from .. import native
from ..dtypes import DType, from_wide, to_wide
from ..errors import DeltaFormatError
from .base import (config_int, from_planes, gap_decode, gap_encode, pack_stream, split_streams,
                   to_planes, unpack_stream)


@dataclass(frozen=True)
class TauValues:
    codec_id: str = "tau"
    needs_base: bool = True
    exact: bool = True          # decodes to the fine-tuned bits exactly
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
        wide_bits = np.dtype(dt.wide.str.replace("f", "u"))
        kernels, kind = native.float_kernels(dt.name)
        values = None
        if kernels is not None:  # the same bits, one pass
            values = np.empty(count, dt.bits)
            if kernels.tau_decode(kind, planes, np.ascontiguousarray(base), values):
                values = None  # a NaN met a NaN: numpy's own choice of payload, as written
        if values is None:
            tau = from_planes(planes, wide_bits, count).view(dt.wide)
            with np.errstate(all="ignore"):
                values = from_wide(to_wide(base, dt) + tau, dt)
        values[exc_index] = exc_bits
        return values

    def streams(self, payload: bytes, config: dict, dt: DType, count: int
                ) -> tuple[bytes, np.ndarray, np.ndarray]:
        """The checked, decompressed parts of a payload: tau's byte planes (in the wide
        type), and the exceptions' indices and bits (decoding without the base; the device
        decoder adds the base on the device)."""
        if not dt.is_float:
            raise DeltaFormatError(f"tau values need a float dtype, got {dt.name}")
        n_exc = config_int(config, "exceptions", 0, count)
        sizes = [config_int(config, key, 0, len(payload))
                 for key in ("tau_nbytes", "exc_index_nbytes", "exc_bits_nbytes")]
        tau_stream, index_stream, bits_stream = split_streams(payload, sizes)
        for key in ("tau", "exc_index", "exc_bits"):
            if not isinstance(config.get(key), dict):
                raise DeltaFormatError(f"tau config lacks its {key!r} stream config")
        wide_bits = np.dtype(dt.wide.str.replace("f", "u"))
        planes = unpack_stream(tau_stream, config["tau"], count * wide_bits.itemsize)
        index_raw = unpack_stream(index_stream, config["exc_index"], n_exc * 4)
        index = gap_decode(from_planes(index_raw, np.dtype("<u4"), n_exc), max(count, 1))
        bits_raw = unpack_stream(bits_stream, config["exc_bits"], n_exc * dt.itemsize)
        return planes, index, from_planes(bits_raw, dt.bits, n_exc)
