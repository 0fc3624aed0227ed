"""A record's payload built in temporary files: for records of tensors larger than the memory
budget, whose streams cannot be held (a 70B model's embedding stored losslessly is gigabytes
of byte planes).

The streams are the format's own (docs/format.md §4.1): a bitmap of kept positions, byte planes
of values placed at their stored slots, each then stored raw or as one zstd frame that declares
its content size.  What the record holds in memory is a run of values, the compressor's
context (and its workers') and the copy buffer, whatever the tensor's size.  The files are
unnamed and live beside the output (they fill the disk the user chose and vanish when closed
or when the process dies); their failures are reported as the output's.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import xxhash
import zstandard

from ..core.atomic import output_error
from ..core.errors import CheckpointError
from ..core.dtypes import DType
from ..core.sizes import numel as count_elements
from .codecs.base import stream_compressor
from .format import Record

#: Bytes copied or compressed at a time.
COPY_BYTES = 1 << 20


def temporary_file(output: Path):
    """An unnamed temporary file beside ``output``."""
    try:
        return tempfile.TemporaryFile(dir=output.parent or None)
    except OSError as exc:
        raise output_error(exc, output) from exc


class AppendFile:
    """A temporary file beside ``output`` that data is appended to (a quantized record's
    codes as their runs are encoded); its failures are reported as the output's."""

    def __init__(self, output: Path):
        self.output = output
        self.file = temporary_file(output)

    def write(self, data) -> None:
        try:
            self.file.write(data)
        except OSError as exc:
            raise output_error(exc, self.output) from exc

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:
            raise output_error(exc, self.output) from exc

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        self.file.close()

    def __del__(self):  # dropped after an error elsewhere: the file just vanishes
        if getattr(self, "file", None) is not None:
            self.file.close()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


class PlaneSpool:
    """A stream of ``count`` values of ``width`` bytes in byte planes, written a run at a time
    at any slots (plane ``p`` of the value at slot ``s`` goes to byte ``p * count + s``)."""

    def __init__(self, output: Path, count: int, width: int):
        self.output, self.count, self.width = output, count, width
        self.file = AppendFile(output)
        self.nbytes = count * width

    def put(self, planes: np.ndarray, segments) -> None:
        """Write a run's ``planes`` (``width`` rows of its values' bytes) in ``segments``:
        ``(first column, columns, first slot)`` each."""
        fd = self.file.fileno()
        try:
            for p in range(self.width):
                row = memoryview(np.ascontiguousarray(planes[p]))
                for first, columns, slot in segments:
                    if columns:
                        _pwrite_all(fd, row[first:first + columns], p * self.count + slot)
        except OSError as exc:
            raise output_error(exc, self.output) from exc


class BitAppender:
    """A bit string written to ``out`` (anything with ``write``) as runs of bits arrive,
    each run packed little-endian from bit 0 of its first byte; :meth:`finish` writes the
    last partial byte."""

    def __init__(self, out):
        self.out, self.nbits = out, 0
        self._carry = 0   # the bits of the last, partial byte

    def append(self, packed: np.ndarray, nbits: int) -> None:
        if nbits == 0:
            return
        packed = packed[:(nbits + 7) // 8].astype(np.uint16)
        shift = self.nbits % 8
        joined = np.zeros(packed.size + 1, np.uint16)
        joined[:-1] = packed << shift
        joined[1:] |= packed >> (8 - shift) if shift else 0
        joined[0] |= self._carry
        self.nbits += nbits
        whole = self.nbits // 8 - (self.nbits - nbits) // 8   # bytes completed by this run
        self.out.write((joined[:whole] & 0xFF).astype(np.uint8).tobytes())
        self._carry = int(joined[whole] & 0xFF) if self.nbits % 8 else 0

    def finish(self) -> None:
        if self.nbits % 8:
            self.out.write(bytes([self._carry]))


class SpooledPayload(AppendFile):
    """A record's payload in a temporary file: its streams appended one after another, each
    stored raw or as one zstd frame, whichever is smaller (:meth:`add_stream`)."""

    def __init__(self, output: Path):
        super().__init__(output)
        self.nbytes = 0
        self._hash = xxhash.xxh3_64()

    def __len__(self) -> int:
        return self.nbytes

    def add_stream(self, source, raw_nbytes: int, compressor: zstandard.ZstdCompressor
                   ) -> tuple[int, dict]:
        """Append the ``raw_nbytes`` bytes of file ``source`` as a stream; returns its stored
        length and stream config."""
        if raw_nbytes == 0:
            return 0, {"zstd": False, "raw_nbytes": 0}
        start = self.nbytes
        try:
            self.file.seek(start)
            with compressor.stream_writer(self.file, size=raw_nbytes, closefd=False) as writer:
                for chunk in _chunks(source, raw_nbytes):
                    writer.write(chunk)
            stored = self.file.tell() - start
            zstd = stored < raw_nbytes
            if not zstd:  # store it raw: zstd only where smaller (format.md §4.1)
                self.file.truncate(start)
                self.file.seek(start)
                for chunk in _chunks(source, raw_nbytes):
                    self.file.write(chunk)
                stored = raw_nbytes
            self.file.flush()
            for chunk in _chunks(self.file, stored, start):
                self._hash.update(chunk)
        except OSError as exc:
            raise output_error(exc, self.output) from exc
        self.nbytes += stored
        return stored, {"zstd": zstd, "raw_nbytes": raw_nbytes}

    def add_raw(self, source, nbytes: int) -> int:
        """Append the first ``nbytes`` bytes of file ``source`` as they are; returns
        ``nbytes``."""
        try:
            source.flush()
            self.file.seek(self.nbytes)
            for chunk in _chunks(source, nbytes):
                self.file.write(chunk)
                self._hash.update(chunk)
            self.file.flush()
        except OSError as exc:
            raise output_error(exc, self.output) from exc
        self.nbytes += nbytes
        return nbytes

    def add_packed(self, stream: bytes, config: dict) -> tuple[int, dict]:
        """Append a stream already packed (:func:`~.codecs.base.pack_stream`); returns its
        stored length and its config."""
        try:
            self.file.seek(self.nbytes)
            self.file.write(stream)
            self.file.flush()  # what is appended is read back by positioned reads
        except OSError as exc:
            raise output_error(exc, self.output) from exc
        self._hash.update(stream)
        self.nbytes += len(stream)
        return len(stream), config

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def copy_to(self, out) -> None:
        """Write the payload to the file object ``out`` (at its position)."""
        for chunk in _chunks(self.file, self.nbytes):
            out.write(chunk)


def _chunks(source, nbytes: int, start: int = 0):
    """The ``nbytes`` bytes of file ``source`` from ``start``, a bounded piece at a time."""
    at = start
    end = start + nbytes
    fd = source.fileno()
    while at < end:
        chunk = os.pread(fd, min(COPY_BYTES, end - at), at)
        if not chunk:
            raise OSError(f"temporary file ended at byte {at} of {end}")
        yield chunk
        at += len(chunk)


class SpooledExactRecord:
    """One tensor's exact record written a run of kept values at a time, in kept order,
    once a first pass has counted them (``count``) and, for a value codec that sorts them
    (``ulp``), its contexts at every kept position (``totals``, the sum of the codec's
    ``run_contexts``).  Positions are ``all`` where every element is kept, else a bitmap.
    Value codecs: those with ``run_planes`` (``xor``, ``raw``, ``ulp``)."""

    def __init__(self, output: Path, name: str, dt: DType, shape: tuple[int, ...], count: int,
                 codec, totals: np.ndarray | None, threads: int = 1):
        self.output, self.name, self.dt, self.shape = output, name, dt, tuple(shape)
        # zstd's workers for the streams (at least one: the bytes do not depend on how many;
        # two are 1.7x faster than one-thread zstd, whose bytes differ by about 0.02%)
        self.threads = max(1, threads)
        self.count, self.codec = count, codec
        numel = count_elements(shape)
        self.bitmap = None if count == numel else BitAppender(AppendFile(output))
        self.values = PlaneSpool(output, count, dt.itemsize)
        self.totals = None if totals is None else np.asarray(totals, np.int64)
        if self.totals is not None:
            self.start = np.concatenate([[0], np.cumsum(self.totals)[:-1]]).astype(np.int64)
            self.before = np.zeros_like(self.totals)
        self.at = 0

    def add_run(self, marks: np.ndarray | None, kept: np.ndarray, base_kept: np.ndarray) -> None:
        """The next run of the tensor: its elements' kept marks (None where every element is
        kept) and the fine-tuned and base bits at the marked ones."""
        if self.bitmap is not None:
            self.bitmap.append(np.packbits(marks, bitorder="little"), marks.size)
        n = kept.size
        if self.at + n > self.count:
            raise changed_between_reads(
                self.name, f"more changed elements than the first read counted ({self.count:,})")
        if n == 0:
            return
        planes = self.codec.run_planes(kept, base_kept, self.dt)
        contexts = self.codec.run_contexts(base_kept, self.dt)
        if contexts is None:
            segments = [(0, n, self.at)]
        else:
            local = np.concatenate([[0], np.cumsum(contexts)[:-1]])
            slots = self.start + self.before
            segments = [(int(local[e]), int(contexts[e]), int(slots[e]))
                        for e in np.flatnonzero(contexts)]
            self.before += contexts
            if (self.before > self.totals).any():
                raise changed_between_reads(
                    self.name, "the changed elements' base exponents differ from the first read's")
        self.values.put(planes, segments)
        self.at += n

    def finish(self, base_xxh3: str) -> tuple[Record, SpooledPayload]:
        """The record and its payload (closing the spools)."""
        if self.at != self.count:
            self.close()
            raise changed_between_reads(
                self.name, f"{self.at:,} changed elements, the first read counted {self.count:,}")
        payload = SpooledPayload(self.output)
        try:
            positions_nbytes, positions = 0, {"codec": "all"}
            if self.bitmap is not None:
                self.bitmap.finish()
                self.bitmap.out.flush()
                nbytes = (self.bitmap.nbits + 7) // 8
                positions_nbytes, stream = payload.add_stream(
                    self.bitmap.out, nbytes, stream_compressor(nbytes, self.threads))
                positions = {"codec": "bitmap", **stream}
            values_nbytes, stream = payload.add_stream(
                self.values.file, self.values.nbytes,
                self.codec.stream_compressor(self.dt, self.values.nbytes, self.threads))
        except BaseException:
            payload.close()
            raise
        finally:
            self.close()
        record = Record(self.name, self.dt.name, self.shape, "sparse", base_xxh3, self.count,
                        positions, {"codec": self.codec.codec_id, **stream}, positions_nbytes,
                        values_nbytes, payload.hexdigest())
        return record, payload

    def close(self) -> None:
        """Drop the spools (their files vanish)."""
        if self.bitmap is not None:
            self.bitmap.out.close()
        self.values.file.close()


def changed_between_reads(name: str, what: str) -> CheckpointError:
    """The error for a tensor whose two reads disagree (an input rewritten during the run)."""
    return CheckpointError(f"{what}: the base or the fine-tune changed while compress read "
                           "them; nothing was written", tensor=name)
