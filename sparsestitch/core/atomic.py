"""Atomic outputs: write under a temporary name beside the target, then rename.

A reader of the target path sees either nothing (or the previous file, with
``overwrite``) or the complete new output -- never a half-written one, even
if the process is killed.  Temporary names carry the writer's pid, so a later
run removes leftovers of writers that no longer exist instead of letting them
pile up.

Replacing a folder takes one step where the kernel swaps two paths
(``renameat2(RENAME_EXCHANGE)``) and two renames elsewhere: the old output is
first moved aside under a name ending in ``.previous``, then the new one is
renamed into place.  A kill between the two leaves the target path empty, with
the old output intact beside it *and the complete new one still at its
temporary name*; :func:`recover` (run only by a command that writes that path,
never by one that only reads) moves the old one back.  An aside whose new
output is gone was left by a kill after the second rename: the new output was
published, and if the path is empty now the user removed it, so nothing is put
back.  So whatever the filesystem, a kill at any point leaves either the old or
the new output, and no run deletes the only copy of either.

``overwrite`` replaces only what this tool could have written (each writer says what,
through ``replaceable``): a folder output carries :data:`OUTPUT_MARKER`, the list of
the files it was published with, and is replaced only while it holds nothing else; an
empty folder counts as no output at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from .._version import __version__
from .errors import OutputError

_TMP_TAG = ".sstmp-"
#: Suffix of an old output moved aside while a folder is replaced without an atomic swap.
_PREVIOUS = ".previous"


def temporary_sibling(target: Path, suffix: str = "") -> Path:
    """A fresh temporary path in ``target``'s folder, after sweeping stale ones."""
    sweep_stale(target)
    return target.with_name(f".{target.name}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
                            f"{suffix}")


def recover(target: str | os.PathLike) -> bool:
    """Put back an old output that a killed writer had moved aside while replacing
    ``target`` (see the module docstring); True if one was put back.

    Only an aside of a process that is gone, only while nothing is at ``target``, and only
    while that process's new output still sits at its temporary name (the kill came between
    the two renames).  Call it from commands that write ``target``, never from readers.
    """
    target = Path(target)
    if os.path.lexists(target):
        return False
    for aside, companion in _interrupted(target):
        try:
            os.rename(aside, target)
        except OSError:
            continue
        _remove(companion)
        fsync_folder(_folder_of(target))
        return True
    return False


def interrupted_replacement(target: str | os.PathLike) -> Path | None:
    """The old output a killed replacement of ``target`` left aside, which the next write of
    ``target`` puts back (:func:`recover`); None if there is none."""
    found = _interrupted(Path(target))
    return found[0][0] if found and not os.path.lexists(target) else None


def _interrupted(target: Path) -> list[tuple[Path, Path]]:
    """``(aside, new output)`` pairs of replacements of ``target`` killed between their two
    renames: by the same dead process, an old output moved aside and a temporary."""
    stale = _stale(target)
    temporaries = {_pid_of(target, p): p for p in stale if not p.name.endswith(_PREVIOUS)}
    return [(p, temporaries[_pid_of(target, p)]) for p in stale
            if p.name.endswith(_PREVIOUS) and _pid_of(target, p) in temporaries]


def sweep_stale(target: Path) -> None:
    """Recover an interrupted replacement of ``target``, then remove temporaries for it left
    by processes that are gone (a writer's path only: readers never change anything)."""
    recover(target)
    keep = {aside for aside, _ in _interrupted(target)}  # could not be put back: keep both
    keep |= {companion for _, companion in _interrupted(target)}
    for leftover in _stale(target):
        if leftover not in keep:
            _remove(leftover)


def _pid_of(target: Path, leftover: Path) -> int:
    return int(leftover.name[len(f".{target.name}{_TMP_TAG}"):].split("-", 1)[0])


def _folder_of(target: Path) -> Path:
    return target.parent if str(target.parent) else Path(".")


def _stale(target: Path) -> list[Path]:
    """Temporaries and asides for ``target`` whose writer is gone, in name order."""
    prefix = f".{target.name}{_TMP_TAG}"
    folder = _folder_of(target)
    if not folder.is_dir():
        return []
    found = []
    for leftover in folder.iterdir():
        if not leftover.name.startswith(prefix):
            continue
        pid_text = leftover.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and not process_alive(int(pid_text)):
            found.append(leftover)
    return sorted(found)


#: What a writer may replace with ``overwrite``: None if ``path`` may go, else what it is.
Replaceable = Callable[[Path], "str | None"]

#: The file a published folder output carries: which files it was published with.
OUTPUT_MARKER = ".sparsestitch-output.json"


def write_output_marker(folder: Path, kind: str) -> None:
    """Record, in ``folder``, that sparsestitch wrote it and which files it holds."""
    files = sorted(p.name for p in folder.iterdir() if p.name != OUTPUT_MARKER)
    with open(folder / OUTPUT_MARKER, "w", encoding="utf-8") as out:
        json.dump({"written_by": f"sparsestitch {__version__}", "kind": kind, "files": files},
                  out, indent=1)
        out.write("\n")
        fsync_file(out)


def earlier_folder_output(kind: str) -> Replaceable:
    """``replaceable`` for folder outputs of ``kind``: an empty folder, or one this tool
    published (its marker) that holds nothing but the files it was published with."""
    def problem(path: Path) -> str | None:
        if path.is_symlink() or not path.is_dir():
            return "not a folder" if not path.is_symlink() else "a symbolic link"
        entries = sorted(p.name for p in path.iterdir())
        if not entries:
            return None
        try:
            marker = json.loads((path / OUTPUT_MARKER).read_text(encoding="utf-8"))
            listed, written = set(marker["files"]), marker["kind"]
        except (OSError, ValueError, KeyError, TypeError):
            return (f"a folder sparsestitch did not write (it has no {OUTPUT_MARKER}; "
                    f"it holds {_some(entries)})")
        if written != kind:
            return f"a folder sparsestitch wrote as a {written!r} output, not a {kind!r} one"
        foreign = [name for name in entries if name != OUTPUT_MARKER and name not in listed]
        if foreign:
            return f"an earlier output to which someone added {_some(foreign)}"
        return None
    return problem


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def plain_file(path: Path) -> str | None:
    """``replaceable`` for outputs of any file kind: a regular file (not a folder)."""
    if path.is_dir():
        return "a folder"
    return None if path.is_file() else "not a regular file"


def check_target(target: Path, overwrite: bool, replaceable: Replaceable = plain_file) -> None:
    """Refuse an existing output unless ``overwrite`` and ``replaceable`` says it may go (an
    empty folder counts as no output for a folder writer); refuse a missing parent folder."""
    target = Path(target)
    if os.path.lexists(target) and not (replaceable is not plain_file and _empty_folder(target)):
        if not overwrite:
            raise OutputError("output already exists; pass overwrite=True (--overwrite) to "
                              "replace it", path=target)
        problem = replaceable(target)
        if problem is not None:
            raise OutputError(f"output exists and is {problem}; --overwrite replaces only an "
                              "earlier output of sparsestitch of the same kind, so it was left "
                              "as it is: remove it yourself or choose another output",
                              path=target)
    parent = _folder_of(target)
    if not parent.is_dir():
        raise OutputError("the output's parent folder does not exist or is not a folder", path=target)


def _empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def publish(temporary: Path, target: Path, overwrite: bool) -> None:
    """Move a finished temporary file or folder to ``target`` atomically.

    Without ``overwrite`` the move itself refuses an existing target (a hard link for a
    file, ``renameat2(RENAME_NOREPLACE)`` for a folder), so of two writers racing for one
    output exactly one succeeds and the other is told; the first look is only for a
    clearer message.
    """
    if temporary.is_dir() and _empty_folder(target):
        with contextlib.suppress(OSError):  # an empty folder is no output: take its place
            target.rmdir()
    if not overwrite:
        if target.exists():
            raise _appeared(target)
        if temporary.is_dir():
            _rename_new(temporary, target)
        else:
            _link_new(temporary, target)
    elif temporary.is_dir() and target.exists():
        if _exchange(temporary, target):  # the old output now sits at the temporary name
            _remove(temporary)
        else:
            # A folder cannot be renamed over a non-empty one: move the old aside first.  A
            # kill between the two renames leaves the old output at ``old``, which
            # :func:`recover` puts back.
            old = temporary_sibling(target, _PREVIOUS)
            os.replace(target, old)
            fsync_folder(_folder_of(target))
            os.replace(temporary, target)
            fsync_folder(_folder_of(target))
            _remove(old)
    else:
        os.replace(temporary, target)
    fsync_folder(_folder_of(target))


def _appeared(target: Path) -> OutputError:
    return OutputError("output appeared while writing (another process?); "
                       "the new output was discarded", path=target)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, overwrite: bool = False, folder: bool = False,
                replaceable: Replaceable | None = None, marker: str = "output"):
    """Yield a temporary path to write; on success rename it to ``target``.

    ``replaceable`` says what ``overwrite`` may replace (default: a plain file, or for a
    folder an earlier folder output with the marker of kind ``marker``).  A folder output
    gets that marker (:data:`OUTPUT_MARKER`) just before it is published.  On any exception
    the temporary is removed and ``target`` is untouched.
    """
    target = Path(target)
    if replaceable is None:
        replaceable = earlier_folder_output(marker) if folder else plain_file
    sweep_stale(target)  # first: an interrupted replacement's old output counts as existing
    check_target(target, overwrite, replaceable)
    temporary = temporary_sibling(target)
    try:
        if folder:
            temporary.mkdir()
        yield temporary
        if folder:
            write_output_marker(temporary, marker)
        publish(temporary, target, overwrite)
    except BaseException as exc:
        _remove(temporary)
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise output_error(exc, target) from exc
        raise


def output_error(exc: OSError, target: str | os.PathLike) -> OutputError:
    """The error to raise when writing ``target`` failed with ``exc`` (disk full, file too large)."""
    return OutputError(f"writing failed ({exc.strerror or exc}); nothing was written", path=target)


def _link_new(temporary: Path, target: Path) -> None:
    """Publish a file only while ``target`` does not exist: a hard link, unlike a rename, fails
    if another process published meanwhile, so two racing writers cannot both succeed."""
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise _appeared(target) from None
    except OSError:  # a filesystem without hard links
        os.replace(temporary, target)
        return
    os.unlink(temporary)


def _rename_new(temporary: Path, target: Path) -> None:
    """Publish a folder only while ``target`` does not exist: ``RENAME_NOREPLACE`` where the
    kernel and filesystem have it, else a plain rename (which cannot replace a non-empty
    folder, and every published output is non-empty)."""
    try:
        if _renameat2(temporary, target, RENAME_NOREPLACE):
            return
        os.rename(temporary, target)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise _appeared(target) from None
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    return _renameat2(a, b, RENAME_EXCHANGE)


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux ``renameat2(a, b, flags)``: True when done, False where unsupported; raises
    OSError for any other failure."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(b))


def fsync_file(handle) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the filesystem allows opening folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
