"""One live tensor's deltas decoded and merged on the tensor's device.

Shared by :func:`~.resident.stitch_into` and, for tensors on an accelerator,
:func:`~.patch.apply`: the host reads each record's payload, checks it and decompresses its
streams; positions are decoded on the device for ``gaps`` and ``bitmap``
(:mod:`sparsestitch.delta.device`), on the host for ``rice`` and ``csr``; the
device gathers the base bits at the
stored positions, decodes the values against them
(:func:`~sparsestitch.delta.device.values_on_device`) and merges by rule
(:func:`~sparsestitch.combine.device_rules.combine_on_device`), so the base bits never leave
the device.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..combine.combiners import RuleCombiner
from ..combine.device_rules import DeviceStored, combine_on_device
from ..combine.staging import Staging
from ..delta.device import positions_on_device, values_on_device
from ..delta.format import DeltaReader
from ..engine.walk import stored_positions
from .tensors import LiveTensor


def merge_on_device(live: LiveTensor, readers: Sequence[DeltaReader], combiner: RuleCombiner,
                    staging: Staging):
    """``(positions, new bits)`` on the tensor's device (int64 flat positions, bits in the
    tensor's signed container), or None when no delta stores anything in it.  The model's
    current bits at the stored positions are the base; the tensor is not modified."""
    import torch

    stored: list[DeviceStored | None] = [None] * len(readers)
    for i, reader in enumerate(readers):
        record = reader.record(live.name)
        if record is None or record.kind != "sparse":
            continue
        payload = reader.payload(record)
        with reader.decoding(record):
            positions = positions_on_device(record.positions.get("codec"),
                                            memoryview(payload)[:record.positions_nbytes],
                                            record.positions, record.shape, record.count,
                                            staging.to_device)
        if positions is None:  # a codec decoded on the host
            found = stored_positions(reader, record, payload)
            positions = (torch.arange(live.numel, device=live.device) if found is None
                         else staging.to_device(found))
        base_kept = live.take(positions)
        with reader.decoding(record):
            values = values_on_device(record.values.get("codec"),
                                      memoryview(payload)[record.positions_nbytes:],
                                      record.values, base_kept, live.dt, record.count,
                                      staging.to_device)
        stored[i] = DeviceStored(positions, values.bits, base_kept)
    if all(s is None for s in stored):
        return None
    return combine_on_device(combiner, live.name, live.dt, live.numel, stored)
