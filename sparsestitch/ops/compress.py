"""Compress fine-tuned checkpoints into sparse delta files against their base.

A small driver over the walk: base and fine-tune row blocks
(:mod:`sparsestitch.engine.walk`) -> a selector per fine-tune choosing what to keep
(:mod:`sparsestitch.localize.selectors`, run tensor by tensor by
:mod:`sparsestitch.localize.selection`) -> :func:`~sparsestitch.delta.format.encode_record` -> one
:class:`~sparsestitch.delta.format.DeltaWriter` per fine-tune.  Every pass walks
tensors in name order and each tensor in row blocks of at most ``chunk_elements``
elements, reading each base block once for all fine-tunes, so memory stays near one
block per input plus the kept values of the tensors being encoded.

How many passes depends on the selector: given masks and density 1.0 need one; exact
top-k two counting passes first; the bracketed global top-k a 1/16 sample first, then
one pass whose undecided candidates are parked in a spool until the threshold is known.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import Checkpoint
from ..checkpoint.guard import Inputs
from ..core.dtypes import dtype as lookup_dtype
from ..core.errors import OptionError
from ..core.native import keep_freed_blocks
from ..core.options import Range, number
from ..core.progress import bar
from ..core.sizes import format_bytes
from ..engine.budget import MemoryBudget
from ..engine.fits import check_compatible
from ..engine.readahead import DEFAULT_WORKERS, in_order, workers_for
from ..engine.walk import refuse_delta
from ..localize.activations import DEFAULT_TOKENS, column_weights, text_activation_scales
from ..localize.budget import tensor_options
from ..localize.keep import as_mask_list, choices, make_selectors
from ..localize.keep_options import KeepOptions
from ..localize.lowrank import LowRankPlanner, lowrank_records
from ..localize.planned import planned_records, tensor_stats
from ..localize.selection import SpooledSelection, TensorPlan, TensorScanner, run_pre_passes
from ..localize.selectors import Selector
from ..localize.streamed_exact import held_bytes as streamed_exact_bytes
from ..localize.streamed_exact import streamed_exact_records
from ..localize.targets import SIZE_ATTEMPTS, SizePlanner
from .delta_outputs import DeltaOutputs, Written

#: Elements per block and checkpoint read at a time.  Small blocks keep the per-block
#: passes in cache: compressing the 2.27 GB benchmark model took 3.9 s with 1 << 20 against
#: 5.0 s with 1 << 23 (two threads).
CHUNK_ELEMENTS = 1 << 20
#: Threads scanning and encoding tensors ahead of the writer (0: the caller's thread).
WORKERS = min(2, DEFAULT_WORKERS)

log = logging.getLogger("sparsestitch")


@dataclass(frozen=True)
class DeltaSummary:
    """What one compress run wrote for one fine-tune."""

    path: Path
    nbytes: int
    kept: int             # kept positions over all tensors
    candidates: int       # elements of the included float tensors
    stored_tensors: int
    seconds: float
    fidelity: dict = field(default_factory=dict)       # the header's fidelity summary
    warnings: list[str] = field(default_factory=list)  # also logged (stderr by default)

    @property
    def density(self) -> float:
        return self.kept / self.candidates if self.candidates else 0.0


def compress(base: str | os.PathLike, finetuned: str | os.PathLike | Sequence[str | os.PathLike],
             out: str | os.PathLike | Sequence[str | os.PathLike], *, density: float | None = None,
             scope: str = "fidelity", include: str | Iterable[str] | None = None,
             exclude: str | Iterable[str] | None = None, dense: str | Iterable[str] | None = None,
             masks: Mapping | Sequence[Mapping] | None = None, bits: int | None = None,
             group: int = 128, lossless: bool = False, max_error: float | None = None,
             max_size: int | str | None = None, overwrite: bool = False,
             progress: bool = False, chunk_elements: int = CHUNK_ELEMENTS,
             threads: int | None = None, max_memory: int | str | None = None,
             allow_crimes: bool = False, low_rank: bool = False,
             calibration: str | os.PathLike | Mapping | None = None,
             calibration_tokens: int = DEFAULT_TOKENS) -> list[DeltaSummary]:
    """Write one delta file per fine-tuned checkpoint.

    Parameters
    ----------
    base, finetuned:
        ``.safetensors`` files or Hugging Face folders; ``finetuned`` may be a list
        (the base is then read once per pass for all of them).
    out:
        One output path per fine-tune.
    density:
        Fraction of the included float elements to keep (exactly ``k = round(density * N)``).
        With no option at all, the default is ``max_error=DEFAULT_MAX_ERROR`` (0.5); with
        ``bits`` alone, ``DEFAULT_DENSITY`` (0.01).
    scope:
        ``"fidelity"`` (the default) ranks |tau| / ||tau_t|| over all included tensors: each
        element's share of its own tensor's change, which for the budget minimizes the sum
        over tensors of the relative squared error, so no tensor's update is lost to another
        with larger |tau|; ``"global"`` ranks |tau| itself (the paper's rule);
        ``"per-tensor"`` keeps ``density`` of each tensor.
    include, exclude:
        Shell patterns over tensor names choosing which float tensors are localized;
        excluded tensors are left at the base value (not stored).
    dense:
        Patterns of tensors stored exactly (every changed element), e.g. a new head.
    masks:
        Instead of top-k, a mapping ``{tensor name: bool array}`` (or one per fine-tune)
        of positions to keep, e.g. from :func:`sparsestitch.localize.trained.learn_masks`;
        tensors not in it are left at the base value.
    bits, group:
        Store the localized tensors' task vectors in ``bits`` (1, 2, 3, 4 or 8) bits per
        kept value, with least-squares scales per ``group`` consecutive kept values (0: one
        per tensor) -- lossy, opt-in; every record reports its error.  ``density=1.0,
        bits=1, group=0`` is a BitDelta-like delta (sign times one scale per matrix).
    lossless:
        Every changed element, exactly (``density=1.0``): the fine-tune restored bit for bit,
        in as few bytes as the codecs allow.
    max_error, max_size, low_rank:
        Targets instead of ``density`` and ``bits``, which the compressor then picks per
        tensor: every localized tensor's relative error ||tau - tau_hat|| / ||tau|| at most
        ``max_error`` (never exceeded: each record's real error is checked), or the best
        fidelity (least sum of relative squared errors) whose file fits ``max_size`` bytes
        (``"50MB"`` style accepted).  ``group`` sets the quantized scales' group.  With
        ``low_rank``, a matrix's change may also be stored as rank-one products of
        quantized vectors, each tensor taking whichever kind costs less: ``max_size``
        plans the kinds over the model, ``max_error`` (0.5 by default) keeps the smaller
        record within it (:mod:`sparsestitch.localize.lowrank`; lossy, format 4).
    threads:
        Threads reading and encoding (default: 2 of the usable cores; 1: the caller's alone).
    max_memory:
        What compress may hold at once (``"512MiB"`` style accepted; default 1 GiB, at least
        32 MiB; see :class:`~sparsestitch.engine.budget.MemoryBudget`): tensors are prepared ahead
        only while their worst case (every element kept, by every fine-tune) fits, and a
        tensor whose fine-tunes together would not fit in half of it is selected and encoded
        one fine-tune at a time (the base read again for each).  The deltas are the same
        bytes whatever the bound.  Targets and ``density=1.0`` with ``bits`` encode quantized
        records as the blocks are read (a bitmap of the tensor, two runs of a million
        values; an error target keeps a tensor's blocks between passes where
        :func:`holds_blocks`).  Exact records hold a tensor's selection where it fits
        (:func:`exact_bytes`), else stream through temporary files (:func:`streams_exactly`;
        the same bytes whatever the bound only while every tensor fits); the global top-k
        selects its exact tensors whole (:func:`_exact_budget`); a target passes over
        exact options the budget cannot hold.
    allow_crimes:
        Go on when the base's and a fine-tune's ``config.json`` name different
        architectures (refused by default, as mergekit's ``--allow-crimes``).
    calibration, calibration_tokens:
        The activation-aware error (:mod:`sparsestitch.localize.activations`): a text file
        whose first ``calibration_tokens`` tokens run through the base, or precomputed scales
        ``{weight name: mean square of each input feature}``; each matrix's change is ranked
        and measured with every column weighted by its root mean square activation.

    Non-float tensors are never localized: those that differ from the base are stored
    exactly.  Tensors the fine-tune has and the base lacks are stored whole ("added").

    Examples
    --------
    >>> compress("base.safetensors", ["math.safetensors", "code.safetensors"],
    ...          ["math.delta", "code.delta"], density=0.01)  # doctest: +SKIP
    """
    started = time.perf_counter()
    base, finetuned_paths, out_paths = _resolved(base, finetuned, out, calibration)
    keep = KeepOptions.of(density=density, scope=scope, bits=bits, group=group, dense=dense,
                          lossless=lossless, max_error=max_error, max_size=max_size,
                          low_rank=low_rank or None, include=include, exclude=exclude)
    mask_sets = as_mask_list(masks, len(finetuned_paths))
    density, quantize, planner = choices(keep, mask_sets)
    workers = workers_for(threads, WORKERS)
    with Checkpoint(base) as base_ckpt:
        refuse_delta(base_ckpt)
        tunes = [Checkpoint(p) for p in finetuned_paths]
        try:
            for tune in tunes:
                refuse_delta(tune, "fine-tune")
                check_compatible(base_ckpt, tune, allow_crimes)
            plan = TensorPlan.of(base_ckpt, keep.include, keep.exclude, keep.dense)
            calibrated = _calibration(calibration, calibration_tokens, base.path, base_ckpt, plan,
                                      density, mask_sets, quantize, planner)
            selectors = make_selectors(plan, density, keep.scope, mask_sets, len(tunes))
            job = CompressJob(base_ckpt, tunes, plan, chunk_elements, progress, workers, quantize,
                              planner, _exact_budget(max_memory, base_ckpt, plan, selectors,
                                                     quantize, planner).total, *calibrated)
            results = job.run(selectors, out_paths, overwrite,
                              fallback=lambda: make_selectors(plan, density, keep.scope, None,
                                                               len(tunes), exact=True))
        finally:
            for tune in tunes:
                tune.close()
    return _summaries(out_paths, results, plan.candidates, time.perf_counter() - started)


def _resolved(base, finetuned, out, calibration=None) -> tuple:
    """``(base, fine-tunes, outputs)``: the inputs resolved, the outputs checked against them
    (one per fine-tune, none of them an input, a calibration text included)."""
    finetuned_paths, out_paths = _as_path_list(finetuned), _as_path_list(out)
    if len(out_paths) != len(finetuned_paths):
        raise OptionError(f"{len(finetuned_paths)} fine-tuned checkpoints but {len(out_paths)} outputs")
    inputs = Inputs()
    base, finetuned_paths = inputs.add(base, "base"), inputs.add_all(finetuned_paths, "fine-tune")
    if calibration is not None and not isinstance(calibration, Mapping):
        inputs.add_local(calibration, "calibration text")
    for path in out_paths:
        inputs.check_output(path, "output delta")
    return base, finetuned_paths, out_paths


def _calibration(calibration, tokens: int, base_path: Path, base: Checkpoint, plan: TensorPlan,
                 density: float, mask_sets, quantize, planner) -> tuple[dict, dict]:
    """``(column weights per tensor, header fields)`` of the activation-aware error (none
    without ``calibration``): the options it goes with checked first, then the scales read
    from a text file run through the base, or taken as given."""
    if calibration is None:
        return {}, {}
    refused = ("masks" if mask_sets else
               "bits at a density below 1" if quantize is not None and planner is None else
               "lossless" if planner is None and density == 1.0 else None)
    if refused:
        raise OptionError(f"calibration (the activation-aware error) does not go with "
                          f"{refused}: use it with the targets (the default, max_error, "
                          "max_size, low_rank) or an exact top-k (density)")
    given = isinstance(calibration, Mapping)
    if given:
        scales, source, used = calibration, "scales", None
    else:
        tokens = number("calibration_tokens", tokens, Range(2, whole=True), "tokens")
        scales, used = text_activation_scales(base_path, calibration, tokens=tokens)
        source = Path(calibration).name
    shapes = {name: base.entry(name).shape for name in base.names}
    # scales measured here may name a module tied to another's weight (a tied lm_head)
    weights = column_weights(scales, shapes, plan.localized, strict=given)
    if not weights:
        raise OptionError("calibration: no localized matrix has scales (the names must be the "
                          "base's weight names, e.g. model.layers.0.mlp.up_proj.weight)")
    return weights, {"calibration": {"error": "activation-weighted", "source": source,
                                     "tokens": used, "tensors": len(weights)}}


def _summaries(out_paths: list[Path], results: list[Written], candidates: int,
               seconds: float) -> list[DeltaSummary]:
    """What compress returns, its warnings logged."""
    summaries = [DeltaSummary(path, r.nbytes, r.kept, candidates, r.stored_tensors,
                              seconds, r.summary, r.warnings)
                 for path, r in zip(out_paths, results)]
    for summary in summaries:
        for warning in summary.warnings:
            log.warning("%s: %s", summary.path, warning)
    return summaries


def how_kept(quantize: dict | None, planner) -> dict:
    """Header fields saying how values were chosen beyond ``method`` and ``density``: a
    target (``max_error``, ``max_size``) decides what is kept (the density asked is then
    none: the delta's own ``kept`` says what it reached); ``quantize`` is the bits and group
    of quantized values chosen by the user."""
    target = getattr(planner, "target", None)
    if target is not None:
        return {"target": target, "density": None}
    bits = getattr(planner, "bits", None)
    if bits is not None:
        return {"quantize": {"bits": bits, "group": planner.group}}
    return {"quantize": dict(quantize)} if quantize else {}


class CompressJob:
    """One compress run: the passes over the tensors and one writer per fine-tune."""

    def __init__(self, base: Checkpoint, tunes: list[Checkpoint], plan: TensorPlan,
                 chunk_elements: int, progress: bool, workers: int = WORKERS,
                 quantize: dict | None = None, planner=None, max_memory: int = 0,
                 column_weights: Mapping | None = None, calibrated: Mapping | None = None):
        self.scanner = TensorScanner(base, tunes, plan, chunk_elements, quantize, planner,
                                     column_weights)
        self.base, self.tunes, self.plan, self.progress = base, tunes, plan, progress
        self.workers, self.planner = workers, planner
        self.max_memory = max_memory
        self.how = {**how_kept(quantize, planner), **(calibrated or {})}  # header fields

    def run(self, selectors: list[Selector], out_paths: list[Path], overwrite: bool,
            fallback: Callable[[], list[Selector]]) -> list[Written]:
        keep_freed_blocks()  # blocks' arrays reuse freed memory: see its docstring
        self.spool_beside, self.selectors = out_paths[0], selectors
        sized = isinstance(self.planner, (SizePlanner, LowRankPlanner))
        if isinstance(self.planner, LowRankPlanner):
            self.planner.profile(self.scanner, len(self.base.names), self.max_memory - MIN_MEMORY)
        elif sized:
            self._profile(selectors)
            self.planner.start(len(self.base.names))
        for attempt in range(SIZE_ATTEMPTS if sized else 1):
            outputs = DeltaOutputs(out_paths, overwrite, self.base, self.tunes, self.plan)
            try:
                selectors = self._write_records(selectors, outputs, fallback)
                metas = outputs.metas(selectors, warn=self.planner is not None and self.planner.warns)
                metas = [{**meta, **self.how} for meta in metas]
                if sized and self.planner.refit(outputs.projected_sizes(metas),
                                                outputs.payload_sizes(),
                                                last=attempt + 1 == SIZE_ATTEMPTS):
                    outputs.abort()
                    continue
                return outputs.close(metas)
            except BaseException as exc:
                outputs.abort(exc)
                raise
        raise AssertionError("unreachable")

    def _write_records(self, selectors, outputs: DeltaOutputs, fallback) -> list[Selector]:
        """Every record of every delta, handed to its writer; returns the selectors used."""
        run_pre_passes(self.scanner, selectors, self.workers, self.progress)
        if not self._main_pass(selectors, outputs):
            selectors = self.selectors = fallback()  # the bracket missed: redo it exactly
            run_pre_passes(self.scanner, selectors, self.workers, self.progress)
            self._main_pass(selectors, outputs)
        outputs.add_added(self.scanner)
        return selectors

    def _profile(self, selectors: list[Selector]) -> None:
        """Hand the size planner every localized tensor's options, estimated from its
        statistics (a pass over the model, holding histograms and samples only)."""
        group = self.planner.group
        profiled = in_order(self.plan.localized,
                            lambda name: [tensor_options(s, group)
                                          for s in tensor_stats(self.scanner, name)],
                            workers=self.workers)
        with closing(profiled):
            for name, profiles in profiled:
                for i, profile in enumerate(profiles):
                    self.planner.add_profile(i, profile)

    def _main_pass(self, selectors: list[Selector], outputs: DeltaOutputs) -> bool:
        """Select and encode every tensor; False if a selector's candidates could not be
        resolved (nothing was written then)."""
        if selectors[0].undecided:
            spooled = SpooledSelection(self.scanner, selectors, outputs.paths, self.workers,
                                       self.progress)
            try:
                if not spooled.collect():
                    return False
                write_all(self.base, self.progress, spooled.encoded(), outputs)
            finally:
                spooled.close()
            return True
        ordered = any(s.ordered for s in selectors)
        encoded = in_order(self.base.names, lambda name: self._records(name, selectors),
                           self._held_bytes, budget=self.max_memory,
                           workers=0 if ordered else self.workers)
        with closing(encoded):
            write_all(self.base, self.progress, encoded, outputs)
        return True

    def _records(self, name: str, selectors: list[Selector]):
        """Every fine-tune's record of tensor ``name``: by the planner (a target) for the
        localized float tensors it decides, else by the selectors."""
        plan, dt = self.plan, lookup_dtype(self.base.entry(name).dtype)
        def planned() -> list:
            return planned_records(self.scanner, name, hold_blocks=self._holds_blocks(name),
                                   exact_limit=exact_limit(self.max_memory, dt.itemsize),
                                   spool=self.spool_beside, spool_above=self.max_memory // 4)
        if isinstance(self.planner, LowRankPlanner) and self.planner.takes(name):
            return lowrank_records(self.scanner, name, self.planner, planned)
        if self.planner is not None and name in plan.localized and not plan.stored_exactly(name, dt):
            return planned()
        if streams_exactly(self.scanner, name, selectors, self.max_memory):
            return streamed_exact_records(self.scanner, name, self.spool_beside, self.workers)
        return self.scanner.select_and_encode(name, selectors,
                                              one_at_a_time=self._one_at_a_time(name))

    def _holds_blocks(self, name: str) -> bool:
        return holds_blocks(self.base.entry(name), len(self.tunes), self.max_memory, self.workers)

    def _one_at_a_time(self, name: str) -> bool:
        """Whether tensor ``name``'s fine-tunes are selected one after another (see
        ``max_memory`` in :func:`compress`)."""
        return len(self.tunes) > 1 and \
            len(self.tunes) * selected_bytes(self.base.entry(name)) > self.max_memory // 2

    def _held_bytes(self, name: str) -> int:
        """What preparing tensor ``name`` holds at worst (for the read-ahead budget)."""
        if isinstance(self.planner, LowRankPlanner) and self.planner.takes(name):
            return self.planner.working_bytes(name)
        if streams_exactly(self.scanner, name, self.selectors, self.max_memory):
            return streamed_exact_bytes(lookup_dtype(self.base.entry(name).dtype).itemsize,
                                        self.workers)
        held = 1 if self._one_at_a_time(name) else len(self.tunes)
        return held * selected_bytes(self.base.entry(name))


def write_all(base: Checkpoint, progress: bool, encoded, outputs: DeltaOutputs) -> None:
    """Hand every tensor's records (``(name, records)`` in order) to the delta writers."""
    total_bytes = sum(base.entry(n).nbytes for n in base.names)
    with bar(total_bytes, "encode", progress) as shown:
        for name, records in encoded:
            for i, (record, payload) in enumerate(records):
                outputs.add(i, record, payload)
            shown.update(base.entry(name).nbytes)


def streams_exactly(scanner: TensorScanner, name: str, selectors: Sequence[Selector],
                    max_memory: int) -> bool:
    """Whether tensor ``name`` keeps every change exactly and is too large to select whole
    within ``max_memory`` (:func:`exact_limit`): then it is read twice and its records
    written through temporary files (:mod:`~sparsestitch.localize.streamed_exact`)."""
    entry = scanner.base.entry(name)
    dt = lookup_dtype(entry.dtype)
    if entry.numel <= exact_limit(max_memory, dt.itemsize):
        return False
    if scanner.plan.stored_exactly(name, dt):
        return True
    # a planner (a target, --low-rank) decides its localized tensors (CompressJob._records)
    return (name in scanner.plan.localized and scanner.planner is None
            and scanner.quantize is None and all(s.method == "changed" for s in selectors))


def selected_bytes(entry) -> int:
    """One fine-tune's selection of a tensor at worst: every element kept."""
    return exact_bytes(entry.numel, lookup_dtype(entry.dtype).itemsize)


def holds_blocks(entry, tunes: int, max_memory: int, workers: int) -> bool:
    """Whether a target's passes over a tensor keep its blocks (the base's bits, each
    fine-tune's bits and keys) from the first pass instead of reading them again: when they
    fit in a quarter of each worker's share of the budget (128 MiB at the default with two
    workers; larger tensors are read twice).  A half share held 478-775 MiB over the
    interpreter at 1.8-3.4 GB for 15% less time; this one 262-375 MiB."""
    itemsize = lookup_dtype(entry.dtype).itemsize
    held = entry.numel * (itemsize + tunes * (itemsize + 4))
    return held <= max_memory // (4 * max(1, workers))


#: What compress holds whatever the model: a block of every input being read (a million
#: elements each), its ranking keys, and two runs of values being encoded.
MIN_MEMORY = 32 << 20


def exact_limit(max_memory: int, itemsize: int) -> int:
    """The most elements of one tensor a budget of ``max_memory`` can select and encode
    exactly (see :func:`exact_bytes`)."""
    return max(0, max_memory - MIN_MEMORY) // exact_bytes(1, itemsize)


def exact_bytes(numel: int, itemsize: int) -> int:
    """What selecting and encoding one fine-tune's tensor of ``numel`` elements holds when
    every element is kept exactly: the kept fine-tuned and base bits and a bitmap of their
    positions (:class:`~sparsestitch.localize.selection.PackedParts`), then the value
    codec's raw stream and its compressed copy; below half the elements, int64 positions and
    their gaps for the list codecs instead of the stream's share."""
    return numel * (max(4 * itemsize, 8 + 2 * itemsize) + 1)


def _exact_budget(max_memory: int | str | None, base: Checkpoint, plan: TensorPlan,
                  selectors: Sequence[Selector], quantize: dict | None, planner
                  ) -> MemoryBudget:
    """compress's budget (:func:`_budget`); for the one-read global top-k, whose spooled pass
    selects every tensor whole, checked against the largest tensor stored exactly (the
    non-float and ``dense`` ones): an explicit ``max_memory`` below what it needs is refused
    naming it; the default grows to it, saying so."""
    budget = _budget(max_memory)
    # A target's quantized records stream, its exact options are held to the budget; every
    # change of a tensor stored exactly streams through temporary files above the budget
    # (streams_exactly), except in the one-read global top-k, which selects
    # every tensor whole in its spooled pass.
    if not any(s.undecided for s in selectors):
        return budget
    largest, needed = None, 0
    for name in plan.names:
        entry = base.entry(name)
        dt = lookup_dtype(entry.dtype)
        if plan.stored_exactly(name, dt):
            held = MIN_MEMORY + exact_bytes(entry.numel, dt.itemsize)
            if held > needed:
                largest, needed = name, held
    if needed <= budget.total:
        return budget
    what = f"storing tensor {largest!r} exactly"
    if max_memory is not None:
        budget.require(needed, what)
    log.warning("%s needs %s, above the default max_memory of %s: using that", what,
                format_bytes(needed), format_bytes(budget.total))
    return MemoryBudget(needed)


def _budget(max_memory: int | str | None) -> MemoryBudget:
    """compress's budget: ``max_memory`` (1 GiB when not given), at least :data:`MIN_MEMORY`."""
    return MemoryBudget.of(max_memory).require(MIN_MEMORY, "compress's blocks and runs")


def _as_path_list(value) -> list[Path]:
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value]
