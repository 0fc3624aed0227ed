"""Merge rules: one object each, in one registry (:data:`RULES`).

A rule owns its *reference math*: :meth:`MergeRule.update` takes one
:class:`TaskVector` per delta for one tensor (sorted flat ``positions`` and
``tau`` = wide(fine-tuned) - wide(base) there, in the wide float type; empty for a
delta that leaves the tensor alone, so ``vectors[i]`` is always delta ``i``), the
per-delta ``weights`` and the rule's options, and returns ``(positions, update)``:
the sorted positions the merge changes and the amount added to the base there, in
the wide type.  Positions it does not return keep the base's bits exactly; the
combiner computes ``round(wide(base) + update)`` once per position.

A rule also declares what the engine may do faster: ``elementwise`` rules (the update
at a position depends only on the deltas' entries there) change exactly the union of
the stored positions, can be merged block by block with dense accumulation
(:meth:`MergeRule.block_form`, run by the numpy, C and torch block kernels in
:mod:`.combiners` and :mod:`.device`) and extended one delta at a time
(:func:`~sparsestitch.ops.compose.stitch_add`).  The engine asks the rule, never its name.

The order of the float operations is part of each rule's contract (results depend
on it, and the stitcher, hot-swap and continual composition must agree bit for
bit): weights multiply ``tau`` first, sums run over the deltas in list order, and a
mean divides the finished sum.

Adding a rule is one class here and one entry in :data:`RULES`.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..core import native
from ..core.errors import OptionError
from ..core.options import FINITE, FRACTION, Range, number, short_repr
from ..core.tiebreak import tie_order
from .torch_order import sorted_range_mask, tau_range_mask
from .union import PositionUnion, union_of

#: Every rule option's values and meaning (an option means the same in every rule taking it).
OPTION_LIMITS: dict[str, tuple[Range, str]] = {
    "scale": (FINITE, "the factor lambda of the merged update"),
    "density": (FRACTION, "the fraction of each tensor kept"),
    "drop": (Range(0, 1, below_high=True), "the probability of dropping an entry"),
    "seed": (Range(0, whole=True), "the random seed of the drops"),
    "normalize": (Range(0, 1, whole=True), "1 to divide by the agreeing weights (mergekit's "
                                           "default), 0 not to"),
    "gamma": (FRACTION, "the share of largest magnitudes dropped as outliers"),
    "rescale": (Range(0, 1, whole=True), "1 to rescale the kept values to the task vector's "
                                         "L1 norm (mergekit's rescale), 0 not to"),
    "layers": (Range(1, whole=True), "the base's number of layers, which places a gradient's "
                                     "values on them"),
    "layer_weights": (FINITE, "each delta's weight, a number or a gradient over the layers "
                              "(mergekit's weight gradients), in place of the weights"),
}


@dataclass(frozen=True)
class TaskVector:
    positions: np.ndarray   # sorted, unique int64 flat positions
    tau: np.ndarray         # wide float values at those positions


@dataclass(frozen=True)
class BlockForm:
    """How an elementwise rule turns the weighted sum of task vectors at a position into its
    update: divided by the number of deltas covering it (``mean``), times ``scale``; with
    ``lone_exact``, a position only one delta of weight 1 covers takes that delta's
    fine-tuned bits (no arithmetic, so no rounding)."""

    mean: bool
    scale: float
    lone_exact: bool = False


class MergeRule:
    """The interface every rule implements (see the module docstring)."""

    name: ClassVar[str]
    #: Option names and their defaults.
    defaults: ClassVar[dict[str, float]] = {}
    #: The update at a position depends only on the deltas' entries there.
    elementwise: ClassVar[bool] = False

    def update(self, vectors: Sequence[TaskVector], weights: Sequence[float], name: str = "",
               numel: int | None = None, union: PositionUnion | None = None, **options
               ) -> tuple[np.ndarray, np.ndarray]:
        """The reference math: ``(positions changed, update there)``."""
        raise NotImplementedError

    def block_form(self, options: dict) -> BlockForm:
        """For elementwise rules: the form the block kernels compute."""
        raise TypeError(f"rule {self.name!r} is not elementwise")

    #: Whether :meth:`torch_update` exists (a device merge refuses a rule without it).
    has_torch_update: ClassVar[bool] = False

    def torch_update(self, vectors, weights: Sequence[float], name: str, numel: int | None,
                     union, where, wide_like, **options):
        """:meth:`update` in torch on the vectors' device, the same operations in the same
        order (so the same bits): ``vectors`` are :class:`~.device_rules.DeviceVector`,
        ``union`` and ``where`` their positions' sorted union and each one's indices into
        it (:func:`~.device_rules.union_of`), ``wide_like`` an empty tensor of the wide type
        on the device.  torch is imported here, not with the module (the CLI's commands on
        files never load it)."""
        raise NotImplementedError

    #: Whether :meth:`dense_update` exists: the rule's result from whole task vectors (zero
    #: where a delta stores nothing) equals :meth:`update`'s at every stored position.
    has_dense_update: ClassVar[bool] = False

    def merged_changed(self, kind: int, base, finetuned, weights: Sequence[float],
                       canonical_nan: int, name: str = "", **options):
        """:meth:`dense_update`'s merge straight from the bits by compiled loops (the merged
        tensor's bits, the same as through the dense task vectors), or None where they do
        not apply -- always here."""
        return None

    def dense_update(self, deltas, weights: Sequence[float], name: str = "", **options):
        """The update at every element from ``deltas``, a torch tensor of one dense task
        vector per delta (rows; zeros where it stores nothing): how merge handles full
        fine-tunes without position lists.  Only where ``has_dense_update``."""
        raise NotImplementedError

    def check_options(self, options: dict) -> dict:
        """``options`` with every default spelled out (so recipes of equal merges are equal),
        each checked against :data:`OPTION_LIMITS`; raises an OptionError naming the option."""
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            takes = ", ".join(self.defaults) or "no options"
            raise OptionError(f"rule {self.name!r} takes {takes}, not {', '.join(unknown)}",
                              option=unknown[0])
        return {key: number(key, options.get(key, default), *OPTION_LIMITS[key])
                for key, default in self.defaults.items()}


def _union(vectors: Sequence[TaskVector], union: PositionUnion | None = None
           ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sorted union of all positions, and each vector's indices into it (``union``, when
    given, must be the union of exactly these vectors' positions)."""
    if not vectors:
        return np.empty(0, np.int64), []
    union = union or union_of([v.positions for v in vectors])
    return union.positions, union.where


def _wide(vectors: Sequence[TaskVector]) -> np.dtype:
    return vectors[0].tau.dtype if vectors else np.dtype(np.float32)


def _weighted_sum(vectors, weights, union, where, wide) -> np.ndarray:
    total = np.zeros(union.size, wide)
    for vector, index, weight in zip(vectors, where, weights):
        total[index] += wide.type(weight) * vector.tau
    return total


class LocalizeStitch(MergeRule):
    """Localize-and-Stitch: where deltas overlap, average their (weighted) task vectors.

    ``update = (sum_i m_i w_i tau_i) / (sum_i m_i)`` over the deltas ``i`` whose mask
    ``m_i`` covers the position (the paper's ``sum_i (m_i / sum_j m_j) * tau_i``).  A
    position one delta of weight 1 covers alone takes that fine-tune's bits exactly
    (``base + (fine-tune - base)`` does not always round back; see ``lone_exact``), so
    stitching one delta is restoring it, bit for bit.

    >>> a = TaskVector(np.array([0, 1]), np.array([2.0, 4.0], np.float32))
    >>> b = TaskVector(np.array([1, 2]), np.array([6.0, 8.0], np.float32))
    >>> LocalizeStitch().update([a, b], [1.0, 1.0])[1].tolist()
    [2.0, 5.0, 8.0]
    """

    name = "localize-stitch"
    elementwise = True

    def update(self, vectors, weights, name="", numel=None, union=None, **options):
        union, where = _union(vectors, union)
        wide = _wide(vectors)
        total = _weighted_sum(vectors, weights, union, where, wide)
        covering = np.zeros(union.size, wide)
        for index in where:
            covering[index] += 1
        return union, total / np.maximum(covering, 1)

    has_torch_update = True

    def torch_update(self, vectors, weights, name, numel, union, where, wide_like):
        from . import device_rules as dev
        total = dev.weighted_sum(vectors, weights, union, where, wide_like)
        covering = dev.torch_zeros(union.numel(), wide_like)
        for index in where:
            covering.index_add_(0, index, covering.new_ones(index.numel()))
        return union, total / covering.clamp(min=1)

    def block_form(self, options: dict) -> BlockForm:
        return BlockForm(mean=True, scale=1.0, lone_exact=True)


class TaskArithmetic(MergeRule):
    """Task arithmetic: ``update = scale * (sum_i w_i tau_i)``.

    >>> a = TaskVector(np.array([0, 1]), np.array([2.0, 4.0], np.float32))
    >>> TaskArithmetic().update([a, a], [1.0, 1.0], scale=0.5)[1].tolist()
    [2.0, 4.0]
    """

    name = "task-arithmetic"
    defaults = {"scale": 1.0}
    elementwise = True

    def update(self, vectors, weights, name="", numel=None, union=None, scale=1.0):
        union, where = _union(vectors, union)
        wide = _wide(vectors)
        return union, wide.type(scale) * _weighted_sum(vectors, weights, union, where, wide)

    has_torch_update = True

    def torch_update(self, vectors, weights, name, numel, union, where, wide_like, scale=1.0):
        from . import device_rules as dev
        return union, dev.scalar(scale, wide_like) * dev.weighted_sum(vectors, weights, union,
                                                                      where, wide_like)

    def block_form(self, options: dict) -> BlockForm:
        return BlockForm(mean=False, scale=float(options["scale"]))


class Ties(MergeRule):
    """TIES-merging: trim each weighted task vector ``w_i tau_i`` to its
    ``round(density * numel)`` largest magnitudes in this tensor (equal magnitudes: larger
    :func:`~sparsestitch.core.tiebreak.tie_order` first, then lower position), elect a sign per
    position from the sum of the trimmed
    vectors, then average the nonzero entries that agree with it (disjoint mean):
    ``update = scale * (agreeing sum / agreeing count)``.  Positions where nothing
    agrees keep the base.

    >>> a = TaskVector(np.array([0, 1]), np.array([2.0, -4.0], np.float32))
    >>> b = TaskVector(np.array([0, 1]), np.array([-1.0, -2.0], np.float32))
    >>> Ties().update([a, b], [1.0, 1.0], numel=2, density=1.0)[1].tolist()
    [2.0, -3.0]
    """

    name = "ties"
    defaults = {"density": 0.2, "scale": 1.0}

    def update(self, vectors, weights, name="", numel=None, union=None, density=0.2, scale=1.0):
        wide = _wide(vectors)
        trimmed = []
        for vector, weight in zip(vectors, weights):
            limit = vector.tau.size if numel is None else int(np.floor(density * numel + 0.5))
            tau = wide.type(weight) * vector.tau
            if limit < tau.size:
                keep = top_magnitudes(tau, vector.positions, limit, name)
                trimmed.append(TaskVector(vector.positions[keep], tau[keep]))
            else:
                trimmed.append(TaskVector(vector.positions, tau))
        union, where = _union(trimmed)
        summed = np.zeros(union.size, wide)
        for vector, index in zip(trimmed, where):
            summed[index] += vector.tau
        elected = np.sign(summed)
        agreeing_total = np.zeros(union.size, wide)
        agreeing = np.zeros(union.size, wide)
        for vector, index in zip(trimmed, where):
            agree = (np.sign(vector.tau) == elected[index]) & (vector.tau != 0)
            agreeing_total[index[agree]] += vector.tau[agree]
            agreeing[index[agree]] += 1
        touched = agreeing > 0
        return union[touched], wide.type(scale) * (agreeing_total[touched] / agreeing[touched])


    has_torch_update = True

    def torch_update(self, vectors, weights, name, numel, union, where, wide_like, density=0.2,
                     scale=1.0):
        """Each trimmed vector ranked by magnitude, then tie order, then position, with two
        stable sorts on integer keys (:func:`~.device_rules.strongest`)."""
        from . import device_rules as dev
        trimmed = []
        for vector, weight in zip(vectors, weights):
            limit = vector.tau.numel() if numel is None else int(np.floor(density * numel + 0.5))
            tau = dev.scalar(weight, wide_like) * vector.tau
            if limit < tau.numel():
                keep = dev.strongest(tau, dev.tie_order(name, vector.positions), limit)
                trimmed.append(dev.DeviceVector(vector.positions[keep], tau[keep]))
            else:
                trimmed.append(dev.DeviceVector(vector.positions, tau))
        union, where, _ = dev.union_of([v.positions for v in trimmed])
        summed = dev.torch_zeros(union.numel(), wide_like)
        for vector, index in zip(trimmed, where):
            summed.index_add_(0, index, vector.tau)
        elected = dev.sign(summed)
        agreeing_total = dev.torch_zeros(union.numel(), wide_like)
        agreeing = dev.torch_zeros(union.numel(), wide_like)
        for vector, index in zip(trimmed, where):
            agree = (dev.sign(vector.tau) == elected[index]) & (vector.tau != 0)
            agreeing_total.index_add_(0, index[agree], vector.tau[agree])
            agreeing.index_add_(0, index[agree], agreeing.new_ones(int(agree.sum())))
        touched = agreeing > 0
        return union[touched], dev.scalar(scale, wide_like) * (agreeing_total[touched] /
                                                               agreeing[touched])

def top_magnitudes(tau: np.ndarray, positions: np.ndarray, limit: int, name: str) -> np.ndarray:
    """Sorted indices of the ``limit`` entries of largest ``|tau|``, ties at the threshold
    broken by :func:`~sparsestitch.core.tiebreak.tie_order` (higher first), then lower position;
    NaN ranks below every number.  The same set as the first ``limit`` of
    ``np.lexsort((positions, -tie_order, -|tau|))``, found by selection (``np.partition``,
    linear time) with the tie hash computed only at the threshold.
    """
    if limit <= 0:
        return np.empty(0, np.int64)
    ranked = -np.abs(tau)                       # ascending: largest magnitude first
    threshold = np.partition(ranked, limit - 1)[limit - 1]
    if np.isnan(threshold):                     # every number is kept, and some NaNs
        sure, tied = ~np.isnan(ranked), np.flatnonzero(np.isnan(ranked))
    else:
        sure, tied = ranked < threshold, np.flatnonzero(ranked == threshold)
    sure = np.flatnonzero(sure)
    need = limit - sure.size
    if need < tied.size:
        ties = tie_order(name, positions[tied]).astype(np.int64)
        tied = tied[np.lexsort((positions[tied], -ties))[:need]]
    return np.sort(np.concatenate([sure, tied]))


class TiesMergekit(Ties):
    """TIES with mergekit's conventions, to reproduce a mergekit merge (``merge_method: ties``
    with ``dtype: float32``) bit for bit.  Where it differs from :class:`Ties`:

    * each delta's *unweighted* task vector is trimmed to its ``int(density * numel)``
      largest magnitudes (rounding down), ranked by ``torch.argsort(descending=True)`` over
      the whole tensor, whose order among equal magnitudes is torch's (its ``std::sort``'s:
      the kept set is found by :func:`~.torch_order.sorted_range_mask` without the sort);
    * the elected sign is that of the sum of the weighted, trimmed vectors, with a zero sum
      electing ``+`` (``Ties`` elects nothing there);
    * the agreeing entries' weighted sum is divided by the sum of their *weights*, not their
      count (``Ties``'s disjoint mean), then multiplied by ``scale`` (mergekit's ``lambda``);
      with ``normalize=0`` (mergekit's ``normalize: false``) it is not divided.

    It runs mergekit's own torch operations (:func:`mergekit_dense`) on dense copies of each
    tensor's task vectors, one per delta (as mergekit holds them).  Positions no delta stores
    keep the base's bits; mergekit writes ``base + 0`` there, which turns a -0.0 into +0.0
    (store every position, ``density=1.0``, to have those too).  The other rules of mergekit's
    generalized task arithmetic are subclasses that change the sparsification
    (:attr:`sparsify`) and the sign election (:attr:`consensus`).
    """

    name = "ties-mergekit"
    defaults = {"density": 0.2, "scale": 1.0, "normalize": 1}
    #: How each task vector is sparsified: ``magnitude`` (mergekit's ``magnitude``),
    #: ``random`` (``random``: DARE), ``outliers`` (``magnitude_outliers``: breadcrumbs).
    sparsify: ClassVar[str] = "magnitude"
    #: Whether signs are elected (mergekit's ``consensus_method: sum``).
    consensus: ClassVar[bool] = True

    #: Options that may give one value per delta (mergekit's per-model parameters).
    per_delta: ClassVar[tuple[str, ...]] = ("density", "gamma", "layer_weights")

    def check_options(self, options: dict) -> dict:
        """As :meth:`MergeRule.check_options`, where ``density``, ``gamma`` and
        ``layer_weights`` may also be a list of one value per delta (a tuple then), each value
        a number, a *gradient* (a list of numbers spread over the base's layers as mergekit
        spreads them, :func:`gradient_at`, which needs ``layers``, the base's number of
        layers) or mergekit's per-tensor *filters* (a list of ``{"filter": TEXT, "value":
        number or gradient}``: the first whose text is in the tensor's name, or that has
        none, gives the value)."""
        lists = {key: options[key] for key in self.per_delta
                 if isinstance(options.get(key), (list, tuple))}
        layers = options.get("layers")
        rest = {k: v for k, v in options.items() if k not in lists and k != "layers"}
        checked = super().check_options(rest)
        for key, values in lists.items():
            if not values:
                raise OptionError(f"{key}: an empty list (one value per delta)", option=key)
            checked[key] = tuple(_delta_value(key, value) for value in values)
        gradients = any(_has_gradient(v) for key in lists for v in checked[key])
        if gradients and layers is None:
            raise OptionError("a gradient (a list of values over the layers) needs layers, the "
                              "base's number of layers", option="layers")
        if layers is not None:
            checked["layers"] = number("layers", layers, *OPTION_LIMITS["layers"])
        return checked

    def steps(self, name: str, options: dict) -> "MergekitSteps":
        """The steps of this rule with these (checked) options for tensor ``name``."""
        return MergekitSteps(self.sparsify, self.consensus, name=name, **options)

    def update(self, vectors, weights, name="", numel=None, union=None, **options):
        import torch

        union, _ = _union(vectors)
        if not union.size:
            return union, np.empty(0, _wide(vectors))
        size = int(union[-1]) + 1 if numel is None else numel
        mixed = mergekit_merge([torch.from_numpy(v.positions) for v in vectors],
                               [torch.from_numpy(v.tau) for v in vectors], weights, size,
                               self.steps(name, options))
        return union, mixed[torch.from_numpy(union)].numpy()

    def torch_update(self, vectors, weights, name, numel, union, where, wide_like, **options):
        """The same torch code as :meth:`update`, on the vectors' device (sorts and draws on
        the CPU wherever they are: the order torch gives equal magnitudes is the CPU
        build's)."""
        if not union.numel():
            return union, wide_like.new_empty(0)
        size = int(union[-1]) + 1 if numel is None else numel
        mixed = mergekit_merge([v.positions for v in vectors], [v.tau for v in vectors], weights,
                               size, self.steps(name, options))
        return union, mixed[union]

    has_dense_update = True

    def dense_update(self, deltas, weights, name="", **options):
        """mergekit's operations on ``deltas`` (sparsified in place)."""
        return mergekit_dense(deltas, weights, self.steps(name, options))

    def merged_changed(self, kind, base, finetuned, weights, canonical_nan, name="",
                       **options):
        return mergekit_merged_changed(kind, base, finetuned, weights, canonical_nan,
                                       self.steps(name, options))


class DareTiesMergekit(TiesMergekit):
    """mergekit's ``dare_ties``: each task vector keeps each element with probability
    ``density`` (DARE), rescaled (``rescale=1``, mergekit's default) to its L1 norm before
    the drops, then TIES' sign election and mixing (not normalized by default).  The draws
    are sparsestitch's, seeded: delta ``i``'s element ``j`` of tensor ``name`` is kept when
    ``numpy.random.default_rng([seed, i, zlib.crc32(name.encode())]).random(numel)[j] <
    density`` -- mergekit draws with ``torch.bernoulli`` unseeded, so no two runs (of either
    tool) agree bit for bit; the distribution is the same."""

    name = "dare-ties-mergekit"
    defaults = {"density": 1.0, "scale": 1.0, "normalize": 0, "rescale": 1, "seed": 0}
    sparsify = "random"


class DareLinearMergekit(DareTiesMergekit):
    """mergekit's ``dare_linear``: DARE's seeded drops (as :class:`DareTiesMergekit`) and a
    weighted sum, no sign election."""

    name = "dare-linear-mergekit"
    consensus = False


class BreadcrumbsTiesMergekit(TiesMergekit):
    """mergekit's ``breadcrumbs_ties``: each task vector drops its ``gamma`` share of largest
    magnitudes (outliers) and then its smallest, keeping ``density`` of the tensor (mergekit's
    ``magnitude_outliers``, with its slicing: where ``int(gamma * numel)`` is 0 -- tensors
    under ``1 / gamma`` elements -- it keeps nothing of that tensor, as mergekit does), then
    TIES' sign election and mixing."""

    name = "breadcrumbs-ties-mergekit"
    defaults = {"density": 1.0, "gamma": 0.01, "scale": 1.0, "normalize": 0, "rescale": 0}
    sparsify = "outliers"


class BreadcrumbsMergekit(BreadcrumbsTiesMergekit):
    """mergekit's ``breadcrumbs``: the outlier and small-magnitude trimming of
    :class:`BreadcrumbsTiesMergekit` and a weighted sum, no sign election."""

    name = "breadcrumbs-mergekit"
    consensus = False


@dataclass(frozen=True)
class MergekitSteps:
    """One rule of mergekit's generalized task arithmetic (mergekit's
    ``GeneralizedTaskArithmeticMerge``): how to sparsify, whether to elect signs, and the
    options (``normalize`` and ``rescale`` as 0 or 1)."""

    sparsify: str | None
    consensus: bool
    density: float | tuple[float, ...] = 1.0   # a tuple: one per delta
    gamma: float | tuple[float, ...] = 0.01
    rescale: int = 0
    normalize: int = 1
    scale: float = 1.0
    seed: int = 0
    name: str = ""

    layers: int = 0   # the base's number of layers, for gradients
    layer_weights: tuple | None = None   # per delta, in place of the weights

    def weights_at(self, weights: Sequence[float]) -> Sequence[float]:
        """The weights of this tensor: ``layer_weights`` at its layer where given."""
        if self.layer_weights is None:
            return weights
        return [self._value(self.layer_weights, i) for i in range(len(weights))]

    def density_of(self, delta: int) -> float:
        return self._value(self.density, delta)

    def gamma_of(self, delta: int) -> float:
        return self._value(self.gamma, delta)

    def _value(self, value, delta: int) -> float:
        if isinstance(value, tuple):
            value = value[delta]
        if isinstance(value, tuple) and value and isinstance(value[0], tuple):  # filters
            value = next((v for pattern, v in value if pattern is None or pattern == "*"
                          or (self.name and pattern in self.name)), None)
            if value is None:
                raise OptionError(f"no filter gives tensor {self.name!r} a value (add one "
                                  f"without a filter)", option="filter")
        return gradient_at(value, layer_fraction(self.name, self.layers)) \
            if isinstance(value, tuple) else value


#: A layer's index in a tensor name (``model.layers.7.``, ``transformer.h.7.``, ...).
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def layer_fraction(name: str, layers: int) -> float:
    """Where tensor ``name`` sits among ``layers`` layers, as mergekit's planner places it for
    a gradient: layer ``i`` at ``i / (layers - 1)`` (1 for a single layer), every tensor
    outside the layers (embeddings, final norm, head) at 0.

    >>> layer_fraction("model.layers.3.mlp.up_proj.weight", 7), layer_fraction("lm_head.weight", 7)
    (0.5, 0.0)
    """
    found = LAYER_INDEX.search(name)
    if found is None or layers < 1:
        return 0.0
    return int(found.group(1)) / (layers - 1) if layers > 1 else 1.0


def gradient_at(anchors: Sequence[float], t: float) -> float:
    """A gradient's value at ``t`` in [0, 1], in mergekit's arithmetic (its
    ``evaluate_setting``): the anchors spread evenly from 0 to 1, linear in between.

    >>> gradient_at((0.1, 0.5, 0.9), 0.25), gradient_at((0.1, 0.5, 0.9), 1.0)
    (0.3, 0.9)
    """
    scaled = t * (len(anchors) - 1)
    low = int(scaled)
    high = min(len(anchors) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * anchors[low] + frac * anchors[high]


def _value_or_gradient(key: str, value) -> float | tuple[float, ...]:
    """One delta's value of option ``key``: a number, or a gradient (a non-empty list of them),
    each checked against :data:`OPTION_LIMITS`."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise OptionError(f"{key}: an empty gradient", option=key)
        return tuple(number(key, v, *OPTION_LIMITS[key]) for v in value)
    return number(key, value, *OPTION_LIMITS[key])


def _delta_value(key: str, value):
    """One delta's value of option ``key``: a number or gradient, or per-tensor filters (a
    list of ``{"filter", "value"}`` mappings, as a tuple of ``(filter or None, value)``)."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (dict, tuple))
                                                           for v in value):
        conditions = []
        for condition in value:
            if isinstance(condition, tuple):  # already checked (a recipe read back)
                condition = {"filter": condition[0], "value": condition[1]}
            pattern, unknown = condition.get("filter"), set(condition) - {"filter", "value"}
            if unknown or "value" not in condition or not (pattern is None or
                                                           isinstance(pattern, str)):
                raise OptionError(f"{key}: a filter is {{filter: TEXT, value: VALUE}}, got "
                                  f"{short_repr(condition)}", option=key)
            conditions.append((pattern, _value_or_gradient(key, condition["value"])))
        return tuple(conditions)
    return _value_or_gradient(key, value)


def _has_gradient(value) -> bool:
    """Whether a checked delta value has a gradient (directly or in a filter)."""
    if not isinstance(value, tuple) or not value:
        return False
    if isinstance(value[0], tuple):
        return any(isinstance(v, tuple) for _, v in value)
    return True


def mergekit_merge(positions: Sequence, taus: Sequence, weights: Sequence[float], size: int,
                   steps: MergekitSteps):
    """mergekit's merge on torch tensors (each delta's int64 positions and wide task vector,
    on any one device): the dense merged update over ``size`` elements.  Sorts and draws run
    on the CPU, so they are the same on every device."""
    import torch

    device, wide = taus[0].device, taus[0].dtype
    deltas = torch.zeros((len(taus), size), dtype=wide, device=device)
    for row, where, tau in zip(deltas, positions, taus):
        row[where] = tau
    return mergekit_dense(deltas, weights, steps)


def mergekit_dense(deltas, weights: Sequence[float], steps: MergekitSteps):
    """:func:`mergekit_merge` on dense task vectors (one row per delta, zero where a delta
    stores nothing; sparsified in place): mergekit's ``sparsify``, then its weights, sign
    consensus (``sum``) and mixing, in its order of operations."""
    import torch

    device, wide = deltas.device, deltas.dtype
    weights = steps.weights_at(weights)
    if steps.sparsify:
        for i in range(deltas.shape[0]):
            if steps.density_of(i) < 1:  # mergekit's sparsify leaves it as it is
                deltas[i] = _mergekit_sparsified(deltas[i], i, steps)
    weight = torch.tensor(list(weights), dtype=wide, device=device).unsqueeze(-1)
    mixed = _mixed_natively(deltas, weights, weight, steps)
    return mixed if mixed is not None else _mixed_by_torch(deltas, weight, steps)


def _mixed_by_torch(deltas, weight, steps: MergekitSteps):
    """mergekit's weights, sign election (``sum``), mixing, normalization and scale, its
    torch operations as it writes them (``weight``: one per row, a column)."""
    wide = deltas.dtype
    weighted = deltas * weight
    if steps.consensus:  # mergekit.merge_methods.generalized_task_arithmetic.get_mask("sum")
        majority = (weighted.sum(dim=0) >= 0).to(wide) * 2 - 1
        agree = weighted.sign() == majority
        mixed = (weighted * agree).sum(dim=0)
        divisor = (weight * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = weight.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if steps.normalize:
        mixed /= divisor
    if steps.scale != 1:
        mixed *= steps.scale
    return mixed


#: The most task vectors :func:`_mixed_natively` mixes: torch sums up to 4 rows in their order
#: from +0.0 (checked bit for bit in tests/test_rules.py), more in another order.
NATIVE_MIX_ROWS = 4


def _mixed_natively(deltas, weights: Sequence[float], weight, steps: MergekitSteps):
    """The rest of :func:`mergekit_dense` after sparsification -- weights, sign election,
    mixing, normalization, scale -- in one pass of the compiled loop (``gta_mix``), with the
    bits of mergekit's torch operations; None where it does not apply (no compiled loops, a
    device, another dtype, more than :data:`NATIVE_MIX_ROWS` task vectors).  mergekit's
    operations make nine passes over the task vectors with a temporary each."""
    import torch

    kernels = native.kernels()
    if (kernels is None or deltas.device.type != "cpu" or not deltas.is_contiguous()
            or deltas.dtype not in (torch.float32, torch.float64)
            or not 1 <= deltas.shape[0] <= NATIVE_MIX_ROWS):
        return None
    divisor = _plain_divisor(weights, deltas.dtype, steps)
    mixed = torch.empty(deltas.shape[1], dtype=deltas.dtype)
    kernels.gta_mix(deltas.numpy(), deltas.shape[0], np.asarray(weights, np.float64),
                    steps.consensus, bool(steps.normalize), divisor, float(steps.scale),
                    mixed.numpy())
    return mixed


def _mergekit_sparsified(tensor, index: int, steps: MergekitSteps):
    """One task vector sparsified as mergekit's ``sparsify`` does (``magnitude``,
    ``magnitude_outliers``; ``random`` with sparsestitch's seeded draws), rescaled to its L1
    norm before where ``rescale`` (mergekit's ``rescaled_masked_tensor``)."""
    import torch

    magnitudes = None if steps.sparsify == "random" else tensor.abs().float().cpu()
    kept = _kept(lambda lo, hi, descending: sorted_range_mask(magnitudes, lo, hi, descending),
                 tensor.numel(), index, steps)
    # mergekit's mask: ones where kept, zeros elsewhere, in the tensor's dtype (multiplied, so
    # a dropped -x gives -0.0 and a dropped infinity NaN, as in mergekit)
    mask = kept.to(device=tensor.device, dtype=tensor.dtype)
    masked = tensor * mask
    if not steps.rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


#: Fine-tunes trimmed at once by :func:`mergekit_merged_changed` (this machine class has 2
#: cores; each trim holds 9-13 bytes an element of its tensor while it runs).
TRIM_THREADS = 2

#: Elements drawn at a time for DARE's drops (the same stream as one draw of all of them).
DRAW_CHUNK = 1 << 20


def _kept(ranked, size: int, index: int, steps: MergekitSteps):
    """Which elements task vector ``index`` keeps (a bool CPU tensor): the ``int(density *
    size)`` largest magnitudes as torch's sort ranks them (``magnitude``), the slice of its
    ascending order ``magnitude_outliers`` keeps, or the seeded draws (``random``).
    ``ranked(lo, hi, descending)`` marks positions ``lo`` to ``hi - 1`` of torch's sort of
    the float32 ``|tau|`` (:func:`~.torch_order.sorted_range_mask`)."""
    import torch

    density = steps.density_of(index)
    if steps.sparsify == "magnitude":  # mergekit.sparsify.magnitude
        return ranked(0, int(density * size), True)
    if steps.sparsify == "random":
        rng = np.random.default_rng([steps.seed, index, zlib.crc32(steps.name.encode("utf-8"))])
        kept = np.empty(size, bool)
        for start in range(0, size, DRAW_CHUNK):
            stop = min(size, start + DRAW_CHUNK)
            np.less(rng.random(stop - start), density, out=kept[start:stop])
        return torch.from_numpy(kept)
    # mergekit.sparsify.magnitude_outliers
    target, top = int(density * size), int(steps.gamma_of(index) * size)
    bottom = size - target - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    end = size - top if top else 0  # mergekit's slice [bottom:-top]: empty if top is 0
    return ranked(bottom, end, False)


def mergekit_merged_changed(kind: int, base: np.ndarray, finetuned: Sequence[np.ndarray],
                            weights: Sequence[float], canonical_nan: int,
                            steps: MergekitSteps) -> np.ndarray | None:
    """merge's dense form of mergekit's rules (whole fine-tunes' bits, every changed element
    stored) without dense task vectors: each fine-tune's trim as a byte mask and its L1
    rescale factor, :data:`TRIM_THREADS` fine-tunes at a time (ranked from the bits; ``|tau|``
    in float32 only for the rescale's sums), then the compiled ``gta_merge_changed`` over
    the bits; the merged tensor's bits, the same as :func:`mergekit_dense` gives.  None
    where it does not apply: no compiled loops, a dtype computed in float64, more than
    :data:`NATIVE_MIX_ROWS` fine-tunes."""
    import torch

    kernels = native.kernels()
    if (kernels is None or kind not in native.FLOAT32_WIDE_KINDS
            or not 1 <= len(finetuned) <= NATIVE_MIX_ROWS):
        return None
    weights = steps.weights_at(weights)
    size = base.size

    def trim(i: int) -> tuple:
        kept, factor = np.ones(size, np.uint8), 1.0
        if steps.sparsify and steps.density_of(i) < 1:  # mergekit's sparsify, else as it is
            magnitudes = None
            if steps.rescale:  # its L1 sums need |tau| whole
                magnitudes = torch.empty(size, dtype=torch.float32)
                kernels.abs_tau(kind, finetuned[i], base, magnitudes.numpy())

            def ranked(lo: int, hi: int, descending: bool):
                return (tau_range_mask(kind, finetuned[i], base, lo, hi, descending)
                        if magnitudes is None else
                        sorted_range_mask(magnitudes, lo, hi, descending))
            mask = _kept(ranked, size, i, steps)
            if magnitudes is not None:  # |tau * mask| is |tau| * mask: mergekit's tensors' sums
                before = magnitudes.sum()
                after = magnitudes.mul_(mask).sum()
                if not (before < 1e-7 or after < 1e-7):
                    factor = float(before / after)
            kept = mask.numpy().view(np.uint8)
        return finetuned[i], float(weights[i]), kept, factor

    # The fine-tunes' trims side by side (the selection, the draws and torch's sums release
    # the GIL): one holds 9-13 bytes an element while it runs.
    with ThreadPoolExecutor(max_workers=min(TRIM_THREADS, len(finetuned))) as pool:
        tunes = list(pool.map(trim, range(len(finetuned))))
    merged = base.copy()
    kernels.gta_merge_changed(kind, merged, tunes, steps.consensus, bool(steps.normalize),
                              _plain_divisor(weights, torch.float32, steps),
                              float(steps.scale), canonical_nan)
    return merged


def _plain_divisor(weights: Sequence[float], wide, steps: MergekitSteps) -> float:
    """The divisor of a rule without sign election (one for every element): the weights'
    sum, as mergekit's torch computes it, 1 where it is under 1e-8 in magnitude; 1 (unused)
    with election."""
    import torch

    if steps.consensus:
        return 1.0
    summed = torch.tensor(list(weights), dtype=wide).unsqueeze(-1).sum(dim=0)
    summed[summed.abs() < 1e-8] = 1
    return float(summed[0])


class Dare(MergeRule):
    """DARE: drop each stored entry with probability ``drop``, divide the survivors'
    ``tau`` by ``1 - drop``, then task arithmetic with ``scale``.

    The draws are part of the contract: delta ``i``'s ``j``-th stored entry of tensor
    ``name`` (in position order) survives when the ``j``-th value of
    ``numpy.random.default_rng([seed, i, zlib.crc32(name.encode())]).random(count)``
    is ``>= drop``.  A result therefore depends only on the seed, the delta's place in
    the list and its record -- not on row blocks, devices or the other deltas.

    >>> a = TaskVector(np.arange(4), np.ones(4, np.float32))
    >>> Dare().update([a], [1.0], "w", drop=0.0)[1].tolist()
    [1.0, 1.0, 1.0, 1.0]
    """

    name = "dare"
    defaults = {"drop": 0.9, "seed": 0, "scale": 1.0}

    def update(self, vectors, weights, name="", numel=None, union=None, drop=0.9, seed=0,
               scale=1.0):
        wide = _wide(vectors)
        survivors = []
        for i, vector in enumerate(vectors):
            rng = np.random.default_rng([seed, i, zlib.crc32(name.encode("utf-8"))])
            keep = rng.random(vector.tau.size) >= drop
            survivors.append(TaskVector(vector.positions[keep],
                                        vector.tau[keep] / wide.type(1.0 - drop)))
        return TaskArithmetic().update(survivors, weights, name, numel, scale=scale)

    has_torch_update = True

    def torch_update(self, vectors, weights, name, numel, union, where, wide_like, drop=0.9,
                     seed=0, scale=1.0):
        """The draws on the host with numpy (the contract's generator); only the keep masks
        travel to the device."""
        import torch

        from . import device_rules as dev
        survivors = []
        for i, vector in enumerate(vectors):
            rng = np.random.default_rng([seed, i, zlib.crc32(name.encode("utf-8"))])
            keep = torch.from_numpy(rng.random(vector.tau.numel()) >= drop).to(wide_like.device)
            survivors.append(dev.DeviceVector(vector.positions[keep],
                                              vector.tau[keep] / dev.scalar(1.0 - drop, wide_like)))
        union, where, _ = dev.union_of([v.positions for v in survivors])
        return TaskArithmetic().torch_update(survivors, weights, name, numel, union, where,
                                             wide_like, scale=scale)


#: Every merge rule by name.
RULES: dict[str, MergeRule] = {rule.name: rule for rule in
                               (LocalizeStitch(), TaskArithmetic(), Ties(), TiesMergekit(),
                                Dare(), DareTiesMergekit(), DareLinearMergekit(),
                                BreadcrumbsMergekit(), BreadcrumbsTiesMergekit())}


def get_rule(name: str) -> MergeRule:
    """The rule called ``name``; a ValueError lists the known ones.

    >>> get_rule("ties").defaults
    {'density': 0.2, 'scale': 1.0}
    """
    try:
        return RULES[name]
    except (KeyError, TypeError):
        raise OptionError(f"unknown rule {short_repr(name)}; choose from {', '.join(RULES)}",
                          option="rule") from None
