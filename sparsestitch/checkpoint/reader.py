"""Read safetensors checkpoints -- a single file or a Hugging Face folder -- one tensor at a time.

Tensors come back as numpy arrays of raw bits (see :mod:`sparsestitch.core.dtypes`),
read with positioned reads into fresh buffers: nothing is memory-mapped, so
the process holds only the tensors it is working on and resident memory
stays bounded whatever the model size.  Pickle checkpoints are refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.atomic import interrupted_replacement
from ..core.dtypes import dtype as lookup_dtype
from ..core.errors import CheckpointError
from ..core.sizes import row_items
from .gguf_file import GgufTensors, is_gguf
from .hub import Resolved, resolve
from .safetensors_file import TensorEntry, read_header

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Files of a model folder that hold weights: never copied into an output folder.
WEIGHT_SUFFIXES = PICKLE_SUFFIXES + (".safetensors", ".h5", ".msgpack", ".gguf", ".onnx")
WEIGHT_INDEX_SUFFIX = ".index.json"

_CONVERT_HINT = ("sparsestitch never unpickles files (they can run code). Convert it once, in a "
                 "trusted environment: for a transformers model, AutoModel.from_pretrained(folder)"
                 ".save_pretrained(new_folder, safe_serialization=True); otherwise python -c "
                 "\"import torch; from safetensors.torch import save_file; sd = torch.load("
                 "'IN.bin', weights_only=True); save_file({k: v.contiguous().clone() for k, v in "
                 "sd.items()}, 'OUT.safetensors')\" (clone() unties tied weights, which save_file "
                 "refuses)")


@dataclass(frozen=True)
class Located:
    """A tensor's entry plus the file that holds it."""

    file: Path
    entry: TensorEntry


class Checkpoint:
    """A safetensors checkpoint opened for streaming reads.

    >>> import tempfile, safetensors.numpy, numpy
    >>> folder = tempfile.mkdtemp()
    >>> safetensors.numpy.save_file({"w": numpy.ones(3, numpy.float32)}, folder + "/m.safetensors")
    >>> with Checkpoint(folder + "/m.safetensors") as ckpt:
    ...     ckpt.names, ckpt.read("w").view(numpy.float32).tolist()
    (['w'], [1.0, 1.0, 1.0])
    """

    def __init__(self, path: str | os.PathLike | Resolved):
        if not isinstance(path, Resolved):
            _refuse_interrupted(Path(path))
            path = resolve(path)  # a local path, or a Hub id in the local cache, or an error
        self.path = path.path
        #: The Hub id ``org/name[@rev]`` the checkpoint was named by, if it was.
        self.hub_id: str | None = path.spec if path.is_hub else None
        self._index_map: dict[str, str] | None = None
        self._gguf: GgufTensors | None = None
        if self.path.is_dir():
            self.is_folder = True
            shard_files, self._index_map = _folder_shards(self.path)
        elif is_gguf(self.path):  # read under transformers' names; outputs are safetensors
            self.is_folder = False
            shard_files = []
            self._gguf = GgufTensors(self.path)
        else:
            self.is_folder = False
            _refuse_pickle(self.path)
            shard_files = [self.path]
        self._handles: dict[Path, object] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self.layout: list[tuple[str, list[str]]] = []
        self._where: dict[str, Located] = {}
        try:
            for file in shard_files:
                self._add_shard(file)
            if self._gguf is not None:
                self._where = {n: Located(self.path, e) for n, e in self._gguf.entries.items()}
                self.layout.append(("model.safetensors", sorted(self._where)))
        except BaseException:
            self.close()
            raise
        if self.is_folder and self._index_map is not None:
            _check_index(self.path, self._index_map, self._where)
        self.names = sorted(self._where)
        self.is_gguf = self._gguf is not None  # read dequantized, under transformers' names

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        if self._gguf is not None:
            self._gguf.close()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def entry(self, name: str) -> TensorEntry:
        return self.locate(name).entry

    def locate(self, name: str) -> Located:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError("tensor not found in checkpoint", path=self.path, tensor=name) from None

    def read(self, name: str) -> np.ndarray:
        """The tensor's bits, shaped (a fresh array the caller owns)."""
        entry = self.entry(name)
        return self.read_rows(name, 0, entry.shape[0] if entry.shape else 1).reshape(entry.shape)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Bits of rows ``start:stop`` (along the first dimension) as a flat array (a fresh
        array the caller owns)."""
        located = self.locate(name)
        if self._gguf is not None:
            return self._gguf.read_rows(name, start, stop)
        return _read_rows(self._handles[located.file], located, name, start, stop)

    @property
    def has_index(self) -> bool:
        """Whether the folder has a ``model.safetensors.index.json`` (an output mirrors it)."""
        return self._index_map is not None

    @property
    def display_name(self) -> str:
        """A short name for headers and model cards: the Hub id, or the file or folder name."""
        return self.hub_id or self.path.name

    @property
    def extra_files(self) -> list[Path]:
        """Non-weight files of a model folder (config, tokenizer, ...), to copy beside outputs."""
        if not self.is_folder:
            return []
        return sorted(p for p in self.path.iterdir()
                      if p.is_file() and not p.name.startswith(".")
                      and not p.name.endswith(WEIGHT_SUFFIXES)
                      and not p.name.endswith(WEIGHT_INDEX_SUFFIX))

    def _add_shard(self, file: Path) -> None:
        self._handles[file] = handle = _open_shard(file)
        header = read_header(handle, file, os.fstat(handle.fileno()).st_size)
        self.metadata[file.name] = header.metadata
        names = []
        for name, entry in header.entries.items():
            if name in self._where:
                raise CheckpointError(f"tensor also stored in {self._where[name].file.name}",
                                      path=file, tensor=name)
            self._where[name] = Located(file, entry)
            names.append(name)
        self.layout.append((file.name, sorted(names)))




def _refuse_interrupted(path: Path) -> None:
    """A missing path whose earlier version a killed replacement left aside: say so (a reader
    never moves it back; the next command writing the path does)."""
    aside = interrupted_replacement(path)
    if aside is not None:
        raise CheckpointError(f"not there: a replacement of it was interrupted and its previous "
                              f"version waits at {aside.name}; the next command that writes "
                              "this path puts it back", path=path)


def _read_rows(handle, located: Located, name: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a safetensors tensor, read with ``preadv`` (thread-safe)."""
    entry = located.entry
    bits = lookup_dtype(entry.dtype).bits
    per_row = row_items(entry.shape)
    out = np.empty((stop - start) * per_row, dtype=bits)
    view = memoryview(out.view(np.uint8))
    offset = entry.start + start * per_row * bits.itemsize
    got = 0
    while got < len(view):
        n = os.preadv(handle.fileno(), [view[got:]], offset + got)
        if n <= 0:
            raise CheckpointError("file ended early (truncated while reading?)",
                                  path=located.file, tensor=name)
        got += n
    return out


def _folder_shards(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The shard files of a model folder, and its index's weight map (None without one)."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            parsed = json.loads(index.read_text(encoding="utf-8"))
            weight_map = parsed["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise ValueError("weight_map must map tensor names to file names")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"invalid index ({exc})", path=index) from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if Path(name).name != name:
                raise CheckpointError(f"index names a shard outside the folder: {name!r}",
                                      path=index)
        return [folder / name for name in files], weight_map
    shards = sorted(folder.glob("*.safetensors"))
    if len(shards) == 1:
        return shards, None
    if not shards:
        pickles = [p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise CheckpointError(f"folder holds only pickle weights ({', '.join(pickles)}). "
                                  + _CONVERT_HINT, path=folder)
        raise CheckpointError("folder holds no .safetensors file", path=folder)
    raise CheckpointError(f"folder holds {len(shards)} .safetensors files but no {INDEX_NAME}",
                          path=folder)


def _check_index(folder: Path, index_map: dict[str, str], where: dict[str, Located]) -> None:
    """Every tensor the index names is in the shard it names, and no other is."""
    for name, file_name in index_map.items():
        located = where.get(name)
        if located is None or located.file.name != file_name:
            raise CheckpointError(f"index places the tensor in {file_name} but it is not there",
                                  path=folder / INDEX_NAME, tensor=name)
    extra = set(where) - set(index_map)
    if extra:
        raise CheckpointError(f"shards hold tensors the index does not list: {sorted(extra)[:5]}",
                              path=folder / INDEX_NAME)


def _open_shard(file: Path):
    if file.exists() and not file.is_file():  # opening a pipe would wait forever
        raise CheckpointError("not a regular file (a folder, pipe or device?)", path=file)
    try:
        return open(file, "rb")
    except OSError as exc:
        raise CheckpointError(f"cannot open ({exc.strerror or exc})", path=file) from None


def _refuse_pickle(path: Path) -> None:
    if path.name.endswith(PICKLE_SUFFIXES):
        raise CheckpointError("pickle checkpoints are not read. " + _CONVERT_HINT, path=path)
