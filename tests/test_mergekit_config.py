"""mergekit's own config schema: configs run unchanged where sparsestitch can express them
(the same result as the equivalent call), and everything else is refused, every problem named
in one error."""

from __future__ import annotations

import textwrap

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import sparsestitch
from sparsestitch.cli import main
from sparsestitch.core.errors import ConfigError
from sparsestitch.ops.merge_config import load

from .conftest import finetune_of, save_checkpoint, small_model
from .test_checkpoint import assert_same_tensors


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A base and two fine-tunes under the working folder (mergekit resolves paths there)."""
    monkeypatch.chdir(tmp_path)
    base = {n: t for n, t in small_model(dtype=torch.float32).items()
            if t.dtype != torch.float64}     # one float dtype, as real models have
    save_checkpoint(tmp_path / "models" / "base", base)
    for i in (1, 2):
        save_checkpoint(tmp_path / "models" / f"ft{i}", finetune_of(base, seed=i))
    return tmp_path


def write(folder, text: str):
    """A config in a subfolder: relative model paths must not resolve against it."""
    path = folder / "configs" / "merge.yml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def run_config(path, out):
    result = CliRunner().invoke(main, ["merge", "--config", str(path), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return load_file(next(out.glob("*.safetensors")) if out.is_dir() else out)


def same(got, want):
    assert_same_tensors(got, load_file(next(want.glob("*.safetensors"))))


def test_ties_runs_as_mergekits_ties(models):
    config = write(models, """
        models:
          - model: models/base            # the base among the models: no task vector
          - model: models/ft1
            parameters: {density: 0.5, weight: 0.7}
          - model: models/ft2
            parameters: {density: 0.5, weight: 0.3}
        merge_method: ties
        base_model: models/base
        parameters: {normalize: true, int8_mask: true}
        dtype: float32
        """)
    got = run_config(config, models / "out")
    want = sparsestitch.merge("models/base", ["models/ft1", "models/ft2"], models / "want",
                              rule="ties-mergekit", weights=[0.7, 0.3], density=0.5,
                              lossless=True)
    same(got, want)


def test_ties_without_normalizing_as_mergekits_bio_merge_example(models):
    """mergekit's examples/bio-merge.yml: ties with normalize: false (the agreeing weighted
    sum, not divided)."""
    config = write(models, """
        models:
          - model: models/ft1
            parameters: {density: 0.5, weight: 0.5}
          - model: models/ft2
            parameters: {density: 0.5, weight: 0.5}
        merge_method: ties
        base_model: models/base
        parameters: {normalize: false, int8_mask: true}
        dtype: float32
        """)
    assert load(config).parameters == {"density": 0.5, "normalize": 0}
    got = run_config(config, models / "out")
    want = sparsestitch.merge("models/base", ["models/ft1", "models/ft2"], models / "want",
                              rule="ties-mergekit", weights=[0.5, 0.5], density=0.5,
                              normalize=0, lossless=True)
    same(got, want)
    divided = sparsestitch.merge("models/base", ["models/ft1", "models/ft2"], models / "div",
                                 rule="ties-mergekit", weights=[0.5, 0.5], density=0.5,
                                 lossless=True)
    assert load_file(next(divided.glob("*.safetensors")))["layer.0.mlp.weight"].ne(
        got["layer.0.mlp.weight"]).any()


def test_task_arithmetic_and_its_lambda(models):
    config = write(models, """
        merge_method: task_arithmetic
        base_model: models/base
        models:
          - {model: models/ft1, parameters: {weight: 1.0}}
          - {model: models/ft2, parameters: {weight: -0.5}}
        parameters: {lambda: 0.8}
        """)
    got = run_config(config, models / "out")
    want = sparsestitch.merge("models/base", ["models/ft1", "models/ft2"], models / "want",
                              rule="task-arithmetic", weights=[1.0, -0.5], scale=0.8,
                              lossless=True)
    same(got, want)


def test_linear_averages_the_models_the_base_included(models):
    config = write(models, """
        merge_method: linear
        base_model: models/base
        models:
          - {model: models/base, parameters: {weight: 2}}
          - {model: models/ft1, parameters: {weight: 1}}
          - {model: models/ft2, parameters: {weight: 1}}
        """)
    parsed = load(config)
    assert parsed.rule == "task-arithmetic" and parsed.weights == [0.25, 0.25]


def test_linear_without_a_base_averages_over_its_first_model(models):
    """mergekit's linear needs no base_model: the weighted average of the models is the same
    over any of them, so the first serves as the base (its weight counted)."""
    parsed = load(write(models, """
        merge_method: linear
        models:
          - {model: models/ft1, parameters: {weight: 1.0}}
          - {model: models/ft2, parameters: {weight: 0.5}}
          - {model: models/base, parameters: {weight: 0.5}}
        """))
    assert parsed.base == str(models / "models" / "ft1")
    assert parsed.finetuned == [str(models / "models" / "ft2"), str(models / "models" / "base")]
    assert parsed.rule == "task-arithmetic" and parsed.weights == [0.25, 0.25]


@pytest.mark.parametrize("method, rule, extra, options", [
    ("dare_linear", "dare-linear-mergekit", "", {"density": 0.7, "normalize": 0, "rescale": 1}),
    ("dare_ties", "dare-ties-mergekit", "parameters: {normalize: true}\n",
     {"density": 0.7, "normalize": 1, "rescale": 1}),
    ("breadcrumbs", "breadcrumbs-mergekit", "parameters: {rescale: true, lambda: 0.5}\n",
     {"density": 0.7, "gamma": 0.01, "normalize": 0, "rescale": 1, "scale": 0.5}),
    ("breadcrumbs_ties", "breadcrumbs-ties-mergekit", "",
     {"density": 0.7, "gamma": 0.1, "normalize": 0, "rescale": 0}),
])
def test_dare_and_breadcrumbs_run_as_mergekit_defines_them(models, tmp_path, method, rule, extra,
                                                           options):
    """mergekit's dare_linear, dare_ties, breadcrumbs and breadcrumbs_ties: its defaults
    (normalize off, rescale on for DARE), its parameters, and the same model as the
    equivalent call of the rule (whose math tests/test_rules.py checks against mergekit's
    formulas)."""
    gamma = "gamma: 0.1, " if method == "breadcrumbs_ties" else ""
    config = write(models, f"""
        merge_method: {method}
        base_model: models/base
        models:
          - {{model: models/ft1, parameters: {{weight: 1, {gamma}density: 0.7}}}}
          - {{model: models/ft2, parameters: {{weight: 0.5, {gamma}density: 0.7}}}}
        """.rstrip(" ") + textwrap.indent(extra, "        "))
    parsed = load(config)
    assert (parsed.rule, parsed.weights) == (rule, [1.0, 0.5])
    assert parsed.parameters == options
    got = run_config(config, tmp_path / "from-config")
    want = sparsestitch.merge(models / "models" / "base",
                              [models / "models" / "ft1", models / "models" / "ft2"],
                              tmp_path / "from-call", rule=rule, weights=[1.0, 0.5], **options)
    same(got, want)


@pytest.mark.parametrize("method, rule", [("ties", "ties-mergekit"),
                                          ("breadcrumbs_ties", "breadcrumbs-ties-mergekit"),
                                          ("dare_linear", "dare-linear-mergekit")])
def test_each_model_is_sparsified_with_its_own_density(models, tmp_path, method, rule):
    """Per-model density and gamma that differ (refused before): the rule takes one value
    per delta, in the models' order, and the config gives the equivalent call's model."""
    gamma = "gamma: 0.05, " if "breadcrumbs" in method else ""
    config = write(models, f"""
        merge_method: {method}
        base_model: models/base
        models:
          - {{model: models/ft1, parameters: {{weight: 1, {gamma}density: 0.3}}}}
          - {{model: models/ft2, parameters: {{weight: 0.5, density: 0.8}}}}
        """)
    parsed = load(config)
    assert parsed.parameters["density"] == [0.3, 0.8]
    assert parsed.parameters.get("gamma") == ([0.05, 0.01] if "breadcrumbs" in method else None)
    got = run_config(config, tmp_path / "from-config")
    want = sparsestitch.merge(models / "models" / "base",
                              [models / "models" / "ft1", models / "models" / "ft2"],
                              tmp_path / "from-call", rule=rule, weights=[1.0, 0.5],
                              **parsed.parameters)
    same(got, want)
    one = sparsestitch.merge(models / "models" / "base",
                             [models / "models" / "ft1", models / "models" / "ft2"],
                             tmp_path / "one-density", rule=rule, weights=[1.0, 0.5],
                             **{**parsed.parameters, "density": 0.3})
    with pytest.raises(AssertionError):  # the second model's own density made a difference
        same(got, one)


def test_density_gradients_spread_over_the_layers_as_in_mergekit(models, tmp_path):
    """A gradient of density (a list of values) per model and at the top: each tensor of
    layer i takes the value at i / (layers - 1), the others the first (mergekit's planner);
    the same model as the equivalent call, which differs from the gradient's first value
    alone."""
    from sparsestitch.combine.rules import gradient_at, layer_fraction

    config = write(models, """
        merge_method: breadcrumbs_ties
        base_model: models/base
        parameters: {density: [0.2, 0.9]}
        models:
          - {model: models/ft1, parameters: {weight: 1, gamma: [0.0, 0.1, 0.05]}}
          - {model: models/ft2, parameters: {weight: 0.5, density: [0.6, 0.3]}}
        """)
    parsed = load(config)
    assert parsed.parameters["layers"] == 1   # the test model's one layer, layer.0.*
    assert parsed.parameters["density"] == [[0.2, 0.9], [0.6, 0.3]]
    assert parsed.parameters["gamma"] == [[0.0, 0.1, 0.05], 0.01]
    # a single layer sits at 1 (mergekit's planner), the embedding outside the layers at 0
    assert gradient_at((0.2, 0.9), layer_fraction("layer.0.mlp.weight", 1)) == 0.9
    assert gradient_at((0.2, 0.9), layer_fraction("embed.weight", 1)) == 0.2
    assert layer_fraction("model.layers.3.self_attn.q_proj.weight", 7) == 0.5
    got = run_config(config, tmp_path / "from-config")
    want = sparsestitch.merge(models / "models" / "base",
                              [models / "models" / "ft1", models / "models" / "ft2"],
                              tmp_path / "from-call", rule="breadcrumbs-ties-mergekit",
                              weights=[1.0, 0.5], **parsed.parameters)
    same(got, want)
    flat = sparsestitch.merge(models / "models" / "base",
                              [models / "models" / "ft1", models / "models" / "ft2"],
                              tmp_path / "flat", rule="breadcrumbs-ties-mergekit",
                              weights=[1.0, 0.5], density=[0.2, 0.6], gamma=[0.0, 0.01])
    with pytest.raises(AssertionError):
        same(got, flat)


def test_weight_gradients_run_with_ties_and_are_refused_for_task_arithmetic(models, tmp_path):
    """mergekit's ties.yml style: a model's weight as a gradient over the layers (the rule's
    layer_weights; the weights are then all 1), the same model as the equivalent call;
    task_arithmetic, which takes one weight per model, refuses it by name."""
    text = """
        merge_method: {method}
        base_model: models/base
        models:
          - {{model: models/ft1, parameters: {{weight: [0.2, 1.0], density: 0.5}}}}
          - {{model: models/ft2, parameters: {{weight: 0.5, density: 0.5}}}}
        """
    parsed = load(write(models, text.format(method="ties")))
    assert parsed.weights == [1.0, 1.0]
    assert parsed.parameters["layer_weights"] == [[0.2, 1.0], 0.5]
    got = run_config(write(models, text.format(method="ties")), tmp_path / "from-config")
    want = sparsestitch.merge(models / "models" / "base",
                              [models / "models" / "ft1", models / "models" / "ft2"],
                              tmp_path / "from-call", rule="ties-mergekit", **parsed.parameters)
    same(got, want)
    # the one layer sits at 1 (weight 1.0), the embedding outside the layers at 0 (0.2)
    layered = sparsestitch.merge(models / "models" / "base",
                                 [models / "models" / "ft1", models / "models" / "ft2"],
                                 tmp_path / "weights", rule="ties-mergekit", weights=[1.0, 0.5],
                                 density=0.5)
    got_layer, want_layer = load_file(next((tmp_path / "weights").glob("*.safetensors"))), got
    assert torch.equal(got_layer["layer.0.mlp.weight"], want_layer["layer.0.mlp.weight"])
    assert not torch.equal(got_layer["embed.weight"], want_layer["embed.weight"])
    with pytest.raises(sparsestitch.OptionError, match="leave weights out"):
        sparsestitch.merge(models / "models" / "base",
                           [models / "models" / "ft1", models / "models" / "ft2"],
                           tmp_path / "both", rule="ties-mergekit", weights=[2.0, 1.0],
                           **parsed.parameters)
    with pytest.raises(ConfigError, match="gradients of weight run with ties"):
        load(write(models, text.replace(", density: 0.5", "").format(method="linear")))


def test_task_arithmetic_with_a_weight_gradient(models, tmp_path):
    """mergekit's task_arithmetic with a per-model weight gradient runs as its generalized
    task arithmetic without drops: each layer's weights, lambda the scale; the layer at the
    end of the gradient equals task arithmetic with that weight, the embedding (outside the
    layers) the gradient's first value."""
    text = """
        models:
          - model: models/ft1
            parameters: {{weight: [0.2, 1.0]}}
          - model: models/ft2
            parameters: {{weight: 0.5}}
        merge_method: {method}
        base_model: models/base
        parameters: {{lambda: 0.7}}
        dtype: float32
        """
    parsed = load(write(models, text.format(method="task_arithmetic")))
    assert parsed.rule == "dare-linear-mergekit"
    assert parsed.parameters["layer_weights"] == [[0.2, 1.0], 0.5]
    assert parsed.parameters["density"] == 1.0 and parsed.parameters["scale"] == 0.7
    got = run_config(write(models, text.format(method="task_arithmetic")), tmp_path / "graded")
    tunes = [models / "models" / "ft1", models / "models" / "ft2"]
    for weight, tensor in ((1.0, "layer.0.mlp.weight"), (0.2, "embed.weight")):
        plain = sparsestitch.merge(models / "models" / "base", tunes, tmp_path / f"w{weight}",
                                   rule="task-arithmetic", weights=[weight, 0.5], scale=0.7)
        plain = tmp_path / f"w{weight}"
        want = load_file(next(plain.glob("*.safetensors")) if plain.is_dir() else plain)
        assert torch.equal(got[tensor], want[tensor]), tensor
    # a density has no effect on task arithmetic, with a gradient as without: refused, not
    # dropped silently
    with pytest.raises(ConfigError, match="task_arithmetic does not sparsify"):
        load(write(models, text.replace("{{weight: 0.5}}", "{{weight: 0.5, density: 0.3}}")
                   .format(method="task_arithmetic")))


def test_per_tensor_filters_as_in_mergekits_ties_example(models, tmp_path):
    """mergekit's examples/ties.yml with local models: a density gradient, a weight gradient,
    and a weight given by per-tensor filters (the first filter in the tensor's name, else the
    one without a filter; where none has no filter, the top-level value, then the default)."""
    text = """
        models:
          - model: models/ft1
            parameters:
              density: [1, 0.7, 0.1] # density gradient
              weight: 1.0
          - model: models/ft2
            parameters:
              density: 0.5
              weight:
                - filter: mlp
                  value: 0.5
                - value: 0
        merge_method: ties
        base_model: models/base
        parameters:
          normalize: true
          int8_mask: true
          density: [{filter: attn, value: 0.3}]
        dtype: float32
        """
    parsed = load(write(models, text))
    weights = parsed.parameters["layer_weights"]
    assert weights == [1.0, [{"filter": "mlp", "value": 0.5}, {"filter": None, "value": 0.0}]]
    assert parsed.parameters["density"] == [[1.0, 0.7, 0.1], 0.5]
    got = run_config(write(models, text), tmp_path / "from-config")
    want = sparsestitch.merge(models / "models" / "base",
                              [models / "models" / "ft1", models / "models" / "ft2"],
                              tmp_path / "from-call", rule="ties-mergekit", **parsed.parameters)
    same(got, want)
    # the mlp tensor with the second model at weight 0.5, the attention one at 0
    for tensor, weight in (("layer.0.mlp.weight", 0.5), ("layer.0.attn.weight", 0.0)):
        alone = sparsestitch.merge(models / "models" / "base",
                                   [models / "models" / "ft1", models / "models" / "ft2"],
                                   tmp_path / f"w{weight}", rule="ties-mergekit",
                                   weights=[1.0, weight], density=[0.1, 0.5], normalize=1)
        assert torch.equal(load_file(next((tmp_path / f"w{weight}").glob("*.safetensors")))[
            tensor], got[tensor])
    # no catch-all and no top-level weight: mergekit would find no weight for some tensors
    with pytest.raises(ConfigError, match="have no weight"):
        load(write(models, text.replace("                - value: 0\n", "")))
    # the top-level density's filters are the fallback of a model's own filters
    fell_back = load(write(models, text.replace("density: 0.5", "density: [{filter: mlp, value: 0.2}]")))
    assert fell_back.parameters["density"][1] == [{"filter": "mlp", "value": 0.2},
                                                  {"filter": "attn", "value": 0.3},
                                                  {"filter": None, "value": 1.0}]


def test_a_gradient_over_a_base_without_layers_is_refused(models):
    """A gradient is placed on the base's layers: a base none of whose tensor names has a
    layer index (layers.N, h.N, ...) gets the config refused, naming why."""
    flat = {"embed.weight": torch.randn(4, 3), "head.weight": torch.randn(3, 4)}
    save_checkpoint(models / "models" / "flat", flat)
    save_checkpoint(models / "models" / "flat-ft", finetune_of(flat, seed=3))
    with pytest.raises(ConfigError, match="no tensor name of the base has a layer index"):
        load(write(models, """
            merge_method: ties
            base_model: models/flat
            models:
              - {model: models/flat-ft, parameters: {weight: 1, density: [0.2, 0.8]}}
            """))


def test_every_problem_is_named_in_one_error(models):
    config = write(models, """
        merge_method: slerp
        base_model: models/base
        slices:
          - sources: [{model: models/ft1, layer_range: [0, 2]}]
        models:
          - model: models/ft1
            parameters: {weight: [0.1, 0.5]}
          - model: models/missing/ft
        tokenizer_source: union
        out_dtype: float16
        dtype: bfloat16
        """)
    with pytest.raises(ConfigError) as caught:
        load(config)
    message = str(caught.value)
    assert str(config) in message and "problems" in message
    for needle in ("merge_method: slerp: spherical interpolation", "slices:", "a gradient",
                   "tokenizer_source:", "models[1].model: no such file or folder"):
        assert needle in message, needle


@pytest.mark.parametrize("text, key, needle", [
    ("merge_method: ties\nbase_model: models/base\nmodels:\n  - model: models/ft1\n",
     "models[0].parameters.weight", "required by mergekit's ties"),
    ("merge_method: ties\nmodels:\n  - {model: models/ft1, parameters: {weight: 1}}\n",
     "base_model", "name the model the others were fine-tuned from"),
    ("merge_method: ties\nbase_model: models/base\nmodels:\n"
     "  - {model: models/ft1, parameters: {weight: 1, density: 2}}\n",
     "models[].parameters.density", "within [0, 1]"),
    ("merge_method: breadcrumbs\nbase_model: models/base\nmodels:\n"
     "  - {model: models/ft1, parameters: {weight: 1, density: 0.5, gamma: -1}}\n",
     "models[].parameters.gamma", "within [0, 1]"),
    ("merge_method: della\nbase_model: models/base\nmodels:\n"
     "  - {model: models/ft1, parameters: {weight: 1}}\n", "merge_method", "DELLA"),
    ("merge_method: task_arithmetic\nbase_model: models/base\nmodels:\n"
     "  - {model: models/ft1+lora/adapter, parameters: {weight: 1}}\n", "models[0].model",
     "LoRA"),
])
def test_what_cannot_run_is_refused_naming_the_field(models, text, key, needle):
    with pytest.raises(ConfigError) as caught:
        load(write(models, text))
    assert caught.value.key == key and needle in str(caught.value)


def test_paths_resolve_against_the_working_folder_as_in_mergekit(models, monkeypatch):
    config = write(models, """
        merge_method: task_arithmetic
        base_model: ./models/base
        models: [{model: ./models/ft1, parameters: {weight: 1}}]
        """)
    assert load(config).base == str(models / "models" / "base")
    monkeypatch.chdir(models / "configs")         # from here, models/base does not exist
    with pytest.raises(ConfigError, match="base_model: no such file or folder"):
        load(config)


def test_a_compute_dtype_other_than_float32_is_said(models, caplog):
    config = write(models, """
        merge_method: task_arithmetic
        base_model: models/base
        dtype: bfloat16
        models: [{model: models/ft1, parameters: {weight: 1}}]
        """)
    with caplog.at_level("WARNING", logger="sparsestitch"):
        load(config)
    assert "computes in float32" in caplog.text


@pytest.mark.parametrize("dtypes, refused", [("dtype: float32", False),
                                             ("dtype: bfloat16", True),
                                             ("dtype: bfloat16\nout_dtype: float32", False),
                                             ("out_dtype: float16", True)])
def test_the_dtype_mergekit_would_write_must_be_the_bases(models, dtypes, refused):
    """mergekit writes ``out_dtype``, else ``dtype``; sparsestitch writes the base's (float32
    here): another one is refused when the headers are checked, before any tensor is read."""
    config = load(write(models, f"""
merge_method: task_arithmetic
base_model: models/base
models: [{{model: models/ft1, parameters: {{weight: 1}}}}]
{dtypes}
"""))
    if refused:
        with pytest.raises(ConfigError, match="sparsestitch writes the base's") as caught:
            config.check_inputs()
        assert caught.value.key == "dtype"
    else:
        config.check_inputs()


def test_one_slice_of_every_layer_runs_as_models(models, tmp_path):
    """mergekit's slices: one slice whose sources each take every layer of the base is the
    same merge as the models form; a partial layer range or several slices (a new stack of
    layers) is refused by field, with the base's layer count."""
    common = """
        merge_method: ties
        base_model: models/base
        parameters: {density: 0.5}
        dtype: float32
        """
    as_models = write(models, common + """
        models:
          - {model: models/ft1, parameters: {weight: 1.0}}
          - {model: models/ft2, parameters: {weight: 0.5}}
        """)
    sliced = common + """
        slices:
          - sources:
              - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1.0}}
              - {model: models/ft2, layer_range: [0, 1], parameters: {weight: 0.5}}
        """
    parsed, want = load(write(models, sliced)), load(as_models)
    assert (parsed.finetuned, parsed.weights, parsed.rule, parsed.parameters) == \
        (want.finetuned, want.weights, want.rule, want.parameters)
    assert_same_tensors(run_config(write(models, sliced), tmp_path / "sliced"),
                        run_config(as_models, tmp_path / "models-form"))
    with pytest.raises(ConfigError, match=r"slices\[0\]\.sources\[1\]\.layer_range: \[0, 0\] "
                                          r"is not every layer of the base \(\[0, 1\]\)"):
        load(write(models, sliced.replace("layer_range: [0, 1], parameters: {weight: 0.5}",
                                          "layer_range: [0, 0], parameters: {weight: 0.5}")))
    two = sliced + """
          - sources:
              - {model: models/ft1, layer_range: [0, 1]}
        """
    with pytest.raises(ConfigError, match="several slices .* a new stack of layers"):
        load(write(models, two))
    with pytest.raises(ConfigError, match=r"slices\[0\]\.parameters: not supported in a slice"):
        load(write(models, sliced.replace("slices:\n          - sources:",
                                          "slices:\n          - parameters: {density: 0.5}\n"
                                          "            sources:")))
    with pytest.raises(ConfigError, match=r"sources\[0\]\.layer_range: None is not every layer"):
        load(write(models, sliced.replace("layer_range: [0, 1], parameters: {weight: 1.0}",
                                          "parameters: {weight: 1.0}")))
