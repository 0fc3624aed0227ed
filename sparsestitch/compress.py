"""Compress fine-tuned checkpoints into sparse delta files against their base.

A small driver over the walk: base and fine-tune row blocks
(:mod:`sparsestitch.walk`) -> a selector per fine-tune choosing what to keep
(:mod:`sparsestitch.localize.selectors`, run tensor by tensor by
:mod:`sparsestitch.selection`) -> :func:`~sparsestitch.format.encode_record` -> one
:class:`~sparsestitch.format.DeltaWriter` per fine-tune.  Every pass walks
tensors in name order and each tensor in row blocks of at most ``chunk_elements``
elements, reading each base block once for all fine-tunes, so memory stays near one
block per input plus the kept values of the tensors being encoded.

How many passes depends on the selector: given masks and density 1.0 need one; exact
top-k two counting passes first; the bracketed global top-k a 1/16 sample first, then
one pass whose undecided candidates are parked in a spool until the threshold is known.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import codecs
from ._version import __version__
from .atomic import check_not_an_input
from .checkpoint import Checkpoint
from .errors import TensorMismatchError
from .format import DeltaWriter, Record, digest
from .localize.selectors import (BracketedTopK, FidelityExactTopK, FidelityTopK, GivenMasks,
                                 GlobalTopK, KeepAll, PerTensorTopK, Selector)
from .codecs.quant import BITS as QUANT_BITS
from .dtypes import dtype as lookup_dtype
from .localize.topk import count_to_keep
from .progress import bar
from .readahead import DEFAULT_WORKERS, in_order, workers_for
from .selection import SpooledSelection, TensorPlan, TensorScanner, run_pre_passes
from .sizes import numel, parse_memory
from .targets import SIZE_ATTEMPTS, ErrorPlanner, SizePlanner
from .walk import refuse_delta

#: Elements per block and checkpoint read at a time.  Small blocks keep the per-block
#: passes in cache: compressing the 2.27 GB benchmark model took 3.9 s with 1 << 20 against
#: 5.0 s with 1 << 23 (two threads).
CHUNK_ELEMENTS = 1 << 20
#: Threads scanning and encoding tensors ahead of the writer (0: the caller's thread).
WORKERS = min(2, DEFAULT_WORKERS)
SCOPES = ("fidelity", "global", "per-tensor")
#: The density when neither a density nor a target is given.
DEFAULT_DENSITY = 0.01

#: A tensor holding more than this share of a delta's kept values is reported: the others
#: likely lost most of their change (a real LLM's 1% delta put 99.6% into its embedding).
CONCENTRATION_WARNING = 0.5

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
             threads: int | None = None) -> list[DeltaSummary]:
    """Write one delta file per fine-tuned checkpoint.

    Parameters
    ----------
    base, finetuned:
        ``.safetensors`` files or Hugging Face folders; ``finetuned`` may be a list
        (the base is then read once per pass for all of them).
    out:
        One output path per fine-tune.
    density:
        Fraction of the included float elements to keep (exactly ``k = round(density * N)``);
        default ``DEFAULT_DENSITY`` when no target (``lossless``, ``max_error``, ``max_size``)
        is given.
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
        Every changed element, exactly (the same as ``density=1.0``).  A density of 1.0
        keeps exactly the elements whose bits changed, so it restores the fine-tune bit for
        bit in as few bytes as the codecs allow.
    max_error, max_size:
        Targets instead of ``density`` and ``bits``, which the compressor then picks per
        tensor: every localized tensor's relative error ||tau - tau_hat|| / ||tau|| at most
        ``max_error`` (never exceeded: each record's real error is checked), or the best
        fidelity (least sum of relative squared errors) whose file fits ``max_size`` bytes
        (``"50MB"`` style accepted).  ``group`` sets the quantized scales' group.
    threads:
        Threads reading and encoding (default: 2 of the usable cores; 1: the caller's alone).

    Non-float tensors are never localized: those that differ from the base are stored
    exactly.  Tensors the fine-tune has and the base lacks are stored whole ("added").

    Examples
    --------
    >>> compress("base.safetensors", ["math.safetensors", "code.safetensors"],
    ...          ["math.delta", "code.delta"], density=0.01)  # doctest: +SKIP
    """
    started = time.perf_counter()
    finetuned_paths = _as_path_list(finetuned)
    out_paths = _as_path_list(out)
    if len(out_paths) != len(finetuned_paths):
        raise ValueError(f"{len(finetuned_paths)} fine-tuned checkpoints but {len(out_paths)} outputs")
    for path in out_paths:
        check_not_an_input(path, [base, *finetuned_paths])
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    mask_sets = _as_mask_list(masks, len(finetuned_paths))
    density, quantize, planner = _choices(density, bits, group, lossless, max_error, max_size,
                                          mask_sets)
    workers = workers_for(threads, WORKERS)
    with Checkpoint(base) as base_ckpt:
        refuse_delta(base_ckpt)
        tunes = [Checkpoint(p) for p in finetuned_paths]
        try:
            for tune in tunes:
                refuse_delta(tune, "fine-tune")
                _check_compatible(base_ckpt, tune)
            plan = TensorPlan.of(base_ckpt, include, exclude, dense)
            selectors = _make_selectors(plan, density, scope, mask_sets, len(tunes))
            job = CompressJob(base_ckpt, tunes, plan, chunk_elements, progress, workers,
                              quantize, planner)
            results = job.run(selectors, out_paths, overwrite,
                              fallback=lambda: _make_selectors(plan, density, scope, None,
                                                               len(tunes), exact=True))
        finally:
            for tune in tunes:
                tune.close()
    seconds = time.perf_counter() - started
    summaries = [DeltaSummary(path, r.nbytes, r.kept, plan.candidates, r.stored_tensors,
                              seconds, r.summary, r.warnings)
                 for path, r in zip(out_paths, results)]
    for summary in summaries:
        for warning in summary.warnings:
            log.warning("%s: %s", summary.path, warning)
    return summaries


def _make_selectors(plan: TensorPlan, density: float, scope: str, mask_sets, count: int,
                    exact: bool = False) -> list[Selector]:
    """One selector per fine-tune for these options (``exact``: never the bracketed one)."""
    if mask_sets is not None:
        return [GivenMasks(masks, plan.shapes, plan.base_path) for masks in mask_sets]
    candidates = plan.candidates
    if scope == "per-tensor":
        sizes = {n: numel(plan.shapes[n]) for n in plan.localized}
        return [PerTensorTopK(density, sizes) for _ in range(count)]
    if count_to_keep(density, candidates) == candidates:
        return [KeepAll(density) for _ in range(count)]
    fidelity = scope == "fidelity"
    if not exact and BracketedTopK.applies(density, candidates):
        bracketed = FidelityTopK if fidelity else BracketedTopK
        return [bracketed(density, candidates, plan.shapes) for _ in range(count)]
    return [(FidelityExactTopK if fidelity else GlobalTopK)(density, candidates)
            for _ in range(count)]


@dataclass
class _Written:
    """What one writer received: its records, the kept count, the file size."""

    records: list[Record] = field(default_factory=list)
    kept: int = 0
    nbytes: int = 0
    summary: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def stored_tensors(self) -> int:
        return sum(r.kind != "base" for r in self.records)


class CompressJob:
    """One compress run: the passes over the tensors and one writer per fine-tune."""

    def __init__(self, base: Checkpoint, tunes: list[Checkpoint], plan: TensorPlan,
                 chunk_elements: int, progress: bool, workers: int = WORKERS,
                 quantize: dict | None = None, planner=None):
        self.scanner = TensorScanner(base, tunes, plan, chunk_elements, quantize, planner)
        self.base, self.tunes, self.plan, self.progress = base, tunes, plan, progress
        self.workers, self.planner = workers, planner

    def run(self, selectors: list[Selector], out_paths: list[Path], overwrite: bool,
            fallback: Callable[[], list[Selector]]) -> list[_Written]:
        sized = isinstance(self.planner, SizePlanner)
        if sized:
            self._profile(selectors)
            self.planner.start(len(self.base.names))
        for attempt in range(SIZE_ATTEMPTS if sized else 1):
            writers = [DeltaWriter(p, overwrite=overwrite) for p in out_paths]
            written = [_Written() for _ in self.tunes]
            try:
                selectors = self._write_records(selectors, writers, written, fallback)
                metas = [self._meta(i, selectors[i], written[i]) for i in range(len(writers))]
                if sized and self.planner.refit([w.projected_size(m) for w, m in zip(writers, metas)],
                                                [w.payload_size() for w in writers],
                                                last=attempt + 1 == SIZE_ATTEMPTS):
                    for writer in writers:
                        writer.abort()
                    continue
                for i, (writer, meta) in enumerate(zip(writers, metas)):
                    written[i].nbytes = writer.close(meta)
                return written
            except BaseException as exc:
                for writer in writers:
                    writer.abort(exc)
                raise
        raise AssertionError("unreachable")

    def _write_records(self, selectors, writers, written, fallback) -> list[Selector]:
        """Every record of every delta, handed to its writer; returns the selectors used."""
        run_pre_passes(self.scanner, selectors, self.workers, self.progress)
        if not self._main_pass(selectors, writers, written):
            selectors = fallback()  # the bracket missed: redo the selection exactly
            run_pre_passes(self.scanner, selectors, self.workers, self.progress)
            self._main_pass(selectors, writers, written)
        for i, tune in enumerate(self.tunes):
            for name in tune.names:
                if name not in self.base:
                    self._add(writers, written, i, *self.scanner.encode_added(tune, name))
        for i in range(len(writers)):
            written[i].summary = fidelity_summary(written[i].records, self.plan)
            if selectors[i].measures_energy or self.planner is not None:
                written[i].warnings = concentration_warnings(written[i].records, self.plan)
        return selectors

    def _profile(self, selectors: list[Selector]) -> None:
        """Hand the size planner every localized tensor's profile (a pass over the model)."""
        profiled = in_order(self.plan.localized,
                            lambda name: self.scanner.select(name, selectors)[1],
                            workers=self.workers)
        with closing(profiled):
            for name, selections in profiled:
                entry = self.base.entry(name)
                for i, selection in enumerate(selections):
                    self.planner.add_profile(i, name, lookup_dtype(entry.dtype), entry.numel,
                                             selection)

    def _main_pass(self, selectors: list[Selector], writers, written) -> bool:
        """Select and encode every tensor; False if a selector's candidates could not be
        resolved (nothing was written then)."""
        if selectors[0].undecided:
            spooled = SpooledSelection(self.scanner, selectors, [w.path for w in writers],
                                       self.workers, self.progress)
            try:
                if not spooled.collect():
                    return False
                self._write_all(spooled.encoded(), writers, written)
            finally:
                spooled.close()
            return True
        ordered = any(s.ordered for s in selectors)
        encoded = in_order(self.base.names,
                           lambda name: self.scanner.select_and_encode(name, selectors),
                           workers=0 if ordered else self.workers)
        with closing(encoded):
            self._write_all(encoded, writers, written)
        return True

    def _write_all(self, encoded, writers, written) -> None:
        total_bytes = sum(self.base.entry(n).nbytes for n in self.base.names)
        with bar(total_bytes, "encode", self.progress) as progress:
            for name, records in encoded:
                for i, (record, payload) in enumerate(records):
                    self._add(writers, written, i, record, payload)
                progress.update(self.base.entry(name).nbytes)

    def _add(self, writers, written, i: int, record: Record, payload: bytes) -> None:
        writers[i].add(record, payload)
        written[i].records.append(record)
        written[i].kept += record.count if record.name in self.plan.localized else 0

    def _meta(self, tune_index: int, selector: Selector, written: _Written) -> dict:
        identity = [[r.name, r.dtype, list(r.shape), r.base_xxh3] for r in written.records
                    if r.kind != "added"]
        masks = isinstance(selector, GivenMasks)
        return {
            "library_version": __version__,
            "method": selector.method,
            "density": None if masks else selector.density,
            "kept": written.kept,
            "candidates": self.plan.candidates,
            "base_identity": digest(json.dumps(identity, separators=(",", ":")).encode()),
            "sources": {"base": self.base.display_name,
                        "finetuned": self.tunes[tune_index].display_name},
            "localized_tensors": None if masks else len(self.plan.localized),
            "dense_patterns": list(self.plan.dense),
            "fidelity": written.summary,
        }


def fidelity_summary(records: Sequence[Record], plan: TensorPlan) -> dict:
    """The header's fidelity report: over the localized tensors, the relative L2 error of the
    whole task vector, the mean and worst per tensor, the share of the change kept, bits per
    parameter, and whether the delta is lossless."""
    localized = set(plan.localized)
    reports = [(r.name, r.fidelity) for r in records if r.name in localized and r.fidelity]
    energy = sum(f["tau_norm"] ** 2 for _, f in reports)
    lost = sum((f["relative_error"] * f["tau_norm"]) ** 2 for _, f in reports)
    exact = all(codecs.value_codec(r.values["codec"]).exact for r in records if r.kind != "base")
    payload_bits = 8 * sum(r.nbytes for r in records)
    summary = {"lossless": exact and lost == 0.0 and all(
                   r.kind != "base" or r.name not in localized or (r.fidelity or {}).get(
                       "relative_error", 0.0) == 0.0 for r in records),
               "bits_per_parameter": payload_bits / plan.candidates if plan.candidates else 0.0,
               "relative_error": float(np.sqrt(lost / energy)) if energy else 0.0,
               "energy_kept": 1.0 - lost / energy if energy else 1.0}
    if reports:
        worst = max(reports, key=lambda item: item[1]["relative_error"])
        summary.update(mean_tensor_relative_error=float(np.mean(
                           [f["relative_error"] for _, f in reports])),
                       worst_tensor_relative_error=worst[1]["relative_error"],
                       worst_tensor=worst[0])
    return {k: round(v, 9) if isinstance(v, float) else v for k, v in summary.items()}


def concentration_warnings(records: Sequence[Record], plan: TensorPlan) -> list[str]:
    """A warning when one tensor holds more than half of the kept values of the localized
    tensors, and more than twice its share of their elements (the others then keep little of
    their change)."""
    localized = set(plan.localized)
    counts = {r.name: r.count for r in records if r.name in localized and r.kind == "sparse"}
    total = sum(counts.values())
    if not total or len(plan.localized) < 2:
        return []
    name = max(counts, key=counts.get)
    share = counts[name] / total
    if share <= CONCENTRATION_WARNING or share <= 2 * numel(plan.shapes[name]) / plan.candidates:
        return []
    return [f"tensor {name!r} holds {100 * share:.1f}% of the kept values; the other tensors "
            "keep little of their change (scope='fidelity' spreads the budget by each "
            "tensor's own change)"]


def _choices(density, bits, group, lossless, max_error, max_size, mask_sets):
    """``(density, quantize options, planner)`` for compress's arguments, checked."""
    given = [name for name, value in (("density", density), ("bits", bits),
                                      ("masks", mask_sets)) if value is not None]
    targets = [name for name, value in (("lossless", lossless or None), ("max_error", max_error),
                                        ("max_size", max_size)) if value is not None]
    # density 1.0 with lossless says the same thing twice; anything else a target decides
    redundant = lossless and density == 1.0 and bits is None and mask_sets is None
    if len(targets) > 1 or (targets and given and not redundant):
        raise ValueError(f"{' and '.join(targets + given)} are contradictory: a target decides "
                         "what is kept and in how many bits; give one of them")
    quantize = _quantize(bits, group)
    planner = None
    if lossless:
        density = 1.0
    elif max_error is not None:
        density, planner = 1.0, ErrorPlanner(float(max_error), group)
    elif max_size is not None:
        density, planner = 1.0, SizePlanner(parse_memory(max_size), group)
    elif density is None:
        density = DEFAULT_DENSITY
    if mask_sets is None:
        count_to_keep(density, 0)  # validates the range
        if density == 0:
            raise ValueError("density 0 keeps nothing of the fine-tune; keep a fraction above "
                             "0 (the paper's 0.01 keeps 1%), or 1.0 for a lossless delta")
    return density, quantize, planner


def _quantize(bits: int | None, group: int) -> dict | None:
    """The value codec options for ``bits``/``group``, checked (None: exact values)."""
    if bits is None:
        return None
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, QUANT_BITS))} (bits per kept "
                         f"value), got {bits!r}")
    if type(group) is not int or group < 0:
        raise ValueError(f"group must be 0 (one scale per tensor) or a number of values per "
                         f"scale, got {group!r}")
    return {"bits": bits, "group": group}


def _check_compatible(base: Checkpoint, tune: Checkpoint) -> None:
    missing = [n for n in base.names if n not in tune]
    if missing:
        raise TensorMismatchError(f"the fine-tuned checkpoint lacks {len(missing)} base tensor(s), "
                                  f"e.g. {missing[0]!r}; is it a fine-tune of this base?",
                                  path=tune.path, tensor=missing[0])
    for name in base.names:
        b, t = base.entry(name), tune.entry(name)
        if (b.dtype, b.shape) != (t.dtype, t.shape):
            raise TensorMismatchError(f"base has {b.dtype}{list(b.shape)}, fine-tune has "
                                      f"{t.dtype}{list(t.shape)}; convert the fine-tune to the base's "
                                      "dtype, or compare against the right base", path=tune.path,
                                      tensor=name)


def _as_path_list(value) -> list[Path]:
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value]


def _as_mask_list(masks, count: int):
    if masks is None:
        return None
    if isinstance(masks, Mapping):
        masks = [masks]
    masks = list(masks)
    if len(masks) != count:
        raise ValueError(f"{count} fine-tuned checkpoints but {len(masks)} mask sets")
    return masks


