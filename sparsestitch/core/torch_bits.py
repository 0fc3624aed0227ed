"""Float bits on a torch device: the torch twins of :func:`sparsestitch.core.dtypes.to_wide` and
:func:`~sparsestitch.core.dtypes.from_wide`, and host arrays moved as torch bit containers.

torch lacks most unsigned integer types, so a tensor's bits travel and sit on the device
in the signed integer type of the same width (``uint8`` for one byte); :func:`host_bits`
turns them back into the numpy unsigned container.
"""

from __future__ import annotations

import numpy as np

from ..core.dtypes import DType


def signed_container(itemsize: int):
    """The torch integer type holding ``itemsize``-byte bits."""
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]


def signed_value(bits: int, itemsize: int) -> int:
    """An unsigned bit pattern as the signed integer of the same width (torch's containers).

    >>> signed_value(0xFFFF, 2)
    -1
    """
    return bits - (1 << (8 * itemsize)) if itemsize > 1 and bits >= 1 << (8 * itemsize - 1) \
        else bits


def as_torch(array: np.ndarray):
    """A torch view of a host numpy array, unsigned bits seen as the signed type of their width."""
    import torch

    array = signed_view(array)
    if not array.flags.writeable:  # torch refuses to share read-only memory (zstd output)
        array = array.copy()
    return torch.from_numpy(array)


def signed_view(array: np.ndarray) -> np.ndarray:
    """A contiguous view of ``array`` with unsigned bits seen as the signed type of their width."""
    array = np.ascontiguousarray(array)
    if array.dtype.kind == "u" and array.dtype.itemsize > 1:
        return array.view(f"<i{array.dtype.itemsize}")
    return array


def torch_type(numpy_type: np.dtype):
    """The torch dtype torch gives a numpy array of ``numpy_type``."""
    import torch

    return torch.from_numpy(np.empty(0, numpy_type)).dtype


def host_bits(tensor, dt: DType) -> np.ndarray:
    """Device bits back on the host as ``dt``'s numpy unsigned container."""
    return tensor.cpu().numpy().view(dt.bits)


def to_wide(bits, dt: DType):
    """Exact conversion of device bits to the wide compute type (float32, or float64)."""
    import torch

    if dt.name == "BF16":
        return (bits.to(torch.int32) << 16).view(torch.float32)
    if dt.name == "F16":
        return bits.view(torch.float16).to(torch.float32)
    if dt.name == "F32":
        return bits.view(torch.float32)
    return bits.view(torch.float64)


def wide_type(dt: DType):
    """The torch float type arithmetic runs in for ``dt``."""
    import torch

    return torch.float64 if dt.wide == np.float64 else torch.float32


def from_wide(values, dt: DType):
    """Round wide floats to ``dt`` with :func:`sparsestitch.core.dtypes.from_wide`'s rules (signed
    bit containers)."""
    import torch

    if dt.name == "BF16":
        u = values.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        rounded = torch.where(torch.isnan(values), (u >> 16) | 0x0040, rounded)
        return (rounded & 0xFFFF).to(torch.int32).to(torch.int16)
    if dt.name == "F16":
        u = values.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        nan_bits = ((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x03FF)
        rounded = values.to(torch.float16).view(torch.int16).to(torch.int64)
        return torch.where(torch.isnan(values), nan_bits, rounded).to(torch.int32).to(torch.int16)
    if dt.name == "F32":
        return values.view(torch.int32)
    return values.view(torch.int64)


def planes_to_values(planes, itemsize: int, count: int):
    """Byte planes (a uint8 device tensor: every value's byte 0, then byte 1, ...) back into
    ``count`` values in the signed container of ``itemsize`` bytes (little-endian, as the
    format and every device torch runs on)."""
    if itemsize == 1:
        return planes[:count]
    values = planes.reshape(itemsize, count).t().contiguous().reshape(-1)
    return values.view(signed_container(itemsize))
