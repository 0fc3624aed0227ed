"""The safetensors byte layout, read and written with struct + json only.

Both model checkpoints and delta files are safetensors files: an 8-byte
little-endian header length ``N``, ``N`` bytes of UTF-8 JSON (an object
mapping tensor names to ``{"dtype", "shape", "data_offsets"}`` plus an
optional ``"__metadata__"`` object of strings), padding with spaces to a
multiple of 8, then the data area, which the tensors' ``data_offsets`` cover
exactly, in order, with no holes.  Everything is validated before use, since
files come from the internet.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass

from ..core.dtypes import dtype as lookup_dtype
from ..core.errors import CheckpointError, SparsestitchError
from ..core.sizes import numel

#: Largest header accepted, as in the reference implementation.
MAX_HEADER_BYTES = 100 << 20
#: The ``__metadata__`` key under which a sparsestitch delta keeps its header: a delta is a
#: valid safetensors file, and this key is what tells it from a model checkpoint.
DELTA_HEADER_KEY = "sparsestitch.header"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset
    nbytes: int

    @property
    def numel(self) -> int:
        return numel(self.shape)


@dataclass(frozen=True)
class Header:
    entries: dict[str, TensorEntry]   # in data order
    metadata: dict[str, str]
    data_start: int


def read_header(handle, path: str | os.PathLike, file_size: int,
                error: type[SparsestitchError] = CheckpointError) -> Header:
    """Parse and validate the header of an open safetensors file."""
    handle.seek(0)
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise error(f"file is {file_size} bytes, too short for a safetensors header", path=path)
    (size,) = struct.unpack("<Q", prefix)
    if size > MAX_HEADER_BYTES:
        raise error(f"header declares {size} bytes, above the {MAX_HEADER_BYTES}-byte limit",
                    path=path)
    if size > file_size - 8:
        raise error(f"header declares {size} bytes but the file has {file_size - 8} after the "
                    "length field (truncated?)", path=path)
    raw = handle.read(size)
    try:
        parsed = strict_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"header is not valid JSON ({exc}); the file is corrupt or not safetensors",
                    path=path) from None
    if not isinstance(parsed, dict):
        raise error("header is not a JSON object", path=path)
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise error("__metadata__ must map strings to strings", path=path)
    data_start = 8 + size
    entries = [_entry(name, info, data_start, path, error) for name, info in parsed.items()]
    entries.sort(key=lambda e: (e.start, e.nbytes))
    expected = data_start
    for entry in entries:
        if entry.start != expected:
            raise error(f"tensor data is not contiguous at offset {entry.start - data_start} "
                        f"(expected {expected - data_start}): overlapping or holes",
                        path=path, tensor=entry.name)
        expected += entry.nbytes
    if expected != file_size:
        raise error(f"tensors cover {expected} bytes but the file has {file_size} "
                    "(truncated or trailing data)", path=path)
    return Header({e.name: e for e in entries}, metadata, data_start)


def file_kind(path: str | os.PathLike) -> str | None:
    """``"delta"`` for a sparsestitch delta, ``"model"`` for another safetensors file, None for
    anything else (a folder, a missing or unreadable file, not safetensors).

    Reads only the header (bounded by :data:`MAX_HEADER_BYTES`).
    """
    try:
        with open(path, "rb") as handle:
            header = read_header(handle, path, os.fstat(handle.fileno()).st_size)
    except (OSError, SparsestitchError):
        return None
    return "delta" if DELTA_HEADER_KEY in header.metadata else "model"


def encode_header(entries: list[tuple[str, str, tuple[int, ...], int]],
                  metadata: dict[str, str] | None) -> bytes:
    """Header bytes (length field + padded JSON) for tensors laid out in the given order.

    >>> encode_header([("w", "U8", (3,), 3)], None)[8:].decode().strip()
    '{"w":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}'
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype_name, shape, nbytes in entries:
        header[name] = {"dtype": dtype_name, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


def _entry(name: str, info, data_start: int, path, error) -> TensorEntry:
    if not isinstance(info, dict):
        raise error("header entry is not an object", path=path, tensor=name)
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    try:
        dt = lookup_dtype(dtype_name)
    except (ValueError, TypeError):
        raise error(f"unsupported dtype {dtype_name!r}", path=path, tensor=name) from None
    if (not isinstance(shape, list) or len(shape) > 64
            or not all(type(d) is int and 0 <= d < 1 << 48 for d in shape)):
        raise error(f"invalid shape {shape!r}", path=path, tensor=name)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and 0 <= o for o in offsets) or offsets[0] > offsets[1]):
        raise error(f"invalid data_offsets {offsets!r}", path=path, tensor=name)
    numel = 1
    for d in shape:
        numel *= d
    nbytes = offsets[1] - offsets[0]
    if numel * dt.itemsize != nbytes:
        raise error(f"shape {shape} of {dtype_name} needs {numel * dt.itemsize} bytes, "
                    f"data_offsets give {nbytes}", path=path, tensor=name)
    return TensorEntry(name, dtype_name, tuple(shape), data_start + offsets[0], nbytes)


def strict_json(text: str):
    """``json.loads`` refusing what JSON (RFC 8259) does not allow or cannot round-trip:
    duplicate keys, NaN and Infinity, lone surrogates.  Raises ValueError.

    >>> strict_json('{"a": [1, "\\u00e9"]}')
    {'a': [1, 'é']}
    """
    # A lone surrogate can only come from a \uD800-\uDFFF escape (or be in ``text`` itself):
    # without either, each string need not be checked (a delta header has ~10^4 of them).
    try:
        text.encode("utf-8")
        plain = _SURROGATE_ESCAPE.search(text) is None
    except UnicodeEncodeError:
        plain = False
    return json.loads(text, object_pairs_hook=_unique_keys if plain else _no_duplicate_keys,
                      parse_constant=_not_json)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _unique_keys(pairs):
    unique = dict(pairs)
    if len(unique) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return unique


def _not_json(token: str):
    raise ValueError(f"{token} is not a JSON value")


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key in JSON object")
    for key, value in pairs:  # a lone surrogate (\ud800) parses but can never be written back
        key.encode("utf-8")
        if isinstance(value, str):
            value.encode("utf-8")
    return dict(pairs)
