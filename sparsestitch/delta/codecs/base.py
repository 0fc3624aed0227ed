"""The codec contract, written once.

A delta record stores, for one tensor, *which* flat positions are kept and
*what* the fine-tuned bits are there.  Two kinds of codec do that:

* a **position codec** maps a sorted, duplicate-free ``int64`` array of flat
  positions (plus the tensor shape) to bytes and back;
* a **value codec** maps the fine-tuned bits at those positions (an unsigned
  integer array of the element width), given the base bits at the same
  positions, to bytes and back -- bit-exactly where ``exact`` (all but the lossy
  ``quant``).  ``needs_base`` says whether decoding reads the base bits;
  ``elementwise`` whether value ``i`` depends on base value ``i`` alone (then a
  record can be decoded with the right base bits inside one row block and
  anything elsewhere, as streamed restores do; ``ulp``, whose stored order
  comes from every kept base value, needs all of them).

Every codec is a small frozen class with a ``codec_id`` (the name written in
the file) and an explicit config: ``encode`` returns ``(payload, config)``
where ``config`` is a JSON-ready dict of exactly the fields ``decode`` needs.
Decoders treat the config and payload as untrusted: every size is checked
against what the record legitimately describes *before* anything is
allocated, and violations raise :class:`~sparsestitch.core.errors.DeltaFormatError`.

Streams inside a payload go through :func:`pack_stream`, which keeps zstd only
where it makes the stream smaller and records the raw size, so decompression
is bounded by construction.
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

import numpy as np
import zstandard

from ...core import native
from ...core.errors import DeltaFormatError, ResourceLimitError


@runtime_checkable
class PositionCodec(Protocol):
    """A position codec: all it is, in one class (a new codec is its module plus one entry
    in the registry, ``codecs/__init__.py``).  Optionally ``decode_on_device(payload,
    config, shape, count, send)``: the positions as a torch tensor on a device
    (:mod:`sparsestitch.delta.device`); without it they are decoded on the host."""

    codec_id: str

    def applies(self, shape: tuple[int, ...], count: int) -> bool: ...

    def worth_trying(self, positions: np.ndarray, shape: tuple[int, ...]) -> bool:
        """Whether the packer should encode with it: False where it certainly loses."""

    def encode(self, positions: np.ndarray, shape: tuple[int, ...]) -> tuple[bytes, dict]: ...

    def decode(self, payload: bytes, config: dict, shape: tuple[int, ...],
               count: int) -> np.ndarray: ...

    def cursor(self, part, config: dict, shape: tuple[int, ...], count: int): ...


@runtime_checkable
class ValueCodec(Protocol):
    """A value codec: all it is, in one class.  ``min_version`` is the format version that
    added it (a file holding it says at least that); ``values_per_byte`` the most values one
    stored byte can hold (the reader's count check before allocating).  Optionally
    ``decode_on_device(payload, config, base_kept, dt, count, send)``: the values decoded on
    the device of ``base_kept``."""

    codec_id: str
    needs_base: bool
    exact: bool
    elementwise: bool
    min_version: int
    values_per_byte: int

    def applies(self, dt) -> bool: ...

    def encode(self, kept: np.ndarray, base: np.ndarray | None, dt) -> tuple[bytes, dict]: ...

    def decode(self, payload: bytes, config: dict, base: np.ndarray | None, dt,
               count: int) -> np.ndarray: ...

    def cursor(self, part, config: dict, dt, count: int, *totals): ...


#: List position codecs (gaps, Rice, CSR) are worth trying only below this share of the
#: elements (kept * LIST_BELOW < elements): at or above it a bitmap, a bit per element, is
#: smaller than any list, whose entries take at least two bits.
LIST_BELOW = 2

#: zstd level for streams up to ZSTD_SMALL_LIMIT raw bytes, and for larger ones.
ZSTD_LEVEL_SMALL = 6
ZSTD_LEVEL_LARGE = 3
ZSTD_SMALL_LIMIT = 1 << 20
#: No zstd frame decompresses to more than this many bytes per stored byte (a block holds at
#: most 128 KiB and takes at least 4 bytes), so larger declared sizes are refused unallocated.
ZSTD_MAX_EXPANSION = 1 << 15


def pack_stream(raw: bytes | memoryview | np.ndarray, level: int | None = None
                ) -> tuple[bytes, dict]:
    """Compress ``raw`` with zstd when that helps (at ``level``, default :func:`zstd_level`);
    return ``(stream, config)``.

    >>> stream, cfg = pack_stream(bytes(1000))
    >>> cfg["zstd"], cfg["raw_nbytes"], len(stream) < 1000
    (True, 1000, True)
    """
    if isinstance(raw, np.ndarray):
        raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    raw = memoryview(raw).cast("B")
    n = raw.nbytes
    if n == 0:
        return b"", {"zstd": False, "raw_nbytes": 0}
    packed = _one_shot_compressor(zstd_level(n) if level is None else level).compress(raw)
    if len(packed) < n:
        return packed, {"zstd": True, "raw_nbytes": n}
    return bytes(raw), {"zstd": False, "raw_nbytes": n}


#: This thread's compressors for one-shot ``compress`` calls, by level: making one costs
#: about 27 us, which the planner's estimates (thousands of small streams a model) paid each
#: time.  Per thread, because a compressor must not be used by two threads at once; one-shot
#: only, because a stream writer left open on a shared compressor would be reset by the next.
_ONE_SHOT = threading.local()


def _one_shot_compressor(level: int) -> zstandard.ZstdCompressor:
    """:func:`stream_compressor`'s compressor of ``level`` for a single ``compress`` call,
    reused within the thread (the same parameters, so the same bytes)."""
    made = getattr(_ONE_SHOT, "by_level", None)
    if made is None:
        made = _ONE_SHOT.by_level = {}
    if level not in made:
        made[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return made[level]


def zstd_level(raw_nbytes: int) -> int:
    """The zstd level of a stream of ``raw_nbytes`` bytes (:data:`ZSTD_LEVEL_SMALL` up to
    :data:`ZSTD_SMALL_LIMIT`, then :data:`ZSTD_LEVEL_LARGE`)."""
    return ZSTD_LEVEL_SMALL if raw_nbytes <= ZSTD_SMALL_LIMIT else ZSTD_LEVEL_LARGE


def stream_compressor(raw_nbytes: int, threads: int = 0) -> zstandard.ZstdCompressor:
    """The zstd compressor :func:`pack_stream` uses for a stream of ``raw_nbytes`` bytes
    (``threads`` >= 1: zstd's workers, one frame still, the bytes a little different from
    one-thread zstd's and the same for any number of workers)."""
    level = zstd_level(raw_nbytes)
    if threads >= 1:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, write_content_size=True, threads=threads)
        return zstandard.ZstdCompressor(compression_params=params)
    return zstandard.ZstdCompressor(level=level, write_content_size=True)


def stream_is_zstd(config: dict, expected_nbytes: int) -> bool:
    """Check a stream's config against the raw size the record needs; whether it is zstd."""
    if not isinstance(config, dict):
        raise DeltaFormatError("stream config must be an object")
    raw_nbytes = config_int(config, "raw_nbytes", 0, expected_nbytes)
    if raw_nbytes != expected_nbytes:
        raise DeltaFormatError(f"stream declares {raw_nbytes} bytes, the record needs {expected_nbytes}")
    if type(config.get("zstd")) is not bool:
        raise DeltaFormatError(f"stream config field 'zstd' must be true or false, got {config.get('zstd')!r}")
    return config["zstd"]


def unpack_stream(stream: bytes | memoryview, config: dict, expected_nbytes: int) -> bytes:
    """Inverse of :func:`pack_stream`; refuses any size other than ``expected_nbytes``."""
    if not stream_is_zstd(config, expected_nbytes):
        if len(stream) != expected_nbytes:
            raise DeltaFormatError(f"raw stream has {len(stream)} bytes, expected {expected_nbytes}")
        return bytes(stream)
    try:
        declared = zstandard.frame_content_size(stream)
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"not a zstd frame ({exc})") from None
    if declared != expected_nbytes:
        raise ResourceLimitError(
            f"zstd frame declares {declared} bytes, the record needs {expected_nbytes}")
    if expected_nbytes > ZSTD_MAX_EXPANSION * len(stream):
        raise ResourceLimitError(f"a {len(stream)}-byte zstd frame cannot hold {expected_nbytes} bytes")
    try:
        out = zstandard.ZstdDecompressor().decompress(stream, max_output_size=expected_nbytes,
                                                      allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"zstd stream is corrupt ({exc})") from None
    if len(out) != expected_nbytes:
        raise DeltaFormatError(f"zstd stream gave {len(out)} bytes, expected {expected_nbytes}")
    return out


def config_int(config: dict, key: str, lo: int, hi: int) -> int:
    """Read an integer field of an untrusted config and check ``lo <= value <= hi``."""
    value = config.get(key)
    if type(value) is not int:  # bool is an int subclass; refuse it too
        raise DeltaFormatError(f"codec config field {key!r} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ResourceLimitError(f"codec config field {key!r}={value} is outside [{lo}, {hi}]")
    return value


def split_streams(payload: bytes | memoryview, sizes: list[int]) -> list[memoryview]:
    """Cut ``payload`` into consecutive streams of the given sizes (which must cover it)."""
    if sum(sizes) != len(payload):
        raise DeltaFormatError(f"streams of {sizes} bytes do not cover a {len(payload)}-byte payload")
    view, out, at = memoryview(payload), [], 0
    for size in sizes:
        out.append(view[at:at + size])
        at += size
    return out


def to_planes(values: np.ndarray) -> np.ndarray:
    """Byte-plane shuffle: all lowest bytes, then all next bytes, ... (helps zstd)."""
    values = np.ascontiguousarray(values)
    width = values.dtype.itemsize
    return np.ascontiguousarray(values.view(np.uint8).reshape(-1, width).T)


def from_planes(raw: bytes, dtype: np.dtype, count: int, xor: np.ndarray | None = None
                ) -> np.ndarray:
    """Inverse of :func:`to_planes`; XOR-ed with ``xor`` (same dtype) when given."""
    dtype = np.dtype(dtype)
    out = np.empty(count, dtype=dtype)
    kernels = native.kernels()
    if kernels is not None:
        kernels.from_planes(raw, out, xor)
        return out
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(dtype.itemsize, count)
    columns = out.view(np.uint8).reshape(count, dtype.itemsize)
    for i in range(dtype.itemsize):  # one strided write per plane beats a transposed copy
        columns[:, i] = planes[i]
    if xor is not None:
        out ^= xor
    return out


def gap_encode(positions: np.ndarray) -> np.ndarray:
    """Sorted positions -> gaps (first position, then distance - 1), as uint64."""
    gaps = np.diff(positions.astype(np.int64), prepend=-1) - 1
    return gaps.astype(np.uint64)


def gap_decode(gaps: np.ndarray, limit: int) -> np.ndarray:
    """Inverse of :func:`gap_encode`, checking every position is below ``limit``."""
    kernels = native.kernels()
    if kernels is not None and gaps.dtype.itemsize in (4, 8) and gaps.dtype.kind == "u":
        positions = np.empty(gaps.size, np.int64)
        if kernels.gap_decode(np.ascontiguousarray(gaps), positions, limit):
            return positions
        # Out of range: the numpy code below says where, in the same words.
    if gaps.size and int(gaps.max()) >= limit:
        raise DeltaFormatError(f"a position gap of {int(gaps.max())} exceeds the tensor size {limit}")
    positions = gaps.astype(np.int64)  # in place from here: one array, four passes
    positions += 1
    np.cumsum(positions, out=positions)
    positions -= 1
    if positions.size and positions[-1] >= limit:
        raise DeltaFormatError(f"position {int(positions[-1])} is outside a tensor of {limit} elements")
    return positions


def continue_gaps(gaps: np.ndarray, last: int, limit: int) -> np.ndarray:
    """:func:`gap_decode` of a run of gaps that follows position ``last`` (-1: the first run),
    for chunked decoding: the same positions and the same checks as decoding them all."""
    positions = gap_decode(gaps, limit)
    if last >= 0 and positions.size:
        positions += last + 1
        if positions[-1] >= limit:
            raise DeltaFormatError(f"position {int(positions[-1])} is outside a tensor of {limit} elements")
    return positions


class ExceptionCursor:
    """The exceptions of a ``tau`` or ``quant`` record (gap-coded indices into the kept
    values, and their exact bits), decoded a bounded run at a time, in order."""

    def __init__(self, index_stream, bits_stream, n_exc: int, count: int, bits_dtype: np.dtype,
                 chunk: int):
        self._index, self._bits, self._n = index_stream, bits_stream, n_exc
        self._limit, self._dtype, self._chunk = max(count, 1), np.dtype(bits_dtype), chunk
        self._decoded, self._last = 0, -1
        self._pending = np.empty(0, np.int64)
        self._pending_bits = np.empty(0, self._dtype)

    def upto(self, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """The exceptions not taken yet whose index is below ``stop``: ``(indices, bits)``."""
        while self._decoded < self._n and (not self._pending.size or self._pending[-1] < stop):
            n = min(self._chunk, self._n - self._decoded)
            gaps = from_planes(self._index.planes(4, self._n, self._decoded, self._decoded + n),
                               np.dtype("<u4"), n)
            found = continue_gaps(gaps, self._last, self._limit)
            bits = from_planes(self._bits.planes(self._dtype.itemsize, self._n, self._decoded,
                                                 self._decoded + n), self._dtype, n)
            self._index.release()
            self._bits.release()
            self._pending = np.concatenate([self._pending, found])
            self._pending_bits = np.concatenate([self._pending_bits, bits])
            self._decoded += n
            self._last = int(found[-1])
        cut = int(np.searchsorted(self._pending, stop))
        taken = self._pending[:cut], self._pending_bits[:cut]
        self._pending, self._pending_bits = self._pending[cut:], self._pending_bits[cut:]
        return taken

    def close(self) -> None:
        self._index.close()
        self._bits.close()
