"""Read and write sparsestitch delta files (spec: docs/format.md).

A delta file is a valid safetensors file: each stored tensor's record is one
``U8`` byte blob named after the tensor, and ``__metadata__`` carries the
delta header as JSON (key ``sparsestitch.header``) with its xxh3-64 checksum
(key ``sparsestitch.header_xxh3``).  Any safetensors tool can list it; only
sparsestitch knows the encodings.  This module uses numpy, struct and json --
no torch -- and decodes one record at a time, so any tensor can be read
without reading the rest of the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from ..checkpoint.safetensors_file import (
    DELTA_HEADER_KEY,
    encode_header,
    file_kind,
    read_header,
    strict_json,
)
from ..core import native
from ..core.atomic import atomic_path, output_error
from ..core.direct_file import DirectFile, writes_direct
from ..core.dtypes import DType
from ..core.dtypes import dtype as lookup_dtype
from ..core.errors import ChecksumError, DeltaFormatError, ResourceLimitError, SparsestitchError
from ..core.options import short_repr
from ..core.sizes import numel
from . import codecs
from .codecs.bitmap import gather_marked, put_marked
from .codecs.streams import IO_CHUNK, BytesPayload, FilePayload, Part, Payload

FORMAT_NAME = "sparsestitch.delta"
#: The newest format version this writer writes; a file uses the lowest version that holds
#: it, so deltas without version-2 codecs stay readable by version-1 readers.
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
HEADER_KEY = DELTA_HEADER_KEY
HEADER_HASH_KEY = "sparsestitch.header_xxh3"
KINDS = ("sparse", "base", "added")
MAX_RECORDS = 1 << 20
MAX_NUMEL = 1 << 44
_HEX16 = re.compile(r"[0-9a-f]{16}\Z")


def digest(data) -> str:
    """xxh3-64 of a bytes-like object or array, as 16 hex digits (the file's checksum)."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return xxhash.xxh3_64_hexdigest(memoryview(data).cast("B"))


@dataclass(frozen=True)
class Record:
    """One tensor of a delta: what it is, how it is stored, and where."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str                 # "sparse": kept positions + values; "base": unchanged; "added": not in base
    base_xxh3: str | None     # checksum of the base tensor's bytes (None for "added")
    count: int = 0            # kept positions
    positions: dict | None = None
    values: dict | None = None
    positions_nbytes: int = 0
    values_nbytes: int = 0
    payload_xxh3: str | None = None
    fidelity: dict | None = None   # informative: how much of the tensor's change is kept

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.positions_nbytes + self.values_nbytes

    @property
    def dt(self) -> DType:
        return lookup_dtype(self.dtype)

    def to_json(self) -> dict:
        out = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
               "kind": self.kind, "base_xxh3": self.base_xxh3}
        if self.kind != "base":
            out.update(count=self.count, positions=self.positions, values=self.values,
                       positions_nbytes=self.positions_nbytes, values_nbytes=self.values_nbytes,
                       payload_xxh3=self.payload_xxh3)
        if self.fidelity is not None:
            out["fidelity"] = self.fidelity
        return out


def encode_record(name: str, dt: DType, shape: tuple[int, ...],
                  positions: np.ndarray | codecs.PackedPositions | None,
                  kept: np.ndarray, base_kept: np.ndarray | None, base_xxh3: str | None,
                  fidelity: dict | None = None, quantize: dict | None = None,
                  rank_on_sample: bool = False) -> tuple[Record, bytes]:
    """Encode one tensor's kept positions and fine-tuned bits into a record and its payload.

    ``positions`` None means every element (no position array needed), a
    :class:`~.codecs.PackedPositions` those its bitmap marks; ``base_kept`` (base
    bits at the kept positions) is None for a tensor the base lacks.  ``rank_on_sample``:
    as for :func:`~.codecs.encode_positions` (a planner's records).
    """
    if positions is None:
        pos_payload, pos_config = b"", {"codec": "all"}
    elif isinstance(positions, codecs.PackedPositions):
        pos_payload, pos_config = codecs.encode_position_bitmap(positions, shape,
                                                                rank_on_sample)
    else:
        pos_payload, pos_config = codecs.encode_positions(positions, shape,
                                                          rank_on_sample=rank_on_sample)
    val_payload, val_config = codecs.encode_values(kept, base_kept, dt, quantize)
    payload = pos_payload + val_payload
    record = Record(name, dt.name, tuple(shape), "sparse" if base_kept is not None else "added",
                    base_xxh3, int(kept.size), pos_config, val_config, len(pos_payload),
                    len(val_payload), digest(payload), fidelity)
    return record, payload


def earlier_delta(path: Path) -> str | None:
    """What ``overwrite`` may replace with a delta: a delta file (None), else what is there."""
    if path.is_dir():
        return "a folder"
    kind = file_kind(path)
    return None if kind == "delta" else ("a model checkpoint, not a delta" if kind == "model"
                                         else "not a sparsestitch delta file")


class DeltaWriter:
    """Write a delta file record by record; the file appears only on :meth:`close`.

    Payloads are spooled to a temporary file beside the target, since the
    header (which comes first) is known only at the end.
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False):
        self.path = Path(path)
        self._overwrite = overwrite
        writes_direct(0)  # a wrong setting is refused before any work
        self._atomic = atomic_path(self.path, overwrite=overwrite, replaceable=earlier_delta)
        self._final = self._atomic.__enter__()
        self._spool_path = self._final.with_name(self._final.name + ".spool")
        try:
            self._spool = open(self._spool_path, "w+b")
        except OSError as exc:
            self._atomic.__exit__(type(exc), exc, None)
            raise output_error(exc, self.path) from exc
        self._records: list[Record] = []
        self._names: set[str] = set()

    def add(self, record: Record, payload=b"") -> None:
        """Add ``record`` with its ``payload``: bytes, or a payload in a temporary file (a
        :class:`~.spooled.SpooledPayload`, copied here and closed)."""
        try:
            if record.name in self._names:
                raise ValueError(f"tensor {record.name!r} added twice")
            if len(payload) != record.nbytes:
                raise ValueError(f"payload of {len(payload)} bytes for a record of {record.nbytes}")
            self._names.add(record.name)
            self._records.append(record)
            try:
                if hasattr(payload, "copy_to"):
                    payload.copy_to(self._spool)
                else:
                    self._spool.write(payload)
            except OSError as exc:
                raise output_error(exc, self.path) from exc
        finally:
            if hasattr(payload, "close"):
                payload.close()

    def _container_header(self, meta: dict) -> bytes:
        version = max([codecs.version_needed((r.values or {}).get("codec"))
                       for r in self._records], default=1)
        header = dict(meta, format=FORMAT_NAME, format_version=version,
                      tensors=[r.to_json() for r in self._records])
        header_text = json.dumps(header, separators=(",", ":"), sort_keys=True)
        metadata = {HEADER_KEY: header_text, HEADER_HASH_KEY: digest(header_text.encode())}
        stored = [(r.name, "U8", (r.nbytes,), r.nbytes) for r in self._records if r.kind != "base"]
        return encode_header(stored, metadata)

    def payload_size(self) -> int:
        """Bytes of the records' payloads added so far."""
        return sum(r.nbytes for r in self._records)

    def projected_size(self, meta: dict) -> int:
        """The size :meth:`close` with ``meta`` would write (nothing is written)."""
        return len(self._container_header(meta)) + self.payload_size()

    def close(self, meta: dict) -> int:
        """Write header + payloads, fsync, rename into place; return the file size."""
        try:
            size = _write_joined(self._final, self._container_header(meta), self._spool,
                                 self.payload_size())
            self._spool.close()
            os.unlink(self._spool_path)
            self._atomic.__exit__(None, None, None)
            return size
        except BaseException as exc:
            self.abort(exc)
            if isinstance(exc, OSError):
                raise output_error(exc, self.path) from exc
            raise

    def abort(self, exc: BaseException | None = None) -> None:
        """Discard everything written so far; the target path is untouched."""
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            self._spool.close()
        with contextlib.suppress(OSError):
            os.unlink(self._spool_path)
        try:
            self._atomic.__exit__(type(exc) if exc else RuntimeError, exc or RuntimeError("aborted"), None)
        except BaseException:
            pass


def _write_joined(path: Path, header: bytes, spool, spooled: int) -> int:
    """Write ``header`` then the ``spooled`` bytes of the file ``spool`` to a new file at
    ``path``, fsynced: around the page cache when large (see core.direct_file), else copied
    by the kernel (``copy_file_range``: no copy through this process; a read and write loop
    where the filesystems cannot). Its size."""
    out = DirectFile(path, direct=writes_direct(len(header) + spooled))
    try:
        out.write(header)
        spool.flush()
        copied = 0
        if not out.direct and hasattr(os, "copy_file_range"):
            with contextlib.suppress(OSError):  # EXDEV, ENOSYS, EINVAL...: the loop below
                while copied < spooled:
                    n = os.copy_file_range(spool.fileno(), out.fileno(), spooled - copied,
                                           copied)
                    if n <= 0:
                        break
                    copied += n
        spool.seek(copied)
        chunk = memoryview(bytearray(min(16 << 20, max(spooled - copied, 1))))
        while copied < spooled and (read := spool.readinto(chunk)):
            out.write(chunk[:read])
            copied += read
        out.size = len(header) + copied
        out.close()
    except BaseException:
        out.abort()
        raise
    return out.size


def _refuse_gguf(handle, path: Path) -> None:
    if handle.read(4) == b"GGUF":
        raise DeltaFormatError("this is a GGUF model, not a delta file; the base comes first: "
                               "sparsestitch restore BASE DELTA -o OUT", path=path)


def _open_delta(path: Path):
    if path.is_dir():
        raise DeltaFormatError("this is a folder (a model checkpoint?), not a delta file; "
                               "deltas are single .delta files, and the base comes first: "
                               "sparsestitch restore BASE DELTA -o OUT", path=path)
    if path.exists() and not path.is_file():  # opening a pipe would wait forever
        raise DeltaFormatError("not a regular file (a pipe or device?)", path=path)
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise DeltaFormatError(f"cannot open delta ({exc.strerror or exc})", path=path) from None
    try:
        _refuse_gguf(handle, path)  # read_header reads from the start again
    except BaseException:
        handle.close()
        raise
    return handle


def _checked_in_file(fd: int, offset: int, record: Record, path: Path) -> FilePayload:
    """A payload left in the file, after one streaming pass checking its checksum."""
    checked = xxhash.xxh3_64()
    for at in range(0, record.nbytes, IO_CHUNK):
        part = pread_bytes(fd, min(IO_CHUNK, record.nbytes - at), offset + at)
        if len(part) != min(IO_CHUNK, record.nbytes - at):
            raise DeltaFormatError("payload is truncated", path=path, tensor=record.name)
        checked.update(part)
    if checked.hexdigest() != record.payload_xxh3:
        raise ChecksumError("payload checksum mismatch: the file is damaged; "
                            "re-download or re-create it", path=path, tensor=record.name)
    return FilePayload(fd, offset, record.nbytes)


def decode_positions(record: Record, payload: bytes) -> np.ndarray:
    """The flat kept positions of ``record`` from its (checksum-verified) ``payload``,
    checked: as many as it says, in range, strictly increasing (sorted int64)."""
    codec = codecs.position_codec(record.positions.get("codec"))
    positions = codec.decode(payload[:record.positions_nbytes], record.positions, record.shape,
                             record.count)
    if positions.size != record.count:
        raise DeltaFormatError(f"decoded {positions.size} positions, record says {record.count}")
    if positions.size and (positions[0] < 0 or positions[-1] >= record.numel
                           or not _strictly_increasing(positions)):
        raise DeltaFormatError("positions are out of range, unsorted or repeated")
    return positions


def decode_values(record: Record, payload: bytes, base_kept: np.ndarray | None) -> np.ndarray:
    """The fine-tuned bits ``record`` stores, from its ``payload`` and the base bits at its
    kept positions (None for a record whose value codec reads no base)."""
    codec = codecs.value_codec(record.values.get("codec"))
    if codec.needs_base and base_kept is None:
        raise DeltaFormatError(f"value codec {codec.codec_id!r} needs base values")
    return codec.decode(payload[record.positions_nbytes:], record.values, base_kept, record.dt,
                        record.count)


def stores_exact_values(record: Record) -> bool:
    """Whether the record's value codec gives the fine-tune's bits exactly (all but the
    lossy ``quant``)."""
    return codecs.value_codec(record.values.get("codec")).exact


def _strictly_increasing(positions: np.ndarray) -> bool:
    kernels = native.kernels()
    if kernels is not None:
        return kernels.strictly_increasing(np.ascontiguousarray(positions, np.int64))
    return bool(np.all(positions[1:] > positions[:-1]))


def pread_bytes(fd: int, nbytes: int, offset: int) -> bytes:
    """``nbytes`` at ``offset`` (fewer at end of file), without moving a shared file position:
    several threads read one delta at once."""
    parts, got = [], 0
    while got < nbytes:
        part = os.pread(fd, nbytes - got, offset + got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class DeltaReader:
    """Random access to the records of a delta file.

    Opening validates the container and header; each record's payload is
    checked against its checksum when read.  Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = _open_delta(self.path)
        try:
            self.file_size = os.fstat(self._file.fileno()).st_size
            container = read_header(self._file, self.path, self.file_size, error=DeltaFormatError)
            self.header = _parse_header(container.metadata, self.path)
            self.records, self._offsets = _parse_records(self.header.get("tensors"), container,
                                                         self.path, self.header["format_version"])
        except BaseException:
            self._file.close()
            raise
        self._by_name = {r.name: r for r in self.records}

    def __enter__(self) -> "DeltaReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def record(self, name: str) -> Record | None:
        return self._by_name.get(name)

    def payload(self, record: Record) -> bytes:
        """The checked payload bytes of a stored record."""
        data = pread_bytes(self._file.fileno(), record.nbytes, self._offsets[record.name])
        if len(data) != record.nbytes:
            raise DeltaFormatError("payload is truncated", path=self.path, tensor=record.name)
        if digest(data) != record.payload_xxh3:
            raise ChecksumError("payload checksum mismatch: the file is damaged; "
                                "re-download or re-create it", path=self.path, tensor=record.name)
        return data

    def bitmap(self, record: Record, payload: bytes | None = None) -> np.ndarray | None:
        """A ``bitmap`` record's bits (uint8, one per element from element 0), checked as
        decoding its positions would (as many set as the record says, none past the end);
        None for another position codec."""
        if record.positions.get("codec") != "bitmap":
            return None
        payload = self.payload(record) if payload is None else payload
        with self.decoding(record):
            return codecs.position_codec("bitmap").decode_bits(
                payload[:record.positions_nbytes], record.positions, record.shape, record.count)

    def positions(self, record: Record, payload: bytes | None = None) -> np.ndarray:
        """Decoded, validated flat kept positions of a stored record (sorted int64)."""
        payload = self.payload(record) if payload is None else payload
        with self.decoding(record):
            return decode_positions(record, payload)

    def value_codec(self, record: Record):
        """The record's value codec (an unknown one is an error naming file and tensor)."""
        with self.decoding(record):
            return codecs.value_codec(record.values.get("codec"))

    def stores_all(self, record: Record) -> bool:
        """Whether a stored record keeps every element (positions codec ``all``, checked as
        decoding it would), so its positions need no array."""
        if record.positions.get("codec") != "all":
            return False
        with self.decoding(record):
            codecs.position_codec("all").check(record.positions_nbytes, record.shape, record.count)
        return True

    def values(self, record: Record, base_kept: np.ndarray | None, payload: bytes | None = None
               ) -> np.ndarray:
        """Fine-tuned bits at the kept positions, given the base bits there (None for "added")."""
        payload = self.payload(record) if payload is None else payload
        with self.decoding(record):
            return decode_values(record, payload, base_kept)

    def part_counts(self, record: Record, base_part: np.ndarray, dt) -> np.ndarray:
        """The context counts a run of kept values with these base bits contributes, for a
        value codec that is not elementwise (see :func:`sparsestitch.engine.walk.kept_totals`)."""
        with self.decoding(record):
            codec = codecs.value_codec(record.values.get("codec"))
            if dt.name != record.dt.name:
                raise DeltaFormatError(f"base dtype {dt.name}, record {record.dt.name}")
            return codec.part_counts(base_part, record.dt)

    def payload_source(self, record: Record, memory_limit: int) -> "Payload":
        """The checked payload: in memory up to ``memory_limit`` bytes, else in the file."""
        if record.nbytes <= memory_limit:
            return BytesPayload(self.payload(record))
        return _checked_in_file(self._file.fileno(), self._offsets[record.name], record, self.path)

    def cursor(self, record: Record, *, memory_limit: int, run: int = 1 << 16,
               spool_dir: str | None = None, totals: np.ndarray | None = None,
               positions_only: bool = False) -> "RecordCursor":
        """A stored record decoded in order, ``run`` values at a time, holding at most about
        ``memory_limit`` bytes of its payload and streams (see :class:`RecordCursor`);
        ``positions_only`` opens no value decoder (for passes that count positions)."""
        payload = self.payload_source(record, memory_limit)
        return RecordCursor(self, record, payload, memory_limit, spool_dir, totals,
                            positions_only, run)

    def decode(self, record: Record, base_bits: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """``(positions, fine-tuned bits there)`` for a stored record.

        ``base_bits`` is the whole base tensor's bits (any shape), or None for "added" records.
        """
        payload = self.payload(record)
        positions = self.positions(record, payload)
        base_kept = None if base_bits is None else np.asarray(base_bits).reshape(-1)[positions]
        return positions, self.values(record, base_kept, payload)

    def decoding(self, record: Record):
        """A context in which decoding errors are re-raised naming this file and the tensor."""
        return _ErrorContext(self.path, record.name)


class RecordCursor:
    """One stored record decoded in order, a bounded run at a time.

    Positions come from a :class:`PositionCursor` (every element: :attr:`dense`); values
    come from the value codec's cursor, given the base bits at the same positions.  Every
    error names the file and the tensor.  Values whose codec is not elementwise (``ulp``)
    need ``totals``, the codec's counts over the base at every kept position, up front.
    """

    def __init__(self, reader: DeltaReader, record: Record, payload: Payload, memory_limit: int,
                 spool_dir: str | None, totals: np.ndarray | None, positions_only: bool = False,
                 run: int = 1 << 16):
        self.record, self._context, self._run = record, reader.decoding(record), max(1, run)
        if not (positions_only or reader.value_codec(record).elementwise or totals is not None):
            raise ValueError(f"{record.values.get('codec')} values need the base's counts to "
                             "decode in runs")
        self._opened: list = []  # every stream the codecs' cursors read: what close() closes
        try:
            with self._context:
                self._open(reader, payload, memory_limit, spool_dir, totals, positions_only)
        except BaseException:
            self.close()
            raise
        self._taken = 0

    def _open(self, reader, payload, memory_limit, spool_dir, totals, positions_only) -> None:
        record = self.record
        self.dense = reader.stores_all(record)
        positions = Part(payload, 0, record.positions_nbytes, memory_limit, spool_dir,
                         self._opened)
        values = Part(payload, record.positions_nbytes, record.values_nbytes, memory_limit,
                      spool_dir, self._opened)
        self._positions = PositionCursor(record, None if self.dense else codecs.position_codec(
            record.positions.get("codec")).cursor(positions, record.positions, record.shape,
                                                  record.count))
        codec = codecs.value_codec(record.values.get("codec"))
        self.needs_base = codec.needs_base
        self._values = None if positions_only else codec.cursor(
            values, record.values, record.dt, record.count, *([] if codec.elementwise else [totals]))

    def next_positions(self, limit: int) -> np.ndarray:
        """The next (at most ``limit``) stored positions, checked; empty at the end."""
        with self._context:
            return self._positions.next(limit)

    def positions_below(self, stop: int, limit: int) -> np.ndarray:
        """Every stored position below ``stop`` not returned yet (decoded ``limit`` at a time)."""
        with self._context:
            return self._positions.below(stop, limit)

    @property
    def marks(self) -> bool:
        """Whether :meth:`replace_into` applies: the positions are every element or a bitmap
        (read as windows of bits, not positions)."""
        return self.dense or self._positions.marks

    def replace_into(self, lo: int, block: np.ndarray, keep=None) -> None:
        """The stored entries among elements ``lo, lo + 1, ...`` (the bits ``block`` holds,
        every block from element 0 on, in order) written over ``block`` with no position
        arrays (see :attr:`marks`): a restore's or a lone delta's merge.  ``keep(lo, hi,
        window or None: every element, its first bit, the bits replaced)`` sees them first."""
        if self.dense:
            window, first = None, 0
            base = block.copy() if self.needs_base or keep is not None else None
        else:
            window, first, base = _marked_window(self._positions, self._context, lo, block)
        if keep is not None:
            keep(lo, lo + block.size, window, first, base)
        values = self.values(base if self.needs_base else None,
                             block.size if window is None else base.size)
        if window is None:  # every element of the block
            block[:] = values
        else:
            put_marked(window, first, block, values)

    def marked_base(self, lo: int, block: np.ndarray) -> np.ndarray:
        """The bits of ``block`` (elements ``lo, lo + 1, ...``, every block in order) at a
        bitmap record's stored positions -- no position array (:attr:`marks`, not dense)."""
        return _marked_window(self._positions, self._context, lo, block)[2]

    def marked(self, lo: int, block: np.ndarray) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
        """A bitmap record's entries among elements ``lo, lo + 1, ...`` (the bits ``block``
        holds, every block in order) as ``(window, bit, fine-tuned bits, base bits)``: the
        bitmap's bytes of the block, the bit of element ``lo`` in them, and the bits of the
        marked elements -- no position array (see :attr:`marks`; not for dense records)."""
        window, first, base = _marked_window(self._positions, self._context, lo, block)
        return window, first, self.values(base if self.needs_base else None, base.size), base

    def values(self, base: np.ndarray | None, count: int | None = None) -> np.ndarray:
        """The fine-tuned bits of the next ``len(base)`` (or ``count``) stored entries, given
        the base bits there (None for a record whose codec reads no base)."""
        n = int(base.size) if base is not None else int(count)
        with self._context:
            if self.needs_base and base is None:
                raise DeltaFormatError(f"value codec {self.record.values.get('codec')!r} needs "
                                       "base values")
            values = _taken_in_runs(self._values, base, n, self._run, self.record.dt)
        self._taken += n
        return values

    def finish(self) -> None:
        """Check that every position and value was read and nothing is left over."""
        with self._context:
            found = self._taken if self.dense else self._positions.finish()
            if self._taken != self.record.count or found != self.record.count:
                raise DeltaFormatError(f"decoded {found} positions and {self._taken} "
                                       f"values, record says {self.record.count}")

    def close(self) -> None:
        for stream in self._opened:
            stream.close()
        self._opened.clear()

    def __enter__(self) -> "RecordCursor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _marked_window(positions: "PositionCursor", context, lo: int, block: np.ndarray
                   ) -> tuple[np.ndarray, int, np.ndarray]:
    """A bitmap record's bytes of the block's elements ``lo, ...``, the bit of element ``lo``
    in them, and the block's bits at the marked elements (errors in ``context``)."""
    with context:
        window, first, count = positions.window(lo, lo + block.size)
    return window, first, gather_marked(window, first, block, count)


def _taken_in_runs(cursor, base: np.ndarray | None, n: int, run: int, dt: DType) -> np.ndarray:
    """The next ``n`` values of a value ``cursor``, ``run`` at a time (the decoders'
    temporaries: one run's worth), or all at once from a cursor that holds none
    (``takes_any_run``)."""
    if getattr(cursor, "takes_any_run", False):
        return cursor.take(base, n)
    values = np.empty(n, dt.bits)
    for at in range(0, n, run):
        stop = min(n, at + run)
        values[at:stop] = cursor.take(None if base is None else base[at:stop], stop - at)
    return values


class PositionCursor:
    """A record's stored positions in order, checked as :meth:`DeltaReader.positions` checks
    a whole list (in range, strictly increasing, as many as the record says): from the
    position codec's cursor (``codec``; None for a record of every element), as runs of
    positions or, for a bitmap, as windows of its bits (:meth:`window`; not both)."""

    def __init__(self, record: Record, codec):
        self._record, self._codec = record, codec
        self._pending = np.empty(0, np.int64)
        self._last, self.found = -1, 0
        self._windows = False

    @property
    def marks(self) -> bool:
        """Whether :meth:`window` applies (a bitmap, no positions read yet)."""
        return hasattr(self._codec, "marks") and not self.found and not self._windows

    def next(self, limit: int) -> np.ndarray:
        """The next (at most ``limit``) stored positions, checked; empty at the end."""
        if self._pending.size:
            out, self._pending = self._pending[:limit], self._pending[limit:]
            return out
        if self._codec is None:
            n = min(limit, self._record.count - self.found)
            self.found += n
            return np.arange(self.found - n, self.found, dtype=np.int64)
        found = self._codec.next(limit)
        if found.size:
            # Each codec's run is increasing by construction (gaps, bits, rows): what is
            # left to check is that runs follow each other and stay in the tensor.
            if found[0] <= self._last or found[-1] >= self._record.numel or found[0] < 0:
                raise DeltaFormatError("positions are out of range, unsorted or repeated")
            self._last = int(found[-1])
        self.found += found.size
        if found.size == 0 and self.found != self._record.count:
            raise DeltaFormatError(f"decoded {self.found} positions, record says "
                                   f"{self._record.count}")
        return found

    def below(self, stop: int, limit: int) -> np.ndarray:
        """Every stored position below ``stop`` not returned yet (decoded ``limit`` at a time)."""
        parts = []
        while True:
            run = self.next(limit)
            if not run.size:
                break
            cut = int(np.searchsorted(run, stop))
            parts.append(run[:cut])
            if cut < run.size:
                self._pending = np.concatenate([run[cut:], self._pending])
                break
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def window(self, lo: int, hi: int) -> tuple[np.ndarray, int, int]:
        """The bitmap's bits of elements ``lo ... hi - 1``, in order from element 0
        (:meth:`~sparsestitch.delta.codecs.bitmap.BitmapCursor.marks`)."""
        window, first, count = self._codec.marks(lo, hi)
        self.found += count
        self._windows = True
        return window, first, count

    def finish(self) -> int:
        """Run the codec's own end-of-stream checks; how many positions were decoded."""
        if self._windows:  # the bits after the last window: none may be set
            self.window(self._codec.at, self._record.numel)
        elif self._codec is not None and self.found == self._record.count \
                and not self._pending.size:
            self.next(1)
        return self.found


def _parse_header(metadata: dict[str, str], path: Path) -> dict:
    text = metadata.get(HEADER_KEY)
    if text is None:
        raise DeltaFormatError("not a sparsestitch delta (no sparsestitch header in "
                               "__metadata__); is this a model checkpoint? The base comes "
                               "first: sparsestitch restore BASE DELTA -o OUT", path=path)
    if digest(text.encode("utf-8")) != metadata.get(HEADER_HASH_KEY):
        raise ChecksumError("header checksum mismatch: the file is damaged", path=path)
    try:
        header = strict_json(text)
    except (ValueError, RecursionError) as exc:
        raise DeltaFormatError(f"header is not valid JSON ({exc})", path=path) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise DeltaFormatError("not a sparsestitch delta header", path=path)
    version = header.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise DeltaFormatError(f"format version {version!r} is not supported by this version "
                               f"(reads versions {', '.join(map(str, READABLE_VERSIONS))}); "
                               "upgrade sparsestitch", path=path)
    return header

def _parse_records(tensors, container, path: Path, version: int
                   ) -> tuple[list[Record], dict[str, int]]:
    if not isinstance(tensors, list) or len(tensors) > MAX_RECORDS:
        raise DeltaFormatError("header 'tensors' must be a list of records", path=path)
    records, stored, offsets = [], 0, {}
    for item in tensors:
        record = _record_from_json(item, path)
        needed = codecs.version_needed((record.values or {}).get("codec"))
        if version < needed:
            raise DeltaFormatError(f"value codec {record.values['codec']!r} needs format "
                                   f"version {needed}, the file says {version}", path=path,
                                   tensor=record.name)
        entry = container.entries.get(record.name)
        if record.kind == "base":
            if entry is not None:
                raise DeltaFormatError("unchanged tensor has a payload", path=path,
                                       tensor=record.name)
        else:
            if entry is None or entry.dtype != "U8" or entry.nbytes != record.nbytes:
                raise DeltaFormatError("record payload is missing or has the wrong size",
                                       path=path, tensor=record.name)
            offsets[record.name] = entry.start
            stored += 1
        records.append(record)
    if len({r.name for r in records}) != len(records):
        raise DeltaFormatError("a tensor is listed twice", path=path)
    if stored != len(container.entries):
        raise DeltaFormatError("the file holds payloads no record describes", path=path)
    return records, offsets


class _ErrorContext:
    """Re-raise codec errors with the file and tensor they concern."""

    def __init__(self, path, tensor):
        self.path, self.tensor = path, tensor

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None:
            return False
        if isinstance(exc, SparsestitchError) and exc.path is None:
            raise type(exc)(str(exc), path=self.path, tensor=self.tensor) from None
        if isinstance(exc, (ValueError, IndexError, TypeError, OverflowError, MemoryError)):
            raise DeltaFormatError(f"record cannot be decoded ({type(exc).__name__}: {exc})",
                                   path=self.path, tensor=self.tensor) from None
        return False


def _record_from_json(item, path) -> Record:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise DeltaFormatError("a record is not an object with a name", path=path)
    name = item["name"]

    def bad(message):
        return DeltaFormatError(message, path=path, tensor=name)

    kind, dtype_name, shape = item.get("kind"), item.get("dtype"), item.get("shape")
    if kind not in KINDS:
        raise bad(f"unknown record kind {kind!r}")
    try:
        lookup_dtype(dtype_name)
    except (ValueError, TypeError):
        raise bad(f"unsupported dtype {dtype_name!r}") from None
    if (not isinstance(shape, list) or len(shape) > 64
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise bad(f"invalid shape {shape!r}")
    numel = 1
    for d in shape:
        numel *= d
    if numel > MAX_NUMEL or max(shape, default=0) > MAX_NUMEL:  # ([0, 2**64] must not reach numpy)
        raise ResourceLimitError(f"shape {shape} exceeds the {MAX_NUMEL}-element limit",
                                 path=path, tensor=name)
    base_xxh3 = item.get("base_xxh3")
    if kind == "added" and base_xxh3 is not None:
        raise bad("an added tensor cannot have a base checksum")
    if kind != "added" and not (isinstance(base_xxh3, str) and _HEX16.match(base_xxh3)):
        raise bad(f"invalid base checksum {base_xxh3!r}")
    fidelity = _fidelity_from_json(item.get("fidelity"))
    if kind == "base":
        return Record(name, dtype_name, tuple(shape), kind, base_xxh3, fidelity=fidelity)
    count, pos_nbytes, val_nbytes = (item.get(k) for k in ("count", "positions_nbytes", "values_nbytes"))
    for key, value, hi in (("count", count, numel), ("positions_nbytes", pos_nbytes, MAX_NUMEL),
                           ("values_nbytes", val_nbytes, MAX_NUMEL)):
        if type(value) is not int or not 0 <= value <= hi:
            raise bad(f"invalid {key} {value!r}")
    positions, values, payload_xxh3 = item.get("positions"), item.get("values"), item.get("payload_xxh3")
    if not isinstance(positions, dict) or not isinstance(values, dict):
        raise bad("record lacks its positions/values configs")
    for part, config in (("positions", positions), ("values", values)):
        # Looked up in the codec registries and version table: a list or object cannot be.
        if not isinstance(config.get("codec"), str):
            raise bad(f"{part} codec must be a codec name, got {short_repr(config.get('codec'))}")
    if not (isinstance(payload_xxh3, str) and _HEX16.match(payload_xxh3)):
        raise bad(f"invalid payload checksum {payload_xxh3!r}")
    if kind == "added" and count != numel:
        raise bad("an added tensor must store every element")
    # Every value codec stores at least one byte per value in raw or zstd streams (quant: one
    # bit): refuse counts the payload cannot hold before any decoder allocates for them.
    per_byte = codecs.values_per_byte(values.get("codec"))
    if count > codecs.base.ZSTD_MAX_EXPANSION * per_byte * val_nbytes:
        raise ResourceLimitError(f"count {count} is more values than {val_nbytes} payload bytes "
                                 "can hold", path=path, tensor=name)
    if values.get("codec") == "lowrank" and not (
            positions.get("codec") == "all" and len(shape) >= 2 and values.get("rows") == shape[0]):
        raise bad("lowrank values need positions 'all' over a tensor of 2 or more dimensions, "
                  "with 'rows' its first dimension")
    return Record(name, dtype_name, tuple(shape), kind, base_xxh3, count, positions, values,
                  pos_nbytes, val_nbytes, payload_xxh3, fidelity)


def _fidelity_from_json(value) -> dict | None:
    """A record's informative fidelity report, kept only if it is an object of finite numbers
    (nothing decodes from it; a damaged one is dropped, not trusted)."""
    if not isinstance(value, dict):
        return None
    if not all(isinstance(k, str) and type(v) in (int, float) and np.isfinite(v)
               for k, v in value.items()):
        return None
    return value
