"""Inputs are never harmed: a command's inputs resolved to real paths once, every output
checked against all of them before any work starts.

Every command that writes builds one :class:`Inputs` from everything it reads --
checkpoint files, sharded folders, Hub ids (resolved to their snapshot in the local
cache), deltas, zoo folders, config files -- and asks :meth:`Inputs.check_output` for each
path it will write.  Paths are compared after resolution (symbolic links, ``..``, the
Hub cache's snapshot links to its blobs), not as the user spelled them, and an output is
refused when it *is* an input, lies *inside* an input folder (a shard, a zoo's manifest)
or *holds* an input (a folder that would be replaced).

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> (folder / "base").mkdir(); (folder / "base" / "model.safetensors").write_bytes(b"")
0
>>> inputs = Inputs()
>>> _ = inputs.add(folder / "base", "base")
>>> inputs.check_output(folder / "base" / "model.safetensors")  # doctest: +ELLIPSIS
Traceback (most recent call last):
sparsestitch.core.errors.OutputError: ... lies inside the base ...
>>> inputs.check_output(folder / "out")
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import OutputError
from .hub import Resolved, resolve


@dataclass(frozen=True)
class Protected:
    """One real path a command reads: the file or folder, the role it plays, and the
    spelling the user gave (for messages)."""

    real: Path
    role: str
    spec: str


class Inputs:
    """Everything a command reads, as real paths; outputs are checked against all of it."""

    def __init__(self, *, cache_dir: str | os.PathLike | None = None):
        self._cache_dir = cache_dir
        self._protected: list[Protected] = []
        self._outputs: list[tuple[Path, str]] = []

    @property
    def protected(self) -> list[Protected]:
        return list(self._protected)

    def add(self, spec: str | os.PathLike | Resolved, role: str) -> Resolved:
        """Resolve a checkpoint, delta, zoo or config (a path, or a Hub id through the local
        cache) and protect it; return where it resolved to."""
        resolved = spec if isinstance(spec, Resolved) else resolve(spec, cache_dir=self._cache_dir)
        shown = resolved.spec
        for real in protected_paths(resolved.path):
            self._protected.append(Protected(real, role, shown))
        return resolved

    def add_all(self, specs: Iterable[str | os.PathLike], role: str) -> list[Resolved]:
        return [self.add(spec, role) for spec in specs]

    def add_local(self, path: str | os.PathLike, role: str) -> Path:
        """Protect a local file or folder that is not a checkpoint (a delta, a zoo, a config):
        never a Hub id; a missing one is left for its reader to report."""
        for real in protected_paths(Path(path)):
            self._protected.append(Protected(real, role, os.fspath(path)))
        return Path(path)

    def check_output(self, out: str | os.PathLike, role: str = "output", *,
                     claim: bool = True) -> None:
        """Refuse ``out`` if writing it (and the temporaries beside it) could touch an input
        or an output already claimed by this command; then claim it (unless ``claim`` is
        False: a folder that the command's outputs go into)."""
        candidates = _output_candidates(Path(out))
        for item in self._protected:
            for candidate in candidates:
                relation = _relation(candidate, item.real)
                if relation:
                    raise OutputError(f"the {role} {relation} the {item.role} {item.spec!r} "
                                      f"({item.real}); writing it would destroy that input. "
                                      "Choose an output outside every input", path=out)
        for claimed, other in self._outputs:
            for candidate in candidates:
                relation = _relation(candidate, claimed)
                if relation:
                    raise OutputError(f"the {role} {relation} the {other} {str(claimed)!r} of "
                                      "this same command; give each output its own path",
                                      path=out)
        if claim:
            self._outputs.append((candidates[0], role))


def protected_paths(path: Path) -> list[Path]:
    """The real paths reading ``path`` depends on: the path itself (as named, with its
    folders resolved, and where it links to), the targets of links inside a folder, and
    for a snapshot of the Hugging Face cache the whole cached repository (its blobs and refs
    decide what the name resolves to)."""
    path = Path(os.path.abspath(path))
    found = {_real_parent(path), Path(os.path.realpath(path))}
    if path.is_dir():
        for child in path.iterdir():
            if child.is_symlink():
                found.add(Path(os.path.realpath(child)))
    repository = _hub_repository(Path(os.path.realpath(path)))
    if repository is not None:
        found.add(repository)
    return sorted(found)


def _hub_repository(real: Path) -> Path | None:
    """``.../models--org--name`` if ``real`` is (inside) one of its snapshots."""
    for folder in (real, *real.parents):
        if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
            return folder.parent.parent
    return None


def _real_parent(path: Path) -> Path:
    """``path`` with its folders resolved but its last part as named (a link stays a link)."""
    return Path(os.path.realpath(path.parent)) / path.name


def _output_candidates(out: Path) -> list[Path]:
    """Where writing ``out`` lands: the path with its folders resolved (a rename replaces a
    link itself), and, if it is a link now, where it points (the conservative reading)."""
    out = Path(os.path.abspath(out))
    named = _real_parent(out)
    candidates = [named]
    if out.is_symlink():
        candidates.append(Path(os.path.realpath(out)))
    return candidates


def _relation(output: Path, protected: Path) -> str | None:
    if output == protected:
        return "is"
    if protected in output.parents:
        return "lies inside"
    if output in protected.parents:
        return "would replace a folder holding"
    return None
