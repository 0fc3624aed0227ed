"""Record values decoded on a torch device, against base bits already there.

What runs where, and why:

* **on the host**: reading the payload and its checksum, and zstd decompression of each
  stream (a zstd frame decodes sequentially; a GPU zstd would need nvCOMP, which is not a
  dependency), the positions (:mod:`sparsestitch.delta.codecs`: Rice bit streams are sequential
  by construction, and positions are a small share of the bytes), and the ``tau`` codec's
  exceptions (a handful per record);
* **on the device**: everything proportional to the stored count that needs the base --
  byte planes back into values (a transpose), ``raw`` as is, ``xor`` against the base
  bits, ``tau`` added to the widened base and rounded (:func:`~.device_bits.from_wide`),
  then the exceptions scattered over it.  So the base bits at the stored positions never
  leave the device.
* the lossy ``quant`` codec (opt-in) is decoded on the host with the base bits gathered
  there: :func:`decode_values` says so by returning ``on_host=True`` in its result.

Bit-identical to the codecs' own decoders (``tests/test_device_values.py``): every step is
integer work except the ``tau`` sum, whose NaN results are all exceptions by the format
(docs/format.md), so no NaN payload of the device's arithmetic survives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.dtypes import DType
from ..delta.codecs import value_codec
from ..delta.codecs.base import unpack_stream
from .device_bits import as_torch, from_wide, signed_container, to_wide, wide_type

#: Value codecs whose base-dependent work runs on the device.
DEVICE_VALUE_CODECS = ("raw", "xor", "tau")


@dataclass(frozen=True)
class DecodedValues:
    """A record's fine-tuned bits on the device, and whether they were decoded on the host."""

    bits: object
    on_host: bool


def from_planes(planes, itemsize: int, count: int):
    """Byte planes (a uint8 device tensor: every value's byte 0, then byte 1, ...) back into
    ``count`` values in the signed container of ``itemsize`` bytes (little-endian, as the
    format and every device torch runs on)."""
    if itemsize == 1:
        return planes[:count]
    values = planes.reshape(itemsize, count).t().contiguous().reshape(-1)
    return values.view(signed_container(itemsize))


def decode_values(codec_id: str, payload: bytes | memoryview, config: dict, base_kept, dt: DType,
                  count: int, send=None) -> DecodedValues:
    """The fine-tuned bits of a record's ``count`` stored values, decoded against
    ``base_kept`` (the base bits at the stored positions, a device tensor in the signed
    container).  ``payload`` is the values' part of the record's payload; ``send`` moves a
    host array to the device (default: ``torch.from_numpy(...).to(device)``)."""
    import torch

    device = base_kept.device
    send = send or (lambda array: as_torch(array).to(device))
    codec = value_codec(codec_id)
    if codec_id == "raw" or codec_id == "xor":
        raw = unpack_stream(payload, config, count * dt.itemsize)
        bits = from_planes(send(np.frombuffer(raw, np.uint8)), dt.itemsize, count)
        return DecodedValues(bits ^ base_kept if codec_id == "xor" else bits, False)
    if codec_id == "tau":
        planes, exc_index, exc_bits = codec.streams(payload, config, dt, count)
        wide = wide_type(dt)
        wide_size = torch.empty(0, dtype=wide).element_size()
        tau = from_planes(send(np.frombuffer(planes, np.uint8)), wide_size, count).view(wide)
        bits = from_wide(to_wide(base_kept, dt) + tau, dt)
        if exc_index.size:
            bits[send(exc_index)] = send(exc_bits)
        return DecodedValues(bits, False)
    host_base = base_kept.cpu().numpy().view(dt.bits)
    values = codec.decode(payload, config, host_base, dt, count)
    return DecodedValues(send(values), True)
