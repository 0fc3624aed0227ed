"""Targets instead of knobs: which density and how many bits each tensor gets.

For one tensor, :func:`profile` lists *options* -- keep the top ``density`` of its changed
elements (by |tau|, compress's tie order) with values exact or in ``bits`` bits -- each with
an estimate of its bytes and of the relative squared error ||tau - tau_hat||^2 / ||tau||^2 it
leaves.  Dropped energy is exact (from the sorted magnitudes); the quantization error and the
bytes per value come from encoding a sample of the kept values with the real codecs.

* ``max_error`` (:func:`cheapest_within`): per tensor, the smallest option whose error stays
  within the target.  The record is then encoded and its real error checked; if it is over,
  the next option is tried, and exact values at the same density always qualify, so the
  target is never exceeded.
* ``max_size`` (:func:`allocate`): over all tensors, the options minimizing the sum of
  relative squared errors within a byte budget, by a Lagrange multiplier found by bisection
  on the options' lower convex hulls -- the rate-distortion allocation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .. import codecs
from ..dtypes import DType
from ..tiebreak import ranked
from .topk import magnitude_keys

DENSITIES = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
BITS = (1, 2, 3, 4, 8, None)          # None: exact values
SAMPLE = 1 << 12                      # kept values encoded to estimate bits and errors


@dataclass(frozen=True)
class Option:
    """One way to store a tensor: what it keeps, in how many bits, and what it costs."""

    density: float           # of the tensor's elements (1.0: every changed element)
    bits: int | None         # None: exact values
    kept: int
    nbytes: float            # estimated payload bytes
    error: float             # estimated relative squared error ||tau - tau_hat||^2 / ||tau||^2


@dataclass(frozen=True)
class Profile:
    """A tensor's options, and what :func:`kept_indices` needs to pick any of them."""

    name: str
    energy: float            # sum of tau squared (finite changes)
    order: np.ndarray | None  # indices of the changed elements, best first (None: not kept)
    options: list[Option]

    def summary(self) -> Profile:
        """The same options without the per-element order (what a whole model's plan keeps)."""
        return Profile(self.name, self.energy, None, self.options)

    def nothing(self) -> Option:
        return Option(0.0, None, 0, 0.0, 1.0 if self.energy > 0 else 0.0)


def ranking(name: str, dt: DType, changed: np.ndarray, finetuned: np.ndarray,
            base: np.ndarray, numel: int) -> tuple[np.ndarray, np.ndarray]:
    """``(order, magnitude)`` of a tensor's changed elements: the indices into them of the
    best :func:`ranked_count` (|tau| descending, then compress's tie order, then position),
    best first, and every changed element's finite |tau| in float64."""
    keys = magnitude_keys(finetuned, base, dt)
    magnitude = keys.view(np.float32).astype(np.float64)
    finite = np.where(np.isfinite(magnitude), magnitude, 0.0)
    order_keys = ~ranked(keys, name, changed)  # ascending = best first
    count = ranked_count(changed.size, numel)
    if count < changed.size:
        # Only the best few options need an order: partition, then sort those alone.  Every
        # element up to the cut's key, so equal keys there are ordered by position too.
        cut = order_keys[np.argpartition(order_keys, count - 1)[count - 1]]
        candidates = np.flatnonzero(order_keys <= cut)
        best = np.argsort(order_keys[candidates], kind="stable")[:count]
        return candidates[best], finite
    # a stable sort leaves the lower position first where keys are equal (changed ascends)
    return np.argsort(order_keys, kind="stable"), finite


def ranked_count(changed: int, numel: int) -> int:
    """How many of a tensor's changed elements the options below every change need ordered."""
    return min(changed, max(1, int(round(max(d for d in DENSITIES if d < 1.0) * numel))))


def profile(name: str, dt: DType, changed: np.ndarray, finetuned: np.ndarray, base: np.ndarray,
            numel: int, group: int) -> Profile:
    """The options for one tensor, from its changed elements: their sorted flat positions and
    the fine-tuned and base bits there (``numel``: the tensor's elements)."""
    order, finite = ranking(name, dt, changed, finetuned, base, numel)
    energy = float(np.dot(finite, finite))
    cumulative = np.concatenate([[0.0], np.cumsum(finite[order] ** 2)])
    options = []
    for density in DENSITIES:
        kept = min(changed.size, int(round(density * numel)))
        if kept == 0 or (options and kept == options[-1].kept):
            continue
        chosen = kept_indices(order, kept, changed.size)
        dropped = max(0.0, energy - cumulative[kept]) if kept < changed.size else 0.0
        kept_energy = energy - dropped
        position_bits = _position_bits(kept, numel)
        sample = chosen[np.linspace(0, kept - 1, min(kept, SAMPLE)).astype(np.int64)]
        sample_energy = float(np.dot(finite[sample], finite[sample]))
        for bits in BITS:
            quantize = None if bits is None else {"bits": bits, "group": group}
            payload, config = codecs.encode_values(finetuned[sample], base[sample], dt, quantize)
            value_bits = 8 * len(payload) / sample.size
            ratio = 0.0 if bits is None or sample_energy == 0 else \
                config["error_sq"] / sample_energy
            error = (dropped + ratio * kept_energy) / energy if energy > 0 else 0.0
            options.append(Option(density, bits, kept, kept * (position_bits + value_bits) / 8,
                                  min(error, 1.0)))
    return Profile(name, energy, order, options)


def kept_indices(order: np.ndarray, kept: int, changed: int) -> np.ndarray:
    """Which of the ``changed`` elements keeping ``kept`` of them keeps: sorted indices into
    them, given their :func:`ranking` order (every one when ``kept`` is all of them)."""
    if kept >= changed:
        return np.arange(changed, dtype=np.int64)
    return np.sort(order[:kept])


def cheapest_within(profile: Profile, max_error: float) -> list[Option]:
    """Options to try for a relative error within ``max_error``, in order: those whose
    estimate is within it, cheapest first, then exact values of every change (error 0),
    which always qualifies -- the caller encodes, measures, and moves on while over."""
    if profile.energy == 0 or max_error >= 1.0:
        return [profile.nothing()]
    limit = max_error ** 2
    fitting = sorted((o for o in profile.options if o.error <= limit * 0.95),
                     key=lambda o: o.nbytes)
    everything = max(profile.options, key=lambda o: (o.kept, o.bits is None))
    return fitting + ([everything] if everything not in fitting else [])


def allocate(profiles: Sequence[Profile], budget: float) -> dict[str, Option]:
    """Per tensor the option minimizing the sum of relative squared errors with the total
    estimated bytes within ``budget``: each tensor takes the option minimizing
    ``error + lam * nbytes`` on its lower convex hull, with ``lam`` the smallest that fits."""
    hulls = {p.name: _hull([p.nothing(), *p.options]) for p in profiles}

    def pick(lam: float) -> dict[str, Option]:
        return {name: min(hull, key=lambda o: o.error + lam * o.nbytes)
                for name, hull in hulls.items()}

    def total(choice: Mapping[str, Option]) -> float:
        return sum(o.nbytes for o in choice.values())

    low, high = 0.0, 1.0
    while total(pick(high)) > budget and high < 1e30:
        high *= 16.0
    if total(pick(low)) <= budget:
        return pick(low)
    for _ in range(100):
        middle = (low + high) / 2
        if total(pick(middle)) > budget:
            low = middle
        else:
            high = middle
    return pick(high)


def _hull(options: list[Option]) -> list[Option]:
    """The lower convex hull of (bytes, error): the options some trade-off prefers."""
    points = sorted(options, key=lambda o: (o.nbytes, o.error))
    hull: list[Option] = []
    for option in points:
        if hull and option.error >= hull[-1].error:
            continue  # costs more and is no better
        while len(hull) >= 2 and _turns_up(hull[-2], hull[-1], option):
            hull.pop()
        hull.append(option)
    return hull


def _turns_up(a: Option, b: Option, c: Option) -> bool:
    """Whether b lies on or above the segment from a to c."""
    return (b.error - a.error) * (c.nbytes - a.nbytes) >= (c.error - a.error) * (b.nbytes - a.nbytes)


def _position_bits(kept: int, numel: int) -> float:
    """Bits per kept position near the entropy bound (0 when every element is kept)."""
    if kept >= numel or kept == 0:
        return 0.0
    p = kept / numel
    entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return min(entropy / p * 1.03, 1.0 / p)  # Rice within a few %, a bitmap at most 1/p
