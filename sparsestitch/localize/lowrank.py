"""Low-rank records, and the planner choosing each tensor's record kind (``compress
--low-rank``).

Fine-tuning changes a matrix along few directions: on SmolLM2-135M's fine-tunes the leading
singular vectors of each change carry most of it, which a sparse selection cannot use; but a
change confined to a few elements (an embedding's rows for the tokens a task saw) is what a
sparse record holds best.  So the planner gives each tensor whichever kind costs less for
its error, per fine-tune.  For a size (``--max-size``; Delta-CoMe's mixed precision,
planned over the model):

1. a pass over the model takes each localized tensor's statistics (its sparse options and
   their estimated bytes and errors, as ``--max-size`` alone plans them:
   :func:`~.budget.tensor_options`) and, for each eligible matrix's change ``tau`` (float
   tensors of two or more dimensions, viewed as ``shape[0]`` rows, both sides at least
   :data:`MIN_SIDE`, every change finite), its singular values;
2. a matrix's low-rank plans form a path (:func:`_path`): each step gives one singular
   component the next width of ``1, 2, ... 8`` bits per vector entry, the one whose estimated
   relative squared error (the component's share of ``||tau||^2`` times
   :data:`VECTOR_ERROR`) drops most per bit; every tensor then takes the sparse option or the
   point of its path that minimizes the model's weighted sum of errors within the payload
   budget (``max_size`` less the header; :func:`allocate_kinds`, a Lagrangian over each
   tensor's lower convex hull);
3. the records pass computes each low-rank matrix's singular vectors again, quantizes
   component ``i``'s left vector ``u_i sqrt(s_i)`` and then fits its right vector by least
   squares to what the quantized left vectors so far leave of ``tau`` (so a left vector's
   rounding error is absorbed), quantizes it, and measures the record's real error with the
   decoder's own arithmetic (:mod:`sparsestitch.delta.codecs.lowrank`); every other tensor
   is encoded with its sparse option.

When the files come out over ``max_size``, the budgets shrink by what the first pass really
took and the records are written again (:meth:`LowRankPlanner.refit`).

With an error target instead (``--low-rank`` alone or with ``--max-error``, 0.5 by default)
every localized tensor gets the default's sparse record within the target
(:class:`~.targets.ErrorPlanner`), and each eligible matrix also the cheapest ``lowrank``
record within it (:func:`within_error`), planned from its own singular values and kept only
where it is smaller.  Both records' real errors are measured, so the choice never trades the
target away.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ..core.dtypes import DType, to_wide
from ..core.dtypes import dtype as lookup_dtype
from ..core.errors import OptionError
from ..delta.codecs.lowrank import (
    encode_factors,
    entry_values,
    scale_dtype_for,
)
from ..delta.format import Record, digest
from ..engine.readahead import in_order
from ..engine.walk import BaseHash
from .budget import Option, Profile, fit_hulls, lower_hull, tensor_options
from .lowrank_stream import (
    MIN_WIDTH,
    StreamedChange,
    block_error,
    matrix_shape,
    sketch_width,
    streamed_bytes,
)
from .planned import tensor_stats
from .selection import Encoded, TensorScanner, fidelity_report
from .stats import TensorStats
from .targets import ErrorPlanner, SizeTarget

#: Bits per vector entry a component may take, in the order the plan raises them.
LADDER = (0, 1, 2, 3, 4, 5, 6, 8)
#: Estimated relative squared error of a component stored with k-bit vectors, its right
#: vector fitted to the quantized left one (measured on SmolLM2-135M's fine-tunes: the mean
#: over 20 components of three matrices, which agreed within 15% at every k; 0 bits: the
#: component is dropped).  It decides only how bits are spread: each record's real error is
#: measured.
VECTOR_ERROR = {0: 1.0, 1: 0.61, 2: 0.24, 3: 0.092, 4: 0.033, 5: 0.0095, 6: 0.0024,
                8: 0.0002}
#: Each matrix's squared errors count divided by its ||tau||^2 to this power (1: relative
#: errors, every matrix alike; 0: absolute errors, large changes first).  Between the two
#: kept most of SmolLM2's fine-tuning gain at 1/32 and 1/100 of its size (news: 0.5, 0.75,
#: 1.0, 1.25 kept 99.0, 99.5, 99.2, 98.7% at 1/32; docs/results-fidelity.md).
WEIGHT_POWER = 0.75
#: Matrices with a side narrower than this take sparse records only (a component would cost
#: about what the matrix does).
MIN_SIDE = 8
#: Each component's two steps, in bits (float32 scales; float64 models take twice that).
STEP_BITS = 64
#: Rounds of least squares and re-assignment when fitting a vector's step.
FIT_ROUNDS = 6


def eligible(shape: tuple[int, ...], dt: DType) -> bool:
    rows, cols = matrix_shape(shape)
    return dt.is_float and len(shape) >= 2 and min(rows, cols) >= MIN_SIDE


@dataclass(frozen=True)
class Spectrum:
    """One matrix's singular values and size: what the plan needs of it."""

    name: str
    rows: int
    cols: int
    energy: float             # ||tau||^2
    singular: np.ndarray      # descending
    nbytes: int = 0           # the matrix's own bytes: stored exactly, it costs at most this
    tail: float = 0.0         # the share of energy beyond ``singular`` (a sketch's; 0: none)
    weighted: bool = False    # calibration: a column-weighted copy of the change is made too


def read_changes(scanner: TensorScanner, name: str, with_base: bool = True,
                 stats: list[TensorStats] | None = None
                 ) -> tuple[str, np.ndarray | None, list[np.ndarray | None]]:
    """The base's checksum, its bits (``with_base``) and, per fine-tune, the change of tensor
    ``name`` in the wide type as a ``rows x cols`` matrix (None where a change is not
    finite), filled block by block: the tensor's bits and changes, nothing else held.  Each
    block also goes into ``stats[tune]`` when given (the same pass as
    :func:`~.planned.tensor_stats`)."""
    entry = scanner.base.entry(name)
    dt = lookup_dtype(entry.dtype)
    rows, cols = matrix_shape(entry.shape)
    base_hash = BaseHash(name)
    base_bits = np.empty(entry.numel, dt.bits) if with_base else None
    changes = [np.empty(entry.numel, dt.wide) for _ in scanner.tunes]
    finite = [True] * len(scanner.tunes)
    for block in scanner.tune_blocks(name, base_hash=base_hash):
        if stats is not None:
            stats[block.tune].add(block.finetuned, block.base, block.offset,
                                  keys=block.magnitudes)
        at = slice(block.offset, block.offset + block.base.size)
        if base_bits is not None and block.tune == 0:
            base_bits[at] = block.base
        with np.errstate(all="ignore"):
            np.subtract(to_wide(block.finetuned, dt), to_wide(block.base, dt),
                        out=changes[block.tune][at])
        finite[block.tune] = finite[block.tune] and bool(np.isfinite(changes[block.tune][at]).all())
    return base_hash.hexdigest(), base_bits, [tau.reshape(rows, cols) if ok else None
                                              for tau, ok in zip(changes, finite)]


def energy_of(tau: np.ndarray) -> float:
    """||tau||^2 in float64, a block of rows at a time (no float64 copy of the change)."""
    step = max(1, GRAM_BLOCK // max(tau.shape[1], 1))
    return float(sum(np.square(tau[at:at + step], dtype=np.float64).sum()
                     for at in range(0, tau.shape[0], step)))


#: Rows (or columns) of a change widened to float64 at a time for its Gram matrix.
GRAM_BLOCK = 1 << 20


def gram(tau: np.ndarray):
    """The smaller Gram matrix of a change (``tau tau^T`` when it has no more rows than
    columns, else ``tau^T tau``), in the change's own float type: each block of the long side
    multiplied there, the blocks summed in float64.  float32 keeps the leading eigenpairs --
    all the plan spends bits on -- to far better than the 8-bit codes resolve, at a quarter
    of float64's time for the eigensolver (float64 models stay in float64: their changes may
    exceed float32's range)."""
    import torch

    matrix = torch.from_numpy(tau)
    rows, cols = tau.shape
    wide = rows <= cols   # the Gram matrix is rows x rows
    side = rows if wide else cols
    out = torch.zeros((side, side), dtype=torch.float64)
    long = cols if wide else rows
    step = max(1, GRAM_BLOCK // max(side, 1))
    for at in range(0, long, step):
        part = matrix[:, at:at + step] if wide else matrix[at:at + step].T
        out += (part @ part.T).double()
    return out.to(matrix.dtype), wide


def singular_values(tau: np.ndarray) -> np.ndarray:
    """The change's singular values, descending: the square roots of its Gram matrix's
    eigenvalues (the leading ones, which the plan spends bits on, to float64 accuracy)."""
    import torch

    matrix, _ = gram(tau)
    values = torch.linalg.eigvalsh(matrix).double().numpy()[::-1]
    return np.sqrt(np.maximum(values, 0.0))


class Components:
    """A change's singular values and, on request, its leading left singular vectors, from
    one eigendecomposition of its Gram matrix: a small symmetric eigenproblem (the short
    side's size, whatever the long one's) instead of a full SVD."""

    def __init__(self, tau: np.ndarray):
        import torch

        matrix, self._wide = gram(tau)
        values, vectors = torch.linalg.eigh(matrix)
        order = torch.argsort(values, descending=True)
        self.singular = values[order].clamp(min=0).sqrt().double().numpy()
        self._vectors, self._tau = vectors[:, order].double(), tau

    def left(self, rank: int) -> np.ndarray:
        """The ``rank`` leading left singular vectors, ``rows x rank`` float64."""
        import torch

        if self._wide:            # eigenvectors of tau tau^T are the left vectors
            return self._vectors[:, :rank].numpy()
        right = self._vectors[:, :rank]   # of tau^T tau, the right ones: u = tau v / s
        tau = torch.from_numpy(self._tau)
        left = (tau @ right.to(tau.dtype)).double().numpy()
        singular = self.singular[:rank]
        with np.errstate(all="ignore"):
            return np.where(singular > 0, left / np.where(singular > 0, singular, 1.0), 0.0)


def leading_components(tau: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``rank`` leading left singular vectors (``rows x rank``, float64) and singular
    values of a change (:class:`Components`)."""
    components = Components(tau)
    return components.left(rank), components.singular[:rank]


class HeldChange:
    """A matrix's change held whole (:func:`read_changes`) with the base's bits: what
    :func:`encode_matrix` asks of a change (:class:`~.lowrank_stream.StreamedChange` reads
    it again instead)."""

    def __init__(self, tau: np.ndarray, base_bits: np.ndarray, base_xxh3: str,
                 weights: np.ndarray | None = None):
        self.tau, self.base_bits, self.base_xxh3 = tau, base_bits, base_xxh3
        self.rows, self.cols = tau.shape
        # each column's activation weight (:mod:`.activations`): the singular vectors and
        # every error are those of ``tau D``; the right factor fits ``tau`` itself (column by
        # column, which a column's weight does not change)
        self.weights = weights
        self._energy: float | None = None

    def components(self, width: int = 0) -> "Components":
        return Components(weighted(self.tau, self.weights))

    def leading(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        return leading_components(weighted(self.tau, self.weights), rank)

    def energy(self) -> float:
        """``||tau D||^2``, measured once (the planner and every encoding attempt ask)."""
        if self._energy is None:
            self._energy = energy_of(weighted(self.tau, self.weights))
        return self._energy

    def transposed_times(self, x: np.ndarray) -> np.ndarray:
        """``tau^T x`` in the change's type, as float64."""
        import torch

        tau = torch.from_numpy(self.tau)
        return (tau.T @ torch.from_numpy(x.astype(self.tau.dtype))).double().numpy()

    def restored_error(self, left: np.ndarray, right: np.ndarray, dt: DType) -> float:
        return restored_error(left, right, self.base_bits, self.tau, dt, self.weights)


def weighted(tau: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """``tau D``: each column times its activation weight (``tau`` itself without)."""
    return tau if weights is None else tau * weights.astype(tau.dtype)


@dataclass(frozen=True)
class LowRankOption:
    """A matrix stored as the first ``steps`` raises of its low-rank path
    (:func:`lowrank_path`): its estimated payload bytes and weighted error."""

    nbytes: float
    error: float
    steps: int


def _path(s: Spectrum):
    """A matrix's low-rank plans, cheapest first: each step raises the component whose
    estimated relative squared error drops most per bit to its next width.  Yields
    ``(bits spent, estimated relative squared error, levels)`` after each step (``levels``:
    the same array, updated in place)."""
    share = s.singular ** 2 / s.energy if s.energy > 0 else np.zeros(s.singular.size)
    levels = np.zeros(s.singular.size, np.int64)
    estimate, spent = float(share.sum()) + s.tail, 0.0
    heap = [(-_gain(share[i], 0, s), int(i)) for i in np.flatnonzero(share > 0)]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        level = levels[i]
        spent += _cost(level, s)
        estimate -= share[i] * (VECTOR_ERROR[LADDER[level]] - VECTOR_ERROR[LADDER[level + 1]])
        levels[i] = level + 1
        if level + 2 < len(LADDER):
            heapq.heappush(heap, (-_gain(share[i], level + 1, s), i))
        yield spent, max(estimate, 0.0), levels


def lowrank_path(s: Spectrum, weight: float) -> list[LowRankOption]:
    """The matrix's low-rank plans (:func:`_path`) cheaper than the matrix itself (stored
    exactly it costs no more), as options whose error is ``weight`` times the estimate."""
    points = []
    for steps, (spent, estimate, _) in enumerate(_path(s), start=1):
        if spent >= 8 * s.nbytes:
            break
        points.append(LowRankOption(spent / 8, weight * estimate, steps))
    return points


def path_bits(s: Spectrum, steps: int) -> list[int]:
    """Bits per component after the first ``steps`` steps of the matrix's path."""
    levels = np.zeros(s.singular.size, np.int64)
    for _, (_, _, levels) in zip(range(steps), _path(s)):
        pass
    return [LADDER[k] for k in levels[:_rank(levels)]]


def allocate_kinds(profiles: list[Profile], spectra: dict[str, Spectrum], budget: float
                   ) -> dict[str, Option | LowRankOption]:
    """Per tensor a sparse option (its :class:`~.budget.Profile`'s, estimated from its
    statistics) or a point of its low-rank path (matrices in ``spectra``), the weighted sum
    of relative squared errors least with the estimated payload within ``budget`` bytes.
    Each tensor's relative error counts ``||tau||^(2 - 2 WEIGHT_POWER)`` times: the
    weighting tuned for low-rank plans (:data:`WEIGHT_POWER`), the same for every kind."""
    hulls = {}
    for p in profiles:
        weight = p.energy ** (1 - WEIGHT_POWER) if p.energy > 0 else 0.0
        options = [replace(o, error=o.error * weight) for o in (p.nothing(), *p.options)]
        if p.name in spectra and spectra[p.name].energy > 0:
            options += lowrank_path(spectra[p.name], weight)
        hulls[p.name] = lower_hull(options)
    return fit_hulls(hulls, budget)


def allocate_within(s: Spectrum, error_sq: float) -> list[int]:
    """The cheapest bits per component along the matrix's path (:func:`_path`) whose
    estimated relative squared error is at most ``error_sq``; all of them at 8 bits if even
    that is not enough."""
    levels = np.zeros(0, np.int64)
    if s.energy > 0 and float((s.singular ** 2 / s.energy).sum()) + s.tail > error_sq:
        for _, estimate, levels in _path(s):
            if estimate <= error_sq:
                break
    return [LADDER[k] for k in levels[:_rank(levels)]]


def planned_bits(bits: list[int], s: Spectrum) -> int:
    """What a plan's components of one matrix take, in bits (codes and steps)."""
    return sum(bits) * (s.rows + s.cols) + STEP_BITS * len(bits)


def _rank(levels: np.ndarray) -> int:
    kept = np.flatnonzero(levels)
    return int(kept[-1]) + 1 if kept.size else 0


def _cost(level: int, s: Spectrum) -> float:
    """Bits of raising a component from ``LADDER[level]`` to the next width."""
    step = (LADDER[level + 1] - LADDER[level]) * (s.rows + s.cols)
    return step + (STEP_BITS if level == 0 else 0)


def _gain(share: float, level: int, s: Spectrum) -> float:
    drop = VECTOR_ERROR[LADDER[level]] - VECTOR_ERROR[LADDER[level + 1]]
    return share * drop / _cost(level, s)


#: Columns quantized at a time (the fit's temporaries are a few arrays of this many).
COLUMN_CHUNK = 16


def quantize_columns(x: np.ndarray, bits, scale_type) -> tuple[np.ndarray, np.ndarray]:
    """Each column of ``x`` (``n x R``) as signed levels (``l`` or ``-1 - l``, int8) of
    ``+-step * (2 l + 1)`` in ``bits[j]`` bits, with a least-squares step per column (a few
    rounds of assignment and refit from the column's range), rounded to ``scale_type``
    before the levels are chosen again; :data:`COLUMN_CHUNK` columns at a time."""
    codes = np.empty(x.shape, np.int8)
    steps = np.empty(x.shape[1], scale_type)
    for at in range(0, x.shape[1], COLUMN_CHUNK):
        part = slice(at, at + COLUMN_CHUNK)
        codes[:, part], steps[part] = _quantize_chunk(x[:, part], list(bits)[part], scale_type)
    return codes, steps


def _quantize_chunk(x: np.ndarray, bits, scale_type) -> tuple[np.ndarray, np.ndarray]:
    magnitude = np.abs(x)
    top = (1 << (np.asarray(bits, np.int64) - 1)) - 1
    largest = magnitude.max(axis=0) if magnitude.size else np.zeros(x.shape[1])
    used = largest > 0
    step = np.where(used, largest, 1.0) / (2 * top + 1)
    with np.errstate(all="ignore"):
        for _ in range(FIT_ROUNDS if top.any() else 1):
            level = np.clip(np.rint((magnitude / step - 1) / 2), 0, top)
            odd = 2 * level + 1
            step = (magnitude * odd).sum(axis=0) / (odd * odd).sum(axis=0)
        step = np.where(used, step, 0.0).astype(scale_type)
        level = np.clip(np.rint((magnitude / np.where(used, step, 1.0) - 1) / 2), 0, top)
    level = np.where(used, level, 0).astype(np.int8)
    return np.where(x < 0, -1 - level, level).astype(np.int8), step


def quantize_vector(x: np.ndarray, bits: int, scale_type) -> tuple[np.ndarray, float]:
    """:func:`quantize_columns` of one vector: its codes and step."""
    codes, step = quantize_columns(x.reshape(-1, 1), [bits], scale_type)
    return codes[:, 0], float(step[0])


def dequantize(codes: np.ndarray, step: float) -> np.ndarray:
    level = np.where(codes < 0, -1 - codes.astype(np.int64), codes)
    return np.where(codes < 0, -1.0, 1.0) * step * (2 * level + 1)


def encode_matrix(name: str, dt: DType, shape: tuple[int, ...],
                  change: "HeldChange | StreamedChange", bits: list[int],
                  leading: tuple[np.ndarray, np.ndarray] | None = None) -> Encoded:
    """The ``lowrank`` record of one matrix's change with ``bits[i]`` bits per entry of
    component ``i`` (see the module doc, 3), and its real error.  ``leading``: the change's
    leading left singular vectors and values when already known (at least ``len(bits)``;
    needed for a streamed change).  Holds the vectors and the factors (and a held change);
    the error is measured a block of rows at a time."""
    rows, cols = change.rows, change.cols
    energy, base_xxh3 = change.energy(), change.base_xxh3
    if not bits or energy == 0:
        return Record(name, dt.name, tuple(shape), "base", base_xxh3,
                      fidelity=fidelity_report(energy, 0.0)), b""
    rank = len(bits)
    u, s = leading if leading is not None else change.leading(rank)
    scale_type = np.float64 if scale_dtype_for(dt) == "F64" else np.float32
    # every left vector at once; then each right vector, in order, fitted by least squares
    # to what the earlier components leave of tau given the quantized left vectors
    left_codes, left_steps = quantize_columns(u[:, :rank] * np.sqrt(s[:rank]), bits, scale_type)
    lefts = np.stack([dequantize(left_codes[:, i], left_steps[i]) for i in range(rank)], axis=1)
    fitted = change.transposed_times(lefts)
    gram_left = lefts.T @ lefts
    right_codes, right_steps = np.zeros((cols, rank), np.int8), np.zeros(rank, scale_type)
    rights = np.zeros((cols, rank))
    for i, k in enumerate(bits):
        if gram_left[i, i] > 0:
            target = (fitted[:, i] - rights[:, :i] @ gram_left[:i, i]) / gram_left[i, i]
        else:
            target = np.zeros(cols)
        right_codes[:, i], right_steps[i] = quantize_vector(target, k, scale_type)
        rights[:, i] = dequantize(right_codes[:, i], right_steps[i])
    del u, lefts, rights, fitted
    left_list = [left_codes[:, i] for i in range(rank)]
    right_list = [right_codes[:, i] for i in range(rank)]
    payload, config = encode_factors(left_list, right_list, left_steps, right_steps, bits,
                                     rows, cols, dt)
    error = change.restored_error(decoded_factor(left_list, left_steps, dt),
                                  decoded_factor(right_list, right_steps, dt).T.copy(), dt)
    config["error_sq"] = error
    record = Record(name, dt.name, tuple(shape), "sparse", base_xxh3, rows * cols,
                    {"codec": "all"}, {"codec": "lowrank", **config}, 0, len(payload),
                    digest(payload), fidelity_report(energy, energy, error))
    return record, payload


def decoded_factor(codes: list[np.ndarray], steps: np.ndarray, dt: DType) -> np.ndarray:
    """A factor's entries (``n x R``) as the decoder computes them, in the wide type."""
    wide = np.dtype(dt.wide)
    out = np.empty((codes[0].size if codes else 0, len(codes)), wide)
    for i, code in enumerate(codes):
        level = np.where(code < 0, -1 - code.astype(np.int64), code)
        out[:, i] = entry_values(code < 0, level, steps[i].astype(wide), wide)
    return out


#: Elements whose restored values are made at a time when a record's error is measured.
ERROR_BLOCK = 1 << 20


def restored_error(left: np.ndarray, right: np.ndarray, base_bits: np.ndarray,
                   tau: np.ndarray, dt: DType, weights: np.ndarray | None = None) -> float:
    """Sum of squared errors of the task vector the record restores (the decoder's own
    arithmetic and rounding), a block of rows at a time (each column's times its weight
    squared, with ``weights``)."""
    rows, cols = tau.shape
    step = max(1, ERROR_BLOCK // max(cols, 1))
    total = 0.0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        total += block_error(left[r0:r1], right, base_bits[r0 * cols:r1 * cols], tau[r0:r1], dt,
                             weights)
    return total


def lowrank_records(scanner: TensorScanner, name: str, planner: LowRankPlanner,
                    others: Callable[[], list[Encoded]]) -> list[Encoded]:
    """Every fine-tune's record of an eligible matrix.  For a size: ``lowrank`` with its
    planned bits, or ``others()`` (the sparse records, each fine-tune's planned option) where
    the plan chose that or a change is not finite.  For an error target: ``others()`` (the
    sparse records within it) unless a ``lowrank`` record within it is smaller.  A matrix
    the budget cannot hold is read again for each product (:mod:`.lowrank_stream`)."""
    entry = scanner.base.entry(name)
    dt = lookup_dtype(entry.dtype)
    width = planner.width(name)
    if planner.max_error is not None:
        sparse = others()   # first: its size bounds the low-rank plans worth encoding
        records = []
        for change, (record, payload) in zip(matrix_changes(scanner, name, width), sparse):
            low = None if change is None else within_error(
                name, dt, entry, change, planner.max_error, limit=len(payload), width=width)
            if low is not None:
                _drop(payload)
            records.append((record, payload) if low is None else low)
        return records
    records = []
    for tune, change in enumerate(matrix_changes(scanner, name, width)):
        bits = planner.bits[tune].get(name) if change is not None else None
        leading = None
        if bits and width:   # a streamed change: its sketch, unless a change is not finite
            sketch = change.components(max(width, len(bits)))
            leading = None if sketch is None else (sketch.left(len(bits)), sketch.singular)
            bits = bits if sketch is not None else None
        records.append(None if bits is None else
                       encode_matrix(name, dt, entry.shape, change, bits, leading))
    if any(r is None for r in records):  # those fine-tunes' sparse records
        sparse = others()
        for r, (_, payload) in zip(records, sparse):
            if r is not None:
                _drop(payload)
        records = [r if r is not None else e for r, e in zip(records, sparse)]
    return records


def matrix_changes(scanner: TensorScanner, name: str, width: int = 0
                   ) -> list[HeldChange | StreamedChange | None]:
    """Each fine-tune's change of matrix ``name``: held whole (None where a change is not
    finite), or, with a sketch ``width``, read again as asked (:class:`StreamedChange`)."""
    if width:
        return [StreamedChange(scanner.base, tune, name) for tune in scanner.tunes]
    base_xxh3, base_bits, changes = read_changes(scanner, name)
    weights = scanner.column_weights.get(name)
    return [None if tau is None else HeldChange(tau, base_bits, base_xxh3, weights)
            for tau in changes]


def _drop(payload) -> None:
    """Release a sparse record's payload a ``lowrank`` record replaces (a spooled one's
    temporary file now, not whenever it is collected)."""
    if hasattr(payload, "close"):
        payload.close()


#: Encodings tried per matrix for an error target (each with a tighter estimate) before its
#: sparse record is kept.
ERROR_ATTEMPTS = 4


def within_error(name: str, dt: DType, entry, change: HeldChange | StreamedChange,
                 max_error: float, limit: int | None = None, width: int = 0
                 ) -> Encoded | None:
    """The cheapest ``lowrank`` record of one matrix whose real relative error is at most
    ``max_error``: planned from its singular values (a streamed change's ``width`` leading
    ones), encoded, measured, and planned again with a tighter estimate while it is over;
    None where its payload would take at least ``limit`` bytes (the matrix's own by
    default), no attempt met the target or a streamed change is not finite."""
    limit = entry.nbytes if limit is None else min(limit, entry.nbytes)
    components = change.components(width)
    if components is None:
        return None
    spectrum = spectrum_of(name, change, components, entry.nbytes)
    if spectrum.energy == 0:
        return encode_matrix(name, dt, entry.shape, change, [])
    estimate = max_error ** 2
    for _ in range(ERROR_ATTEMPTS):
        bits = allocate_within(spectrum, estimate)
        if planned_bits(bits, spectrum) >= 8 * limit:
            return None
        record = encode_matrix(name, dt, entry.shape, change, bits,
                               (components.left(len(bits)), components.singular))
        if len(record[1]) >= limit:   # tighter plans take more
            return None
        error = record[0].fidelity["relative_error"]
        if error <= max_error:
            return record
        estimate *= 0.9 * (max_error / error) ** 2   # the estimate was this far off
    return None


def working_bytes(s: Spectrum, tunes: int, rank: int) -> int:
    """What encoding one matrix holds at most for ``tunes`` fine-tunes at once: the base's
    bits and each change in the wide type; the Gram matrix, its eigenvectors and the
    eigensolver's workspace (4 x side^2 float64); per component, float64 vectors (singular,
    quantized, fitted), the decoded factors, the codes and their packed bits; the fit's and
    the error's temporaries."""
    numel, side = s.rows * s.cols, min(s.rows, s.cols)
    wide = 8 if s.nbytes >= 8 * numel else 4
    return (numel * (s.nbytes // max(numel, 1) + wide * (tunes + s.weighted)) + 32 * side * side
            + 40 * (s.rows + s.cols) * rank + 48 * COLUMN_CHUNK * max(s.rows, s.cols)
            + 24 * ERROR_BLOCK)


def measure(scanner: TensorScanner, name: str, group: int, max_size: int | None,
            width: int = 0):
    """One tensor's sparse options (for a size) and, for an eligible matrix, its spectra
    (None where a change is not finite), per fine-tune: the planner's pass (module doc, 1).
    ``width``: a matrix the budget cannot hold, its statistics read in one pass and its
    spectrum sketched (:mod:`.lowrank_stream`), the ``width`` leading values."""
    entry = scanner.base.entry(name)
    dt = lookup_dtype(entry.dtype)
    rows, cols = matrix_shape(entry.shape)
    weights = scanner.column_weights.get(name)
    if max_size is None:  # an error target plans each tensor as it is encoded
        return None, ([Spectrum(name, rows, cols, 0.0, np.empty(0), entry.nbytes,
                                weighted=weights is not None)]
                      * len(scanner.tunes) if eligible(entry.shape, dt) else None)
    if not eligible(entry.shape, dt):
        return [tensor_options(stats, group) for stats in tensor_stats(scanner, name)], None
    if width:
        profiles = [tensor_options(stats, group) for stats in tensor_stats(scanner, name)]
        spectra = []
        for change in matrix_changes(scanner, name, width):   # one sketch held at a time
            sketch = change.components(width)
            spectra.append(None if sketch is None else
                           spectrum_of(name, change, sketch, entry.nbytes))
        return profiles, spectra
    stats = [TensorStats.empty(name, dt, entry.numel, weights) for _ in scanner.tunes]
    _, _, changes = read_changes(scanner, name, with_base=False, stats=stats)
    profiles = [tensor_options(one, group) for one in stats]
    scaled = (None if tau is None else weighted(tau, weights) for tau in changes)  # one at a time
    return profiles, [None if tau is None else
                      Spectrum(name, rows, cols, energy_of(tau), singular_values(tau),
                               entry.nbytes, weighted=weights is not None) for tau in scaled]


@dataclass(frozen=True)
class Streamed:
    """A matrix read again for each product: its sketch's width, what encoding it holds."""

    width: int
    held: int


def streamed_widths(scanner: TensorScanner, names, max_memory: int, error_target: bool
                    ) -> dict[str, Streamed]:
    """The eligible matrices among ``names`` whose change ``max_memory`` cannot hold whole
    (:func:`working_bytes`, with the smallest plan for a size, as an error target counts it
    otherwise), each with the widest sketch within the budget (:mod:`.lowrank_stream`);
    one not even :data:`~.lowrank_stream.MIN_WIDTH` components wide is refused by name.  An
    error target also holds each fine-tune's sparse record, up to a quarter of the budget
    (larger ones are built in temporary files)."""
    tunes, streamed = len(scanner.tunes), {}
    for name in names:
        entry = scanner.base.entry(name)
        dt = lookup_dtype(entry.dtype)
        if not eligible(entry.shape, dt):
            continue
        rows, cols = matrix_shape(entry.shape)
        stub = Spectrum(name, rows, cols, 0.0, np.empty(0), entry.nbytes,
                        weighted=name in scanner.column_weights)
        held = (working_bytes(stub, tunes, min(rows, cols) // 2) + tunes * entry.nbytes
                if error_target else working_bytes(stub, tunes, 0))
        if held <= max_memory:
            continue
        sparse = tunes * min(entry.nbytes, max_memory // 4) if error_target else 0
        width = sketch_width(rows, cols, dt.itemsize, max_memory - sparse)
        if not width:
            least = streamed_bytes(rows, cols, min(rows, cols, MIN_WIDTH), dt.itemsize)
            raise OptionError(f"tensor {name!r}: low-rank records of this matrix need "
                              f"{(least + sparse) / 2**20:,.1f} MiB even read a block of rows at "
                              f"a time, more than max_memory allows ({max_memory / 2**20:,.1f} "
                              "MiB); allow more memory", option="max_memory")
        streamed[name] = Streamed(width, streamed_bytes(rows, cols, width, dt.itemsize) + sparse)
    return streamed


def spectrum_of(name: str, change: HeldChange | StreamedChange, components, nbytes: int
                ) -> Spectrum:
    """A matrix's spectrum from its change's components; a sketch (of a streamed change)
    has only the leading values, and the rest of the energy is the spectrum's ``tail``."""
    energy, tail = change.energy(), 0.0
    if isinstance(change, StreamedChange) and energy > 0:
        tail = max(0.0, 1.0 - float((components.singular ** 2).sum()) / energy)
    return Spectrum(name, change.rows, change.cols, energy, components.singular, nbytes, tail,
                    weighted=change.weights is not None)


class LowRankPlanner(SizeTarget):
    """``--low-rank``: each localized tensor's record kind chosen, sparse (the default's
    quantized or exact records) or ``lowrank`` (eligible matrices), by ``max_size`` (every
    tensor's options planned together from a pass over the model, :func:`allocate_kinds`)
    or ``max_error`` (each tensor the smaller of the two within it, :func:`lowrank_records`;
    as an :class:`~.targets.ErrorPlanner` for the sparse records)."""

    warns = False

    def __init__(self, group: int, max_size: int | None = None, max_error: float | None = None):
        if (max_size is None) == (max_error is None):
            raise ValueError("a low-rank plan takes max_size or max_error")
        if max_size is not None and max_size <= 0:
            raise OptionError(f"max_size must be a positive number of bytes, got {max_size}")
        if max_error is not None and not 0 < max_error:
            raise OptionError(f"max_error for low-rank records is a relative L2 error above 0, "
                              f"got {max_error}", option="max_error")
        self.max_size, self.max_error, self.group = max_size, max_error, group
        self.target = ({"max_size": max_size} if max_size is not None else
                       {"max_error": max_error}) | {"records": "lowrank"}
        self.spectra: list[dict[str, Spectrum]] = []    # eligible matrices, per fine-tune
        self.profiles: list[dict[str, Profile]] = []    # every planned tensor (max_size)
        self.budgets: list[float] = []
        self.choices: list[dict[str, Option | LowRankOption]] = []
        self.bits: list[dict[str, list[int]]] = []      # the matrices planned low-rank
        self.streamed: dict[str, Streamed] = {}         # matrices too large to hold
        self.sparse = None if max_error is None else ErrorPlanner(max_error, group)
        self.needs_stats = self.sparse is not None   # the sparse records' statistics pass

    def takes(self, name: str) -> bool:
        """Whether tensor ``name`` is an eligible matrix (for some fine-tune)."""
        return any(name in spectra for spectra in self.spectra)

    def profile(self, scanner: TensorScanner, tensors: int, max_memory: int) -> None:
        """The pass over the localized tensors (module doc, 1), then the first plan; a matrix
        ``max_memory`` cannot encode is refused here, before anything is written."""
        tunes, plan = len(scanner.tunes), scanner.plan
        names = [name for name in scanner.base.names if name in plan.localized and not
                 plan.stored_exactly(name, lookup_dtype(scanner.base.entry(name).dtype))]
        self.spectra = [{} for _ in range(tunes)]
        self.profiles = [{} for _ in range(tunes)]
        self.streamed = streamed_widths(scanner, names, max_memory, self.max_error is not None)
        weighted_streams = sorted(set(self.streamed) & set(scanner.column_weights))
        if weighted_streams:
            raise OptionError(f"tensor {weighted_streams[0]!r}: low-rank records with "
                              "calibration hold each matrix's change whole, more than "
                              "max_memory allows here; allow more memory", option="max_memory")
        measured = in_order(names, lambda n: measure(scanner, n, self.group, self.max_size,
                                                     self.width(n)), workers=0)
        for name, (profiles, spectra) in measured:
            for tune in range(tunes):
                if profiles is not None:
                    self.profiles[tune][name] = profiles[tune]
                if spectra is not None and spectra[tune] is not None:
                    self.spectra[tune][name] = spectra[tune]
        if self.max_size is not None:
            self.plan([self.first_budget(tensors)] * tunes)
        self.check_memory(max_memory)

    def width(self, name: str) -> int:
        """The sketch width of a matrix read again for each product (0: held whole)."""
        return self.streamed[name].width if name in self.streamed else 0

    def working_bytes(self, name: str) -> int:
        """What encoding matrix ``name`` holds at most (:func:`working_bytes`)."""
        spectra = [spectra[name] for spectra in self.spectra if name in spectra]
        if not spectra:
            return 0
        s = spectra[0]
        if name in self.streamed:  # read again for each product, within the budget
            return self.streamed[name].held
        if self.max_size is not None:
            return working_bytes(s, len(spectra), max((len(bits.get(name, []))
                                                      for bits in self.bits), default=0))
        # the rank is not known yet; the sparse records (at most the matrix each) are held
        return working_bytes(s, len(spectra), min(s.rows, s.cols) // 2) + len(spectra) * s.nbytes

    def check_memory(self, max_memory: int) -> None:
        """Refuse, naming the matrix, a plan whose largest matrix the budget cannot hold
        (a matrix held whole; :func:`streamed_widths` refused those it could not stream)."""
        names = set().union(*self.spectra) if self.spectra else set()
        largest = max(names, key=self.working_bytes, default=None)
        if largest is not None and self.working_bytes(largest) > max_memory:
            raise OptionError(f"tensor {largest!r}: low-rank records hold a matrix's change "
                              f"whole, {self.working_bytes(largest) / 2**20:,.1f} MiB here, more "
                              f"than max_memory allows ({max_memory / 2**20:,.1f} MiB); allow "
                              "more memory", option="max_memory")

    def plan(self, budgets) -> None:
        """Every tensor's record kind and option within ``budgets[tune]`` payload bytes."""
        self.budgets = list(budgets)
        self.choices = [allocate_kinds(list(profiles.values()), spectra, budget)
                        for profiles, spectra, budget in
                        zip(self.profiles, self.spectra, self.budgets)]
        self.bits = [{name: path_bits(spectra[name], choice.steps)
                      for name, choice in choices.items() if isinstance(choice, LowRankOption)}
                     for choices, spectra in zip(self.choices, self.spectra)]

    def refit(self, sizes, payloads, last: bool) -> bool:
        """For a size, :meth:`~.targets.SizeTarget.refit`; an error target is never over."""
        return self.max_size is not None and super().refit(sizes, payloads, last)

    def accepts(self, record: Record) -> bool:
        return self.sparse is None or self.sparse.accepts(record)

    def options(self, stats: TensorStats, tune: int = 0):
        """An error target's sparse options (:meth:`~.targets.ErrorPlanner.options`)."""
        return self.sparse.options(stats, tune)

    def option(self, tune: int, name: str) -> Option:
        """A size's sparse option for the tensor; where the plan chose a ``lowrank`` record,
        nothing (that record replaces it: :func:`lowrank_records`)."""
        choice = self.choices[tune][name]
        return choice if isinstance(choice, Option) else self.profiles[tune][name].nothing()

    def energy(self, tune: int, name: str) -> float | None:
        return self.profiles[tune][name].energy
