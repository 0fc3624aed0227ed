"""The ``lowrank`` value codec (format version 4) and ``compress --low-rank --max-size``.

The codec against the reference reader written from docs/format.md (bit for bit, every float
dtype, any factors, any runs); the planner's allocation; the records end to end: restore,
stitch and hot-swap give the same bits, the reported error is the real one, the size is
kept, and a damaged or misplaced record is refused by name."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsestitch
from sparsestitch.core.dtypes import to_wide
from sparsestitch.core.errors import DeltaFormatError, OptionError
from sparsestitch.delta.codecs.lowrank import LowRankValues, encode_factors
from sparsestitch.delta.format import DeltaReader
from sparsestitch.localize.budget import Option, Profile
from sparsestitch.localize.lowrank import (
    LowRankOption,
    Spectrum,
    allocate_kinds,
    allocate_within,
    dequantize,
    path_bits,
    planned_bits,
    quantize_vector,
)

from .codec_checks import FLOAT_DTYPES, check_config, check_value_cursor
from .support.reference import _lowrank_values, read_tensors, reference_decode

LOWRANK = LowRankValues()


@st.composite
def factors(draw, dt):
    rows, cols = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    rank = draw(st.integers(0, min(rows, cols)))
    bits = draw(st.lists(st.integers(1, 8), min_size=rank, max_size=rank))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def codes(n, k):
        top = 1 << (k - 1)
        return rng.integers(-top, top, n)          # -1 - l (negative) or l
    left = [codes(rows, k) for k in bits]
    right = [codes(cols, k) for k in bits]
    scale = np.float64 if dt.name == "F64" else np.float32
    exponents = draw(st.sampled_from([-30, -8, 0, 20]))
    left_steps = (rng.random(rank) * 2.0 ** exponents).astype(scale)
    right_steps = (rng.random(rank) * 2.0 ** exponents).astype(scale)
    if rank and draw(st.booleans()):
        left_steps[0] = 0.0
    base = rng.integers(0, np.iinfo(dt.bits).max, rows * cols, dtype=dt.bits, endpoint=True)
    if draw(st.booleans()):  # ordinary finite weights (random bits are often NaN or huge)
        base = np.asarray(rng.normal(size=rows * cols), dt.wide).astype(
            np.float16 if dt.name == "F16" else dt.wide).view(dt.bits) if dt.name != "BF16" \
            else (np.asarray(rng.normal(size=rows * cols), np.float32).view(np.uint32)
                  >> 16).astype(np.uint16)
    return rows, cols, bits, left, right, left_steps, right_steps, base


@pytest.mark.parametrize("dt", FLOAT_DTYPES, ids=lambda dt: dt.name)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_decoding_is_the_spec_s_arithmetic_whole_and_in_runs(dt, data):
    rows, cols, bits, left, right, lsteps, rsteps, base = data.draw(factors(dt))
    payload, config = encode_factors(left, right, lsteps, rsteps, bits, rows, cols, dt)
    config = check_config(config)
    decoded = LOWRANK.decode(payload, config, base, dt, rows * cols)
    record = {"name": "w", "count": rows * cols, "dtype": dt.name,
              "values": {"codec": "lowrank", **config}}
    expected = _lowrank_values(record, payload, base)
    np.testing.assert_array_equal(decoded.view(dt.bits), expected.view(dt.bits))
    check_value_cursor(LOWRANK, payload, config, base, dt, expected)


@pytest.mark.parametrize("wide", [np.float32, np.float64])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_the_compiled_sums_are_the_numpy_sums_bit_for_bit(wide, data):
    from unittest import mock

    from sparsestitch.delta.codecs.lowrank import accumulate

    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    n, rank, cols = (data.draw(st.integers(1, 12)) for _ in range(3))
    first = data.draw(st.integers(0, cols - 1))
    m = data.draw(st.integers(1, cols - first))
    scale = data.draw(st.sampled_from([1e-40, 1e-3, 1.0, 1e30]))   # subnormals to overflow
    left = (rng.normal(size=(n, rank)) * scale).astype(wide)
    right = (rng.normal(size=(rank, cols)) * scale).astype(wide)
    compiled = accumulate(left, right, first, m)
    with mock.patch.dict("os.environ", {"SPARSESTITCH_NATIVE": "0"}):
        plain = accumulate(left, right, first, m)
    np.testing.assert_array_equal(compiled.view(f"u{compiled.itemsize}"),
                                  plain.view(f"u{plain.itemsize}"))


def test_the_sum_runs_in_the_spec_s_order_not_a_dot_product():
    """Products that cancel only in one order: 2^24 + 1 - 2^24 is 0 in float32 left to
    right, 1 summed otherwise; the decoder must give the left-to-right bits."""
    dt = FLOAT_DTYPES[0]
    big = np.float32(2.0 ** 12)
    left = [np.zeros(3, np.int64), np.zeros(3, np.int64), np.full(3, -1)]  # +, +, - entries
    right = [np.zeros(3, np.int64)] * 3
    steps_l = np.array([big, np.float32(1.0), big], np.float32)
    steps_r = np.array([big, np.float32(1.0), big], np.float32)
    payload, config = encode_factors(left, right, steps_l, steps_r, [1, 1, 1], 3, 3, dt)
    base = np.zeros(9, np.uint32)
    got = LOWRANK.decode(payload, config, base, dt, 9).view(np.float32)
    assert (got == 0.0).all()  # (2^24 + 1) rounds to 2^24, minus 2^24


def test_damaged_configs_are_refused_before_decoding():
    dt = FLOAT_DTYPES[0]
    left, right = [np.array([1, -2, 0])], [np.array([0, 1])]
    payload, config = encode_factors(left, right, np.ones(1, np.float32), np.ones(1, np.float32),
                                     [3], 3, 2, dt)
    base = np.zeros(6, np.uint32)
    for key, value, message in (("rank", 2, "bits"), ("rows", 2, "do not cover"),
                                ("bits", [9], "bits"), ("scale_dtype", "BF16", "scale_dtype"),
                                ("rank", 4, "outside")):
        bad = {**config, key: value}
        with pytest.raises(Exception, match=message):
            LOWRANK.decode(payload, bad, base, dt, 6)
    flipped = bytearray(payload)
    flipped[-1] |= 0x80  # a bit past the last left entry
    with pytest.raises(DeltaFormatError, match="past the last"):
        LOWRANK.decode(bytes(flipped), config, base, dt, 6)


def test_quantized_vectors_fit_their_step_and_lose_less_with_more_bits():
    x = np.random.default_rng(0).normal(size=4096)
    errors = []
    for k in range(1, 9):
        codes, step = quantize_vector(x, k, np.float32)
        level = np.where(codes < 0, -1 - codes.astype(int), codes)
        assert codes.dtype == np.int8 and level.max() < 1 << (k - 1)
        assert step == float(np.float32(step))
        approx = np.where(codes < 0, -1.0, 1.0) * step * (2 * level + 1)
        np.testing.assert_array_equal(approx, dequantize(codes, step))
        errors.append(float(np.square(approx - x).sum() / np.square(x).sum()))
    assert errors == sorted(errors, reverse=True) and errors[0] < 0.37 and errors[-1] < 1e-3
    assert quantize_vector(np.zeros(5), 4, np.float32)[1] == 0.0


def test_the_plan_spends_bits_where_the_weighted_error_drops_most_within_budget():
    spectra = {"steep": Spectrum("steep", 100, 100, 1.0, np.sqrt(np.array([0.9, 0.09, 0.01])),
                                 nbytes=40000),
               "flat": Spectrum("flat", 100, 100, 1.0, np.sqrt(np.full(3, 1 / 3)), nbytes=40000)}
    exact = [Profile(name, 1.0, [Option(1.0, None, 10000, 40000.0, 0.0)]) for name in spectra]
    budget = 3000 / 8
    choice = allocate_kinds(exact, spectra, budget)
    assert all(isinstance(c, LowRankOption) for c in choice.values())
    bits = {name: path_bits(spectra[name], c.steps) for name, c in choice.items()}
    assert sum(planned_bits(b, spectra[name]) for name, b in bits.items()) <= 8 * budget
    assert bits["steep"][0] >= max(bits["flat"])  # the dominant direction gets the most bits
    nothing = allocate_kinds(exact, spectra, 0)
    assert all(isinstance(c, Option) and c.threshold == -1 for c in nothing.values())


def test_each_tensor_takes_the_kind_that_costs_least_for_its_error():
    """A change in few elements: its sparse option; in few directions: low-rank; a matrix
    whose components cost about its own bytes: exactly."""
    profiles = [Profile("few_elements", 1.0, [Option(0.001, None, 10, 80.0, 0.0, threshold=5)]),
                Profile("few_directions", 1.0, [Option(1.0, 2, 10000, 2500.0, 0.1),
                                                Option(1.0, None, 10000, 40000.0, 0.0)]),
                Profile("small", 1.0, [Option(1.0, None, 64, 256.0, 0.0)])]
    spectra = {"few_elements": Spectrum("few_elements", 100, 100, 1.0,
                                        np.sqrt(np.full(10, 0.1)), nbytes=40000),
               "few_directions": Spectrum("few_directions", 100, 100, 1.0,
                                          np.sqrt(np.array([0.99, 0.01])), nbytes=40000),
               "small": Spectrum("small", 8, 8, 1.0, np.sqrt(np.full(8, 1 / 8)), nbytes=256)}
    choice = allocate_kinds(profiles, spectra, 1000)
    assert isinstance(choice["few_elements"], Option) and choice["few_elements"].kept == 10
    assert isinstance(choice["few_directions"], LowRankOption)
    assert isinstance(choice["small"], Option) and choice["small"].kept == 64
    # the error-target path agrees with the size path's order
    bits = allocate_within(spectra["few_directions"], 0.05)
    assert bits and planned_bits(bits, spectra["few_directions"]) < 8 * 2500


@pytest.mark.parametrize("shape", [(40, 90), (90, 40), (33, 33)])
@pytest.mark.parametrize("wide", [np.float32, np.float64])
def test_leading_components_from_the_gram_matrix_are_the_svd_s(shape, wide, monkeypatch):
    """float32 changes: the leading singular values and vectors to float32's accuracy (the
    small ones, which get no bits, to 1e-3 of the largest); float64 changes: to float64's."""
    from sparsestitch.localize import lowrank

    monkeypatch.setattr(lowrank, "GRAM_BLOCK", 500)   # the Gram matrix summed in blocks
    rng = np.random.default_rng(1)
    rows, cols = shape
    tau = (rng.normal(size=(rows, 4)) * [10, 5, 2, 1]) @ rng.normal(size=(4, cols))
    tau = (tau + 0.01 * rng.normal(size=shape)).astype(wide)
    u_ref, s_ref, _ = np.linalg.svd(tau.astype(np.float64), full_matrices=False)
    close = 1e-9 if wide == np.float64 else 1e-5
    values = lowrank.singular_values(tau)
    np.testing.assert_allclose(values[:4], s_ref[:4], rtol=close)
    np.testing.assert_allclose(values, s_ref, rtol=close, atol=(1e-3 if wide == np.float32
                                                                else 1e-6) * s_ref[0])
    left, singular = lowrank.leading_components(tau, 4)
    np.testing.assert_allclose(singular, s_ref[:4], rtol=close)
    for i in range(4):  # the same direction, up to sign
        assert abs(float(left[:, i] @ u_ref[:, i])) == pytest.approx(1.0, abs=10 * close)


# -- end to end ---------------------------------------------------------------------------------

def low_rank_pair(tmp_path, dtype=torch.float32):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(4)
    base = {"attn.weight": torch.randn(48, 40, generator=g),
            "mlp.weight": torch.randn(32, 2, 24, generator=g),
            "norm.weight": torch.randn(40, generator=g),
            "narrow.weight": torch.randn(4, 64, generator=g),
            "ids": torch.arange(6)}
    tune = {k: v.clone() for k, v in base.items()}
    tune["attn.weight"] += 0.02 * torch.randn(48, 3, generator=g) @ torch.randn(3, 40, generator=g)
    tune["mlp.weight"] += (0.01 * torch.randn(32, 2, generator=g)
                           @ torch.randn(2, 48, generator=g)).reshape(32, 2, 24)
    tune["norm.weight"] += 0.003
    tune["narrow.weight"] += 0.001
    tune["ids"][2] = 9
    base = {k: v.to(dtype) if v.is_floating_point() else v for k, v in base.items()}
    tune = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tune.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tune, tmp_path / "tune.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "tune.safetensors", base, tune


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_deltas_restore_stitch_and_apply_the_same_bits_within_size(tmp_path, dtype):
    base_path, tune_path, base, tune = low_rank_pair(tmp_path, dtype)
    delta = tmp_path / "lr.delta"
    (summary,) = sparsestitch.compress(base_path, tune_path, delta, low_rank=True,
                                       max_size="5KB")
    assert summary.nbytes == delta.stat().st_size <= 5000
    with DeltaReader(delta) as reader:
        assert reader.header["format_version"] == 4
        assert reader.header["target"] == {"max_size": 5000, "records": "lowrank"}
        by_name = {r.name: r for r in reader.records}
    assert by_name["attn.weight"].values["codec"] == "lowrank"
    assert by_name["mlp.weight"].values["codec"] == "lowrank"   # 32 x 48 viewed as a matrix
    for sparse in ("norm.weight", "narrow.weight", "ids"):       # vectors, narrow, integers
        assert by_name[sparse].values["codec"] != "lowrank"
    # the reference reader decodes what the library restores, bit for bit
    restored = sparsestitch.restore(base_path, delta, tmp_path / "r.safetensors")
    reference = reference_decode(delta.read_bytes(), read_tensors(base_path)).tensors
    got = read_tensors(restored)
    for name in base:
        assert got[name][2] == reference[name][2], name
    from safetensors.torch import load_file
    out = load_file(restored)
    assert torch.equal(out["ids"], tune["ids"])   # integers exactly
    # the reported error is the real one
    for name in ("attn.weight", "mlp.weight", "norm.weight", "narrow.weight"):
        tau = tune[name].double() - base[name].double()
        real = float((out[name].double() - base[name].double() - tau).norm() / tau.norm())
        assert by_name[name].fidelity["relative_error"] == pytest.approx(real, rel=1e-6, abs=1e-9)
        assert real < 0.5
    # a rank-3 change in float32 comes back nearly whole
    if dtype == torch.float32:
        assert by_name["attn.weight"].fidelity["relative_error"] < 0.05
    stitched = sparsestitch.stitch(base_path, [delta], tmp_path / "s.safetensors")
    assert read_tensors(stitched) == got
    live = {n: t.clone() for n, t in base.items()}
    with sparsestitch.apply(live, delta):
        for name in base:
            assert torch.equal(live[name], out[name]), name
    prepared = sparsestitch.prepare(live, delta)
    with prepared.apply(live):
        for name in base:
            assert torch.equal(live[name], out[name]), name
    for name in base:  # and back to the base
        assert torch.equal(live[name], base[name]), name
    resident = {n: t.clone() for n, t in base.items()}
    sparsestitch.stitch_into(resident, delta)
    for name in base:
        assert torch.equal(resident[name], out[name]), name
    sparsestitch.verify(delta, base=base_path)


def test_a_smaller_size_keeps_less_and_restores_reproducibly(tmp_path):
    base_path, tune_path, _, _ = low_rank_pair(tmp_path)
    errors = []
    for size in ("6KB", "12KB"):
        (summary,) = sparsestitch.compress(base_path, tune_path, tmp_path / f"{size}.delta",
                                           low_rank=True, max_size=size)
        assert summary.nbytes <= int(size[:-2]) * 1000
        errors.append(summary.fidelity["relative_error"])
    assert errors[0] > errors[1]
    first = sparsestitch.restore(base_path, tmp_path / "6KB.delta", tmp_path / "a.safetensors")
    again = sparsestitch.restore(base_path, tmp_path / "6KB.delta", tmp_path / "b.safetensors",
                                 max_memory="32MiB")
    assert first.read_bytes() == again.read_bytes()


def test_low_rank_options_are_checked_and_nothing_is_written(tmp_path):
    base_path, tune_path, _, _ = low_rank_pair(tmp_path)
    out = tmp_path / "x.delta"
    with pytest.raises(OptionError, match="drop density"):
        sparsestitch.compress(base_path, tune_path, out, low_rank=True, density=0.1)
    with pytest.raises(OptionError, match="drop lossless"):
        sparsestitch.compress(base_path, tune_path, out, low_rank=True, lossless=True)
    with pytest.raises(OptionError, match="max_error"):
        sparsestitch.compress(base_path, tune_path, out, low_rank=True, max_error=0)
    with pytest.raises(OptionError, match="contradictory"):
        sparsestitch.compress(base_path, tune_path, out, low_rank=True, max_size="9KB",
                              bits=2)
    with pytest.raises(OptionError, match="contradictory"):
        sparsestitch.compress(base_path, tune_path, out, low_rank=True, max_size="9KB",
                              max_error=0.3)
    with pytest.raises(OptionError, match="cannot hold"):
        sparsestitch.compress(base_path, tune_path, out, low_rank=True, max_size="1KB")
    assert not out.exists()


def test_a_size_the_real_headers_cannot_hold_is_refused_after_the_first_pass(tmp_path):
    """4 KB passes the header estimate, but the records' real headers take more: refused by
    the refit, with nothing written (no delta that keeps nothing)."""
    base_path, tune_path, _, _ = low_rank_pair(tmp_path)
    out = tmp_path / "x.delta"
    with pytest.raises(OptionError, match="cannot hold the deltas' headers"):
        sparsestitch.compress(base_path, tune_path, out, low_rank=True, max_size="4KB")
    assert not out.exists() and list(tmp_path.glob("*.delta*")) == []


def few_directions(tmp_path, rows=2048, cols=2048, rank=8, seed=0):
    """A float32 base and a fine-tune whose change is ``rank`` directions and a little noise."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    base = {"big.weight": torch.randn(rows, cols, generator=g),
            "norm.weight": torch.randn(cols, generator=g)}
    change = 0.01 * torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    change += 0.0005 * torch.randn(rows, cols, generator=g)
    tune = {"big.weight": base["big.weight"] + change,
            "norm.weight": base["norm.weight"] + 0.01}
    save_file(base, tmp_path / "b.safetensors")
    save_file(tune, tmp_path / "t.safetensors")
    return tmp_path / "b.safetensors", tmp_path / "t.safetensors", base, tune


def test_a_matrix_beyond_even_a_streamed_budget_is_refused_by_name(tmp_path):
    base_path, tune_path, _, _ = few_directions(tmp_path)      # 16 MiB of float32
    out = tmp_path / "x.delta"
    with pytest.raises(OptionError, match="'big.weight': low-rank records of this matrix need "
                       "[0-9.]+ MiB even read a block of rows at a time"):
        sparsestitch.compress(base_path, tune_path, out, low_rank=True, max_size="1MB",
                              max_memory="40MiB")
    assert not out.exists()


@pytest.mark.parametrize("target", [{"max_size": "200KB"}, {}], ids=["size", "error"])
def test_a_matrix_beyond_the_budget_is_read_again_for_each_product(tmp_path, target,
                                                                    monkeypatch):
    """The change of a 2048 x 2048 float32 matrix and its Gram matrix take about 160 MiB
    held; within 64 MiB it is read a block of rows at a time (a sketch of its leading
    components): a low-rank record whose reported error is the restored model's, close to
    what holding it gives, the same bytes on a second run."""
    from sparsestitch.localize import lowrank_stream

    base_path, tune_path, base, tune = few_directions(tmp_path)
    errors, sketched = {}, []
    real_components = lowrank_stream.StreamedChange.components
    monkeypatch.setattr(lowrank_stream.StreamedChange, "components", lambda self, width:
                        sketched.append(width) or real_components(self, width))
    for memory in ("64MiB", "1GiB"):
        delta = tmp_path / f"{memory}.delta"
        sketched.clear()
        sparsestitch.compress(base_path, tune_path, delta, low_rank=True, max_memory=memory,
                              **target)
        assert bool(sketched) == (memory == "64MiB"), sketched
        assert all(8 <= width <= lowrank_stream.SKETCH_WIDTH for width in sketched)
        with DeltaReader(delta) as reader:
            record = {r.name: r for r in reader.records}["big.weight"]
        assert record.values["codec"] == "lowrank"
        restored = load_file_bits(sparsestitch.restore(base_path, delta,
                                                       tmp_path / f"{memory}.safetensors"))
        tau = tune["big.weight"].double() - base["big.weight"].double()
        real = float((restored["big.weight"].double() - base["big.weight"].double() - tau
                      ).norm() / tau.norm())
        assert record.fidelity["relative_error"] == pytest.approx(real, rel=1e-6)
        errors[memory] = real
    assert errors["64MiB"] <= errors["1GiB"] * 1.1 + 1e-3
    assert errors["64MiB"] < (0.5 if not target else 0.2)
    again = tmp_path / "again.delta"
    sparsestitch.compress(base_path, tune_path, again, low_rank=True, max_memory="64MiB",
                          **target)
    assert again.read_bytes() == (tmp_path / "64MiB.delta").read_bytes()


def test_an_input_rewritten_between_a_streamed_records_reads_is_refused(tmp_path):
    """A streamed matrix is read several times: a fine-tune rewritten in between cannot
    make a wrong record (the last read checks both inputs' bits against the first's)."""
    from sparsestitch.checkpoint import Checkpoint
    from sparsestitch.core.dtypes import dtype as lookup_dtype
    from sparsestitch.core.errors import CheckpointError
    from sparsestitch.localize import lowrank_stream

    base_path, tune_path, _, _ = few_directions(tmp_path, rows=64, cols=32, rank=2)
    with Checkpoint(base_path) as b, Checkpoint(tune_path) as t:
        change = lowrank_stream.StreamedChange(b, t, "big.weight")
        sketch = change.components(4)
        left = sketch.left(2).astype(np.float32)
        right = np.zeros((2, 32), np.float32)
        dt = lookup_dtype("F32")
        change.restored_error(left, right, dt)      # the same inputs: fine
        with open(tune_path, "r+b") as handle:      # one element of the matrix, in place
            header = int.from_bytes(handle.read(8), "little")
            start = json.loads(handle.read(header))["big.weight"]["data_offsets"][0]
            handle.seek(8 + header + start + 4 * 100)
            handle.write(np.float32(1.0).tobytes())
        with pytest.raises(CheckpointError, match="tensor 'big.weight': its bits differ "
                           "between the reads of a low-rank record: the base or the "
                           "fine-tune changed"):
            change.restored_error(left, right, dt)


@settings(max_examples=200, deadline=None)
@given(st.integers(8, 100_000), st.integers(8, 100_000), st.sampled_from([2, 4, 8]),
       st.integers(0, 4 << 30))
def test_a_sketch_is_as_wide_as_the_budget_holds(rows, cols, itemsize, budget):
    from sparsestitch.localize.lowrank_stream import (MIN_WIDTH, SKETCH_WIDTH, sketch_width,
                                                      streamed_bytes)
    width = sketch_width(rows, cols, itemsize, budget)
    side = min(rows, cols)
    if width:
        assert min(side, MIN_WIDTH) <= width <= min(side, SKETCH_WIDTH)
        assert streamed_bytes(rows, cols, width, itemsize) <= budget
        if width < min(side, SKETCH_WIDTH):   # one more would not fit
            assert streamed_bytes(rows, cols, width + 1, itemsize) > budget
    else:
        assert streamed_bytes(rows, cols, min(side, MIN_WIDTH), itemsize) > budget


def test_a_streamed_sketch_finds_the_leading_singular_triplets(tmp_path, monkeypatch):
    """The randomized range finder over row blocks (many here) against a full SVD: the
    leading singular values and left vectors, the energy, the products and the restored
    error's arithmetic."""
    from sparsestitch.checkpoint import Checkpoint
    from sparsestitch.core.dtypes import dtype as lookup_dtype
    from sparsestitch.localize import lowrank_stream
    from sparsestitch.localize.lowrank import HeldChange

    monkeypatch.setattr(lowrank_stream, "STREAM_BLOCK", 300 * 37)   # 37 rows a block
    monkeypatch.setattr(lowrank_stream, "PRODUCT_BLOCK_BYTES", 300 * 16 * 41)   # 41 rows
    base_path, tune_path, base, tune = few_directions(tmp_path, rows=600, cols=300, rank=5)
    tau = (tune["big.weight"] - base["big.weight"]).numpy()
    with Checkpoint(base_path) as b, Checkpoint(tune_path) as t:
        change = lowrank_stream.StreamedChange(b, t, "big.weight")
        sketch = change.components(12)
        u, s, _ = np.linalg.svd(tau.astype(np.float64), full_matrices=False)
        np.testing.assert_allclose(sketch.singular[:5], s[:5], rtol=1e-4)
        alignment = np.abs(np.sum(sketch.left(5) * u[:, :5], axis=0))
        assert (alignment > 0.999).all(), alignment
        assert change.energy() == pytest.approx(float(np.square(tau.astype(np.float64)).sum()),
                                                rel=1e-12)
        x = np.random.default_rng(0).standard_normal((600, 3))
        held = HeldChange(tau, base["big.weight"].numpy().view(np.uint32).ravel(), "")
        np.testing.assert_allclose(change.transposed_times(x), held.transposed_times(x),
                                   rtol=1e-4, atol=1e-6)
        left = (u[:, :2] * s[:2]).astype(np.float32)
        right = np.ascontiguousarray(np.linalg.svd(tau, full_matrices=False)[2][:2])
        dt = lookup_dtype("F32")
        assert change.restored_error(left, right, dt) == pytest.approx(
            held.restored_error(left, right, dt), rel=1e-9)


def test_an_error_target_holds_every_matrix_within_it_checked(tmp_path):
    base_path, tune_path, base, tune = low_rank_pair(tmp_path)
    sizes = []
    for target in (0.5, 0.1):
        delta = tmp_path / f"e{target}.delta"
        kwargs = {} if target == 0.5 else {"max_error": target}   # 0.5: the default target
        (summary,) = sparsestitch.compress(base_path, tune_path, delta, low_rank=True, **kwargs)
        sizes.append(summary.nbytes)
        with DeltaReader(delta) as reader:
            assert reader.header["target"] == {"max_error": target, "records": "lowrank"}
            records = {r.name: r for r in reader.records}
        assert records["attn.weight"].values["codec"] == "lowrank"
        restored = load_file_bits(sparsestitch.restore(base_path, delta,
                                                       tmp_path / f"r{target}.safetensors"))
        for name in ("attn.weight", "mlp.weight"):
            tau = tune[name].double() - base[name].double()
            real = float((restored[name].double() - base[name].double() - tau).norm()
                         / tau.norm())
            assert real <= target, name
            assert records[name].fidelity["relative_error"] == pytest.approx(real, abs=1e-7)
    assert sizes[0] < sizes[1]


def test_an_error_target_gives_each_tensor_the_smaller_record_kind(tmp_path):
    """Few directions: a low-rank record; few elements: the default's sparse one; vectors:
    the default's quantized one -- every record within the target, none larger than the
    default's."""
    from safetensors.torch import save_file

    from sparsestitch.core.dtypes import dtype as lookup_dtype
    from sparsestitch.localize.lowrank import within_error
    g = torch.Generator().manual_seed(7)
    base = {"few_directions.weight": torch.randn(64, 48, generator=g),
            "few_elements.weight": torch.randn(64, 48, generator=g),
            "norm.weight": torch.randn(48, generator=g)}
    tune = {k: v.clone() for k, v in base.items()}
    tune["few_directions.weight"] += (0.02 * torch.randn(64, 2, generator=g)
                                      @ torch.randn(2, 48, generator=g))
    flat = tune["few_elements.weight"].view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:40]] += 0.5
    tune["norm.weight"] += 0.01 * torch.randn(48, generator=g)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tune, tmp_path / "tune.safetensors")
    base_path, tune_path = tmp_path / "base.safetensors", tmp_path / "tune.safetensors"
    records, sizes = {}, {}
    for how, kwargs in (("default", {}), ("chosen", {"low_rank": True})):
        (summary,) = sparsestitch.compress(base_path, tune_path, tmp_path / f"{how}.delta",
                                           **kwargs)
        sizes[how] = summary.nbytes
        with DeltaReader(tmp_path / f"{how}.delta") as reader:
            records[how] = {r.name: r for r in reader.records}
        restored = load_file_bits(sparsestitch.restore(base_path, tmp_path / f"{how}.delta",
                                                       tmp_path / f"{how}.safetensors"))
        for name, before in base.items():
            tau = tune[name].double() - before.double()
            real = float((restored[name].double() - before.double() - tau).norm() / tau.norm())
            assert real <= 0.5, (how, name)
    default, chosen = records["default"], records["chosen"]
    assert chosen["few_directions.weight"].values["codec"] == "lowrank"
    assert default["few_directions.weight"].values["codec"] == "quant"
    def payload(record):
        return record.positions_nbytes + record.values_nbytes
    assert payload(chosen["few_directions.weight"]) < payload(default["few_directions.weight"])
    for name in ("few_elements.weight", "norm.weight"):   # the default's record, as it is
        assert chosen[name].values["codec"] == "quant", name
        assert chosen[name].payload_xxh3 == default[name].payload_xxh3, name
    assert sizes["chosen"] < sizes["default"]
    # the low-rank record the few elements would have needed is larger, or none meets 0.5
    tau = (tune["few_elements.weight"] - base["few_elements.weight"]).numpy().astype(np.float64)
    entry = SimpleNamespace(nbytes=tau.size * 4, shape=tau.shape)
    from sparsestitch.localize.lowrank import HeldChange
    held = HeldChange(tau, base["few_elements.weight"].numpy().view(np.uint32).ravel(), "0" * 16)
    low = within_error("few_elements.weight", lookup_dtype("F32"), entry, held, 0.5)
    assert low is None or len(low[1]) >= payload(default["few_elements.weight"])


def load_file_bits(path):
    from safetensors.torch import load_file
    return load_file(path)


def test_a_record_outside_the_rules_is_refused_by_name(tmp_path):
    from .support.images import DeltaImage

    base_path, tune_path, _, _ = low_rank_pair(tmp_path)
    delta = tmp_path / "lr.delta"
    sparsestitch.compress(base_path, tune_path, delta, low_rank=True, max_size="5KB")
    for change, message in ((lambda h: h.update(format_version=3), "needs format version 4"),
                            (lambda h: _record(h, "attn.weight")["values"].update(rows=40),
                             "lowrank values need")):
        image = DeltaImage.read(delta)
        change(image.header)
        bad = tmp_path / "bad.delta"
        bad.write_bytes(image.to_bytes())
        with pytest.raises(DeltaFormatError, match=message):
            DeltaReader(bad)


def _record(header: dict, name: str) -> dict:
    return next(r for r in header["tensors"] if r["name"] == name)


def test_the_right_factor_beyond_a_quarter_of_the_budget_is_refused(tmp_path):
    """A reader holds the right factor whole: one declaring more than its budget allows is
    refused by size, not allocated."""
    dt = FLOAT_DTYPES[0]
    rows, cols, rank = 128, 65536, 128        # a right factor of 32 MiB in float32
    bits = [1] * rank
    payload, config = encode_factors([np.zeros(rows, np.int64)] * rank,
                                     [np.zeros(cols, np.int64)] * rank,
                                     np.ones(rank, np.float32), np.ones(rank, np.float32),
                                     bits, rows, cols, dt)
    from sparsestitch.core.errors import ResourceLimitError
    from sparsestitch.delta.codecs.streams import BytesPayload, Part
    part = Part(BytesPayload(payload), 0, len(payload), 4 << 20)   # a 64 MiB budget's
    with pytest.raises(ResourceLimitError, match="right factor"):
        LOWRANK.cursor(part, config, dt, rows * cols)
    LOWRANK.cursor(Part(BytesPayload(payload), 0, len(payload), 8 << 20), config, dt,
                   rows * cols).close()                               # 128 MiB: allowed


def test_tau_of_restored_values_is_what_the_factors_say(tmp_path):
    """Decoding adds the factors' product to the base: with a zero base, the restored
    float32 values are the product itself."""
    dt = FLOAT_DTYPES[0]
    left, right = [np.array([0, -1, 1])], [np.array([1, -2])]
    payload, config = encode_factors(left, right, np.array([0.5], np.float32),
                                     np.array([0.25], np.float32), [2], 3, 2, dt)
    got = to_wide(LOWRANK.decode(payload, config, np.zeros(6, np.uint32), dt, 6), dt)
    lv, rv = np.array([0.5, -0.5, 1.5]), np.array([0.75, -0.75])
    np.testing.assert_array_equal(got, np.outer(lv, rv).reshape(-1).astype(np.float32))


def test_the_command_line_takes_low_rank(tmp_path):
    from click.testing import CliRunner

    from sparsestitch.cli import main

    base_path, tune_path, _, _ = low_rank_pair(tmp_path)
    out = tmp_path / "cli.delta"
    result = CliRunner().invoke(main, ["compress", str(base_path), str(tune_path), "-o",
                                       str(out), "--low-rank", "--max-size", "5KB"])
    assert result.exit_code == 0, result.output
    info = CliRunner().invoke(main, ["info", str(out)])
    assert info.exit_code == 0 and "lowrank" in info.output and "format v4" in info.output
    refused = CliRunner().invoke(main, ["compress", str(base_path), str(tune_path), "-o",
                                        str(tmp_path / "x.delta"), "--low-rank", "--bits", "2"])
    assert refused.exit_code == 2 and "drop bits" in refused.output


@pytest.mark.parametrize("how", [{"keep": 0.2}, {"rule": "ties", "density": 0.5},
                                 {"rule": "task-arithmetic", "scale": 0.5}])
def test_low_rank_deltas_merge_by_every_rule(tmp_path, how):
    """Two low-rank deltas stitched (localized again with keep, TIES, task arithmetic): the
    same model as the same rule over the restored fine-tunes' lossless deltas, which carry
    the same task vectors."""
    from safetensors.torch import load_file, save_file

    base_path, tune_path, base, _ = low_rank_pair(tmp_path)
    g = torch.Generator().manual_seed(9)
    other = {k: v.clone() for k, v in base.items()}
    other["attn.weight"] += 0.02 * torch.randn(48, 2, generator=g) @ torch.randn(2, 40, generator=g)
    save_file(other, tmp_path / "other.safetensors")
    low, exact = [], []
    for name, path in (("a", tune_path), ("b", tmp_path / "other.safetensors")):
        delta = tmp_path / f"{name}.delta"
        sparsestitch.compress(base_path, path, delta, low_rank=True, max_size="5KB")
        restored = sparsestitch.restore(base_path, delta, tmp_path / f"{name}.safetensors")
        lossless = tmp_path / f"{name}-exact.delta"
        sparsestitch.compress(base_path, restored, lossless, lossless=True)
        low.append(delta)
        exact.append(lossless)
    merged = load_file(sparsestitch.stitch(base_path, low, tmp_path / "m1.safetensors", **how))
    same = load_file(sparsestitch.stitch(base_path, exact, tmp_path / "m2.safetensors", **how))
    for name in base:
        assert torch.equal(merged[name], same[name]), name
    assert not torch.equal(merged["attn.weight"], base["attn.weight"])


def test_codes_and_fits_made_in_chunks_are_the_whole_ones(monkeypatch):
    """Packing a few rows at a time, and fitting a few columns at a time, change nothing."""
    import sparsestitch.delta.codecs.lowrank as codec
    import sparsestitch.localize.lowrank as planner

    rng = np.random.default_rng(3)
    bits = [8, 3, 1, 5, 2]
    codes = [rng.integers(-(1 << (k - 1)), 1 << (k - 1), 37) for k in bits]
    whole = codec.pack_codes(codes, bits)
    monkeypatch.setattr(codec, "PACK_ROWS", 8)
    np.testing.assert_array_equal(codec.pack_codes(codes, bits), whole)
    x = rng.normal(size=(50, 5))
    levels, steps = planner.quantize_columns(x, bits, np.float32)
    monkeypatch.setattr(planner, "COLUMN_CHUNK", 2)
    chunked = planner.quantize_columns(x, bits, np.float32)
    np.testing.assert_array_equal(chunked[0], levels)
    np.testing.assert_array_equal(chunked[1], steps)
