"""``rice``: gaps between sorted flat indices, Rice coded (see :mod:`.rice`).

The compact list encoding for low densities: about ``log2(1/p) + 1.5`` bits
per kept position, close to the ``H(p)/p`` bound.  Config: ``k`` (Rice
parameter) and ``unary_bits`` (length of the unary stream).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core.sizes import numel as count_elements
from . import rice
from .base import LIST_BELOW, config_int, continue_gaps, gap_decode, gap_encode, split_streams
from .bitmap import window_positions
from .streams import Part


@dataclass(frozen=True)
class RiceGaps:
    codec_id: str = "rice"

    def worth_trying(self, positions: np.ndarray, shape: tuple[int, ...]) -> bool:
        """Not where a bitmap is certainly smaller (at least two bits per position)."""
        return positions.size * LIST_BELOW < count_elements(shape)

    def applies(self, shape: tuple[int, ...], count: int) -> bool:
        return True

    def encode(self, positions: np.ndarray, shape: tuple[int, ...]) -> tuple[bytes, dict]:
        gaps = gap_encode(positions)
        k = rice.best_k(gaps)
        unary, remainders, unary_bits = rice.encode(gaps, k)
        return unary + remainders, {"k": k, "unary_bits": unary_bits}

    def decode(self, payload: bytes, config: dict, shape: tuple[int, ...], count: int) -> np.ndarray:
        numel = count_elements(shape)
        k = rice.config_k(config)
        # Each gap contributes its quotient plus one stop bit, and gaps sum to < numel.
        unary_bits = config_int(config, "unary_bits", count, count + numel)
        unary, remainders = split_streams(payload, [(unary_bits + 7) // 8,
                                                    len(payload) - (unary_bits + 7) // 8])
        gaps = rice.decode(unary, remainders, count, k, unary_bits)
        return gap_decode(gaps, numel)

    def cursor(self, part: Part, config: dict, shape: tuple[int, ...], count: int) -> "RiceCursor":
        numel = count_elements(shape)
        k = rice.config_k(config)
        unary_bits = config_int(config, "unary_bits", count, count + numel)
        unary, remainders = part.split([(unary_bits + 7) // 8,
                                        part.length - (unary_bits + 7) // 8])
        reader = rice.RiceReader(unary.raw(), remainders.raw(), count, k, unary_bits)
        return RiceCursor(reader, numel)


class RiceCursor:
    """The positions of a ``rice`` record in order, a bounded run at a time."""

    def __init__(self, reader: "rice.RiceReader", numel: int):
        self._reader, self._numel, self._last = reader, numel, -1

    def next(self, limit: int) -> np.ndarray:
        gaps = self._reader.next(limit)
        if not gaps.size:
            return np.empty(0, np.int64)
        positions = continue_gaps(gaps, self._last, self._numel)
        self._last = int(positions[-1])
        return positions

    def close(self) -> None:
        self._reader.close()


#: Bytes of a bitmap (8 elements each) turned into positions at a time by the windowed
#: encoder below.
WINDOW_BYTES = 1 << 17


def _window_gaps(packed: np.ndarray):
    """The gaps (uint64) of the positions a packed bitmap marks, a window at a time."""
    last = -1
    for at in range(0, packed.size, WINDOW_BYTES):
        positions = window_positions(packed[at:at + WINDOW_BYTES], 8 * at)
        if positions.size:
            gaps = np.diff(positions, prepend=last) - 1
            last = int(positions[-1])
            yield gaps.astype(np.uint64)


def bitmap_plan(packed: np.ndarray, count: int) -> tuple[int, int, int]:
    """``(k, unary_bits, remainder_bits)`` of the ``rice`` code of the ``count`` positions a
    packed bitmap marks (the Rice parameter by :func:`rice.best_k`'s rule), counted a window
    at a time instead of from a list of positions."""
    if count == 0:
        return 0, 0, 0
    marked = np.flatnonzero(packed)
    last = 8 * int(marked[-1]) + int(packed[marked[-1]]).bit_length() - 1
    mean = (last - (count - 1)) / count  # the gaps sum to last - (count - 1)
    guess = min(rice.MAX_K, max(0, int(np.log2(mean + 1.0))))
    candidates = list(range(max(0, guess - 2), min(rice.MAX_K, guess + 2) + 1))
    quotients = [0] * len(candidates)
    for gaps in _window_gaps(packed):
        for i, k in enumerate(candidates):
            quotients[i] += int((gaps >> np.uint64(k)).sum())
    bits = [count * (k + 1) + q for k, q in zip(candidates, quotients)]
    best = int(np.argmin(bits))  # the first of equal sizes, as best_k
    k = candidates[best]
    return k, quotients[best] + count, count * k


def encode_bitmap(packed: np.ndarray, k: int, unary, remainders) -> None:
    """Append the ``rice`` streams of the positions a packed bitmap marks to ``unary`` and
    ``remainders`` (bit strings with ``append(packed, nbits)``: ``delta.spooled.BitAppender``),
    a window at a time."""
    for gaps in _window_gaps(packed):
        unary_bytes, remainder_bytes, unary_bits = rice.encode(gaps, k)
        unary.append(np.frombuffer(unary_bytes, np.uint8), unary_bits)
        remainders.append(np.frombuffer(remainder_bytes, np.uint8), gaps.size * k)
