"""Compress to a target: a fidelity (``max_error``) or a size (``max_size``) instead of a
density and a number of bits.

A *planner* decides, tensor by tensor, what each localized tensor's record keeps and in how
many bits, from the tensor's :class:`~.localize.stats.TensorStats` (a histogram of its
ranking keys and a strided sample, gathered block by block: :mod:`.budget`); the
record keeps the changed elements whose key is at least the chosen threshold, selected by a
comparison as the blocks are read again, and is encoded once:

* :class:`ErrorPlanner` -- each tensor's relative error ||tau - tau_hat|| / ||tau|| within
  ``max_error``: the cheapest option estimated to meet it is encoded, its real error
  measured, and the next option tried while over, so the target is never exceeded.
* :class:`SizePlanner` -- the whole delta within ``max_size`` bytes with the smallest sum of
  relative squared errors: the options are chosen for all tensors at once from statistics
  gathered in a first pass over the model.

Both also take a tensor's selection of every change held in memory (:meth:`encode`, what
``merge`` uses), planning from statistics of that selection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ..core.dtypes import DType
from ..core.errors import OptionError
from ..delta.format import Record
from .budget import Option, OptionSearch, Profile, allocate
from .selection import Selection
from .stats import TensorStats, keys_at_least, stats_keys

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


def stats_of(name: str, dt: DType, selection: Selection, numel: int) -> TensorStats:
    """The statistics of a selection of every change held in memory."""
    stats = TensorStats.empty(name, dt, numel)
    stats.add(selection.finetuned, selection.base, 0)
    return stats


def meets(record: Record, max_error: float) -> bool:
    return (record.fidelity or {}).get("relative_error", 0.0) <= max_error


class ErrorPlanner:
    """Every localized tensor within a relative error of ``max_error`` (see module doc)."""

    #: The planner reads each tensor's statistics before choosing (one pass more).
    needs_stats = True
    #: The deltas warn when one tensor takes most of the kept values.
    warns = True

    def __init__(self, max_error: float, group: int):
        if not 0.0 <= max_error:
            raise OptionError(f"max_error is a relative L2 error of each tensor's change, 0 "
                             f"(lossless) or more; got {max_error}")
        self.max_error, self.group = max_error, group

    @property
    def target(self) -> dict:
        """The header's ``target``."""
        return {"max_error": self.max_error}

    def accepts(self, record: Record) -> bool:
        return meets(record, self.max_error)

    def options(self, stats: TensorStats, tune: int = 0) -> Iterator[Option]:
        """The options to try for one tensor, in order (see :meth:`OptionSearch.within`)."""
        if stats.energy == 0 or self.max_error >= 1.0:
            yield Profile(stats.name, stats.energy, []).nothing()
            return
        yield from OptionSearch(stats, self.group).within(self.max_error ** 2)

    def encode(self, name: str, dt: DType, numel: int, selection: Selection, encode: Encode,
               tune: int) -> tuple[Record, bytes]:
        stats = stats_of(name, dt, selection, numel)
        for option in self.options(stats):
            record, payload = _encode_option(option, selection, numel, dt, stats.energy,
                                             encode, self.group)
            if meets(record, self.max_error):
                return record, payload
        raise AssertionError("exact values of every change always meet the target")


class EveryChangePlanner:
    """Every change of every localized tensor in ``bits`` bits (``--density 1.0 --bits``): one
    option, no target, but planned like one so that the record streams (one pass: the
    change's energy is measured as it is kept)."""

    needs_stats = False
    warns = False

    def __init__(self, bits: int, group: int):
        self.bits, self.group = bits, group

    def accepts(self, record: Record) -> bool:
        return True

    def option(self, tune: int, name: str) -> Option:
        return Option(1.0, self.bits, 0, 0.0, 0.0, threshold=0)  # kept: not known before

    def energy(self, tune: int, name: str) -> float | None:
        return None  # every change is kept: its energy is the kept energy

    def encode(self, name: str, dt: DType, numel: int, selection: Selection, encode: Encode,
               tune: int) -> tuple[Record, bytes]:
        return encode(selection, {"bits": self.bits, "group": self.group})


class SizeTarget:
    """What the size targets' planners share: the first payload budget from an estimate of
    the header, and re-planning from what a pass really wrote.  Subclasses hold
    ``max_size``, ``budgets`` and ``choices`` (per fine-tune, each tensor's choice with its
    estimated ``nbytes``) and re-plan in ``plan(budgets)``."""

    def first_budget(self, tensors: int) -> float:
        """Each delta's first payload budget, the header taken as ``tensors`` records."""
        if self.max_size < 1024 + 300 * tensors:
            raise OptionError(f"max_size {self.max_size:,} bytes cannot hold the header of "
                             f"{tensors} tensors; allow more")
        # a record's header entry takes 300 to 700 bytes: refit corrects the estimate
        return max(self.max_size - 1024 - 600 * tensors, 0.1 * self.max_size)

    def spent(self, tune: int) -> float:
        """Estimated payload bytes of the options chosen for fine-tune ``tune``."""
        return sum(choice.nbytes for choice in self.choices[tune].values())

    def refit(self, sizes: Sequence[int], payloads: Sequence[int], last: bool) -> bool:
        """Whether the deltas (``sizes`` in all, ``payloads`` of records) must be written
        again: False when all fit; else the budgets are corrected and re-planned."""
        limit = self.max_size
        if all(size <= limit for size in sizes):
            return False
        if last:
            raise OptionError(f"max_size {limit:,} bytes: after {SIZE_ATTEMPTS} passes the "
                             f"deltas still take {max(sizes):,} bytes; allow more")
        budgets = []
        for tune, (size, payload) in enumerate(zip(sizes, payloads)):
            # the header is now known exactly; the payload estimate was off by their ratio
            room = limit - (size - payload) - 0.005 * limit
            budgets.append(min(self.budgets[tune],
                               room * self.spent(tune) / max(payload, 1)))
        if min(budgets) <= 0:
            raise OptionError(f"max_size {limit:,} bytes cannot hold the deltas' headers "
                             f"({max(s - p for s, p in zip(sizes, payloads)):,} bytes); "
                             "allow more")
        self.plan(budgets)
        return True


class SizePlanner(SizeTarget):
    """The whole delta within ``max_size`` bytes, the sum of relative squared errors least
    (see module doc).  Every tensor's statistics come first (:meth:`add_profile`, a pass over
    the model), then :meth:`start` plans; after each encoding pass :meth:`refit` says whether
    the files ran over and, if so, re-plans from what the headers and payloads really took."""

    def __init__(self, max_size: int, group: int):
        if max_size <= 0:
            raise OptionError(f"max_size must be a positive number of bytes, got {max_size}")
        self.max_size, self.group = max_size, group
        self.profiles: list[dict[str, Profile]] = []
        self.target = {"max_size": max_size}  # the header's ``target``
        self.choices: list[dict[str, Option]] = []
        self.budgets: list[float] = []

    def add_profile(self, tune: int, profile: Profile) -> None:
        """One tensor's options for one fine-tune (:func:`~.localize.budget.tensor_options`)."""
        while len(self.profiles) <= tune:
            self.profiles.append({})
        self.profiles[tune][profile.name] = profile

    def start(self, tensors: int) -> None:
        """The first plan, with a header estimate for ``tensors`` records."""
        self.plan([self.first_budget(tensors)] * len(self.profiles))

    def plan(self, budgets: Sequence[float]) -> None:
        """Choose every tensor's option, within ``budgets[tune]`` payload bytes per delta."""
        self.budgets = list(budgets)
        self.choices = [allocate(list(profiles.values()), budget)
                        for profiles, budget in zip(self.profiles, budgets)]

    #: The plan was made from a pass of its own (:meth:`add_profile`).
    needs_stats = False
    warns = True

    def accepts(self, record: Record) -> bool:
        return True

    def option(self, tune: int, name: str) -> Option:
        return self.choices[tune][name]

    def energy(self, tune: int, name: str) -> float:
        return self.profiles[tune][name].energy

    def encode(self, name: str, dt: DType, numel: int, selection: Selection, encode: Encode,
               tune: int) -> tuple[Record, bytes]:
        return _encode_option(self.choices[tune][name], selection, numel, dt,
                              self.profiles[tune][name].energy, encode, self.group)


def _encode_option(option: Option, selection: Selection, numel: int, dt: DType, energy: float,
                   encode: Encode, group: int) -> tuple[Record, bytes]:
    """The record of ``option`` from a selection of every change held in memory."""
    if option.threshold < 0 or option.kept == 0:  # nothing kept
        kept = Selection(np.empty(0, np.int64), selection.finetuned[:0], selection.base[:0],
                         energy=energy)
    else:
        positions, finetuned, base = changed_of(selection, numel)
        if option.threshold == 0:
            kept = Selection(selection.positions, finetuned, base, energy=energy)
        else:
            indices = keys_at_least(stats_keys(finetuned, base, dt), option.threshold)
            kept = Selection(positions[indices], finetuned[indices], base[indices],
                             energy=energy)
    quantize = None if option.bits is None else {"bits": option.bits, "group": group}
    return encode(kept, quantize)
