"""Continual composition: add one delta to an already stitched model.

``stitch_add(base, deltas, new_delta, merged)`` writes what
``stitch(base, [*deltas, new_delta])`` would write, bit for bit, while
rewriting only what the new delta changes:

* tensors the new delta does not store are byte-copied from ``merged``, in row
  blocks, without decoding any delta;
* in the tensors it stores, only the positions it covers are recomputed from
  the base and every delta's entries there; all other bytes come from ``merged``.

That is sound only for elementwise rules whose result at a position depends
on nothing but the deltas' entries there -- Localize-and-Stitch and task
arithmetic.  TIES trims by rank within a whole tensor and DARE's draws depend
on a delta's whole record, so those are refused.  The merged model must carry
the recipe :func:`~sparsestitch.ops.stitch.stitch` records (rule, options, weights,
deltas) and it must match the arguments; the result records the extended
recipe, so additions can be chained.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint, CheckpointWriter
from ..checkpoint.guard import Inputs
from ..combine.combiners import RECIPE_KEY, RuleCombiner, rule_combiner
from ..combine.rules import RULES
from ..core.dtypes import dtype as lookup_dtype
from ..core.errors import BaseMismatchError, OptionError, TensorMismatchError
from ..core.progress import bar
from ..delta.format import DeltaReader
from ..engine.budget import MemoryBudget
from ..engine.fits import check_delta_fits, differs, shown
from ..engine.walk import (
    BaseHash,
    RecordRuns,
    RowBlocks,
    Stored,
    added_records,
    added_runs,
    decode_tensor,
    output_shards,
    read_blocks,
    refuse_delta,
)
from . import stitch_engine as engine
from .cards import stitch_card

#: Rules whose merge can be extended one delta at a time: the elementwise ones.
COMPOSABLE_RULES = tuple(name for name, rule in RULES.items() if rule.elementwise)


def stitch_add(base: str | os.PathLike, deltas: Sequence[str | os.PathLike],
               new_delta: str | os.PathLike, merged: str | os.PathLike,
               out: str | os.PathLike | None = None, *, rule: str = "localize-stitch",
               weights: Sequence[float] | None = None, max_memory: int | str | None = None,
               overwrite: bool = False, progress: bool = False, **rule_options) -> Path:
    """Add ``new_delta`` to ``merged`` (= ``stitch(base, deltas, ...)``); return the output.

    ``rule``, ``weights`` (one per delta of ``[*deltas, new_delta]``) and options are
    those of the full merge, as for :func:`~sparsestitch.ops.stitch.stitch`.  The output
    goes to ``out``, or with ``out=None`` replaces ``merged`` (written beside it, then
    renamed over it: a failed run leaves ``merged`` as it was).  ``max_memory`` bounds
    what is held as for ``stitch``: a tensor whose records would not fit is recomputed row
    block by row block, decoding every record once per block.

    >>> stitch_add("base/", ["math.delta"], "code.delta", "merged/")  # doctest: +SKIP
    """
    if rule not in COMPOSABLE_RULES:
        raise OptionError(f"rule {rule!r} cannot add one delta at a time (its result at a position "
                         f"depends on whole tensors); use {' or '.join(COMPOSABLE_RULES)}, or "
                         f"stitch all deltas from scratch with sparsestitch.stitch")
    paths = [*deltas, new_delta]
    combine = rule_combiner(rule, weights, len(paths), **rule_options)
    previous = replace(combine, weights=combine.weights[:-1])
    out = Path(merged if out is None else out)
    in_place = os.path.realpath(out) == os.path.realpath(merged)
    overwrite = overwrite or in_place
    inputs = Inputs()
    base = inputs.add(base, "base")
    for path in paths:
        inputs.add_local(path, "delta")
    if not in_place:  # replacing the merged model with its extension is what is asked for
        merged = inputs.add(merged, "merged model")
    inputs.check_output(out)
    budget = MemoryBudget.of(max_memory)
    with contextlib.ExitStack() as stack:
        base_ckpt = stack.enter_context(Checkpoint(base))
        refuse_delta(base_ckpt)
        readers = [stack.enter_context(DeltaReader(p)) for p in paths]
        merged_ckpt = stack.enter_context(Checkpoint(merged))
        refuse_delta(merged_ckpt, "merged model")
        for reader in readers:
            check_delta_fits(base_ckpt, reader)
        old_added = added_records(readers[:-1])
        _check_merged(merged_ckpt, output_shards(base_ckpt, old_added),
                      previous.recipe(readers[:-1]))
        added = added_records(readers)
        shards = output_shards(base_ckpt, added, {RECIPE_KEY: combine.recipe(readers)})
        card = stitch_card(paths, rule, combine.weights, dict(rule_options))(base_ckpt)
        writer = CheckpointWriter(out, shards, folder=base_ckpt.is_folder,
                                  extra_files=base_ckpt.extra_files, overwrite=overwrite,
                                  extra_texts={"README.md": card} if base_ckpt.is_folder else None,
                                  index=base_ckpt.has_index)
        try:
            total = sum(t.nbytes for shard in shards for t in shard.tensors)
            with bar(total, "stitch-add", progress) as progress_bar:
                for tensor in (t for shard in shards for t in shard.tensors):
                    _write_tensor(tensor.name, base_ckpt, merged_ckpt, readers, old_added, added,
                                  combine, writer, budget)
                    progress_bar.update(tensor.nbytes)
            merged_ckpt.close()  # before ``merged`` may be renamed away
            writer.close()
        except BaseException as exc:
            writer.abort(exc)
            raise
    return out


def _write_tensor(name: str, base: Checkpoint, merged: Checkpoint, readers: list[DeltaReader],
                  old_added: dict, added: dict, combine: RuleCombiner, writer: CheckpointWriter,
                  budget: MemoryBudget) -> None:
    new = readers[-1]
    if name in added and name not in old_added:
        reader, record = added[name]
        for bits in added_runs(reader, record, budget):
            writer.write(name, bits)
        return
    entry = merged.entry(name)
    dt = lookup_dtype(entry.dtype)
    blocks = RowBlocks.of(entry.shape, dt.itemsize, budget.block_bytes)
    copy = partial(merged.read_rows, name)
    record = new.record(name)
    if name in added or record.kind != "sparse":
        if name not in added:
            _check_same_base(name, readers)
        engine.write_patched(writer, name, blocks, copy, np.empty(0, np.int64),
                             np.empty(0, dt.bits))
        return
    stored_count = sum(r.count for reader in readers
                       if (r := reader.record(name)) is not None and r.kind == "sparse")
    if entry.nbytes + combine.bytes_per_position(dt) * stored_count <= budget.tensor_bytes:
        stored, _ = decode_tensor(base, readers, name, blocks)
        positions, bits = combine.combine(name, dt, entry.numel, _at_new(stored))
        engine.write_patched(writer, name, blocks, copy, positions, bits)
        return
    _write_blockwise(name, base, merged, readers, combine, writer, blocks, budget)


def _write_blockwise(name: str, base: Checkpoint, merged: Checkpoint, readers: list[DeltaReader],
                     combine: RuleCombiner, writer: CheckpointWriter, blocks: RowBlocks,
                     budget: MemoryBudget) -> None:
    """A tensor whose records would not fit in the budget: row block by row block, each
    record decoded once alongside the blocks (:class:`~sparsestitch.engine.walk.RecordRuns`)."""
    dt = lookup_dtype(merged.entry(name).dtype)
    records = [reader.record(name) for reader in readers]
    base_hash = BaseHash(name)
    with RecordRuns(base, name, blocks, readers, records, budget) as runs:
        for start, stop, base_block in read_blocks(base, name, blocks, base_hash):
            lo, hi = blocks.elements(start, stop)
            stored = runs.block(lo, base_block)
            positions, bits = combine.combine(name, dt, hi - lo, _at_new(stored, lo))
            out = merged.read_rows(name, start, stop)
            out[positions] = bits
            writer.write(name, out)
        runs.finish()
    base_hash.check(zip([r.path for r in readers], records))


def _at_new(stored: list[Stored | None], first: int = 0) -> list[Stored | None]:
    """Every delta's entries at the positions the new (last) delta stores, shifted so that
    position ``first`` is 0 (for one row block)."""
    covered = stored[-1].position_array()
    there = [None if s is None else _restrict(s, covered) for s in stored]
    if first:
        there = [None if s is None else Stored(s.positions - first, s.finetuned, s.base)
                 for s in there]
    return there


def _restrict(stored: Stored, positions: np.ndarray) -> Stored:
    """The entries of ``stored`` at (a subset of) the sorted ``positions``."""
    own = stored.position_array()
    keep = np.isin(own, positions, assume_unique=True)
    return Stored(own[keep], stored.finetuned[keep], stored.base[keep])


def _check_same_base(name: str, readers: list[DeltaReader]) -> None:
    """All deltas were made from the same base tensor (checked without reading it)."""
    first = readers[0].record(name).base_xxh3
    for reader in readers[1:]:
        if reader.record(name).base_xxh3 != first:
            raise BaseMismatchError(f"the deltas were made from different bases (this one differs "
                                    f"from {readers[0].path.name})", path=reader.path, tensor=name)


def _check_merged(merged: Checkpoint, expected_shards, recipe: str) -> None:
    """``merged`` has the layout and the recipe of stitching the given deltas."""
    found = [sorted(names) for _, names in merged.layout]
    wanted = [sorted(t.name for t in shard.tensors) for shard in expected_shards]
    if found != wanted:
        raise TensorMismatchError("the merged model's tensors are not those of stitching the "
                                  "given base and deltas; pass the deltas it was stitched from",
                                  path=merged.path)
    for shard in expected_shards:
        for tensor in shard.tensors:
            entry = merged.entry(tensor.name)
            if differs(entry, tensor):
                raise TensorMismatchError(f"merged has {shown(entry)}, the base {shown(tensor)}",
                                          path=merged.path, tensor=tensor.name)
    stitched_with = next((meta.get(RECIPE_KEY) for meta in merged.metadata.values()), None)
    if stitched_with is None:
        raise TensorMismatchError("the merged model records no stitch recipe (it was not written "
                                  "by sparsestitch.stitch); stitch all deltas from scratch",
                                  path=merged.path)
    made_with = json.loads(stitched_with).get("rule")
    if made_with not in COMPOSABLE_RULES:
        raise TensorMismatchError(f"the merged model was stitched with the rule {made_with!r}; "
                                  f"only {' and '.join(COMPOSABLE_RULES)} merges can be extended "
                                  "one delta at a time: stitch all deltas from scratch",
                                  path=merged.path)
    if json.loads(stitched_with) != json.loads(recipe):
        raise TensorMismatchError("the merged model was stitched with other deltas, order, "
                                  "weights, rule or options than given; pass the same ones as "
                                  "when it was made (or stitch all deltas from scratch)",
                                  path=merged.path)
