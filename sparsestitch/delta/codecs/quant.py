"""``quant``: the task vector at the kept positions in k bits each (lossy, opt-in).

tau = wide(fine-tuned) - wide(base) is stored as a sign and a magnitude level:
``tau_hat = sign * (a + b * level)`` with ``level`` in ``0 .. 2^(k-1) - 1`` and, per
group of ``group`` consecutive kept values (0: the whole record), an offset ``a`` and a
step ``b``.  For ``k = 1`` there is one level: ``tau_hat = sign * a`` (BitDelta's sign times
a scale).  ``a`` and ``b`` are fitted by least squares (alternating with the assignment of
levels, a fixed number of rounds from the group's range), then rounded to the scale dtype,
and every level is assigned again with the stored scales, so encoder and decoder agree.
Decoding computes ``round(wide(base) + tau_hat)`` in the model dtype.

Elements whose base or fine-tuned value is not finite (NaN, inf) are *exceptions*, stored
exactly as in ``tau``.  Everything else is approximate: the codec reports, in its config,
the largest absolute error of tau at a kept position (``max_abs_error``) and the sum of
squared errors (``error_sq``), both over the finite values, computed with the decoder's own
arithmetic.  Deterministic: the same inputs give the same bytes.

Payload: codes stream (k bits per non-exception value, little-endian bit strings: bit 0 is
the sign, 1 = negative; bits 1..k-1 the level) | scales stream (per group ``a``, and ``b``
when k > 1, in ``scale_dtype`` byte planes) | exception-index stream | exception-bits stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import native
from ...core.dtypes import DType, from_wide, to_wide
from ...core.dtypes import dtype as lookup_dtype
from ...core.errors import DeltaFormatError, OptionError
from .base import (
    ExceptionCursor,
    config_int,
    from_planes,
    gap_decode,
    gap_encode,
    pack_stream,
    split_streams,
    stream_compressor,
    to_planes,
    unpack_stream,
)
from .streams import Part, RawStream

#: Exceptions decoded at a time by a cursor.
EXCEPTION_CHUNK = 1 << 18

BITS = (1, 2, 3, 4, 8)
#: Rounds of least squares and re-assignment when fitting a group's scales.
FIT_ROUNDS = 4
#: Scales are stored as bfloat16 for up to this many bits (their rounding error, 2^-9 of a
#: scale, stays far below a step), else as float32.
BF16_SCALES_UP_TO = 3
SCALE_DTYPES = ("BF16", "F32", "F64")


def scale_dtype_for(dt: DType, bits: int) -> str:
    """float64 models keep float64 scales (their changes can exceed float32's range)."""
    if dt.name == "F64":
        return "F64"
    return "BF16" if bits <= BF16_SCALES_UP_TO else "F32"


@dataclass(frozen=True)
class _Fitted:
    codes: np.ndarray        # packed sign and level bits of the regular values
    scale_bits: np.ndarray   # the stored scales (offsets, then steps)
    error_sq: float          # sum of squared errors of the finite ones, summed in order
    max_abs_error: float     # and the largest of them
    overflowed: np.ndarray   # regular values that decode to a non-finite number


def _fit_and_assign(kept: np.ndarray, base: np.ndarray, dt: DType, scale_dt: DType, bits: int,
                    group: int, keep_overflow: bool = False,
                    weights: np.ndarray | None = None) -> _Fitted:
    """Fit the scales of the regular values ``kept`` (over ``base``, bits of both), round them
    to the scale dtype, assign every level with the stored scales (as the decoder will), and
    measure the error (each value's squared error times its ``weights``, where given)."""
    kernels, kind = native.float_kernels(dt.name)
    starts = _group_starts(kept.size, group)
    with np.errstate(all="ignore"):
        if kernels is not None and starts.size:  # the magnitudes a group at a time, in C
            kept, base = np.ascontiguousarray(kept), np.ascontiguousarray(base)
            offsets, steps = np.empty(starts.size), np.empty(starts.size)
            kernels.quant_fit_bits(kind, kept, base, int(starts[1]) if starts.size > 1
                                   else kept.size, bits, FIT_ROUNDS, offsets, steps)
            tau = None
        else:
            tau = to_wide(kept, dt) - to_wide(base, dt)
            offsets, steps = _fit(np.abs(tau.astype(np.float64)), starts, bits)
        scale_bits = np.concatenate([_to_scale_bits(offsets, scale_dt),
                                     _to_scale_bits(steps, scale_dt)]) if bits > 1 \
            else _to_scale_bits(offsets, scale_dt)
        a, b = _stored_scales(scale_bits[:starts.size],
                              scale_bits[starts.size:] if bits > 1 else
                              np.zeros(starts.size, scale_dt.bits), scale_dt, dt)
    size = int(starts[1]) if starts.size > 1 else max(kept.size, 1)
    codes, overflowed, error_sq, max_abs = _assign_and_measure(kept, base, tau, a, b, size, dt,
                                                               bits, weights)
    if keep_overflow:
        overflowed = np.zeros(kept.size, bool)
    return _Fitted(codes, scale_bits, error_sq, max_abs, overflowed)


def _assign_and_measure(kept, base, tau, a, b, size: int, dt: DType, bits: int,
                        weights: np.ndarray | None = None):
    """Every level with the stored scales ``a``, ``b`` (wide, per group of ``size``), the
    packed codes, which values overflow when restored, and the squared error of the
    restored values summed in order, with its largest term -- C loop or numpy, the same bits.
    ``weights`` (float64, one per value): the squared errors are weighted (numpy only: the
    activation-aware error of :mod:`sparsestitch.localize.activations`)."""
    kernels, kind = native.float_kernels(dt.name)
    if kernels is not None and weights is None:
        codes = np.zeros((kept.size * bits + 7) // 8, np.uint8)
        overflowed = np.zeros(kept.size, np.uint8)
        error_sq, max_abs = kernels.quant_assign(
            kind, bits, size, np.ascontiguousarray(kept), np.ascontiguousarray(base),
            np.ascontiguousarray(a, np.float64), np.ascontiguousarray(b, np.float64), codes,
            overflowed)
        return codes, overflowed.view(bool), error_sq, max_abs
    with np.errstate(all="ignore"):
        if tau is None:
            tau = to_wide(kept, dt) - to_wide(base, dt)
        starts = _group_starts(tau.size, size if size < tau.size else 0)
        levels = _assign(np.abs(tau), a, b, starts, bits)
        negative = np.signbit(tau)
        magnitude = _magnitudes(levels, a, b, starts, dt.wide)
        values = from_wide(to_wide(base, dt) + np.where(negative, -magnitude, magnitude), dt)
        restored = to_wide(values, dt).astype(np.float64)
        error = restored - to_wide(kept, dt).astype(np.float64)
        finite_at = np.isfinite(error)
        finite = error[finite_at]
        squares = finite * finite if weights is None else finite * finite * weights[finite_at]
        error_sq = float(np.cumsum(squares)[-1]) if finite.size else 0.0
    max_abs = float(np.abs(finite).max()) if finite.size else 0.0
    return _pack(negative, levels, bits), ~np.isfinite(restored), error_sq, max_abs


#: The largest finite scale of each scale dtype.
_FINITE_MAX = {"BF16": 3.3895313892515355e38, "F32": float(np.finfo(np.float32).max),
               "F64": float(np.finfo(np.float64).max)}


def _to_scale_bits(values: np.ndarray, scale_dt: DType) -> np.ndarray:
    """Scales rounded to the scale dtype (largest finite where they would overflow)."""
    finite_max = _FINITE_MAX[scale_dt.name]
    if np.isfinite(values).all():  # the usual case: nan_to_num would change nothing
        clipped = np.minimum(values, finite_max)
    else:
        clipped = np.minimum(np.nan_to_num(values, posinf=finite_max), finite_max)
    if scale_dt.name == "F64":
        return clipped.astype(np.float64).view(np.uint64)
    if scale_dt.name == "F32":
        return clipped.astype(np.float32).view(np.uint32)
    return from_wide(clipped.astype(np.float32), scale_dt)


def _finite_or_max(value: float) -> float:
    """A reported number JSON can carry (the header refuses Infinity)."""
    return value if np.isfinite(value) else float(np.finfo(np.float64).max)


@dataclass(frozen=True)
class QuantValues:
    codec_id: str = "quant"
    needs_base: bool = True
    exact: bool = False
    min_version: int = 2         # the format version that added it
    values_per_byte: int = 8   # its streams hold bits per value, not bytes
    elementwise: bool = True    # value i depends on base value i alone
    #: At most 8 values per payload byte before compression (1 bit each).
    values_per_byte: int = 8

    def applies(self, dt: DType) -> bool:
        return dt.is_float

    def encode(self, kept: np.ndarray, base: np.ndarray, dt: DType, *, bits: int = 4,
               group: int = 128) -> tuple[bytes, dict]:
        if bits not in BITS:
            raise OptionError(f"bits must be one of {BITS}, got {bits}")
        if group < 0:
            raise OptionError(f"group must be 0 (the whole tensor) or a number of values, got {group}")
        stream = QuantStream(dt, bits, group, kept.size)
        stream.add(kept, base)
        return stream.finish()

    def decode(self, payload: bytes, config: dict, base: np.ndarray, dt: DType,
               count: int) -> np.ndarray:
        layout = _Layout.of(config, dt, count, len(payload))
        streams = split_streams(payload, layout.sizes)
        bits, n_exc, scale_dt = layout.bits, layout.exceptions, layout.scale_dt
        regular_count = count - n_exc
        starts = _group_starts(regular_count, layout.group)
        per_group = 2 if bits > 1 else 1
        codes = np.frombuffer(unpack_stream(streams[0], config["codes"],
                                            (regular_count * bits + 7) // 8), np.uint8)
        scale_bits = from_planes(unpack_stream(streams[1], config["scales"],
                                               starts.size * per_group * scale_dt.itemsize),
                                 scale_dt.bits, starts.size * per_group)
        offsets = scale_bits[:starts.size]
        steps = scale_bits[starts.size:] if bits > 1 else np.zeros(starts.size, scale_dt.bits)
        a, b = _stored_scales(offsets, steps, scale_dt, dt)
        _check_tail(codes, 0, regular_count, bits)
        index_raw = unpack_stream(streams[2], config["exc_index"], n_exc * 4)
        index = gap_decode(from_planes(index_raw, np.dtype("<u4"), n_exc), max(count, 1))
        exc_bits = from_planes(unpack_stream(streams[3], config["exc_bits"], n_exc * dt.itemsize),
                               dt.bits, n_exc)
        group = layout.group or max(regular_count, 1)
        if not n_exc:
            return _restore(codes, 0, bits, group, 0, a, b, base, dt)
        regular = np.ones(count, bool)
        regular[index] = False
        values = np.empty(count, dt.bits)
        values[regular] = _restore(codes, 0, bits, group, 0, a, b, base[regular], dt)
        values[index] = exc_bits
        return values

    def cursor(self, part: Part, config: dict, dt: DType, count: int) -> "QuantCursor":
        layout = _Layout.of(config, dt, count, part.length)
        codes, scales, index, exc_bits = part.split(layout.sizes)
        regular = count - layout.exceptions
        groups = _group_starts(regular, layout.group).size
        per_group = 2 if layout.bits > 1 else 1
        exceptions = ExceptionCursor(
            index.stream(config["exc_index"], layout.exceptions * 4),
            exc_bits.stream(config["exc_bits"], layout.exceptions * dt.itemsize),
            layout.exceptions, count, dt.bits, EXCEPTION_CHUNK)
        return QuantCursor(codes.stream(config["codes"], (regular * layout.bits + 7) // 8),
                           scales.stream(config["scales"],
                                         groups * per_group * layout.scale_dt.itemsize),
                           exceptions, layout, dt, count)


@dataclass(frozen=True)
class _Layout:
    """A quant record's checked config."""

    bits: int
    group: int
    scale_dt: DType
    exceptions: int
    sizes: list[int]

    @classmethod
    def of(cls, config: dict, dt: DType, count: int, nbytes: int) -> "_Layout":
        if not dt.is_float:
            raise DeltaFormatError(f"quant values need a float dtype, got {dt.name}")
        bits = config.get("bits")
        if type(bits) is not int or bits not in BITS:
            raise DeltaFormatError(f"quant config field 'bits' must be one of {BITS}, got {bits!r}")
        group = config_int(config, "group", 0, max(count, 1))
        scale_name = config.get("scale_dtype")
        if not isinstance(scale_name, str) or scale_name not in SCALE_DTYPES:
            raise DeltaFormatError(f"quant scale_dtype must be one of {', '.join(SCALE_DTYPES)}, "
                                   f"got {scale_name!r}")
        n_exc = config_int(config, "exceptions", 0, count)
        sizes = [config_int(config, key, 0, nbytes) for key in
                 ("codes_nbytes", "scales_nbytes", "exc_index_nbytes", "exc_bits_nbytes")]
        for key in ("codes", "scales", "exc_index", "exc_bits"):
            if not isinstance(config.get(key), dict):
                raise DeltaFormatError(f"quant config lacks its {key!r} stream config")
        return cls(bits, group, lookup_dtype(scale_name), n_exc, sizes)


class QuantCursor:
    """``quant`` values in order, the next run at a time: the codes of the run's regular
    values, the scales of their groups and the exceptions among them, with the decoder's own
    arithmetic (so the same bits as :meth:`QuantValues.decode`)."""

    def __init__(self, codes: RawStream, scales: RawStream, exceptions: ExceptionCursor,
                 layout: _Layout, dt: DType, count: int):
        self._codes, self._scales, self._exceptions = codes, scales, exceptions
        self._layout, self._dt, self._count = layout, dt, count
        self._regular_count = count - layout.exceptions
        self._groups = _group_starts(self._regular_count, layout.group).size
        self._at, self._regular = 0, 0

    @property
    def takes_any_run(self) -> bool:
        """Whether :meth:`take` of any number of values holds little but its output (the
        codes restored in C; a run with exceptions copies its base bits too, and exceptions
        are rare), so a reader need not cut a block's values into runs."""
        return native.float_kernels(self._dt.name)[0] is not None

    def take(self, base: np.ndarray, n: int) -> np.ndarray:
        if n > self._count - self._at:
            raise DeltaFormatError(f"asked for values past the record's {self._count}")
        index, exc_bits = self._exceptions.upto(self._at + n)
        m = n - index.size                      # regular values in this run
        first, bits = self._regular, self._layout.bits
        group = self._layout.group or max(self._regular_count, 1)
        lo, hi = first * bits, (first + m) * bits
        codes = self._codes.take(lo // 8, (hi + 7) // 8)
        if first + m == self._regular_count:
            _check_tail(codes, lo % 8, m, bits)
        a, b = self._scales_of(first, m, group)
        if not index.size:
            values = _restore(codes, lo % 8, bits, group, first % group, a, b, base, self._dt)
        else:
            regular = np.ones(n, bool)
            regular[index - self._at] = False
            values = np.empty(n, self._dt.bits)
            values[regular] = _restore(codes, lo % 8, bits, group, first % group, a, b,
                                       base[regular], self._dt)
            values[index - self._at] = exc_bits
        self._codes.release()
        self._at += n
        self._regular += m
        return values

    def _scales_of(self, first: int, m: int, group: int) -> tuple[np.ndarray, np.ndarray]:
        """The offsets and steps (in the model's wide type) of the groups from the one of
        regular value ``first`` to the one of value ``first + m - 1``."""
        g0, g1 = first // group, (first + m - 1) // group + 1 if m else first // group
        scale_dt, groups = self._layout.scale_dt, self._groups
        per_group = 2 if self._layout.bits > 1 else 1
        planes = self._scales.planes(scale_dt.itemsize, groups * per_group, g0, g1)
        offsets = from_planes(planes, scale_dt.bits, g1 - g0)
        steps = (from_planes(self._scales.planes(scale_dt.itemsize, groups * per_group,
                                                 groups + g0, groups + g1), scale_dt.bits, g1 - g0)
                 if per_group == 2 else np.zeros(g1 - g0, scale_dt.bits))
        self._scales.release()
        return _stored_scales(offsets, steps, scale_dt, self._dt)

    def close(self) -> None:
        self._codes.close()
        self._scales.close()
        self._exceptions.close()


#: Regular values fitted and assigned at a time by the encoder (about; a whole number of
#: groups, eight at least, so that every run's codes end on a byte).
RUN_VALUES = 1 << 20


class QuantStream:
    """A ``quant`` record's values encoded as they arrive, in order: ``add`` them a part at a
    time (a row block's kept values, say), then ``finish`` -- the same payload and config as
    encoding them at once, holding about two runs of values, not the record.

    Regular values are fitted, assigned and measured a run at a time (runs of whole groups,
    eight at least, so every run's codes end on a byte; one run when all values share one
    group, which then waits for all of them).  A value whose approximation overflows (only
    near the dtype's largest numbers) joins the exceptions and its run is fitted again
    without it; after four tries the run keeps what it has."""

    def __init__(self, dt: DType, bits: int, group: int, count: int | None = None,
                 codes_file=None):
        if bits not in BITS:
            raise OptionError(f"bits must be one of {BITS}, got {bits}")
        if group < 0:
            raise OptionError(f"group must be 0 (the whole tensor) or a number of values, got {group}")
        self.dt, self.bits, self.count = dt, bits, count
        self.scale_dt = lookup_dtype(scale_dtype_for(dt, bits))
        if count is not None and group >= count:
            group = 0  # one group of everything (fewer values than a group: the same fit)
        self.group = group
        self.run = (1 << 62) if group == 0 else max(8, RUN_VALUES // (8 * group) * 8) * group
        self._pending = _Pending(count, self.run if group else None)  # (group 0: one run)
        self.codes, self.offsets, self.steps = [], [], []
        self.exceptions, self.exception_bits = [], []
        self.error_sq, self.max_abs_error = 0.0, 0.0
        self._seen = 0          # values added so far
        self._start = 0         # kept index of the first buffered value
        # A temporary file the codes are appended to as their runs are encoded (a tensor
        # too large for its record to be held: see finish's ``into``), else None.
        self._codes_file, self._codes_nbytes = codes_file, 0

    def add(self, kept: np.ndarray, base: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Values ``kept`` over ``base`` (bits of both), next in order; ``weights`` (one per
        value, with every part or none): each squared error counts times its weight."""
        self._pending.check(weights)
        if kept.size == 0:
            return
        self._pending.add(kept, base, _non_finite(kept, base, self.dt), weights)
        self._seen += kept.size
        if self._pending.size >= 2 * self.run:
            self._drain(final=False)

    def finish(self, into=None) -> tuple[bytes, dict]:
        """The values part and its config; with ``into`` (a ``delta.spooled.SpooledPayload``)
        the streams go there, the codes from ``codes_file``, and the bytes are empty."""
        if self.count is not None and self._seen != self.count:
            raise ValueError(f"{self._seen} values added, {self.count} announced")
        self._drain(final=True)
        group = self.group if self.group < self._seen else 0  # as the spec writes one group
        if into is not None:
            return b"", self._finish_into(into, group)
        codes = np.concatenate(self.codes) if self.codes else np.empty(0, np.uint8)
        code_stream, code_config = pack_stream(codes)
        streams = _side_streams(self)
        config = _values_config(self, group, sum(e.size for e in self.exceptions),
                              (len(code_stream), code_config),
                              *((len(stream), stream_config) for stream, stream_config in streams))
        return code_stream + b"".join(stream for stream, _ in streams), config

    def _finish_into(self, into, group: int) -> dict:
        codes = self._codes_file
        codes.flush()
        stored = [into.add_stream(codes, self._codes_nbytes, stream_compressor(self._codes_nbytes))]
        stored += [into.add_packed(stream, config) for stream, config in _side_streams(self)]
        return _values_config(self, group, sum(e.size for e in self.exceptions), *stored)

    def close(self) -> None:
        """Drop the codes' temporary file, if any (it vanishes)."""
        if getattr(self, "_codes_file", None) is not None:
            self._codes_file.close()

    __del__ = close  # dropped after an error elsewhere: the file just vanishes

    def _drain(self, final: bool) -> None:
        """Encode whole runs of the buffered values (every one of them when ``final``)."""
        if not self._pending.size:
            return
        kept, base, exceptional, weights = self._pending.joined()
        at = 0
        while at < kept.size:
            stop = _run_end(exceptional, at, self.run)
            if not final and (stop == kept.size or
                              int(np.count_nonzero(~exceptional[at:stop])) < self.run):
                break  # a partial run: wait for more values
            at = self._encode_run(kept, base, exceptional, at, weights)
        self._start += at
        self._pending.drop(at)

    def _encode_run(self, kept, base, exceptional, start: int, weights=None) -> int:
        """Encode the run of regular values from ``start``; return where it ends."""
        dt, bits = self.dt, self.bits
        for attempt in range(5):
            stop = _run_end(exceptional, start, self.run)
            regular = ~exceptional[start:stop]
            pick = slice(None) if regular.all() else regular  # the usual run: no copies
            run_kept, run_base = kept[start:stop][pick], base[start:stop][pick]
            run_weights = None if weights is None else weights[start:stop][pick]
            fitted = _fit_and_assign(run_kept, run_base, dt, self.scale_dt, bits, self.group,
                                     keep_overflow=attempt == 4, weights=run_weights)
            if not fitted.overflowed.any():
                break
            exceptional[start + np.flatnonzero(regular)[fitted.overflowed]] = True
        groups = fitted.scale_bits.size // (2 if bits > 1 else 1)
        if self._codes_file is None:
            self.codes.append(fitted.codes)
        else:  # every run's codes end on a byte: appended, they are the stream
            self._codes_file.write(np.ascontiguousarray(fitted.codes).tobytes())
            self._codes_nbytes += fitted.codes.size
        self.offsets.append(fitted.scale_bits[:groups])
        self.steps.append(fitted.scale_bits[groups:])
        where = np.flatnonzero(exceptional[start:stop])
        self.exceptions.append(where + self._start + start)
        self.exception_bits.append(kept[start:stop][where])
        self.error_sq += fitted.error_sq
        self.max_abs_error = max(self.max_abs_error, fitted.max_abs_error)
        return stop


class _Pending:
    """The values a :class:`QuantStream` holds until they fill a run: fine-tuned and base
    bits, where they are exceptional, and each one's weight (None: not weighted), copied in
    as they are added into buffers made for three runs (or the record's ``count``, where
    known and fewer) that grow by half where that is not enough, reused run after run, so a
    value is copied in once and moved at most once more (when it is left over after a run),
    never joined anew from parts."""

    def __init__(self, count: int | None = None, run: int | None = None):
        self.count = count                 # the record's values, where known: the most held
        # what a stream drained every two runs holds at most: two runs and a part
        self.first = None if run is None else 3 * run
        self.buffers: list | None = None   # [kept, base, exceptional, weights or None]
        self.size = 0
        self.weighted: bool | None = None  # known from the first part added

    def check(self, weights) -> None:
        if self.weighted is None:
            self.weighted = weights is not None
        if self.weighted != (weights is not None):
            raise ValueError("weights must be given with every part of a record or with none")

    def add(self, kept, base, exceptional, weights) -> None:
        parts = (kept, base, exceptional, None if weights is None else
                 np.asarray(weights, np.float64))
        end = self.size + kept.size
        if self.buffers is None or end > self.buffers[0].size:
            self._grow(end, parts)
        for buffer, part in zip(self.buffers, parts):
            if buffer is not None:
                buffer[self.size:end] = part
        self.size = end

    def _grow(self, needed: int, parts: tuple) -> None:
        held = 0 if self.buffers is None else self.buffers[0].size
        capacity = max(needed, held + held // 2 if held or self.first is None else self.first)
        if self.count is not None:
            capacity = max(needed, min(capacity, self.count))
        grown = [None if part is None else np.empty(capacity, part.dtype) for part in parts]
        if self.buffers is not None:
            for new, old in zip(grown, self.buffers):
                if new is not None:
                    new[:self.size] = old[:self.size]
        self.buffers = grown

    def joined(self) -> tuple:
        """``(kept, base, exceptional, weights)``: views of everything held, in order."""
        return tuple(None if buffer is None else buffer[:self.size] for buffer in self.buffers)

    def drop(self, count: int) -> None:
        """Let go of the first ``count`` values (encoded): the rest move to the front."""
        left = self.size - count
        if count and left:
            for buffer in self.buffers:
                if buffer is not None:  # (numpy copies overlapping ranges correctly)
                    buffer[:left] = buffer[count:self.size]
        self.size = left


def _side_streams(stream: QuantStream) -> list[tuple[bytes, dict]]:
    """A :class:`QuantStream`'s scales, exception indices and exception bits streams, packed."""
    scale_bits = (np.concatenate(stream.offsets + stream.steps) if stream.offsets
                  else np.empty(0, stream.scale_dt.bits))
    exceptions = (np.concatenate(stream.exceptions) if stream.exceptions
                  else np.empty(0, np.int64))
    exception_bits = (np.concatenate(stream.exception_bits) if stream.exception_bits
                      else np.empty(0, stream.dt.bits))
    return [pack_stream(to_planes(scale_bits)),
            pack_stream(to_planes(gap_encode(exceptions).astype("<u4"))),
            pack_stream(to_planes(exception_bits))]


def _values_config(stream: QuantStream, group: int, exceptions: int, codes, scales,
                   exc_index, exc_bits) -> dict:
    """A :class:`QuantStream`'s record's values config from each stream's ``(stored length,
    stream config)``."""
    config = {"bits": stream.bits, "group": group, "scale_dtype": stream.scale_dt.name,
              "exceptions": int(exceptions)}
    for key, (nbytes, stream_config) in (("codes", codes), ("scales", scales),
                                         ("exc_index", exc_index), ("exc_bits", exc_bits)):
        config[key], config[f"{key}_nbytes"] = stream_config, nbytes
    config["max_abs_error"] = stream.max_abs_error
    config["error_sq"] = _finite_or_max(stream.error_sq)
    return config


def _non_finite(kept: np.ndarray, base: np.ndarray, dt: DType) -> np.ndarray:
    """Where the base, the fine-tuned value or their difference is not finite (a run at a
    time: the wide values are never held for many values at once)."""
    kernels, kind = native.float_kernels(dt.name)
    if kernels is not None:
        out = np.empty(kept.size, np.uint8)
        kernels.quant_non_finite(kind, np.ascontiguousarray(kept), np.ascontiguousarray(base),
                                 out)
        return out.view(bool)
    out = np.empty(kept.size, bool)
    with np.errstate(all="ignore"):
        for at in range(0, kept.size, RUN_VALUES):
            base_wide = to_wide(base[at:at + RUN_VALUES], dt)
            tune_wide = to_wide(kept[at:at + RUN_VALUES], dt)
            out[at:at + RUN_VALUES] = ~(np.isfinite(base_wide) & np.isfinite(tune_wide)
                                        & np.isfinite(tune_wide - base_wide))
    return out


def _run_end(exceptional: np.ndarray, start: int, run: int) -> int:
    """Where the run of ``run`` regular values from ``start`` ends (exceptions skipped)."""
    stop = min(exceptional.size, start + run)
    while True:
        missing = run - int(np.count_nonzero(~exceptional[start:stop]))
        if missing <= 0 or stop == exceptional.size:
            return stop
        stop = min(exceptional.size, stop + missing)


def estimate(kept: np.ndarray, base: np.ndarray, dt: DType, bits: int, group: int,
             weights: np.ndarray | None = None) -> tuple[float, float]:
    """``(sum of squared errors, bits per value)`` that encoding would give, without packing
    or compressing: the fit and assignment of :meth:`QuantValues.encode` on these values
    (non-finite ones left out), the codes' bits and the scales' share (what planners estimate
    options with; the encoder's overflow handling aside).  ``weights``: each value's squared
    error counts times its weight."""
    if kept.size == 0:
        return 0.0, 0.0
    scale_dt = lookup_dtype(scale_dtype_for(dt, bits))
    group = group if group < kept.size else 0
    regular = ~_non_finite(kept, base, dt)
    fitted = _fit_and_assign(kept[regular], base[regular], dt, scale_dt, bits, group,
                             keep_overflow=True,
                             weights=None if weights is None else weights[regular])
    return _finite_or_max(fitted.error_sq), estimated_bits(kept.size, dt, bits, group)


def estimated_bits(count: int, dt: DType, bits: int, group: int) -> float:
    """The bits per value :func:`estimate` gives ``count`` values (> 0): the codes' bits and
    the scales' share, known before any fit."""
    group = group if group < count else 0
    per_group = (2 if bits > 1 else 1) * 8 * lookup_dtype(scale_dtype_for(dt, bits)).itemsize
    return bits + per_group / (group or count)


def _group_starts(count: int, group: int) -> np.ndarray:
    """Index of the first value of each group (one group of everything for ``group=0``)."""
    if count == 0:
        return np.empty(0, np.int64)
    return np.arange(0, count, group if group else count, dtype=np.int64)


def _fit(magnitude: np.ndarray, starts: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group, the offset ``a`` and step ``b`` (float64, both >= 0) minimizing the squared
    error of the magnitudes: from the group's range, rounds of level assignment and least
    squares.  Groups are runs of ``starts[1]`` values (the last may be shorter); every sum
    over a group is taken in order, value by value, so the C loop and numpy give the same
    bits."""
    if starts.size == 0:
        return np.zeros(0), np.zeros(0)
    size = int(starts[1]) if starts.size > 1 else magnitude.size
    kernels = native.kernels()
    if kernels is not None:
        offsets, steps = np.empty(starts.size), np.empty(starts.size)
        kernels.quant_fit(np.ascontiguousarray(magnitude, np.float64), size, bits, FIT_ROUNDS,
                          offsets, steps)
        return offsets, steps
    return _fit_numpy(magnitude, starts.size, size, bits)


def _fit_numpy(magnitude: np.ndarray, groups: int, size: int, bits: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_fit` in numpy: the groups as rows of a padded table, sums in order along each
    row (``cumsum``; the padding adds zeros, which change no sum of non-negative values)."""
    top = (1 << (bits - 1)) - 1
    table = np.zeros(groups * size)
    table[:magnitude.size] = magnitude
    table = table.reshape(groups, size)
    valid = (np.arange(groups * size) < magnitude.size).reshape(groups, size)
    counts = valid.sum(axis=1).astype(np.float64)

    def group_sum(values):
        return np.cumsum(values, axis=1)[:, -1]

    if top == 0:  # sign times the mean magnitude: the least-squares scale
        return group_sum(table) / counts, np.zeros(groups)
    low = np.where(valid, table, np.inf).min(axis=1)
    offset, step = low, (table.max(axis=1) - low) / top
    mean_m = group_sum(table) / counts
    for _ in range(FIT_ROUNDS):
        with np.errstate(all="ignore"):
            level = np.where(step[:, None] > 0,
                             np.rint((table - offset[:, None]) / step[:, None]), 0)
        level = np.clip(np.nan_to_num(level), 0, top).astype(np.uint8).astype(np.float64)
        level *= valid
        mean_l = group_sum(level) / counts
        spread = group_sum(level * level) / counts - mean_l * mean_l
        covariance = group_sum(level * table) / counts - mean_l * mean_m
        fitted = np.divide(covariance, spread, out=step.copy(), where=spread > 1e-12)
        step = np.maximum(fitted, 0.0)
        offset = np.maximum(mean_m - step * mean_l, 0.0)
    return offset, step


def _stored_scales(offsets: np.ndarray, steps: np.ndarray, scale_dt: DType, dt: DType
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The scales as stored (their bits), widened to the model's wide type."""
    def wide(bits: np.ndarray) -> np.ndarray:
        return to_wide(bits, scale_dt).astype(dt.wide)
    return wide(offsets), wide(steps)


def _assign(magnitude: np.ndarray, a: np.ndarray, b: np.ndarray, starts: np.ndarray,
            bits: int) -> np.ndarray:
    """The nearest level of every magnitude, with the stored scales of its group."""
    top = (1 << (bits - 1)) - 1
    if top == 0 or magnitude.size == 0:
        return np.zeros(magnitude.size, np.uint8)
    sizes = np.diff(np.append(starts, magnitude.size))
    offset, step = np.repeat(a, sizes), np.repeat(b, sizes)
    with np.errstate(all="ignore"):
        level = np.where(step > 0, np.rint((magnitude - offset) / step), 0)
    return np.clip(np.nan_to_num(level), 0, top).astype(np.uint8)


def _magnitudes(levels: np.ndarray, a: np.ndarray, b: np.ndarray, starts: np.ndarray,
                wide: np.dtype) -> np.ndarray:
    """``a + b * level`` per value, in the wide type (the decoder's arithmetic)."""
    if levels.size == 0:
        return np.empty(0, wide)
    sizes = np.diff(np.append(starts, levels.size))
    with np.errstate(all="ignore"):
        return np.repeat(a, sizes) + np.repeat(b, sizes) * levels.astype(wide)


def _pack(negative: np.ndarray, levels: np.ndarray, bits: int) -> np.ndarray:
    """k bits per value (sign, then the level's k - 1 bits), little-endian bit strings."""
    columns = [negative.astype(np.uint8)]
    columns += [((levels >> i) & 1).astype(np.uint8) for i in range(bits - 1)]
    stacked = np.stack(columns, axis=1).reshape(-1) if levels.size else np.empty(0, np.uint8)
    return np.packbits(stacked, bitorder="little")


def _check_tail(codes: np.ndarray, bit: int, count: int, bits: int) -> None:
    """Refuse set bits after the last of ``count`` codes starting at bit ``bit`` of
    ``codes``."""
    end = bit + count * bits
    if codes.size * 8 > end and (int(codes[end // 8]) >> (end % 8) or codes[end // 8 + 1:].any()):
        raise DeltaFormatError("quant codes have bits set past the last value")


def _restore(codes: np.ndarray, bit: int, bits: int, group: int, skip: int, a: np.ndarray,
             b: np.ndarray, base: np.ndarray, dt: DType) -> np.ndarray:
    """Regular values restored against ``base`` (their bits): value i's code is the ``bits``
    bits of ``codes`` from bit ``bit + i * bits`` (sign, then level); its group is
    ``(skip + i) // group``, with the stored scales ``a``, ``b`` (wide) of the groups from
    the first value's on.  The decoder's arithmetic: ``base + (-1)^sign * (a + b * level)``
    in the wide type, rounded once; the C loop (``quant_restore``) gives the same bits."""
    m = base.size
    kernels, kind = native.float_kernels(dt.name)
    if kernels is not None:
        out = np.empty(m, dt.bits)
        kernels.quant_restore(kind, bits, group, skip, codes, bit, np.ascontiguousarray(a, dt.wide),
                              np.ascontiguousarray(b, dt.wide), np.ascontiguousarray(base), out)
        return out
    table = np.unpackbits(codes, bitorder="little")[bit:bit + m * bits].reshape(m, bits)
    levels = np.zeros(m, np.uint8)
    for i in range(1, bits):
        levels |= table[:, i] << (i - 1)
    negative = table[:, 0].astype(bool)
    # values in each group the run spans (the first and last may be partial)
    groups = (skip + m - 1) // group + 1 if m else 0
    sizes = np.diff(np.concatenate([[0], np.minimum(np.arange(1, groups + 1) * group - skip, m)]))
    with np.errstate(all="ignore"):
        magnitude = (np.repeat(a[:groups], sizes)
                     + np.repeat(b[:groups], sizes) * levels.astype(dt.wide))
        return from_wide(to_wide(base, dt) + np.where(negative, -magnitude, magnitude), dt)
