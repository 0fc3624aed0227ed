"""Stitch deltas straight into a model already on a device: no file, no revert, the base bits
never leaving the device.

:func:`stitch_into` is :func:`sparsestitch.stitch` with the model's own tensors as both the
base and the output.  Per tensor, the host reads each record's payload, checks its
checksum, decodes its positions and decompresses its value streams; the device gathers the
base bits at the stored positions, decodes the values against them
(:mod:`sparsestitch.delta.device`), merges by rule
(:func:`~sparsestitch.combine.device_rules.combine_on_device`: every rule) and scatters the
result into the tensor (:func:`.device_merge.merge_on_device`, which ``apply`` uses too).  The model ends bit-identical to stitching the same deltas to a
file and loading it (tests compare the two).

A float CPU tensor merged by an elementwise rule is merged where it lives instead, row block
by row block (:func:`.patch.merge_in_place`, the file stitcher's block merge): no position
arrays, within ``max_memory``.

Unlike :func:`~.patch.apply` nothing is kept for a revert, so device memory holds one
tensor's records at a time.  Every check that can fail on a sound file runs before any
tensor is written (names, shapes, dtypes, base checksums, tensors under an active hot-swap
patch); a record found damaged while decoding raises naming it, and the tensors stitched
before it stay stitched, a CPU tensor merged in place partly so (reload the model; `apply`
reverts instead).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from ..combine.combiners import rule_combiner
from ..combine.staging import Staging
from ..core.errors import OptionError, SparsestitchError
from ..delta.format import DeltaReader
from ..engine.budget import MemoryBudget
from .device_merge import merge_on_device
from .patch import active_patches, can_merge_in_place, check_live_base, merge_in_place
from .tensors import match_records, named_tensors


def stitch_into(model, deltas: str | os.PathLike | Sequence[str | os.PathLike], *,
                rule: str = "localize-stitch", weights: Sequence[float] | None = None,
                verify_base: bool = True, added: str = "error",
                max_memory: int | str | None = None, **rule_options) -> list[str]:
    """Merge ``deltas`` into ``model`` (a ``torch.nn.Module`` or a dict of tensors) in place,
    on the device each tensor lives on; returns the names of the tensors changed.

    Rules, weights, options, ``verify_base`` and ``added`` are those of
    :func:`~sparsestitch.live.apply` and :func:`~sparsestitch.ops.stitch.stitch`, with
    bit-identical results; ``max_memory`` bounds what decoding holds (1 GiB by default).  For a model that must go back to its base, use ``apply``.

    >>> stitch_into(model, ["math.delta", "code.delta"], rule="ties")  # doctest: +SKIP
    """
    paths = [deltas] if isinstance(deltas, (str, os.PathLike)) else list(deltas)
    combiner = rule_combiner(rule, weights, len(paths), **rule_options)
    if added not in ("error", "skip"):
        raise OptionError(f"added must be 'error' or 'skip', not {added!r}")
    budget = MemoryBudget.of(max_memory)
    tensors = named_tensors(model)
    changed = []
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(DeltaReader(p)) for p in paths]
        targets = match_records(tensors, readers, added)
        for live in targets.values():
            if active_patches(live.key):
                raise SparsestitchError("a hot-swap patch is active on this tensor: revert it "
                                        "before stitching into the model", tensor=live.name)
        if verify_base:
            for live in targets.values():
                check_live_base(live, readers)
        staging_by_device: dict[object, Staging] = {}
        for live in targets.values():
            records = [reader.record(live.name) for reader in readers]
            if can_merge_in_place(live, combiner):
                if any(r is not None and r.kind == "sparse" for r in records):
                    merge_in_place(live, readers, records, combiner, budget)
                    changed.append(live.name)
                continue
            if live.device not in staging_by_device:
                staging_by_device[live.device] = Staging(live.device)
            merged = merge_on_device(live, readers, combiner, staging_by_device[live.device])
            if merged is not None:
                live.scatter(*merged)
                changed.append(live.name)
    return changed
