"""GGUF files (llama.cpp's format) read as checkpoints, under transformers' tensor names.

A ``.gguf`` base or fine-tune is accepted wherever a checkpoint is: :class:`GgufTensors`
gives :class:`~.reader.Checkpoint` each tensor's name, dtype and shape as a Hugging Face
Llama checkpoint of the same model has them, and its bits row block by row block:

* names: llama.cpp's (``token_embd.weight``, ``blk.N.attn_q.weight``, ...) mapped to
  transformers' (``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``,
  ...); a tensor with no mapping is refused by name rather than guessed;
* Q and K rows: llama.cpp's converter interleaves the two rotary halves of every head
  (rows ``(head, half, i)`` stored as ``(head, i, half)``; K with the key-value head count);
  that permutation is undone, so the tensors equal transformers' own GGUF loading.  The head
  counts it needs (``llama.attention.head_count``, ``head_count_kv``) must each be one integer
  of 1 or more splitting the rows into rotary pairs -- an array of per-layer counts, a float or
  a zero is refused, naming the file and the key, before any row is read;
* values: F32, F16 and BF16 tensors keep their bits; quantized blocks (Q4_0, Q8_0, K-quants,
  ...) are dequantized with the ``gguf`` package to float32, which holds every
  dequantized value exactly.  ``SPARSESTITCH_GGUF_DTYPE`` (``F32``, ``F16`` or ``BF16``)
  asks for every float tensor in that dtype instead (rounded to nearest even);
* tied weights: a GGUF without ``output.weight`` has none, as a tied Hugging Face
  checkpoint has no ``lm_head.weight``; a fine-tune that stores it adds it (stored whole).

Tensors are dequantized whole, one at a time, when first read (the last two are kept for
the row blocks that follow), so memory holds at most a few of the largest tensor.  The
file is memory-mapped by the ``gguf`` package, which parses it without executing anything.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..core.dtypes import dtype as lookup_dtype
from ..core.dtypes import from_wide
from ..core.errors import CheckpointError, OptionError
from ..core.options import short_repr
from ..core.sizes import row_items
from .safetensors_file import TensorEntry

GGUF_SUFFIX = ".gguf"
DTYPE_VARIABLE = "SPARSESTITCH_GGUF_DTYPE"
# The metadata read: the architecture, and the head counts that undo the rotary permutation.
ARCHITECTURE_KEY = "general.architecture"
HEAD_COUNT_KEY = "llama.attention.head_count"
KV_HEAD_COUNT_KEY = "llama.attention.head_count_kv"

# llama.cpp's tensor names for a Llama block, and their transformers names.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj"}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
# GGUF float types whose bits are kept as they are: their safetensors dtype names.
_PLAIN = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64"}
# GGUF metadata types holding one integer (BOOL aside).
_INTEGER_TYPES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64")
_CACHED_TENSORS = 2


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == GGUF_SUFFIX and path.is_file()


def transformers_name(gguf_name: str) -> str | None:
    """The transformers name of a llama.cpp Llama tensor (None: no mapping).

    >>> transformers_name("blk.3.attn_q.weight")
    'model.layers.3.self_attn.q_proj.weight'
    """
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and \
            parts[2] in _BLOCK_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.weight"
    return None


def _block_kind(gguf_name: str) -> str:
    """``attn_q`` of ``blk.3.attn_q.weight``: which of a block's tensors it is ('' outside
    the blocks)."""
    parts = gguf_name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 2 else ""


def unpermute_rows(array: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row interleaving of a Q or K weight with ``heads`` heads."""
    rows = array.shape[0]
    return (array.reshape(heads, rows // heads // 2, 2, *array.shape[1:])
            .swapaxes(1, 2).reshape(array.shape))


def metadata_text(fields: dict, key: str, path: Path) -> str:
    """The text of GGUF metadata ``key`` (``fields``: the reader's), checked to be text."""
    field = fields.get(key)  # its type is checked before its value is used
    if field is None:
        raise CheckpointError(f"GGUF file lacks the metadata {key!r}", path=path)
    if [t.name for t in field.types] != ["STRING"]:
        raise _wrong_type(field, key, path, "text")
    try:
        return field.contents()
    except UnicodeDecodeError:
        raise _wrong_type(field, key, path, "UTF-8 text") from None


def head_count(fields: dict, key: str, path: Path, default: int | None = None) -> int:
    """A head count from GGUF metadata ``key``: one integer of 1 or more (``default`` where
    the key is absent, if given).  Per-layer counts (an array) are not supported, and a float
    is refused rather than truncated."""
    field = fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise CheckpointError(f"GGUF file lacks the metadata {key!r}", path=path)
    integer = len(field.types) == 1 and field.types[0].name in _INTEGER_TYPES
    value = field.contents() if integer else 0
    if value < 1:
        raise _wrong_type(field, key, path, "one whole number of 1 or more (a head count)")
    return value


def _wrong_type(field, key: str, path: Path, wanted: str) -> CheckpointError:
    kind = "/".join(t.name for t in field.types)
    try:
        value = short_repr(field.contents())
    except UnicodeDecodeError:
        value = "bytes that are not UTF-8"
    return CheckpointError(f"GGUF metadata {key!r} must be {wanted}, got {value} ({kind})",
                           path=path)


class GgufTensors:
    """One GGUF file's tensors, by transformers name (see the module docstring)."""

    def __init__(self, path: Path):
        try:
            import gguf
        except ImportError:
            raise CheckpointError("reading a GGUF file needs the gguf package "
                                  "(pip install gguf)", path=path) from None
        self.path, self._gguf = path, gguf
        try:
            self._reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError, KeyError, IndexError, TypeError) as exc:
            raise CheckpointError(f"not a readable GGUF file ({exc})", path=path) from None
        fields = self._reader.fields
        architecture = metadata_text(fields, ARCHITECTURE_KEY, path)
        if architecture != "llama":
            raise CheckpointError(f"GGUF architecture {short_repr(architecture)} is not "
                                  f"supported (metadata {ARCHITECTURE_KEY!r}: Llama models only); "
                                  "convert it to safetensors first", path=path)
        query_heads = head_count(fields, HEAD_COUNT_KEY, path)
        self._heads = {"attn_q": (query_heads, HEAD_COUNT_KEY),
                       "attn_k": (head_count(fields, KV_HEAD_COUNT_KEY, path, query_heads),
                                  KV_HEAD_COUNT_KEY)}
        self._dtype = self._asked_dtype()
        self._tensors, self.entries = {}, {}
        for tensor in self._reader.tensors:
            name = transformers_name(tensor.name)
            if name is None:
                raise CheckpointError(f"GGUF tensor {tensor.name!r} has no transformers name "
                                      "here (Llama names only)", path=path)
            if name in self._tensors:
                raise CheckpointError("two GGUF tensors map to this name", path=path, tensor=name)
            shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
            self._check_heads(tensor.name, name, shape)
            kind = _PLAIN.get(tensor.tensor_type.name)
            dt = self._dtype or kind or "F32"
            self._tensors[name] = tensor
            self.entries[name] = TensorEntry(name, dt, shape, 0,
                                             int(np.prod(shape)) * lookup_dtype(dt).itemsize)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def _check_heads(self, gguf_name: str, name: str, shape: tuple[int, ...]) -> None:
        """Q and K rows split into their heads' rotary pairs (checked before any row is read,
        as the un-permutation needs it)."""
        block = _block_kind(gguf_name)
        if block not in self._heads:
            return
        heads, key = self._heads[block]
        rows = shape[0] if shape else 1
        if rows % (2 * heads):
            raise CheckpointError(f"{rows} rows do not split into {heads} heads of rotary pairs "
                                  f"(GGUF metadata {key!r} says {heads} heads)", path=self.path,
                                  tensor=name)

    def _asked_dtype(self) -> str | None:
        asked = os.environ.get(DTYPE_VARIABLE, "").upper() or None
        if asked not in (None, "F32", "F16", "BF16"):
            raise OptionError(f"{DTYPE_VARIABLE} must be F32, F16 or BF16, not {asked!r}")
        return asked

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Bits of rows ``start:stop`` of tensor ``name`` as a flat array (a fresh copy)."""
        bits = self._bits(name)
        per_row = row_items(self.entries[name].shape)
        return bits[start * per_row:stop * per_row].copy()

    def _bits(self, name: str) -> np.ndarray:
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
            bits = self._decode(name)
            self._cache[name] = bits
            while len(self._cache) > _CACHED_TENSORS:
                self._cache.popitem(last=False)
            return bits

    def _decode(self, name: str) -> np.ndarray:
        tensor, entry = self._tensors[name], self.entries[name]
        dt = lookup_dtype(entry.dtype)
        kind = _PLAIN.get(tensor.tensor_type.name)
        try:
            if kind == entry.dtype:  # kept as stored
                array = np.asarray(tensor.data).view(lookup_dtype(kind).bits)
            else:
                values = self._gguf.quants.dequantize(tensor.data, tensor.tensor_type)
                array = from_wide(np.asarray(values, np.float32).astype(dt.wide), dt)
        except (ValueError, NotImplementedError, TypeError) as exc:
            raise CheckpointError(f"cannot dequantize {tensor.tensor_type.name} ({exc})",
                                  path=self.path, tensor=name) from None
        array = array.reshape(entry.shape)
        block = _block_kind(tensor.name)
        if block in self._heads:
            array = unpermute_rows(array, self._heads[block][0])
        return np.ascontiguousarray(array).reshape(-1)

    def close(self) -> None:
        self._cache.clear()
        self._reader = None
