"""Merge rules: pure functions from one tensor's task vectors to an update.

Every rule is called as ``rule(vectors, weights, name, numel, **options)`` and
receives one :class:`TaskVector` per delta for one tensor (sorted flat
``positions`` and ``tau`` = wide(fine-tuned) - wide(base) there, in the wide
float type; empty for a delta that leaves the tensor alone, so ``vectors[i]``
is always delta ``i``) plus per-delta ``weights``, and returns
``(positions, update)``: the sorted positions the merge changes and the amount
added to the base there, in the wide type.  Positions it does not return keep
the base's bits exactly; the engine computes ``round(wide(base) + update)``
once per position.

The order of the float operations is part of each rule's contract (results
depend on it, and the stitcher, hot-swap and continual composition must agree
bit for bit): weights multiply ``tau`` first, sums run over the deltas in list
order, and a mean divides the finished sum.  Localize-and-Stitch and task
arithmetic are elementwise: the update at a position depends only on the
deltas' entries there.

Elementwise rules also accept ``union`` (a :class:`Union` of exactly the
vectors' positions) so a caller that already has it saves a sort.

Adding a rule is one function plus one entry in :data:`RULES`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .union import Union, union_of


@dataclass(frozen=True)
class TaskVector:
    positions: np.ndarray   # sorted, unique int64 flat positions
    tau: np.ndarray         # wide float values at those positions


def _union(vectors: Sequence[TaskVector], union: Union | None = None
           ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sorted union of all positions, and each vector's indices into it (``union``, when
    given, must be the union of exactly these vectors' positions)."""
    if not vectors:
        return np.empty(0, np.int64), []
    union = union or union_of([v.positions for v in vectors])
    return union.positions, union.where


def _wide(vectors: Sequence[TaskVector]) -> np.dtype:
    return vectors[0].tau.dtype if vectors else np.dtype(np.float32)


def localize_stitch(vectors: Sequence[TaskVector], weights: Sequence[float], name: str = "",
                    numel: int | None = None, union: Union | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Localize-and-Stitch: where deltas overlap, average their (weighted) task vectors.

    ``update = (sum_i m_i w_i tau_i) / (sum_i m_i)`` over the deltas ``i`` whose mask
    ``m_i`` covers the position (the paper's ``sum_i (m_i / sum_j m_j) * tau_i``).

    >>> a = TaskVector(np.array([0, 1]), np.array([2.0, 4.0], np.float32))
    >>> b = TaskVector(np.array([1, 2]), np.array([6.0, 8.0], np.float32))
    >>> localize_stitch([a, b], [1.0, 1.0])[1].tolist()
    [2.0, 5.0, 8.0]
    """
    union, where = _union(vectors, union)
    wide = _wide(vectors)
    total = np.zeros(union.size, wide)
    covering = np.zeros(union.size, wide)
    for vector, index, weight in zip(vectors, where, weights):
        total[index] += wide.type(weight) * vector.tau
        covering[index] += 1
    return union, total / np.maximum(covering, 1)


def task_arithmetic(vectors: Sequence[TaskVector], weights: Sequence[float], name: str = "",
                    numel: int | None = None, scale: float = 1.0, union: Union | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Task arithmetic: ``update = scale * (sum_i w_i tau_i)``.

    >>> a = TaskVector(np.array([0, 1]), np.array([2.0, 4.0], np.float32))
    >>> task_arithmetic([a, a], [1.0, 1.0], scale=0.5)[1].tolist()
    [2.0, 4.0]
    """
    union, where = _union(vectors, union)
    wide = _wide(vectors)
    total = np.zeros(union.size, wide)
    for vector, index, weight in zip(vectors, where, weights):
        total[index] += wide.type(weight) * vector.tau
    return union, wide.type(scale) * total


def ties(vectors: Sequence[TaskVector], weights: Sequence[float], name: str = "",
         numel: int | None = None, density: float = 0.2, scale: float = 1.0
         ) -> tuple[np.ndarray, np.ndarray]:
    """TIES-merging: trim each weighted task vector ``w_i tau_i`` to its
    ``round(density * numel)`` largest magnitudes in this tensor (equal magnitudes:
    lower position first), elect a sign per position from the sum of the trimmed
    vectors, then average the nonzero entries that agree with it (disjoint mean):
    ``update = scale * (agreeing sum / agreeing count)``.  Positions where nothing
    agrees keep the base.

    >>> a = TaskVector(np.array([0, 1]), np.array([2.0, -4.0], np.float32))
    >>> b = TaskVector(np.array([0, 1]), np.array([-1.0, -2.0], np.float32))
    >>> ties([a, b], [1.0, 1.0], numel=2, density=1.0)[1].tolist()
    [2.0, -3.0]
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be within [0, 1], got {density}")
    wide = _wide(vectors)
    trimmed = []
    for vector, weight in zip(vectors, weights):
        limit = vector.tau.size if numel is None else int(np.floor(density * numel + 0.5))
        tau = wide.type(weight) * vector.tau
        if limit < tau.size:
            order = np.lexsort((vector.positions, -np.abs(tau)))[:limit]
            keep = np.sort(order)
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


def dare(vectors: Sequence[TaskVector], weights: Sequence[float], name: str = "",
         numel: int | None = None, drop: float = 0.9, seed: int = 0, scale: float = 1.0
         ) -> tuple[np.ndarray, np.ndarray]:
    """DARE: drop each stored entry with probability ``drop``, divide the survivors'
    ``tau`` by ``1 - drop``, then task arithmetic with ``scale``.

    The draws are part of the contract: delta ``i``'s ``j``-th stored entry of tensor
    ``name`` (in position order) survives when the ``j``-th value of
    ``numpy.random.default_rng([seed, i, zlib.crc32(name.encode())]).random(count)``
    is ``>= drop``.  A result therefore depends only on the seed, the delta's place in
    the list and its record -- not on row blocks, devices or the other deltas.

    >>> a = TaskVector(np.arange(4), np.ones(4, np.float32))
    >>> dare([a], [1.0], "w", drop=0.0)[1].tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop must be within [0, 1), got {drop}")
    wide = _wide(vectors)
    survivors = []
    for i, vector in enumerate(vectors):
        rng = np.random.default_rng([seed, i, zlib.crc32(name.encode("utf-8"))])
        keep = rng.random(vector.tau.size) >= drop
        survivors.append(TaskVector(vector.positions[keep],
                                    vector.tau[keep] / wide.type(1.0 - drop)))
    return task_arithmetic(survivors, weights, name, numel, scale=scale)


RuleFunction = Callable[..., tuple[np.ndarray, np.ndarray]]

#: Rule name -> (function, names of its options).
RULES: dict[str, tuple[RuleFunction, tuple[str, ...]]] = {
    "localize-stitch": (localize_stitch, ()),
    "task-arithmetic": (task_arithmetic, ("scale",)),
    "ties": (ties, ("density", "scale")),
    "dare": (dare, ("drop", "seed", "scale")),
}
