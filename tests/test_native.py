"""The optional C loops (sparsestitch/_native.c) against numpy, and the switch between them.

The block merge itself is compared with the numpy and union-based merges by the hypothesis
test in test_device.py; here are its conversions, its refusals, whole stitches, and every
codec decoded both ways (the same bits, or the same error, from damaged payloads too).
CI sets SPARSESTITCH_REQUIRE_NATIVE=1, so a build that silently dropped the C loops fails
there instead of skipping these tests.
"""

from __future__ import annotations

import json
import os
from unittest import mock

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import sparsestitch
from sparsestitch.core import native
from sparsestitch.delta.codecs import POSITION_CODECS, VALUE_CODECS, rice
from sparsestitch.delta.codecs.base import from_planes, gap_decode
from sparsestitch.delta.codecs.tau import TauValues
from sparsestitch.core.dtypes import dtype
from sparsestitch.core.errors import DeltaFormatError
from sparsestitch.localize.topk import magnitude_keys, split_bracket
from sparsestitch.ops.stitch import rule_combiner
from sparsestitch.engine.walk import Stored

from .codec_checks import ALL_DTYPES, position_sets, tunes_of_one_base, value_pairs
from .conftest import finetune_of, save_checkpoint, small_model

kernels = native.kernels()
needs_kernels = pytest.mark.skipif(kernels is None, reason="sparsestitch._native is not built")


def test_the_c_loops_are_built_where_ci_requires_them():
    if os.environ.get("SPARSESTITCH_REQUIRE_NATIVE") == "1":
        assert kernels is not None, "setup.py did not build sparsestitch._native"


def test_the_environment_switches_the_c_loops_off():
    with mock.patch.dict(os.environ, {"SPARSESTITCH_NATIVE": "0"}):
        assert native.kernels() is None


@needs_kernels
def test_float16_to_float32_matches_numpy_for_every_pattern():
    halves = np.arange(1 << 16, dtype=np.uint16)
    got = np.empty(halves.size, np.float32)
    kernels.f16_convert(halves, got, True)
    want = halves.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    assert np.isnan(got[nan]).all()


def _float16_edges() -> np.ndarray:
    """float32 patterns around every float16 rounding boundary: each float16 value, the
    halfway points between neighbours, one float32 ulp either side, and the overflow and
    underflow thresholds."""
    halves = np.arange(0x7C01, dtype=np.uint16)  # +0 .. +inf
    exact = halves.view(np.float16).astype(np.float32).view(np.uint32).astype(np.int64)
    middles = (exact[:-1] + exact[1:]) // 2
    around = np.concatenate([exact, middles, 0x477FF000 + np.arange(-2, 3),
                             0x33000000 + np.arange(-2, 3), 0x38800000 + np.arange(-2, 3)])
    patterns = np.concatenate([around + step for step in (-1, 0, 1)])
    patterns = np.unique(np.clip(patterns, 0, 0x7F800000)).astype(np.uint32)
    return np.concatenate([patterns, patterns | np.uint32(0x80000000)])


@needs_kernels
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_float32_to_float16_rounds_like_numpy(seed):
    """Every boundary, plus a million random patterns (all 2^32 were checked once by hand)."""
    random = np.random.default_rng(seed).integers(0, 1 << 32, 1 << 20, dtype=np.uint64)
    patterns = np.concatenate([_float16_edges(), random.astype(np.uint32)])
    values = patterns.view(np.float32)
    got = np.empty(values.size, np.uint16)
    kernels.f16_convert(values, got, False)
    with np.errstate(over="ignore"):
        want = values.astype(np.float16).view(np.uint16)
    finite = ~np.isnan(values)
    assert np.array_equal(got[finite], want[finite])
    assert (got[~finite] & 0x7E00 == 0x7E00).all()  # a NaN stays a (quiet) NaN


def _merge(kind, block, first, records, total=None, count=None):
    total = np.empty(16, np.float32) if total is None else total
    count = np.empty(16, np.uint32) if count is None else count
    kernels.merge_block(kind, block, first, records, True, 1.0, False, 0x7FC0, total, count)


@needs_kernels
def test_merge_refuses_records_out_of_order_and_mismatched_buffers():
    block = np.zeros(8, np.uint16)
    bits = np.ones(3, np.uint16)
    with pytest.raises(ValueError, match="record 0's positions are not strictly increasing"):
        _merge(0, block, 0, [(np.array([1, 5, 5]), bits, bits, 1.0)])
    with pytest.raises(ValueError, match="differ in length"):
        _merge(0, block, 0, [(np.array([1, 2]), bits, bits, 1.0)])
    with pytest.raises(TypeError, match="block has 4-byte items, expected 2"):
        _merge(0, np.zeros(8, np.uint32), 0, [])
    with pytest.raises(TypeError, match="positions has 4-byte items"):
        _merge(0, block, 0, [(np.array([1, 2, 3], np.int32), bits, bits, 1.0)])
    with pytest.raises(ValueError, match="a window of 1 or more"):
        _merge(0, block, 0, [], count=np.empty(0, np.uint32))


@needs_kernels
def test_merge_never_writes_into_a_copy_of_a_strided_block():
    """A non-contiguous block is refused; it is not merged into a temporary and lost."""
    dt = dtype("BF16")
    stored = Stored(np.array([0, 2]), np.array([0x3F80, 0x4000], np.uint16),
                    np.zeros(2, np.uint16))
    merge = rule_combiner("localize-stitch", None, 1).block_merge(dt, [stored])
    block = np.zeros(8, np.uint16)
    with pytest.raises(ValueError, match="not C-contiguous"):
        merge(block[::2], 0)
    assert not block.any()
    merge(block, 0)
    assert block.tolist() == [0x3F80, 0, 0x4000, 0, 0, 0, 0, 0]


@needs_kernels
@pytest.mark.parametrize("rule", ["localize-stitch", "task-arithmetic"])
def test_stitched_files_are_identical_with_and_without_the_c_loops(tmp_path, rule):
    base_model = small_model(seed=0)
    save_checkpoint(tmp_path / "base.safetensors", base_model)
    deltas = []
    for task in range(3):
        save_checkpoint(tmp_path / f"ft{task}.safetensors", finetune_of(base_model, seed=task + 1))
        sparsestitch.compress(tmp_path / "base.safetensors", tmp_path / f"ft{task}.safetensors",
                              tmp_path / f"d{task}.delta", density=0.3)
        deltas.append(tmp_path / f"d{task}.delta")
    options = {"scale": 0.6} if rule == "task-arithmetic" else {}
    with mock.patch.object(kernels, "merge_block", wraps=kernels.merge_block) as spy:
        with_c = sparsestitch.stitch(tmp_path / "base.safetensors", deltas,
                                     tmp_path / "c.safetensors", rule=rule,
                                     weights=[1.0, 0.5, 2.0], **options)
    assert spy.call_count >= 3  # the C loop merged the float tensors
    with mock.patch.dict(os.environ, {"SPARSESTITCH_NATIVE": "0"}):
        without = sparsestitch.stitch(tmp_path / "base.safetensors", deltas,
                                      tmp_path / "numpy.safetensors", rule=rule,
                                      weights=[1.0, 0.5, 2.0], **options)
    assert with_c.read_bytes() == without.read_bytes()
    assert with_c.read_bytes() != (tmp_path / "base.safetensors").read_bytes()


# -- decoding helpers: the C path and the numpy path give the same output or the same error --

def _both(decode):
    """``decode()`` with the C loops and with numpy: each result's bytes, or its error."""
    outcomes = []
    for switch in ("1", "0"):
        with mock.patch.dict(os.environ, {"SPARSESTITCH_NATIVE": switch}):
            try:
                result = decode()
                outcomes.append((result.dtype.str, result.tobytes()))
            except DeltaFormatError as error:
                outcomes.append((type(error).__name__, str(error)))
    return outcomes


@needs_kernels
@settings(max_examples=150, deadline=None)
@given(case=position_sets(), damage=st.lists(st.tuples(st.integers(0, 1 << 20),
                                                       st.integers(1, 255)), max_size=3))
def test_position_codecs_decode_alike_in_c_and_numpy_even_when_damaged(case, damage):
    """Every position codec, on its own payload and on the payload with bytes flipped."""
    positions, shape = case
    for codec in POSITION_CODECS:
        if not codec.applies(shape, int(positions.size)):
            continue
        payload, config = codec.encode(positions, shape)
        damaged = bytearray(payload)
        for at, flip in damage:
            if damaged:
                damaged[at % len(damaged)] ^= flip
        for data in (payload, bytes(damaged)):
            native_outcome, numpy_outcome = _both(
                lambda: codec.decode(data, config, shape, int(positions.size)))
            assert native_outcome == numpy_outcome, codec.codec_id
        assert _both(lambda: codec.decode(payload, config, shape, int(positions.size)))[0] == (
            "<i8", positions.astype(np.int64).tobytes())


@needs_kernels
@settings(max_examples=100, deadline=None)
@given(dt=st.sampled_from(ALL_DTYPES), data=st.data())
def test_value_codecs_decode_alike_in_c_and_numpy(dt, data):
    kept, base = data.draw(value_pairs(dt))
    for codec in VALUE_CODECS:
        if not codec.applies(dt) or codec.codec_id == "lowrank":  # factors, not values:
            continue                                  # tests/test_lowrank.py compares its sums
        payload, config = codec.encode(kept, base, dt)
        native_outcome, numpy_outcome = _both(
            lambda: codec.decode(payload, config, base, dt, kept.size))
        assert native_outcome == numpy_outcome
        if codec.exact:
            assert native_outcome == (dt.bits.str, kept.tobytes())


@needs_kernels
@settings(max_examples=200, deadline=None)
@given(gaps=st.lists(st.integers(0, (1 << 64) - 1) | st.integers(0, 5), max_size=20),
       width=st.sampled_from([4, 8]), limit=st.integers(1, 1 << 62) | st.integers(1, 40))
def test_gap_decode_alike_in_c_and_numpy(gaps, width, limit):
    array = np.array([g % (1 << (8 * width)) for g in gaps], dtype=f"<u{width}")
    native_outcome, numpy_outcome = _both(lambda: gap_decode(array, limit))
    assert native_outcome == numpy_outcome


@needs_kernels
@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64), width=st.sampled_from([1, 2, 4, 8]), use_xor=st.booleans())
def test_from_planes_alike_in_c_and_numpy(raw, width, use_xor):
    count = len(raw) // width
    raw = raw[:count * width]
    xor = (np.frombuffer(bytes(reversed(raw)), f"<u{width}") if use_xor else None)
    native_outcome, numpy_outcome = _both(lambda: from_planes(raw, np.dtype(f"<u{width}"),
                                                               count, xor=xor))
    assert native_outcome == numpy_outcome


@needs_kernels
@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(-(1 << 63), (1 << 63) - 1) | st.integers(-3, 3), max_size=12))
def test_strictly_increasing_alike_in_c_and_numpy(values):
    array = np.array(values, dtype=np.int64)
    assert kernels.strictly_increasing(array) == bool(np.all(array[1:] > array[:-1]))


@needs_kernels
@settings(max_examples=100, deadline=None)
@given(dt=st.sampled_from([dtype(n) for n in native.FLOAT_KINDS]), data=st.data())
def test_ranking_keys_alike_in_c_and_numpy(dt, data):
    """Every bit pattern (NaN, inf, subnormals, equal bits), and the bracket split of them."""
    kept, base = data.draw(value_pairs(dt, max_size=200))
    native_outcome, numpy_outcome = _both(lambda: magnitude_keys(kept, base, dt))
    assert native_outcome == numpy_outcome
    keys = magnitude_keys(kept, base, dt)
    low, high = sorted(data.draw(st.lists(st.sampled_from(keys.tolist() or [0])
                                          | st.integers(0, (1 << 32) - 1), min_size=2,
                                          max_size=2)))
    for got, want in zip(*_both_tuples(lambda: split_bracket(keys, low, high))):
        assert got == want


@needs_kernels
@settings(max_examples=150, deadline=None)
@given(dt=st.sampled_from([dtype(n) for n in native.FLOAT_KINDS]), data=st.data(),
       scale=st.sampled_from([0.25, 1.0, 3.0, 1e-30, 1e30, 7.123456789e-3])
       | st.floats(1e-38, 1e38))
def test_scaled_ranking_keys_alike_in_c_and_numpy(dt, data, scale):
    """The keys times a tensor's factor in one pass: numpy's float32 product of the keys and
    np.float32(scale), for every bit pattern (a NaN key stays NaN, a product may underflow to
    a subnormal or 0, or overflow to inf)."""
    kept, base = data.draw(value_pairs(dt, max_size=200))
    native_outcome, numpy_outcome = _both(lambda: magnitude_keys(kept, base, dt, scale))
    assert native_outcome == numpy_outcome
    with np.errstate(all="ignore"):
        want = magnitude_keys(kept, base, dt).view(np.float32) * np.float32(scale)
    assert magnitude_keys(kept, base, dt, scale).tobytes() == want.tobytes()


def _both_tuples(compute):
    """``compute()`` (a tuple of arrays) with the C loops and with numpy, as bytes."""
    outcomes = []
    for switch in ("1", "0"):
        with mock.patch.dict(os.environ, {"SPARSESTITCH_NATIVE": switch}):
            outcomes.append([(a.dtype.str, a.tobytes()) for a in compute()])
    return outcomes


@needs_kernels
@settings(max_examples=300, deadline=None)
@given(unary=st.binary(max_size=40), remainders=st.binary(max_size=80), k=st.integers(0, 32),
       count=st.integers(0, 40), cut=st.integers(0, 7))
def test_rice_decode_alike_in_c_and_numpy_on_arbitrary_streams(unary, remainders, k, count,
                                                                 cut):
    """Any bytes as the two streams (within the lengths the caller checks): the same values,
    or the same complaint about the count of one bits."""
    unary_bits = max(0, 8 * len(unary) - cut) if unary else 0
    if len(unary) != (unary_bits + 7) // 8:
        unary_bits = 8 * len(unary)
    remainders = (remainders * 40)[:(count * k + 7) // 8]
    if len(remainders) != (count * k + 7) // 8:
        return  # too few bytes drawn for this count: the caller refuses that first
    native_outcome, numpy_outcome = _both(lambda: rice.decode(unary, remainders, count, k,
                                                              unary_bits))
    assert native_outcome == numpy_outcome


@pytest.mark.parametrize("length", [1, 2, 8, 9, 17])
def test_a_nan_sum_is_always_an_exception(length):
    """A NaN base meeting a NaN task vector: IEEE 754 leaves the sum's payload open (numpy
    picks the base's in SIMD lanes and tau's in a loop's scalar tail, so it depends on the
    position), so the writer stores the exact bits and every decoder restores them."""
    dt = dtype("F64")
    kept = np.zeros(length, np.uint64)
    base = np.zeros(length, np.uint64)
    kept[-1], base[-1] = 0xFFF8000000000000, 0x7FF8000000000000
    payload, config = TauValues().encode(kept, base, dt)
    assert config["exceptions"] == 1
    for switch in ("1", "0"):
        with mock.patch.dict(os.environ, {"SPARSESTITCH_NATIVE": switch}):
            assert TauValues().decode(payload, config, base, dt, length).tolist() == kept.tolist()


def _tau_payload_of_the_earlier_writer(kept, base, dt):
    """The tau payload as the writer made it before every NaN sum became an exception:
    exceptions only where numpy's own sum rounds to other bits (so decoding relies on numpy's
    choice of NaN payload, which differs between its SIMD lanes and its loop tails)."""
    from sparsestitch.delta.codecs.base import gap_encode, pack_stream, to_planes
    from sparsestitch.core.dtypes import from_wide, to_wide

    base_wide = to_wide(base, dt)
    with np.errstate(all="ignore"):
        tau = to_wide(kept, dt) - base_wide
        exceptions = np.flatnonzero(from_wide(base_wide + tau, dt) != kept)
    streams = [pack_stream(to_planes(tau.view(dt.wide.str.replace("f", "u")))),
               pack_stream(to_planes(gap_encode(exceptions).astype("<u4"))),
               pack_stream(to_planes(kept[exceptions]))]
    config = {"exceptions": int(exceptions.size)}
    for key, (stream, stream_config) in zip(("tau", "exc_index", "exc_bits"), streams):
        config[key], config[f"{key}_nbytes"] = stream_config, len(stream)
    return b"".join(stream for stream, _ in streams), config


@needs_kernels
@pytest.mark.parametrize("dt_name", ["BF16", "F32", "F64"])
def test_files_of_the_earlier_tau_writer_decode_as_numpy_decodes_them(dt_name):
    """Where a NaN base meets a NaN task vector the C decoder defers to numpy (found by a
    review: it took the base's NaN where numpy's loop tail takes tau's)."""
    dt = dtype(dt_name)
    nan_base, nan_kept = {"BF16": (0x7FC1, 0x7FE5), "F32": (0x7FC12345, 0x7FE54321),
                          "F64": (0x7FF8000000000001, 0x7FFC000000000005)}[dt_name]
    rng = np.random.default_rng(0)
    base = rng.integers(0x3C00, 0x4000, 100).astype(dt.bits)
    kept = base ^ rng.integers(0, 4, 100).astype(dt.bits)
    for i in (5, 50, 90, 97, 98, 99):  # SIMD lanes and the loop's scalar tail
        base[i], kept[i] = nan_base, nan_kept
    payload, config = _tau_payload_of_the_earlier_writer(kept, base, dt)
    native_outcome, numpy_outcome = _both(lambda: TauValues().decode(payload, config, base,
                                                                     dt, kept.size))
    assert native_outcome == numpy_outcome


@needs_kernels
def test_a_bitmap_claiming_too_many_positions_is_refused_before_they_are_allocated():
    import tracemalloc

    from sparsestitch.delta.codecs.bitmap import Bitmap

    numel = 1 << 24
    payload, config = Bitmap().encode(np.array([3, 4_000_000], np.int64), (numel,))
    tracemalloc.start()
    try:
        with pytest.raises(DeltaFormatError, match="bitmap marks 2 positions, the record says"):
            Bitmap().decode(payload, config, (numel,), numel)  # 128 MiB of int64 if believed
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    native_outcome, numpy_outcome = _both(lambda: Bitmap().decode(payload, config, (numel,),
                                                                  numel))
    assert native_outcome == numpy_outcome == (
        "DeltaFormatError", f"bitmap marks 2 positions, the record says {numel}")


@needs_kernels
@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(0, 1 << 44) | st.integers(0, 300), max_size=60),
       k=st.integers(0, 32))
def test_rice_encode_alike_in_c_and_numpy(values, k):
    array = np.array(values, dtype=np.uint64)
    if int((array >> np.uint64(k)).sum()) > 1 << 24:
        return  # numpy's encoder spends a byte per unary bit: keep the reference cheap
    outcomes = []
    for switch in ("1", "0"):
        with mock.patch.dict(os.environ, {"SPARSESTITCH_NATIVE": switch}):
            outcomes.append(rice.encode(array, k))
    assert outcomes[0] == outcomes[1]


@needs_kernels
@pytest.mark.parametrize("call, error", [
    (lambda k: k.from_planes(b"\0" * 3, np.empty(2, np.uint16), None), ValueError),
    (lambda k: k.from_planes(b"\0" * 4, np.empty(2, np.uint16), np.empty(3, np.uint16)),
     ValueError),
    (lambda k: k.gap_decode(np.zeros(2, np.uint16), np.empty(2, np.int64), 9), TypeError),
    (lambda k: k.gap_decode(np.zeros(2, np.uint32), np.empty(3, np.int64), 9), ValueError),
    (lambda k: k.bitmap_positions(b"\1", np.empty(1, np.int32)), TypeError),
    (lambda k: k.rice_decode(b"\1", b"", 33, 8, np.empty(1, np.uint64)), ValueError),
    (lambda k: k.rice_decode(b"\1", b"", 0, 9, np.empty(1, np.uint64)), ValueError),
    (lambda k: k.rice_decode(b"\1", b"", 4, 8, np.empty(1, np.uint64)), ValueError),
    (lambda k: k.rice_encode(np.array([70], np.uint64), 0, np.zeros(1, np.uint8),
                             np.zeros(0, np.uint8)), ValueError),
    (lambda k: k.tau_decode(0, b"\0" * 4, np.zeros(2, np.uint16), np.empty(2, np.uint16)),
     ValueError),
    (lambda k: k.tau_decode(7, b"", np.zeros(0, np.uint16), np.empty(0, np.uint16)),
     ValueError),
    (lambda k: k.magnitude_keys(2, np.zeros(2, np.uint32), np.zeros(3, np.uint32),
                                np.empty(2, np.uint32)), ValueError),
    (lambda k: k.keyed_histogram(2, np.zeros(2, np.uint32), np.zeros(2, np.uint32),
                                 np.empty(2, np.uint32), np.zeros(1 << 16, np.int64),
                                 np.zeros(1 << 15, np.float64)), ValueError),
    (lambda k: k.keyed_histogram(0, np.zeros(2, np.uint16), np.zeros(2, np.uint16),
                                 np.empty(3, np.uint32), np.zeros(1 << 16, np.int64),
                                 np.zeros(1 << 16, np.float64)), ValueError),
    (lambda k: k.select_bracket(np.zeros(4, np.uint32), 1, 2, np.empty(3, np.int64),
                                np.empty(4, np.int64), np.empty(4, np.uint32)), ValueError),
    (lambda k: k.f16_convert(np.zeros(2, np.uint16), np.empty(3, np.float32), True), ValueError),
    (lambda k: k.strictly_increasing(np.zeros(2, np.int32)), TypeError),
])
def test_every_c_entry_point_refuses_mismatched_buffers(call, error):
    """Lengths and item sizes are checked before any loop runs (the library never passes
    such buffers; a caller of the module that does gets an exception, not a crash)."""
    with pytest.raises(error):
        call(kernels)


@needs_kernels
@settings(max_examples=150, deadline=None)
@given(dt=st.sampled_from([dtype(n) for n in native.FLOAT_KINDS]), data=st.data(),
       rule=st.sampled_from(["localize-stitch", "task-arithmetic"]))
def test_merge_of_full_fine_tunes_equals_the_positional_merge(dt, data, rule):
    """merge_changed (fine-tunes' bits over the whole block; changed elements count as
    stored) against the numpy reference merge of those elements as positions: every bit
    pattern, equal bits, weights and scales."""
    base, tunes = data.draw(tunes_of_one_base(dt, most=4, max_size=60))
    # repeated past the C loop's 512-element chunks, ending inside one
    repeat = data.draw(st.sampled_from([1, 40]))
    base, tunes = np.tile(base, repeat), [np.tile(t, repeat) for t in tunes]
    weights = data.draw(st.lists(st.sampled_from([1.0, 0.5, -2.0, 3.0]), min_size=len(tunes),
                                 max_size=len(tunes)))
    options = {} if rule == "localize-stitch" else {"scale": data.draw(st.sampled_from([1.0, 0.3]))}
    combiner = rule_combiner(rule, weights, len(tunes), **options)
    first = data.draw(st.integers(0, 1000))
    fast = base.copy()
    combiner.merge_changed(dt, fast, first, tunes)
    reference = base.copy()
    with mock.patch.dict(os.environ, {"SPARSESTITCH_NATIVE": "0"}):
        combiner.merge_changed(dt, reference, first, tunes)
    assert fast.tobytes() == reference.tobytes()


# -- the compress engine's loops (issue 20) -----------------------------------------------------

def _c_and_numpy(call):
    """``call()`` with the C loops and without them."""
    with_c = call()
    with mock.patch.dict(os.environ, {"SPARSESTITCH_NATIVE": "0"}):
        return with_c, call()


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from(["BF16", "F16", "F32", "F64"]))
def test_key_statistics_and_thresholds_alike_in_c_and_numpy(data, dt_name):
    from sparsestitch.localize.stats import BINS, key_histogram, keys_at_least

    dt = dtype(dt_name)
    kept, base = data.draw(value_pairs(dt, max_size=300))
    keys = magnitude_keys(kept, base, dt)
    threshold = int(data.draw(st.sampled_from([0, 1, *keys.tolist()] if keys.size else [0])))

    def stats():
        counts, energy = np.zeros(BINS, np.int64), np.zeros(BINS, np.float64)
        key_histogram(keys, counts, energy)
        return counts, energy.view(np.uint64), keys_at_least(keys, threshold)
    with_c, plain = _c_and_numpy(stats)
    for a, b in zip(with_c, plain):
        assert np.array_equal(a, b)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from(["BF16", "F16", "F32", "F64"]), st.integers(1, 3))
def test_keys_binned_in_one_pass_as_in_three(data, dt_name, copies):
    """keyed_histogram (keys, their bins and the changed count in one C pass, a chunk at a
    time) gives what magnitude_keys, key_histogram and count_changed give, and numpy too;
    longer than a chunk (``copies`` of the pairs) so chunk edges are crossed."""
    from sparsestitch.localize.stats import BINS, count_changed, key_histogram, keyed_histogram

    dt = dtype(dt_name)
    kept, base = data.draw(value_pairs(dt, max_size=1500))
    kept, base = np.tile(kept, copies), np.tile(base, copies)

    def in_one_pass():
        counts, energy = np.zeros(BINS, np.int64), np.zeros(BINS, np.float64)
        keys, changed = keyed_histogram(kept, base, dt, counts, energy)
        return keys, counts, energy.view(np.uint64), np.array([changed])

    counts, energy = np.zeros(BINS, np.int64), np.zeros(BINS, np.float64)
    keys = magnitude_keys(kept, base, dt)
    key_histogram(keys, counts, energy)
    apart = keys, counts, energy.view(np.uint64), np.array([count_changed(kept, base)])
    with_c, plain = _c_and_numpy(in_one_pass)
    for a, b, c in zip(with_c, plain, apart):
        assert np.array_equal(a, c) and np.array_equal(b, c)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1e30, allow_nan=False, width=64), min_size=1, max_size=700),
       st.sampled_from([1, 2, 3, 4, 8]), st.sampled_from([1, 3, 8, 128, 1000]))
def test_quant_fit_alike_in_c_and_numpy(values, bits, group):
    from sparsestitch.delta.codecs.quant import _group_starts, _fit  # noqa: PLC2701 - the twins

    magnitude = np.array(values)
    starts = _group_starts(magnitude.size, group if group < magnitude.size else 0)
    with_c, plain = _c_and_numpy(lambda: _fit(magnitude, starts, bits))
    for a, b in zip(with_c, plain):
        assert np.array_equal(a.view(np.uint64), b.view(np.uint64))


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 600), min_size=1, max_size=900), st.integers(-30, 30),
       st.sampled_from([2, 3, 4, 8]), st.sampled_from([2, 5, 64, 128, 5000]))
def test_quant_fit_on_a_lattice_alike_in_c_and_numpy(values, exponent, bits, group):
    """Magnitudes on a lattice put a group's first levels exactly halfway between two (the C
    fit multiplies by the step's reciprocal and divides again where a level is that close):
    the same bits as numpy's division, groups fitted eight at a time or alone."""
    from sparsestitch.delta.codecs.quant import _group_starts, _fit  # noqa: PLC2701 - the twins

    magnitude = np.ldexp(np.array(values, np.float64), exponent)
    starts = _group_starts(magnitude.size, group if group < magnitude.size else 0)
    with_c, plain = _c_and_numpy(lambda: _fit(magnitude, starts, bits))
    for a, b in zip(with_c, plain):
        assert np.array_equal(a.view(np.uint64), b.view(np.uint64))


@needs_kernels
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_fit_halfway_between_levels_alike_in_c_and_numpy(bits):
    """Groups whose first round puts values exactly halfway between two levels, with steps
    whose reciprocal is inexact: x * (1 / step) falls on the other side of the half for many
    of them, so only the division gives numpy's levels."""
    from sparsestitch.delta.codecs.quant import _group_starts, _fit  # noqa: PLC2701 - the twins

    top = (1 << (bits - 1)) - 1
    halves = [(k + 0.5) for k in range(min(top, 20))]
    everywhere = [np.array([0.0, top, *halves] * 4) * step for step in range(3, 160)]
    # one half each, the last of five: past the vectors of four, in the loop's tail
    in_the_tail = [np.array([0.0, top, 1.0, 1.0, half]) * step
                   for step in range(3, 160) for half in halves]
    for groups in (everywhere, in_the_tail):  # each of one size: fitted eight at a time
        magnitude = np.concatenate(groups)
        starts = _group_starts(magnitude.size, groups[0].size)
        with_c, plain = _c_and_numpy(lambda: _fit(magnitude, starts, bits))  # noqa: B023
        for a, b in zip(with_c, plain):
            assert np.array_equal(a.view(np.uint64), b.view(np.uint64))


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from(["BF16", "F16", "F32", "F64"]), st.sampled_from([1, 2, 3, 4, 8]),
       st.sampled_from([1, 3, 8, 128, 1000]))
def test_quant_fit_from_bits_is_the_fit_of_their_magnitudes(data, dt_name, bits, group):
    """quant_fit_bits (magnitudes computed a group at a time in C) gives what _fit gives for
    the magnitudes numpy computes, bit for bit, over the values the encoder fits (the
    regular ones: base, fine-tuned value and difference finite; zeros and subnormals too)."""
    from sparsestitch.core.dtypes import to_wide
    from sparsestitch.delta.codecs.quant import (  # noqa: PLC2701 - the twins
        FIT_ROUNDS, _fit, _group_starts, _non_finite)

    dt = dtype(dt_name)
    kept, base = data.draw(value_pairs(dt, max_size=300))
    regular = ~_non_finite(kept, base, dt)
    kept, base = kept[regular], base[regular]
    assume(kept.size > 0)
    starts = _group_starts(kept.size, group if group < kept.size else 0)
    with np.errstate(all="ignore"):
        magnitude = np.abs((to_wide(kept, dt) - to_wide(base, dt)).astype(np.float64))
    with mock.patch.dict(os.environ, {"SPARSESTITCH_NATIVE": "0"}), np.errstate(all="ignore"):
        offsets, steps = _fit(magnitude, starts, bits)  # as the encoder calls it
    got_offsets, got_steps = np.empty(starts.size), np.empty(starts.size)
    size = int(starts[1]) if starts.size > 1 else kept.size
    kernels_, kind = native.float_kernels(dt_name)
    kernels_.quant_fit_bits(kind, kept, base, size, bits, FIT_ROUNDS, got_offsets, got_steps)
    assert np.array_equal(got_offsets.view(np.uint64), offsets.view(np.uint64))
    assert np.array_equal(got_steps.view(np.uint64), steps.view(np.uint64))


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, (1 << 32) - 1), max_size=300))
def test_high_histogram_alike_in_c_and_numpy(keys):
    from sparsestitch.localize.topk import high_histogram

    keys = np.array(keys, np.uint32)
    with_c, plain = _c_and_numpy(lambda: high_histogram(keys))
    assert with_c.dtype == plain.dtype and np.array_equal(with_c, plain)
    assert with_c.size == 1 << 16 and int(with_c.sum()) == keys.size


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from(ALL_DTYPES))
def test_changed_count_alike_in_c_and_numpy(data, dt):
    from sparsestitch.localize.stats import count_changed

    kept, base = data.draw(value_pairs(dt, max_size=300))
    with_c, plain = _c_and_numpy(lambda: count_changed(kept, base))
    assert with_c == plain == int(np.count_nonzero(kept != base))


@needs_kernels
@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, (1 << 32) - 1), max_size=200), st.integers(0, 7),
       st.sampled_from([2, 4, 8]), st.data())
def test_selection_by_threshold_alike_in_c_and_numpy(keys, first, itemsize, data):
    """One pass of select_at_least keeps the elements numpy's comparison keeps, in order,
    and ORs exactly their bits into a window whose earlier bits are already set (eight at a
    time where the CPU has AVX2: thresholds at the signed boundary and 0 among them)."""
    from sparsestitch.localize.stats import select_at_least

    keys = np.array(keys, np.uint32)
    threshold = data.draw(st.sampled_from([0, 1, 1 << 31, (1 << 31) + 1, (1 << 32) - 1,
                                           *keys.tolist()]))
    bits = np.dtype(f"<u{itemsize}")
    finetuned = np.arange(keys.size, dtype=bits) * 3 + 1
    base = np.arange(keys.size, dtype=bits) * 5
    earlier = (1 << first) - 1  # the bits of elements earlier blocks marked

    def select():
        window = np.zeros((first + keys.size + 7) // 8 or 1, np.uint8)
        window[0] = earlier
        got = select_at_least(keys, threshold, finetuned, base, window, first)
        return (*got, window)
    with_c, plain = _c_and_numpy(select)
    keep = keys >= threshold
    for got in (with_c, plain):
        assert np.array_equal(got[0], finetuned[keep]) and np.array_equal(got[1], base[keep])
        assert np.array_equal(got[2], keys[keep])
        marks = np.unpackbits(got[3], bitorder="little").astype(bool)
        assert np.array_equal(marks[first:first + keys.size], keep)
        assert marks[:first].all() and not marks[first + keys.size:].any()


def _non_finite(kept, base, dt):
    from sparsestitch.delta.codecs.quant import _non_finite as twins  # noqa: PLC2701

    return twins(kept, base, dt)


def _ulp_planes(kept, base, dt):
    from sparsestitch.delta.codecs.ulp import stored_planes

    return stored_planes(kept, base, dt)


@needs_kernels
@pytest.mark.parametrize("loop", [_ulp_planes, _non_finite])
@settings(max_examples=60, deadline=None)
@given(data=st.data(), dt_name=st.sampled_from(["BF16", "F16", "F32", "F64"]))
def test_value_pair_loops_alike_in_c_and_numpy(loop, data, dt_name):
    """The ulp codec's stream and the quant codec's non-finite test of (fine-tuned, base)
    pairs, special values included: the C loop gives numpy's result, dtype and all."""
    dt = dtype(dt_name)
    kept, base = data.draw(value_pairs(dt, max_size=300))
    with_c, plain = _c_and_numpy(lambda: loop(kept, base, dt))
    assert with_c.dtype == plain.dtype and np.array_equal(with_c, plain)


@needs_kernels
@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 1 << 16), max_size=300), st.integers(0, 32),
       st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_rice_runs_alike_in_c_and_numpy(values, k, runs):
    """Decoding a Rice code in runs from the middle of the streams gives every value, in C
    and in numpy, and ends exactly at the stream's last bit."""
    values = np.array(values, np.uint64)
    unary, remainders, unary_bits = rice.encode(values, k)
    unary, remainders = np.frombuffer(unary, np.uint8), np.frombuffer(remainders, np.uint8)

    def decode():
        out, bit, at, i = [], 0, 0, 0
        while at < values.size:
            n = min(runs[i % len(runs)], values.size - at)
            got, bit = rice.decode_at(unary, remainders, k, unary_bits, bit, at, n)
            out.append(got)
            at, i = at + got.size, i + 1
        return (np.concatenate(out) if out else np.empty(0, np.uint64)), bit
    (a, end_a), (b, end_b) = _c_and_numpy(decode)
    assert np.array_equal(a, values) and np.array_equal(b, values)
    assert end_a == end_b == (unary_bits if values.size else 0)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from(["BF16", "F16", "F32", "F64"]), st.sampled_from([1, 2, 3, 4, 8]),
       st.sampled_from([0, 1, 3, 128]))
def test_quant_encoding_alike_in_c_and_numpy(data, dt_name, bits, group):
    """The whole quant encoder -- fit, assignment, overflow, error -- writes the same payload
    and config with the C loops and without them, special values included."""
    from sparsestitch.delta.codecs.quant import QuantValues

    dt = dtype(dt_name)
    kept, base = data.draw(value_pairs(dt, max_size=300))
    with_c, plain = _c_and_numpy(lambda: QuantValues().encode(kept, base, dt, bits=bits,
                                                              group=group))
    assert with_c == plain


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from(["BF16", "F16", "F32", "F64"]), st.sampled_from([1, 2, 3, 4, 8]),
       st.sampled_from([0, 1, 3, 128]))
def test_quant_restoring_alike_in_c_and_numpy(data, dt_name, bits, group):
    """Quant values restored whole and in runs of every length, against the base they were
    made from and against another (special values, overflow and NaN included): the C loop
    gives numpy's bits."""
    from sparsestitch.delta.codecs.quant import QuantValues

    from .codec_checks import bit_patterns, cursor_parts

    dt = dtype(dt_name)
    kept, base = data.draw(value_pairs(dt, max_size=300))
    other = np.array(data.draw(st.lists(bit_patterns(dt), min_size=kept.size,
                                        max_size=kept.size)), dt.bits)
    codec = QuantValues()
    payload, config = codec.encode(kept, base, dt, bits=bits, group=group)
    config = json.loads(json.dumps(config))
    for against in (base, other):
        def decoded():
            whole = codec.decode(payload, config, against, dt, int(kept.size))
            runs = []
            for run, part in cursor_parts(payload, int(kept.size)):
                cursor = codec.cursor(part, config, dt, int(kept.size))
                runs.append([cursor.take(against[at:at + run], min(run, kept.size - at))
                             for at in range(0, kept.size, run)])
                cursor.close()
            return whole, runs
        (whole_c, runs_c), (whole_np, runs_np) = _c_and_numpy(decoded)
        assert np.array_equal(whole_c, whole_np)
        for c, plain in zip(runs_c, runs_np):
            assert np.array_equal(np.concatenate(c) if c else whole_np[:0], whole_np)
            assert np.array_equal(np.concatenate(plain) if plain else whole_np[:0], whole_np)


@needs_kernels
@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(0, 319), st.integers(0, 320),
       st.sampled_from([np.uint8, np.uint16, np.uint32, np.uint64]))
def test_bitmap_windows_in_c_match_numpy(raw, first, n, item):
    """bitmap_count / bitmap_move (a gather and a scatter through a window of bits, no
    position array) against numpy's unpacked bits, at any bit offset and length."""
    from sparsestitch.delta.codecs import bitmap
    window = np.frombuffer(raw, np.uint8)
    first = min(first, 8 * window.size)
    n = min(n, 8 * window.size - first)
    marks = np.unpackbits(window, bitorder="little").view(bool)[first:first + n]
    block = np.arange(1, n + 1).astype(item)
    assert bitmap.marked_count(window, first, n) == int(marks.sum())
    np.testing.assert_array_equal(bitmap.gather_marked(window, first, block, int(marks.sum())),
                                  block[marks])
    values = (np.arange(int(marks.sum())) + 7000).astype(item)
    put = block.copy()
    bitmap.put_marked(window, first, put, values)
    expected = block.copy()
    expected[marks] = values
    np.testing.assert_array_equal(put, expected)
    with mock.patch.object(native, "kernels", lambda: None):  # the numpy fallback agrees
        again = block.copy()
        bitmap.put_marked(window, first, again, values)
        np.testing.assert_array_equal(again, expected)
        assert bitmap.marked_count(window, first, n) == int(marks.sum())


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), first=st.integers(0, 7), n=st.integers(0, 3000),
       density=st.sampled_from([0.05, 0.5, 0.86, 0.99]),
       item=st.sampled_from([np.uint8, np.uint16, np.uint32, np.uint64]))
def test_bitmap_moves_of_long_windows_match_numpy(seed, first, n, density, item):
    """Long windows take the loops that move eight elements at a time (16- and 32-bit items
    where the CPU has AVX2): the same elements as numpy's unpacked bits, and put leaves the
    unmarked elements alone."""
    from sparsestitch.delta.codecs import bitmap
    rng = np.random.default_rng(seed)
    marks = rng.random(first + n) < density
    window = np.packbits(marks, bitorder="little")
    marks = marks[first:]
    block = rng.integers(0, np.iinfo(item).max, n, dtype=np.uint64).astype(item)
    count = int(marks.sum())
    np.testing.assert_array_equal(bitmap.gather_marked(window, first, block, count), block[marks])
    values = rng.integers(0, np.iinfo(item).max, count, dtype=np.uint64).astype(item)
    put = block.copy()
    bitmap.put_marked(window, first, put, values)
    expected = block.copy()
    expected[marks] = values
    np.testing.assert_array_equal(put, expected)


@needs_kernels
def test_bitmap_move_refuses_a_wrong_count_or_range():
    window = np.array([0b1011], np.uint8)
    block = np.zeros(8, np.uint16)
    with pytest.raises(ValueError, match="marks 3 elements, 2 values"):
        kernels.bitmap_move(window, 0, block, np.zeros(2, np.uint16), True)
    with pytest.raises(ValueError, match="past the bits"):
        kernels.bitmap_move(window, 1, block, np.zeros(3, np.uint16), True)
    with pytest.raises(TypeError):
        kernels.bitmap_move(window, 0, block, np.zeros(3, np.uint32), True)
    assert not block.any()


@pytest.mark.parametrize("setting, expected", [("one", True), ("any", False)])
def test_one_malloc_arena_is_asked_for_once_and_can_be_left_alone(setting, expected):
    """glibc's malloc is told to use one arena (stitch asks, before its threads
    start), unless SPARSESTITCH_MALLOC_ARENAS=any; a fresh interpreter, as the setting is
    process-wide."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt's M_ARENA_MAX is glibc's")
    code = ("from sparsestitch.core import native\n"
            "first = native.one_malloc_arena()\n"
            "print(first, native.one_malloc_arena(), native.malloc_arena_limited())")
    env = {**os.environ, "SPARSESTITCH_MALLOC_ARENAS": setting}
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=60, check=True).stdout.split()
    assert shown == [str(expected)] * 3


def test_freed_blocks_are_kept_for_the_next_ones():
    """With keep_freed_blocks (compress, merge, stitch and restore ask for it) arrays of a
    block's size, allocated and freed over and over as a pass over a model does, reuse the
    freed memory instead of taking fresh pages each time; SPARSESTITCH_MALLOC_KEEP=0 leaves
    glibc's choice.  Page faults counted in fresh interpreters (the setting is process-wide),
    one with the setting and one without."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt's thresholds are glibc's")
    code = ("import resource, numpy as np\n"
            "from sparsestitch.core import native\n"
            "kept = native.keep_freed_blocks()\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(50):\n"  # a block's arrays, then all of them freed
            "    arrays = [np.ones(4 << 20, np.uint8) for _ in range(6)]\n"
            "    del arrays\n"
            "print(kept, native.keep_freed_blocks(), "
            "resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    faults = {}
    for setting, expected in (("1", True), ("0", False)):
        env = {**os.environ, "SPARSESTITCH_MALLOC_KEEP": setting}
        first, again, count = subprocess.run([sys.executable, "-c", code], env=env,
                                             capture_output=True, text=True, timeout=60,
                                             check=True).stdout.split()
        assert first == again == str(expected)
        faults[expected] = int(count)
    if faults[False] < 20_000:  # e.g. huge pages: this kernel faults little either way
        pytest.skip(f"glibc's own choice took only {faults[False]} page faults here")
    # 50 rounds of 24 MiB are 307,200 small pages: kept, about the first round's 6,144
    assert faults[True] * 5 < faults[False]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_block_merge_of_bitmap_records_equals_the_merge_of_their_positions(data):
    """merge_block given a record as a bitmap (bytes, the bit of its first element) writes
    the bits it writes given the same record's positions: every window size, start, bit
    offset, weight and merge form."""
    kernels = native.kernels()
    if kernels is None:
        pytest.skip("the C loops are not built")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    n, first = data.draw(st.integers(1, 2000)), data.draw(st.integers(0, 40))
    base = rng.integers(0, 2**16, n + first, dtype=np.uint16)
    as_positions, as_bits = [], []
    for _ in range(data.draw(st.integers(1, 4))):
        mask = rng.random(n + first) < data.draw(st.sampled_from([0.02, 0.5, 0.97, 1.0]))
        positions = np.flatnonzero(mask).astype(np.int64)
        finetuned = rng.integers(0, 2**16, positions.size, dtype=np.uint16)
        weight = data.draw(st.sampled_from([1.0, 0.5, -2.0]))
        as_positions.append((positions, finetuned, base[positions], weight))
        shift = data.draw(st.integers(0, 7))
        bits = np.packbits(np.concatenate([np.zeros(shift, bool), mask]), bitorder="little")
        as_bits.append((bits, finetuned, base[positions], weight, 0, shift))
    window = data.draw(st.sampled_from([64, 1000, 1 << 16]))
    mean, lone = data.draw(st.sampled_from([(1, 1), (1, 0), (0, 0)]))
    merged = []
    for records in (as_positions, as_bits):
        block = base[first:].copy()
        kernels.merge_block(0, block, first, records, mean, 0.7, lone, 0x7FC0,
                            np.empty(window, np.float32), np.empty(window, np.uint32))
        merged.append(block)
    np.testing.assert_array_equal(merged[0], merged[1])


def test_a_bitmap_record_with_a_bad_bit_is_refused():
    kernels = native.kernels()
    if kernels is None:
        pytest.skip("the C loops are not built")
    block = np.zeros(8, np.uint16)
    record = (np.array([1], np.uint8), np.ones(1, np.uint16), np.zeros(1, np.uint16), 1.0, 0, 8)
    with pytest.raises(ValueError, match="a bit of 0..7"):
        kernels.merge_block(0, block, 0, [record], 1, 1.0, 1, 0x7FC0,
                            np.empty(64, np.float32), np.empty(64, np.uint32))


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_block_merge_runs_and_parts_equal_the_reference(data):
    """The C block merge walks bitmaps 64 marks at a time and merges runs (a dense record,
    a word of 64 marks) and fully touched words in vectorized loops; in parts side by side
    (``BlockMerge.in_parts``) too.  Records as positions, as every element and as bitmaps
    (long runs of marks at any bit offset, gaps, NaNs) give the bits of the union-based
    reference merge, for every float dtype, rule form and weight."""
    from sparsestitch.combine import combiners
    from sparsestitch.combine.combiners import BlockMerge, rule_combiner
    from sparsestitch.core.dtypes import dtype as lookup_dtype
    from sparsestitch.core.dtypes import from_wide
    from sparsestitch.engine import parallel
    from sparsestitch.engine.walk import Marked, Stored

    if native.kernels() is None:
        pytest.skip("the C loops are not built")
    dt = lookup_dtype(data.draw(st.sampled_from(["BF16", "F16", "F32", "F64"])))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    numel = data.draw(st.integers(1, 3000))
    base = from_wide(rng.normal(0, 1, numel).astype(dt.wide), dt)
    nan = from_wide(np.array([np.nan], dt.wide), dt)[0]
    stored, rich = [], []
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["positions", "dense", "bitmap"]))
        if kind == "dense":
            mask = np.ones(numel, bool)
        else:  # runs of marks (whole 64-bit words) between random stretches
            mask = rng.random(numel) < data.draw(st.sampled_from([0.1, 0.86, 1.0]))
            for _ in range(3):
                a = int(rng.integers(0, numel))
                mask[a:a + int(rng.integers(0, 300))] = True
        positions = np.flatnonzero(mask).astype(np.int64)
        finetuned = base[positions].copy()
        moved = rng.random(positions.size) < 0.9
        finetuned[moved] ^= rng.integers(1, 1 << 6, int(moved.sum())).astype(dt.bits)
        if positions.size and data.draw(st.booleans()):
            finetuned[0] = nan
        plain = Stored(positions, finetuned, base[positions])
        stored.append(plain)
        if kind == "dense":
            rich.append(Stored(None, finetuned, base[positions]))
        elif kind == "bitmap":
            shift = data.draw(st.integers(0, 7))
            bits = np.packbits(np.concatenate([np.zeros(shift, bool), mask]), bitorder="little")
            rich.append(Marked(bits, shift, finetuned, base[positions]))
        else:
            rich.append(plain)
    count = len(stored)
    rule = data.draw(st.sampled_from(["localize-stitch", "task-arithmetic"]))
    weights = data.draw(st.lists(st.sampled_from([1.0, 0.5, -2.0]), min_size=count,
                                 max_size=count))
    options = {"scale": 0.7} if rule == "task-arithmetic" else {}
    combiner = rule_combiner(rule, weights, count, **options)
    where, bits = combiner.combine("w", dt, numel, stored)
    want = base.copy()
    want[where] = bits
    merge = combiner.block_merge(dt, rich)
    assert isinstance(merge, BlockMerge) and merge.kernels is not None
    got = base.copy()
    merge(got, 0)
    np.testing.assert_array_equal(got, want)
    with mock.patch.object(parallel, "PARALLEL_MIN", 1), \
            mock.patch.object(BlockMerge, "WINDOW", 64):
        split = combiner.block_merge(dt, rich)
        got = base.copy()
        combiners.merge_in_parts(split, got, 0, data.draw(st.integers(2, 4)))
    np.testing.assert_array_equal(got, want)
