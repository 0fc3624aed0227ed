"""The lossy ``quant`` value codec and quantized deltas: round trips against a plain reference,
the error each record reports, special values, determinism, and the whole pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import sparsestitch
from sparsestitch.delta.codecs.quant import BITS, QuantValues
from sparsestitch.core.dtypes import dtype as lookup_dtype, from_wide, to_wide
from sparsestitch.core.errors import DeltaFormatError
from sparsestitch.delta.format import DeltaReader

from .codec_checks import FLOAT_DTYPES, check_value_cursor, value_pairs
from .conftest import bits, finetune_of, save_checkpoint, small_model

QUANT = QuantValues()


@pytest.mark.parametrize("dt", FLOAT_DTYPES, ids=lambda dt: dt.name)
@settings(max_examples=40, deadline=None)
@given(data=st.data(), bits_k=st.sampled_from(BITS), group=st.sampled_from([0, 1, 3, 64]))
def test_quant_decodes_what_it_reports_and_keeps_special_values_exact(dt, data, bits_k, group):
    kept, base = data.draw(value_pairs(dt))
    payload, config = QUANT.encode(kept, base, dt, bits=bits_k, group=group)
    decoded = QUANT.decode(payload, config, base, dt, kept.size)
    assert decoded.dtype == dt.bits and decoded.size == kept.size
    check_value_cursor(QUANT, payload, config, base, dt, decoded)  # in runs: the same bits
    # the same inputs give the same bytes
    assert QUANT.encode(kept, base, dt, bits=bits_k, group=group) == (payload, config)
    with np.errstate(all="ignore"):
        finite = (np.isfinite(to_wide(kept, dt)) & np.isfinite(to_wide(base, dt))
                  & np.isfinite(to_wide(kept, dt) - to_wide(base, dt)))
    # non-finite values (NaN payloads, infinities) come back bit for bit
    np.testing.assert_array_equal(decoded[~finite], kept[~finite])
    # (values whose approximation would overflow are stored exactly too)
    assert config["exceptions"] >= int((~finite).sum())
    with np.errstate(all="ignore"):  # the restored value against the fine-tuned one
        error = (to_wide(decoded, dt).astype(np.float64) - to_wide(kept, dt).astype(np.float64))
    error = error[finite]
    error = error[np.isfinite(error)]
    # the record's promise, per element: never further than the error it reports
    if error.size:
        assert np.abs(error).max() <= config["max_abs_error"] * (1 + 1e-12) + 1e-300
        with np.errstate(over="ignore"):
            squared = float(np.dot(error, error))
        if np.isfinite(squared):
            assert squared == pytest.approx(config["error_sq"], rel=1e-9, abs=1e-300)
        else:  # reported as the largest float: the header cannot hold Infinity
            assert config["error_sq"] == np.finfo(np.float64).max


@pytest.mark.parametrize("dt", [lookup_dtype("F32"), lookup_dtype("F64")], ids=lambda dt: dt.name)
def test_one_bit_is_sign_times_the_mean_magnitude(dt):
    """(In float32 and float64, where rounding the restored values changes little.)"""
    rng = np.random.default_rng(1)
    base = from_wide(rng.standard_normal(1000).astype(dt.wide), dt)
    kept = from_wide((to_wide(base, dt) + rng.laplace(0, 0.01, 1000)).astype(dt.wide), dt)
    payload, config = QUANT.encode(kept, base, dt, bits=1, group=0)
    decoded = QUANT.decode(payload, config, base, dt, kept.size)
    with np.errstate(all="ignore"):
        tau = to_wide(kept, dt).astype(np.float64) - to_wide(base, dt).astype(np.float64)
        tau_hat = to_wide(decoded, dt).astype(np.float64) - to_wide(base, dt).astype(np.float64)
    scale = np.abs(tau).mean()
    # tau_hat is +-scale (rounded to bfloat16, then by the restored value's own rounding)
    assert np.all(np.sign(tau_hat[tau != 0]) == np.sign(tau[tau != 0]))
    assert np.median(np.abs(tau_hat)) == pytest.approx(scale, rel=0.01)
    assert len(payload) < kept.size / 8 + 64


def test_more_bits_less_error():
    rng = np.random.default_rng(2)
    dt = lookup_dtype("F32")
    base = rng.standard_normal(50_000).astype(np.float32)
    kept = (base + rng.laplace(0, 1e-3, base.size).astype(np.float32))
    errors = [QUANT.encode(kept.view(np.uint32), base.view(np.uint32), dt, bits=k, group=128)[1]
              ["error_sq"] for k in BITS]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3 * errors[0]


@example(count=0).via("empty record")
@given(count=st.integers(0, 40))
@settings(max_examples=20, deadline=None)
def test_tiny_and_empty_records(count):
    dt = lookup_dtype("BF16")
    rng = np.random.default_rng(count)
    base = from_wide(rng.standard_normal(count).astype(np.float32), dt)
    kept = from_wide(rng.standard_normal(count).astype(np.float32), dt)
    for k in BITS:
        payload, config = QUANT.encode(kept, base, dt, bits=k, group=4)
        assert QUANT.decode(payload, config, base, dt, count).size == count


def test_damaged_configs_are_refused_before_allocating():
    dt = lookup_dtype("F32")
    base = np.arange(100, dtype=np.float32).view(np.uint32)
    kept = (np.arange(100, dtype=np.float32) + 0.5).view(np.uint32)
    payload, config = QUANT.encode(kept, base, dt, bits=2, group=8)
    for key, value in (("bits", 5), ("bits", True), ("group", 101), ("scale_dtype", "F64"),
                       ("exceptions", 101), ("codes_nbytes", 10**9), ("codes", None)):
        with pytest.raises(DeltaFormatError):
            QUANT.decode(payload, dict(config, **{key: value}), base, dt, kept.size)
    codes = bytearray(payload)
    codes[config["codes_nbytes"] - 1] |= 0x80  # a bit past the last value (200 bits, 25 bytes)
    if not config["codes"]["zstd"]:
        with pytest.raises(DeltaFormatError, match="past the last value"):
            QUANT.decode(bytes(codes), config, base, dt, kept.size)


# -- quantized deltas, end to end ---------------------------------------------------------------


def test_quantized_delta_restores_stitches_and_applies_the_same_values(tmp_path):
    base = small_model()
    tune = finetune_of(base, seed=3)
    base_path = save_checkpoint(tmp_path / "base.safetensors", base)
    tune_path = save_checkpoint(tmp_path / "tune.safetensors", tune)
    delta = tmp_path / "q.delta"
    (summary,) = sparsestitch.compress(base_path, tune_path, delta, density=1.0, bits=2, group=16)
    info = sparsestitch.info(delta)
    assert info.header["format_version"] == 2 and not summary.fidelity["lossless"]
    assert 0 < summary.fidelity["relative_error"] < 0.6
    quantized = {t.name for t in info.tensors if t.values_codec == "quant"}
    assert quantized == {n for n, t in base.items() if t.is_floating_point()} - {"scalar"} or \
        quantized <= {n for n, t in base.items() if t.is_floating_point()}
    first = sparsestitch.restore(base_path, delta, tmp_path / "r1.safetensors").read_bytes()
    again = sparsestitch.restore(base_path, delta, tmp_path / "r2.safetensors").read_bytes()
    assert first == again  # a lossy restore is reproducible byte for byte
    stitched = sparsestitch.stitch(base_path, [delta], tmp_path / "s.safetensors")
    from safetensors.torch import load_file
    restored, merged = load_file(tmp_path / "r1.safetensors"), load_file(stitched)
    live = {n: t.clone() for n, t in base.items()}
    with sparsestitch.apply(live, delta):
        for name in base:
            assert np.array_equal(bits(restored[name]), bits(merged[name])), name
            assert np.array_equal(bits(restored[name]), bits(live[name])), name
    # non-float tensors are never quantized: stored exactly
    assert torch.equal(restored["position_ids"], tune["position_ids"])
    sparsestitch.verify(delta, base=base_path)


def test_bits_and_lossless_are_checked(tmp_path):
    base_path = save_checkpoint(tmp_path / "b.safetensors", small_model())
    tune_path = save_checkpoint(tmp_path / "t.safetensors", finetune_of(small_model()))
    with pytest.raises(ValueError, match="bits must be one of 1, 2, 3, 4, 8"):
        sparsestitch.compress(base_path, tune_path, tmp_path / "x.delta", bits=5)
    with pytest.raises(ValueError, match="contradictory"):
        sparsestitch.compress(base_path, tune_path, tmp_path / "x.delta", bits=4, lossless=True)
    with pytest.raises(ValueError, match="group"):
        sparsestitch.compress(base_path, tune_path, tmp_path / "x.delta", bits=4, group=-1)
    assert not (tmp_path / "x.delta").exists()


def test_quantized_deltas_do_not_depend_on_threads_or_blocks(tmp_path):
    base = small_model()
    tune = finetune_of(base, seed=9)
    base_path = save_checkpoint(tmp_path / "base.safetensors", base)
    tune_path = save_checkpoint(tmp_path / "tune.safetensors", tune)
    outputs = []
    for threads, chunk in ((1, 1 << 20), (3, 64), (2, 7)):
        out = tmp_path / f"q{threads}.delta"
        sparsestitch.compress(base_path, tune_path, out, density=0.3, bits=3, group=32,
                              threads=threads, chunk_elements=chunk)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_a_version_1_file_cannot_claim_quant_values(tmp_path):
    base_path = save_checkpoint(tmp_path / "b.safetensors", small_model())
    tune_path = save_checkpoint(tmp_path / "t.safetensors", finetune_of(small_model()))
    delta = tmp_path / "q.delta"
    sparsestitch.compress(base_path, tune_path, delta, density=0.5, bits=4)
    from .support.images import DeltaImage
    image = DeltaImage.read(delta)
    image.header["format_version"] = 1
    (tmp_path / "v1.delta").write_bytes(image.to_bytes())
    with pytest.raises(DeltaFormatError, match="needs format version 2"):
        DeltaReader(tmp_path / "v1.delta")


@pytest.mark.parametrize("dt", FLOAT_DTYPES, ids=lambda dt: dt.name)
@settings(max_examples=40, deadline=None)
@given(data=st.data(), bits_k=st.sampled_from(BITS), group=st.sampled_from([0, 1, 3, 8]),
       run=st.sampled_from([8, 16, 64]), announced=st.booleans())
def test_values_added_in_parts_encode_as_all_at_once(dt, data, bits_k, group, run, announced):
    """A QuantStream fed a record in any number of parts writes exactly the payload and
    config of encoding it at once; and runs far shorter than the record change only the
    order the squared error is summed in (the same groups, the same codes and scales).
    Announced or not (its buffers then grow as parts come), the record is the same."""
    from unittest import mock

    from sparsestitch.delta.codecs import quant

    kept, base = data.draw(value_pairs(dt, max_size=120))
    one_run = QUANT.encode(kept, base, dt, bits=bits_k, group=group)
    with mock.patch.object(quant, "RUN_VALUES", run):
        whole = QUANT.encode(kept, base, dt, bits=bits_k, group=group)
        cuts = sorted(data.draw(st.lists(st.integers(0, kept.size), max_size=6)))
        stream = quant.QuantStream(dt, bits_k, group, kept.size if announced else None)
        for a, b in zip([0, *cuts], [*cuts, kept.size]):
            stream.add(kept[a:b], base[a:b])
        assert stream.finish() == whole
    if whole[1]["exceptions"] == one_run[1]["exceptions"]:  # no overflow handled differently
        assert whole[0] == one_run[0]
        assert whole[1]["error_sq"] == pytest.approx(one_run[1]["error_sq"], rel=1e-9, abs=1e-300)
