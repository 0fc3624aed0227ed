"""``all``: every position is kept (density 1.0 and dense records); no bytes stored."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DeltaFormatError


@dataclass(frozen=True)
class AllPositions:
    codec_id: str = "all"

    def applies(self, shape: tuple[int, ...], count: int) -> bool:
        return count == _numel(shape)

    def encode(self, positions: np.ndarray, shape: tuple[int, ...]) -> tuple[bytes, dict]:
        return b"", {}

    def decode(self, payload: bytes, config: dict, shape: tuple[int, ...], count: int) -> np.ndarray:
        if count != _numel(shape) or len(payload):
            raise DeltaFormatError(f"'all' positions need count == numel ({count} vs {_numel(shape)})"
                                   " and no payload")
        return np.arange(count, dtype=np.int64)


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1
