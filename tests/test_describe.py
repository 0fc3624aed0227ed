"""info and verify: per-tensor fields, bits per kept value, and base identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sparsestitch
from sparsestitch.core.errors import BaseMismatchError
from sparsestitch.delta.format import DeltaReader

from .conftest import finetune_of, save_checkpoint, small_model
from .test_checkpoint import SAFETENSORS_NAMES


@pytest.fixture
def made(zoo, tmp_path):
    """A global 5% delta of ft1 with one added tensor and one unchanged tensor."""
    base = small_model()
    tune = finetune_of(base, seed=1)
    tune["layer.0.norm.weight"] = base["layer.0.norm.weight"]
    tune["head.weight"] = torch.randn(3, 32).to(torch.bfloat16)
    tune_path = save_checkpoint(tmp_path / "tune.safetensors", tune)
    delta = tmp_path / "tune.delta"
    (summary,) = sparsestitch.compress(zoo["base"], tune_path, delta, density=0.05)
    return {"base": base, "tune": tune, "delta": delta, "summary": summary, "zoo": zoo}


def test_info_fields_per_tensor(made):
    result = sparsestitch.info(made["delta"])
    by_name = {t.name: t for t in result.tensors}
    base, tune = made["base"], made["tune"]
    assert list(by_name) == sorted(base) + ["head.weight"]
    with DeltaReader(made["delta"]) as reader:
        for name, tensor_info in by_name.items():
            record = reader.record(name)
            source = tune[name]
            assert tensor_info.dtype == SAFETENSORS_NAMES[source.dtype]
            assert tensor_info.shape == tuple(source.shape)
            assert tensor_info.numel == source.numel()
            assert tensor_info.kind == record.kind
            assert tensor_info.nbytes == record.positions_nbytes + record.values_nbytes
            if record.kind == "base":
                assert (tensor_info.count, tensor_info.nbytes, tensor_info.density) == (0, 0, 0.0)
                assert tensor_info.positions_codec is None and tensor_info.values_codec is None
                assert tensor_info.bits_per_kept == 0.0
                continue
            assert tensor_info.count == reader.positions(record).size > 0
            assert tensor_info.density == tensor_info.count / tensor_info.numel
            assert tensor_info.bits_per_kept == pytest.approx(
                8 * tensor_info.nbytes / tensor_info.count)
            assert tensor_info.positions_codec == record.positions["codec"]
            assert tensor_info.values_codec == record.values["codec"]
    # unchanged tensors (floats and non-floats) are "base"; the new head is "added", whole
    for name in ("layer.0.norm.weight", "position_ids", "mask"):
        assert by_name[name].kind == "base"
    head = by_name["head.weight"]
    assert (head.kind, head.count, head.density) == ("added", 96, 1.0)
    assert (head.positions_codec, head.values_codec) == ("all", "raw")


def test_info_totals_and_header(made):
    result = sparsestitch.info(made["delta"])
    summary = made["summary"]
    assert result.file_size == made["delta"].stat().st_size == summary.nbytes
    floats_kept = sum(t.count for t in result.tensors if t.kind == "sparse")
    assert result.kept == floats_kept == summary.kept  # no non-float tensor changed here
    assert result.bits_per_kept == pytest.approx(8 * result.file_size / result.kept)
    assert result.dense_bytes == sum(t.numel() * t.element_size() for t in made["tune"].values())
    header = result.header
    assert header["method"] == "topk-fidelity" and header["density"] == 0.05
    fidelity = header["fidelity"]
    assert not fidelity["lossless"] and 0 < fidelity["relative_error"] < 1
    assert fidelity["energy_kept"] == pytest.approx(1 - fidelity["relative_error"] ** 2)
    assert header["kept"] == summary.kept and header["candidates"] == summary.candidates
    assert header["sources"] == {"base": "base.safetensors", "finetuned": "tune.safetensors"}
    # the lowest version that holds the codecs used: 3 where some record's values are ulp
    used = {t.values_codec for t in result.tensors if t.kind != "base"}
    assert header["format_version"] == (3 if "ulp" in used else 1)
    assert header["library_version"] == sparsestitch.__version__


def test_per_tensor_scope_density_shows_in_info(zoo, tmp_path):
    delta = tmp_path / "d.delta"
    sparsestitch.compress(zoo["base"], zoo["ft1"], delta, density=0.25, scope="per-tensor")
    result = sparsestitch.info(delta)
    assert result.header["method"] == "topk-per-tensor"
    for t in result.tensors:
        if t.dtype in ("BF16", "F32", "F64"):
            assert t.count == int(np.floor(0.25 * t.numel + 0.5)), t.name


def test_verify_without_base_checks_structure(made):
    result = sparsestitch.verify(made["delta"])
    assert result.kept == sparsestitch.info(made["delta"]).kept
    assert [t.name for t in result.tensors] == [t.name for t in
                                                 sparsestitch.info(made["delta"]).tensors]


@pytest.mark.parametrize("layout", ["file", "sharded"])
def test_verify_with_the_right_base(made, tmp_path, layout):
    base = made["zoo"]["base"]
    if layout == "sharded":
        base = save_checkpoint(tmp_path / "base-folder", made["base"], shards=3)
    result = sparsestitch.verify(made["delta"], base=base)
    assert result.file_size == made["delta"].stat().st_size


def test_verify_against_a_base_with_other_values(made, tmp_path):
    other = dict(made["base"])
    weight = other["layer.0.mlp.weight"].clone()
    weight[3, 4] += 1
    other["layer.0.mlp.weight"] = weight
    wrong = save_checkpoint(tmp_path / "other.safetensors", other)
    with pytest.raises(BaseMismatchError) as caught:
        sparsestitch.verify(made["delta"], base=wrong)
    assert caught.value.tensor == "layer.0.mlp.weight"
    assert caught.value.path == str(made["delta"])


def test_verify_against_an_unrelated_base(made, tmp_path):
    unrelated = save_checkpoint(tmp_path / "other.safetensors", small_model(seed=9))
    with pytest.raises(BaseMismatchError):
        sparsestitch.verify(made["delta"], base=unrelated)


@pytest.mark.parametrize("change", ["missing", "shape", "dtype", "extra"])
def test_verify_against_a_base_of_another_layout(made, tmp_path, change):
    other = dict(made["base"])
    if change == "missing":
        del other["layer.0.conv.weight"]
    elif change == "shape":
        other["layer.0.conv.weight"] = torch.zeros(4, 3, 4)
    elif change == "dtype":
        other["layer.0.conv.weight"] = other["layer.0.conv.weight"].to(torch.float64)
    else:
        other["layer.1.conv.weight"] = torch.zeros(2)
    wrong = save_checkpoint(tmp_path / "other.safetensors", other)
    with pytest.raises(BaseMismatchError) as caught:
        sparsestitch.verify(made["delta"], base=wrong)
    # "extra": the base has a tensor the delta does not describe
    expected = "layer.1.conv.weight" if change == "extra" else "layer.0.conv.weight"
    assert caught.value.tensor == expected
