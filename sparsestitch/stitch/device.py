"""The merge arithmetic on a torch device (CUDA when there is one).

:class:`DeviceCombiner` wraps a :class:`~.combine.RuleCombiner`; the engine
asks it for block merges (:class:`DeviceBlockMerge`) of the elementwise rules --
Localize-and-Stitch and task arithmetic -- on float tensors: each base block and
the records' slices in it are copied to the device (from pinned host memory on
CUDA), each delta is accumulated into dense sums over the block with one
``index_add_`` (its positions are unique, so no two writes of one call meet and
the sum is deterministic), and the result is rounded to the model dtype with the
same integer rule as :func:`sparsestitch.dtypes.from_wide`.  The operations and
their order are those of :mod:`.rules`, so results are bit-identical to the CPU
combiner (tests check it with torch on the CPU).  TIES, DARE and non-float
tensors use the CPU combiner.

What stays on the host: reading, checksums and decoding of the records (the
codecs are numpy).  Positions are not decoded on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..dtypes import DType
from ..walk import Stored
from .combine import CANONICAL_NAN, RuleCombiner

def _torch_signed():
    import torch
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def resolve_device(device: str):
    """``"cpu"`` -> None (the numpy path); ``"cuda"``/``"cuda:N"`` -> that torch device;
    ``"auto"`` -> CUDA when torch sees one, else None.  Importing torch only when needed."""
    if device == "cpu":
        return None
    import torch

    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    parsed = torch.device(device)
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device; "
                         "use --device cpu or auto")
    return parsed


class DeviceCombiner:
    """Run ``combiner`` on torch ``device`` where the rule is elementwise (see module doc)."""

    #: The engine calls it from its writing thread only: device work stays in one thread
    #: and device memory is one block's worth at a time.
    runs_in_readers = False

    def __init__(self, combiner: RuleCombiner, device):
        import torch

        self.combiner, self.device = combiner, torch.device(device)
        self._pin = self.device.type == "cuda"

    def combine(self, name: str, dt: DType, numel: int, stored: Sequence[Stored | None],
                onto: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Whatever the engine does not merge block by block: the CPU combiner's result."""
        return self.combiner.combine(name, dt, numel, stored, onto)

    def merges_blocks(self, dt: DType) -> bool:
        """Elementwise rules on float tensors merge block by block on the device."""
        return self.combiner.merges_blocks(dt)

    def block_merge(self, dt: DType, stored: Sequence[Stored | None]) -> "DeviceBlockMerge":
        return DeviceBlockMerge(self, dt, stored)

    def bytes_per_position(self, dt: DType) -> int:
        """Host bytes per stored position until the writing thread merges it: the records'
        positions and bits, and the pinned copies made for the transfer."""
        return 32

    def _to_device(self, array: np.ndarray):
        import torch

        array = np.ascontiguousarray(array)
        if array.dtype.kind == "u":  # torch lacks most unsigned types: move the bits as signed
            array = array.view(f"<i{array.dtype.itemsize}") if array.dtype.itemsize > 1 else array
        host = torch.from_numpy(array)
        if self._pin:
            host = host.pin_memory()
        return host.to(self.device, non_blocking=self._pin)


class DeviceBlockMerge:
    """Torch twin of :class:`~.combine.BlockMerge`: each base block is moved to the device,
    every delta's task vector is ``index_add_``-ed into a dense sum and count there, and the
    merged block comes back.  Dense over the block, so no union is ever built; the float
    operations per position are those of the numpy merge, so the bits are identical.

    Built in the engine's reader thread (host arrays only); called from the writing thread.
    """

    #: Elements per device pass, bounding device memory to about 40 bytes each.
    WINDOW = 1 << 24

    def __init__(self, owner: DeviceCombiner, dt: DType, stored: Sequence[Stored | None]):
        self.owner, self.dt = owner, dt
        self.form = owner.combiner.rule.block_form(owner.combiner.options)
        self.vectors = [(s.position_array(), s.finetuned, s.base, w)
                        for s, w in zip(stored, owner.combiner.weights) if s is not None]

    def __call__(self, block: np.ndarray, first: int) -> None:
        for offset in range(0, block.size, self.WINDOW):
            part = block[offset:offset + self.WINDOW]
            self._merge(part, first + offset)

    def _merge(self, block: np.ndarray, first: int) -> None:
        import torch

        dt, device, send = self.dt, self.owner.device, self.owner._to_device
        wide = torch.float64 if dt.wide == np.float64 else torch.float32
        total = torch.zeros(block.size, dtype=wide, device=device)
        covering = torch.zeros_like(total)
        lone_exact = self.form.mean and self.form.lone_exact
        if lone_exact:  # the bits of the first delta at each element, and whether its weight is 1
            lone = torch.zeros(block.size, dtype=_torch_signed()[dt.itemsize], device=device)
            unit = torch.zeros(block.size, dtype=torch.bool, device=device)
        touched = False
        for positions, finetuned, base, weight in self.vectors:
            a, b = np.searchsorted(positions, [first, first + block.size])
            if b == a:
                continue
            index = send(positions[a:b] - first)
            finetuned_bits = send(finetuned[a:b])
            if lone_exact:
                first_here = covering[index] == 0
                lone[index[first_here]] = finetuned_bits[first_here]
                unit[index[first_here]] = weight == 1.0
            tau = _to_wide(finetuned_bits, dt) - _to_wide(send(base[a:b]), dt)
            total.index_add_(0, index, torch.tensor(weight, dtype=wide, device=device) * tau)
            covering.index_add_(0, index, torch.ones_like(tau))
            touched = True
        if not touched:
            return
        if self.form.mean:
            update = total / torch.clamp(covering, min=1)
        else:
            update = torch.tensor(self.form.scale, dtype=wide, device=device) * total
        current = send(block)
        merged = _to_wide(current, dt) + update
        bits = _from_wide(merged, dt)
        canonical = torch.tensor(_signed(CANONICAL_NAN[dt.name], dt.itemsize), dtype=bits.dtype,
                                 device=device)
        bits = torch.where(torch.isnan(merged), canonical, bits)
        if lone_exact:
            bits = torch.where((covering == 1) & unit, lone, bits)
        result = torch.where(covering != 0, bits, current)
        block[:] = result.cpu().numpy().view(dt.bits)


def _signed(bits: int, itemsize: int) -> int:
    """An unsigned bit pattern as the signed integer of the same width (torch's containers)."""
    return bits - (1 << (8 * itemsize)) if bits >= 1 << (8 * itemsize - 1) else bits


def _to_wide(bits, dt: DType):
    import torch

    if dt.name == "BF16":
        return (bits.to(torch.int32) << 16).view(torch.float32)
    if dt.name == "F16":
        return bits.view(torch.float16).to(torch.float32)
    if dt.name == "F32":
        return bits.view(torch.float32)
    return bits.view(torch.float64)


def _from_wide(values, dt: DType):
    """Torch twin of :func:`sparsestitch.dtypes.from_wide` (returns signed bit containers)."""
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
