"""mergekit's merge configs, read as mergekit reads them, translated to a :class:`MergeConfig`.

A config with a ``merge_method`` key is mergekit's schema (``merge_method``, ``base_model``,
``models[].model``, ``models[].parameters``, top-level ``parameters``, ``dtype``,
``out_dtype``, ``tokenizer_source``, ``slices``): names mean what they mean in mergekit, and
relative paths resolve as mergekit resolves them, against the working folder.  What
sparsestitch can express runs; everything else is refused naming the field and the reason,
every problem of the config in one error; nothing is ignored silently.

============================  ==============================================================
``merge_method``              runs as
============================  ==============================================================
``task_arithmetic``           ``task-arithmetic``: weights per model, ``lambda`` the scale;
                              with a weight gradient or filters, mergekit's generalized task
                              arithmetic without drops (``dare-linear-mergekit``, density 1)
``ties``                      ``ties-mergekit`` (mergekit's TIES, bit for bit with
                              ``dtype: float32``): each model's ``density``
``linear``                    ``task-arithmetic`` over the base: ``base + sum(w_i tau_i) /
                              sum(w_i)`` (mergekit averages the models themselves: the same
                              value, in another order of operations); without ``base_model``
                              the first model is the base (any model gives the same average)
``dare_ties``                 ``dare-ties-mergekit``: mergekit's random drops (seeded draws, not
                              mergekit's: the same distribution, not its bits), L1 rescaling,
                              sign election and mixing
``dare_linear``               ``dare-linear-mergekit``: the same drops, a weighted sum
``breadcrumbs``               ``breadcrumbs-mergekit``: the ``gamma`` largest and the smallest
                              magnitudes dropped (mergekit's ``magnitude_outliers``), a sum
``breadcrumbs_ties``          ``breadcrumbs-ties-mergekit``: the same trimming, sign election
============================  ==============================================================

Per-model ``density``, ``gamma`` and ``weight`` may differ, and each (but ``linear``'s
``weight``) may be a gradient (``density: [0.1, 0.5]``: values spread over the
base's layers as mergekit's planner spreads them, the tensors outside the layers taking the
first) or per-tensor filters (``[{filter: mlp, value: 0.5}, {value: 0}]``: the first whose
text is in the tensor's name, or that has none; then mergekit's fallbacks, the top-level
value and the default): each model's task vector is sparsified and weighted with its own,
as mergekit does.

Refused, with the reason: the other methods (``della``, ``slerp``, ``passthrough``,
``model_stock``, ...), ``slices`` that build a new stack of layers (frankenmerges: several
slices, or a ``layer_range`` short of every layer of the base; one slice of every layer runs
as its sources' ``models``), a per-model ``weight``
gradient or filters for ``linear``,
``normalize: false`` for ``linear``, ``rescale: true`` for ``ties``, an output dtype
(``out_dtype``, else ``dtype``, as mergekit writes) other than the base's,
``tokenizer_source`` other than ``base``, LoRA adapters (``model+lora``).  ``dtype`` names
mergekit's compute type: sparsestitch computes in float32 (float64 for float64 models) and
rounds once to the model's dtype, which it says in a warning when ``dtype`` is not float32.
``int8_mask`` (how mergekit stores its masks) changes nothing here and is accepted.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..checkpoint.hub import parse_hub_id
from ..core.errors import ConfigError, SparsestitchError
from ..core.options import short_repr

log = logging.getLogger("sparsestitch")

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "slices", "tokenizer", "chat_template", "name"}
MODEL_KEYS = {"model", "parameters"}
METHODS = {"task_arithmetic": "task-arithmetic", "ties": "ties-mergekit",
           "linear": "task-arithmetic", "dare_linear": "dare-linear-mergekit",
           "dare_ties": "dare-ties-mergekit", "breadcrumbs": "breadcrumbs-mergekit",
           "breadcrumbs_ties": "breadcrumbs-ties-mergekit"}
#: The methods run by a rule of mergekit's generalized task arithmetic beyond ties: their
#: ``normalize`` and ``rescale`` defaults, as mergekit's registry sets them.
GENERALIZED = {"dare_ties": (False, True), "dare_linear": (False, True),
               "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False)}
#: Methods mergekit has that sparsestitch refuses, and why.
NOT_HERE = {
    "della": "DELLA draws its drops with probabilities ranked within each row of a tensor, "
             "and sparsestitch's rules see flat task vectors (not supported yet)",
    "della_linear": "DELLA draws its drops with probabilities ranked within each row of a "
                    "tensor, and sparsestitch's rules see flat task vectors (not supported yet)",
    "slerp": "spherical interpolation of two models is not a task-vector merge",
    "nuslerp": "spherical interpolation of two models is not a task-vector merge",
    "passthrough": "passthrough stacks layers into a new architecture (a frankenmerge); "
                   "sparsestitch writes the base's architecture",
    "model_stock": "model stock's geometric weights are not a sparsestitch rule",
    "karcher": "a Karcher mean is not a task-vector merge",
    "arcee_fusion": "arcee_fusion is not a sparsestitch rule",
    "nearswap": "nearswap is not a sparsestitch rule",
    "sce": "SCE is not a sparsestitch rule",
}
#: Parameters each method reads (per model or at the top), as mergekit names them.
PARAMETERS = {"task_arithmetic": {"weight", "density", "lambda", "normalize", "rescale",
                                    "int8_mask"},
              "ties": {"weight", "density", "lambda", "normalize", "rescale", "int8_mask"},
              "linear": {"weight", "normalize"},
              "dare_linear": {"weight", "density", "lambda", "rescale", "normalize",
                              "int8_mask"},
              "dare_ties": {"weight", "density", "lambda", "rescale", "normalize", "int8_mask"},
              "breadcrumbs": {"weight", "density", "gamma", "lambda", "rescale", "normalize",
                              "int8_mask"},
              "breadcrumbs_ties": {"weight", "density", "gamma", "lambda", "rescale",
                                   "normalize", "int8_mask"}}
#: Parameters that may be a gradient (a list of values spread over the layers).
GRADIENTS = {"density", "gamma", "weight"}
FLOAT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def is_mergekit(data: dict) -> bool:
    """Whether a parsed config is in mergekit's schema (it names a ``merge_method``)."""
    return "merge_method" in data


def translate(path: Path, data: dict, cwd: Path | None = None):
    """The :class:`~sparsestitch.ops.merge_config.MergeConfig` a mergekit config asks for;
    every problem in one :class:`ConfigError` (named by the first one's key)."""
    from .merge_config import MergeConfig

    problems: list[tuple[str, str]] = []
    cwd = Path.cwd() if cwd is None else cwd
    for key in sorted(k for k in data if not isinstance(k, str) or k not in TOP_KEYS):
        problems.append((str(key), f"not a mergekit key sparsestitch knows (it knows "
                                   f"{', '.join(sorted(TOP_KEYS))})"))
    method = data.get("merge_method")
    if method in NOT_HERE:
        problems.append(("merge_method", f"{method}: {NOT_HERE[method]}; sparsestitch runs "
                                         f"{', '.join(sorted(METHODS))}"))
    elif method not in METHODS:
        problems.append(("merge_method", f"must be one of {', '.join(sorted(METHODS))}, got "
                                         f"{short_repr(method)}"))
    for key, reason in (("tokenizer", "a merged tokenizer (mergekit's tokenizer: section); "
                                      "sparsestitch keeps the base's"),
                        ("chat_template", "sparsestitch keeps the base's chat template")):
        if data.get(key) is not None:
            problems.append((key, reason))
    source = data.get("tokenizer_source")
    if source not in (None, "base"):
        problems.append(("tokenizer_source", f"{short_repr(source)}: sparsestitch copies the "
                                             "base's tokenizer (tokenizer_source: base)"))
    # linear averages the models themselves: any one of them serves as the base (the first,
    # as the others' task vectors are taken against it), so mergekit's base-less linear runs
    base = _model_path(problems, "base_model", data.get("base_model"), cwd,
                       required=method in METHODS and not _first_model(data, method))
    if base is None and _first_model(data, method):
        base = _model_path(problems, "models[0].model", _first_model(data, method), cwd,
                           required=True)
    known = PARAMETERS.get(method, set())
    top = _parameters(problems, "parameters", data.get("parameters"), known)
    entries = []   # (where, model, parameters, is the base)
    models, prefix = data.get("models"), "models"
    if data.get("slices") is not None and models is None:
        models, prefix = _whole_model_slices(problems, data["slices"], base), "slices[0].sources"
    else:
        if data.get("slices") is not None:
            problems.append(("slices", "give models or slices, not both"))
        if not isinstance(models, list) or not models:
            problems.append(("models", "must be a list of {model: PATH, parameters: {...}}"))
            models = []
    for i, item in enumerate(models):
        where = f"{prefix}[{i}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict):
            problems.append((where, "must be a mapping like {model: PATH, parameters: {...}}"))
            continue
        for key in sorted(str(k) for k in item if k not in MODEL_KEYS):
            problems.append((f"{where}.{key}", "not a key of a mergekit model entry (model, "
                                               "parameters)"))
        model = _model_path(problems, f"{where}.model", item.get("model"), cwd, required=True)
        parameters = _parameters(problems, f"{where}.parameters", item.get("parameters"), known)
        is_base = model is not None and base is not None and _same(model, base)
        entries.append((where, model, {**top, **parameters}, is_base))
    finetuned, weights, rule, options = [], [], "task-arithmetic", {}
    if method in METHODS:
        finetuned, weights, rule, options = _method(problems, method, top, entries)
        if _layers(problems, base, options) and weights:
            _check_values(problems, rule, weights, options)
    _dtypes(problems, data)
    if problems:
        key = problems[0][0]
        listed = "; ".join(f"{k}: {m}" for k, m in problems)
        raise ConfigError(path, key, problems[0][1] if len(problems) == 1 else
                          f"this mergekit config has {len(problems)} problems: {listed}")
    written = data.get("out_dtype") or data.get("dtype")
    return MergeConfig(path, base, finetuned, weights, rule, options, {"lossless": True},
                       None, None, FLOAT_DTYPES.get(written) if written else None)


def _first_model(data: dict, method) -> str | None:
    """For a ``linear`` config without ``base_model``: its first model's name, else None."""
    models = data.get("models")
    if method != "linear" or data.get("base_model") is not None or not isinstance(models, list) \
            or not models:
        return None
    first = models[0]
    first = first.get("model") if isinstance(first, dict) else first
    return first if isinstance(first, str) else None


def _method(problems: list, method: str, top: dict, entries: list):
    """``(fine-tunes, weights, rule, options)`` for a method mergekit and sparsestitch share,
    with mergekit's defaults (``weight`` required; ``density`` 1; ``normalize`` true for
    ``ties`` and ``linear``, false otherwise; ``rescale`` true for ``dare_linear``)."""
    weight_of = {}
    for where, model, parameters, is_base in entries:
        if "weight" in parameters:
            weight_of[where] = 1.0 if parameters["weight"] is None else parameters["weight"]
        elif not (is_base and method != "linear"):  # the base's task vector is zero
            problems.append((f"{where}.parameters.weight", f"required by mergekit's {method}"))
    tunes = [(where, model, parameters) for where, model, parameters, is_base in entries
             if not is_base]
    finetuned = [model for _, model, _ in tunes]
    weights = [_with_fallback(weight_of.get(where, 1.0), top.get("weight"), None)
               for where, _, _ in tunes]
    for (where, _, _), weight in zip(tunes, weights):
        if _filtered(weight) and not any(c["filter"] in (None, "*") for c in weight):
            problems.append((f"{where}.parameters.weight", "no filter without a pattern and no "
                                                           "top-level weight: the tensors no "
                                                           "filter matches have no weight"))
    options: dict = {}
    if any(isinstance(w, list) for w in list(weight_of.values())):
        if method in ("ties", "task_arithmetic", *GENERALIZED):  # each delta's weight gradient
            options["layer_weights"], weights = weights, [1.0] * len(weights)
        else:
            problems.append(("models", f"{method}: gradients of weight run with ties, "
                                       "task_arithmetic, dare_* and breadcrumbs* (linear "
                                       "averages the models with one weight each)"))
            weight_of = {k: 1.0 if isinstance(w, list) else w for k, w in weight_of.items()}
            weights = [1.0 if isinstance(w, list) else w for w in weights]
    normalize = top.get("normalize", method in ("ties", "linear"))
    if method == "linear":
        if not normalize:
            problems.append(("parameters.normalize", "linear without normalizing is a sum of "
                                                     "models, not a merge over the base"))
        if "lambda" in top:
            problems.append(("parameters.lambda", "linear takes no lambda"))
        total = sum(weight_of.get(where, 1.0) for where, _, _, _ in entries)  # the base's too
        if total == 0:
            problems.append(("models", "linear: the weights sum to 0 (mergekit divides by "
                                       "their sum)"))
        else:
            weights = [w / total for w in weights]
        return finetuned, weights, "task-arithmetic", options
    if method in GENERALIZED:
        return finetuned, [float(w) for w in weights], METHODS[method], \
            {**options, **_generalized(problems, method, top, tunes)}
    if method == "task_arithmetic" and any(p.get("density", 1.0) not in (1.0, None)
                                           for _, _, p in tunes):
        problems.append(("models", "task_arithmetic does not sparsify: a density has no effect "
                                   "(in mergekit either); use ties or dare_linear"))
    if method == "task_arithmetic" and "layer_weights" in options:
        # sparsestitch's task arithmetic takes one weight per model: with gradients it runs as
        # mergekit's generalized task arithmetic without drops (density 1) or sign election,
        # its weights per layer, normalized only where the config asks, as mergekit does
        options.update(density=1.0, normalize=1 if normalize else 0)
        if top.get("lambda", 1.0) != 1.0:
            options["scale"] = top["lambda"]
        return finetuned, [float(w) for w in weights], "dare-linear-mergekit", options
    if method == "ties" and top.get("rescale", False):
        problems.append(("parameters.rescale", "ties with rescale: true rescales the trimmed "
                                               "values, which ties-mergekit does not"))
    if method == "ties":
        options["normalize"] = 1 if normalize else 0
    elif normalize:
        total = sum(weights)   # mergekit: divided by the weights' sum, unless it is ~0
        if abs(total) >= 1e-8:
            weights = [w / total for w in weights]
    if method == "ties":
        options["density"] = _per_model(tunes, "density", 1.0, top)
    if top.get("lambda", 1.0) != 1.0:
        options["scale"] = top["lambda"]
    return finetuned, [float(w) for w in weights], METHODS[method], options


#: Where a rule option comes from in a mergekit config.
OPTION_KEYS = {"density": "models[].parameters.density", "gamma": "models[].parameters.gamma",
               "layer_weights": "models[].parameters.weight",
               "scale": "parameters.lambda", "normalize": "parameters.normalize",
               "rescale": "parameters.rescale", "drop": "models[].parameters.density",
               "layers": "base_model"}


def _check_values(problems: list, rule: str, weights: list, options: dict) -> None:
    """Each value in range, as the rule checks it (a density of 2, a gamma of -1), named by
    its key in the config -- before any tensor is read."""
    from ..combine.combiners import rule_combiner
    from ..core.errors import OptionError

    try:
        rule_combiner(rule, weights, len(weights), **options)
    except OptionError as exc:
        problems.append((OPTION_KEYS.get(exc.option, "models[].parameters.weight"),
                         exc.requirement or str(exc)))


def _per_model(tunes: list, key: str, default: float, top: dict) -> float | list:
    """Per-model parameter ``key`` (mergekit's default where a model does not give it; a
    gradient or filters are a list): one value where every model has the same, else the list
    in the models' order (the rule sparsifies each delta with its own, as mergekit does)."""
    values = [_with_fallback(parameters.get(key, default), top.get(key), default)
              for _, _, parameters in tunes]
    values = [default if value is None else value for value in values]  # unusable: reported
    if not values:
        return default
    same = all(value == values[0] for value in values)
    return values[0] if same and not isinstance(values[0], list) else values


def _whole_model_slices(problems: list, slices, base: str | None) -> list:
    """The sources of a ``slices:`` section that merges whole models -- one slice, each
    source's ``layer_range`` all of the base's layers -- as ``models`` entries (``model`` and
    ``parameters``); anything else builds a new stack of layers (a frankenmerge) and is a
    problem, named."""
    why = "sparsestitch merges whole models"
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        problems.append(("slices", "several slices (or no slice) build a new stack of layers (a "
                                   f"frankenmerge); {why}: one slice of every layer"))
        return []
    for key in sorted(str(k) for k in slices[0] if k != "sources"):
        problems.append((f"slices[0].{key}", "not supported in a slice (sources only)"))
    sources = slices[0].get("sources")
    if not isinstance(sources, list) or not sources:
        problems.append(("slices[0].sources", "must be a list of {model, layer_range, "
                                              "parameters}"))
        return []
    layers = _count_layers(problems, base, "slices")
    models = []
    for i, source in enumerate(sources):
        where = f"slices[0].sources[{i}]"
        if not isinstance(source, dict):
            problems.append((where, "must be a mapping like {model: PATH, layer_range: [0, N]}"))
            continue
        span = source.get("layer_range")
        if layers is not None and span != [0, layers]:
            problems.append((f"{where}.layer_range", f"{short_repr(span)} is not every layer of "
                                                     f"the base ([0, {layers}]): a new stack "
                                                     f"of layers (a frankenmerge); {why}"))
        models.append({k: v for k, v in source.items() if k != "layer_range"})
    return models


def _count_layers(problems: list, base: str | None, where: str) -> int | None:
    """The base's number of layers, counted from its tensor names (``layers.N``, ``h.N``,
    ``layer.N``, ``blocks.N``); None, with a problem named at ``where``, if they cannot be."""
    if base is None:
        return None  # the missing base is the problem already named
    from ..checkpoint import Checkpoint
    from ..combine.rules import LAYER_INDEX

    try:
        with Checkpoint(base) as ckpt:
            found = [int(m.group(1)) for n in ckpt.names if (m := LAYER_INDEX.search(n))]
    except (OSError, ValueError, SparsestitchError) as exc:
        problems.append(("base_model", f"{where}: the base's layers are counted from its tensor "
                                       f"names, which could not be read: {exc}"))
        return None
    if not found:
        problems.append((where, "no tensor name of the base has a layer index (layers.N, h.N, "
                                "layer.N, blocks.N) to count its layers"))
        return None
    return max(found) + 1


def _layers(problems: list, base: str | None, options: dict) -> bool:
    """``options["layers"]``, the base's number of layers, where a gradient needs it; False
    (and a problem) where they could not be counted."""
    def graded(x) -> bool:  # a gradient, or filters giving one
        return isinstance(x, list) and bool(x) and (
            not _filtered(x) or any(isinstance(c["value"], list) for c in x))

    if not any(isinstance(v, list) and any(graded(x) for x in v) for v in options.values()):
        return True
    layers = _count_layers(problems, base, "models (a gradient is placed on the base's layers)")
    if layers is None:
        return False
    options["layers"] = layers
    return True


def _generalized(problems: list, method: str, top: dict, tunes: list) -> dict:
    """The options of a dare / breadcrumbs rule: mergekit's parameters as they are (the
    rule normalizes, rescales and scales as mergekit does)."""
    normalize, rescale = GENERALIZED[method]
    options = {"density": _per_model(tunes, "density", 1.0, top),
               "normalize": 1 if top.get("normalize", normalize) else 0,
               "rescale": 1 if top.get("rescale", rescale) else 0}
    if method.startswith("breadcrumbs"):
        options["gamma"] = _per_model(tunes, "gamma", 0.01, top)
    if top.get("lambda", 1.0) != 1.0:
        options["scale"] = top["lambda"]
    return options


def _parameters(problems: list, where: str, value, known: set) -> dict:
    """A parameters mapping, each a number (or a boolean for the flags); gradient lists and
    parameters the method does not read are problems."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append((where, f"must be a mapping, got {short_repr(value)}"))
        return {}
    out = {}
    for key, item in value.items():
        name = f"{where}.{key}"
        setting = _setting(item) if key in GRADIENTS and key in known else None
        if setting is not None:
            out[key] = setting  # a gradient over the layers, or per-tensor filters
        elif isinstance(item, (list, dict)):
            problems.append((name, f"{short_repr(item)}: sparsestitch takes a number, a gradient "
                                   f"(a list of numbers) or per-tensor filters (a list of "
                                   f"{{filter: TEXT, value: NUMBER or GRADIENT}}) for density, "
                                   f"gamma and weight"))
            out[key] = None   # given, but not usable: no "required" problem on top
        elif key not in known:
            problems.append((name, f"not a parameter sparsestitch reads for this merge_method "
                                   f"(it reads {', '.join(sorted(known)) or 'none'})"))
        elif key in ("normalize", "rescale", "int8_mask"):
            if type(item) is not bool:
                problems.append((name, f"must be true or false, got {short_repr(item)}"))
            out[key] = item
        elif type(item) not in (int, float) or item != item or item in (float("inf"),
                                                                          float("-inf")):
            problems.append((name, f"must be a finite number, got {short_repr(item)}"))
        else:
            out[key] = float(item)
    return out


def _finite(value) -> bool:
    return type(value) in (int, float) and value == value and abs(value) != float("inf")


def _setting(item) -> list | None:
    """A gradient (a list of numbers) or per-tensor filters (a list of ``{filter, value}``,
    each value a number or a gradient) as mergekit writes them, else None."""
    if not isinstance(item, list) or not item:
        return None
    if all(_finite(v) for v in item):
        return [float(v) for v in item]
    conditions = []
    for condition in item:
        if not isinstance(condition, dict) or "value" not in condition or \
                set(condition) - {"filter", "value"} or \
                not (condition.get("filter") is None or isinstance(condition["filter"], str)):
            return None
        value = condition["value"]
        value = float(value) if _finite(value) else _setting(value)
        if not isinstance(value, (float, list)) or (isinstance(value, list) and
                                                    isinstance(value[0], dict)):
            return None
        conditions.append({"filter": condition.get("filter"), "value": value})
    return conditions


def _filtered(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def _with_fallback(value, top, default):
    """A model's per-tensor filters followed by what mergekit falls back to where none
    matches: the top-level parameter, then the default (None: none, mergekit fails there)."""
    if not _filtered(value) or any(c["filter"] in (None, "*") for c in value):
        return value
    tail = top if _filtered(top) else ([] if top is None else [{"filter": None, "value": top}])
    value = value + [c for c in tail if c not in value]
    if default is not None and not any(c["filter"] in (None, "*") for c in value):
        value.append({"filter": None, "value": default})
    return value


def _model_path(problems: list, where: str, value, cwd: Path, required: bool) -> str | None:
    """A model as mergekit names it: a path (relative to the working folder) or a Hub id."""
    if value is None:
        if required:
            problems.append((where, "sparsestitch merges task vectors against a base: name the "
                                    "model the others were fine-tuned from"))
        return None
    if not isinstance(value, str) or not value or "\0" in value:
        problems.append((where, "must name a model (a path or a Hub id)"))
        return None
    if "+" in value:
        problems.append((where, f"{value}: a LoRA adapter applied to a model; merge the adapter "
                                "into a full checkpoint first"))
        return None
    local = cwd / value
    if local.exists():
        return str(local)
    if parse_hub_id(value) is not None:
        return value
    problems.append((where, f"no such file or folder (from the working folder, as mergekit "
                            f"reads it): {local}"))
    return None


def _same(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b


def _dtypes(problems: list, data: dict) -> None:
    dtype, out_dtype = data.get("dtype"), data.get("out_dtype")
    for key, value in (("dtype", dtype), ("out_dtype", out_dtype)):
        if value is not None and value not in FLOAT_DTYPES:
            problems.append((key, f"must be one of {', '.join(FLOAT_DTYPES)}, got "
                                  f"{short_repr(value)}"))
    if dtype in FLOAT_DTYPES and dtype not in ("float32", "float64"):
        log.warning("dtype %s: sparsestitch computes in float32 (float64 for float64 models) and "
                    "rounds once to the model's dtype; mergekit would compute in %s, so results "
                    "can differ in the last bit", dtype, dtype)
