"""The zoo as Python functions: init, add, ls, get, merge, verify, rm.

A zoo is a folder: ``zoo.json`` (the manifest, docs/zoo.md), ``deltas/NAME.delta`` (one
per member) and ``.zoo.lock``.  Checkpoints may be given as paths or Hub ids
(``org/name[@rev]``, resolved offline through the local Hugging Face cache).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.guard import Inputs
from ..checkpoint.hub import resolve, write_model_card
from ..checkpoint.writer import earlier_model_output
from ..core.atomic import check_target, publish, temporary_sibling
from ..core.errors import CheckpointError, OptionError, OutputError
from ..core.options import Range, number, optional_number
from ..ops.describe import exactness
from . import manifest as mf
from .cards import merged_card, restored_card
from .members import default_name, describe_source, file_matches, normalize_options
from .worker import INCOMING, sweep_incoming


@dataclass(frozen=True)
class AddResult:
    """What happened to one fine-tune of an :func:`add`."""

    name: str
    status: str                  # "added", "skipped", "repaired" or "failed"
    entry: dict | None = field(default=None, repr=False)  # the member's manifest entry
    error: str | None = None
    attempts: int | None = None  # None under Ray (it retries on its own)
    seconds: float = 0.0
    read_bytes: int = 0          # fetched from storage by the worker (page-cache hits excluded)
    rchar: int = 0               # read through read calls (page-cache hits included)
    peak_rss: int = 0            # the worker process's peak resident memory
    pid: int | None = None
    host: str | None = None

    @classmethod
    def from_dict(cls, result: dict) -> "AddResult":
        known = {k: result[k] for k in cls.__dataclass_fields__ if k in result}
        return cls(**known)


class ZooAddError(mf.ZooError):
    """Some members of an :func:`add` failed; ``results`` holds every outcome (the others
    are committed)."""

    def __init__(self, message: str, results: list[AddResult], path):
        super().__init__(message, path=path)
        self.results = results


def init(zoo: str | os.PathLike, base: str | os.PathLike, *,
         cache_dir: str | os.PathLike | None = None) -> dict:
    """Create a zoo for ``base`` (a path or Hub id) and return its manifest.

    Reads the base once, to record its identity (the checksum every member's delta must
    carry).  ``zoo`` must not exist or be an empty folder.
    """
    from ..ops.compress import compress
    from ..ops.describe import info
    zoo = Path(zoo)
    resolved = resolve(base, cache_dir=cache_dir)
    if zoo.exists() and (not zoo.is_dir() or any(zoo.iterdir())):
        raise OutputError("already exists and is not an empty folder; a zoo needs its own "
                          "folder", path=zoo)
    check_target(zoo, overwrite=True)  # only its check that the parent folder exists
    inputs = Inputs(cache_dir=cache_dir)
    inputs.add(resolved, "base")
    inputs.check_output(zoo, "zoo")
    with contextlib.ExitStack() as stack:
        staging = temporary_sibling(zoo)
        staging.mkdir()
        stack.callback(shutil.rmtree, staging, ignore_errors=True)
        (staging / mf.DELTAS_DIR).mkdir()
        # The base's identity, exactly as compress computes it for every member: compress
        # the base against itself with nothing kept (one pass, no ranking).
        probe = staging / "identity.delta"
        compress(resolved.path, resolved.path, probe, masks={})
        described = info(probe)
        probe.unlink()
        manifest = mf.new_manifest({"source": describe_source(resolved),
                                    "identity": described.header["base_identity"],
                                    "bytes": described.dense_bytes})
        mf.write(staging, manifest)
        if zoo.is_dir():
            zoo.rmdir()  # empty (checked above); publish refuses to replace a folder otherwise
        publish(staging, zoo, overwrite=False)
    return manifest


def add(zoo: str | os.PathLike,
        finetuned: str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, str],
        *, workers: int | None = None, ray: bool | str = False, retries: int = 2,
        check: bool = True, base: str | os.PathLike | None = None,
        scratch: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
        **compress_options) -> list[AddResult]:
    """Compress fine-tunes of the zoo's base into members, one job per fine-tune.

    ``finetuned``: paths or Hub ids (member names derived from them), or a mapping
    ``{name: checkpoint}``.  Members already present from the same source with the same
    options, whose delta verifies, are skipped, so rerunning an interrupted job finishes it.
    ``workers``: local processes at a time (default: one per CPU, at most one per
    fine-tune; ``0``: all in this process).  ``ray``: run as Ray tasks instead (``True``, or
    a cluster address); see :func:`.jobs.run_ray`.  ``retries``: extra attempts for a
    worker that dies or hits an OSError.  ``base``: where the zoo's base is now, if moved.
    ``scratch``: a folder on each worker's local disk for compress's temporary files
    (default: the zoo's ``deltas/.incoming``; on shared storage a local one saves writing
    and reading back spools several times the delta's size).
    ``compress_options`` go to :func:`sparsestitch.compress` and are recorded.
    With ``check`` (default), raises :class:`ZooAddError` if any member failed.
    """
    from . import jobs
    optional_number("workers", workers, Range(0, whole=True), "0: in this process")
    number("retries", retries, Range(0, whole=True))
    # Absolute paths: workers (Ray's in particular) need not share this process's cwd.
    zoo = Path(zoo).absolute()
    manifest = mf.read(zoo)
    base_path = _base_path(manifest, base, cache_dir).absolute()
    given, effective = normalize_options(compress_options)
    sources = _named_sources(finetuned, cache_dir)
    inputs = Inputs(cache_dir=cache_dir)
    inputs.add(base_path, "base")
    for name, resolved in sources:
        inputs.add(resolved, "fine-tune")
    for name, _ in sources:
        inputs.check_output(zoo / mf.delta_file(name), f"member {name!r}")
    tasks = [{"name": name, "source": describe_source(resolved), "base_path": str(base_path),
              "options": given, "effective": effective,
              "scratch": os.fspath(Path(scratch).absolute()) if scratch else None}
             for name, resolved in sources]
    if ray:
        raw = jobs.run_ray(zoo, tasks, ray, retries)
    elif workers == 0:
        raw = jobs.run_serial(zoo, tasks, retries)
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        count = workers or min(len(tasks), cpus or 1)
        raw = jobs.run_local(zoo, tasks, count, retries)
    results = [AddResult.from_dict(r) for r in raw]
    failures = [r for r in results if r.status == "failed"]
    if check and failures:
        raise ZooAddError(f"{len(failures)} of {len(results)} member(s) failed: "
                          + "; ".join(f"{r.name}: {r.error}" for r in failures),
                          results, zoo / mf.MANIFEST_NAME)
    return results


def _named_sources(finetuned, cache_dir):
    if isinstance(finetuned, (str, os.PathLike)):
        finetuned = [finetuned]
    if isinstance(finetuned, Mapping):
        pairs = [(mf.check_name(n), resolve(spec, cache_dir=cache_dir))
                 for n, spec in finetuned.items()]
    else:
        pairs = []
        for spec in finetuned:
            resolved = resolve(spec, cache_dir=cache_dir)
            pairs.append((default_name(resolved), resolved))
    if not pairs:
        raise OptionError("no fine-tuned checkpoint given")
    names = [n for n, _ in pairs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise OptionError(f"two checkpoints would both be named {duplicate!r}; name them "
                         "(NAME=CHECKPOINT on the command line, a dict in the API)")
    return pairs


def _base_path(manifest: dict, override, cache_dir) -> Path:
    """Where the zoo's base is: ``override``, else the pinned Hub commit, else the path."""
    if override is not None:
        return resolve(override, cache_dir=cache_dir).path
    source = manifest["base"]["source"]
    if source["kind"] == "hub":
        return resolve(f"{source['repo_id']}@{source['commit']}", cache_dir=cache_dir).path
    path = Path(source["path"])
    if not path.exists():
        raise CheckpointError("the zoo's base is not there any more; pass its new location "
                              "(--base)", path=path)
    return path


def ls(zoo: str | os.PathLike) -> list[dict]:
    """The members' manifest entries, sorted by name."""
    return mf.read(zoo)["members"]


def _member(zoo: Path, manifest: dict, name: str) -> tuple[dict, Path]:
    entry = mf.find(manifest, name)
    if entry is None:
        known = ", ".join(m["name"] for m in manifest["members"][:10]) or "none"
        raise mf.UnknownMemberError(f"no member {name!r} (members: {known})",
                                    path=zoo / mf.MANIFEST_NAME)
    problem = file_matches(zoo, entry)
    if problem:
        raise mf.ZooError(f"member {name!r}: {problem}; run zoo verify, then zoo add it again",
                          path=zoo / entry["file"])
    return entry, zoo / entry["file"]


def get(zoo: str | os.PathLike, name: str, out: str | os.PathLike, *, overwrite: bool = False,
        base: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Restore member ``name`` to ``out`` (a folder gets a model card, README.md)."""
    from ..ops.restore import restore
    zoo = Path(zoo)
    manifest = mf.read(zoo)
    entry, delta = _member(zoo, manifest, name)
    base_path = _base_path(manifest, base, cache_dir)
    return _build(out, overwrite, base_path, zoo, lambda tmp: restore(base_path, delta, tmp),
                  lambda folder: write_model_card(folder, **restored_card(
                      manifest, entry, exactness(delta), str(zoo), str(out))))


def merge(zoo: str | os.PathLike, names: Sequence[str], out: str | os.PathLike, *,
          rule: str = "localize-stitch", weights: Sequence[float] | None = None,
          overwrite: bool = False, base: str | os.PathLike | None = None,
          cache_dir: str | os.PathLike | None = None, **rule_options) -> Path:
    """Stitch members ``names`` onto the base into ``out`` with ``rule`` (see
    :func:`sparsestitch.stitch`); a folder output gets a model card."""
    from ..ops.stitch import stitch
    zoo = Path(zoo)
    manifest = mf.read(zoo)
    if not names:
        raise OptionError("name at least one member to merge")
    members = [_member(zoo, manifest, n) for n in names]
    base_path = _base_path(manifest, base, cache_dir)
    deltas = [delta for _, delta in members]
    card = merged_card(manifest, [e for e, _ in members], rule, weights, rule_options, str(zoo),
                       str(out))
    return _build(out, overwrite, base_path, zoo,
                  lambda tmp: stitch(base_path, deltas, tmp, rule=rule, weights=weights,
                                     **rule_options),
                  lambda folder: write_model_card(folder, **card))


def _build(out, overwrite: bool, base: Path, zoo: Path, make, card) -> Path:
    """Write an output with ``make(temporary)``, add the card to a folder, then publish it
    atomically: ``out`` appears complete, card included, or not at all."""
    out = Path(out)
    inputs = Inputs()
    inputs.add(base, "base")
    inputs.add_local(zoo, "zoo")
    inputs.check_output(out)
    check_target(out, overwrite, earlier_model_output)
    temporary = temporary_sibling(out)
    try:
        make(temporary)
        if temporary.is_dir():
            card(temporary)
        publish(temporary, out, overwrite)
    except BaseException:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        raise
    return out


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`: per member None (fine) or what is wrong, plus files in
    ``deltas/`` the manifest does not list and leftover work folders (not errors)."""

    problems: dict[str, str | None]
    unlisted: list[str]
    leftovers: list[str]
    checked_base: bool

    @property
    def ok(self) -> bool:
        return all(problem is None for problem in self.problems.values())


def verify(zoo: str | os.PathLike, names: Sequence[str] | None = None, *, against_base: bool = True,
           base: str | os.PathLike | None = None,
           cache_dir: str | os.PathLike | None = None) -> VerifyReport:
    """Check the manifest (strictly), then each member: the delta file's size, xxh3 and
    sha256, every record's checksums and decoding, and (``against_base``) that the base
    on disk is the one it was made from.  Does not stop at the first problem."""
    from ..ops.describe import verify as verify_delta
    zoo = Path(zoo)
    manifest = mf.read(zoo)
    base_path = _base_path(manifest, base, cache_dir) if against_base else None
    wanted = names if names is not None else [m["name"] for m in manifest["members"]]
    problems = {}
    for name in wanted:
        entry = mf.find(manifest, name)
        if entry is None:
            problems[name] = "not a member"
            continue
        problems[name] = file_matches(zoo, entry, deep=True)
        if problems[name] is None:
            try:
                verify_delta(zoo / entry["file"], base=base_path)
            except Exception as exc:  # noqa: BLE001 - report every member's problem
                problems[name] = f"{type(exc).__name__}: {exc}"
    deltas = zoo / mf.DELTAS_DIR
    listed = {Path(m["file"]).name for m in manifest["members"]}
    unlisted = sorted(p.name for p in deltas.iterdir() if p.name not in listed
                      and p.name != INCOMING) if deltas.is_dir() else []
    sweep_incoming(deltas / INCOMING)
    leftovers = sorted(p.name for p in (deltas / INCOMING).iterdir()) \
        if (deltas / INCOMING).is_dir() else []
    return VerifyReport(problems, unlisted, leftovers, base_path is not None)


def rm(zoo: str | os.PathLike, names: Sequence[str]) -> list[str]:
    """Remove members: their manifest entries, then their delta files (under the zoo lock,
    so a concurrent add of the same name cannot lose its new file).  All or nothing: an
    unknown name removes none."""
    zoo = Path(zoo)
    with mf.locked(zoo):
        manifest = mf.read(zoo)
        entries = []
        for name in names:
            entry = mf.find(manifest, name)
            if entry is None:
                raise mf.UnknownMemberError(f"no member {name!r}; nothing was removed",
                                            path=zoo / mf.MANIFEST_NAME)
            entries.append(entry)
        manifest["members"] = [m for m in manifest["members"] if m not in entries]
        mf.write(zoo, manifest)
        # A kill here leaves unlisted files, which zoo verify reports and a later add of
        # the name replaces: never a listed member without its file.
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                (zoo / entry["file"]).unlink()
        mf.fsync_folder(zoo / mf.DELTAS_DIR)
    return [entry["name"] for entry in entries]
