"""``gaps``: sorted flat indices as gaps (first index, then distance - 1),
fixed-width little-endian integers, byte planes split, then zstd.

The plain, robust list encoding; ``rice`` usually beats it at low density.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core.errors import DeltaFormatError
from ...core.sizes import numel
from .base import (
    config_int,
    continue_gaps,
    from_planes,
    gap_decode,
    gap_encode,
    pack_stream,
    to_planes,
    unpack_stream,
)
from .streams import Part, RawStream


@dataclass(frozen=True)
class Gaps:
    codec_id: str = "gaps"

    def worth_trying(self, positions: np.ndarray, shape: tuple[int, ...]) -> bool:
        """Not where a bitmap is certainly smaller (a byte or more per position)."""
        return positions.size * 8 < numel(shape)

    def decode_on_device(self, payload: bytes | memoryview, config: dict,
                         shape: tuple[int, ...], count: int, send):
        """The positions on a torch device (``send`` moves a host array there): the planes
        go to the device, the gaps become positions by one prefix sum."""
        import torch

        from ...core.torch_bits import planes_to_values
        elements = numel(shape)
        width = config_int(config, "width", 4, 8)
        if width not in (4, 8):
            raise DeltaFormatError(f"gaps width must be 4 or 8, got {width}")
        raw = unpack_stream(payload, config, count * width)
        gaps = planes_to_values(send(np.frombuffer(raw, np.uint8)), width, count).long()
        if width == 4:
            gaps &= 0xFFFFFFFF  # read as unsigned
        # A negative int64 is a gap of 2**63 or more: out of range like any gap >= numel.
        if count and bool(((gaps < 0) | (gaps >= elements)).any()):
            raise DeltaFormatError(f"a position gap exceeds the tensor size {elements}")
        positions = torch.cumsum(gaps + 1, 0) - 1
        if count and int(positions[-1]) >= elements:
            raise DeltaFormatError(f"position {int(positions[-1])} is outside a tensor of "
                                   f"{elements} elements")
        return positions

    def applies(self, shape: tuple[int, ...], count: int) -> bool:
        return True

    def encode(self, positions: np.ndarray, shape: tuple[int, ...]) -> tuple[bytes, dict]:
        gaps = gap_encode(positions)
        width = 4 if gaps.size == 0 or int(gaps.max()) < 1 << 32 else 8
        stream, config = pack_stream(to_planes(gaps.astype(f"<u{width}")))
        return stream, {"width": width, **config}

    def decode(self, payload: bytes, config: dict, shape: tuple[int, ...], count: int) -> np.ndarray:
        width = self._width(config)
        raw = unpack_stream(payload, config, count * width)
        gaps = from_planes(raw, np.dtype(f"<u{width}"), count)
        return gap_decode(gaps, numel(shape))

    def cursor(self, part: Part, config: dict, shape: tuple[int, ...], count: int) -> "GapsCursor":
        width = self._width(config)
        return GapsCursor(part.stream(config, count * width), width, count, numel(shape))

    @staticmethod
    def _width(config: dict) -> int:
        width = config_int(config, "width", 4, 8)
        if width not in (4, 8):
            raise DeltaFormatError(f"gaps width must be 4 or 8, got {width}")
        return width


class GapsCursor:
    """The positions of a ``gaps`` record in order, a bounded run at a time."""

    def __init__(self, stream: RawStream, width: int, count: int, numel: int):
        self._stream, self._dtype, self._count, self._numel = stream, np.dtype(f"<u{width}"), count, numel
        self._at, self._last = 0, -1

    def next(self, limit: int) -> np.ndarray:
        n = min(limit, self._count - self._at)
        if n <= 0:
            return np.empty(0, np.int64)
        planes = self._stream.planes(self._dtype.itemsize, self._count, self._at, self._at + n)
        self._stream.release()
        positions = continue_gaps(from_planes(planes, self._dtype, n), self._last, self._numel)
        self._at, self._last = self._at + n, int(positions[-1])
        return positions

    def close(self) -> None:
        self._stream.close()
