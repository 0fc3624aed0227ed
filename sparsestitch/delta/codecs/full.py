"""``all``: every position is kept (density 1.0 and dense records); no bytes stored."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core.errors import DeltaFormatError
from ...core.sizes import numel


@dataclass(frozen=True)
class AllPositions:
    codec_id: str = "all"

    def worth_trying(self, positions: np.ndarray, shape: tuple[int, ...]) -> bool:
        return True

    def applies(self, shape: tuple[int, ...], count: int) -> bool:
        return count == numel(shape)

    def encode(self, positions: np.ndarray, shape: tuple[int, ...]) -> tuple[bytes, dict]:
        return b"", {}

    def decode(self, payload: bytes, config: dict, shape: tuple[int, ...], count: int) -> np.ndarray:
        self.check(len(payload), shape, count)
        return np.arange(count, dtype=np.int64)

    def cursor(self, part, config: dict, shape: tuple[int, ...], count: int) -> "AllCursor":
        self.check(part.length, shape, count)
        return AllCursor(count)

    def check(self, payload_nbytes: int, shape: tuple[int, ...], count: int) -> None:
        """A valid ``all`` record: every element, no payload (callers that treat it as dense
        check it here instead of decoding positions)."""
        if count != numel(shape) or payload_nbytes:
            raise DeltaFormatError(f"'all' positions need count == numel ({count} vs {numel(shape)})"
                                   " and no payload")



class AllCursor:
    """Every position, a run at a time (for callers that want arrays even of dense records)."""

    def __init__(self, count: int):
        self._count, self._at = count, 0

    def next(self, limit: int) -> np.ndarray:
        n = min(limit, self._count - self._at)
        self._at += max(n, 0)
        return np.arange(self._at - max(n, 0), self._at, dtype=np.int64)

    def close(self) -> None:
        pass
