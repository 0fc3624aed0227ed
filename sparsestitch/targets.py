"""Compress to a target: a fidelity (``max_error``) or a size (``max_size``) instead of a
density and a number of bits.

Both select every changed element of each localized tensor first (as a lossless delta
would), then a *planner* decides, tensor by tensor, what its record keeps and in how many
bits (:mod:`.localize.budget`), and the record is encoded with that:

* :class:`ErrorPlanner` -- each tensor's relative error ||tau - tau_hat|| / ||tau|| within
  ``max_error``: the cheapest option estimated to meet it is encoded, its real error
  measured, and the next option tried while over, so the target is never exceeded.
* :class:`SizePlanner` -- the whole delta within ``max_size`` bytes with the smallest sum of
  relative squared errors: the options are chosen for all tensors at once from profiles made
  in a first pass over the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .dtypes import DType
from .format import Record
from .localize.budget import (Option, Profile, allocate, cheapest_within, kept_indices, profile,
                              ranking)
from .selection import Selection

#: Passes over the model a size target may take when its estimates ran over.
SIZE_ATTEMPTS = 4

#: A record's encoding, given the selection it keeps and the quantization options.
Encode = Callable[[Selection, dict | None], tuple[Record, bytes]]


def changed_of(selection: Selection, numel: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(flat positions, fine-tuned bits, base bits)`` of a selection of every change."""
    positions = selection.positions
    if positions is None:
        positions = np.arange(numel, dtype=np.int64)
    return positions, selection.finetuned, selection.base


def subset(selection: Selection, numel: int, indices: np.ndarray, energy: float) -> Selection:
    """The part of a selection of every change at ``indices`` (sorted) into it, with the
    tensor's whole change ``energy`` for its fidelity report."""
    positions, finetuned, base = changed_of(selection, numel)
    if indices.size == positions.size:
        return Selection(selection.positions, finetuned, base, energy=energy)
    return Selection(positions[indices], finetuned[indices], base[indices], energy=energy)


def profile_of(name: str, dt: DType, selection: Selection, numel: int, group: int) -> Profile:
    positions, finetuned, base = changed_of(selection, numel)
    return profile(name, dt, positions, finetuned, base, numel, group)


class ErrorPlanner:
    """Every localized tensor within a relative error of ``max_error`` (see module doc)."""

    def __init__(self, max_error: float, group: int):
        if not 0.0 <= max_error:
            raise ValueError(f"max_error is a relative L2 error of each tensor's change, 0 "
                             f"(lossless) or more; got {max_error}")
        self.max_error, self.group = max_error, group

    def encode(self, name: str, dt: DType, numel: int, selection: Selection, encode: Encode,
               tune: int) -> tuple[Record, bytes]:
        tensor = profile_of(name, dt, selection, numel, self.group)
        for option in cheapest_within(tensor, self.max_error):
            record, payload = _encode_option(tensor.order, tensor.energy, option, selection,
                                             numel, encode, self.group)
            if (record.fidelity or {}).get("relative_error", 0.0) <= self.max_error:
                return record, payload
        raise AssertionError("exact values of every change always meet the target")


class SizePlanner:
    """The whole delta within ``max_size`` bytes, the sum of relative squared errors least
    (see module doc).  Every tensor's profile comes first (:meth:`add_profile`, a pass over
    the model), then :meth:`start` plans; after each encoding pass :meth:`refit` says whether
    the files ran over and, if so, re-plans from what the headers and payloads really took."""

    def __init__(self, max_size: int, group: int):
        if max_size <= 0:
            raise ValueError(f"max_size must be a positive number of bytes, got {max_size}")
        self.max_size, self.group = max_size, group
        self.profiles: list[dict[str, Profile]] = []
        self.choices: list[dict[str, Option]] = []
        self.budgets: list[float] = []

    def add_profile(self, tune: int, name: str, dt: DType, numel: int, selection: Selection
                    ) -> None:
        while len(self.profiles) <= tune:
            self.profiles.append({})
        # only the options are kept: the order of a whole model's elements would not fit
        self.profiles[tune][name] = profile_of(name, dt, selection, numel, self.group).summary()

    def start(self, tensors: int) -> None:
        """The first plan, with a header estimate for ``tensors`` records."""
        if self.max_size < 1024 + 300 * tensors:
            raise ValueError(f"max_size {self.max_size:,} bytes cannot hold the header of "
                             f"{tensors} tensors; allow more")
        # a record's header entry takes 300 to 700 bytes: refit corrects the estimate
        room = max(self.max_size - 1024 - 600 * tensors, 0.1 * self.max_size)
        self.plan([room] * len(self.profiles))

    def plan(self, budgets: Sequence[float]) -> None:
        """Choose every tensor's option, within ``budgets[tune]`` payload bytes per delta."""
        self.budgets = list(budgets)
        self.choices = [allocate(list(profiles.values()), budget)
                        for profiles, budget in zip(self.profiles, budgets)]

    def spent(self, tune: int) -> float:
        """Estimated payload bytes of the options chosen for fine-tune ``tune``."""
        return sum(option.nbytes for option in self.choices[tune].values())

    def refit(self, sizes: Sequence[int], payloads: Sequence[int], last: bool) -> bool:
        """Whether the deltas (``sizes`` in all, ``payloads`` of records) must be written
        again: False when all fit; else the budgets are corrected and re-planned."""
        limit = self.max_size
        if all(size <= limit for size in sizes):
            return False
        if last:
            raise ValueError(f"max_size {limit:,} bytes: after {SIZE_ATTEMPTS} passes the "
                             f"deltas still take {max(sizes):,} bytes; allow more")
        budgets = []
        for tune, (size, payload) in enumerate(zip(sizes, payloads)):
            # the header is now known exactly; the payload estimate was off by their ratio
            room = limit - (size - payload) - 0.005 * limit
            budgets.append(min(self.budgets[tune],
                               room * self.spent(tune) / max(payload, 1)))
        if min(budgets) <= 0:
            raise ValueError(f"max_size {limit:,} bytes cannot hold the deltas' headers "
                             f"({max(s - p for s, p in zip(sizes, payloads)):,} bytes); "
                             "allow more")
        self.plan(budgets)
        return True

    def encode(self, name: str, dt: DType, numel: int, selection: Selection, encode: Encode,
               tune: int) -> tuple[Record, bytes]:
        option = self.choices[tune][name]
        tensor = self.profiles[tune][name]
        order = None
        if option.kept:
            order, _ = ranking(name, dt, *changed_of(selection, numel), numel)
        return _encode_option(order, tensor.energy, option, selection, numel, encode,
                              self.group)


def _encode_option(order: np.ndarray | None, energy: float, option: Option,
                   selection: Selection, numel: int, encode: Encode, group: int
                   ) -> tuple[Record, bytes]:
    changed = selection.finetuned.size
    indices = np.empty(0, np.int64) if order is None else \
        kept_indices(order, option.kept, changed)
    kept = subset(selection, numel, indices, energy)
    quantize = None if option.bits is None else {"bits": option.bits, "group": group}
    return encode(kept, quantize)
