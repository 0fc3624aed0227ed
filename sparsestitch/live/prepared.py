"""Prepared hot-swap: decode a skill once, then switch it on and off in milliseconds.

:func:`~sparsestitch.live.apply` reads, checks and decodes the delta files and
runs the merge rule every time.  A server that switches a resident model between
skills does that work once per skill with :func:`prepare`: it applies the deltas
once, records for every tensor the positions changed, the bits there before
(*expected*) and after (*new*), and reverts.  :meth:`PreparedPatch.apply` then only
moves those arrays to the tensors' device (from pinned host memory, or from device
memory with ``resident=True``), gathers the live values, checks them against
*expected*, and scatters *new*: no file access, no decoding, no merge arithmetic,
and one device synchronisation for the whole model.

Exactness: for every rule the merge depends only on the deltas and the model's
values at the positions the deltas store (TIES ranks all of a tensor's stored
entries, so a stored position it trims away still matters).  So the prepared patch
also keeps the bits at every stored position (*guard*) where the rule changes
fewer; if the live values there and at the changed positions still equal what was
prepared, the *new* bits are exactly what a fresh ``apply`` would write; if any
differs (the model changed, or a patch applied since overlaps),
:meth:`~PreparedPatch.apply` raises before modifying anything.  A tensor
that was replaced or moved since :func:`prepare` (``model.to(...)``, reloading) is
refused too, rather than patching storage the model no longer uses.

A tensor that ``apply`` patches whole (most of a default delta's tensors: see
:mod:`.patch`) is prepared as its XOR mask (before ^ after, the tensor's size) and two
checksums: switching on hashes the tensor (it must be the one prepared for), XORs the mask
in, and reverting checks the other checksum and XORs it out again.  That is two reads and a
write of the tensor, with nothing allocated.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..combine.rules import get_rule
from ..combine.union import union_of
from ..core.errors import BaseMismatchError, SparsestitchError
from ..delta.format import DeltaReader
from ..engine.walk import stored_positions
from .patch import Patch, PatchEntry, active_patches
from .patch import apply_with_masks
from .tensors import LiveTensor, named_tensors


@dataclass(frozen=True)
class PreparedTensor:
    """One tensor of a prepared patch: where it changes, and the bits before and after;
    or, for a tensor patched whole (``positions is None``), its XOR mask in ``new`` and the
    checksums of the tensor before and after."""

    live: LiveTensor
    positions: object   # torch flat positions (int32 in host memory for CUDA tensors)
    expected: object    # torch bits there before the patch
    new: object         # torch bits there after it
    guard: object = None            # stored positions the rule leaves unchanged (or None)
    guard_expected: object = None   # the bits there
    before_xxh3: str | None = None  # a whole tensor's checksum before the patch
    after_xxh3: str | None = None   # and after it


class PreparedPatch:
    """Deltas decoded and merged for one model, ready to :meth:`apply` and revert fast."""

    def __init__(self, entries: list[PreparedTensor]):
        self._entries = entries

    @property
    def names(self) -> list[str]:
        """The tensors the patch changes."""
        return [entry.live.name for entry in self._entries]

    @property
    def count(self) -> int:
        """Positions the patch changes, over all tensors."""
        return sum(int(entry.new.count_nonzero()) if entry.positions is None
                   else int(entry.positions.numel()) for entry in self._entries)

    @property
    def nbytes(self) -> int:
        """Memory the prepared arrays hold (host or device)."""
        return sum(t.numel() * t.element_size() for e in self._entries
                   for t in (e.positions, e.expected, e.new, e.guard, e.guard_expected)
                   if t is not None)

    def apply(self, model) -> Patch:
        """Switch the skill on in ``model`` (the one given to :func:`prepare`); returns the
        :class:`~sparsestitch.live.Patch` whose ``revert()`` switches it off."""
        import torch

        tensors = named_tensors(model)
        staged, whole = [], []
        for entry in self._entries:
            live = entry.live
            tensor = tensors.get(live.name)
            if tensor is None or LiveTensor(live.name, tensor, live.dt).key != live.key:
                raise SparsestitchError("the model's tensor is not the one this patch was "
                                        "prepared for (replaced or moved since): prepare again",
                                        tensor=live.name)
            if entry.positions is None:
                if active_patches(live.key):
                    raise BaseMismatchError("the tensor changed since it was prepared: another "
                                            "patch is active on it, and this prepared patch "
                                            "changes it whole: revert that one first, or switch "
                                            "this one on before it", tensor=live.name)
                if live.digest() != entry.before_xxh3:
                    raise _changed(live)
                whole.append(PatchEntry(live, None, mask=entry.new, after=entry.after_xxh3))
                continue
            positions = entry.positions.to(live.device, non_blocking=True).long()
            expected = entry.expected.to(live.device, non_blocking=True)
            new = entry.new.to(live.device, non_blocking=True)
            current = live.take(positions)
            differs = (current != expected).any()
            if entry.guard is not None:
                guard = entry.guard.to(live.device, non_blocking=True).long()
                guard_expected = entry.guard_expected.to(live.device, non_blocking=True)
                differs = differs | (live.take(guard) != guard_expected).any()
            staged.append((live, positions, expected, new, differs))
        if staged:
            # One synchronisation for the whole model, and nothing written unless all agree.
            differs = torch.stack([d for *_, d in staged])
            if bool(differs.any()):
                raise _changed(staged[int(differs.nonzero()[0, 0])][0])
        return Patch.scatter([(PatchEntry(live, positions, expected), new)
                              for live, positions, expected, new, _ in staged]
                             + [(entry, None) for entry in whole])


def _changed(live: LiveTensor) -> BaseMismatchError:
    return BaseMismatchError("the model's values at this patch's positions changed since it "
                             "was prepared (another patch applied over it, or the weights were "
                             "modified): revert that, or prepare again", tensor=live.name)


def prepare(model, deltas: str | os.PathLike | Sequence[str | os.PathLike], *,
            rule: str = "localize-stitch", weights: Sequence[float] | None = None,
            verify_base: bool = True, added: str = "error", resident: bool = False,
            max_memory: int | str | None = None, threads: int | None = None,
            **rule_options) -> PreparedPatch:
    """Decode and merge ``deltas`` for ``model`` once; :meth:`PreparedPatch.apply` is then fast.

    Arguments are those of :func:`~sparsestitch.live.apply` (the same checks run,
    once, and the result is bit-identical).  The model is left as it was.  The prepared
    arrays live in pinned host memory for CUDA tensors (fast, asynchronous copies), in
    ordinary memory for CPU tensors, or on the tensors' device with ``resident=True``
    (no copy at apply time, at the cost of device memory: see ``nbytes``).

    >>> skill = prepare(model, "math.delta")    # doctest: +SKIP
    >>> with skill.apply(model):                 # doctest: +SKIP
    ...     answer = model(question)
    """
    import torch

    patch = apply_with_masks(model, deltas, rule=rule, weights=weights, verify_base=verify_base,
                             added=added, max_memory=max_memory, threads=threads,
                             **rule_options)
    try:
        wholes = [entry for entry in patch.entries if entry.whole]
        changed = [(entry.live, entry.positions, entry.originals, entry.live.take(entry.positions))
                   for entry in patch.entries if not entry.whole]
    finally:
        patch.revert()
    paths = [deltas] if isinstance(deltas, (str, os.PathLike)) else list(deltas)
    with contextlib.ExitStack() as stack:
        # Elementwise rules change exactly the stored positions: nothing else to guard.
        readers = ([] if get_rule(rule).elementwise else
                   [stack.enter_context(DeltaReader(p)) for p in paths])
        entries = []
        for live, positions, expected, new in changed:
            guard = guard_expected = None
            stored = _stored_positions(readers, live.name) if readers else None
            if stored is not None and stored.size != positions.numel():
                # the rule changes a subset of the stored positions: guard the rest
                kept = np.isin(stored, positions.cpu().numpy(), assume_unique=True)
                guard = torch.from_numpy(stored[~kept]).to(live.device)
                guard_expected = live.take(guard)
            arrays = [positions, expected, new, guard, guard_expected]
            if live.device.type == "cuda" and not resident and live.numel < 2**31:
                # half the bytes to move at apply time
                arrays[0] = positions.to(torch.int32)
                arrays[3] = None if guard is None else guard.to(torch.int32)
            if not resident:
                arrays = [None if a is None else _host(a) for a in arrays]
            entries.append(PreparedTensor(live, *arrays))
    # a whole tensor's mask is already on its device (the CPU); reverted, the tensor is the base
    entries += [PreparedTensor(entry.live, None, None, entry.mask, before_xxh3=entry.live.digest(),
                               after_xxh3=entry.after) for entry in wholes]
    return PreparedPatch(entries)


def _stored_positions(readers: Sequence[DeltaReader], name: str) -> np.ndarray:
    """Sorted union of the flat positions the deltas store for tensor ``name``."""
    arrays = []
    for reader in readers:
        record = reader.record(name)
        if record is not None and record.kind == "sparse":
            positions = stored_positions(reader, record)
            arrays.append(np.arange(record.numel, dtype=np.int64) if positions is None
                          else positions)
    return union_of(arrays).positions


def _host(tensor):
    """A host copy of ``tensor``, pinned when it comes from a CUDA device."""
    if tensor.device.type == "cuda":
        return tensor.to("cpu").pin_memory()
    return tensor.clone()
