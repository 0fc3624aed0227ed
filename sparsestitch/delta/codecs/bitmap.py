"""``bitmap``: one bit per element (little-endian bit order), then zstd.

Wins at high density, where a bit per element is cheaper than any list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import native
from ...core.errors import DeltaFormatError
from ...core.sizes import numel as count_elements
from .base import pack_stream, unpack_stream
from .streams import Part, RawStream


#: zstd's level for a bitmap marking a fifth or more of its elements (:func:`pack_dense`).
DENSE_LEVEL = 1


def pack_dense(packed: np.ndarray) -> tuple[bytes, dict]:
    """The ``bitmap`` payload of a bitmap marking a fifth or more of its elements: such bits
    are close to random, all zstd gains on them is the entropy of their bytes, and its fast
    level finds that at a fifth of the time of levels 3-6 (within 0.2% of their bytes on a
    synthetic dense fine-tune, smaller on SmolLM2's default delta; docs/results-compress.md)."""
    return pack_stream(packed, DENSE_LEVEL)


@dataclass(frozen=True)
class Bitmap:
    codec_id: str = "bitmap"

    def worth_trying(self, positions: np.ndarray, shape: tuple[int, ...]) -> bool:
        """Not below ~3% density, where a list is always smaller."""
        return positions.size * 32 >= count_elements(shape)

    def decode_on_device(self, payload: bytes | memoryview, config: dict,
                         shape: tuple[int, ...], count: int, send):
        """The positions on a torch device: the bytes go there, the bits are unpacked and
        the set ones listed."""
        import torch

        numel = count_elements(shape)
        raw = unpack_stream(payload, config, (numel + 7) // 8)
        packed = send(np.frombuffer(raw, np.uint8))
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        bits = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1).bool()
        if bool(bits[numel:].any()):
            raise DeltaFormatError("bitmap has bits set past the end of the tensor")
        positions = torch.nonzero(bits[:numel]).reshape(-1)
        if positions.numel() != count:
            raise DeltaFormatError(f"bitmap marks {positions.numel()} positions, the record "
                                   f"says {count}")
        return positions

    def applies(self, shape: tuple[int, ...], count: int) -> bool:
        return True

    def encode(self, positions: np.ndarray, shape: tuple[int, ...]) -> tuple[bytes, dict]:
        mask = np.zeros(count_elements(shape), dtype=np.uint8)
        mask[positions] = 1
        return self.encode_packed(np.packbits(mask, bitorder="little"))

    def encode_packed(self, packed: np.ndarray) -> tuple[bytes, dict]:
        """The payload of a bitmap already packed (:class:`BitmapBuilder`)."""
        return pack_stream(packed)

    def decode(self, payload: bytes, config: dict, shape: tuple[int, ...], count: int) -> np.ndarray:
        numel = count_elements(shape)
        raw = unpack_stream(payload, config, (numel + 7) // 8)
        return marked_positions(raw, numel, count)

    def decode_bits(self, payload: bytes, config: dict, shape: tuple[int, ...], count: int
                    ) -> np.ndarray:
        """The bits themselves (uint8), checked as :meth:`decode` checks them."""
        numel = count_elements(shape)
        bits = np.frombuffer(unpack_stream(payload, config, (numel + 7) // 8), np.uint8)
        if numel % 8 and bits.size and bits[-1] >> (numel % 8):
            raise DeltaFormatError("bitmap has bits set past the end of the tensor")
        found = marked_count(bits, 0, numel)
        if found != count:
            raise DeltaFormatError(f"bitmap marks {found} positions, the record says {count}")
        return bits

    def cursor(self, part: Part, config: dict, shape: tuple[int, ...], count: int) -> "BitmapCursor":
        numel = count_elements(shape)
        return BitmapCursor(part.stream(config, (numel + 7) // 8), numel, count)


class BitmapCursor:
    """The positions of a ``bitmap`` record in order: the set bits of one window of the
    bitmap at a time (a window of ``limit`` elements holds at most ``limit`` of them)."""

    def __init__(self, stream: RawStream, numel: int, count: int):
        self._stream, self._numel, self._count = stream, numel, count
        self._byte, self._found = 0, 0
        self._element = 0  # where the next :meth:`marks` window starts

    @property
    def at(self) -> int:
        """The element the next :meth:`marks` window starts at."""
        return self._element

    def marks(self, lo: int, hi: int) -> tuple[np.ndarray, int, int]:
        """The bits of elements ``lo ... hi - 1`` as ``(window, first, count)``: the bytes
        holding them, the bit of element ``lo`` in ``window`` and how many are set -- what
        :func:`gather_marked` and :func:`put_marked` take, with no position array.  Windows
        come in order, each starting where the last ended (not mixed with :meth:`next`)."""
        if lo != self._element or hi < lo or hi > self._numel or self._byte:
            raise ValueError(f"bitmap windows go in order: asked {lo}:{hi} at {self._element}")
        start, stop = lo // 8, (hi + 7) // 8
        window = self._stream.take(start, stop)
        self._stream.release()
        first = lo - 8 * start
        count = marked_count(window, first, hi - lo)
        self._found += count
        self._element = hi
        last = hi == self._numel
        if last and self._numel % 8 and window.size and window[-1] >> (self._numel % 8):
            raise DeltaFormatError("bitmap has bits set past the end of the tensor")
        if self._found > self._count or (last and self._found != self._count):
            raise DeltaFormatError(f"bitmap marks {'more than ' if not last else ''}"
                                   f"{self._found} positions, the record says {self._count}")
        return window, first, count

    def next(self, limit: int) -> np.ndarray:
        total = self._stream.nbytes
        while self._byte < total:
            # a window of ``limit`` elements holds at most ``limit`` positions
            start, stop = self._byte, min(total, self._byte + max(1, limit // 8))
            window = self._stream.take(start, stop)
            self._stream.release()
            self._byte = stop
            last = stop == total
            if last and self._numel % 8 and window[-1] >> (self._numel % 8):
                raise DeltaFormatError("bitmap has bits set past the end of the tensor")
            positions = window_positions(window, 8 * start)
            self._found += positions.size
            if self._found > self._count or (last and self._found != self._count):
                raise DeltaFormatError(f"bitmap marks {'more than ' if not last else ''}"
                                       f"{self._found} positions, the record says {self._count}")
            if positions.size:
                return positions
        if self._found != self._count:
            raise DeltaFormatError(f"bitmap marks {self._found} positions, the record says "
                                   f"{self._count}")
        return np.empty(0, np.int64)

    def close(self) -> None:
        self._stream.close()


def marked_count(window: np.ndarray, first: int, n: int) -> int:
    """How many of bits ``first ... first + n - 1`` of ``window`` are set."""
    kernels = native.kernels()
    if kernels is not None:
        return kernels.bitmap_count(window, first, n)
    return int(np.count_nonzero(_marks(window, first, n)))


def gather_marked(window: np.ndarray, first: int, block: np.ndarray, count: int) -> np.ndarray:
    """The elements of ``block`` whose bits (from bit ``first`` of ``window``) are set, in
    order (``count`` of them)."""
    kernels = native.kernels()
    if kernels is None:
        return block[_marks(window, first, block.size)]
    out = np.empty(count, block.dtype)
    kernels.bitmap_move(window, first, block, out, False)
    return out


class BitmapBuilder:
    """A tensor's bitmap (the codec's bit order) packed block by block as a selection pass
    hands over each block's kept elements, without listing their positions."""

    def __init__(self, numel: int):
        self.numel = numel
        self.packed = np.zeros((numel + 7) // 8, np.uint8)
        self.at = 0      # elements so far
        self.count = 0   # set bits so far

    def add(self, mask: np.ndarray | None, n: int, count: int | None = None) -> None:
        """The next ``n`` elements: ``mask`` (bool) marks the kept ones, ``count`` of them
        where the caller knows it; None: all of them."""
        start, stop = self.at, self.at + n
        if stop > self.numel:
            raise ValueError(f"{stop} elements for a bitmap of {self.numel}")
        if mask is None:  # whole bytes at once, the few bits around them one by one
            whole_from = min(stop, -(-start // 8) * 8)
            whole_to = max(whole_from, stop // 8 * 8)
            for i in (*range(start, whole_from), *range(whole_to, stop)):
                self.packed[i >> 3] |= 1 << (i & 7)
            self.packed[whole_from // 8:whole_to // 8] = 0xFF
            count = n
        else:
            lead = start % 8  # bits of the first byte that earlier blocks filled
            bits = np.packbits(np.concatenate([np.zeros(lead, bool), mask]) if lead else mask,
                               bitorder="little")
            self.packed[start // 8:start // 8 + bits.size] |= bits
        self.count += int(np.count_nonzero(mask)) if count is None else count
        self.at = stop

    def mark(self, n: int, set_bits) -> None:
        """The next ``n`` elements, their bits set by ``set_bits(window, first)``: ``window``
        the bytes holding them (zeroed so far), element ``i`` at bit ``first + i``; it returns
        how many it set."""
        start, stop = self.at, self.at + n
        if stop > self.numel:
            raise ValueError(f"{stop} elements for a bitmap of {self.numel}")
        self.count += set_bits(self.packed[start // 8:(stop + 7) // 8], start % 8)
        self.at = stop

    def finish(self) -> np.ndarray:
        if self.at != self.numel:
            raise ValueError(f"bitmap of {self.numel} elements given {self.at}")
        return self.packed


def put_marked(window: np.ndarray, first: int, block: np.ndarray, values: np.ndarray) -> None:
    """``values`` written over the elements of ``block`` whose bits are set, in order."""
    kernels = native.kernels()
    if kernels is None:
        block[_marks(window, first, block.size)] = values
    else:
        kernels.bitmap_move(window, first, block, np.ascontiguousarray(values, block.dtype), True)


def _marks(window: np.ndarray, first: int, n: int) -> np.ndarray:
    return np.unpackbits(window, bitorder="little").view(bool)[first:first + n]


def window_positions(window: np.ndarray, first: int) -> np.ndarray:
    """The set bits of ``window`` as positions counted from element ``first``."""
    kernels = native.kernels()
    if kernels is not None:  # room for every bit of the window: one pass
        positions = np.empty(8 * window.size, np.int64)
        positions = positions[:kernels.bitmap_positions(window, positions)]
    else:
        positions = np.flatnonzero(np.unpackbits(window, bitorder="little").view(bool))
        positions = positions.astype(np.int64, copy=False)
    if first:
        positions += first  # in place: a window holds millions of positions
    return positions


def marked_positions(raw: bytes | np.ndarray, numel: int, count: int) -> np.ndarray:
    """The positions (int64) a whole bitmap marks, checked against the element and record
    counts."""
    kernels = native.kernels()
    if kernels is not None:
        if numel % 8 and raw[-1] >> (numel % 8):
            raise DeltaFormatError("bitmap has bits set past the end of the tensor")
        # Count first: a hostile count must not size an allocation before it is checked.
        found = kernels.bitmap_positions(raw, np.empty(0, np.int64))
        positions = np.empty(count if found == count else 0, np.int64)
        kernels.bitmap_positions(raw, positions)
    else:
        # As bool: nonzero() of a bool array is ~3x faster than of uint8 (0/1 only here).
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little").view(bool)
        if bits[numel:].any():
            raise DeltaFormatError("bitmap has bits set past the end of the tensor")
        positions = np.flatnonzero(bits[:numel]).astype(np.int64)
        found = positions.size
    if found != count:
        raise DeltaFormatError(f"bitmap marks {found} positions, the record says {count}")
    return positions
