"""Record positions decoded on a torch device, for the codecs that decode in parallel.

* ``gaps`` (fixed-width gaps, byte planes): the planes go to the device, the gaps become
  positions by one prefix sum;
* ``bitmap`` (one bit per element): the bytes go to the device, bits are unpacked and the set
  ones listed;
* ``rice`` -- the codec compress picks at low density -- and ``csr`` are decoded on the host
  (:func:`decode_positions` returns None): a Rice stream is a sequence of variable-length
  codes, so finding where each code starts is itself sequential; a GPU-friendly variant
  (e.g. Rice in independent blocks with a table of block offsets) would be a new, versioned
  codec in docs/format.md, not attempted here.  At 1% the positions are a small share of a
  record's bytes next to the values, which are decoded on the device
  (:mod:`.device_values`).

zstd decompression stays on the host.  The checks are those of
:meth:`sparsestitch.delta.format.DeltaReader.positions`: the stored count, every position inside
the tensor, strictly increasing (which gaps guarantee by construction), each failure a
:class:`~sparsestitch.core.errors.DeltaFormatError`; they cost one device synchronisation.
"""

from __future__ import annotations

import numpy as np

from ..core.errors import DeltaFormatError
from ..core.sizes import numel as count_elements
from ..delta.codecs.base import config_int, unpack_stream
from .device_values import from_planes

#: Position codecs decoded on the device.
DEVICE_POSITION_CODECS = ("gaps", "bitmap")


def decode_positions(codec_id: str, payload: bytes | memoryview, config: dict,
                     shape: tuple[int, ...], count: int, send):
    """Sorted int64 flat positions on the device (``send`` moves a host array there), or None
    for a codec decoded on the host."""
    import torch

    numel = count_elements(shape)
    if codec_id == "gaps":
        width = config_int(config, "width", 4, 8)
        if width not in (4, 8):
            raise DeltaFormatError(f"gaps width must be 4 or 8, got {width}")
        raw = unpack_stream(payload, config, count * width)
        gaps = from_planes(send(np.frombuffer(raw, np.uint8)), width, count).long()
        if width == 4:
            gaps &= 0xFFFFFFFF  # read as unsigned
        # A negative int64 is a gap of 2**63 or more: out of range like any gap >= numel.
        out_of_range = (gaps < 0) | (gaps >= numel)
        if count and bool(out_of_range.any()):
            raise DeltaFormatError("a position gap exceeds the tensor size "
                                   f"{numel}")
        positions = torch.cumsum(gaps + 1, 0) - 1
        if count and int(positions[-1]) >= numel:
            raise DeltaFormatError(f"position {int(positions[-1])} is outside a tensor of "
                                   f"{numel} elements")
        return positions
    if codec_id == "bitmap":
        raw = unpack_stream(payload, config, (numel + 7) // 8)
        packed = send(np.frombuffer(raw, np.uint8))
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        bits = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1).bool()
        if bool(bits[numel:].any()):
            raise DeltaFormatError("bitmap has bits set past the end of the tensor")
        positions = torch.nonzero(bits[:numel]).reshape(-1)
        if positions.numel() != count:
            raise DeltaFormatError(f"bitmap marks {positions.numel()} positions, the record "
                                   f"says {count}")
        return positions
    return None
