"""Property tests for every position codec, every value codec, the Rice helper and the registry."""

from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from sparsestitch.delta import codecs
from sparsestitch.delta.codecs import POSITION_CODECS, VALUE_CODECS, rice
from sparsestitch.delta.codecs.bitmap import BitmapBuilder
from sparsestitch.delta.codecs.base import (from_planes, gap_decode, gap_encode, pack_stream,
                                            to_planes, unpack_stream)
from sparsestitch.core.dtypes import dtype, from_wide
from sparsestitch.core.errors import DeltaFormatError

from .codec_checks import (ALL_DTYPES, FLOAT_DTYPES, check_position_roundtrip,
                           check_value_roundtrip, numel, position_sets, random_value_pair, shapes,
                           special_bits, value_pairs)

POSITIONS_BY_ID = {codec.codec_id: codec for codec in POSITION_CODECS}
VALUES_BY_ID = {codec.codec_id: codec for codec in VALUE_CODECS}
#: The value codecs that give the fine-tuned bits back exactly (quant is tested on its own).
EXACT_VALUE_CODECS = [codec for codec in VALUE_CODECS if codec.exact]


def test_registry_ids_are_the_file_format():
    # Files name codecs by id: renaming or reordering (ties go to earlier entries) changes files.
    assert tuple(POSITIONS_BY_ID) == ("all", "rice", "csr", "bitmap", "gaps")
    assert tuple(VALUES_BY_ID) == ("tau", "xor", "raw", "quant", "ulp", "lowrank")
    for codec in POSITION_CODECS + VALUE_CODECS:
        with pytest.raises(dataclasses.FrozenInstanceError):
            codec.codec_id = "other"
    for lookup in (codecs.position_codec, codecs.value_codec):
        with pytest.raises(DeltaFormatError):
            lookup("nope")
        with pytest.raises(DeltaFormatError):
            lookup(["unhashable"])


# -- position codecs ------------------------------------------------------------------------------

def expected_applies(codec_id: str, shape: tuple[int, ...], count: int) -> bool:
    if codec_id == "all":
        return count == numel(shape)
    if codec_id == "csr":
        return len(shape) >= 2
    return True


@settings(max_examples=60, deadline=None)
@given(position_sets())
def test_position_cursors_without_the_c_loops(case):
    """The numpy twins of the chunked decoders (Rice runs from the middle of a stream, bitmap
    windows) give the same positions as decoding whole."""
    positions, shape = case
    with mock.patch.dict("os.environ", {"SPARSESTITCH_NATIVE": "0"}):
        for codec in POSITION_CODECS:
            if codec.applies(shape, int(positions.size)):
                check_position_roundtrip(codec, positions, shape)


@settings(max_examples=150, deadline=None)
@given(position_sets())
def test_every_position_codec_roundtrips(case):
    positions, shape = case
    for codec in POSITION_CODECS:
        applies = codec.applies(shape, int(positions.size))
        assert applies == expected_applies(codec.codec_id, shape, int(positions.size)), codec
        if applies:
            check_position_roundtrip(codec, positions, shape)


@settings(max_examples=60, deadline=None)
@given(position_sets())
def test_decoders_refuse_what_their_codec_does_not_apply_to(case):
    positions, shape = case
    count = int(positions.size)
    if not POSITIONS_BY_ID["all"].applies(shape, count):
        with pytest.raises(DeltaFormatError):
            POSITIONS_BY_ID["all"].decode(b"", {}, shape, count)
    if not POSITIONS_BY_ID["csr"].applies(shape, count):
        with pytest.raises(DeltaFormatError):
            POSITIONS_BY_ID["csr"].decode(b"", {}, shape, count)


@settings(max_examples=100, deadline=None)
@given(position_sets())
def test_encode_positions_picks_the_smallest_codec_it_tries(case):
    positions, shape = case
    count = int(positions.size)
    # For speed, encode_positions skips codecs its size rule says cannot win (list codecs at
    # high density, the bitmap at low density); of the rest it keeps the smallest, ties going
    # to the earliest registry entry.
    tried = {codec.codec_id: len(codec.encode(positions, shape)[0]) for codec in POSITION_CODECS
             if codec.applies(shape, count) and codec.worth_trying(positions, shape)}
    payload, config = codecs.encode_positions(positions, shape)
    smallest = min(tried.values())
    assert config["codec"] == next(i for i, size in tried.items() if size == smallest), tried
    assert len(payload) == smallest
    decoded = codecs.position_codec(config["codec"]).decode(payload, config, shape, count)
    np.testing.assert_array_equal(decoded, positions)


@settings(max_examples=100, deadline=None)
@given(position_sets(), st.data())
def test_a_bitmap_built_block_by_block_encodes_as_the_listed_positions(case, data):
    """compress's packed selections (a bitmap filled block by block, blocks of any size and
    offset) write exactly what encode_positions writes for the same positions."""
    positions, shape = case
    n = numel(shape)
    mask = np.zeros(n, bool)
    mask[positions] = True
    builder = BitmapBuilder(n)
    at = 0
    while at < n:
        size = data.draw(st.integers(1, n - at), label="block")
        block = mask[at:at + size]
        builder.add(None if block.all() and data.draw(st.booleans()) else block, size)
        at += size
    packed = builder.finish()
    assert builder.count == positions.size
    np.testing.assert_array_equal(packed, np.packbits(mask, bitorder="little"))
    held = codecs.PackedPositions(packed, builder.count)
    np.testing.assert_array_equal(held.listed(n), positions)
    assert codecs.encode_position_bitmap(held, shape) == codecs.encode_positions(positions, shape)


@settings(max_examples=60, deadline=None)
@given(st.integers(128, 400), st.integers(1, 40), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_sample_rows_are_the_bands_rows_stacked(rows, cols, density, seed):
    positions = np.flatnonzero(np.random.default_rng(seed).random(rows * cols) < density)
    sample, shape = codecs.sample_rows(positions, (rows, cols))
    dense = np.zeros((rows, cols), bool).reshape(-1)
    dense[positions] = True
    bands = codecs.SAMPLE_BANDS * codecs.SAMPLE_EVERY
    edges = [rows * i // bands for i in range(bands + 1)]
    picked = np.concatenate([np.arange(edges[b], edges[b + 1])
                             for b in range(0, bands, codecs.SAMPLE_EVERY)])
    expected = dense.reshape(rows, cols)[picked]
    assert shape == expected.shape
    np.testing.assert_array_equal(sample, np.flatnonzero(expected))
    assert codecs.sample_rows(positions, (bands - 1, cols)) is None  # too few rows to band


@settings(max_examples=80, deadline=None)
@given(position_sets())
def test_ranking_on_a_sample_keeps_the_positions_and_a_codec_near_the_sample_s_best(case):
    positions, shape = case
    count = int(positions.size)
    with mock.patch.object(codecs, "RANK_ON_SAMPLE_FROM", 1):
        payload, config = codecs.encode_positions(positions, shape, rank_on_sample=True)
    decoded = codecs.position_codec(config["codec"]).decode(payload, config, shape, count)
    np.testing.assert_array_equal(decoded, positions)
    tried = {codec.codec_id: codec for codec in POSITION_CODECS
             if codec.applies(shape, count) and codec.worth_trying(positions, shape)}
    assert config["codec"] in tried
    sampled = codecs.sample_rows(positions, shape)
    if sampled is not None and sampled[0].size and len(tried) > 1:
        on_sample = {i: len(c.encode(*sampled)[0]) for i, c in tried.items()
                     if c.applies(sampled[1], sampled[0].size)}
        if config["codec"] in on_sample:  # it was ranked: within the margin of the best there
            assert on_sample[config["codec"]] <= min(on_sample.values()) * codecs.RANKED_WITHIN


@pytest.mark.parametrize("seed", [1, 4, 7])
@pytest.mark.parametrize("layout", ["random", "half the rows empty", "runs"])
def test_ranking_on_a_sample_costs_at_most_a_percent_on_matrices(layout, seed):
    # The sample is an eighth of the rows, so a codec that wins clearly wins there too; where
    # codecs come close the sample may pick another: at most 1% over the smallest of every
    # codec tried (seeds 1 and 4 pick a codec 0.03-0.3% larger than the smallest).
    rng = np.random.default_rng(seed)
    rows, cols = 2048, 384
    mask = rng.random((rows, cols)) < 0.1
    if layout == "half the rows empty":
        mask[rng.random(rows) < 0.5] = False
    elif layout == "runs":
        mask = np.repeat(rng.random((rows, cols // 16)) < 0.1, 16, axis=1)
    positions = np.flatnonzero(mask)
    assert positions.size >= codecs.RANK_ON_SAMPLE_FROM // 8
    with mock.patch.object(codecs, "RANK_ON_SAMPLE_FROM", 1):
        ranked, _ = codecs.encode_positions(positions, (rows, cols), rank_on_sample=True)
    exhaustive, _ = codecs.encode_positions(positions, (rows, cols))
    assert len(exhaustive) <= len(ranked) <= 1.01 * len(exhaustive)


@settings(max_examples=60, deadline=None)
@given(shapes(), st.one_of(st.sampled_from((0.01, 0.03, 0.2, 0.5, 0.6, 0.97)), st.floats(0, 1)),
       st.integers(0, 2**32 - 1))
@example((8, 8, 9), 0.97, 636)
def test_skipped_codecs_never_win_by_more_than_a_few_bytes_on_random_positions(shape, density,
                                                                               seed):
    # encode_positions skips some codecs for speed.  On random positions that costs at most a
    # few bytes: below ~3% density the skipped bitmap is far larger than a list, and above it
    # a skipped list codec beats the bitmap by at most its last partial byte (rice with k=0
    # is the bitmap cut at the last kept position) or, on tensors of a few hundred elements
    # at ~97% density, a zstd frame of nearly all-zero gaps undercutting the bitmap's frame by
    # up to 3 bytes (the example; on 10^5+ elements the bitmap wins by 30% and more).
    # Clustered positions can make a skipped codec win by more: the price of the size rule.
    positions = np.flatnonzero(np.random.default_rng(seed).random(numel(shape)) < density)
    count = int(positions.size)
    sizes = [len(codec.encode(positions, shape)[0]) for codec in POSITION_CODECS
             if codec.applies(shape, count)]
    assert len(codecs.encode_positions(positions, shape)[0]) <= min(sizes) + 4


@pytest.mark.parametrize("shape, positions", [
    ((1 << 40,), [0, 7, (1 << 32) + 5, (1 << 36) + 1, (1 << 40) - 1]),   # gaps >= 2**32
    ((1 << 40,), [1 << 38]),                                              # one huge first gap
    ((1 << 20, 1 << 20), [3, (1 << 20) + 1, (1 << 40) - 1]),
])
def test_list_codecs_handle_positions_beyond_32_bits(shape, positions):
    positions = np.array(positions, dtype=np.int64)
    for codec_id in ("rice", "gaps", "csr"):
        codec = POSITIONS_BY_ID[codec_id]
        if codec.applies(shape, positions.size):
            check_position_roundtrip(codec, positions, shape)


def test_rice_positions_cost_about_log2_inverse_density_bits():
    # the module's promise: ~log2(1/p) + 1.5 bits per position for random positions
    rng = np.random.default_rng(5)
    positions = np.flatnonzero(rng.random(200_000) < 0.01)
    payload = check_position_roundtrip(POSITIONS_BY_ID["rice"], positions, (200_000,))
    assert 8 * len(payload) / positions.size < np.log2(100) + 2.0


# -- the Rice helper ------------------------------------------------------------------------------

@st.composite
def rice_inputs(draw):
    k = draw(st.integers(0, rice.MAX_K))
    # bounded quotients keep the unary stream small; values still reach 2**41
    quotient = st.integers(0, 600)
    values = draw(st.lists(st.tuples(quotient, st.integers(0, (1 << k) - 1)), max_size=60))
    return np.array([(q << k) | r for q, r in values], dtype=np.uint64), k


@settings(max_examples=100, deadline=None)
@given(rice_inputs())
def test_rice_roundtrip_and_sizes(case):
    values, k = case
    unary, remainders, unary_bits = rice.encode(values, k)
    assert unary_bits + values.size * k == rice.encoded_bits(values, k)
    assert len(unary) == (unary_bits + 7) // 8
    assert len(remainders) == (values.size * k + 7) // 8
    decoded = rice.decode(unary, remainders, int(values.size), k, unary_bits)
    assert decoded.dtype == np.uint64
    np.testing.assert_array_equal(decoded, values)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 40), st.integers(0, 1 << 44)), max_size=50))
def test_rice_best_k_is_optimal(values):
    values = np.array(values, dtype=np.uint64)
    k = rice.best_k(values)
    assert 0 <= k <= rice.MAX_K
    assert rice.encoded_bits(values, k) == min(rice.encoded_bits(values, j)
                                               for j in range(rice.MAX_K + 1))


def test_rice_roundtrip_across_chunks():
    values = np.random.default_rng(1).geometric(0.1, (1 << 20) + 13).astype(np.uint64)
    k = rice.best_k(values)
    assert k > 0  # the remainder stream, which is chunked, is exercised
    unary, remainders, unary_bits = rice.encode(values, k)
    np.testing.assert_array_equal(rice.decode(unary, remainders, values.size, k, unary_bits), values)


# -- stream helpers of codecs.base ----------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 4))
def test_pack_stream_roundtrip_keeps_zstd_only_when_smaller(data, repeat):
    raw = data * (1 + 50 * repeat)
    stream, config = pack_stream(raw)
    assert config["raw_nbytes"] == len(raw)
    assert len(stream) <= len(raw)
    assert config["zstd"] == (stream != raw)
    assert unpack_stream(stream, config, len(raw)) == raw


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(ALL_DTYPES), st.data())
def test_planes_and_gaps_roundtrip(dt, data):
    values = np.array(data.draw(st.lists(st.integers(0, (1 << 8 * dt.itemsize) - 1), max_size=20)),
                      dtype=dt.bits)
    planes = to_planes(values)
    assert planes.shape == (dt.itemsize, values.size)
    np.testing.assert_array_equal(from_planes(planes.tobytes(), dt.bits, values.size), values)
    positions = np.unique(values.astype(np.int64) % 1000)
    np.testing.assert_array_equal(gap_decode(gap_encode(positions), 1000), positions)


# -- value codecs ---------------------------------------------------------------------------------

def test_value_codecs_apply_to_the_right_dtypes():
    for dt in ALL_DTYPES:
        assert VALUES_BY_ID["tau"].applies(dt) == dt.is_float
        assert VALUES_BY_ID["ulp"].applies(dt) == dt.is_float
        assert VALUES_BY_ID["xor"].applies(dt) and VALUES_BY_ID["raw"].applies(dt)
    assert VALUES_BY_ID["tau"].needs_base and VALUES_BY_ID["xor"].needs_base
    assert VALUES_BY_ID["ulp"].needs_base and not VALUES_BY_ID["raw"].needs_base
    # Only ulp's stored order depends on other positions' base bits (walk.decode_block).
    assert [c.codec_id for c in VALUE_CODECS if not c.elementwise] == ["ulp"]
    for codec_id in ("tau", "ulp"):
        with pytest.raises(DeltaFormatError):
            VALUES_BY_ID[codec_id].decode(b"", {}, np.zeros(0, np.uint32), dtype("I32"), 0)


@pytest.mark.parametrize("dt", FLOAT_DTYPES, ids=lambda dt: dt.name)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_ulp_roundtrips_every_bit_pattern_with_and_without_the_c_loops(dt, data):
    """NaN payloads, infinities, -0.0, subnormals, sign flips: every pair comes back exactly,
    and the C decoder gives what numpy gives."""
    kept, base = data.draw(value_pairs(dt, max_size=80))
    specials = np.array(special_bits(dt), dtype=np.uint64).astype(dt.bits)
    kept = np.concatenate([kept, specials, np.roll(specials, 1), specials])
    base = np.concatenate([base, specials[::-1], specials, np.roll(specials, 3)])
    payload = check_value_roundtrip(VALUES_BY_ID["ulp"], kept, base, dt)
    _, config = VALUES_BY_ID["ulp"].encode(kept, base, dt)
    with mock.patch.dict("os.environ", {"SPARSESTITCH_NATIVE": "0"}):
        np.testing.assert_array_equal(
            VALUES_BY_ID["ulp"].decode(payload, config, base, dt, kept.size), kept)


@pytest.mark.parametrize("dt", FLOAT_DTYPES, ids=lambda dt: dt.name)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_ulp_decodes_any_run_of_kept_values_from_its_own_base_bits(dt, data):
    """What row-block restores rely on: cut the kept list anywhere, each run decodes from its
    own base bits and the exponent counts before it and in all to the plain decoding."""
    from sparsestitch.delta.codecs.ulp import exponent_counts

    codec = VALUES_BY_ID["ulp"]
    kept, base = data.draw(value_pairs(dt, max_size=120))
    specials = np.array(special_bits(dt), dtype=np.uint64).astype(dt.bits)
    kept = np.concatenate([kept, specials, np.roll(specials, 2)])
    base = np.concatenate([base, np.roll(specials, 1), specials])
    payload, config = codec.encode(kept, base, dt)
    cuts = data.draw(st.lists(st.integers(0, kept.size), max_size=5))
    bounds = [0, *sorted(cuts), kept.size]
    total = exponent_counts(base, dt)
    assert int(total.sum()) == kept.size
    for native_loops in ("1", "0"):  # the C loop and numpy give the same bits
        with mock.patch.dict("os.environ", {"SPARSESTITCH_NATIVE": native_loops}):
            for a, b in zip(bounds, bounds[1:]):
                part = codec.decode_part(payload, config, base[a:b], dt, kept.size,
                                         exponent_counts(base[:a], dt), total)
                np.testing.assert_array_equal(part, kept[a:b])
            # counts that do not match the record (another base) are refused, not misread
            with pytest.raises(DeltaFormatError):
                codec.decode_part(payload, config, base, dt, kept.size, total * 0, total + 1)
            shifted = np.roll(total, 1)  # the right total, in the wrong exponents
            if not np.array_equal(shifted, total):
                with pytest.raises(DeltaFormatError):
                    codec.decode_part(payload, config, base, dt, kept.size, shifted * 0,
                                      shifted)


@pytest.mark.parametrize("dt", FLOAT_DTYPES, ids=lambda dt: dt.name)
def test_ulp_stores_distances_in_units_in_the_last_place_sorted_by_base_exponent(dt):
    from sparsestitch.delta.codecs import ulp

    wide = np.array([1.0, -2.0, 0.5, 3.0, -0.0, 0.0, 1.5], dt.wide)
    base = from_wide(wide, dt)
    # One ulp up, one ulp towards zero for -2.0 (key + 1), -0.0 -> +0.0 is one step, +0 -> -0 is
    # one step back; 1.5 stays.
    kept = base.copy()
    kept[0] += 1
    kept[1] -= 1
    kept[2] += 2
    kept[3] -= 3
    kept[4] = base[5]
    kept[5] = base[4]
    distances = ulp.order_key(kept) - ulp.order_key(base)
    signed = distances.view(f"<i{dt.itemsize}")
    assert signed.tolist() == [1, 1, 2, -3, 1, -1, 0]
    assert ulp.zigzag(distances).tolist() == [2, 2, 4, 5, 2, 1, 0]
    np.testing.assert_array_equal(ulp.unzigzag(ulp.zigzag(distances)), distances)
    np.testing.assert_array_equal(ulp.from_order_key(ulp.order_key(kept)), kept)
    # Stored order: by the base's exponent field, kept order within one exponent.
    order = ulp.exponent_order(base, dt)
    exponents = wide[order]
    assert [float(x) for x in exponents] == [-0.0, 0.0, 0.5, 1.0, 1.5, -2.0, 3.0]
    payload, config = VALUES_BY_ID["ulp"].encode(kept, base, dt)
    raw = payload if not config["zstd"] else __import__("zstandard").ZstdDecompressor().decompress(payload)
    stored = from_planes(raw, dt.bits, kept.size)
    np.testing.assert_array_equal(stored, ulp.zigzag(distances)[order])


@pytest.mark.parametrize("dt", ALL_DTYPES, ids=lambda dt: dt.name)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_every_value_codec_roundtrips_every_bit_pattern(dt, data):
    kept, base = data.draw(value_pairs(dt))
    for codec in EXACT_VALUE_CODECS:
        if codec.applies(dt):
            check_value_roundtrip(codec, kept, base, dt)


@pytest.mark.parametrize("dt", ALL_DTYPES, ids=lambda dt: dt.name)
def test_every_value_codec_roundtrips_a_large_record(dt):
    kept, base = random_value_pair(dt, 20_000, seed=len(dt.name))
    for codec in EXACT_VALUE_CODECS:
        if codec.applies(dt):
            check_value_roundtrip(codec, kept, base, dt)


@pytest.mark.parametrize("dt", FLOAT_DTYPES, ids=lambda dt: dt.name)
def test_tau_stores_special_values_as_exceptions(dt):
    specials = np.array(special_bits(dt), dtype=dt.bits)
    one = np.repeat(from_wide(np.ones(1, dt.wide), dt), specials.size)
    kept = np.concatenate([specials, one])
    base = np.concatenate([one, specials])
    check_value_roundtrip(VALUES_BY_ID["tau"], kept, base, dt)
    _, config = VALUES_BY_ID["tau"].encode(kept, base, dt)
    assert 0 < config["exceptions"] < kept.size


@pytest.mark.parametrize("dt", FLOAT_DTYPES, ids=lambda dt: dt.name)
def test_tau_needs_no_exceptions_for_exact_changes(dt):
    base = np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)
    kept = np.array([1.5, -1.0, 0.25, -3.0], dtype=np.float32)
    kept_bits, base_bits = from_wide(kept.astype(dt.wide), dt), from_wide(base.astype(dt.wide), dt)
    check_value_roundtrip(VALUES_BY_ID["tau"], kept_bits, base_bits, dt)
    assert VALUES_BY_ID["tau"].encode(kept_bits, base_bits, dt)[1]["exceptions"] == 0


@pytest.mark.parametrize("dt", ALL_DTYPES, ids=lambda dt: dt.name)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_encode_values_picks_the_smallest_codec(dt, data):
    kept, base = data.draw(value_pairs(dt))
    for given_base in (base, None):
        candidates = [c for c in EXACT_VALUE_CODECS
                      if c.applies(dt) and not (c.needs_base and given_base is None)]
        sizes = {c.codec_id: len(c.encode(kept, given_base, dt)[0]) for c in candidates}
        payload, config = codecs.encode_values(kept, given_base, dt)
        smallest = min(sizes.values())
        assert len(payload) == smallest
        assert config["codec"] == next(i for i, size in sizes.items() if size == smallest)
        decoded = codecs.value_codec(config["codec"]).decode(payload, config, given_base, dt,
                                                             kept.size)
        np.testing.assert_array_equal(decoded, kept)


def test_encode_values_on_a_sampled_large_record_is_exact():
    dt = dtype("BF16")
    kept, base = random_value_pair(dt, codecs.VALUE_SAMPLE_SIZE * 2 + 7, seed=3)
    payload, config = codecs.encode_values(kept, base, dt)
    decoded = codecs.value_codec(config["codec"]).decode(payload, config, base, dt, kept.size)
    np.testing.assert_array_equal(decoded, kept)


def test_every_codec_is_one_class_with_its_whole_contract():
    """A codec owns everything about it (no switch elsewhere names it): the registry's
    entries satisfy the protocols, the format version a file needs and the reader's count
    limit come from the codec, and a device decoder, where there is one, is the codec's."""
    from sparsestitch.delta.codecs.base import PositionCodec, ValueCodec
    from sparsestitch.delta.device import decodes_on_device

    assert all(isinstance(codec, PositionCodec) for codec in POSITION_CODECS)
    assert all(isinstance(codec, ValueCodec) for codec in VALUE_CODECS)
    assert {c.codec_id: codecs.version_needed(c.codec_id) for c in VALUE_CODECS} == \
        {"tau": 1, "xor": 1, "raw": 1, "quant": 2, "ulp": 3, "lowrank": 4}
    assert codecs.version_needed("no-such-codec") == codecs.version_needed(["x"]) == 1
    assert codecs.values_per_byte("quant") == 8 and codecs.values_per_byte("raw") == 1
    assert {c.codec_id for c in POSITION_CODECS if decodes_on_device(c)} == {"gaps", "bitmap"}
    assert {c.codec_id for c in VALUE_CODECS if decodes_on_device(c)} == {"raw", "xor", "tau"}
