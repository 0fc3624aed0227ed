"""The ``ulp`` value codec end to end (format version 3): lossless deltas of a training step
restore, stitch and apply bit for bit, also when restores go row block by row block (the
codec is not elementwise: its stored order comes from every kept base value)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

import sparsestitch
from sparsestitch.core.dtypes import dtype as lookup_dtype
from sparsestitch.core.errors import DeltaFormatError
from sparsestitch.delta.format import DeltaReader

from .conftest import bits, save_checkpoint
from .support.reference import read_tensors, reference_decode


def step_pair(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A base and the same model after an optimizer-like step: about 15 % of the bf16/f16
    elements move by one to three units in the last place (more often the small ones), the
    float32/float64 ones move by a fixed amount; NaN payloads, infinities and -0.0 in both."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "embed.bf16": torch.randn(96, 64, generator=g).to(torch.bfloat16),
        "mlp.bf16": (torch.randn(128, 48, generator=g) * 0.02).to(torch.bfloat16),
        "attn.f16": (torch.randn(40, 40, generator=g) * 0.05).to(torch.float16),
        "proj.f32": torch.randn(64, 32, generator=g) * 0.03,
        "head.f64": torch.randn(12, 10, generator=g, dtype=torch.float64),
        "ids": torch.arange(10),
    }
    tune = {}
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            tune[name] = tensor.clone()
            continue
        if tensor.element_size() == 2:
            raw = tensor.view(torch.int16).to(torch.int32)
            moved = torch.rand(tensor.shape, generator=g) < 0.15 / (1 + tensor.abs().float())
            steps = torch.randint(1, 4, tensor.shape, generator=g) * (
                torch.randint(0, 2, tensor.shape, generator=g) * 2 - 1)
            tune[name] = (raw + moved * steps).to(torch.int16).view(tensor.dtype)
        else:
            tune[name] = tensor + 1e-4 * torch.sign(torch.randn(tensor.shape, generator=g,
                                                                dtype=tensor.dtype))
    specials = {torch.bfloat16: [0x7FC1, 0xFF80, 0x8000, 0x7F80, 0x0001],
                torch.float16: [0x7E01, 0xFC00, 0x8000, 0x7C00, 0x0001]}
    for name in ("embed.bf16", "attn.f16"):
        flat = tune[name].view(torch.int16).reshape(-1)
        values = specials[tune[name].dtype]
        flat[:len(values)] = torch.tensor(values, dtype=torch.int32).to(torch.int16)
        base[name].view(torch.int16).reshape(-1)[3:3 + len(values)] = torch.tensor(
            values[::-1], dtype=torch.int32).to(torch.int16)
    tune["proj.f32"].reshape(-1)[:3] = torch.tensor([float("nan"), -0.0, float("-inf")])
    return base, tune


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ulp")
    base, tune = step_pair()
    base_path = save_checkpoint(folder / "base.safetensors", base)
    tune_path = save_checkpoint(folder / "tune.safetensors", tune)
    delta = folder / "step.delta"
    (summary,) = sparsestitch.compress(base_path, tune_path, delta, lossless=True)
    return folder, base, tune, base_path, tune_path, delta, summary


def test_a_training_step_is_stored_with_ulp_values_in_a_version_3_file(made):
    folder, base, tune, base_path, _, delta, summary = made
    info = sparsestitch.info(delta)
    assert info.header["format_version"] == 3 and summary.fidelity["lossless"]
    codecs = {t.name: t.values_codec for t in info.tensors if t.kind != "base"}
    assert codecs["embed.bf16"] == codecs["mlp.bf16"] == codecs["attn.f16"] == "ulp"
    changed = sum(int((bits(base[n]) != bits(tune[n])).sum()) for n in base
                  if base[n].is_floating_point())
    assert summary.kept == changed  # exactly the changed elements, as before
    sparsestitch.verify(delta, base=base_path)
    # the reference reader, written from docs/format.md alone, decodes the same bits
    reference = reference_decode(delta.read_bytes(), read_tensors(base_path))
    with DeltaReader(delta) as reader:
        base_bits = {n: bits(t).reshape(-1) for n, t in base.items()}
        for record in reader.records:
            if record.kind == "base":
                continue
            positions, values = reader.decode(record, base_bits[record.name])
            want_positions, want_values, _ = reference.records[record.name]
            np.testing.assert_array_equal(positions, want_positions)
            np.testing.assert_array_equal(values, want_values)


@pytest.mark.parametrize("block_bytes", [1, 64, 1000, 256 << 20])
def test_restores_in_any_row_blocks_are_bit_exact(made, block_bytes):
    folder, base, tune, base_path, _, delta, _ = made
    out = sparsestitch.restore(base_path, delta, folder / f"r{block_bytes}.safetensors",
                               block_bytes=block_bytes, overwrite=True)
    restored = load_file(out)
    for name in tune:
        assert np.array_equal(bits(restored[name]), bits(tune[name])), name


def test_stitch_stitch_add_and_apply_give_the_fine_tune(made):
    folder, base, tune, base_path, tune_path, delta, _ = made
    other = folder / "other.delta"
    sparsestitch.compress(base_path, tune_path, other, density=0.05, overwrite=True)
    for max_memory in ("1KiB", None):
        stitched = sparsestitch.stitch(base_path, [delta], folder / "s.safetensors",
                                       max_memory=max_memory, overwrite=True)
        merged = load_file(stitched)
        for name in tune:
            assert np.array_equal(bits(merged[name]), bits(tune[name])), name
        # stitch_add's row-block path (a tiny budget) equals the full merge
        first = sparsestitch.stitch(base_path, [other], folder / "o.safetensors", overwrite=True)
        added = sparsestitch.stitch_add(base_path, [other], delta, first,
                                        folder / "a.safetensors", max_memory=max_memory,
                                        overwrite=True)
        full = sparsestitch.stitch(base_path, [other, delta], folder / "f.safetensors",
                                   overwrite=True)
        assert added.read_bytes() == full.read_bytes()
    live = {n: t.clone() for n, t in base.items()}
    with sparsestitch.apply(live, delta):
        for name in tune:
            assert np.array_equal(bits(live[name]), bits(tune[name])), name


def test_decoding_a_ulp_record_in_runs_needs_the_base_counts(made):
    _, base, _, _, _, delta, _ = made
    with DeltaReader(delta) as reader:
        record = reader.record("embed.bf16")
        with pytest.raises(ValueError, match="base's counts"):
            reader.cursor(record, memory_limit=1 << 20)


@pytest.mark.parametrize("tool", ["restore", "stitch"])
def test_row_block_restores_read_the_base_twice_not_once_per_block(made, tool, monkeypatch):
    """A ulp record decodes a block from that block's base bits and two histograms of base
    exponents (one more pass over the base), not from the whole base for every block."""
    folder, base, tune, base_path, _, delta, _ = made
    from sparsestitch.checkpoint import Checkpoint

    rows_read: dict[str, int] = {}
    original = Checkpoint.read_rows

    def counting(self, name, start, stop):
        rows_read[name] = rows_read.get(name, 0) + (stop - start)
        return original(self, name, start, stop)

    monkeypatch.setattr(Checkpoint, "read_rows", counting)
    out = folder / f"{tool}-counted.safetensors"
    if tool == "restore":  # 64-byte blocks: one row per block
        sparsestitch.restore(base_path, delta, out, block_bytes=64, overwrite=True)
    else:
        sparsestitch.stitch(base_path, [delta], out, max_memory="1KiB", overwrite=True)
    monkeypatch.setattr(Checkpoint, "read_rows", original)
    restored = load_file(out)
    for name in tune:
        assert np.array_equal(bits(restored[name]), bits(tune[name])), name
    for name in ("embed.bf16", "mlp.bf16", "attn.f16"):
        assert 0 < rows_read.get(name, 0) <= 2 * base[name].shape[0], (name, rows_read)


def test_older_versions_cannot_claim_ulp_values(made, tmp_path):
    *_, delta, _ = made
    from .support.images import DeltaImage
    for version in (1, 2):
        image = DeltaImage.read(delta)
        image.header["format_version"] = version
        (tmp_path / f"v{version}.delta").write_bytes(image.to_bytes())
        with pytest.raises(DeltaFormatError, match="needs format version 3"):
            DeltaReader(tmp_path / f"v{version}.delta")


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["BF16", "F16", "F32", "F64"]), st.integers(0, 5_000),
       st.integers(0, 2**32 - 1))
def test_exponent_counts_native_equals_bincount(dtype_name, size, seed):
    """The compiled exponent histogram against np.bincount of the exponent fields, every bit
    pattern (NaN, infinities, subnormals), sizes not a multiple of its 4 tables."""
    from sparsestitch.core import native
    from sparsestitch.delta.codecs import ulp

    dt = lookup_dtype(dtype_name)
    bits = np.random.default_rng(seed).integers(0, np.iinfo(dt.bits).max, size, dt.bits,
                                                endpoint=True)
    want = np.bincount(ulp.exponent_field(bits, dt),
                       minlength=1 << ulp.exponent_bits(dt)).astype(np.int64)
    assert np.array_equal(ulp.exponent_counts(bits, dt), want)
    if native.kernels() is not None:
        with pytest.raises(ValueError, match="bins"):
            native.kernels().exponent_counts(native.FLOAT_KINDS[dtype_name], bits,
                                             np.zeros(3, np.int64))
