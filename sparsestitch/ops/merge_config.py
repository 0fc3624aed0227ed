"""Merge config files, in the spirit of mergekit's YAML: models, weights, the rule and its
parameters, what is kept of each fine-tune, checked completely before any tensor is read.

::

    base: models/base            # a .safetensors file, an HF folder or a Hub id (org/name[@rev])
    models:
      - model: runs/math
        weight: 1.0              # optional, default 1
      - model: runs/code
        weight: 0.5
    rule: ties                   # localize-stitch | task-arithmetic | ties | ties-mergekit | dare
    parameters:                  # the rule's options: scale, density, drop, seed
      density: 0.2
    keep:                        # optional: what is kept of each fine-tune (compress's options)
      lossless: true             # or density, scope, bits, group, max_error
      exclude: ["*.embed_tokens.*"]   # and include, dense: patterns over tensor names
    out: merged/                 # optional (the command line's -o wins)
    max_memory: 1GiB             # optional

Relative paths are relative to the config file's folder.  A config in mergekit's own schema
(it has ``merge_method``) is read as mergekit reads it (:mod:`.mergekit_config`).  :func:`load` returns the checked
:class:`MergeConfig`; :meth:`MergeConfig.check_inputs` opens every checkpoint's header (no
tensor) and compares it with the base, so a wrong path, option or model fails in the first
second, before any output exists.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import Checkpoint
from ..checkpoint.hub import parse_hub_id
from ..combine.combiners import rule_combiner
from ..combine.rules import RULES
from ..core.errors import ConfigError, OptionError, SparsestitchError
from ..core.options import number, short_repr
from ..core.sizes import parse_memory
from ..engine.fits import check_compatible
from ..localize.keep import choices
from ..localize.keep_options import KeepOptions
from . import mergekit_config

__all__ = ["ConfigError", "MergeConfig", "load"]

TOP_KEYS = {"base", "models", "rule", "parameters", "keep", "out", "max_memory"}
MODEL_KEYS = {"model", "weight"}
#: A checkpoint's float dtypes by mergekit's names for them.
FLOAT_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
#: A config's ``keep:`` keys: merge's options of what is kept, by compress's names.
KEEP_KEYS = set(KeepOptions.names("merge")) - {"keep"} | {"density"}


@dataclass
class MergeConfig:
    """A checked merge config: arguments for :func:`sparsestitch.merge`."""

    path: Path
    base: str
    finetuned: list[str]
    weights: list[float]
    rule: str = "localize-stitch"
    parameters: dict = field(default_factory=dict)
    keep: dict = field(default_factory=dict)
    out: str | None = None
    max_memory: str | int | None = None
    #: The dtype a mergekit config writes (``out_dtype``, else ``dtype``): it must be the
    #: base's, which is what sparsestitch writes (checked with the headers).
    writes_dtype: str | None = None

    def merge_arguments(self) -> dict:
        """Keyword arguments of :func:`sparsestitch.merge` (``out`` aside)."""
        keep = dict(self.keep)
        if "density" in keep:
            keep["keep"] = keep.pop("density")
        return {"base": self.base, "finetuned": self.finetuned, "rule": self.rule,
                "weights": self.weights, "max_memory": self.max_memory, **keep,
                **self.parameters}

    def check_inputs(self) -> None:
        """Open every checkpoint's header and check each fine-tune against the base (no
        tensor is read)."""
        with contextlib.ExitStack() as stack:
            try:
                base = stack.enter_context(Checkpoint(self.base))
            except (SparsestitchError, OSError) as exc:
                raise ConfigError(self.path, "base", str(exc)) from None
            for i, name in enumerate(self.finetuned):
                try:
                    check_compatible(base, stack.enter_context(Checkpoint(name)))
                except (SparsestitchError, OSError, ValueError) as exc:
                    raise ConfigError(self.path, f"models[{i}].model", str(exc)) from None
            floats = {base.entry(n).dtype for n in base.names} & set(FLOAT_NAMES)
            if self.writes_dtype is not None and floats != {self.writes_dtype}:
                raise ConfigError(self.path, "dtype", f"mergekit would write "
                                  f"{FLOAT_NAMES.get(self.writes_dtype)}, sparsestitch writes "
                                  f"the base's ({', '.join(FLOAT_NAMES[f] for f in sorted(floats))}):"
                                  " set out_dtype (or dtype) to the base's, or convert the "
                                  "result afterwards")


def load(path: str | os.PathLike) -> MergeConfig:
    """Read and check a merge config file (YAML or JSON) -- every key and value, not the
    checkpoints' contents (see :meth:`MergeConfig.check_inputs`).  Every problem is a
    :class:`~sparsestitch.core.errors.ConfigError` naming the file and the key."""
    path = Path(path)
    data = _read(path)
    if mergekit_config.is_mergekit(data):  # mergekit's schema, as mergekit reads it
        return mergekit_config.translate(path, data)
    _known(path, "top level", data, TOP_KEYS)
    folder = path.parent
    base = _source(path, "base", data.get("base"), folder)
    finetuned, weights = _models(path, data.get("models"), folder)
    rule = data.get("rule", "localize-stitch")
    if not isinstance(rule, str) or rule not in RULES:
        raise ConfigError(path, "rule", f"must be one of {', '.join(RULES)}, got "
                                        f"{short_repr(rule)}")
    parameters = _mapping(path, "parameters", data.get("parameters"))
    try:
        rule_combiner(rule, weights, len(finetuned), **parameters)
    except OptionError as exc:
        raise _config_error(path, "parameters", exc, parameters) from None
    keep = _keep(path, _mapping(path, "keep", data.get("keep")), rule)
    out = data.get("out")
    if out is not None and not _is_path(out):
        raise ConfigError(path, "out", f"must be a path, got {short_repr(out)}")
    memory = data.get("max_memory")
    _check_memory(path, memory)
    return MergeConfig(path, base, finetuned, weights, rule, parameters, keep,
                       None if out is None else str(folder / out), memory)


def _check_memory(path: Path, memory) -> None:
    try:
        if memory is not None and not isinstance(memory, (str, int)):
            raise ValueError("not a size")
        parse_memory(memory, 0)
    except ValueError:
        raise ConfigError(path, "max_memory", f"must be a size like 1GiB, got "
                                              f"{short_repr(memory)}") from None


def _read(path: Path) -> dict:
    """The config file's mapping, parsed safely (no tags that construct objects)."""
    import yaml  # a dependency of the merge command only

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "file", f"cannot read it ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(path, "file", "nested too deeply to be a merge config") from None
    except (yaml.YAMLError, ValueError, OverflowError) as exc:  # ValueError: a date like 2024-02-30
        raise ConfigError(path, "file", f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(path, "file", "must be a mapping with base, models and rule")
    return data


def _models(path: Path, models, folder: Path) -> tuple[list[str], list[float]]:
    """The fine-tunes' checkpoints and weights (finite numbers, of any sign)."""
    if not isinstance(models, list) or not models:
        raise ConfigError(path, "models", "must be a list of {model: PATH, weight: NUMBER}")
    finetuned, weights = [], []
    for i, item in enumerate(models):
        where = f"models[{i}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict):
            raise ConfigError(path, where, "must be a mapping like {model: PATH, weight: 1.0}")
        _known(path, where, item, MODEL_KEYS)
        finetuned.append(_source(path, f"{where}.model", item.get("model"), folder))
        try:
            weights.append(number("weight", item.get("weight", 1.0)))
        except OptionError as exc:
            raise ConfigError(path, f"{where}.weight", exc.requirement) from None
    return finetuned, weights


def _keep(path: Path, keep: dict, rule: str) -> dict:
    _known(path, "keep", keep, KEEP_KEYS)
    for key in ("include", "exclude", "dense"):
        value = keep.get(key)
        if value is not None and not (isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise ConfigError(path, f"keep.{key}", "must be a pattern or a list of patterns")
    try:
        choices(KeepOptions.from_mapping(keep).for_rule(rule), None)
    except OptionError as exc:
        raise _config_error(path, "keep", exc, keep) from None
    return keep


def _config_error(path: Path, section: str, error: OptionError, given: dict) -> ConfigError:
    """An option's error named by its key in the config (``keep.bits``), where the section
    has it; else by the section (an option that contradicts another, say)."""
    if error.option in given:
        return ConfigError(path, f"{section}.{error.option}", error.requirement or str(error))
    return ConfigError(path, section, str(error))


def _known(path: Path, where: str, data: dict, allowed: set[str]) -> None:
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(path, where, f"keys are names, got {short_repr(key)}; the keys are "
                                           f"{', '.join(sorted(allowed))}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(path, where, f"unknown key {unknown[0]!r}; the keys are "
                                       f"{', '.join(sorted(allowed))}")


def _mapping(path: Path, where: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(path, where, f"must be a mapping, got {short_repr(value)}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(path, where, f"keys are option names, got {short_repr(key)}")
    return dict(value)


def _is_path(value) -> bool:
    return isinstance(value, str) and bool(value) and "\0" not in value


def _source(path: Path, where: str, value, folder: Path) -> str:
    """A checkpoint path (relative to the config's folder) or a Hub id; it must exist."""
    if not _is_path(value):
        raise ConfigError(path, where, "must name a checkpoint (a path or a Hub id)")
    local = folder / value
    try:
        if local.exists():
            return str(local)
    except OSError as exc:  # a name too long for the file system
        raise ConfigError(path, where, f"cannot look it up ({exc.strerror or exc})") from None
    if parse_hub_id(value) is not None:
        return value
    raise ConfigError(path, where, f"no such file or folder: {local}")
