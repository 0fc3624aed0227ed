"""One unit of zoo work: add one fine-tune as a member.  The same function runs in the
caller's process, in a local worker process and in a Ray task, so every path writes the
same bytes.

The delta is compressed into a private work folder under ``deltas/.incoming/`` (named
``PID-RANDOM@HOST``), and only under the zoo lock is it renamed into place and listed in
the manifest.  A worker killed at any point leaves at most that work folder (removed by the
next add on the same host once its process is gone) or, between the rename and the
manifest write, an unlisted delta file (replaced by the next add of that name).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import time
from pathlib import Path

from ..core.atomic import process_alive
from ..core.errors import BaseMismatchError, OutputError
from . import manifest as mf
from .members import build_entry, file_matches, options_conflict, same_origin

INCOMING = ".incoming"


def add_one(zoo: str | os.PathLike, task: dict) -> dict:
    """Add ``task["name"]`` from ``task["source"]`` unless it is already present and its
    delta verifies; returns a result dict (status ``added``, ``skipped`` or ``repaired``,
    the entry, and what the process read and its peak memory).

    ``task`` holds ``name``, ``source`` (a manifest source object), ``base_path``,
    ``options`` (compress options as given), ``effective`` (as recorded) and optionally
    ``scratch``: a node-local folder for compress's output and spool files (at 1% the spool
    is several times the delta), the finished delta then being copied to the zoo.
    """
    from ..ops.compress import compress

    zoo = Path(zoo)
    started, io_before = time.perf_counter(), _io()
    name = task["name"]
    existing = mf.find(mf.read(zoo), name)
    if existing is not None and _verified_same(zoo, existing, task):
        return _result(name, "skipped", existing, started, io_before)
    work = _work_folder(zoo / mf.DELTAS_DIR / INCOMING)
    local = _work_folder(Path(task["scratch"])) if task.get("scratch") else work
    try:
        out = local / f"{name}.delta"
        (summary,) = compress(task["base_path"], task["source"]["path"], out, **task["options"])
        entry = build_entry(name, task["source"], out, summary, task["effective"])
        if local != work:
            out = _copy_durably(out, work / out.name)
        status = mf.update(zoo, lambda manifest: _commit(zoo, manifest, entry, out,
                                                         task["base_path"]))
        if status == "skipped":  # a concurrent add of the same content won the race
            entry = mf.find(mf.read(zoo), name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(local, ignore_errors=True)
    return _result(name, status, entry, started, io_before)


def _copy_durably(source: Path, target: Path) -> Path:
    with open(source, "rb") as reader, open(target, "xb") as writer:
        shutil.copyfileobj(reader, writer, 8 << 20)
        writer.flush()
        os.fsync(writer.fileno())
    return target


def _verified_same(zoo: Path, existing: dict, task: dict) -> bool:
    """True when ``existing`` is this task's member and its delta is intact (skip it);
    False when it must be recompressed (source rewritten, or delta damaged); raises
    MemberConflictError when the name is taken by another source or other options."""
    name = existing["name"]
    if not same_origin(existing["source"], task["source"]):
        raise mf.MemberConflictError(
            f"member {name!r} exists, added from {existing['source']['spec']!r} "
            f"({existing['source'].get('commit') or existing['source']['path']}); remove it "
            "first (zoo rm) or choose another name", path=zoo / mf.MANIFEST_NAME)
    conflict = options_conflict(existing["options"], task["effective"])
    if conflict:
        raise mf.MemberConflictError(f"member {name!r} exists with {conflict}; remove it first "
                                     "(zoo rm) or choose another name", path=zoo / mf.MANIFEST_NAME)
    return (existing["source"].get("fingerprint") == task["source"].get("fingerprint")
            and file_matches(zoo, existing) is None)


def _commit(zoo: Path, manifest: dict, entry: dict, incoming: Path, base_path) -> str:
    """Under the zoo lock: publish ``incoming`` as the member's delta and list it."""
    name = entry["name"]
    if entry["base_identity"] != manifest["base"]["identity"]:
        raise BaseMismatchError(
            f"the base read now has identity {entry['base_identity']}, the zoo's base "
            f"{manifest['base']['identity']}: it changed since zoo init; nothing was added",
            path=base_path)
    target = zoo / entry["file"]
    existing = mf.find(manifest, name)
    if existing is not None:
        if existing["checksums"]["sha256"] != entry["checksums"]["sha256"]:
            raise mf.MemberConflictError(
                f"member {name!r} exists with different content (its source changed since it "
                "was added, or another process added another checkpoint under this name); "
                "remove it first (zoo rm) or choose another name", path=zoo / mf.MANIFEST_NAME)
        # Same content: keep the entry, but take the new fingerprint (the source was only
        # touched, e.g. copied), so later reruns skip without recompressing.
        existing["source"]["fingerprint"] = entry["source"]["fingerprint"]
        if file_matches(zoo, existing) is None:
            return "skipped"
        _publish(incoming, target)  # same bytes as recorded: mends a damaged or missing file
        return "repaired"
    _make_room(zoo, target, manifest["base"]["identity"])
    _publish(incoming, target)
    manifest["members"].append(entry)
    return "added"


def _publish(incoming: Path, target: Path) -> None:
    os.replace(incoming, target)
    mf.fsync_folder(target.parent)


def _make_room(zoo: Path, target: Path, identity: str) -> None:
    """A file at an unlisted member's path is an earlier add killed between publishing and
    listing -- replace it; but only if it is a delta of this base, so that a file someone
    put there by hand is never lost."""
    if not target.exists():
        return
    from ..ops.describe import info
    try:
        ours = info(target).header.get("base_identity") == identity
    except Exception:  # noqa: BLE001 - anything unreadable is not ours to replace
        ours = False
    if not ours:
        raise OutputError("a file that is not a delta of this zoo is in the way; move it "
                          "elsewhere and add again", path=target)


def _work_folder(incoming: Path) -> Path:
    incoming.mkdir(parents=True, exist_ok=True)
    sweep_incoming(incoming)
    work = incoming / f"{os.getpid()}-{secrets.token_hex(4)}@{socket.gethostname()}"
    work.mkdir()
    return work


def sweep_incoming(incoming: Path) -> list[Path]:
    """Remove work folders of dead processes on this host; returns them.  Folders of other
    hosts are left alone: a pid means nothing on another machine."""
    host, removed = socket.gethostname(), []
    for folder in incoming.iterdir() if incoming.is_dir() else ():
        pid_part, _, folder_host = folder.name.partition("@")
        pid_text = pid_part.split("-", 1)[0]
        if folder_host == host and pid_text.isdigit() and not process_alive(int(pid_text)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


    return True


def _result(name: str, status: str, entry: dict | None, started: float, io_before: dict) -> dict:
    io_after = _io()
    return {"name": name, "status": status, "entry": entry, "error": None,
            "pid": os.getpid(), "host": socket.gethostname(),
            "seconds": time.perf_counter() - started,
            "read_bytes": io_after.get("read_bytes", 0) - io_before.get("read_bytes", 0),
            "rchar": io_after.get("rchar", 0) - io_before.get("rchar", 0),
            "peak_rss": peak_rss()}


def _io() -> dict:
    """This process's I/O counters: ``rchar`` (bytes read through read calls, page cache
    hits included) and ``read_bytes`` (bytes fetched from storage)."""
    try:
        with open("/proc/self/io") as handle:
            return {k: int(v) for k, v in (line.split(":") for line in handle)}
    except (OSError, ValueError):
        return {}


def peak_rss() -> int:
    """This process's peak resident memory (``VmHWM``), in bytes; 0 where unknown."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0
