"""A process harness: the command line run in forked children, killed at chosen steps of
publishing its output or held there, reaped within bounded time; output digests and leftovers."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

# ----------------------------------------------------------------------------------------------
# Killing the command line at random moments



def spawn_cli(args: list[str], phase: str | None = None, start_gate: int | None = None, *,
              stderr: str | os.PathLike | None = None, hold: "Hold | None" = None) -> int:
    """Fork a child that runs ``sparsestitch ARGS`` (output silenced) and return its pid.

    ``phase`` makes the child SIGKILL itself at that point of writing its output:
    ``"first-fsync"`` (a data file fully written, not yet synced), ``"before-publish"`` (just
    before the rename into place), ``"after-publish"`` (just after it), ``"after-first-rename"``
    (after the first rename, link or swap of publishing: mid-way through replacing a folder);
    ``"no-swap-after-rename-1"``, ``"no-swap-after-rename-2"`` and ``"no-swap-before-cleanup"``
    replace a folder as on a filesystem without an atomic swap and kill at that step.
    ``start_gate`` is a pipe's read end: the child waits for one byte on it before starting.
    ``stderr`` names a file that gets the child's standard error (its ``error: ...`` line)
    instead of discarding it.  ``hold`` (a :class:`Hold`) stops the child at one point of
    publishing until the test lets it go on.

    Reap the child with :func:`wait_exit` (or :meth:`Hold.release`): both give up after a
    bounded time and kill it, so a hung child fails the test instead of stalling the run.
    """
    pid = os.fork()
    if pid:
        if hold is not None:
            hold._forked(pid)
        return pid
    code = 70
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        if stderr is not None:
            os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        else:
            os.dup2(null, 2)
        # pytest's capturing replaces sys.stdout/sys.stderr with objects not on fds 1 and 2
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        if phase is not None:
            _arm(phase)
        if hold is not None:
            hold._arm()
        if start_gate is not None:
            os.read(start_gate, 1)
        from sparsestitch.cli import main

        main.main(args=args, prog_name="sparsestitch", standalone_mode=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 -- any other exception is reported as exit code 71
        code = 71
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)


def _arm(phase: str) -> None:
    import signal

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    calls = Counter()

    def wrap(module, name, before=None, after=None):
        real = getattr(module, name)

        def patched(*args, **kwargs):
            calls[name] += 1
            if before is not None and before(calls[name]):
                die()
            result = real(*args, **kwargs)
            if after is not None and after(calls[name]):
                die()
            return result
        setattr(module, name, patched)

    from sparsestitch.core import atomic

    if phase == "first-fsync":
        wrap(os, "fsync", before=lambda n: n == 1)
    elif phase == "before-publish":
        wrap(atomic, "publish", before=lambda n: True)
    elif phase == "after-publish":
        wrap(atomic, "publish", after=lambda n: True)
    elif phase == "after-first-rename":
        for module, name in ((os, "replace"), (os, "link"), (os, "rename"), (atomic, "_exchange")):
            if hasattr(module, name):
                wrap(module, name, after=lambda n: True)
    elif phase.startswith("no-swap-"):  # a filesystem without renameat2(RENAME_EXCHANGE)
        atomic._exchange = lambda a, b: False
        if phase == "no-swap-before-cleanup":
            wrap(atomic, "_remove", before=lambda n: True)
        else:
            step = {"no-swap-after-rename-1": 1, "no-swap-after-rename-2": 2}[phase]
            wrap(os, "replace", after=lambda n: n == step)
    else:
        raise ValueError(phase)


class Hold:
    """Stop a :func:`spawn_cli` child at one point of publishing its output and let it go on
    when the test says so: the way to put two writers' steps in a chosen order without
    depending on timing.

    ``"before-publish"``: the output is completely written under its temporary name and
    :func:`sparsestitch.core.atomic.publish` is about to run.  ``"inside-publish"``: publishing has
    made its checks that the output does not exist yet and is about to link or rename the
    temporary into place.

    Use as a context manager: leaving it kills and reaps a child still held or running.
    """

    POINTS = ("before-publish", "inside-publish")

    def __init__(self, point: str, timeout: float = 120.0):
        if point not in self.POINTS:
            raise ValueError(point)
        self.point, self.timeout, self.pid, self._reaped = point, timeout, None, False
        self._reached_r, self._reached_w = os.pipe()   # child -> test: "I am held"
        self._resume_r, self._resume_w = os.pipe()     # test -> child: "go on"

    def __enter__(self) -> "Hold":
        return self

    def __exit__(self, *exc) -> None:
        if self.pid is not None and not self._reaped:
            _kill_and_reap(self.pid)
            self._reaped = True
        for fd in (self._reached_r, self._reached_w, self._resume_r, self._resume_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._reached_r = self._reached_w = self._resume_r = self._resume_w = None

    def reached(self) -> None:
        """Block until the child is held (at most ``timeout`` seconds; then it is killed)."""
        import select

        ready, _, _ = select.select([self._reached_r], [], [], self.timeout)
        if not ready:
            _kill_and_reap(self.pid)
            self._reaped = True
            raise TimeoutError(f"process {self.pid} did not reach {self.point} in {self.timeout} s")
        if os.read(self._reached_r, 1) != b"h":  # end of file: the child ended before that point
            code = wait_exit(self.pid, self.timeout)
            self._reaped = True
            raise AssertionError(f"process {self.pid} ended (exit code {code}) before reaching "
                                 f"{self.point}")

    def release(self) -> int | None:
        """Let the held child go on; reap it and return its exit code (as :func:`wait_exit`)."""
        os.write(self._resume_w, b"g")
        self._reaped = True  # wait_exit kills and reaps it whatever happens
        return wait_exit(self.pid, self.timeout)

    def _forked(self, pid: int) -> None:  # in the test process
        self.pid = pid
        os.close(self._reached_w)  # so that reading sees end of file if the child dies
        os.close(self._resume_r)
        self._reached_w = self._resume_r = None

    def _arm(self) -> None:  # in the child
        from sparsestitch.core import atomic

        os.close(self._reached_r)
        os.close(self._resume_w)
        state = {"publishing": False, "held": False}

        def hold_here():
            if state["held"]:
                return
            state["held"] = True
            os.write(self._reached_w, b"h")
            if os.read(self._resume_r, 1) != b"g":  # the test went away: do not publish
                os._exit(75)

        def wrap(module, name, before):
            real = getattr(module, name)

            def patched(*args, **kwargs):
                before()
                return real(*args, **kwargs)
            setattr(module, name, patched)

        if self.point == "before-publish":
            wrap(atomic, "publish", hold_here)
        else:
            real_publish = atomic.publish

            def publish(*args, **kwargs):
                state["publishing"] = True
                try:
                    return real_publish(*args, **kwargs)
                finally:
                    state["publishing"] = False
            atomic.publish = publish
            for module, name in ((os, "link"), (os, "replace"), (os, "rename"),
                                 (atomic, "_renameat2")):
                wrap(module, name, lambda: state["publishing"] and hold_here())


def wait_exit(pid: int, timeout: float = 120.0) -> int | None:
    """Reap ``pid``: its exit code, or None if a signal ended it.  A child still running after
    ``timeout`` seconds is killed and TimeoutError raised (a hang is a failure too); so is one
    whose wait is cut short by any other exception (Ctrl-C, pytest-timeout), so that no child
    outlives the wait."""
    import time

    deadline = time.monotonic() + timeout
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None
            if time.monotonic() > deadline:
                raise TimeoutError(f"process {pid} still running after {timeout} s; killed")
            time.sleep(0.005)
    except ChildProcessError:
        raise  # not our child, or already reaped: nothing to kill
    except BaseException:
        _kill_and_reap(pid)
        raise


def wait_all(pids: list[int], timeout: float = 120.0) -> list[int | None]:
    """:func:`wait_exit` each of ``pids`` in turn; if one fails, kill and reap the rest too."""
    codes = []
    try:
        for pid in pids:
            codes.append(wait_exit(pid, timeout))
    finally:
        for pid in pids[len(codes) + 1:]:  # wait_exit has already killed pids[len(codes)]
            _kill_and_reap(pid)
    return codes


def _kill_and_reap(pid: int) -> None:
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # SIGKILL cannot be ignored: this returns promptly


def tree_digest(path: Path) -> str | None:
    """sha256 over a file's bytes or a folder's (relative name, bytes) pairs; None if absent."""
    import hashlib

    path = Path(path)
    if not path.exists():
        return None
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else "").encode() + b"\0")
        h.update(file.read_bytes())
    return h.hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Temporaries (``.NAME.sstmp-PID-...``) in ``folder``."""
    return sorted(p.name for p in Path(folder).iterdir() if ".sstmp-" in p.name)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()

