"""Stitching: merge rules (one registry object each), the combiner that applies them to
decoded records, the streaming engine, devices, and continual composition
(:func:`stitch_add`)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..combine.combiners import RECIPE_KEY, Combiner, RuleCombiner, rule_combiner
from ..combine.device import DeviceCombiner, resolve_device
from ..combine.rules import RULES, MergeRule, TaskVector, get_rule
from ..core.errors import OptionError
from ..delta.format import DeltaReader
from ..engine.budget import MemoryBudget
from . import stitch_engine as engine
from .cards import stitch_card
from .compose import COMPOSABLE_RULES, stitch_add

log = logging.getLogger("sparsestitch")

__all__ = ["RULES", "MergeRule", "TaskVector", "get_rule", "stitch", "stitch_add",
           "rule_combiner", "Combiner", "RuleCombiner", "RECIPE_KEY", "COMPOSABLE_RULES"]


def stitch(base: str | os.PathLike, deltas: Sequence[str | os.PathLike], out: str | os.PathLike, *,
           rule: str = "localize-stitch", weights: Sequence[float] | None = None,
           max_memory: int | str | None = None, device: str = "cpu", overwrite: bool = False,
           progress: bool = False, threads: int | None = None, keep: float | None = None,
           scope: str = "fidelity", **rule_options) -> Path:
    """Merge any number of deltas onto their base, tensor by tensor, into ``out``.

    Rules: ``"localize-stitch"`` (overlaps averaged; the paper's rule),
    ``"task-arithmetic"`` (``scale``), ``"ties"`` (``density``, ``scale``) and
    ``"dare"`` (``drop``, ``seed``, ``scale``); ``weights`` scale each delta's task
    vector first.  Weights and ``scale`` are finite numbers of any sign (a negative one
    subtracts a task vector), ``density`` is within [0, 1], ``drop`` within [0, 1) and
    ``seed`` a whole number of 0 or more; anything else (NaN, a string) is an
    :class:`~sparsestitch.core.errors.OptionError` naming the option.  Arithmetic is in
    float32 (float64 for float64 models), rounded once to the model's dtype; positions no
    delta stores keep the base's bits.  Non-float tensors take the stored values (deltas
    that store different ones are refused).
    ``max_memory`` (default 1 GiB) bounds what is held at once: base/output row blocks
    of a quarter of it, and read-ahead within half of it, counting about 32 bytes per
    stored position being decoded; a tensor whose records would not fit is merged in
    smaller row blocks, decoding each record once per block (slower, same bits).  On
    top of it come the interpreter and libraries (about 40 MiB) and one record decoded
    whole at a time (about 40 bytes per position it stores).  Below 512 MiB everything
    runs in one thread, to keep the allocator's per-thread slack out.  The
    output's metadata records the rule, options, weights and deltas, for
    :func:`stitch_add`.  ``device`` (``"cpu"``, ``"cuda"``, ``"auto"``) says where the
    merge arithmetic of the elementwise rules runs (see :mod:`sparsestitch.combine.device`); every device
    gives bit-identical output.  ``threads`` read and decode ahead (default: up to 4 of the
    usable cores; 1: everything in the caller's thread).  No deltas at all writes the base
    with a recipe: the start of a chain of :func:`stitch_add` (the command line refuses it).

    ``keep`` localizes each delta again before the rule: a fraction of its task vector kept
    as compress's ``density`` would keep it of the fine-tune the delta restores (``scope``
    as compress's).  A zoo's default deltas are made for restoring (15-100% of each tensor,
    quantized) and merge better localized; this runs :func:`~sparsestitch.merge` with the
    deltas read as their fine-tunes (on the CPU; its output's metadata is a merge's).

    >>> stitch("base.safetensors", ["math.delta", "code.delta"], "merged.safetensors")  # doctest: +SKIP
    """
    deltas = list(deltas)
    if keep is not None:
        if device != "cpu":
            raise OptionError("keep localizes the deltas on the CPU: leave device at 'cpu'",
                              option="device")
        from .merge import merge
        return merge(base, deltas, out, rule=rule, weights=weights, keep=keep, scope=scope,
                     max_memory=max_memory, overwrite=overwrite, progress=progress,
                     threads=threads, **rule_options)
    combine = rule_combiner(rule, weights, len(deltas), **rule_options)
    budget = MemoryBudget.of(max_memory)
    torch_device = resolve_device(device)
    with contextlib.ExitStack() as stack:  # each delta opened once, for the whole command
        readers = [stack.enter_context(DeltaReader(p)) for p in deltas]
        recipe = combine.recipe(readers)
        if rule == "localize-stitch" and len(readers) > 1:
            _note_dense(readers)
        if torch_device is not None:
            combine = DeviceCombiner(combine, torch_device)
        card = stitch_card(deltas, rule, combine.weights, dict(rule_options))
        return engine.run(base, readers, out, combine, overwrite=overwrite, progress=progress,
                          budget=budget, metadata={RECIPE_KEY: recipe}, card=card,
                          threads=threads)


#: A delta keeping more than this share of its parameters is made for restoring, not merging.
DENSE_SHARE = 0.1


def _note_dense(readers: Sequence[DeltaReader]) -> None:
    """Say (a logged warning) when Localize-and-Stitch gets deltas made for restoring: it
    averages them wherever they overlap, which merges worse than localizing them first."""
    dense = []
    for reader in readers:
        kept, candidates = reader.header.get("kept"), reader.header.get("candidates")
        if isinstance(kept, int) and isinstance(candidates, int) and candidates and \
                kept / candidates > DENSE_SHARE:
            dense.append(f"{reader.path.name} ({100 * kept / candidates:.0f}%)")
    if dense:
        log.warning("localize-stitch averages deltas wherever they overlap; %s keep a large "
                    "share of their parameters (made for restoring, as the default delta is), "
                    "and merge better localized first: add keep=0.05 (--keep 0.05)",
                    ", ".join(dense))
