"""Position and value codecs, and the one registry that names them.

See :mod:`sparsestitch.delta.codecs.base` for the contract.  The packer encodes a
record with every applicable codec of each kind that can win and keeps the
smallest (earlier registry entries win ties; a planner's large records first rank their
position codecs on a sample of rows, see :func:`encode_positions`), so adding a codec is one
class plus one entry here; files name codecs by ``codec_id``, which must never change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core.dtypes import DType
from ...core.errors import DeltaFormatError
from ...core.sizes import numel as count_elements
from .base import LIST_BELOW
from .bitmap import Bitmap, marked_positions
from .csr import CSR
from .full import AllPositions
from .gaps import Gaps
from .lowrank import LowRankValues
from .quant import QuantValues
from .raw import RawValues
from .rice_gaps import RiceGaps
from .tau import TauValues
from .ulp import UlpValues
from .xor import XorValues

POSITION_CODECS = (AllPositions(), RiceGaps(), CSR(), Bitmap(), Gaps())
#: The packer tries the exact ones (all but ``quant`` and ``lowrank``, which
#: their planners choose by name) in this order;
#: ties go to the earlier entry, so a newer codec wins only where it is strictly smaller.
VALUE_CODECS = (TauValues(), XorValues(), RawValues(), QuantValues(), UlpValues(),
                LowRankValues())

_BITMAP = Bitmap()
_POSITIONS_BY_ID = {codec.codec_id: codec for codec in POSITION_CODECS}
_QUANT = QuantValues()
_VALUES_BY_ID = {codec.codec_id: codec for codec in VALUE_CODECS}


def version_needed(values_codec_id: object) -> int:
    """The lowest format version whose files may use this value codec (1 for a name no
    codec has: that record is refused when it is decoded, not when the file is listed)."""
    codec = _VALUES_BY_ID.get(values_codec_id) if isinstance(values_codec_id, str) else None
    return 1 if codec is None else codec.min_version


def values_per_byte(values_codec_id: object) -> int:
    """The most values one stored byte of this value codec's streams can hold."""
    codec = _VALUES_BY_ID.get(values_codec_id) if isinstance(values_codec_id, str) else None
    return 1 if codec is None else codec.values_per_byte


def position_codec(codec_id: str):
    """The position codec named ``codec_id`` in a file."""
    try:
        return _POSITIONS_BY_ID[codec_id]
    except (KeyError, TypeError):
        raise DeltaFormatError(f"unknown position codec {codec_id!r}") from None


def value_codec(codec_id: str):
    """The value codec named ``codec_id`` in a file."""
    try:
        return _VALUES_BY_ID[codec_id]
    except (KeyError, TypeError):
        raise DeltaFormatError(f"unknown value codec {codec_id!r}") from None


#: A record of at least this many kept positions, listed from a planner's bitmap, ranks its
#: position codecs on bands of its rows (:func:`sample_rows`) and encodes in full only those
#: within :data:`RANKED_WITHIN` of the best there.
RANK_ON_SAMPLE_FROM = 1 << 18
#: The sample: every SAMPLE_EVERY-th of SAMPLE_BANDS * SAMPLE_EVERY equal bands of rows.
SAMPLE_BANDS, SAMPLE_EVERY = 16, 8
#: Codecs whose sample bytes are within this factor of the smallest are encoded in full (1:
#: the sample's smallest, and any tied with it).  At 1.02, which decided near ties on the
#: whole record, the synthetic 1.83 GB default delta took 0.7 more one-thread seconds of
#: 10 for 15.8 KB less (0.011%): its random positions put every codec within 2% there.
RANKED_WITHIN = 1.0


def encode_positions(positions: np.ndarray, shape: tuple[int, ...],
                     packed: np.ndarray | None = None, rank_on_sample: bool = False
                     ) -> tuple[bytes, dict]:
    """Encode sorted flat ``positions`` with the smallest of the codecs worth trying.

    Codecs that cannot win for this density are skipped to save time: list codecs
    when a bitmap is certainly smaller, the bitmap below 1/32 density (where it can
    only win for strongly clustered positions, at some cost in size).

    Returns the payload and its config, which includes ``codec``.  ``packed``: the same
    positions as a bitmap already packed, which the bitmap codec then takes as it is.
    ``rank_on_sample``: a record of many positions in a matrix encodes in full only the
    codecs that come within :data:`RANKED_WITHIN` of the smallest on a sample of its rows
    (usually the smallest of all, else within a fraction of a percent of it; each full
    encoding of millions of positions costs tens of milliseconds).

    >>> payload, config = encode_positions(np.array([3, 70, 900]), (1000,))
    >>> config["codec"]
    'rice'
    """
    count = int(positions.size)
    candidates = [codec for codec in POSITION_CODECS
                  if codec.applies(shape, count) and codec.worth_trying(positions, shape)]
    if rank_on_sample and len(candidates) > 1 and count >= RANK_ON_SAMPLE_FROM:
        candidates = _ranked_on_sample(candidates, positions, shape)
    best = None
    for codec in candidates:
        payload, config = (codec.encode_packed(packed) if packed is not None and codec is _BITMAP
                           else codec.encode(positions, shape))
        if best is None or len(payload) < len(best[0]):
            best = (payload, {"codec": codec.codec_id, **config})
        if not payload:
            break  # nothing beats zero bytes
    return best


def sample_rows(positions: np.ndarray, shape: tuple[int, ...]
                ) -> tuple[np.ndarray, tuple[int, ...]] | None:
    """The positions in every :data:`SAMPLE_EVERY`-th of ``SAMPLE_BANDS * SAMPLE_EVERY``
    equal bands of a matrix's rows, as positions of the matrix those bands make stacked
    (rows keep their structure: runs, empty rows, column patterns); None where the matrix
    has too few rows for that."""
    rows = shape[0] if len(shape) >= 2 else 0
    bands = SAMPLE_BANDS * SAMPLE_EVERY
    if rows < bands:
        return None
    cols = count_elements(shape) // rows
    edges = np.arange(bands + 1, dtype=np.int64) * rows // bands
    parts, taken = [], 0
    for band in range(0, bands, SAMPLE_EVERY):
        first, stop = int(edges[band]), int(edges[band + 1])
        lo, hi = np.searchsorted(positions, (first * cols, stop * cols))
        parts.append(positions[lo:hi] - (first - taken) * cols)
        taken += stop - first
    return np.concatenate(parts), (taken, *shape[1:])


def _ranked_on_sample(candidates: list, positions: np.ndarray, shape: tuple[int, ...]) -> list:
    """The ``candidates`` (in registry order) whose bytes on :func:`sample_rows` are within
    :data:`RANKED_WITHIN` of the smallest there; all of them where there is no sample."""
    sampled = sample_rows(positions, shape)
    if sampled is None or sampled[0].size == 0:
        return candidates
    sample, sample_shape = sampled
    sizes = [len(codec.encode(sample, sample_shape)[0])
             if codec.applies(sample_shape, sample.size) else None for codec in candidates]
    known = [size for size in sizes if size is not None]
    if not known:
        return candidates
    best = min(known)
    return [codec for codec, size in zip(candidates, sizes)
            if size is None or size <= best * RANKED_WITHIN]


@dataclass(frozen=True)
class PackedPositions:
    """Kept positions held as a bitmap (a :class:`~.bitmap.BitmapBuilder`'s bytes): an
    eighth of a byte per element instead of eight bytes per kept one."""

    packed: np.ndarray
    count: int

    @property
    def size(self) -> int:
        return self.count

    def listed(self, elements: int) -> np.ndarray:
        """The positions, as int64."""
        return marked_positions(self.packed, elements, self.count)


def encode_position_bitmap(positions: PackedPositions, shape: tuple[int, ...],
                           rank_on_sample: bool = False) -> tuple[bytes, dict]:
    """What :func:`encode_positions` writes for these positions (``rank_on_sample`` as
    there), listing them only where a list codec is worth trying: every element is ``all``,
    and at half the elements or more only the bitmap can win."""
    elements = count_elements(shape)
    if positions.count == elements:
        return b"", {"codec": "all"}
    if positions.count * LIST_BELOW >= elements:
        payload, config = _BITMAP.encode_packed(positions.packed)
        return payload, {"codec": _BITMAP.codec_id, **config}
    return encode_positions(positions.listed(elements), shape, positions.packed, rank_on_sample)


#: Above this many values, the value codec is chosen on an evenly strided sample.
VALUE_SAMPLE_SIZE = 1 << 14


def encode_values(kept: np.ndarray, base: np.ndarray | None, dt: DType,
                  quantize: dict | None = None) -> tuple[bytes, dict]:
    """Encode the fine-tuned bits ``kept`` (given ``base`` bits, or None) with the smallest
    exact codec, or, with ``quantize`` (``{"bits": k, "group": g}``) on a float tensor with a
    base, with the lossy ``quant`` codec.

    Large records pick their codec on a strided sample and encode once.
    """
    if quantize is not None and dt.is_float and base is not None:
        payload, config = _QUANT.encode(kept, base, dt, **quantize)
        return payload, {"codec": _QUANT.codec_id, **config}
    candidates = [codec for codec in VALUE_CODECS if codec.exact
                  and codec.applies(dt) and not (codec.needs_base and base is None)]
    if kept.size > VALUE_SAMPLE_SIZE and len(candidates) > 1:
        step = kept.size // VALUE_SAMPLE_SIZE
        sample_base = None if base is None else base[::step]
        candidates = [min(candidates,
                          key=lambda c: len(c.encode(kept[::step], sample_base, dt)[0]))]
    best = None
    for codec in candidates:
        payload, config = codec.encode(kept, base, dt)
        if best is None or len(payload) < len(best[0]):
            best = (payload, {"codec": codec.codec_id, **config})
    return best
