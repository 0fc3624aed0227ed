"""Merge straight from full fine-tunes: what compress would keep of each fine-tune, merged as
stitch would merge those deltas, in one streaming pass that writes no intermediate delta.

The output is bit-identical to ``compress`` then ``stitch`` with the same options (tests
compare them rule by rule).  Selection runs exactly as in compress (the same selectors, the
same pre-passes: Localize-and-Stitch's global threshold is found in a bounded-memory first
pass), and what each fine-tune keeps of a tensor becomes the decoded record a delta would
give (:class:`~sparsestitch.engine.walk.Stored`) without the codecs' round trip where it is exact;
quantized values go through the value codec and back, as a restore would see them.

Float tensors under the elementwise rules are merged row block by row block as their blocks
are read (the base and each fine-tune read once), in reader threads, into an output buffer
of the tensor; only a tensor larger than the budget is merged in the writing thread, block by
block.  The other rules (TIES, DARE), quantized or planned tensors, and ``save_deltas`` work
on each tensor's whole selection, as compress and stitch do.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import xxhash

from ..checkpoint import Checkpoint, CheckpointWriter
from ..checkpoint.gguf_folder import check_output_name
from ..checkpoint.guard import Inputs
from ..checkpoint.safetensors_file import file_kind
from ..combine.combiners import Combiner, rule_combiner
from ..core.dtypes import DType
from ..core.dtypes import dtype as lookup_dtype
from ..core.errors import OptionError, TensorMismatchError
from ..core.native import keep_freed_blocks
from ..delta.format import Record, decode_positions, decode_values
from ..engine.budget import MemoryBudget
from ..engine.fits import check_compatible
from ..engine.readahead import workers_for
from ..engine.walk import RowBlocks, Stored, refuse_delta
from ..localize.keep import as_mask_list, choices, make_selectors
from ..localize.keep_options import KeepOptions
from ..localize.selection import Selection, TensorPlan, TensorScanner, run_pre_passes
from ..localize.selectors import Choice, KeepAll, Selector, TuneBlock
from . import stitch_engine as engine
from .cards import merge_card
from .compress import how_kept
from .delta_outputs import DeltaOutputs
from .restored import RestoredCheckpoint

#: Safetensors metadata key of a merged output: how it was made.
MERGE_KEY = "sparsestitch.merge"
#: Elements per block read from the base and each fine-tune.
CHUNK_ELEMENTS = 1 << 20


def merge(base: str | os.PathLike, finetuned: Sequence[str | os.PathLike],
          out: str | os.PathLike, *, rule: str = "localize-stitch",
          weights: Sequence[float] | None = None, keep: float | None = None,
          scope: str = "fidelity", bits: int | None = None, group: int = 128,
          lossless: bool | None = None, max_error: float | None = None,
          include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None,
          dense: str | Iterable[str] | None = None, masks: Mapping | Sequence[Mapping] | None = None,
          max_memory: int | str | None = None, save_deltas: str | os.PathLike | None = None,
          overwrite: bool = False, progress: bool = False, threads: int | None = None,
          chunk_elements: int = CHUNK_ELEMENTS, protect: Sequence[str | os.PathLike] = (),
          allow_crimes: bool = False, **rule_options) -> Path:
    """Merge full fine-tunes of ``base`` into ``out`` with a merge rule, in one pass.

    A fine-tune may also be given as a delta of ``base`` (its ``.delta`` file): it is read as
    the fine-tune it restores, so ``keep`` localizes stored deltas again before the rule
    (``stitch(..., keep=F)`` does this).

    What is kept of each fine-tune takes compress's options -- ``keep`` is compress's
    ``density`` (renamed here: TIES has a ``density`` of its own), then ``scope``, ``bits``,
    ``group``, ``lossless``, ``max_error``, ``include``, ``exclude``, ``dense``, ``masks``.
    Without any of them, Localize-and-Stitch keeps what compress keeps by default and the
    other rules take every change (``lossless``: the full task vectors, as mergekit merges).
    The rule, ``weights`` and rule options (``scale``, ``density``, ``drop``, ``seed``) are
    stitch's.  The output is bit-identical to :func:`~sparsestitch.compress` followed by
    :func:`~sparsestitch.stitch` with the same options.

    ``max_memory`` (default 1 GiB) bounds what is held at once as in stitch: row blocks, and
    read-ahead of tensors within half of it.  TIES and DARE, quantized values, ``max_error``
    and ``save_deltas`` hold each tensor's whole selection from every fine-tune (as compress
    does).  ``save_deltas`` (a folder) also keeps the deltas made on the way, one per
    fine-tune named after it (``<name>.delta``): the records compress writes, in the output's
    tensor order.  The output's metadata (``sparsestitch.merge``) records the rule, options,
    weights and sources; a folder output gets a model card.  ``protect`` names more files the
    caller read (a merge config): no output may be written over or inside them.
    ``allow_crimes`` goes on when the base's and a fine-tune's ``config.json`` name different
    architectures (refused by default, as mergekit's ``--allow-crimes``).

    >>> merge("base/", ["math/", "code/"], "merged/", rule="task-arithmetic")  # doctest: +SKIP
    """
    tune_paths = [Path(p) for p in ([finetuned] if isinstance(finetuned, (str, os.PathLike))
                                    else finetuned)]
    if not tune_paths:
        raise OptionError("merge needs at least one fine-tuned checkpoint")
    combiner = rule_combiner(rule, weights, len(tune_paths), **rule_options)
    mask_sets = as_mask_list(masks, len(tune_paths))
    kept = KeepOptions.of(keep=keep, scope=scope, bits=bits, group=group, lossless=lossless,
                          max_error=max_error, include=include, exclude=exclude,
                          dense=dense).for_rule(rule, mask_sets)
    density, quantize, planner = choices(kept, mask_sets, density_option="keep")
    out = Path(out)
    inputs = Inputs()
    base = inputs.add(base, "base")
    tune_paths = inputs.add_all(tune_paths, "fine-tune")
    for path in protect or ():
        inputs.add_local(path, "merge config")
    inputs.check_output(out)
    check_output_name(out)
    delta_paths = saved_delta_paths(save_deltas, [t.spec for t in tune_paths])
    if save_deltas is not None:
        inputs.check_output(save_deltas, "--save-deltas folder", claim=False)
    for path in delta_paths:
        inputs.check_output(path, "saved delta")
    if delta_paths:
        Path(save_deltas).mkdir(parents=True, exist_ok=True)
    budget = MemoryBudget.of(max_memory)
    keep_freed_blocks()  # blocks' arrays reuse freed memory: see its docstring
    with Checkpoint(base) as base_ckpt, contextlib.ExitStack() as stack:
        refuse_delta(base_ckpt)
        tunes = [stack.enter_context(_open_fine_tune(base_ckpt, p, max_memory))
                 for p in tune_paths]
        for tune in tunes:
            check_compatible(base_ckpt, tune, allow_crimes)
        added = added_tensors(base_ckpt, tunes)
        plan = TensorPlan.of(base_ckpt, kept.include, kept.exclude, kept.dense)
        selectors = make_selectors(plan, density, kept.scope, mask_sets, len(tunes), exact=True)
        scanner = TensorScanner(base_ckpt, tunes, plan, chunk_elements, quantize, planner)
        workers = workers_for(threads, engine.READ_WORKERS)
        run_pre_passes(scanner, selectors, workers, progress)
        outputs = DeltaOutputs(delta_paths, overwrite, base_ckpt, tunes, plan) \
            if delta_paths else None
        source = FineTuneSource(scanner, selectors, combiner, budget, added, outputs)
        # The options as checked (numpy scalars become the JSON numbers they equal).
        options = {key: combiner.options[key] for key in rule_options}
        recipe = {"rule": rule, "options": options, "weights": list(combiner.weights),
                  "keep": {"density": density, "scope": scope, "quantize": quantize,
                           "max_error": None if max_error is None else float(max_error),
                           **how_kept(quantize, planner)},
                  "base": base_ckpt.display_name,
                  "finetuned": [t.display_name for t in tunes]}
        try:
            engine.write_model(
                base_ckpt, out, source, added, overwrite=overwrite, progress=progress,
                budget=budget, description="merge",
                workers=0 if any(s.ordered for s in selectors) else workers,
                metadata={MERGE_KEY: json.dumps(recipe, sort_keys=True, separators=(",", ":"))},
                card=merge_card([t.display_name for t in tunes], rule, combiner.weights,
                                rule_options),
                before_publishing=None if outputs is None else
                lambda: _close_deltas(outputs, scanner, selectors, planner))
        except BaseException as exc:
            if outputs is not None:
                outputs.abort(exc)
            raise
    return out


def saved_delta_paths(folder: str | os.PathLike | None, tunes: Sequence[Path]) -> list[Path]:
    """``<folder>/<fine-tune name>.delta`` per fine-tune (names must differ)."""
    if folder is None:
        return []
    folder = Path(folder)
    names = [Path(str(t).rstrip("/")).name.removesuffix(".safetensors") for t in tunes]
    if len(set(names)) != len(names):
        raise OptionError(f"save_deltas names each delta after its fine-tune, and these share a "
                         f"name: {sorted(names)}; give the fine-tunes distinct names")
    return [folder / f"{name}.delta" for name in names]


def _open_fine_tune(base: Checkpoint, spec, max_memory):
    """A fine-tune to merge: a checkpoint, or a delta read as the fine-tune it restores
    (:class:`~sparsestitch.ops.restored.RestoredCheckpoint`: localized again by ``keep``)."""
    if not spec.is_hub and file_kind(spec.path) == "delta":
        return RestoredCheckpoint(base, spec.path, max_memory)
    tune = Checkpoint(spec)
    try:
        refuse_delta(tune, "fine-tune")
    except BaseException:
        tune.close()
        raise
    return tune


def added_tensors(base: Checkpoint, tunes: Sequence[Checkpoint]
                  ) -> dict[str, tuple[Checkpoint, object]]:
    """Tensors the fine-tunes have and the base lacks, by name, with the fine-tune holding
    each (stitch copies such a tensor when every delta adding it agrees; so does merge)."""
    found: dict[str, tuple[Checkpoint, object, str]] = {}
    for tune in tunes:
        for name in tune.names:
            if name in base:
                continue
            entry = tune.entry(name)
            digest = xxhash.xxh3_64_hexdigest(memoryview(tune.read(name).reshape(-1).view(np.uint8)))
            if name in found and (found[name][1].dtype, found[name][1].shape, found[name][2]) != \
                    (entry.dtype, entry.shape, digest):
                raise TensorMismatchError(
                    f"two fine-tunes add different tensors under this name ({found[name][0].path.name} "
                    f"and {tune.path.name}); merge them without it or rename one",
                    path=tune.path, tensor=name)
            found.setdefault(name, (tune, entry, digest))
    return {name: (tune, entry) for name, (tune, entry, _) in found.items()}


def _close_deltas(outputs: DeltaOutputs, scanner: TensorScanner, selectors: Sequence[Selector],
                  planner) -> None:
    outputs.add_added(scanner)
    outputs.close(outputs.metas(selectors, warn=planner is not None and planner.warns))


class FineTuneSource:
    """Makes each output tensor of a merge from the fine-tunes (the stitch engine's
    :class:`~sparsestitch.ops.stitch_engine.TensorSource`)."""

    def __init__(self, scanner: TensorScanner, selectors: Sequence[Selector], combiner: Combiner,
                 budget: MemoryBudget, added: dict, outputs: DeltaOutputs | None):
        self.scanner, self.selectors, self.combiner = scanner, selectors, combiner
        self.base, self.tunes = scanner.base, scanner.tunes
        self.block_bytes, self.tensor_bytes = budget.block_bytes, budget.tensor_bytes
        self.added, self.outputs = added, outputs

    def estimate(self, name: str) -> int:
        """Bytes held between preparing tensor ``name`` and writing it."""
        entry = (self.added[name][1] if name in self.added else self.base.entry(name))
        if name in self.added or self._blockwise(name):
            return entry.nbytes
        return min(whole_bytes(self.scanner, self.combiner, name), self.tensor_bytes)


    def _blockwise(self, name: str) -> bool:
        """Whether tensor ``name`` is merged as its blocks are read (see module doc)."""
        dt = lookup_dtype(self.base.entry(name).dtype)
        plan = self.scanner.plan
        lossy = name in plan.localized and (self.scanner.quantize is not None
                                            or self.scanner.planner is not None)
        return self.outputs is None and self.combiner.merges_blocks(dt) and not lossy

    def prepare(self, name: str) -> engine.Finish:
        if name in self.added:
            tune = self.added[name][0]
            bits = tune.read(name).reshape(-1)
            return lambda writer: writer.write(name, bits)
        entry = self.base.entry(name)
        if self._blockwise(name):
            if entry.nbytes > self.tensor_bytes:  # too large to hold: merge while writing
                return lambda writer: self._merge_blocks(name, writer.write)
            merged: list[np.ndarray] = []  # the blocks, written in order (no joined copy)
            self._merge_blocks(name, lambda _, block: merged.append(block))

            def write_blocks(writer: CheckpointWriter) -> None:
                while merged:
                    writer.write(name, merged.pop(0))
            return write_blocks
        return self._prepare_whole(name)

    def _merge_blocks(self, name: str, emit) -> None:
        """Select and merge tensor ``name`` block by block, handing each merged block to
        ``emit(name, bits)`` in order."""
        dt = lookup_dtype(self.base.entry(name).dtype)
        count = len(self.tunes)
        if keeps_every_change(self.scanner, self.selectors, name, dt):
            merge_changed_blocks(self.scanner, self.combiner, name, dt, emit)
            return
        stored: list[Stored | None] = []
        for block, choice in self.scanner.choices(name, self.selectors):
            stored.append(stored_of_choice(block, choice))
            if len(stored) == count:
                # into the base block itself (read_blocks' fresh array), unless a dense choice
                # holds it as its base bits
                shared = any(s is not None and s.base is block.base for s in stored)
                merged = block.base.copy() if shared else block.base
                self.combiner.block_merge(dt, stored)(merged, block.offset)
                emit(name, merged)
                stored = []

    def _prepare_whole(self, name: str) -> engine.Finish:
        """Merge tensor ``name`` from every fine-tune's whole selection (and encode the
        records to save)."""
        scanner, combiner = self.scanner, self.combiner
        entry = self.base.entry(name)
        dt = lookup_dtype(entry.dtype)
        blocks = RowBlocks.of(entry.shape, dt.itemsize, self.block_bytes)
        if self._dense(name, dt):
            merged = combiner.combine_changed(dt, *whole_tensors(scanner, name, entry.numel, dt),
                                              name=name)

            def finish_dense(writer: CheckpointWriter) -> None:
                for start, stop in blocks.bounds:
                    lo, hi = blocks.elements(start, stop)
                    writer.write(name, merged[lo:hi])
            return finish_dense
        base_xxh3, selections = scanner.select(name, self.selectors)
        exact = name not in scanner.plan.localized or (scanner.quantize is None
                                                       and scanner.planner is None)
        encoded = None
        if self.outputs is not None or not exact:
            encoded = [scanner.encode(name, base_xxh3, s, i) for i, s in enumerate(selections)]
        stored = [stored_of_selection(s) if exact else stored_of_record(*encoded[i], s, dt)
                  for i, s in enumerate(selections)]
        del selections
        if combiner.merges_blocks(dt):
            merge = combiner.block_merge(dt, stored)
            update = None
        else:
            merge, update = None, combiner.combine(name, dt, entry.numel, stored)

        def finish(writer: CheckpointWriter) -> None:
            if encoded is not None and self.outputs is not None:
                for i, (record, payload) in enumerate(encoded):
                    self.outputs.add(i, record, payload)
            if merge is None:
                engine.write_patched(writer, name, blocks,
                                     lambda start, stop: self.base.read_rows(name, start, stop),
                                     *update)
                return
            for start, stop in blocks.bounds:
                block = self.base.read_rows(name, start, stop)
                merge(block, blocks.elements(start, stop)[0])
                writer.write(name, block)
        return finish

    def _dense(self, name: str, dt) -> bool:
        """Whether tensor ``name`` is merged from whole task vectors, without positions (no
        deltas saved; a rule with a dense form, such as TIES in mergekit's convention)."""
        return (self.outputs is None and self.combiner.has_dense_form(dt)
                and keeps_every_change(self.scanner, self.selectors, name, dt))


def stored_of_choice(block: TuneBlock, choice: Choice) -> Stored | None:
    """What a delta of this choice would decode to inside ``block`` (None: nothing kept)."""
    if choice.kept is None:  # every element of the block
        return Stored(None, block.finetuned, block.base, block.offset)
    if choice.kept.size == 0:
        return None
    return Stored(choice.kept + block.offset, block.finetuned[choice.kept],
                  block.base[choice.kept])


def stored_of_selection(selection: Selection) -> Stored | None:
    """What the record of an exact ``selection`` decodes to (None: nothing kept)."""
    if selection.finetuned.size == 0:
        return None
    return Stored(selection.positions, selection.finetuned, selection.base)


def stored_of_record(record: Record, payload: bytes, selection: Selection, dt: DType
                     ) -> Stored | None:
    """A lossy record decoded in memory (checked as a reader checks it), its base bits taken
    from ``selection`` (which holds every position the record keeps)."""
    if record.kind != "sparse":
        return None
    if record.positions["codec"] == "all":
        positions, base_kept = None, selection.base
    else:
        positions = decode_positions(record, payload)
        if selection.positions is None:
            base_kept = selection.base[positions]
        else:
            base_kept = selection.base[np.searchsorted(selection.positions, positions)]
    return Stored(positions, decode_values(record, payload, base_kept), base_kept)


def whole_tensors(scanner: TensorScanner, name: str, numel: int, dt
                  ) -> tuple[np.ndarray, list[np.ndarray]]:
    """The base's and every fine-tune's bits of the whole tensor ``name``."""
    base = np.empty(numel, dt.bits)
    tunes = [np.empty(numel, dt.bits) for _ in scanner.tunes]
    for block in scanner.tune_blocks(name):
        end = block.offset + block.finetuned.size
        if block.tune == 0:
            base[block.offset:end] = block.base
        tunes[block.tune][block.offset:end] = block.finetuned
    return base, tunes


def whole_bytes(scanner: TensorScanner, combiner: Combiner, name: str) -> int:
    """Bytes of every fine-tune's selection of the whole tensor ``name``, at worst."""
    entry = scanner.base.entry(name)
    dt = lookup_dtype(entry.dtype)
    per_position = 8 + 2 * dt.itemsize + combiner.bytes_per_position(dt)
    return entry.nbytes + len(scanner.tunes) * entry.numel * per_position


def keeps_every_change(scanner: TensorScanner, selectors: Sequence[Selector], name: str,
                       dt) -> bool:
    """Whether every fine-tune keeps every changed element of tensor ``name``, exactly."""
    plan = scanner.plan
    return all(isinstance(s, KeepAll) for s in selectors) and (
        name in plan.localized or plan.stored_exactly(name, dt))


def merge_changed_blocks(scanner: TensorScanner, combiner: Combiner, name: str, dt,
                         emit) -> None:
    """Merge tensor ``name`` block by block from the fine-tunes' bits, every change kept:
    no positions at all (:meth:`~.stitch.combine.RuleCombiner.merge_changed`)."""
    tunes: list[np.ndarray] = []
    for block in scanner.tune_blocks(name):
        tunes.append(block.finetuned)
        if len(tunes) == len(scanner.tunes):
            merged = block.base  # read_blocks' fresh array: merged in place
            combiner.merge_changed(dt, merged, block.offset, tunes)
            emit(name, merged)
            tunes = []
