"""``xor``: fine-tuned bits XOR base bits, byte planes split, then zstd.

Exact for every dtype.  Small changes leave sign and exponent bits equal, so
the high byte planes are mostly zero; best for dense records of tensors that
changed a little everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core.dtypes import DType
from .base import from_planes, pack_stream, stream_compressor, to_planes, unpack_stream
from .streams import Part, PlanesCursor


@dataclass(frozen=True)
class XorValues:
    codec_id: str = "xor"
    needs_base: bool = True
    exact: bool = True          # decodes to the fine-tuned bits exactly
    min_version: int = 1         # the format version that added it
    values_per_byte: int = 1     # at least one stream byte per value
    elementwise: bool = True    # value i depends on base value i alone

    def applies(self, dt: DType) -> bool:
        return True

    def encode(self, kept: np.ndarray, base: np.ndarray, dt: DType) -> tuple[bytes, dict]:
        return pack_stream(to_planes(kept ^ base))

    def run_planes(self, kept: np.ndarray, base: np.ndarray, dt: DType) -> np.ndarray:
        """A run of kept values' stream bytes (``itemsize`` rows, one per byte plane) in
        stored order: kept order (an exact record streamed, :mod:`...delta.spooled`)."""
        return to_planes(kept ^ base)

    def run_contexts(self, base: np.ndarray, dt: DType) -> None:
        """The stored order is the kept order (no contexts; see :meth:`run_planes`)."""
        return None

    def stream_compressor(self, dt: DType, raw_nbytes: int, threads: int = 0):
        return stream_compressor(raw_nbytes, threads)

    def decode(self, payload: bytes, config: dict, base: np.ndarray, dt: DType,
               count: int) -> np.ndarray:
        raw = unpack_stream(payload, config, count * dt.itemsize)
        return from_planes(raw, dt.bits, count, xor=base)

    def decode_on_device(self, payload: bytes | memoryview, config: dict, base_kept, dt: DType,
                         count: int, send):
        """The fine-tuned bits on the device of ``base_kept`` (a torch tensor in the signed
        container): the planes go there and are XORed with the base bits."""
        from ...core.torch_bits import planes_to_values
        raw = unpack_stream(payload, config, count * dt.itemsize)
        return planes_to_values(send(np.frombuffer(raw, np.uint8)), dt.itemsize, count) ^ base_kept

    def cursor(self, part: Part, config: dict, dt: DType, count: int) -> PlanesCursor:
        return PlanesCursor(part.stream(config, count * dt.itemsize), dt.bits, count,
                            xor=True)
