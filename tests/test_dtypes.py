"""sparsestitch.dtypes: exact widening, and narrowing that rounds exactly as torch does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsestitch.core.dtypes import SAFETENSORS_DTYPES, dtype, from_wide, to_wide

from .codec_checks import special_bits

BF16, F16, F32, F64 = (dtype(n) for n in ("BF16", "F16", "F32", "F64"))
ALL_16_BITS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "U64": torch.uint64, "I32": torch.int32, "U32": torch.uint32, "I16": torch.int16,
    "U16": torch.uint16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def torch_cast_bits(f32_bits: np.ndarray, target: torch.dtype) -> np.ndarray:
    """float32 bits -> torch ``.to(target)`` -> the target's bits."""
    cast = torch.from_numpy(f32_bits.view(np.int32).copy()).view(torch.float32).to(target)
    return cast.view(torch.int16).numpy().view(np.uint16)


def narrow(values: np.ndarray, dt) -> np.ndarray:
    """``from_wide`` as its callers call it: numpy's F16 cast warns when it overflows to inf."""
    with np.errstate(over="ignore"):
        return from_wide(values, dt)


def torch_widen_bits(bits16: np.ndarray, source: torch.dtype) -> np.ndarray:
    wide = torch.from_numpy(bits16.view(np.int16).copy()).view(source).to(torch.float32)
    return wide.view(torch.int32).numpy().view(np.uint32)


def is_nan16(bits: np.ndarray, mantissa_bits: int) -> np.ndarray:
    exponent = (0x7FFF >> mantissa_bits) << mantissa_bits
    return ((bits & exponent) == exponent) & ((bits & ((1 << mantissa_bits) - 1)) != 0)


def test_table_matches_torch_element_sizes():
    assert set(SAFETENSORS_DTYPES) == set(TORCH_DTYPES)
    for name, torch_dtype in TORCH_DTYPES.items():
        dt = dtype(name)
        assert dt.itemsize == torch.empty(0, dtype=torch_dtype).element_size(), name
        assert dt.bits.kind == "u"
        assert dt.is_float == (name in ("F64", "F32", "F16", "BF16")), name
    with pytest.raises(ValueError, match="unsupported dtype"):
        dtype("F4")
    for name in ("I32", "F8_E4M3", "BOOL"):
        with pytest.raises(ValueError):
            to_wide(np.zeros(1, dtype(name).bits), dtype(name))
        with pytest.raises(ValueError):
            from_wide(np.zeros(1, np.float32), dtype(name))


@pytest.mark.parametrize("dt, source, mantissa", [(BF16, torch.bfloat16, 7), (F16, torch.float16, 10)],
                         ids=["BF16", "F16"])
def test_to_wide_is_exact_for_every_16_bit_pattern(dt, source, mantissa):
    wide = to_wide(ALL_16_BITS, dt)
    assert wide.dtype == np.float32
    wide_bits = wide.view(np.uint32)
    nan = is_nan16(ALL_16_BITS, mantissa)
    assert nan.sum() == 2 * ((1 << mantissa) - 1)
    # every number (zeros, subnormals, infinities) widens to exactly torch's value and sign
    np.testing.assert_array_equal(wide_bits[~nan], torch_widen_bits(ALL_16_BITS[~nan], source))
    # a NaN keeps its sign and its whole payload, quiet or signalling (torch would quiet it)
    assert np.isnan(wide[nan]).all()
    nan_bits = ALL_16_BITS[nan].astype(np.uint32)
    np.testing.assert_array_equal(wide_bits[nan] >> 31, nan_bits >> 15)
    np.testing.assert_array_equal(wide_bits[nan] & 0x7FFFFF,
                                  (nan_bits & ((1 << mantissa) - 1)) << (23 - mantissa))


@pytest.mark.parametrize("dt, mantissa", [(BF16, 7), (F16, 10)], ids=["BF16", "F16"])
def test_narrowing_a_widened_16_bit_value_gives_its_bits_back(dt, mantissa):
    back = from_wide(to_wide(ALL_16_BITS, dt), dt)
    assert back.dtype == np.uint16
    nan = is_nan16(ALL_16_BITS, mantissa)
    np.testing.assert_array_equal(back[~nan], ALL_16_BITS[~nan])
    assert is_nan16(back[nan], mantissa).all()
    if dt is BF16:  # the documented NaN rule: sign and payload kept, quiet bit set
        np.testing.assert_array_equal(back[nan], ALL_16_BITS[nan] | 0x0040)


@pytest.mark.parametrize("dt", [F32, F64], ids=["F32", "F64"])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_wide_dtypes_pass_every_bit_pattern_through(dt, data):
    patterns = st.one_of(st.integers(0, (1 << 8 * dt.itemsize) - 1), st.sampled_from(special_bits(dt)))
    bits = np.array(data.draw(st.lists(patterns, max_size=20)), dtype=dt.bits)
    wide = to_wide(bits, dt)
    assert wide.dtype == dt.wide
    np.testing.assert_array_equal(wide.view(dt.bits), bits)
    np.testing.assert_array_equal(from_wide(wide, dt), bits)


def rounding_cases() -> np.ndarray:
    """float32 bit patterns at every rounding edge of both 16-bit formats.

    For each upper half (sign, exponent, top mantissa bits) the low bits just below, at and
    just above the halfway point of BF16 rounding; and the same around F16's rounding bit
    (bit 13) for every exponent F16 reaches, subnormal range and overflow included.
    """
    upper = np.arange(1 << 16, dtype=np.uint32) << 16
    bf16_low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    f16_region = np.arange(0x3000, 0x4800, dtype=np.uint32) << 16  # |x| from 2**-31 to 2**17
    f16_region = np.concatenate([f16_region, f16_region | 0x80000000])
    f16_low = np.array([0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0xFFFF], np.uint32)
    return np.concatenate([(upper[:, None] | bf16_low).ravel(),
                           (f16_region[:, None] | f16_low).ravel()])


@pytest.mark.parametrize("dt, target", [(BF16, torch.bfloat16), (F16, torch.float16)],
                         ids=["BF16", "F16"])
def test_from_wide_rounds_like_torch_at_every_edge(dt, target):
    cases = rounding_cases()
    cases = cases[~np.isnan(cases.view(np.float32))]
    np.testing.assert_array_equal(narrow(cases.view(np.float32), dt), torch_cast_bits(cases, target))


@pytest.mark.parametrize("dt, target", [(BF16, torch.bfloat16), (F16, torch.float16)],
                         ids=["BF16", "F16"])
@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, (1 << 32) - 1), min_size=1, max_size=50))
def test_from_wide_rounds_like_torch_on_any_number(dt, target, patterns):
    cases = np.array(patterns, dtype=np.uint32)
    cases = cases[~np.isnan(cases.view(np.float32))]
    np.testing.assert_array_equal(narrow(cases.view(np.float32), dt), torch_cast_bits(cases, target))


def test_from_wide_overflows_to_infinity_and_keeps_signed_zero():
    values = np.array([3.4028235e38, -3.4028235e38, 65520.0, -65520.0, 65519.0, -0.0, 1e-40,
                       -1e-40, 6e-8], dtype=np.float32)
    assert narrow(values, BF16).tolist() == [0x7F80, 0xFF80, 0x4780, 0xC780, 0x4780, 0x8000,
                                             0x0001, 0x8001, 0x3381]
    assert narrow(values, F16).tolist() == [0x7C00, 0xFC00, 0x7C00, 0xFC00, 0x7BFF, 0x8000,
                                            0x0000, 0x8000, 0x0001]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, (1 << 32) - 1), min_size=1, max_size=30))
def test_nan_narrows_to_nan_of_the_same_sign(patterns):
    nan = (np.array(patterns, dtype=np.uint32) | 0x7F800001)  # exponent all ones, payload > 0
    for dt, mantissa in ((BF16, 7), (F16, 10)):
        out = from_wide(nan.view(np.float32), dt)
        assert is_nan16(out, mantissa).all()
        np.testing.assert_array_equal(out >> 15, nan >> 31)
    np.testing.assert_array_equal(from_wide(nan.view(np.float32), BF16), (nan >> 16) | 0x0040)
