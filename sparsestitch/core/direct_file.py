"""An output file written front to back around the page cache (``O_DIRECT``), where the
filesystem allows it.

Every output is fsynced before it is published (:mod:`sparsestitch.core.atomic`), so the
page cache saves a writer no device time: it adds a copy into freshly allocated cache
pages, and on a virtual machine those pages are often ones the host has taken back (free
page reporting), each refaulted at first touch. Measured on this project's 2-core VM
(0.62 GB written in 7 MiB pieces): 1.2-1.5 s through the page cache into new pages, plus
0.3 s of fsync; 0.12-0.2 s plus fsync when the pages had just been freed; 0.3-0.5 s direct
(docs/results-compress.md, "Outputs around the page cache, the exact top-k in threads").
A direct write also leaves the page cache to the inputs, which a machine smaller than its
models needs.

Direct writes need aligned buffers, lengths and offsets: bytes are staged in an aligned
buffer and written a whole buffer at a time; the last, short buffer is padded to the
alignment and the file truncated to its true length. Where the filesystem refuses
``O_DIRECT`` (tmpfs, some network filesystems: ``EINVAL`` at open or at a write) the same
file is written through the page cache instead, with the same bytes.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

from .errors import OptionError
from .sizes import parse_memory

#: Alignment of direct writes: a multiple of every logical block size in use (512, 4096).
ALIGN = 4096
#: Bytes staged between writes.
STAGE_BYTES = 8 << 20
#: Smaller outputs are written through the page cache (direct writes gain nothing there);
#: the environment variable ``SPARSESTITCH_DIRECT_MIN_BYTES`` sets another size (0: every
#: output direct; a size above any output: none, e.g. to keep an output in the page cache
#: for the program that reads it next).
DIRECT_MIN_BYTES = 64 << 20
ENVIRONMENT = "SPARSESTITCH_DIRECT_MIN_BYTES"

_O_DIRECT = getattr(os, "O_DIRECT", 0)


def writes_direct(nbytes: int) -> bool:
    """Whether an output of ``nbytes`` is written around the page cache (the setting is a
    size as ``--max-memory`` takes it, ``64MiB``, or 0)."""
    setting = os.environ.get(ENVIRONMENT, "").strip()
    if not setting:
        return nbytes >= DIRECT_MIN_BYTES
    if setting == "0":
        return True
    try:
        return nbytes >= parse_memory(setting, option=f"the environment variable {ENVIRONMENT}")
    except OptionError as exc:
        raise OptionError(f"{exc} (0: every output direct)") from None


class DirectFile:
    """A new file at ``path`` (created or truncated), written in order by :meth:`write`
    and finished by :meth:`close` (length set, fsynced); ``direct=False`` writes through the
    page cache. Errors are the ``OSError`` of the failing call."""

    def __init__(self, path: str | os.PathLike, *, direct: bool = True,
                 stage_bytes: int = STAGE_BYTES):
        if stage_bytes <= 0 or stage_bytes % ALIGN:
            raise ValueError(f"stage_bytes must be a positive multiple of {ALIGN}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.direct = bool(direct and _O_DIRECT)
        fd = None
        if self.direct:
            try:
                fd = os.open(path, flags | _O_DIRECT, 0o666)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False
        self._fd = os.open(path, flags, 0o666) if fd is None else fd
        # page-aligned, for direct writes only: through the page cache, bytes go as given
        self._stage = mmap.mmap(-1, stage_bytes) if self.direct else None
        self._view = memoryview(self._stage) if self.direct else memoryview(b"")
        self._filled = 0  # bytes staged
        self.size = 0  # bytes written or staged

    def write(self, data) -> None:
        """Append ``data`` (any buffer)."""
        data = memoryview(data).cast("B")
        if not self.direct:
            if self._filled:  # staged before a fallback to the page cache: first
                self._drain(self._filled)
            self._write_all(data)
            self.size += data.nbytes
            return
        while data.nbytes:
            n = min(data.nbytes, len(self._view) - self._filled)
            self._view[self._filled:self._filled + n] = data[:n]
            self._filled += n
            self.size += n
            data = data[n:]
            if self._filled == len(self._view):
                self._drain(self._filled)

    def close(self) -> None:
        """Write what is staged, set the file's length, fsync and close."""
        try:
            tail = self._filled
            if tail:
                padded = -(-tail // ALIGN) * ALIGN if self.direct else tail
                self._view[tail:padded] = bytes(padded - tail)
                self._drain(padded)
                if padded != tail:
                    os.ftruncate(self._fd, self.size)
            os.fsync(self._fd)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without finishing (the caller removes the file)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
            self._view.release()
            if self._stage is not None:
                self._stage.close()

    def fileno(self) -> int:
        return self._fd

    def _drain(self, length: int) -> None:
        """Write the first ``length`` staged bytes and empty the stage."""
        part = self._view[:length]
        try:
            self._write_all(part)
        finally:
            part.release()  # an error's traceback must not keep the stage exported
        self._filled = 0

    def _write_all(self, data: memoryview) -> None:
        done = 0
        while done < data.nbytes:
            try:
                done += os.write(self._fd, data[done:])
            except OSError as exc:
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                # The filesystem takes O_DIRECT at open but not these writes (or a short
                # write left the offset unaligned): go on through the page cache.
                flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~_O_DIRECT)
                self.direct = False
