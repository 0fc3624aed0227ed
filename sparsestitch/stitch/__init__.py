"""Stitching: merge rules (one registry object each), the combiner that applies them to
decoded records, the streaming engine, devices, and continual composition
(:func:`stitch_add`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from ..cards import stitch_card
from ..format import DeltaReader
from . import engine
from .combine import RECIPE_KEY, Combiner, RuleCombiner, rule_combiner
from .compose import COMPOSABLE_RULES, stitch_add
from .device import DeviceCombiner, resolve_device
from .rules import RULES, MergeRule, TaskVector, get_rule

__all__ = ["RULES", "MergeRule", "TaskVector", "get_rule", "stitch", "stitch_add",
           "rule_combiner", "Combiner", "RuleCombiner", "RECIPE_KEY", "COMPOSABLE_RULES"]


def stitch(base: str | os.PathLike, deltas: Sequence[str | os.PathLike], out: str | os.PathLike, *,
           rule: str = "localize-stitch", weights: Sequence[float] | None = None,
           max_memory: int | str | None = None, device: str = "cpu", overwrite: bool = False,
           progress: bool = False, threads: int | None = None, **rule_options) -> Path:
    """Merge any number of deltas onto their base, tensor by tensor, into ``out``.

    Rules: ``"localize-stitch"`` (overlaps averaged; the paper's rule),
    ``"task-arithmetic"`` (``scale``), ``"ties"`` (``density``, ``scale``) and
    ``"dare"`` (``drop``, ``seed``, ``scale``); ``weights`` scale each delta's task
    vector first.  Weights and ``scale`` are finite numbers of any sign (a negative one
    subtracts a task vector), ``density`` is within [0, 1], ``drop`` within [0, 1) and
    ``seed`` a whole number of 0 or more; anything else (NaN, a string) is an
    :class:`~sparsestitch.errors.OptionError` naming the option.  Arithmetic is in
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
    merge arithmetic of the elementwise rules runs (see :mod:`.device`); every device
    gives bit-identical output.  ``threads`` read and decode ahead (default: up to 4 of the
    usable cores; 1: everything in the caller's thread).  No deltas at all writes the base
    with a recipe: the start of a chain of :func:`stitch_add` (the command line refuses it).

    >>> stitch("base.safetensors", ["math.delta", "code.delta"], "merged.safetensors")  # doctest: +SKIP
    """
    deltas = list(deltas)
    combine = rule_combiner(rule, weights, len(deltas), **rule_options)
    with contextlib.ExitStack() as stack:
        recipe = combine.recipe([stack.enter_context(DeltaReader(p)) for p in deltas])
    torch_device = resolve_device(device)
    if torch_device is not None:
        combine = DeviceCombiner(combine, torch_device)
    card = stitch_card(deltas, rule, combine.weights, {k: v for k, v in rule_options.items()})
    return engine.run(base, deltas, out, combine, overwrite=overwrite, progress=progress,
                      block_bytes=engine.block_bytes(max_memory), metadata={RECIPE_KEY: recipe},
                      card=card, threads=threads)
