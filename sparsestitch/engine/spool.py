"""A spool: arrays parked in a temporary file beside an output, read back by key.

Compress's one-read global top-k keeps, per tensor, what it selected while the
threshold is still unknown; holding that in memory would cost a fraction of the
model.  Writes happen in one thread, in order; reads use positioned reads, so
several threads can read back at once.  The file is unnamed (it disappears when
closed or when the process dies) and lives beside the output so it fills the disk
the user chose; failures are reported as the output's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.atomic import output_error
from ..delta.format import pread_bytes
from ..delta.spooled import temporary_file


class ArraySpool:
    """Sequences of arrays stored under keys in one temporary file."""

    def __init__(self, output: str | os.PathLike):
        self.output = Path(output)
        self._file = temporary_file(self.output)
        self._index: dict[object, list[tuple[int, np.dtype, int]]] = {}

    def put(self, key, arrays: Sequence[np.ndarray]) -> None:
        """Append ``arrays`` (flat) under ``key``."""
        layout = []
        try:
            for array in arrays:
                array = np.ascontiguousarray(array)
                layout.append((self._file.tell(), array.dtype, array.size))
                self._file.write(array.tobytes())
        except OSError as exc:
            raise output_error(exc, self.output) from exc
        self._index[key] = layout

    def flush(self) -> None:
        """Make everything put so far readable by :meth:`get` (call before reading)."""
        try:
            self._file.flush()
        except OSError as exc:
            raise output_error(exc, self.output) from exc

    def get(self, key) -> list[np.ndarray]:
        """Fresh copies of the arrays put under ``key`` (safe from several threads)."""
        out = []
        for offset, dtype, size in self._index[key]:
            nbytes = size * dtype.itemsize
            try:
                data = pread_bytes(self._file.fileno(), nbytes, offset)
            except OSError as exc:
                raise output_error(exc, self.output) from exc
            if len(data) != nbytes:
                raise output_error(OSError(f"spool ended early ({len(data)} of {nbytes} bytes)"),
                                   self.output)
            out.append(np.frombuffer(data, dtype=dtype).copy())
        return out

    def close(self) -> None:
        self._file.close()
