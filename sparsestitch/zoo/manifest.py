"""The zoo manifest (``zoo.json``): schema, strict reading, and locked atomic updates.

The manifest is the zoo's only index: a member exists exactly when the manifest lists it.
docs/zoo.md is the normative description; this module implements it.

Updates follow one protocol, so that any number of processes on any number of machines
sharing the folder never lose or corrupt an entry:

1. take an exclusive ``flock`` on ``.zoo.lock`` (released by the kernel if the holder dies);
2. read and validate the current manifest (never a cached copy);
3. change it in memory and validate the result;
4. write it to a unique temporary name beside it, ``fsync``, ``os.replace`` over
   ``zoo.json``, ``fsync`` the folder;
5. release the lock.

Readers take no lock: ``os.replace`` makes them see the old or the new file, never a mix.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path

from ..core.atomic import fsync_folder
from ..core.errors import OptionError, SparsestitchError

MANIFEST_NAME = "zoo.json"
LOCK_NAME = ".zoo.lock"
DELTAS_DIR = "deltas"
FORMAT = "sparsestitch.zoo"
FORMAT_VERSION = 1
#: A manifest of 1,000 members is about 1.5 MB; anything near this is not a manifest.
MAX_MANIFEST_BYTES = 256 << 20
#: How long to wait for the lock before saying who holds it (a stopped, not dead, holder).
LOCK_TIMEOUT_S = 600.0
_TMP_PREFIX = f".{MANIFEST_NAME}.tmp-"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"
_NAME = re.compile(NAME_PATTERN)
_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ZooError(SparsestitchError):
    """A zoo operation cannot proceed (see the subclasses)."""


class ManifestError(ZooError):
    """``zoo.json`` is missing, not valid JSON, or breaks the schema (names file and member)."""


class MemberConflictError(ZooError):
    """A member of that name exists with a different source, options or content."""


class UnknownMemberError(ZooError):
    """No member of that name in the zoo."""


def check_name(name: object, path: str | os.PathLike | None = None) -> str:
    """A member name, or ManifestError/ValueError saying why it is not one.

    >>> check_name("llama-7b.math_v2")
    'llama-7b.math_v2'
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith(".delta"):
        message = (f"invalid member name {name!r}: 1-128 letters, digits, '.', '_', '+', '-', "
                   "starting with a letter or digit, not ending in '.delta'")
        if path is not None:
            raise ManifestError(message, path=path)
        raise OptionError(message)
    return name


def delta_file(name: str) -> str:
    """The one place a member's delta may live, relative to the zoo folder."""
    return f"{DELTAS_DIR}/{name}.delta"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_manifest(base: dict) -> dict:
    from .._version import __version__
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "created": now(),
            "library_version": __version__, "base": base, "members": []}


# ------------------------------------------------------------------------------ reading

#: The zoo's own files and folders, which must stay inside it.
_INTERNALS = (MANIFEST_NAME, LOCK_NAME, DELTAS_DIR, f"{DELTAS_DIR}/.incoming")


def check_contained(zoo: str | os.PathLike) -> None:
    """Refuse a zoo whose own files or folders are symbolic links leading out of it: adding
    or removing members would then write or delete files elsewhere."""
    root = Path(os.path.realpath(zoo))
    for name in _INTERNALS:
        inner = Path(zoo) / name
        real = Path(os.path.realpath(inner))
        if os.path.lexists(inner) and root not in real.parents:
            raise ZooError(f"{name} is a symbolic link leading out of the zoo (to {real}); "
                           "a zoo keeps its files inside its folder. Replace the link by "
                           "the folder or file itself", path=zoo)


def read(zoo: str | os.PathLike) -> dict:
    """The validated manifest of the zoo folder ``zoo`` (its internals checked first)."""
    check_contained(zoo)
    path = Path(zoo) / MANIFEST_NAME
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_MANIFEST_BYTES:
                raise ManifestError(f"{size:,} bytes, over the {MAX_MANIFEST_BYTES:,}-byte limit; "
                                    "not a zoo manifest", path=path)
            data = handle.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ManifestError("no zoo manifest here; create the zoo with: sparsestitch zoo init "
                            f"{os.fspath(zoo)} --base BASE", path=path) from None
    except IsADirectoryError:
        raise ManifestError("is a folder, not a zoo manifest", path=path) from None
    return parse(data, path)


def parse(data: bytes, path: str | os.PathLike) -> dict:
    """Parse and validate manifest bytes; every problem names ``path`` (and the member)."""
    try:
        text = data.decode("utf-8")
        manifest = json.loads(text, object_pairs_hook=_no_duplicates,
                              parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"not valid JSON ({exc}); restore it from a backup, or rebuild the "
                            "zoo with zoo init and zoo add (the deltas are kept)", path=path) from None
    _no_lone_surrogates(manifest, path)
    validate(manifest, path)
    return manifest


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {duplicate!r}")
    return dict(pairs)


def _no_constant(name):
    raise ValueError(f"{name} is not allowed")


def _no_lone_surrogates(value, path) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ManifestError(f"a string holds a lone surrogate: {item!r}", path=path) from None


# --------------------------------------------------------------------------- validation

def validate(manifest: object, path: str | os.PathLike) -> dict:
    """Check ``manifest`` against the schema of docs/zoo.md; unknown fields are allowed
    (and kept by updates).  Raises ManifestError naming the file, member and field."""
    check = _Checker(path)
    check.object(manifest, "manifest")
    if manifest.get("format") != FORMAT:
        check.fail(f"'format' must be {FORMAT!r}, got {manifest.get('format')!r}")
    version = manifest.get("format_version")
    if type(version) is not int:
        check.fail(f"'format_version' must be an integer, got {version!r}")
    if version != FORMAT_VERSION:
        check.fail(f"format_version {version} is not supported by this sparsestitch (reads "
                   f"version {FORMAT_VERSION}); upgrade sparsestitch")
    check.text(manifest, "created", "library_version", where="manifest")
    base = check.field(manifest, "base", dict, "manifest")
    check.source(base.get("source"), "base")
    check.identity(base, "identity", "base", nullable=False)
    check.field(base, "bytes", int, "base")
    members = check.field(manifest, "members", list, "manifest")
    seen = set()
    for index, member in enumerate(members):
        where = f"members[{index}]"
        check.object(member, where)
        name = member.get("name")
        try:
            check_name(name)
        except ValueError as exc:
            check.fail(f"{where}: {exc}")
        if name in seen:
            check.fail(f"member {name!r} is listed twice")
        seen.add(name)
        check.member(member, name, base["identity"])
    return manifest


class _Checker:
    """Field checks that raise ManifestError naming the file and where in it."""

    def __init__(self, path):
        self.path = path

    def fail(self, message: str):
        raise ManifestError(message, path=self.path)

    def object(self, value, where: str) -> None:
        if not isinstance(value, dict):
            self.fail(f"{where} must be a JSON object, got {type(value).__name__}")

    def field(self, parent: dict, key: str, kind, where: str, nullable: bool = False):
        if key not in parent:
            self.fail(f"{where}: field {key!r} is missing")
        value = parent[key]
        if value is None and nullable:
            return None
        ok = (type(value) is int and value >= 0) if kind is int else (
            isinstance(value, (int, float)) and type(value) is not bool) if kind is float else (
            isinstance(value, kind))
        if not ok:
            wanted = {int: "a non-negative integer", float: "a number", str: "a string",
                      dict: "an object", list: "a list"}[kind]
            self.fail(f"{where}: field {key!r} must be {wanted}"
                      f"{' or null' if nullable else ''}, got {value!r}"[:300])
        return value

    def text(self, parent: dict, *keys: str, where: str) -> None:
        for key in keys:
            self.field(parent, key, str, where)

    def identity(self, parent: dict, key: str, where: str, nullable: bool) -> None:
        value = self.field(parent, key, str, where, nullable=nullable)
        if value is not None and not _HEX16.fullmatch(value):
            self.fail(f"{where}: {key!r} must be 16 lowercase hex digits, got {value!r}")

    def source(self, source, where: str) -> None:
        self.object(source, f"{where}: 'source'")
        self.text(source, "spec", "path", where=f"{where}: source")
        kind = source.get("kind")
        if kind not in ("path", "hub"):
            self.fail(f"{where}: source 'kind' must be 'path' or 'hub', got {kind!r}")
        for key in ("repo_id", "revision", "commit", "fingerprint"):
            self.field(source, key, str, f"{where}: source", nullable=True)
        if kind == "hub" and (source["repo_id"] is None or source["commit"] is None):
            self.fail(f"{where}: a hub source needs 'repo_id' and 'commit'")

    def member(self, member: dict, name: str, base_identity: str) -> None:
        where = f"member {name!r}"
        self.source(member.get("source"), where)
        if member.get("file") != delta_file(name):
            self.fail(f"{where}: 'file' must be {delta_file(name)!r}, got {member.get('file')!r}")
        for key in ("size", "dense_bytes", "kept", "candidates"):
            self.field(member, key, int, where)
        density = self.field(member, "density", float, where)
        if not 0.0 <= density <= 1.0:
            self.fail(f"{where}: 'density' must be within [0, 1], got {density!r}")
        self.field(member, "options", dict, where)
        self.field(member, "fidelity", dict, where, nullable=True)
        sums = self.field(member, "checksums", dict, where)
        for key, pattern in (("xxh3_64", _HEX16), ("sha256", _HEX64)):
            if not isinstance(sums.get(key), str) or not pattern.fullmatch(sums[key]):
                self.fail(f"{where}: checksums.{key} must be lowercase hex, got {sums.get(key)!r}")
        self.identity(member, "base_identity", where, nullable=False)
        if member["base_identity"] != base_identity:
            self.fail(f"{where}: base_identity {member['base_identity']} differs from the zoo's "
                      f"base {base_identity}")
        self.text(member, "created", "library_version", where=where)


# ------------------------------------------------------------------ locking and writing

@contextlib.contextmanager
def locked(zoo: str | os.PathLike, timeout: float = LOCK_TIMEOUT_S):
    """Hold the zoo's exclusive lock (``flock`` on ``.zoo.lock``) for the ``with`` block.

    The kernel drops the lock when its holder exits, however it exits, so a killed writer
    never blocks the others.  Shared storage must support ``flock`` across machines
    (NFSv4, CephFS, GPFS, Lustre mounted with ``-o flock``); see docs/zoo.md.
    """
    check_contained(zoo)
    path = Path(zoo) / LOCK_NAME
    # O_NOFOLLOW: the lock file is truncated below, and a planted link must not lead there.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise ZooError(f"could not take the zoo lock in {timeout:.0f} s; last "
                                   f"holder: {_holder(fd)!r} (a stopped process?)",
                                   path=path) from None
                time.sleep(0.005)
        # Who holds it, for the message above; the lock itself is the flock, not this text.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()} since {now()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return "unknown"


def write(zoo: str | os.PathLike, manifest: dict) -> None:
    """Replace ``zoo.json`` atomically and durably.  The caller holds :func:`locked`."""
    zoo = Path(zoo)
    validate(manifest, zoo / MANIFEST_NAME)
    for leftover in zoo.glob(_TMP_PREFIX + "*"):
        # Under the lock no other writer is between steps 4 and 5, so any temporary is
        # from a writer killed there: its manifest never became visible.
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    data = (json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()
    temporary = zoo / f"{_TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(temporary, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, zoo / MANIFEST_NAME)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    fsync_folder(zoo)


def update(zoo: str | os.PathLike, change: Callable[[dict], object]):
    """Apply ``change`` (which mutates the manifest it is given) under the lock and write
    the result; returns what ``change`` returns.  If ``change`` raises, nothing is written."""
    with locked(zoo):
        manifest = read(zoo)
        before = json.dumps(manifest, sort_keys=True)
        result = change(manifest)
        manifest["members"].sort(key=lambda member: member["name"])
        if json.dumps(manifest, sort_keys=True) != before:
            write(zoo, manifest)
    return result


def find(manifest: dict, name: str) -> dict | None:
    return next((m for m in manifest["members"] if m["name"] == name), None)
