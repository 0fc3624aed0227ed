"""``gaps``: sorted flat indices as gaps (first index, then distance - 1),
fixed-width little-endian integers, byte planes split, then zstd.

The plain, robust list encoding; ``rice`` usually beats it at low density.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DeltaFormatError
from ..sizes import numel
from .base import config_int, from_planes, gap_decode, gap_encode, pack_stream, to_planes, unpack_stream


@dataclass(frozen=True)
class Gaps:
    codec_id: str = "gaps"

    def applies(self, shape: tuple[int, ...], count: int) -> bool:
        return True

    def encode(self, positions: np.ndarray, shape: tuple[int, ...]) -> tuple[bytes, dict]:
        gaps = gap_encode(positions)
        width = 4 if gaps.size == 0 or int(gaps.max()) < 1 << 32 else 8
        stream, config = pack_stream(to_planes(gaps.astype(f"<u{width}")))
        return stream, {"width": width, **config}

    def decode(self, payload: bytes, config: dict, shape: tuple[int, ...], count: int) -> np.ndarray:
        width = config_int(config, "width", 4, 8)
        if width not in (4, 8):
            raise DeltaFormatError(f"gaps width must be 4 or 8, got {width}")
        raw = unpack_stream(payload, config, count * width)
        gaps = from_planes(raw, np.dtype(f"<u{width}"), count)
        return gap_decode(gaps, numel(shape))
