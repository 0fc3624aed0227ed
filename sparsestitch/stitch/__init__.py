"""Stitching: merge rules (pure functions) and the streaming engine that applies them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..dtypes import from_wide, to_wide
from . import engine
from .rules import RULES, TaskVector

__all__ = ["RULES", "TaskVector", "stitch", "rule_combiner"]


def _parse_memory(value: int | str | None) -> int:
    if value is None:
        return engine.DEFAULT_BLOCK_BYTES * 4
    if isinstance(value, int):
        return value
    text = value.strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 1000, "MB": 10**6,
             "GB": 10**9, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * factor)
    return int(text)


def rule_combiner(rule: str, weights: Sequence[float] | None, count: int, **options):
    """A combiner (see :mod:`.engine`) applying merge rule ``rule`` in the wide float type."""
    try:
        function, option_names = RULES[rule]
    except KeyError:
        raise ValueError(f"unknown rule {rule!r}; choose from {', '.join(RULES)}") from None
    unknown = set(options) - set(option_names)
    if unknown:
        raise ValueError(f"rule {rule!r} takes options {option_names}, not {sorted(unknown)}")
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"{count} deltas but {len(weights)} weights")

    def combine(name, dt, numel, stored):
        present = [(s, w) for s, w in zip(stored, weights) if s is not None]
        if not present:
            return np.empty(0, np.int64), np.empty(0, dt.bits)
        with np.errstate(all="ignore"):
            vectors = [TaskVector(s.positions, to_wide(s.finetuned, dt) - to_wide(s.base, dt))
                       for s, _ in present]
            positions, update = function(vectors, [w for _, w in present], name, numel, **options)
            # Base bits at the changed positions, from whichever delta stored each one.
            stored_positions, first = np.unique(np.concatenate([s.positions for s, _ in present]),
                                                return_index=True)
            base_bits = np.concatenate([s.base for s, _ in present])[first]
            base_wide = to_wide(base_bits[np.searchsorted(stored_positions, positions)], dt)
            return positions, from_wide(base_wide + update, dt)

    return combine


def stitch(base: str | os.PathLike, deltas: Sequence[str | os.PathLike], out: str | os.PathLike, *,
           rule: str = "localize-stitch", weights: Sequence[float] | None = None,
           max_memory: int | str | None = None, device: str = "cpu", overwrite: bool = False,
           progress: bool = False, **rule_options) -> Path:
    """Merge any number of deltas onto their base, tensor by tensor, into ``out``.

    Rules: ``"localize-stitch"`` (overlaps averaged; the paper's rule),
    ``"task-arithmetic"`` (``scale``), ``"ties"`` (``density``, ``scale``) and
    ``"dare"`` (``drop``, ``seed``, ``scale``); ``weights`` scale each delta's task
    vector first.  Arithmetic is in float32 (float64 for float64 models), rounded once.
    ``max_memory`` bounds the base/output blocks held at once (tensors larger than
    the budget are processed in row blocks).

    >>> stitch("base.safetensors", ["math.delta", "code.delta"], "merged.safetensors")  # doctest: +SKIP
    """
    if device not in ("cpu", "auto"):
        raise ValueError(f"device {device!r} is not available in this build: use 'cpu' or 'auto'")
    combine = rule_combiner(rule, weights, len(deltas), **rule_options)
    block_bytes = max(1 << 16, _parse_memory(max_memory) // 4)
    return engine.run(base, deltas, out, combine, overwrite=overwrite, progress=progress,
                      block_bytes=block_bytes)
