"""Low-rank records of matrices whose change the memory budget cannot hold (``compress
--low-rank`` on the large matrices of a 7B or 70B model).

The in-memory path (:mod:`.lowrank`) holds a matrix's change whole and takes its spectrum
from the eigendecomposition of its Gram matrix, ``side x side`` whatever the long side:
an 8192 x 28672 matrix of a 70B model needs several GiB. A matrix whose working set
(:func:`~.lowrank.working_bytes`) is more than the budget is instead read again, a block
of rows at a time, for every product the encoder needs (:class:`StreamedChange`):

1. one pass: the base's checksum, ``||tau||^2``, whether every change is finite, and
   ``Y = tau Omega`` for a Gaussian ``Omega`` (``cols x l``) seeded by the tensor's name,
   so that a run gives the same record as the last;
2. :data:`POWER_ITERATIONS` rounds of ``Z = tau^T Q``, ``Y = tau Z`` (``Q``, ``Z``
   orthonormal bases of ``Y`` and ``Z``): a randomized range finder (Halko, Martinsson and
   Tropp, 2011), two passes a round;
3. one pass: ``B = Q^T tau`` (``l x cols``), whose SVD gives the ``l`` leading singular
   values and left vectors ``Q U_B``.

The encoder's right-vector fit (``tau^T L``) and the record's real error then read the
matrix once more each. ``l``, the sketch's width, is :data:`SKETCH_WIDTH` components at
most, fewer where the budget asks (:func:`sketch_width`): the plan spends bits on those
only, and the rest of the change's energy counts as dropped (``Spectrum.tail``). Each
record's error is measured, as for the matrices held whole; only their records are the
same bytes as before.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np

from ..core.dtypes import DType, from_wide, to_wide
from ..core.dtypes import dtype as lookup_dtype
from ..delta.codecs.lowrank import accumulate
from ..delta.spooled import changed_between_reads
from ..engine.walk import BaseHash

#: Components a sketch finds at most (a budget may ask for fewer), and the columns the
#: range finder carries beyond them (its accuracy for the last components).
SKETCH_WIDTH = 256
OVERSAMPLE = 8
#: Fewest components worth a sketch: below, the budget cannot hold one (refused by name).
MIN_WIDTH = 8
#: Rounds of the range finder's power iteration (two passes each): fine-tuning changes'
#: spectra decay slowly, which one or two rounds correct (measured in tests/test_lowrank.py).
POWER_ITERATIONS = 2
#: Elements of the matrix read at a time to measure a record's error, and the bytes each
#: holds while its restored values are made (besides its own bits).
STREAM_BLOCK = 1 << 18
BLOCK_BYTES_PER_ELEMENT = 56
#: Bytes of rows read at a time for the products: ``tau^T x`` adds each block's product to
#: the whole ``cols x k`` result, so blocks of few rows would cost a pass over the result
#: each.
PRODUCT_BLOCK_BYTES = 16 << 20
#: Bytes held per (row + column) per component: the sketch's ranges (float32 and
#: float64), the singular vectors, the quantized, decoded and fitted factors (float64).
BYTES_PER_ENTRY = 96


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """A tensor as a matrix: ``shape[0]`` rows of the other dimensions' elements."""
    rows = shape[0] if shape else 1
    return rows, (int(np.prod(shape, dtype=np.int64)) // rows if rows else 0)


def streamed_bytes(rows: int, cols: int, width: int, itemsize: int) -> int:
    """What encoding one streamed matrix holds at most with a sketch ``width`` wide: the
    factors and ranges, and a block of rows read, widened and multiplied."""
    return (BYTES_PER_ENTRY * (rows + cols) * (width + OVERSAMPLE)
            + max(STREAM_BLOCK * (2 * itemsize + BLOCK_BYTES_PER_ELEMENT), PRODUCT_BLOCK_BYTES))


def sketch_width(rows: int, cols: int, itemsize: int, max_memory: int) -> int:
    """The widest sketch within ``max_memory`` (0: not even :data:`MIN_WIDTH`)."""
    side = min(rows, cols)
    fixed = streamed_bytes(rows, cols, 0, itemsize)   # the blocks and the oversampling
    fits = (max_memory - fixed) // (BYTES_PER_ENTRY * (rows + cols)) if max_memory > fixed else 0
    width = int(min(side, SKETCH_WIDTH, fits))
    return width if width >= min(side, MIN_WIDTH) else 0


def block_error(left_rows: np.ndarray, right: np.ndarray, base: np.ndarray, tau: np.ndarray,
                dt: DType, weights: np.ndarray | None = None) -> float:
    """Sum of squared errors, in some rows, of the task vector a record restores from
    decoded factors (the decoder's own arithmetic and rounding): ``left_rows`` (rows x R),
    ``right`` (R x cols), the rows' ``base`` bits (flat) and true change ``tau``; with
    column ``weights``, each column's errors times its weight squared."""
    wide_base = to_wide(base, dt)
    with np.errstate(all="ignore"):
        restored = from_wide(wide_base + accumulate(left_rows, right).reshape(-1), dt)
        got = to_wide(restored, dt).astype(np.float64) - wide_base.astype(np.float64)
    squares = np.square(got - tau.reshape(-1))
    if weights is not None:
        squares = squares.reshape(-1, weights.size) * np.square(weights.astype(np.float64))
    return float(squares.sum())


class Sketch:
    """A streamed matrix's leading singular values and left singular vectors."""

    def __init__(self, singular: np.ndarray, left: np.ndarray):
        self.singular, self._left = singular, left

    def left(self, rank: int) -> np.ndarray:
        """The ``rank`` leading left singular vectors, ``rows x rank`` float64."""
        return self._left[:, :rank]


class StreamedChange:
    """One fine-tune's change of one matrix, read from the checkpoints a block of rows at a
    time as often as asked, never held whole. :meth:`scan` first (the checksum, the energy,
    whether every change is finite)."""

    #: no activation weights: calibration refuses matrices read again (LowRankPlanner.profile)
    weights = None

    def __init__(self, base, tune, name: str):
        entry = base.entry(name)
        self.name, self.dt, self.shape = name, lookup_dtype(entry.dtype), tuple(entry.shape)
        self.rows, self.cols = matrix_shape(self.shape)
        self._base, self._tune = base, tune
        wide = np.dtype(self.dt.wide).itemsize
        self._rows_for_error = max(1, STREAM_BLOCK // max(self.cols, 1))
        self._rows_for_products = max(1, PRODUCT_BLOCK_BYTES // max(
            1, self.cols * (2 * self.dt.itemsize + 2 * wide)))
        self.base_xxh3, self._tune_xxh3, self._energy, self.finite = None, None, None, None

    def blocks(self, hashes: tuple[BaseHash, BaseHash] | None = None, products: bool = True
               ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(first row, the rows' base bits (flat), their change as rows x cols in the wide
        type)``, block by block in order (``products``: blocks for the products, else for
        measuring an error), the base's and the fine-tune's bits fed to ``hashes``."""
        step = self._rows_for_products if products else self._rows_for_error
        for r0 in range(0, self.rows, step):
            r1 = min(self.rows, r0 + step)
            base = self._base.read_rows(self.name, r0, r1)
            tuned = self._tune.read_rows(self.name, r0, r1)
            if hashes is not None:
                hashes[0].update(base)
                hashes[1].update(tuned)
            with np.errstate(all="ignore"):
                tau = np.subtract(to_wide(tuned, self.dt), to_wide(base, self.dt))
            yield r0, base, tau.reshape(r1 - r0, self.cols)

    def scan(self, width: int = 0) -> np.ndarray | None:
        """The pass that fixes the base's checksum, ``||tau||^2`` and whether every change
        is finite, and, with ``width``, the sketch's first product ``tau Omega``."""
        import torch

        hashes, energy, finite = (BaseHash(self.name), BaseHash(self.name)), 0.0, True
        omega = self._omega(width) if width else None
        product = np.empty((self.rows, omega.shape[1]), omega.dtype) if width else None
        for r0, _, tau in self.blocks(hashes):
            finite = finite and bool(np.isfinite(tau).all())
            energy += float(np.square(tau, dtype=np.float64).sum())
            if product is not None and finite:
                product[r0:r0 + tau.shape[0]] = (torch.from_numpy(tau)
                                                 @ torch.from_numpy(omega)).numpy()
        self.base_xxh3, self._energy, self.finite = hashes[0].hexdigest(), energy, finite
        self._tune_xxh3 = hashes[1].hexdigest()
        return product if finite else None

    def energy(self) -> float:
        if self._energy is None:
            self.scan()
        return self._energy

    def components(self, width: int) -> Sketch | None:
        """The ``width`` leading singular values and left vectors (module doc, 1-3); None
        where a change is not finite."""
        import torch

        y = self.scan(width)
        if y is None:
            return None
        for _ in range(POWER_ITERATIONS):
            z = self.transposed_times(_orthonormal(y))
            y = self.times(_orthonormal(z).astype(y.dtype))
        q = _orthonormal(y)
        b = self.transposed_times(q).T                       # l x cols, float64
        u, s, _ = torch.linalg.svd(torch.from_numpy(b), full_matrices=False)
        return Sketch(s.numpy()[:width], (q @ u.numpy())[:, :width])

    def times(self, x: np.ndarray) -> np.ndarray:
        """``tau x`` (``x``: cols x k, in the wide type), rows x k."""
        import torch

        out = np.empty((self.rows, x.shape[1]), x.dtype)
        right = torch.from_numpy(np.ascontiguousarray(x))
        for r0, _, tau in self.blocks():
            out[r0:r0 + tau.shape[0]] = (torch.from_numpy(tau) @ right).numpy()
        return out

    def transposed_times(self, x: np.ndarray) -> np.ndarray:
        """``tau^T x`` (``x``: rows x k), cols x k float64: the blocks' products summed in
        place in the wide type (a matrix multiply-add each)."""
        import torch

        out = None
        for r0, _, tau in self.blocks():
            part = torch.from_numpy(np.ascontiguousarray(x[r0:r0 + tau.shape[0]], tau.dtype))
            if out is None:
                out = torch.zeros((self.cols, x.shape[1]), dtype=part.dtype)
            out.addmm_(torch.from_numpy(tau).T, part)
        return np.zeros((self.cols, x.shape[1])) if out is None else out.double().numpy()

    def restored_error(self, left: np.ndarray, right: np.ndarray, dt: DType) -> float:
        """Sum of squared errors of the task vector restored from decoded factors
        ``left`` (rows x R) and ``right`` (R x cols), a block of rows at a time; the last
        read, so it also checks that the inputs are what the first read saw."""
        hashes = (BaseHash(self.name), BaseHash(self.name))
        total = sum(block_error(left[r0:r0 + tau.shape[0]], right, base, tau, dt)
                    for r0, base, tau in self.blocks(hashes, products=False))
        if self.base_xxh3 is not None and (hashes[0].hexdigest(), hashes[1].hexdigest()) != (
                self.base_xxh3, self._tune_xxh3):
            raise changed_between_reads(self.name, "its bits differ between the reads of a "
                                        "low-rank record")
        return total

    def _omega(self, width: int) -> np.ndarray:
        seed = zlib.crc32(self.name.encode("utf-8"))
        columns = min(width + OVERSAMPLE, min(self.rows, self.cols))
        omega = np.random.default_rng(seed).standard_normal((self.cols, columns))
        return omega.astype(np.dtype(self.dt.wide))


def _orthonormal(x: np.ndarray) -> np.ndarray:
    """An orthonormal basis of ``x``'s columns (reduced QR in float64)."""
    import torch

    q, _ = torch.linalg.qr(torch.from_numpy(np.ascontiguousarray(x, np.float64)))
    return q.numpy()
