"""Targets instead of knobs: which density and how many bits each tensor gets.

For one tensor, :func:`tensor_options` lists *options* -- keep the changed elements whose
ranking key is at least a threshold (about a ``density`` of the tensor's elements: whole bins
of the key histogram, see :mod:`.stats`) with values exact or in ``bits`` bits -- each with an
estimate of its bytes and of the relative squared error ||tau - tau_hat||^2 / ||tau||^2 it
leaves.  Dropped energy is exact (from the histogram's bins); the quantization error and the
bytes per value come from encoding the part of a strided sample that the threshold keeps with
the real codecs.  Nothing is sorted and no element is held beyond the sample.

* ``max_error`` (:class:`OptionSearch`): per tensor, the cheapest option whose estimated
  error stays within the target, found lazily (options in order of a lower bound of their
  bytes, each estimated only while it could still win).  The record is then encoded and its
  real error checked; if it is over, the search goes on, and exact values of every change
  always qualify, so the target is never exceeded.
* ``max_size`` (:func:`allocate`): over all tensors, the options minimizing the sum of
  relative squared errors within a byte budget, by a Lagrange multiplier found by bisection
  on the options' lower convex hulls -- the rate-distortion allocation.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..delta import codecs
from ..delta.codecs.quant import estimate as quant_estimate
from ..delta.codecs.quant import estimated_bits
from .stats import TensorStats, keys_at_least

DENSITIES = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
BITS = (1, 2, 3, 4, 8, None)          # None: exact values
SAMPLE = 1 << 12                      # kept values encoded to estimate bits and errors


@dataclass(frozen=True)
class Option:
    """One way to store a tensor: what it keeps, in how many bits, and what it costs."""

    density: float           # the density asked for (1.0: every changed element)
    bits: int | None         # None: exact values
    kept: int
    nbytes: float            # estimated payload bytes
    error: float             # estimated relative squared error ||tau - tau_hat||^2 / ||tau||^2
    threshold: int = 0       # keep the changed elements whose key is at least this (0: all)


@dataclass(frozen=True)
class Profile:
    """A tensor's options (what a whole model's plan keeps of each tensor)."""

    name: str
    energy: float            # sum of tau squared (finite changes)
    options: list[Option]

    def nothing(self) -> Option:
        return Option(0.0, None, 0, 0.0, 1.0 if self.energy > 0 else 0.0, threshold=-1)


class OptionSearch:
    """A tensor's options, estimated lazily from its :class:`~.stats.TensorStats`."""

    def __init__(self, stats: TensorStats, group: int):
        self.stats, self.group = stats, group
        self.energy = stats.energy
        self._finetuned, self._base = stats.sample()
        self._keys = stats.sample_keys(self._finetuned, self._base)
        self._weights = stats.sample_weights(self._keys.size)  # None: the plain error
        self._cuts = {}
        for density in DENSITIES:
            cut = stats.cut(int(round(density * stats.numel)) if density < 1.0 else stats.changed)
            if cut.kept and (cut.kept < stats.changed or density == 1.0) and \
                    all(c.kept != cut.kept for c in self._cuts.values()):
                self._cuts[density] = cut  # (every change once: as density 1.0, threshold 0)
        self._estimated: dict[tuple[float, int | None], Option] = {}
        self._kept_samples: dict[float, tuple] = {}

    def candidates(self) -> list[tuple[float, float, int | None]]:
        """``(lower bound of the bytes, density, bits)`` of every option, cheapest first: the
        positions' bytes (what the values cost is known only once estimated)."""
        out = []
        for density, cut in self._cuts.items():
            position_bytes = cut.kept * _position_bits(cut.kept, self.stats.numel) / 8
            out += [(position_bytes, density, bits) for bits in BITS]
        return sorted(out, key=lambda c: (c[0], c[1], c[2] is None, c[2] or 0))

    def dropped(self, density: float) -> float:
        """The relative squared error of dropping what the density's threshold leaves out:
        a lower bound of its options' error (exact, from the histogram's bins)."""
        cut = self._cuts[density]
        if not cut.threshold or self.energy <= 0:
            return 0.0
        return max(0.0, self.energy - cut.kept_energy) / self.energy

    def option(self, density: float, bits: int | None) -> Option:
        """One option's estimate (from the part of the sample it keeps; cached)."""
        key = (density, bits)
        if key not in self._estimated:
            self._estimated[key] = self._estimate(density, bits)
        return self._estimated[key]

    def all(self) -> list[Option]:
        return [self.option(density, bits) for _, density, bits in self.candidates()]

    def within(self, limit: float, tried: Sequence[Option] = ()) -> Iterator[Option]:
        """Options to try for a relative squared error within ``limit``, cheapest estimate
        first, then exact values of every change (error 0), which always qualifies.

        Options are estimated lazily: in order of their positions' bytes, skipping those
        whose dropped energy alone is over the limit, until no unestimated option could be
        cheaper than the best one found."""
        tried = list(tried)
        while True:
            best = None
            for bound, density, bits in self.candidates():
                if best is not None and bound >= best.nbytes:
                    break
                if self.dropped(density) > limit * 0.95:
                    continue
                if best is not None and bits is not None and \
                        self.quant_nbytes(density, bits) >= best.nbytes:
                    continue  # its bytes are known without its error: it cannot do better
                option = self.option(density, bits)
                if option in tried or option.error > limit * 0.95:
                    continue
                if best is None or option.nbytes < best.nbytes:
                    best = option
            if best is None:
                break
            tried.append(best)
            yield best
        everything = self.option(max(self._cuts), None) if self._cuts else None
        if everything is not None and everything not in tried:
            yield everything

    def quant_nbytes(self, density: float, bits: int) -> float:
        """The estimated bytes of a quantized option, known before its error is: what
        :meth:`option` gives as its ``nbytes``, without the fit on the sample."""
        cut, count = self._cuts[density], self._kept_sample(density)[0].size
        value_bits = (estimated_bits(count, self.stats.dt, bits, self.group) if count
                      else 8.0 * self.stats.dt.itemsize)
        return _option_bytes(cut.kept, self.stats.numel, value_bits)

    def _kept_sample(self, density: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                    float]:
        """:func:`kept_sample` of a density's threshold, made once and shared by its options
        (every bits' estimate reads the same part of the sample)."""
        if density not in self._kept_samples:
            self._kept_samples[density] = kept_sample(
                self._keys, self._finetuned, self._base, self._weights,
                self._cuts[density].threshold)
        return self._kept_samples[density]

    def _estimate(self, density: float, bits: int | None) -> Option:
        cut, stats = self._cuts[density], self.stats
        dropped = self.dropped(density) * self.energy
        finetuned, base, weights, sample_energy = self._kept_sample(density)
        value_bits, ratio = 8.0 * stats.dt.itemsize, 0.0
        if finetuned.size:
            if bits is None:
                payload, _ = codecs.encode_values(finetuned, base, stats.dt)
                value_bits = 8 * len(payload) / finetuned.size
            else:
                error_sq, value_bits = quant_estimate(finetuned, base, stats.dt, bits,
                                                      self.group, weights)
                ratio = error_sq / sample_energy if sample_energy > 0 else 0.0
        kept_energy = self.energy - dropped
        error = (dropped + ratio * kept_energy) / self.energy if self.energy > 0 else 0.0
        return Option(density, bits, cut.kept, _option_bytes(cut.kept, stats.numel, value_bits),
                      min(error, 1.0), cut.threshold)


def kept_sample(keys: np.ndarray, finetuned: np.ndarray, base: np.ndarray,
                weights: np.ndarray | None, threshold: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """The part of a tensor's sample (its ranking ``keys`` and bits) that ``threshold`` keeps
    (0: every change), at most :data:`SAMPLE` of it, evenly spread: ``(fine-tuned bits, base
    bits, weights or None, its energy)``."""
    chosen = (keys_at_least(keys, threshold) if threshold
              else np.flatnonzero(finetuned != base))
    if chosen.size > SAMPLE:
        chosen = chosen[np.linspace(0, chosen.size - 1, SAMPLE).astype(np.int64)]
    sample_keys = keys[chosen].view(np.float32).astype(np.float64)
    finite = sample_keys[np.isfinite(sample_keys)]
    return (finetuned[chosen], base[chosen], None if weights is None else weights[chosen],
            float(np.dot(finite, finite)))


def tensor_options(stats: TensorStats, group: int) -> Profile:
    """Every option of one tensor, estimated (what a size target plans with)."""
    search = OptionSearch(stats, group)
    return Profile(stats.name, search.energy, search.all())


def allocate(profiles: Sequence[Profile], budget: float) -> dict[str, Option]:
    """Per tensor the option minimizing the sum of relative squared errors with the total
    estimated bytes within ``budget``: each tensor takes the option minimizing
    ``error + lam * nbytes`` on its lower convex hull, with ``lam`` the smallest that fits."""
    return fit_hulls({p.name: lower_hull([p.nothing(), *p.options]) for p in profiles}, budget)


def fit_hulls(hulls: Mapping[str, list], budget: float) -> dict:
    """Per tensor the point of its hull (anything with ``nbytes`` and ``error``) minimizing
    ``error + lam * nbytes``, with ``lam`` the smallest whose total fits ``budget``."""
    def pick(lam: float) -> dict:
        return {name: min(hull, key=lambda o: o.error + lam * o.nbytes)
                for name, hull in hulls.items()}

    def total(choice: Mapping) -> float:
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


def lower_hull(options: list) -> list:
    """The lower convex hull of (bytes, error): the options some trade-off prefers."""
    points = sorted(options, key=lambda o: (o.nbytes, o.error))
    hull: list = []
    for option in points:
        if hull and option.error >= hull[-1].error:
            continue  # costs more and is no better
        while len(hull) >= 2 and _turns_up(hull[-2], hull[-1], option):
            hull.pop()
        hull.append(option)
    return hull


def _turns_up(a, b, c) -> bool:
    """Whether b lies on or above the segment from a to c."""
    return (b.error - a.error) * (c.nbytes - a.nbytes) >= (c.error - a.error) * (b.nbytes - a.nbytes)


def _option_bytes(kept: int, numel: int, value_bits: float) -> float:
    """An option's estimated bytes: its kept positions' and values' bits."""
    return kept * (_position_bits(kept, numel) + value_bits) / 8


def _position_bits(kept: int, numel: int) -> float:
    """Bits per kept position near the entropy bound (0 when every element is kept)."""
    if kept >= numel or kept == 0:
        return 0.0
    p = kept / numel
    entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return min(entropy / p * 1.03, 1.0 / p)  # Rice within a few %, a bitmap at most 1/p
