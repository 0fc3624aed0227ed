"""Rice coding of non-negative integers, fully vectorized.

Each value ``g`` is split into a quotient ``g >> k`` and a ``k``-bit
remainder.  Quotients go to a *unary* bit stream (``q`` zero bits then a one)
and remainders to a fixed-width bit stream; keeping the two streams apart is
what lets numpy encode and decode without a per-value loop.  For geometric
gaps (random positions at density ``p``) this is within a few percent of the
entropy bound ``H(p)/p`` bits per position.  Bit order is little-endian
within bytes throughout.

This module is a helper for the ``rice`` and ``csr`` position codecs.
"""

from __future__ import annotations

import numpy as np

from ...core import native
from ...core.errors import DeltaFormatError
from .base import config_int

MAX_K = 32
_CHUNK = 1 << 20  # values per chunk; a multiple of 8 keeps chunks byte-aligned


def best_k(values: np.ndarray) -> int:
    """The Rice parameter that gives the fewest bits for ``values``."""
    if values.size == 0:
        return 0
    mean = float(values.mean())
    guess = min(MAX_K, max(0, int(np.log2(mean + 1.0))))  # gaps may exceed 2**MAX_K
    candidates = range(max(0, guess - 2), min(MAX_K, guess + 2) + 1)
    return min(candidates, key=lambda k: encoded_bits(values, k))


def encoded_bits(values: np.ndarray, k: int) -> int:
    """Exact size in bits of the Rice code of ``values`` with parameter ``k``."""
    return int(values.size) * (k + 1) + int((values >> np.uint64(k)).sum())


def encode(values: np.ndarray, k: int) -> tuple[bytes, bytes, int]:
    """Return ``(unary_bytes, remainder_bytes, unary_bits)`` for uint64 ``values``."""
    values = values.astype(np.uint64, copy=False)
    kernels = native.kernels()
    if kernels is not None:  # the same bits, one pass, no bit-per-byte temporaries
        unary_bits = encoded_bits(values, k) - values.size * k
        unary, remainders = (np.zeros((unary_bits + 7) // 8, np.uint8),
                             np.zeros((values.size * k + 7) // 8, np.uint8))
        kernels.rice_encode(np.ascontiguousarray(values), k, unary, remainders)
        return unary.tobytes(), remainders.tobytes(), unary_bits
    quotients = values >> np.uint64(k)
    ends = np.cumsum(quotients + np.uint64(1)).astype(np.int64) - 1
    unary_bits = int(ends[-1]) + 1 if values.size else 0
    unary = np.zeros(unary_bits, dtype=np.uint8)
    unary[ends] = 1
    unary_bytes = np.packbits(unary, bitorder="little").tobytes()
    chunks = []
    if k:
        mask = np.uint64((1 << k) - 1)
        for at in range(0, values.size, _CHUNK):
            rem = (values[at:at + _CHUNK] & mask).astype("<u8")
            bits = np.unpackbits(rem.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
            chunks.append(np.packbits(bits[:, :k].ravel(), bitorder="little").tobytes())
    return unary_bytes, b"".join(chunks), unary_bits


def decode(unary_bytes: bytes, remainder_bytes: bytes, count: int, k: int,
           unary_bits: int) -> np.ndarray:
    """Inverse of :func:`encode`; sizes were bounded by the caller."""
    if len(unary_bytes) != (unary_bits + 7) // 8:
        raise DeltaFormatError(f"unary stream has {len(unary_bytes)} bytes for {unary_bits} bits")
    if len(remainder_bytes) != (count * k + 7) // 8:
        raise DeltaFormatError(f"remainder stream has {len(remainder_bytes)} bytes, "
                               f"expected {(count * k + 7) // 8}")
    kernels = native.kernels()
    if kernels is not None:  # one pass over both streams, the same values and errors
        values = np.empty(count, np.uint64)
        ones, last_set = kernels.rice_decode(unary_bytes, remainder_bytes, k, unary_bits, values)
        if ones != count or (count and not last_set):
            raise DeltaFormatError(f"unary stream holds {ones} values, expected {count}")
        return values
    unary = np.unpackbits(np.frombuffer(unary_bytes, dtype=np.uint8), count=unary_bits,
                          bitorder="little")
    ends = np.flatnonzero(unary)
    if ends.size != count or (count and ends[-1] != unary_bits - 1):
        raise DeltaFormatError(f"unary stream holds {ends.size} values, expected {count}")
    quotients = np.diff(ends, prepend=-1).astype(np.uint64) - np.uint64(1)
    values = quotients << np.uint64(k)
    if k:
        raw = np.frombuffer(remainder_bytes, dtype=np.uint8)
        for at in range(0, count, _CHUNK):
            n = min(_CHUNK, count - at)
            bits = np.unpackbits(raw[at * k // 8:], count=n * k, bitorder="little").reshape(n, k)
            padded = np.zeros((n, 64), dtype=np.uint8)
            padded[:, :k] = bits
            values[at:at + n] |= np.packbits(padded, axis=1, bitorder="little").view("<u8").ravel()
    return values


#: Unary bits scanned at a time by the numpy twin of :func:`decode_at`.
_WINDOW_BITS = 1 << 23


def decode_at(unary: np.ndarray, remainders: np.ndarray, k: int, unary_bits: int,
              start_bit: int, start_index: int, count: int) -> tuple[np.ndarray, int]:
    """Up to ``count`` values from the middle of the streams (for chunked decoding): those
    after the one bit ending at ``start_bit - 1``, their remainders from field
    ``start_index``.  Returns the values (fewer only where the ``unary_bits`` ran out) and
    the bit after the last one decoded (``unary_bits`` when the stream ran out first).
    The caller checked the streams' byte lengths."""
    kernels = native.kernels()
    if kernels is not None:
        values = np.empty(count, np.uint64)
        found, next_bit = kernels.rice_decode_at(unary, remainders, k, unary_bits, start_bit,
                                                 start_index, values)
        return values[:found], int(next_bit)
    ends, found, at = [], 0, start_bit
    while found < count and at < unary_bits:
        stop = min(unary_bits, at + _WINDOW_BITS)
        window = np.unpackbits(unary[at // 8:(stop + 7) // 8], bitorder="little")
        ones = np.flatnonzero(window[at % 8:at % 8 + stop - at])[:count - found] + at
        ends.append(ones)
        found += ones.size
        at = int(ones[-1]) + 1 if found == count and ones.size else stop
    ends = np.concatenate(ends) if ends else np.empty(0, np.int64)
    next_bit = at if found == count else unary_bits
    if count == 0:
        next_bit = start_bit
    quotients = (np.diff(ends, prepend=start_bit - 1) - 1).astype(np.uint64)
    values = quotients << np.uint64(k)
    if k and ends.size:
        first = start_index * k
        raw = np.unpackbits(remainders[first // 8:((start_index + ends.size) * k + 7) // 8],
                                           bitorder="little")
        table = raw[first % 8:first % 8 + ends.size * k].reshape(ends.size, k)
        padded = np.zeros((ends.size, 64), np.uint8)
        padded[:, :k] = table
        values |= np.packbits(padded, axis=1, bitorder="little").view("<u8").ravel()
    return values, next_bit


def config_k(config: dict) -> int:
    return config_int(config, "k", 0, MAX_K)


class RiceReader:
    """The values of a Rice code in order, a bounded run at a time, with :func:`decode`'s
    checks (stream lengths first, the count of values and the final stop bit at the end)."""

    def __init__(self, unary, remainders, count: int, k: int, unary_bits: int):
        if unary.nbytes != (unary_bits + 7) // 8:
            raise DeltaFormatError(f"unary stream has {unary.nbytes} bytes for {unary_bits} bits")
        if remainders.nbytes != (count * k + 7) // 8:
            raise DeltaFormatError(f"remainder stream has {remainders.nbytes} bytes, "
                                   f"expected {(count * k + 7) // 8}")
        self._unary, self._remainders = unary, remainders
        self._count, self._k, self._bits = count, k, unary_bits
        self._at, self._bit = 0, 0

    def next(self, limit: int) -> np.ndarray:
        n = min(limit, self._count - self._at)
        if n <= 0:
            return np.empty(0, np.uint64)
        values, self._bit = decode_at(self._unary.data, self._remainders.data, self._k,
                                      self._bits, self._bit, self._at, n)
        self._unary.release()
        self._remainders.release()
        self._at += values.size
        if values.size < n or (self._at == self._count and self._bit != self._bits):
            raise DeltaFormatError(f"unary stream holds a number of values other than the "
                                   f"{self._count} expected")
        return values

    def close(self) -> None:
        self._unary.close()
        self._remainders.close()
