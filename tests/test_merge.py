"""merge: straight from full fine-tunes, bit-identical to compress then stitch."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

import sparsestitch
from sparsestitch.ops import merge_config
from sparsestitch.core.dtypes import dtype, from_wide
from sparsestitch.core.errors import ConfigError, TensorMismatchError
from sparsestitch.ops.stitch import RULES, rule_combiner
from sparsestitch.engine.walk import Stored

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


def test_numpy_numbers_are_options_like_any_other(tmp_path, trio):
    """A numpy float32 scale passed the checks, then failed writing the recipe as JSON."""
    out = sparsestitch.merge(trio["base"], [trio["ft1"], trio["ft2"]], tmp_path / "m.safetensors",
                             rule="task-arithmetic", scale=np.float32(0.5),
                             weights=np.array([1.0, 0.5]), max_error=np.float32(0.25))
    with safe_open(out, "pt") as f:
        recipe = json.loads(f.metadata()["sparsestitch.merge"])
    assert recipe["options"] == {"scale": 0.5} and recipe["weights"] == [1.0, 0.5]
    assert recipe["keep"]["max_error"] == 0.25


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
    delta = tmp_path / "d.delta"
    sparsestitch.compress(trio["base"], trio["ft1"], delta)
    with pytest.raises(Exception, match="delta file, not a model checkpoint"):
        sparsestitch.merge(delta, [trio["ft1"]], out)   # a delta as the base (a fine-tune may be
    assert not out.exists()                             # one: test_restored.py)


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
    ("models: [{model: FT1, weight: heavy}]", r"models\[0\].weight: must be a finite number"),
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


DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize("sections, key, message", [
    ({"models": "models: [{model: FT1, weight: .nan}]"}, "models[0].weight", "finite number"),
    ({"models": "models: [{model: FT1, weight: -.inf}]"}, "models[0].weight", "finite number"),
    ({"models": "models: [{model: FT1, weight: 1" + "0" * 400 + "}]"}, "models[0].weight",
     "finite number"),
    ({"parameters": "parameters: {scale: .inf}"}, "parameters.scale", "finite number"),
    ({"rule": "rule: dare", "parameters": "parameters: {seed: 1.7}"}, "parameters.seed",
     "whole number of 0 or more"),
    ({"rule": "rule: dare", "parameters": "parameters: {seed: -5}"}, "parameters.seed",
     "whole number of 0 or more"),
    ({"rule": "rule: dare", "parameters": "parameters: {drop: '0.5'}"}, "parameters.drop",
     "finite number within [0, 1)"),
    ({"keep": "keep: {lossless: 'no'}"}, "keep.lossless", "must be true or false, got 'no'"),
    ({"keep": "keep: {bits: 4.0}"}, "keep.bits", "whole number"),
    ({"keep": "keep: {bits: 4, density: 0.1, group: -1}"}, "keep.group", "whole number"),
    ({"keep": "keep: {max_error: .nan}"}, "keep.max_error", "finite number"),
    ({"keep": "keep: {scope: [global]}"}, "keep.scope", "scope must be one of"),
    ({"extra": "7: seven"}, "top level", "keys are names, got 7"),
    ({"parameters": "parameters: {1: 2, density: 0.5}"}, "parameters", "keys are option names"),
    ({"models": "models: [{model: FT1, 2.5: x}]"}, "models[0]", "keys are names, got 2.5"),
    ({"rule": "rule: [ties]"}, "rule", "must be one of"),
    ({"parameters": "parameters: " + DEEP}, "file", "nested too deeply"),
    ({"max_memory": "max_memory: 1" + "0" * 400}, "max_memory", "size like 1GiB"),
    ({"base": "base: 2024-02-30"}, "file", "not valid YAML"),
    ({"out": "out: [a]"}, "out", "must be a path"),
])
def test_config_values_are_checked_completely_before_any_tensor_is_read(tmp_path, trio, sections,
                                                                         key, message):
    """Each was a TypeError, OverflowError or RecursionError, or passed the checks and failed
    mid-merge; now a ConfigError naming the file and the key, before anything is read."""
    lines = {"base": f"base: {trio['base']}", "models": "models: [{model: FT1}]",
             "rule": "rule: ties", "parameters": "parameters: {density: 0.5}",
             "out": "out: out.safetensors", **sections}
    config = tmp_path / "merge.yml"
    config.write_text("\n".join(lines.values()).replace("FT1", str(trio["ft1"])) + "\n")
    with pytest.raises(ConfigError) as caught:
        merge_config.load(config)
    error = caught.value
    assert issubclass(ConfigError, sparsestitch.SparsestitchError)
    assert issubclass(ConfigError, ValueError)
    assert error.path == str(config) and error.key == key and message in str(error)
    assert str(error).startswith(f"file {str(config)!r}: {key}: ")
    result = _cli("merge", "--config", config)
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output and f"{key}: " in result.output
    assert not (tmp_path / "out.safetensors").exists()


def _config_strategy():
    """Merge configs with every slot filled at random: mostly the right keys and sensible
    values (so the checks past the first are reached), else values of every YAML type (NaN,
    infinities, ints beyond any float, text, nesting) and keys of mixed types."""
    keys = st.one_of(st.text(max_size=6), st.integers(), st.booleans(), st.none(),
                     st.floats(allow_nan=False))
    scalars = st.one_of(st.none(), st.booleans(), st.floats(),
                        st.integers(-(10**500), 10**500), st.just(10**400), st.text(max_size=8),
                        st.sampled_from(["no", "true", "0.5", "1.7", "ties", "global", "1GiB",
                                         "base.safetensors", "*.weight"]))
    anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(keys, inner, max_size=3), max_leaves=6)

    def mostly(sensible, hostile=anything, odds=4):  # hostile once in ``odds``
        return st.integers(1, odds).flatmap(lambda draw: hostile if draw == 1 else sensible)

    numbers = mostly(st.sampled_from([0, 1, 7, 0.0, 0.2, 0.5, 1.0, -1.5, 4, 128]),
                     st.one_of(st.sampled_from([10**400, -(10**400), 2**64, -1, 1.7]),
                               st.floats(), scalars), odds=3)

    def section(names):
        return mostly(st.dictionaries(st.sampled_from(sorted(names)), numbers,
                                      max_size=len(names)),
                      st.one_of(st.dictionaries(keys, anything, max_size=3), anything))

    def rule_with_its_parameters(name):
        return st.fixed_dictionaries({"rule": st.just(name)},
                                     optional={"parameters": section(RULES[name].defaults
                                                                     or {"scale"})})

    model = mostly(st.fixed_dictionaries({"model": st.just("ft.safetensors")},
                                         optional={"weight": numbers}), odds=10)
    required = {"base": mostly(st.just("base.safetensors"), odds=10),
                "models": mostly(st.lists(model, min_size=1, max_size=3), odds=10)}
    optional = {"keep": section(merge_config.KEEP_KEYS - {"include", "exclude", "dense"}
                                | {"include"}),
                "out": mostly(st.just("out.safetensors")),
                "max_memory": mostly(st.sampled_from(["1GiB", 4096]), numbers)}
    rule = mostly(st.sampled_from(sorted(RULES)).flatmap(rule_with_its_parameters),
                  st.fixed_dictionaries({}, optional={
                      "rule": anything, "parameters": section({"scale", "density", "drop",
                                                               "seed"})}))
    extra = mostly(st.just({}), st.dictionaries(keys, anything, max_size=1))
    return st.tuples(st.fixed_dictionaries(required, optional=optional), rule, extra).map(
        lambda parts: {**parts[0], **parts[1], **parts[2]})


CONFIG_CASES = Counter()


GOOD = {"base": "base.safetensors", "models": ["ft.safetensors"]}


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=_config_strategy(), deep=st.sampled_from([None] * 12 + [3, 40, 450, 600]))
@example(config={**GOOD, "rule": "dare", "parameters": {"seed": 10**400}}, deep=None)
@example(config={**GOOD, "models": [{"model": "ft.safetensors", "weight": -(10**400)}]},
         deep=None)
@example(config={**GOOD, "keep": {"bits": 4.0, "density": 0.1}, 1: 2}, deep=None)
@example(config={**GOOD, "max_memory": 10**400}, deep=None)
@example(config={**GOOD, "out": "\0"}, deep=None)
def test_fuzzed_configs_load_or_raise_a_config_error(config_folder, config, deep):
    """Whatever a config holds, ``load`` returns a checked config or raises the library's
    ConfigError -- never a TypeError, OverflowError, RecursionError -- and what it returns
    merges with checked options (weights finite, rule options and keep options valid)."""
    import yaml

    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    if deep is not None:  # nesting deeper than Python's recursion limit
        text += "parameters: " + "[" * deep + "]" * deep + "\n"
    path = config_folder / "fuzzed.yml"
    path.write_text(text, encoding="utf-8")
    try:
        loaded = merge_config.load(path)
    except ConfigError as exc:
        assert exc.path == str(path) and str(exc).startswith(f"file {str(path)!r}: {exc.key}: ")
        CONFIG_CASES[f"refused at {re.split(r'[.[]', exc.key)[0]}"] += 1
        return
    CONFIG_CASES["loaded"] += 1
    assert all(math.isfinite(w) and type(w) is float for w in loaded.weights)
    arguments = loaded.merge_arguments()
    options = {k: arguments[k] for k in ("scale", "density", "drop", "seed") if k in arguments}
    assert rule_combiner(loaded.rule, loaded.weights, len(loaded.finetuned), **options)


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory):
    """A folder where the fuzzed configs' relative paths exist (``load`` checks only that)."""
    folder = tmp_path_factory.mktemp("fuzzed-configs")
    for name in ("base.safetensors", "ft.safetensors"):
        (folder / name).write_bytes(b"")
    yield folder
    print(f"\nfuzzed merge configs: {dict(CONFIG_CASES)}")


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
    positions, bits = combiner.combine("w", dt, base.size, stored)
    expected = base.copy()
    expected[positions] = bits
    assert combiner.combine_changed(dt, base, tunes).tobytes() == expected.tobytes()


MERGEKIT_RULE_OPTIONS = [
    ("ties-mergekit", {"density": 0.3}), ("ties-mergekit", {"density": 0.5, "normalize": 0}),
    ("ties-mergekit", {"density": [0.2, 1.0, 0.6, 0.4], "scale": 0.7}),
    ("dare-ties-mergekit", {"density": 0.5}), ("dare-linear-mergekit", {"density": 0.3}),
    ("breadcrumbs-mergekit", {"density": 0.6, "gamma": 0.05}),
    ("breadcrumbs-ties-mergekit", {"density": 0.5, "gamma": 0.02, "rescale": 1}),
]


@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype_name", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("rule, options", MERGEKIT_RULE_OPTIONS)
def test_the_compiled_dense_merge_equals_mergekits_torch_operations(rule, options, dtype_name,
                                                                   count, monkeypatch):
    """combine_changed from the bits (trims as byte masks, one fine-tune at a time, then
    gta_merge_changed) against the same merge through dense task vectors and mergekit's
    torch operations: 30,011 elements of few distinct bf16-like values (ties at every cut),
    some unchanged, infinities and NaN, negative weights; DARE's draws in small chunks."""
    from sparsestitch.combine import rules as rules_module
    from sparsestitch.core import native

    if native.kernels() is None:
        pytest.skip("the compiled loops are not built")
    dt = dtype(dtype_name)
    rng = np.random.default_rng(count * 7 + len(rule))
    size = 30_011
    base_wide = (rng.standard_normal(size) * 0.05).astype(np.float32)
    base = from_wide(base_wide, dt)
    tunes = []
    for _ in range(count):
        step = (rng.integers(-6, 7, size) * 0.004).astype(np.float32)
        tuned = from_wide(base_wide + step, dt)
        unchanged = rng.random(size) < 0.15
        tuned[unchanged] = base[unchanged]
        tunes.append(tuned)
    tunes[0][:3] = from_wide(np.array([np.inf, np.nan, -np.inf], np.float32), dt)
    weights = [1.0, -0.5, 2.0, 0.7][:count]
    if isinstance(options.get("density"), list):
        options = {**options, "density": options["density"][:count]}
    combiner = rule_combiner(rule, weights, count, **options)
    monkeypatch.setattr(rules_module, "DRAW_CHUNK", 4_096)
    got = combiner.combine_changed(dt, base, tunes, name="model.layers.0.mlp.w")
    monkeypatch.setattr(rules_module, "mergekit_merged_changed", lambda *a, **k: None)
    want = combiner.combine_changed(dt, base, tunes, name="model.layers.0.mlp.w")
    assert got.tobytes() == want.tobytes()
    assert not np.array_equal(got, base)


def test_another_architecture_is_refused_unless_the_user_insists(tmp_path):
    """Same tensor names and shapes, but the folders' config.json name other architectures
    (a Mistral fine-tune given a Llama base): refused by compress and merge, as mergekit
    refuses without --allow-crimes."""
    base = save_checkpoint(tmp_path / "llama", small_model())
    tune = save_checkpoint(tmp_path / "mistral", finetune_of(small_model()))
    for folder, kind in ((base, "LlamaForCausalLM"), (tune, "MistralForCausalLM")):
        (folder / "config.json").write_text(json.dumps({"architectures": [kind]}))
    with pytest.raises(TensorMismatchError, match="base is a LlamaForCausalLM, the fine-tune "
                                                   "a MistralForCausalLM.*allow_crimes"):
        sparsestitch.compress(base, tune, tmp_path / "d.delta")
    with pytest.raises(TensorMismatchError, match="--allow-crimes"):
        sparsestitch.merge(base, [tune], tmp_path / "m")
    assert not (tmp_path / "d.delta").exists() and not (tmp_path / "m").exists()
    sparsestitch.compress(base, tune, tmp_path / "d.delta", allow_crimes=True)
    result = _cli("merge", str(base), str(tune), "-o", str(tmp_path / "m"), "--allow-crimes",
                  "--quiet")
    assert result.exit_code == 0, result.output


def test_the_default_merge_says_and_records_what_it_kept(tmp_path, trio):
    """Localize-and-Stitch with no keep option keeps compress's default (a target, lossy):
    the command says so in one line and the metadata records the target, not a density."""
    out = tmp_path / "m.safetensors"
    result = _cli("merge", trio["base"], trio["ft1"], trio["ft2"], "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "kept of each fine-tune: compress's default" in result.output
    with safe_open(out, "np") as handle:
        keep = json.loads(handle.metadata()["sparsestitch.merge"])["keep"]
    assert keep["target"] == {"max_error": 0.5} and keep["density"] is None
    result = _cli("merge", trio["base"], trio["ft1"], trio["ft2"], "-o", out, "--keep", "0.05",
                  "--overwrite", "--quiet")
    assert result.exit_code == 0 and "compress's default" not in result.output
