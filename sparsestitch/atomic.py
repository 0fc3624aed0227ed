"""Atomic outputs: write under a temporary name beside the target, then rename.

A reader of the target path sees either nothing (or the previous file, with
``overwrite``) or the complete new output -- never a half-written one, even
if the process is killed.  Temporary names carry the writer's pid, so a later
run removes leftovers of writers that no longer exist instead of letting them
pile up.

Replacing a folder takes one step where the kernel swaps two paths
(``renameat2(RENAME_EXCHANGE)``) and two renames elsewhere: the old output is
first moved aside under a name ending in ``.previous``, then the new one is
renamed into place.  A kill between the two leaves the target path empty for a
moment, with the old output intact beside it; :func:`recover` (run before
every write of that path, and when a checkpoint path is opened and missing)
moves it back.  So whatever the filesystem, a kill at any point leaves either
the old or the new output, and no run deletes the only copy of either.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from pathlib import Path

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

    Only an aside of a process that is gone, and only while nothing is at ``target``.
    """
    target = Path(target)
    if os.path.lexists(target):
        return False
    for leftover in _stale(target):
        if leftover.name.endswith(_PREVIOUS):
            try:
                os.rename(leftover, target)
            except OSError:
                continue
            fsync_folder(target.parent if str(target.parent) else Path("."))
            return True
    return False


def sweep_stale(target: Path) -> None:
    """Recover an interrupted replacement of ``target``, then remove temporaries for it left
    by processes that are gone."""
    recover(target)
    for leftover in _stale(target):
        # An old output moved aside is deleted only once ``target`` holds a complete output.
        if leftover.name.endswith(_PREVIOUS) and not os.path.lexists(target):
            continue
        _remove(leftover)


def _stale(target: Path) -> list[Path]:
    """Temporaries and asides for ``target`` whose writer is gone, in name order."""
    prefix = f".{target.name}{_TMP_TAG}"
    folder = target.parent if str(target.parent) else Path(".")
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


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; refuse a missing parent folder."""
    if target.exists() and not overwrite:
        raise OutputError("output already exists; pass overwrite=True (--overwrite) to replace it",
                          path=target)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError("the output's parent folder does not exist or is not a folder", path=target)


def check_not_an_input(target: str | os.PathLike, inputs) -> None:
    """Refuse an output that is an input or a folder holding one: overwriting it would destroy
    the input (even with ``overwrite``, which is meant for earlier outputs)."""
    resolved = Path(target).resolve()
    for source in inputs:
        if resolved == Path(source).resolve() or resolved in Path(source).resolve().parents:
            raise OutputError(f"the output would replace the input {os.fspath(source)!r}; "
                              "choose another output path", path=target)


def publish(temporary: Path, target: Path, overwrite: bool) -> None:
    """Move a finished temporary file or folder to ``target`` atomically.

    Without ``overwrite`` the move itself refuses an existing target (a hard link for a
    file, ``renameat2(RENAME_NOREPLACE)`` for a folder), so of two writers racing for one
    output exactly one succeeds and the other is told; the first look is only for a
    clearer message.
    """
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
            fsync_folder(target.parent if str(target.parent) else Path("."))
            os.replace(temporary, target)
            fsync_folder(target.parent if str(target.parent) else Path("."))
            _remove(old)
    else:
        os.replace(temporary, target)
    fsync_folder(target.parent if str(target.parent) else Path("."))


def _appeared(target: Path) -> OutputError:
    return OutputError("output appeared while writing (another process?); "
                       "the new output was discarded", path=target)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, overwrite: bool = False, folder: bool = False):
    """Yield a temporary path to write; on success rename it to ``target``.

    On any exception the temporary is removed and ``target`` is untouched.
    """
    target = Path(target)
    sweep_stale(target)  # first: an interrupted replacement's old output counts as existing
    check_target(target, overwrite)
    temporary = temporary_sibling(target)
    try:
        if folder:
            temporary.mkdir()
        yield temporary
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
