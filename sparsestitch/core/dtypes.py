"""Tensor dtypes as raw bit patterns.

sparsestitch works on the *bits* of tensors (numpy unsigned integers of the
element width) so that every value -- NaN payloads, -0.0, infinities, bfloat16,
which numpy lacks -- is carried exactly.  Arithmetic happens in a wide float
type (float32 for 16-bit floats and float32, float64 for float64) and is
rounded back with round-to-nearest-even, the rounding torch uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    """A safetensors dtype: its name, bit container and (for floats) wide compute type."""

    name: str                 # safetensors spelling, e.g. "BF16"
    bits: np.dtype            # unsigned integer container of the same width
    wide: np.dtype | None     # float type used for arithmetic; None for non-floats

    @property
    def itemsize(self) -> int:
        return self.bits.itemsize

    @property
    def is_float(self) -> bool:
        return self.wide is not None


_TABLE = {
    "F64": DType("F64", np.dtype("<u8"), np.dtype("<f8")),
    "F32": DType("F32", np.dtype("<u4"), np.dtype("<f4")),
    "F16": DType("F16", np.dtype("<u2"), np.dtype("<f4")),
    "BF16": DType("BF16", np.dtype("<u2"), np.dtype("<f4")),
    "F8_E4M3": DType("F8_E4M3", np.dtype("u1"), None),
    "F8_E5M2": DType("F8_E5M2", np.dtype("u1"), None),
    "I64": DType("I64", np.dtype("<u8"), None),
    "U64": DType("U64", np.dtype("<u8"), None),
    "I32": DType("I32", np.dtype("<u4"), None),
    "U32": DType("U32", np.dtype("<u4"), None),
    "I16": DType("I16", np.dtype("<u2"), None),
    "U16": DType("U16", np.dtype("<u2"), None),
    "I8": DType("I8", np.dtype("u1"), None),
    "U8": DType("U8", np.dtype("u1"), None),
    "BOOL": DType("BOOL", np.dtype("u1"), None),
}

SAFETENSORS_DTYPES = tuple(_TABLE)

#: torch dtype names (``str(tensor.dtype)`` without ``torch.``) -> safetensors dtype names.
TORCH_DTYPE_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                     "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "int64": "I64",
                     "uint64": "U64", "int32": "I32", "uint32": "U32", "int16": "I16",
                     "uint16": "U16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def dtype(name: str) -> DType:
    """Look up a safetensors dtype name.

    >>> dtype("BF16").itemsize
    2
    """
    try:
        return _TABLE[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; known: {', '.join(_TABLE)}") from None


def to_wide(bits: np.ndarray, dt: DType) -> np.ndarray:
    """Exact conversion of float bits to the wide compute float type.

    >>> to_wide(np.array([0x3F80], dtype=np.uint16), dtype("BF16"))
    array([1.], dtype=float32)
    """
    if dt.name == "BF16":
        wide = bits.astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32)
    if dt.name == "F16":
        return bits.view(np.float16).astype(np.float32)
    if dt.name == "F32":
        return bits.view(np.float32)
    if dt.name == "F64":
        return bits.view(np.float64)
    raise ValueError(f"dtype {dt.name} is not a float dtype")


def from_wide(values: np.ndarray, dt: DType) -> np.ndarray:
    """Round wide floats to ``dt`` (round-to-nearest-even) and return the bits.

    A bfloat16 or float16 NaN keeps the sign and top payload bits of the float32
    NaN, with the quiet bit set (a fixed rule, so CPU and GPU paths agree bit for bit).

    >>> hex(int(from_wide(np.array([1.0], dtype=np.float32), dtype("BF16"))[0]))
    '0x3f80'
    """
    if dt.name == "BF16":
        u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = ((u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16).astype(np.uint16)
        nan = np.isnan(values)
        if nan.any():
            rounded[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)
        return rounded
    if dt.name == "F16":
        values = np.asarray(values, dtype=np.float32)
        with np.errstate(over="ignore"):  # overflow to inf is the defined rounding
            rounded = values.astype(np.float16).view(np.uint16)
        nan = np.isnan(values)
        if nan.any():  # fixed here: numpy's own NaN conversion varies with the CPU
            u = values[nan].view(np.uint32)
            rounded[nan] = (((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x03FF)).astype(np.uint16)
        return rounded
    if dt.name == "F32":
        return np.asarray(values, dtype=np.float32).view(np.uint32)
    if dt.name == "F64":
        return np.asarray(values, dtype=np.float64).view(np.uint64)
    raise ValueError(f"dtype {dt.name} is not a float dtype")
