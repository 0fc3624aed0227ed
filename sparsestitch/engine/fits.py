"""Does A fit B: every check that two sides agree on their tensors -- a delta and its base
(:func:`check_delta_fits`), a fine-tune and its base (:func:`check_compatible`), and the
comparison they and the others (a live model and its deltas, ``live.tensors.match_records``;
a merged model and the deltas it was stitched from, ``ops.compose``) share: the same dtype and
shape (:func:`differs`), written the same way in every message (:func:`shown`).  Each check
raises before any output is written, naming the file and the first tensor that differs.
"""

from __future__ import annotations

import json

from ..checkpoint import Checkpoint
from ..core.errors import BaseMismatchError, TensorMismatchError
from ..delta.format import DeltaReader


def shown(entry) -> str:
    """A tensor's dtype and shape as messages write them (``BF16[4096, 4096]``); ``entry``
    is anything with ``dtype`` (a safetensors name) and ``shape``."""
    return f"{entry.dtype}{list(entry.shape)}"


def differs(a, b) -> bool:
    """Whether two tensors (checkpoint entries, delta records, output tensors) differ in dtype
    or shape."""
    return (a.dtype, tuple(a.shape)) != (b.dtype, tuple(b.shape))


def check_delta_fits(base: Checkpoint, reader: DeltaReader) -> None:
    """The delta describes exactly the base's tensors with their dtypes and shapes (checked
    before any output is written; checksums are checked as the base is read)."""
    names = {r.name for r in reader.records if r.kind != "added"}
    missing = [n for n in base.names if n not in names]
    if missing:
        raise BaseMismatchError(f"the delta has no record for base tensor {missing[0]!r} "
                                f"({len(missing)} missing): it was made for another base",
                                path=reader.path, tensor=missing[0])
    for record in reader.records:
        if record.kind == "added":
            if record.name in base:
                raise BaseMismatchError("the delta adds a tensor the base already has",
                                        path=reader.path, tensor=record.name)
            continue
        if record.name not in base:
            raise BaseMismatchError("the delta has a tensor the base lacks: it was made for "
                                    "another base", path=reader.path, tensor=record.name)
        entry = base.entry(record.name)
        if differs(entry, record):
            raise BaseMismatchError(f"base has {shown(entry)}, delta expects {shown(record)}",
                                    path=reader.path, tensor=record.name)


def architecture(ckpt) -> str | None:
    """The architecture a model folder's ``config.json`` names (``architectures[0]``, else
    ``model_type``); None where there is no readable one."""
    for path in getattr(ckpt, "extra_files", ()):
        if path.name != "config.json":
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict):
            return None
        names = config.get("architectures")
        if isinstance(names, list) and names and isinstance(names[0], str):
            return names[0]
        kind = config.get("model_type")
        return kind if isinstance(kind, str) else None
    return None


def check_compatible(base: Checkpoint, tune: Checkpoint, allow_crimes: bool = False) -> None:
    """The fine-tune has the base's tensors with their dtypes and shapes, and (unless
    ``allow_crimes``, as mergekit's ``--allow-crimes``) the same architecture where both
    folders' ``config.json`` name one."""
    ours, theirs = architecture(base), architecture(tune)
    if ours and theirs and ours != theirs and not allow_crimes:
        raise TensorMismatchError(f"the base is a {ours}, the fine-tune a {theirs} (their "
                                  "config.json): across architectures the same tensor names "
                                  "mean different things; pass allow_crimes=True "
                                  "(--allow-crimes) to go on anyway", path=tune.path)
    missing = [n for n in base.names if n not in tune]
    if missing:
        raise TensorMismatchError(f"the fine-tuned checkpoint lacks {len(missing)} base tensor(s), "
                                  f"e.g. {missing[0]!r}; is it a fine-tune of this base?",
                                  path=tune.path, tensor=missing[0])
    for name in base.names:
        b, t = base.entry(name), tune.entry(name)
        if differs(b, t):
            raise TensorMismatchError(f"base has {shown(b)}, fine-tune has {shown(t)}; convert "
                                      "the fine-tune to the base's dtype, or compare against "
                                      "the right base", path=tune.path, tensor=name)
