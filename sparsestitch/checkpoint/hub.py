"""Hugging Face Hub names for checkpoints, resolved offline, and model cards for outputs.

Anywhere a checkpoint path is accepted, ``org/name`` or ``org/name@revision`` may name a
model in the local Hugging Face cache.  Nothing is ever downloaded here: resolution goes
through ``huggingface_hub`` with ``local_files_only=True``, and a model that is not in the
cache raises :class:`~sparsestitch.core.errors.CheckpointError` with the command that fetches it.
An existing local path always wins over a Hub id of the same spelling.

``huggingface_hub`` is needed only when a Hub id is actually used (``pip install
huggingface_hub``; it comes with ``transformers``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import CheckpointError

# Hub repository ids: "org/name", each part letters, digits, "-", "_", "." (the Hub's rule,
# without its finer points such as "--"); a revision after "@" is a branch, tag or commit.
# Only ids with an org are recognised, so a missing local file "model" is reported as a
# missing file and not as a missing Hub model.
# A revision is a commit hash or a branch or tag name: parts of letters, digits, "_", "-" and
# "." joined by single "/" (like "refs/pr/1"), never "." or ".." parts nor a leading "/", so
# it cannot name a folder outside the cache.
_REVISION = r"[A-Za-z0-9_][\w.-]{0,99}(?:/[A-Za-z0-9_][\w.-]{0,99}){0,7}"
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})"
                     rf"(?:@(?P<rev>{_REVISION}))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Resolved:
    """Where a checkpoint spec points: a local path, and for Hub ids the repository,
    the revision asked for (None: the default branch) and the commit it resolved to."""

    spec: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` if ``spec`` is spelled like a Hub id, else None.

    >>> parse_hub_id("org/model@v1.0"), parse_hub_id("org/model"), parse_hub_id("./model")
    (('org/model', 'v1.0'), ('org/model', None), None)
    """
    match = _HUB_ID.fullmatch(spec)
    if match is None or ".." in spec:
        return None
    return match["repo"], match["rev"]


def fetch_command(repo_id: str, revision: str | None) -> str:
    """The shell command that puts a Hub model into the local cache: ``hf download`` from
    huggingface_hub 1.0 on (which has no ``huggingface-cli``), else ``huggingface-cli``."""
    try:
        from importlib.metadata import version
        major = int(version("huggingface_hub").split(".")[0])
    except Exception:  # noqa: BLE001 - not installed or an odd version string: today's name
        major = 1
    tool = "hf" if major >= 1 else "huggingface-cli"
    return f"{tool} download {repo_id}" + (f" --revision {revision}" if revision else "")


def resolve(spec: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Resolved:
    """Resolve a local path or a Hub id (``org/name[@rev]``) to a local checkpoint path.

    The cache is ``cache_dir``, else ``$HF_HUB_CACHE`` (or ``$HF_HOME/hub``) read at call
    time, else ``huggingface_hub``'s default.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists():
        return Resolved(text, path)
    parsed = parse_hub_id(text)
    if parsed is None:
        repo, at, _ = text.partition("@")
        if at and parse_hub_id(repo) is not None:
            raise CheckpointError("no such file or folder, and not a Hub id either: a revision "
                                  "after @ is a branch or tag name (letters, digits, _ - . and "
                                  "single /) or a commit hash, never a path", path=text)
        raise CheckpointError("no such file or folder (nor a Hugging Face Hub id org/name[@rev])",
                              path=text)
    repo_id, revision = parsed
    snapshot = _snapshot(repo_id, revision, cache_dir)
    return Resolved(text, snapshot, repo_id, revision, snapshot.name)


def resolve_checkpoint(spec: str | os.PathLike, *,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """The local path of a checkpoint given as a path or a Hub id (see :func:`resolve`).

    >>> resolve_checkpoint("no-such-org/no-such-model@main",
    ...                    cache_dir="/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    sparsestitch.core.errors.CheckpointError: ... download no-such-org/no-such-model --revision main ...
    """
    return resolve(spec, cache_dir=cache_dir).path


def _snapshot(repo_id: str, revision: str | None, cache_dir) -> Path:
    hint = ("not in the local Hugging Face cache (no such local file or folder either); "
            "nothing is downloaded automatically. Fetch it once with: "
            f"{fetch_command(repo_id, revision)}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"looks like a Hub id but huggingface_hub is not installed "
                              f"(pip install huggingface_hub); then it must be {hint}",
                              path=_display(repo_id, revision), label="Hub model") from None
    cache = cache_dir if cache_dir is not None else _cache_from_env()
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                   local_files_only=True)
    except Exception:  # noqa: BLE001 - every failure of an offline lookup means "not here"
        raise CheckpointError(hint, path=_display(repo_id, revision),
                              label="Hub model") from None
    return _inside_cache(Path(folder), repo_id, revision)


def _inside_cache(folder: Path, repo_id: str, revision: str | None) -> Path:
    """``folder`` if it is a commit's snapshot of ``repo_id`` in the cache, else an error: a
    ``refs/`` file holding ``../..`` or a planted link must not lead anywhere else."""
    snapshots = Path(os.path.realpath(folder.parent))
    repository = snapshots.parent
    inside = (snapshots.name == "snapshots"
              and repository.name == "models--" + repo_id.replace("/", "--")
              and _COMMIT.match(folder.name) is not None
              and Path(os.path.realpath(folder)).parent == snapshots)
    if not inside:
        raise CheckpointError("the local Hugging Face cache resolves this id outside its own "
                              f"snapshots ({folder}); its refs/ or snapshots/ were altered. "
                              "Fetch the model again, or name the folder directly",
                              path=_display(repo_id, revision), label="Hub model")
    return folder


def _cache_from_env() -> str | None:
    """The hub cache the environment names now (``huggingface_hub`` reads it only at import,
    so a later change -- a test, a job setting it per task -- would otherwise be missed)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.environ[variable]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _display(repo_id: str, revision: str | None) -> str:
    return repo_id + (f"@{revision}" if revision else "")


# ------------------------------------------------------------------------- model cards

def write_model_card(folder: str | os.PathLike, *, base: str, how: str,
                     tags: list[str] | tuple[str, ...] = (), relation: str | None = None,
                     library_name: str | None = None) -> Path:
    """Write ``folder/README.md``: :func:`model_card` of these arguments.

    ``library_name`` defaults to ``transformers`` when the folder has a ``config.json``
    (outputs mirror the base's layout, so ``transformers`` loads them).  An existing
    README.md (the base's card, copied with the other non-weight files) is replaced: it
    describes the base, not this model.
    """
    folder = Path(folder)
    if library_name is None and (folder / "config.json").is_file():
        library_name = "transformers"
    card = folder / "README.md"
    card.write_text(model_card(base=base, how=how, tags=tags, relation=relation,
                               library_name=library_name), encoding="utf-8")
    return card


def model_card(*, base: str, how: str, tags: list[str] | tuple[str, ...] = (),
               relation: str | None = None, library_name: str | None = None) -> str:
    """A model card as the Hub expects: YAML front matter, then ``how`` (Markdown).

    ``base`` is the base model's Hub id (or local name) for ``base_model:``; ``relation``
    becomes ``base_model_relation:`` (``finetune``, ``merge``, ...).

    >>> print(model_card(base="org/base", how="# Hi", relation="merge").splitlines()[:3])
    ['---', 'base_model: "org/base"', 'base_model_relation: "merge"']
    """
    lines = ["---", f"base_model: {_yaml(base)}"]
    if relation:
        lines.append(f"base_model_relation: {_yaml(relation)}")
    if library_name:
        lines.append(f"library_name: {_yaml(library_name)}")
    lines.append("tags:")
    lines += [f"- {_yaml(tag)}" for tag in dict.fromkeys(["sparsestitch", *tags])]
    lines += ["---", "", how.rstrip(), ""]
    return "\n".join(lines)


def _yaml(text: str) -> str:
    """A YAML scalar for ``text``: a JSON string is a valid YAML double-quoted scalar, so
    names with colons, quotes or newlines cannot break the front matter."""
    return json.dumps(str(text), ensure_ascii=False)
