"""merge: straight from full fine-tunes, bit-identical to compress then stitch."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

import sparsestitch
from sparsestitch.dtypes import dtype
from sparsestitch.errors import TensorMismatchError
from sparsestitch.stitch import rule_combiner
from sparsestitch.walk import Stored

from .codec_checks import tunes_of_one_base
from .conftest import bits, finetune_of, save_checkpoint, small_model


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """A base and three fine-tunes, one of them adding a tensor, one changing an int tensor."""
    tmp_path = tmp_path_factory.mktemp("trio")
    base = small_model()
    base["big.weight"] = torch.randn(300, 70, generator=torch.Generator().manual_seed(5))
    paths = {"base": save_checkpoint(tmp_path / "base.safetensors", base)}
    for i in (1, 2, 3):
        tune = finetune_of(base, seed=i)
        if i == 2:
            tune["position_ids"] = tune["position_ids"].clone()
            tune["position_ids"][3] = 99
        if i == 3:
            tune["head.weight"] = torch.ones(4, 4)
        paths[f"ft{i}"] = save_checkpoint(tmp_path / f"ft{i}.safetensors", tune)
    return paths


def _tensors_equal(a, b):
    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype and left[name].shape == right[name].shape
        assert np.array_equal(bits(left[name]), bits(right[name])), name


CASES = [
    ("localize-stitch", {}, {}),
    ("localize-stitch", {"keep": 0.05, "scope": "global"}, {}),
    ("localize-stitch", {"keep": 0.3, "bits": 2, "group": 16}, {}),
    ("localize-stitch", {"max_error": 0.3}, {}),
    ("task-arithmetic", {}, {"scale": 0.7}),
    ("task-arithmetic", {"keep": 0.2, "scope": "per-tensor"}, {}),
    ("ties", {}, {"density": 0.3}),
    ("ties-mergekit", {}, {"density": 0.5}),
    ("dare", {}, {"drop": 0.5, "seed": 3}),
]


@pytest.mark.parametrize("rule,keep,options", CASES)
def test_merge_equals_compress_then_stitch(tmp_path, trio, rule, keep, options):
    tunes = [trio["ft1"], trio["ft2"], trio["ft3"]]
    compress_options = {("density" if k == "keep" else k): v for k, v in keep.items()}
    if rule != "localize-stitch" and not keep:
        compress_options = {"lossless": True}
    deltas = [tmp_path / f"{i}.delta" for i in range(3)]
    sparsestitch.compress(trio["base"], tunes, deltas, **compress_options)
    weights = [1.0, 0.5, 2.0]
    stitched = sparsestitch.stitch(trio["base"], deltas, tmp_path / "s.safetensors", rule=rule,
                                   weights=weights, **options)
    # a budget below the largest tensor (merged while written), small blocks, threads
    for threads, chunk, memory in ((1, 1 << 20, "64KiB"), (2, 500, None)):
        merged = sparsestitch.merge(trio["base"], tunes, tmp_path / f"m{threads}.safetensors",
                                    rule=rule, weights=weights, threads=threads,
                                    chunk_elements=chunk, max_memory=memory, **keep, **options)
        _tensors_equal(stitched, merged)


def test_saved_deltas_hold_the_records_compress_writes(tmp_path, trio):
    tunes = [trio["ft1"], trio["ft2"], trio["ft3"]]
    merged = sparsestitch.merge(trio["base"], tunes, tmp_path / "m.safetensors", keep=0.1,
                                bits=4, save_deltas=tmp_path / "deltas")
    saved = sorted((tmp_path / "deltas").iterdir())
    assert [p.name for p in saved] == ["ft1.delta", "ft2.delta", "ft3.delta"]
    deltas = [tmp_path / f"c{i}.delta" for i in range(3)]
    sparsestitch.compress(trio["base"], tunes, deltas, density=0.1, bits=4)
    for mine, theirs in zip(saved, deltas):
        a, b = sparsestitch.info(mine), sparsestitch.info(theirs)
        assert {t.name: t for t in a.tensors} == {t.name: t for t in b.tensors}
        for key in ("fidelity", "kept", "density", "method", "base_identity"):
            assert a.header[key] == b.header[key], key
    _tensors_equal(sparsestitch.stitch(trio["base"], saved, tmp_path / "s.safetensors"), merged)


def test_merge_records_how_it_was_made(tmp_path, trio):
    out = sparsestitch.merge(trio["base"], [trio["ft1"], trio["ft2"]], tmp_path / "m.safetensors",
                             rule="ties", density=0.4)
    with safe_open(out, "pt") as f:
        recipe = json.loads(f.metadata()["sparsestitch.merge"])
    assert recipe["rule"] == "ties" and recipe["options"] == {"density": 0.4}
    assert recipe["keep"]["density"] == 1.0 and len(recipe["finetuned"]) == 2


def test_merge_refuses_bad_input_before_writing(tmp_path, trio):
    out = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="scale"):
        sparsestitch.merge(trio["base"], [trio["ft1"]], out, rule="localize-stitch", scale=2.0)
    with pytest.raises(ValueError, match="contradictory"):
        sparsestitch.merge(trio["base"], [trio["ft1"]], out, keep=0.1, lossless=True)
    other = load_file(trio["base"])
    other["layer.0.attn.weight"] = torch.zeros(3, 3)
    stranger = save_checkpoint(tmp_path / "stranger.safetensors", other)
    with pytest.raises(TensorMismatchError, match="layer.0.attn.weight"):
        sparsestitch.merge(trio["base"], [trio["ft1"], stranger], out)
    added = finetune_of(load_file(trio["base"]), seed=7)
    added["head.weight"] = torch.zeros(4, 4)
    clash = save_checkpoint(tmp_path / "clash.safetensors", added)
    with pytest.raises(TensorMismatchError, match="add different tensors"):
        sparsestitch.merge(trio["base"], [trio["ft3"], clash], out)
    with pytest.raises(Exception, match="delta"):
        delta = tmp_path / "d.delta"
        sparsestitch.compress(trio["base"], trio["ft1"], delta)
        sparsestitch.merge(trio["base"], [delta], out)
    assert not out.exists()


# -- the command line and config files ----------------------------------------------------------


def _cli(*args):
    from click.testing import CliRunner

    from sparsestitch.cli import main
    return CliRunner().invoke(main, [str(a) for a in args])


def test_merge_command_and_config_file_agree(tmp_path, trio):
    flags = tmp_path / "flags.safetensors"
    result = _cli("merge", trio["base"], trio["ft1"], trio["ft2"], "-o", flags, "--rule", "ties",
                  "--density", "0.3", "--weights", "1,0.5", "--exclude", "embed.*")
    assert result.exit_code == 0, result.output
    config = tmp_path / "merge.yml"
    config.write_text(f"""
base: {trio['base']}
models:
  - model: {trio['ft1']}
  - model: {trio['ft2']}
    weight: 0.5
rule: ties
parameters:
  density: 0.3
keep:
  exclude: ["embed.*"]
out: from-config.safetensors
""")
    result = _cli("merge", "--config", config)
    assert result.exit_code == 0, result.output
    _tensors_equal(flags, tmp_path / "from-config.safetensors")
    api = sparsestitch.merge(trio["base"], [trio["ft1"], trio["ft2"]], tmp_path / "api.safetensors",
                             rule="ties", density=0.3, weights=[1, 0.5], exclude="embed.*")
    _tensors_equal(flags, api)


@pytest.mark.parametrize("edit,message", [
    ("rule: tie", "rule: must be one of"),
    ("parameters: {drop: 0.5}", "parameters"),
    ("keep: {density: 0.1, lossless: true}", "contradictory"),
    ("keep: {bits: 5}", "bits must be one of"),
    ("colour: blue", "unknown key 'colour'"),
    ("models: [{model: nowhere/}]", r"models\[0\].model: no such file"),
    ("models: [{model: FT1, weight: heavy}]", r"models\[0\].weight: must be a number"),
    ("models: [{model: OTHER}]", r"models\[0\].model: .*lacks"),
])
def test_bad_configs_fail_before_anything_is_written(tmp_path, trio, edit, message):
    other = save_checkpoint(tmp_path / "other.safetensors", small_model(seed=3))
    lines = {"base": f"base: {trio['base']}", "models": f"models: [{{model: {trio['ft1']}}}]",
             "rule": "rule: ties", "parameters": "parameters: {density: 0.5}",
             "out": "out: out.safetensors"}
    key = edit.split(":")[0]
    lines[key] = edit.replace("FT1", str(trio["ft1"])).replace("OTHER", str(other))
    config = tmp_path / "merge.yml"
    config.write_text("\n".join(lines.values()) + "\n")
    result = _cli("merge", "--config", config)
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "out.safetensors").exists()


def test_config_and_recipe_flags_do_not_mix(tmp_path, trio):
    config = tmp_path / "merge.yml"
    config.write_text(f"base: {trio['base']}\nmodels: [{trio['ft1']}]\n")
    result = _cli("merge", "--config", config, "--rule", "ties", "-o", tmp_path / "o.safetensors")
    assert result.exit_code != 0 and "--rule" in result.output


@settings(max_examples=120, deadline=None)
@given(dt=st.sampled_from([dtype(n) for n in ("BF16", "F16", "F32", "F64")]), data=st.data(),
       density=st.sampled_from([1.0, 0.5, 0.2]))
def test_dense_ties_mergekit_equals_its_positional_form(dt, data, density):
    """combine_changed (whole fine-tunes, merge's path for TIES in mergekit's convention)
    against combine of the changed elements as stored positions: every bit pattern
    (NaN, infinities, -0.0), equal bits, weights."""
    base, tunes = data.draw(tunes_of_one_base(dt, most=3, max_size=50))
    weights = data.draw(st.lists(st.sampled_from([1.0, 0.5, -2.0]), min_size=len(tunes),
                                 max_size=len(tunes)))
    combiner = rule_combiner("ties-mergekit", weights, len(tunes), density=density)
    stored = [Stored.of_changes(base, tune) for tune in tunes]
    expected = combiner.combine("w", dt, base.size, stored)
    positions, new_bits = combiner.combine_changed(dt, base, tunes)
    assert positions.tolist() == expected[0].tolist()
    assert new_bits.tobytes() == expected[1].tobytes()
