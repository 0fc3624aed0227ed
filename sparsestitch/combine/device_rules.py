"""Merge rules in torch, on whatever device the tensors are: the plumbing around each rule's
torch form (:meth:`~.rules.MergeRule.torch_update`, beside its reference math in
:mod:`.rules`).

:func:`combine_on_device` is :meth:`~.combiners.RuleCombiner.combine` with every step on the
device -- the union of positions (``torch.unique``), the task vectors, the rule's update,
the rounding to the model dtype, canonical NaNs and lone-exact bits -- so the engine's
device combiner, hot-swap and :func:`sparsestitch.live.stitch_into` run any rule there.
Each rule's operations, and their order, are those of its reference math, so the bits are
identical to the numpy path's (``tests/test_device.py`` checks it on torch's CPU device for
every rule and float dtype, NaN, inf and -0.0 included):

* sums run in delta order with one ``index_add_`` per delta; a delta's positions are unique,
  so each element meets one addition per call, exactly the numpy ``a[index] += v``;
* TIES ranks each trimmed vector by magnitude, then :func:`~sparsestitch.core.tiebreak.tie_order`
  (ported below: the same splitmix64 in wrapping int64 arithmetic), then position, with
  two stable sorts on integer keys -- ``torch.sort`` on floats places NaN and orders equal
  keys in its own way, integer keys leave nothing to the implementation;
* ``torch.sign`` maps NaN to 0 where numpy gives NaN (which agrees with nothing), so the
  sign election uses :func:`sign`;
* DARE's draws come from numpy's ``default_rng`` on the host (the rule's contract names that
  generator); only the keep masks travel to the device;
* TIES in mergekit's conventions is the reference's own torch code
  (:func:`~.rules.mergekit_merge`) run on the device, with its ``argsort`` on the CPU wherever
  the tensors are, since the order torch gives equal magnitudes is the CPU build's (so the
  CPU-device check of this rule tests the plumbing, not a second implementation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..core.dtypes import DType
from ..core.errors import TensorMismatchError
from ..core.tiebreak import name_seed
from ..core.torch_bits import from_wide, signed_container, signed_value, to_wide, wide_type
from .combiners import CANONICAL_NAN, RuleCombiner

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


@dataclass(frozen=True)
class DeviceStored:
    """One delta's decoded entries of one tensor, on a device (the twin of
    :class:`~sparsestitch.engine.walk.Stored`): sorted int64 flat positions and the fine-tuned and
    base bits there (signed bit containers)."""

    positions: object
    finetuned: object
    base: object


@dataclass(frozen=True)
class DeviceVector:
    """A task vector on a device: sorted int64 positions and wide float values."""

    positions: object
    tau: object


def _signed64(value: int) -> int:
    return signed_value(value & (2**64 - 1), 8)


def _logical_shift(z, bits: int):
    """``z >> bits`` of int64 ``z`` read as uint64 (torch shifts int64 arithmetically)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def tie_order(name: str, positions):
    """:func:`sparsestitch.core.tiebreak.tie_order` in torch: int64 keys in ``[0, 2**32)``.  int64
    addition and multiplication wrap like uint64, so the hash is the same."""
    z = positions + _signed64(name_seed(name))
    z = z * _signed64(_GOLDEN)
    z = z ^ _logical_shift(z, 30)
    z = z * _signed64(_MIX1)
    z = z ^ _logical_shift(z, 27)
    z = z * _signed64(_MIX2)
    z = z ^ _logical_shift(z, 31)
    return _logical_shift(z, 32)


def sign(values):
    """``numpy.sign``: -1, 0 or 1, and NaN for NaN (``torch.sign`` gives 0 there)."""
    import torch

    return torch.where(values > 0, 1.0, torch.where(values < 0, -1.0, values)).to(values.dtype)


def scalar(value: float, like):
    """``value`` in ``like``'s float type on its device (numpy's ``wide.type(value)``)."""
    import torch

    return torch.tensor(value, dtype=like.dtype, device=like.device)


def union_of(positions: Sequence):
    """Sorted union of sorted int64 position tensors, each input's indices into it, and where
    each union position first occurs in the inputs' concatenation.  One stable sort of the
    concatenation (as :func:`~.union.sorted_union`); ``torch.unique`` is several times
    slower on the CPU device and sorts anyway on CUDA."""
    import torch

    merged = torch.cat(list(positions))
    order = torch.sort(merged, stable=True).indices
    ordered = merged[order]
    first_of_run = torch.ones(merged.numel(), dtype=torch.bool, device=merged.device)
    first_of_run[1:] = ordered[1:] != ordered[:-1]
    slot = torch.empty_like(order)
    slot[order] = torch.cumsum(first_of_run, 0) - 1
    where = list(torch.split(slot, [int(p.numel()) for p in positions]))
    return ordered[first_of_run], where, order[first_of_run]


def weighted_sum(vectors, weights, union, where, wide_like):
    total = torch_zeros(union.numel(), wide_like)
    for vector, index, weight in zip(vectors, where, weights):
        total.index_add_(0, index, scalar(weight, wide_like) * vector.tau)
    return total


def torch_zeros(size: int, like):
    import torch

    return torch.zeros(size, dtype=like.dtype, device=like.device)


def strongest(tau, ties, limit: int):
    """Sorted indices of the ``limit`` entries ranked first by the TIES order: larger
    magnitude (NaN last), then larger tie key, then lower index (``numpy.lexsort``'s)."""
    import torch

    magnitude = tau.abs()
    key = magnitude.view(torch.int32 if tau.dtype == torch.float32 else torch.int64).long()
    # Non-negative floats order as their bits; numpy sorts a NaN after every number.
    key = torch.where(torch.isnan(magnitude), -1, key)
    order = torch.sort(-ties, stable=True).indices
    order = order[torch.sort(-key[order], stable=True).indices]
    return torch.sort(order[:limit]).values


def combine_on_device(combiner: RuleCombiner, name: str, dt: DType, numel: int,
                      stored: Sequence[DeviceStored | None], onto=None):
    """:meth:`~.combiners.RuleCombiner.combine` with every step on the records' device:
    ``(sorted int64 positions, new bits there)`` as device tensors (signed bit containers).
    ``onto`` (device bits at the union of the stored positions) is what the update is added
    to instead of the base bits, as in hot-swap's stacked patches."""
    import torch

    present = [s for s in stored if s is not None]
    if not present:
        return (torch.empty(0, dtype=torch.int64),
                torch.empty(0, dtype=signed_container(dt.itemsize)))
    device = present[0].positions.device
    nothing = torch.empty(0, dtype=torch.int64, device=device)
    arrays = [nothing if s is None else s.positions for s in stored]
    union, where, first = union_of(arrays)
    if not dt.is_float:
        return union, _agreed_bits(name, stored, where, first)
    start = torch.cat([s.base for s in present])[first] if onto is None else onto
    wide_like = torch.empty(0, dtype=wide_type(dt), device=device)
    vectors = [DeviceVector(nothing, wide_like) if s is None else
               DeviceVector(s.positions, to_wide(s.finetuned, dt) - to_wide(s.base, dt))
               for s in stored]
    positions, update = combiner.rule.torch_update(
        vectors, combiner.weights, name, numel, union, where, wide_like, **combiner.options)
    if not combiner.rule.elementwise:  # the rule changed a subset of the union
        start = start[torch.searchsorted(union, positions)]
    merged = to_wide(start, dt) + update
    bits = from_wide(merged, dt)
    canonical = torch.tensor(signed_value(CANONICAL_NAN[dt.name], dt.itemsize),
                             dtype=bits.dtype, device=device)
    # NaN payloads from arithmetic differ between numpy, torch and GPUs: canonical NaN.
    bits = torch.where(torch.isnan(merged), canonical, bits)
    if (combiner.rule.elementwise and onto is None
            and combiner.rule.block_form(combiner.options).lone_exact):
        _put_lone_bits(bits, stored, combiner.weights, where)
    return positions, bits


def _put_lone_bits(bits, stored, weights, where) -> None:
    """Where one delta of weight 1 alone covers a union position, its fine-tuned bits."""
    import torch

    covering = torch.zeros(bits.numel(), dtype=torch.int32, device=bits.device)
    for s, index in zip(stored, where):
        if s is not None:
            covering.index_add_(0, index, covering.new_ones(index.numel()))
    for s, index, weight in zip(stored, where, weights):
        if s is not None and weight == 1.0:
            alone = covering[index] == 1
            bits.index_copy_(0, index[alone], s.finetuned[alone])


def _agreed_bits(name: str, stored, where, first):
    """Non-float tensors: the stored bits, which every delta storing a position must agree on."""
    import torch

    present = [s for s in stored if s is not None]
    bits = torch.cat([s.finetuned for s in present])[first]
    for s, index in zip(stored, where):
        if s is not None and not torch.equal(bits[index], s.finetuned):
            raise TensorMismatchError(
                "deltas store different values for this non-float tensor, which cannot be "
                "averaged: merge without one of them (or exclude the tensor when compressing)",
                tensor=name)
    return bits
