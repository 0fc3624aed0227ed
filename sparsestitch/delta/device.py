"""Records decoded on a torch device, by the codecs that can: each codec's own
``decode_on_device`` (positions: ``gaps`` by one prefix sum, ``bitmap`` by unpacking its
bits; values: ``raw``, ``xor`` and ``tau`` against base bits already there).

What runs where, and why:

* **on the host**: reading the payload and its checksum, zstd decompression of each stream
  (a zstd frame decodes sequentially; a GPU zstd would need nvCOMP, which is not a
  dependency), the positions of ``rice`` -- the codec compress picks at low density -- and
  ``csr`` (a Rice stream is a sequence of variable-length codes, so finding where each code
  starts is itself sequential; a GPU-friendly variant would be a new, versioned codec in
  docs/format.md), and the ``tau`` codec's exceptions (a handful per record);
* **on the device**: everything proportional to the stored count that needs the base --
  byte planes back into values (a transpose), ``raw`` as is, ``xor`` against the base bits,
  ``tau`` added to the widened base and rounded, then the exceptions scattered over it.  So
  the base bits at the stored positions never leave the device.
* the lossy ``quant`` codec (opt-in) and ``ulp`` are decoded on the host with the base bits
  gathered there: :func:`values_on_device` says so by returning ``on_host=True``.

The checks are those of :meth:`~sparsestitch.delta.format.DeltaReader.positions` (the stored
count, every position inside the tensor, strictly increasing), each failure a
:class:`~sparsestitch.core.errors.DeltaFormatError`; they cost one device synchronisation.
Bit-identical to the codecs' host decoders (``tests/test_device_values.py``,
``tests/test_device_positions.py``): every step is integer work except the ``tau`` sum,
whose NaN results are all exceptions by the format (docs/format.md), so no NaN payload of
the device's arithmetic survives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.dtypes import DType
from ..core.torch_bits import as_torch
from .codecs import position_codec, value_codec


@dataclass(frozen=True)
class DecodedValues:
    """A record's fine-tuned bits on the device, and whether they were decoded on the host."""

    bits: object
    on_host: bool


def decodes_on_device(codec) -> bool:
    """Whether ``codec`` (position or value) has a device decoder."""
    return hasattr(codec, "decode_on_device")


def positions_on_device(codec_id: str, payload: bytes | memoryview, config: dict,
                     shape: tuple[int, ...], count: int, send):
    """Sorted int64 flat positions on the device (``send`` moves a host array there), or None
    for a codec decoded on the host."""
    codec = position_codec(codec_id)
    if not decodes_on_device(codec):
        return None
    return codec.decode_on_device(payload, config, shape, count, send)


def values_on_device(codec_id: str, payload: bytes | memoryview, config: dict, base_kept, dt: DType,
                  count: int, send=None) -> DecodedValues:
    """The fine-tuned bits of a record's ``count`` stored values, decoded against
    ``base_kept`` (the base bits at the stored positions, a device tensor in the signed
    container).  ``payload`` is the values' part of the record's payload; ``send`` moves a
    host array to the device (default: ``torch.from_numpy(...).to(device)``)."""
    device = base_kept.device
    send = send or (lambda array: as_torch(array).to(device))
    codec = value_codec(codec_id)
    if decodes_on_device(codec):
        return DecodedValues(codec.decode_on_device(payload, config, base_kept, dt, count, send),
                             False)
    host_base = base_kept.cpu().numpy().view(dt.bits)
    values = codec.decode(payload, config, host_base, dt, count)
    return DecodedValues(send(np.ascontiguousarray(values)), True)
