"""Hot-swap: patch a live model's tensors in place with deltas, and revert them bit for bit.

:func:`apply` merges deltas into a model's parameters and buffers (or a dict
of tensors) where they live, CPU or CUDA, with the same combiner as
:func:`~sparsestitch.ops.stitch.stitch`: the model ends up bit-identical to
stitching the same deltas to a file and loading it.  Only stored positions are
touched, and the values there are saved first, so :meth:`Patch.revert` puts
the model back exactly.  On CUDA the values are decoded and merged on the device
(:mod:`.device_merge`: positions and zstd streams decoded on the host, the base bits never
leaving the device); CPU tensors, and tensors under an active patch, are decoded and merged
on the host by the codecs and the numpy/C combiner, with gathering and writing on the
tensor's device.

A tensor the deltas store a large share of (a default delta keeps 15-100% of each tensor)
is patched *whole*, on the CPU, by the file stitcher's row-block merge
(:func:`merge_in_place`): records decoded a run at a time alongside the tensor's own memory,
no position arrays, at most ``max_memory`` besides what the revert keeps: for one delta's
bitmap record the bits it replaced (:mod:`.marks`, gathered by the merge anyway), else a copy
of the tensor that becomes the patch's XOR mask (before ^ after, the tensor's size: less than
positions and saved bits for a dense record).  Reverting puts those bits back, or applies the
mask again, after checking that the tensor still hashes to what the patch wrote; a tensor
changed since raises rather than reverting into a third state.

Patches stack.  A patch applied over another one adds its update to the
current values (``round(wide(current) + update)``, with ``update`` computed
from the *base* values, which are known from the lower patch's saved values);
where the lower patch did not touch a position that is exactly the stitched
result.  Patches revert last-in, first-out: reverting one that a later, still
active patch overlaps raises, and reverting twice does nothing.  A patch that
is dropped without being reverted stays in the model for good.
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..combine.combiners import RuleCombiner, rule_combiner
from ..combine.staging import Staging
from ..combine.union import union_of
from ..core.errors import OptionError, SparsestitchError
from ..delta.format import DeltaReader, Record
from ..engine.budget import MemoryBudget
from ..engine.parallel import each
from ..engine.readahead import DEFAULT_WORKERS, workers_for
from ..engine.walk import BaseHash, RecordRuns, RowBlocks, Stored, decode_at, stored_positions
from .device_merge import merge_on_device
from .marks import SavedMarks
from .tensors import LiveTensor, match_records, named_tensors

#: Device types whose tensors are patched by decoding and merging on the device (the base bits
#: stay there); on the CPU the numpy and C decoders and merge are faster.  Tensors under an
#: active patch always take the host path, which knows how to see through it.
DEVICE_MERGED = ("cuda",)

#: Live tensor identity -> the active patches over it, oldest first.
_ACTIVE: dict[tuple, list[weakref.ref]] = {}

#: Bytes a patch keeps per changed position for the position (int64) besides the bits there;
#: a whole-tensor patch keeps one mask element per element instead.
POSITION_BYTES = 8

#: What a live tensor that is not the deltas' base means, in the user's terms.
_NOT_THE_BASE = ("the model's tensor differs from the base the delta was made from: this "
                 "delta belongs to another model (or the model was changed)")


def apply(model, deltas: str | os.PathLike | Sequence[str | os.PathLike], *,
          rule: str = "localize-stitch", weights: Sequence[float] | None = None,
          verify_base: bool = True, added: str = "error", max_memory: int | str | None = None,
          threads: int | None = None, **rule_options) -> "Patch":
    """Merge ``deltas`` into ``model`` (a ``torch.nn.Module`` or a dict of tensors) in place.

    Rules, weights and options are those of :func:`~sparsestitch.ops.stitch.stitch`, with
    bit-identical results.  Every tensor the deltas describe must be in the model under
    the same name, shape and dtype (model tensors they do not describe are left alone).
    With ``verify_base`` (the default) each of those tensors is also hashed and compared
    with the base checksum the deltas recorded: one pass over their bytes on the CPU
    (xxh3, several GB/s), plus a device-to-host copy for CUDA tensors -- skip it only for
    a model known to be the deltas' base.  Any mismatch raises before a tensor is
    modified.  Tensors a delta adds (the base lacks) cannot be created in a live model:
    ``added="error"`` refuses such deltas, ``"skip"`` ignores those tensors.
    ``max_memory`` (bytes or ``"512MiB"``; 1 GiB by default) bounds what decoding holds
    besides what the patch keeps for its revert; ``threads`` (default: up to 4, the usable
    cores) patches that many whole tensors at once, sharing the budget.

    Returns a :class:`Patch`; ``patch.revert()`` (or leaving a ``with`` block) restores
    the original values bit for bit.

    >>> with apply(model, "math.delta"):  # doctest: +SKIP
    ...     answer = model(question)
    """
    return _patched(model, deltas, rule, weights, verify_base, added, max_memory, threads,
                    rule_options, masks=False)


def apply_with_masks(model, deltas: str | os.PathLike | Sequence[str | os.PathLike], *,
                     rule: str = "localize-stitch", weights: Sequence[float] | None = None,
                     verify_base: bool = True, added: str = "error",
                     max_memory: int | str | None = None, threads: int | None = None,
                     **rule_options) -> "Patch":
    """:func:`apply`, every tensor patched whole keeping an XOR mask of its change (before ^
    after: what :func:`~.prepared.prepare` switches with) where :func:`apply` keeps only
    what a lone delta's bitmap record replaced."""
    return _patched(model, deltas, rule, weights, verify_base, added, max_memory, threads,
                    rule_options, masks=True)


def _patched(model, deltas, rule, weights, verify_base, added, max_memory, threads,
             rule_options: dict, masks: bool) -> "Patch":
    paths = [deltas] if isinstance(deltas, (str, os.PathLike)) else list(deltas)
    combine = rule_combiner(rule, weights, len(paths), **rule_options)
    if added not in ("error", "skip"):
        raise OptionError(f"added must be 'error' or 'skip', not {added!r}")
    budget = MemoryBudget.of(max_memory)
    tensors = named_tensors(model)
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(DeltaReader(p)) for p in paths]
        targets = match_records(tensors, readers, added)
        if verify_base:
            for live in targets.values():
                check_live_base(live, readers)
        patch = Patch()
        staging: dict[object, Staging] = {}
        whole = [live for live in targets.values() if patched_whole(
            live, [r.record(live.name) for r in readers], combine, active_patches(live.key))]
        try:
            patch_whole(patch._entries, whole, readers, combine, budget,
                        workers_for(threads, DEFAULT_WORKERS), masks)
            for live in targets.values():
                if live.key not in patch._entries:
                    patch._patch(live, readers, combine, staging)
        except BaseException:
            patch._undo()
            raise
    patch._register()
    return patch


@dataclass(frozen=True)
class PatchEntry:
    """What a patch changed in one live tensor, and how to undo it.

    Either ``positions`` (torch int64 flat positions on the tensor's device) and
    ``originals`` (the bits there before the patch), or, for a tensor patched whole,
    ``positions is None`` and ``mask`` (before XOR after, the tensor's shape and device) or
    ``saved`` (the bits a lone delta's bitmap record replaced, :class:`~.marks.SavedMarks`),
    with ``after``, the xxh3 of the tensor the patch left (checked before reverting).
    """

    live: LiveTensor
    positions: object
    originals: object = None
    mask: object = None
    after: str | None = None
    saved: SavedMarks | None = None

    @property
    def whole(self) -> bool:
        return self.positions is None

    def undo(self) -> None:
        """Put the bits back (a whole entry: XOR the mask in again, or the saved bits)."""
        if self.saved is not None:
            self.saved.put_back(self.live.host_view())
        elif self.whole:
            self.live.bits.bitwise_xor_(self.mask)
        else:
            self.live.scatter(self.positions, self.originals)

    def check_undoable(self) -> None:
        """Raise if undoing would not restore the tensor exactly: a whole-tensor entry's
        tensor changed since the patch wrote it."""
        if self.whole and self.live.digest() != self.after:
            raise SparsestitchError("the tensor changed since the patch was applied (the "
                                    "weights were modified): reverting would not give the "
                                    "original values back; reload the model",
                                    tensor=self.live.name)

    def before(self, values: np.ndarray, positions: np.ndarray) -> None:
        """Turn ``values`` (the bits at sorted flat ``positions`` as this patch left them)
        into the bits there before it, in place."""
        if self.saved is not None:
            self.saved.before(values, positions)
            return
        if self.whole:
            values ^= self.mask.reshape(-1).cpu().numpy().view(values.dtype)[positions]
            return
        saved_at = self.positions.cpu().numpy()
        saved = self.originals.cpu().numpy().view(values.dtype)
        if not saved_at.size:
            return
        index = np.minimum(np.searchsorted(saved_at, positions), saved_at.size - 1)
        hit = saved_at[index] == positions
        values[hit] = saved[index[hit]]

    def before_chunk(self, chunk: np.ndarray, start: int) -> None:
        """:meth:`before` for the elements ``start, start + 1, ...`` (``chunk``)."""
        if self.saved is not None:
            self.saved.before_chunk(chunk, start)
            return
        if self.whole:
            mask = self.mask.reshape(-1)[start:start + chunk.size].cpu().numpy()
            chunk ^= mask.view(chunk.dtype)
            return
        saved_at = self.positions.cpu().numpy()
        saved = self.originals.cpu().numpy().view(chunk.dtype)
        a, b = np.searchsorted(saved_at, [start, start + chunk.size])
        chunk[saved_at[a:b] - start] = saved[a:b]


class Patch:
    """Deltas applied to live tensors: what was changed, and the values it replaced."""

    def __init__(self):
        self._entries: dict[tuple, PatchEntry] = {}
        self._reverted = False

    @classmethod
    def scatter(cls, changes: Sequence[tuple[PatchEntry, object]]) -> "Patch":
        """Write each ``(entry, new bits at its positions)`` (a whole entry: its mask, and
        None) and return the active patch that reverts them (everything written is undone
        if one write fails)."""
        patch = cls()
        try:
            for entry, new in changes:
                if entry.whole:
                    entry.live.bits.bitwise_xor_(entry.mask)
                else:
                    entry.live.scatter(entry.positions, new)
                patch._entries[entry.live.key] = entry
        except BaseException:
            patch._undo()
            raise
        patch._register()
        return patch

    @property
    def active(self) -> bool:
        """True until :meth:`revert`."""
        return not self._reverted

    @property
    def names(self) -> list[str]:
        """The tensors this patch changed."""
        return [entry.live.name for entry in self._entries.values()]

    @property
    def entries(self) -> list[PatchEntry]:
        """Per tensor changed: the positions and the bits there before the patch."""
        return list(self._entries.values())

    def revert(self) -> None:
        """Put back the values this patch replaced, bit for bit; a second call does nothing.

        Raises :class:`~sparsestitch.core.errors.SparsestitchError` (and changes nothing) while
        a patch applied later over the same tensors is still active (revert that first), or
        when a tensor patched whole was modified since (its revert would not be exact).
        """
        if self._reverted:
            return
        for key, entry in self._entries.items():
            if active_patches(key)[-1] is not self:
                raise SparsestitchError("a patch applied later over this tensor is still active: "
                                        "revert patches in reverse order of applying them",
                                        tensor=entry.live.name)
        # the checksums of tensors patched whole, side by side (nothing is changed yet)
        each([entry.check_undoable for entry in self._entries.values()],
             workers_for(None, DEFAULT_WORKERS))
        self._undo()
        self._unregister()

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc) -> None:
        self.revert()

    def entry(self, key: tuple) -> PatchEntry:
        """What this patch changed in the live tensor of ``key``."""
        return self._entries[key]

    def _patch(self, live: LiveTensor, readers: list[DeltaReader], combine: RuleCombiner,
               staging: dict) -> None:
        below = active_patches(live.key)
        if live.device.type in DEVICE_MERGED and not below:
            if live.device not in staging:
                staging[live.device] = Staging(live.device)
            merged = merge_on_device(live, readers, combine, staging[live.device])
            change = None if merged is None else (merged[0], live.take(merged[0]), merged[1])
        else:
            change = _merged_on_host(live, readers, combine, below)
        if change is not None:
            positions, originals, new_bits = change
            self._entries[live.key] = PatchEntry(live, positions, originals)
            live.scatter(positions, new_bits)

    def _undo(self) -> None:
        entries = list(reversed(list(self._entries.values())))
        for entry in entries:
            if entry.saved is None:
                entry.undo()
        # the saved bits of tensors patched whole, put back side by side (the C loop
        # releases the GIL; an XOR mask's torch op was already parallel)
        each([entry.undo for entry in entries if entry.saved is not None],
             workers_for(None, DEFAULT_WORKERS))
        self._reverted = True

    def _register(self) -> None:
        ref = weakref.ref(self, functools.partial(_forget, list(self._entries)))
        self._ref = ref
        for key in self._entries:
            _ACTIVE.setdefault(key, []).append(ref)

    def _unregister(self) -> None:
        _forget(list(self._entries), self._ref)
        self._entries = {}


def _merged_on_host(live: LiveTensor, readers: list[DeltaReader], combine: RuleCombiner,
                    below: list["Patch"]):
    """``(positions, bits there now, new bits)`` on the tensor's device, decoded and merged on
    the host, seeing through the active patches ``below``; None if nothing is stored."""
    import torch

    records = [reader.record(live.name) for reader in readers]
    sparse = [(i, r) for i, r in enumerate(records) if r is not None and r.kind == "sparse"]
    if not sparse:
        return None
    payloads = {i: readers[i].payload(r) for i, r in sparse}
    positions = {i: stored_positions(readers[i], r, payloads[i]) for i, r in sparse}
    nothing = np.empty(0, np.int64)
    every = None
    for i, found in positions.items():
        if found is None:  # every element: one index array for all such records
            every = np.arange(live.numel, dtype=np.int64) if every is None else every
            positions[i] = every
    # One union for both the live gather and the merge rule (it is the costly part).
    merged = union_of([positions.get(i, nothing) for i in range(len(readers))])
    union = merged.positions
    union_device = torch.from_numpy(union).to(live.device)
    current = live.gather(union_device)
    base = _undo_patches(np.array(current), union, live.key, below)
    stored: list[Stored | None] = [None] * len(readers)
    for i, record in sparse:
        stored[i] = decode_at(readers[i], record, positions[i], base[merged.where[i]],
                              payloads[i])
    new_positions, new_bits = combine.combine(live.name, live.dt, live.numel, stored,
                                              onto=current if below else None, union=merged)
    if new_positions.size == union.size:
        where = union_device
    else:
        where = torch.from_numpy(new_positions).to(live.device)
        current = current[np.searchsorted(union, new_positions)]
    originals = torch.from_numpy(np.ascontiguousarray(current).view(live.signed)).to(live.device)
    return where, originals, torch.from_numpy(new_bits.view(live.signed)).to(live.device)


def patched_whole(live: LiveTensor, records: Sequence[Record | None], combine: RuleCombiner,
                  below: Sequence["Patch"]) -> bool:
    """Whether a tensor is patched whole (:func:`merge_in_place` and a mask) rather than at
    its positions: an elementwise rule on a float CPU tensor under no other patch, where
    saving positions and bits would take more memory than a copy of the tensor."""
    return not below and can_merge_in_place(live, combine) and whole_is_smaller(live, records)


def can_merge_in_place(live: LiveTensor, combine: RuleCombiner) -> bool:
    """Whether :func:`merge_in_place` applies: a float tensor in host memory, an elementwise
    rule."""
    return live.in_host_memory and live.numel > 0 and combine.merges_blocks(live.dt)


def whole_is_smaller(live: LiveTensor, records: Sequence[Record | None]) -> bool:
    """Whether a mask of the whole tensor takes no more memory than a prepared patch's
    positions and bits before and after for what the records store (at least a sixth of a
    bfloat16 tensor, a quarter of a float32 one).  It is also far faster: a pass of XOR
    against a scatter at every position."""
    stored = sum(r.count for r in records if r is not None and r.kind == "sparse")
    itemsize = live.dt.itemsize
    return stored > 0 and stored * (POSITION_BYTES + 2 * itemsize) >= live.numel * itemsize


def patch_whole(entries: dict, lives: list[LiveTensor], readers: list[DeltaReader],
                combine: RuleCombiner, budget: MemoryBudget, workers: int,
                masks: bool = False) -> None:
    """Patch ``lives`` whole (:func:`whole_entry`, ``masks`` as there), ``workers`` at a time
    (0 or 1: in this thread), each within its share of ``budget``.  The first failure stops what has
    not started and is raised once the running ones end; what they wrote is kept in
    ``entries`` for the caller to undo."""
    if workers <= 1 or len(lives) <= 1:
        for live in lives:
            entries[live.key] = whole_entry(live, readers, combine, budget, masks)
        return
    workers = min(workers, len(lives))
    share = MemoryBudget(max(1, budget.total // workers))
    failure = None
    with ThreadPoolExecutor(workers, thread_name_prefix="sparsestitch-patch") as pool:
        futures = [pool.submit(whole_entry, live, readers, combine, share, masks)
                   for live in lives]
        for future in futures:
            try:
                entry = future.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                if failure is None:
                    failure = exc
                    for pending in futures:
                        pending.cancel()
                continue
            entries[entry.live.key] = entry
    if failure is not None:
        raise failure


def whole_entry(live: LiveTensor, readers: Sequence[DeltaReader], combine: RuleCombiner,
                budget: MemoryBudget, masks: bool = False) -> PatchEntry:
    """Patch a tensor whole (:func:`merge_in_place`) and return its entry: the bits a lone
    delta's record replaced (:class:`~.marks.SavedMarks`), else (or with ``masks``) the XOR
    mask of the bits before and after; and the checksum after.  On failure the tensor is put
    back before the error propagates."""
    records = [reader.record(live.name) for reader in readers]
    saved = SavedMarks()
    mask = None if not masks and lone_replace(live, records, combine) else live.bits.clone()
    try:
        merge_in_place(live, readers, records, combine, budget,
                       keep=saved.add if mask is None else None)
    except BaseException:
        if mask is None:
            saved.put_back(live.host_view())
        else:
            live.bits.copy_(mask)
        raise
    if mask is None:
        return PatchEntry(live, None, saved=saved, after=live.digest())
    mask.bitwise_xor_(live.bits)
    return PatchEntry(live, None, mask=mask, after=live.digest())


def lone_replace(live: LiveTensor, records: Sequence[Record | None],
                 combine: RuleCombiner) -> bool:
    """Whether :func:`merge_in_place` writes one delta's entries over the tensor as they are
    (:meth:`~sparsestitch.engine.walk.RecordRuns.replace_into`: a lone record of every element
    or a bitmap, whose entries keep their bits under ``combine``)."""
    stored = [i for i, r in enumerate(records) if r is not None and r.kind == "sparse"]
    return (len(stored) == 1 and records[stored[0]].positions.get("codec") in ("all", "bitmap")
            and combine.replaces_lone(live.dt, stored[0]))


def merge_in_place(live: LiveTensor, readers: Sequence[DeltaReader],
                   records: Sequence[Record | None], combine: RuleCombiner,
                   budget: MemoryBudget, keep=None) -> None:
    """Merge the records into a live CPU tensor where it lives, row block by row block, as
    the file stitcher merges a base block (:class:`~sparsestitch.engine.walk.RecordRuns` and the
    rule's block merge): the same bits, no position arrays, within ``budget``.  The tensor
    must be its own base (checked by the caller) and :attr:`~LiveTensor.in_host_memory`.
    ``keep``: handed what a lone record replaces, block by block (see
    :meth:`~sparsestitch.engine.walk.RecordRuns.replace_into`; :func:`lone_replace` says
    when that is the merge)."""
    dt = live.dt
    blocks = RowBlocks.of(live.shape, dt.itemsize, budget.block_bytes)
    flat = live.host_view()
    with RecordRuns(live, live.name, blocks, readers, records, budget) as runs:
        lone = runs.lone
        replace = lone is not None and combine.replaces_lone(dt, lone)
        for start, stop in blocks.bounds:
            lo, hi = blocks.elements(start, stop)
            block = flat[lo:hi]
            if replace:
                runs.replace_into(lo, block, keep)
            elif keep is not None:
                raise AssertionError(f"{live.name}: saved entries asked of a merge by rule")
            else:
                combine.block_merge(dt, runs.block(lo, block))(block, lo)
        runs.finish()


def check_live_base(live: LiveTensor, readers: list[DeltaReader]) -> None:
    """The live tensor, with active patches undone, hashes to every delta's base checksum."""
    below = active_patches(live.key)
    base_hash = BaseHash(live.name)
    for start, chunk in live.chunks():
        if below:
            chunk = np.array(chunk)
            for patch in reversed(below):
                patch.entry(live.key).before_chunk(chunk, start)
        base_hash.update(chunk)
    base_hash.check(((reader.path, reader.record(live.name)) for reader in readers),
                    _NOT_THE_BASE)


def _undo_patches(values: np.ndarray, positions: np.ndarray, key: tuple,
                  patches: list[Patch]) -> np.ndarray:
    """``values`` (live bits at sorted ``positions``) as they were before ``patches``."""
    for patch in reversed(patches):
        patch.entry(key).before(values, positions)
    return values


def active_patches(key: tuple) -> list[Patch]:
    return [patch for ref in _ACTIVE.get(key, ()) if (patch := ref()) is not None]


def _forget(keys: list[tuple], ref: weakref.ref) -> None:
    for key in keys:
        refs = _ACTIVE.get(key, [])
        if ref in refs:
            refs.remove(ref)
        if not refs:
            _ACTIVE.pop(key, None)
