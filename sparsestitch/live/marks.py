"""What a tensor patched whole by one delta's bitmap (or every-element) record held before:
its bits at the record's marked elements, block by block, with the bitmap's bytes there.

Such a patch (a lone delta whose entries keep their bits, the default delta's usual case)
changes exactly the marked elements, and the merge gathers their base bits anyway to decode
the values (:meth:`~sparsestitch.delta.format.RecordCursor.replace_into`): keeping those is
the revert, with no copy of the tensor and no XOR pass -- the originals of the marked share
of it (about half of a default delta's tensors) and an eighth of a byte per element.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..delta.codecs.bitmap import put_marked


@dataclass
class SavedMarks:
    """Per block of elements ``lo .. hi - 1``, in order: the bitmap's bytes of it and the bit
    of element ``lo`` in them (None: every element) and the bits the marked elements held."""

    parts: list[tuple[int, int, np.ndarray | None, int, np.ndarray]] = field(default_factory=list)

    def add(self, lo: int, hi: int, window: np.ndarray | None, first: int,
            originals: np.ndarray) -> None:
        self.parts.append((lo, hi, None if window is None else np.array(window, copy=True),
                           first, originals))

    def put_back(self, flat: np.ndarray) -> None:
        """The saved bits written over the tensor's flat bits ``flat``."""
        for lo, hi, window, first, originals in self.parts:
            if window is None:
                flat[lo:hi] = originals
            else:
                put_marked(window, first, flat[lo:hi], originals)

    def before(self, values: np.ndarray, positions: np.ndarray) -> None:
        """``values`` (bits at sorted flat ``positions`` as the patch left them) turned into
        the bits there before it, in place."""
        for lo, hi, marks, rank, originals in self._parts_with_ranks():
            a, b = (int(x) for x in np.searchsorted(positions, [lo, hi]))
            if a == b:
                continue
            where = positions[a:b] - lo
            hit = marks[where]
            part = values[a:b]
            part[hit] = originals.view(values.dtype)[rank[where[hit]]]

    def before_chunk(self, chunk: np.ndarray, start: int) -> None:
        """:meth:`before` for the elements ``start, start + 1, ...`` (``chunk``)."""
        stop = start + chunk.size
        for lo, hi, marks, rank, originals in self._parts_with_ranks():
            a, b = max(lo, start), min(hi, stop)
            if a >= b:
                continue
            hit = marks[a - lo:b - lo]
            part = chunk[a - start:b - start]
            part[hit] = originals.view(chunk.dtype)[rank[a - lo:b - lo][hit]]

    def _parts_with_ranks(self):
        """Each part as ``(lo, hi, marked: bool per element, rank: each element's index
        among the marked ones, originals)`` (for stacked patches: not the apply and revert
        path, which moves bits without them)."""
        for lo, hi, window, first, originals in self.parts:
            if window is None:
                marks = np.ones(hi - lo, bool)
            else:
                marks = np.unpackbits(window, bitorder="little")[first:first + hi - lo].view(bool)
            yield lo, hi, marks, np.cumsum(marks) - 1, originals
