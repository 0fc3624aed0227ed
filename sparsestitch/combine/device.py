"""The merge arithmetic on a torch device (CUDA when there is one), for every rule.

:class:`DeviceCombiner` wraps a :class:`~.combiners.RuleCombiner`; the engine calls it from
its writing thread:

* the elementwise rules (Localize-and-Stitch, task arithmetic) on float tensors merge block
  by block (:class:`DeviceBlockMerge`): each base block and the records' slices in it go to
  the device, each delta is accumulated into dense sums over the block with one
  ``index_add_`` (its positions are unique, so no two writes of one call meet and the sum
  is deterministic), and the result is rounded to the model dtype with the same integer
  rule as :func:`sparsestitch.core.dtypes.from_wide`;
* everything else -- TIES (both conventions), DARE and non-float tensors -- goes through
  :func:`~.device_rules.combine_on_device`: union, rule and rounding on the device.

The operations and their order are those of :mod:`.rules`, so results are bit-identical
to the CPU combiner (tests check it with torch on the CPU device, for every rule).  A rule
without a device form is refused when the combiner is made, never run on the CPU instead.

Arrays cross between host and device through :class:`~.staging.Staging`'s reused buffers
(pinned on CUDA, copies on a separate stream).  What stays on the host in the file
stitcher: reading, checksums and decoding of the records, in the engine's reader threads
(decoding on the device -- :mod:`sparsestitch.delta.device` -- serves
hot-swap and :func:`sparsestitch.stitch_into`, where the base is already on the device).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..core.dtypes import DType
from ..core.errors import OptionError
from ..core.torch_bits import from_wide, signed_container, signed_value, to_wide, wide_type
from ..engine.walk import Stored
from .combiners import CANONICAL_NAN, RuleCombiner
from .device_rules import DeviceStored, combine_on_device
from .staging import Staging


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
        raise OptionError(f"device {device!r} requested but torch sees no CUDA device; "
                         "use --device cpu or auto")
    return parsed


class DeviceCombiner:
    """Run ``combiner`` on torch ``device`` (see module doc)."""

    #: The engine calls it from its writing thread only: device work stays in one thread
    #: and device memory is one block's worth at a time.
    runs_in_readers = False

    def __init__(self, combiner: RuleCombiner, device):
        import torch

        if not combiner.rule.has_torch_update:
            raise OptionError(f"rule {combiner.rule.name!r} has no device form; stitch with "
                             "device='cpu'")
        self.combiner, self.device = combiner, torch.device(device)
        self.staging = Staging(self.device)

    @property
    def weights(self) -> tuple[float, ...]:
        return self.combiner.weights

    def combine(self, name: str, dt: DType, numel: int, stored: Sequence[Stored | None],
                onto: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`~.combiners.RuleCombiner.combine` on the device: ``(positions, new bits)``."""
        send = self.staging.to_device
        on_device = [None if s is None else
                     DeviceStored(send(s.position_array()), send(s.finetuned), send(s.base))
                     for s in stored]
        positions, bits = combine_on_device(self.combiner, name, dt, numel, on_device,
                                            None if onto is None else send(onto))
        new_positions = np.empty(positions.numel(), np.int64)
        new_bits = np.empty(bits.numel(), dt.bits)
        self.staging.to_host(positions, new_positions)
        self.staging.to_host(bits, new_bits)
        return new_positions, new_bits

    def merges_blocks(self, dt: DType) -> bool:
        """Elementwise rules on float tensors merge block by block on the device."""
        return self.combiner.merges_blocks(dt)

    def block_merge(self, dt: DType, stored: Sequence[Stored | None]) -> "DeviceBlockMerge":
        return DeviceBlockMerge(self, dt, stored)

    def replaces_lone(self, dt: DType, index: int) -> bool:
        """No: the device merges every block (the host only stages)."""
        return False

    def takes_marks(self, dt: DType) -> bool:
        """No: the device takes positions."""
        return False

    def bytes_per_position(self, dt: DType) -> int:
        """Host bytes per stored position until the writing thread merges it: the records'
        positions and bits, and their staged copies."""
        return 32


class DeviceBlockMerge:
    """Torch twin of :class:`~.combiners.BlockMerge`: each base block is moved to the device,
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

        dt, device, send = self.dt, self.owner.device, self.owner.staging.to_device
        wide = wide_type(dt)
        spans = [(vector, *np.searchsorted(vector[0], [first, first + block.size]))
                 for vector in self.vectors]
        spans = [(vector, a, b) for vector, a, b in spans if b > a]
        if not spans:
            return
        current = send(block)  # first, so its copy runs while the records are staged
        total = torch.zeros(block.size, dtype=wide, device=device)
        covering = torch.zeros_like(total)
        lone_exact = self.form.mean and self.form.lone_exact
        if lone_exact:  # the bits of the first delta at each element, and whether its weight is 1
            lone = torch.zeros(block.size, dtype=signed_container(dt.itemsize), device=device)
            unit = torch.zeros(block.size, dtype=torch.bool, device=device)
        for (positions, finetuned, base, weight), a, b in spans:
            index = send(positions[a:b] - first)
            finetuned_bits = send(finetuned[a:b])
            if lone_exact:
                first_here = covering[index] == 0
                lone[index[first_here]] = finetuned_bits[first_here]
                unit[index[first_here]] = weight == 1.0
            tau = to_wide(finetuned_bits, dt) - to_wide(send(base[a:b]), dt)
            total.index_add_(0, index, torch.tensor(weight, dtype=wide, device=device) * tau)
            covering.index_add_(0, index, torch.ones_like(tau))
        if self.form.mean:
            update = total / torch.clamp(covering, min=1)
        else:
            update = torch.tensor(self.form.scale, dtype=wide, device=device) * total
        merged = to_wide(current, dt) + update
        bits = from_wide(merged, dt)
        canonical = torch.tensor(signed_value(CANONICAL_NAN[dt.name], dt.itemsize), dtype=bits.dtype,
                                 device=device)
        bits = torch.where(torch.isnan(merged), canonical, bits)
        if lone_exact:
            bits = torch.where((covering == 1) & unit, lone, bits)
        result = torch.where(covering != 0, bits, current)
        self.owner.staging.to_host(result, block)
