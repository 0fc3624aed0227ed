"""Write safetensors checkpoints -- one file or a sharded Hugging Face folder -- streaming.

The writer is told the whole layout up front (names, dtypes, shapes per
shard), so each shard's header is written first and tensor bytes follow in
order, in whole tensors or row blocks; nothing is held in memory.  The output
appears at the target path only when :meth:`CheckpointWriter.close`
succeeds (see :mod:`sparsestitch.core.atomic`); a folder also gets its
``model.safetensors.index.json`` and the base's non-weight files.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.atomic import atomic_path, earlier_folder_output, fsync_file, output_error
from ..core.direct_file import DirectFile, writes_direct
from ..core.dtypes import dtype as lookup_dtype
from ..core.sizes import numel
from .reader import INDEX_NAME
from .safetensors_file import encode_header, file_kind

#: The kind recorded in the marker of a model folder written here.
MODEL_OUTPUT = "model"


def earlier_model_output(path: Path) -> str | None:
    """What ``overwrite`` may replace with a model: an earlier model folder output of
    sparsestitch (see :func:`~sparsestitch.core.atomic.earlier_folder_output`) or a safetensors
    model file (None), else what is there."""
    if path.is_dir():
        return earlier_folder_output(MODEL_OUTPUT)(path)
    kind = file_kind(path)
    return None if kind == "model" else ("a sparsestitch delta, not a model" if kind == "delta"
                                         else "not a safetensors model file")


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * lookup_dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Shard:
    file_name: str
    tensors: list[OutputTensor]
    metadata: dict[str, str] | None = None


class CheckpointWriter:
    """Stream tensors into a new checkpoint at ``target``.

    ``folder=False`` writes the single shard as the file ``target``;
    ``folder=True`` writes every shard, the index (``index``: default, only for several
    shards), ``extra_files`` (copied) and ``extra_texts`` (``{file name: text}``, e.g. a
    model card) into the folder ``target``.
    Tensors must be written in layout order.
    """

    def __init__(self, target: str | Path, shards: list[Shard], *, folder: bool,
                 extra_files: list[Path] = (), overwrite: bool = False,
                 extra_texts: dict[str, str] | None = None, index: bool | None = None):
        if not folder and len(shards) != 1:
            raise ValueError("a single-file output needs exactly one shard")
        self.target = Path(target)
        writes_direct(0)  # a wrong setting is refused before any work
        self._shards, self._folder, self._extra = shards, folder, list(extra_files)
        self._texts = dict(extra_texts or {})
        # A folder gets an index when asked, or by default when it has several shards.
        self._index = len(shards) > 1 if index is None else index
        self._stack = contextlib.ExitStack()
        self._root = self._stack.enter_context(
            atomic_path(self.target, overwrite=overwrite, folder=folder,
                        replaceable=earlier_model_output, marker=MODEL_OUTPUT))
        self._queue = [(shard, tensor) for shard in shards for tensor in shard.tensors]
        self._at, self._written, self._handle, self._shard = 0, 0, None, None

    @property
    def pending(self) -> OutputTensor | None:
        """The tensor the next bytes belong to."""
        return self._queue[self._at][1] if self._at < len(self._queue) else None

    def write(self, name: str, bits: np.ndarray) -> None:
        """Write (part of) tensor ``name``'s bytes; parts must come in order."""
        if np.asarray(bits).size == 0:
            return  # nothing to write; zero-byte tensors are passed over in layout order
        self._skip_empty()
        shard, tensor = self._queue[self._at] if self._at < len(self._queue) else (None, None)
        if tensor is None or tensor.name != name:
            raise ValueError(f"expected tensor {tensor.name if tensor else None!r}, got {name!r}")
        data = memoryview(np.ascontiguousarray(bits).reshape(-1).view(np.uint8))
        if self._written + data.nbytes > tensor.nbytes:
            raise ValueError(f"tensor {name!r}: {self._written + data.nbytes} bytes written, "
                             f"{tensor.nbytes} expected")
        try:
            if self._shard is not shard:
                self._open(shard)
            self._handle.write(data)
        except OSError as exc:
            raise output_error(exc, self.target) from exc
        self._written += data.nbytes
        if self._written == tensor.nbytes:
            self._at, self._written = self._at + 1, 0
            self._skip_empty()

    def close(self) -> None:
        """Finish: check completeness, write the index and extra files, publish atomically."""
        try:
            self._skip_empty()
            if self._at != len(self._queue):
                raise ValueError(f"tensor {self.pending.name!r} was never written")
            self._close_handle()
            if self._folder:
                if self._index:
                    _write_index(self._root, self._shards)
                for extra in self._extra:
                    shutil.copyfile(extra, self._root / extra.name)
                for name, text in self._texts.items():  # after the copies: they win
                    (self._root / name).write_text(text, encoding="utf-8")
        except BaseException as exc:
            self.abort(exc)
            if isinstance(exc, OSError):
                raise output_error(exc, self.target) from exc
            raise
        self._stack.close()

    def abort(self, exc: BaseException | None = None) -> None:
        """Discard the partial output; the target path is untouched."""
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.abort()
            self._handle = None
        exc = exc or RuntimeError("aborted")
        with contextlib.suppress(BaseException):
            self._stack.__exit__(type(exc), exc, None)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self.abort(exc)

    def _skip_empty(self) -> None:
        # Zero-byte tensors have nothing to write; opening their shard keeps headers complete.
        while self._at < len(self._queue) and self._queue[self._at][1].nbytes == 0:
            if self._shard is not self._queue[self._at][0]:
                self._open(self._queue[self._at][0])
            self._at += 1

    def _open(self, shard: Shard) -> None:
        self._close_handle()
        self._handle = _open_shard(self._root / shard.file_name if self._folder else self._root,
                                   shard)
        self._shard = shard

    def _close_handle(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.close()  # fsyncs
        # Shards with no tensors at all still get a (header-only) file.
        for shard in self._shards:
            path = self._root / shard.file_name if self._folder else self._root
            if not shard.tensors and not path.exists():
                path.write_bytes(encode_header([], shard.metadata))


def _open_shard(path: Path, shard: Shard) -> DirectFile:
    """A new file at ``path`` for ``shard``, its header written: a large one is written
    around the page cache (see :mod:`~sparsestitch.core.direct_file`)."""
    header = encode_header([(t.name, t.dtype, t.shape, t.nbytes) for t in shard.tensors],
                           shard.metadata)
    handle = DirectFile(path, direct=writes_direct(len(header) + sum(
        t.nbytes for t in shard.tensors)))
    try:
        handle.write(header)
    except BaseException:
        handle.abort()
        raise
    return handle


def _write_index(root: Path, shards: list[Shard]) -> None:
    """``model.safetensors.index.json``: each tensor's shard, and the total size."""
    weight_map = {t.name: shard.file_name for shard in shards for t in shard.tensors}
    total = sum(t.nbytes for shard in shards for t in shard.tensors)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(root / INDEX_NAME, "w", encoding="utf-8") as out:
        json.dump(index, out, indent=2)
        out.write("\n")
        fsync_file(out)
