"""What the manifest records about a checkpoint source, a member's options and its delta file."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from pathlib import Path

import xxhash

from .._version import __version__
from ..checkpoint.hub import Resolved
from ..core.errors import OptionError
from .manifest import NAME_PATTERN, check_name, delta_file, now

#: compress options that steer the run, not the delta: not recorded, and not accepted from
#: callers (the zoo decides them).  ``masks`` cannot be recorded in JSON, so it is refused.
_RUN_OPTIONS = {"overwrite", "progress", "chunk_elements"}
_REFUSED_OPTIONS = {"overwrite", "progress", "masks"}
_CHUNK = 8 << 20


def describe_source(resolved: Resolved) -> dict:
    """The manifest's ``source`` object for a resolved checkpoint."""
    path = resolved.path.resolve()
    return {"spec": resolved.spec, "kind": "hub" if resolved.is_hub else "path",
            "path": str(path), "repo_id": resolved.repo_id, "revision": resolved.revision,
            "commit": resolved.commit, "fingerprint": fingerprint(path)}


def same_origin(a: dict, b: dict) -> bool:
    """Whether two sources name the same checkpoint: the same Hub commit, or the same path."""
    if a["kind"] == "hub" or b["kind"] == "hub":
        return (a["kind"], a.get("repo_id"), a.get("commit")) == \
               (b["kind"], b.get("repo_id"), b.get("commit"))
    return a["path"] == b["path"]


def fingerprint(path: Path) -> str:
    """xxh3 of the weight files' names, sizes and modification times: cheap, and changes when
    the checkpoint is rewritten (a rerun then recompresses instead of trusting the old delta)."""
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.name.endswith((".safetensors", ".index.json")))
    stats = []
    for file in files:
        st = file.stat()
        stats.append([file.name, st.st_size, st.st_mtime_ns])
    return xxhash.xxh3_64_hexdigest(json.dumps(stats).encode())


def default_name(resolved: Resolved) -> str:
    """A member name from a source: the Hub model's name (plus its revision), else the file
    or folder name without ``.safetensors``.

    >>> from pathlib import Path
    >>> default_name(Resolved("org/Llama-3@v2", Path("/c/snap"), "org/Llama-3", "v2", "ab"))
    'Llama-3-v2'
    """
    if resolved.is_hub:
        raw = resolved.repo_id.split("/")[-1] + (f"-{resolved.revision}" if resolved.revision else "")
    else:
        raw = Path(os.fspath(resolved.spec).rstrip("/")).name or resolved.path.resolve().name
        raw = raw.removesuffix(".safetensors")
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", raw).lstrip("._+-")[:128].removesuffix(".delta")
    if not re.fullmatch(NAME_PATTERN, name):
        raise OptionError(f"cannot derive a member name from {resolved.spec!r}; give one "
                         "(NAME=CHECKPOINT on the command line, a dict in the API)")
    return name


def compress_defaults() -> dict:
    """compress's keyword defaults that shape a delta (read from its signature, so options
    added to compress later are recorded without changes here)."""
    from ..ops.compress import compress
    return {name: p.default for name, p in inspect.signature(compress).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _RUN_OPTIONS | {"masks"}}


def normalize_options(options: dict) -> tuple[dict, dict]:
    """``(given, effective)``: the caller's compress options as JSON values, and those over
    compress's defaults (what the manifest records).  Raises ValueError naming a bad option."""
    refused = sorted(set(options) & _REFUSED_OPTIONS)
    if refused:
        raise OptionError(f"compress option {refused[0]!r} cannot be used in a zoo (the zoo "
                         "decides outputs; masks cannot be recorded in the manifest)")
    given = {}
    for key, value in options.items():
        if isinstance(value, tuple):
            value = list(value)
        try:
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise OptionError(f"compress option {key}={value!r} is not a JSON value; the zoo "
                             "records options in its manifest") from None
        given[key] = json.loads(text)
    effective = {k: (list(v) if isinstance(v, tuple) else v) for k, v in compress_defaults().items()}
    effective.update(given)
    _check_compress_options(effective)
    return given, effective


def _check_compress_options(effective: dict) -> None:
    """Refuse, before any worker starts, the options compress would refuse in each of them
    (it checks them with the same functions): an unknown name, a value of the wrong type or
    out of range (``-O lossless=no`` is the string 'no', not false)."""
    from ..core.sizes import parse_memory
    from ..engine.readahead import workers_for
    from ..localize.keep import choices
    from ..localize.keep_options import KeepOptions

    unknown = sorted(set(effective) - set(compress_defaults()) - _RUN_OPTIONS)
    if unknown:
        raise OptionError(f"compress has no option {unknown[0]!r}; its options are "
                          f"{', '.join(sorted(compress_defaults()))}", option=unknown[0])
    choices(KeepOptions.of(**{key: effective[key] for key in KeepOptions.names()}), None)
    workers_for(effective["threads"], 1)
    parse_memory(effective["max_memory"], 0)


def options_conflict(recorded: dict, effective: dict) -> str | None:
    """The first option set differently, ignoring options only one side knows (a member
    added by an older or newer sparsestitch); None when they agree."""
    for key in sorted(set(recorded) & set(effective)):
        if recorded[key] != effective[key]:
            return (f"other options: it was made with {option_words(key, recorded[key])}, "
                    f"this add asks for {option_words(key, effective[key])}")
    return None


def option_words(key: str, value) -> str:
    """An option's value as the command line spells it (``None``: compress's default)."""
    flag = "--" + key.replace("_", "-")
    if value is None:
        return f"no {flag} (the default)"
    if value is True:
        return flag
    if value is False:
        return f"no {flag}"
    return f"{flag} {value}"


def file_checksums(path: str | os.PathLike) -> tuple[int, str, str]:
    """``(size, xxh3-64, sha256)`` of a file, in one read."""
    xxh, sha, size = xxhash.xxh3_64(), hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            xxh.update(chunk)
            sha.update(chunk)
            size += len(chunk)
    return size, xxh.hexdigest(), sha.hexdigest()


def build_entry(name: str, source: dict, delta: Path, summary, options: dict) -> dict:
    """The manifest entry of a member whose delta (not yet published) is at ``delta``.

    ``summary`` is compress's :class:`~sparsestitch.DeltaSummary`; the fidelity report and
    base identity come from the delta's header, as written by compress.
    """
    from ..ops.describe import info
    check_name(name)
    described = info(delta)
    header = described.header
    size, xxh3, sha256 = file_checksums(delta)
    fidelity = header.get("fidelity")
    if fidelity is not None and not isinstance(fidelity, dict):
        fidelity = {"value": fidelity}  # the manifest's field is an object (docs/zoo.md)
    return {"name": name, "source": source, "file": delta_file(name), "size": size,
            "dense_bytes": described.dense_bytes, "kept": summary.kept,
            "candidates": summary.candidates, "density": summary.density, "options": options,
            "fidelity": fidelity, "checksums": {"xxh3_64": xxh3, "sha256": sha256},
            "base_identity": header["base_identity"], "created": now(),
            "library_version": __version__}


def file_matches(zoo: Path, entry: dict, deep: bool = False) -> str | None:
    """None if the member's delta file has its recorded size and xxh3 (and sha256 with
    ``deep``), else what is wrong."""
    path = zoo / entry["file"]
    try:
        if path.stat().st_size != entry["size"]:
            return f"size {path.stat().st_size:,} bytes, recorded {entry['size']:,}"
        if not deep:
            xxh = xxhash.xxh3_64()
            with open(path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    xxh.update(chunk)
            got = {"xxh3_64": xxh.hexdigest()}
        else:
            _, xxh3, sha256 = file_checksums(path)
            got = {"xxh3_64": xxh3, "sha256": sha256}
    except FileNotFoundError:
        return "delta file is missing"
    except OSError as exc:
        return f"delta file cannot be read ({exc.strerror or exc})"
    for key, value in got.items():
        if value != entry["checksums"][key]:
            return f"{key} {value} differs from the recorded {entry['checksums'][key]}"
    return None
