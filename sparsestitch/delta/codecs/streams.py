"""Payloads and their streams read by range, so a record can be decoded in bounded chunks.

A record's payload is a few streams (positions, values, exceptions, ...), each stored raw or
as one zstd frame (:func:`~sparsestitch.delta.codecs.base.pack_stream`).  Decoding a record whole
needs every stream in memory; decoding it in chunks (:mod:`.cursors`) needs only a range of
each at a time.  Here:

* a :class:`Payload` is the record's bytes, in memory (:class:`BytesPayload`) or still in the
  delta file (:class:`FilePayload`, its checksum verified by a streaming pass first);
* :func:`open_stream` gives one stream's *raw* bytes as a :class:`RawStream`: in memory when
  small, else a raw stream mapped from the delta file, or a zstd frame decompressed once,
  chunk by chunk, into an unlinked temporary file and mapped from there.  Mapped pages are
  dropped from memory (``MADV_DONTNEED``) whenever the caller :meth:`~RawStream.release`\\ s,
  so what a chunked decoder holds is its chunk, whatever the stream's size.

The checks are those of :func:`~sparsestitch.delta.codecs.base.unpack_stream`, plus the exact frame
length (block headers walked without decompressing), so a stream that one path refuses the
other refuses too.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from typing import Protocol

import numpy as np
import zstandard

from ...core.errors import DeltaFormatError, ResourceLimitError
from .base import ZSTD_MAX_EXPANSION, from_planes, stream_is_zstd, unpack_stream

#: Bytes read from a file, or decompressed, at a time.
IO_CHUNK = 4 << 20


class Payload(Protocol):
    """A record's payload, readable by byte range."""

    nbytes: int

    def read(self, start: int, count: int) -> bytes: ...

    def raw(self, start: int, count: int) -> "RawStream": ...


class BytesPayload:
    """A payload held in memory (its checksum already checked)."""

    def __init__(self, data: bytes | memoryview):
        self._data = memoryview(data)
        self.nbytes = len(self._data)

    def read(self, start: int, count: int) -> bytes:
        return bytes(self._data[start:start + count])

    def raw(self, start: int, count: int) -> "RawStream":
        return RawStream(np.frombuffer(self._data[start:start + count], np.uint8))


class FilePayload:
    """A payload left in the delta file: ``nbytes`` at ``offset`` of the open file ``fd``."""

    def __init__(self, fd: int, offset: int, nbytes: int):
        self._fd, self._offset, self.nbytes = fd, offset, nbytes

    def read(self, start: int, count: int) -> bytes:
        count = max(0, min(count, self.nbytes - start))
        parts, got = [], 0
        while got < count:
            part = os.pread(self._fd, count - got, self._offset + start + got)
            if not part:
                raise DeltaFormatError("payload is truncated")
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    def raw(self, start: int, count: int) -> "RawStream":
        return RawStream.mapped(self._fd, self._offset + start, count)


class RawStream:
    """A stream's raw bytes, by range; ``release`` drops what mapped reads pulled in."""

    def __init__(self, data: np.ndarray, mapping: mmap.mmap | None = None, keep=None):
        self.data = data            # uint8, the whole stream (a view of a mapping or of memory)
        self.nbytes = int(data.size)
        self._mapping, self._keep = mapping, keep

    @classmethod
    def mapped(cls, fd: int, offset: int, nbytes: int, keep=None) -> "RawStream":
        if nbytes == 0:
            return cls(np.empty(0, np.uint8))
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(fd, nbytes + offset - aligned, access=mmap.ACCESS_READ,
                            offset=aligned)
        data = np.frombuffer(mapping, np.uint8, nbytes, offset - aligned)
        return cls(data, mapping, keep)

    def take(self, start: int, stop: int) -> np.ndarray:
        """Bytes ``start:stop`` as a fresh array (valid after :meth:`release`)."""
        return np.array(self.data[start:stop])

    def planes(self, width: int, count: int, start: int, stop: int) -> np.ndarray:
        """Items ``start:stop`` of ``count`` items stored as ``width`` byte planes, as the
        contiguous planes of just those items (what ``from_planes`` of ``stop - start`` reads)."""
        planes = self.data[:width * count].reshape(width, count)
        return np.ascontiguousarray(planes[:, start:stop]).reshape(-1)

    def release(self) -> None:
        """Let the pages read so far go (a mapped stream's resident memory drops to zero)."""
        if self._mapping is not None and hasattr(self._mapping, "madvise"):
            self._mapping.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.data = np.empty(0, np.uint8)
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:  # a view still exported: the mapping goes with its last user
                pass
            self._mapping = None
        if self._keep is not None:
            self._keep.close()
            self._keep = None


def open_stream(payload: Payload, start: int, length: int, config: dict, expected_nbytes: int,
                memory_limit: int, spool_dir: str | None = None) -> RawStream:
    """The raw bytes of the stream at ``start:start + length`` of ``payload`` (``config`` as
    :func:`~sparsestitch.delta.codecs.base.pack_stream` wrote it), which must be exactly
    ``expected_nbytes``: in memory up to ``memory_limit`` bytes, else mapped (raw) or
    decompressed into a temporary file in ``spool_dir`` (zstd) and mapped."""
    if not stream_is_zstd(config, expected_nbytes):
        if length != expected_nbytes:
            raise DeltaFormatError(f"raw stream has {length} bytes, expected {expected_nbytes}")
        if length <= memory_limit:
            return RawStream(np.frombuffer(payload.read(start, length), np.uint8))
        return payload.raw(start, length)
    if expected_nbytes <= memory_limit and length <= memory_limit:
        raw = unpack_stream(payload.read(start, length), config, expected_nbytes)
        return RawStream(np.frombuffer(raw, np.uint8))
    return _spooled(payload, start, length, expected_nbytes, spool_dir)


def _spooled(payload: Payload, start: int, length: int, expected: int,
             spool_dir: str | None) -> RawStream:
    head = payload.read(start, min(length, 18))
    try:
        declared = zstandard.frame_content_size(head)
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"not a zstd frame ({exc})") from None
    if declared != expected:
        raise ResourceLimitError(f"zstd frame declares {declared} bytes, the record needs {expected}")
    if expected > ZSTD_MAX_EXPANSION * length:
        raise ResourceLimitError(f"a {length}-byte zstd frame cannot hold {expected} bytes")
    if frame_length(payload, start, length) != length:
        raise DeltaFormatError("zstd stream is corrupt (its frame does not end where the "
                               "stream does)")
    spool = tempfile.TemporaryFile(dir=spool_dir)
    try:
        source = _PayloadReader(payload, start, length)
        reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=IO_CHUNK,
                                                            closefd=False)
        written = 0
        while written < expected:
            chunk = reader.read(min(IO_CHUNK, expected - written))
            if not chunk:
                break
            spool.write(chunk)
            written += len(chunk)
        if written != expected or reader.read(1):
            raise DeltaFormatError(f"zstd stream gave {written}+ bytes, expected {expected}")
        spool.flush()
        return RawStream.mapped(spool.fileno(), 0, expected, keep=spool)
    except zstandard.ZstdError as exc:
        spool.close()
        raise DeltaFormatError(f"zstd stream is corrupt ({exc})") from None
    except BaseException:
        spool.close()
        raise


def frame_length(payload: Payload, start: int, length: int) -> int:
    """The length of the zstd frame at ``start`` from its block headers (nothing
    decompressed): magic and frame header, each block's 3-byte header and content, and the
    optional checksum."""
    window = _Window(payload, start, length)
    head = window.read(0, 18)
    try:
        at = zstandard.frame_header_size(head)
        has_checksum = zstandard.get_frame_parameters(head).has_checksum
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"not a zstd frame ({exc})") from None
    while True:
        header = window.read(at, 3)
        if len(header) < 3:
            raise DeltaFormatError("zstd stream is corrupt (truncated block)")
        value = int.from_bytes(header, "little")
        last, kind, size = value & 1, (value >> 1) & 3, value >> 3
        if kind == 3:
            raise DeltaFormatError("zstd stream is corrupt (reserved block type)")
        at += 3 + (1 if kind == 1 else size)
        if last:
            return at + (4 if has_checksum else 0)
        if at > length:
            raise DeltaFormatError("zstd stream is corrupt (blocks run past the stream)")


class _Window:
    """Small reads of a payload range through a cached window."""

    def __init__(self, payload: Payload, start: int, length: int):
        self._payload, self._start, self._length = payload, start, length
        self._at, self._data = 0, b""

    def read(self, at: int, count: int) -> bytes:
        if at < self._at or at + count > self._at + len(self._data):
            self._at = at
            self._data = self._payload.read(self._start + at,
                                            max(count, min(IO_CHUNK, self._length - at)))
        return self._data[at - self._at:at - self._at + count]


class _PayloadReader:
    """A file-like view of a payload range for zstd's stream reader."""

    def __init__(self, payload: Payload, start: int, length: int):
        self._payload, self._start, self._length, self._at = payload, start, length, 0

    def read(self, size: int = -1) -> bytes:
        size = self._length - self._at if size < 0 else min(size, self._length - self._at)
        data = self._payload.read(self._start + self._at, size) if size > 0 else b""
        self._at += len(data)
        return data


class Part:
    """A range of a payload that one codec decodes (the positions' bytes, or the values'),
    with what opening its streams needs: the bytes to keep in memory at most, and where to
    spool larger decompressed streams."""

    def __init__(self, payload: Payload, start: int, length: int, memory_limit: int,
                 spool_dir: str | None = None, opened: list | None = None):
        self.payload, self.start, self.length = payload, start, length
        self.memory_limit, self.spool_dir = memory_limit, spool_dir
        #: Every stream opened through this part or the parts split from it, so a caller
        #: whose decoder failed half-built can close them all (:meth:`close_all`).
        self.opened = [] if opened is None else opened

    def split(self, sizes: list[int]) -> list["Part"]:
        """Consecutive parts of the given sizes, which must cover this one (as
        :func:`~sparsestitch.delta.codecs.base.split_streams`)."""
        if sum(sizes) != self.length:
            raise DeltaFormatError(f"streams of {sizes} bytes do not cover a {self.length}-byte payload")
        parts, at = [], self.start
        for size in sizes:
            parts.append(Part(self.payload, at, size, self.memory_limit, self.spool_dir,
                              self.opened))
            at += size
        return parts

    def stream(self, config, expected_nbytes: int) -> RawStream:
        """This part as one packed stream (see :func:`open_stream`)."""
        stream = open_stream(self.payload, self.start, self.length, config, expected_nbytes,
                             self.memory_limit, self.spool_dir)
        self.opened.append(stream)
        return stream

    def raw(self) -> RawStream:
        """This part's bytes as they are stored (bit streams: never compressed)."""
        if self.length <= self.memory_limit:
            stream = RawStream(np.frombuffer(self.payload.read(self.start, self.length), np.uint8))
        else:
            stream = self.payload.raw(self.start, self.length)
        self.opened.append(stream)
        return stream

    def close_all(self) -> None:
        """Close every stream opened through this part and its splits."""
        for stream in self.opened:
            stream.close()
        self.opened.clear()


class PlanesCursor:
    """Values stored as byte planes (``raw``, ``xor``), the next run at a time: ``take(base,
    n)`` gives the next ``n`` fine-tuned values (XOR-ed with ``base`` when ``xor``)."""

    def __init__(self, stream: RawStream, bits: np.dtype, count: int, xor: bool):
        self._stream, self._bits, self._count, self._xor = stream, np.dtype(bits), count, xor
        self._at = 0

    def take(self, base: np.ndarray | None, n: int) -> np.ndarray:
        if n > self._count - self._at:
            raise DeltaFormatError(f"asked for values past the record's {self._count}")
        planes = self._stream.planes(self._bits.itemsize, self._count, self._at, self._at + n)
        self._stream.release()
        self._at += n
        return from_planes(planes, self._bits, n,
                           xor=np.ascontiguousarray(base, self._bits) if self._xor else None)

    def close(self) -> None:
        self._stream.close()
