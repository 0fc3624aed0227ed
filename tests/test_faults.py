"""Interrupted and failing work: ``kill -9`` at random moments and at every step of publishing an
output, write limits, a full disk, outputs that cannot be written, and two processes racing for
one output.  Whatever happens, the output path holds nothing or a complete, verifiable output
(byte-identical to an uninterrupted run), a rerun succeeds, temporaries do not pile up, and the
inputs are never modified.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sparsestitch
from sparsestitch.core import direct_file

from .conftest import save_checkpoint
from .support.processes import Hold, leftovers, remove, spawn_cli, tree_digest, wait_all, wait_exit
from .support.zoo import medium_finetune, medium_model

COMMANDS = ("compress", "restore", "stitch")


class Bench:
    """Inputs, the command line of each command, and the output of an uninterrupted run."""

    def __init__(self, folder: Path):
        self.folder = folder
        model = medium_model()
        self.base_dir = save_checkpoint(folder / "base", model, shards=3)
        self.base_file = save_checkpoint(folder / "base.safetensors", model)
        self.tunes = [save_checkpoint(folder / f"ft{i}", medium_finetune(model, i), shards=3)
                      for i in (1, 2)]
        self.deltas = [folder / f"ft{i}.delta" for i in (1, 2)]
        sparsestitch.compress(self.base_dir, self.tunes, self.deltas, density=0.05)
        self.out_dir = folder / "out"
        self.out_dir.mkdir()
        self.inputs = {p: tree_digest(p) for p in [self.base_dir, self.base_file, *self.tunes,
                                                    *self.deltas]}
        self.reference, self.seconds = {}, {}
        for command in COMMANDS:
            started = time.perf_counter()
            assert wait_exit(spawn_cli(self.args(command))) == 0
            self.seconds[command] = time.perf_counter() - started
            self.reference[command] = tree_digest(self.output(command))
            remove(self.output(command))

    def output(self, command: str) -> Path:
        return self.out_dir / {"compress": "c.delta", "restore": "r", "stitch": "s.safetensors"}[command]

    def args(self, command: str, *extra: str) -> list[str]:
        out = str(self.output(command))
        if command == "compress":
            return ["compress", str(self.base_dir), str(self.tunes[0]), "-o", out, "--density",
                    "0.05", "--quiet", *extra]
        if command == "restore":
            return ["restore", str(self.base_dir), str(self.deltas[0]), "-o", out, "--quiet", *extra]
        return ["stitch", str(self.base_file), *map(str, self.deltas), "-o", out, "--quiet", *extra]

    def check(self, command: str) -> str:
        """``"absent"`` or ``"complete"`` (and verified); anything else fails the test."""
        out = self.output(command)
        digest = tree_digest(out)
        if digest is None:
            return "absent"
        assert digest == self.reference[command], f"{out} is neither absent nor complete"
        if command == "compress":
            sparsestitch.verify(out, base=self.base_dir)
        return "complete"

    def inputs_untouched(self) -> bool:
        return all(tree_digest(p) == digest for p, digest in self.inputs.items())


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return Bench(tmp_path_factory.mktemp("faults"))


@pytest.fixture
def bench(lab):
    """The module's bench with an empty output folder (whatever an earlier test left)."""
    for path in lab.out_dir.iterdir():
        remove(path)
    return lab


def no_pile_up(folder: Path, killed: set[int], output: str = "") -> None:
    """Temporaries of one output left by killed runs belong to one run at most: each run that
    gets as far as creating its own temporary first removes those of runs that are gone."""
    owners = {int(name.split(".sstmp-")[1].split("-")[0]) for name in leftovers(folder)
              if name.startswith(f".{output}")}
    assert owners <= killed and len(owners) <= 1, leftovers(folder)


@pytest.mark.parametrize("command", COMMANDS)
def test_kill_at_random_moments(bench, command):
    rng = random.Random(f"kill-{command}")
    seen, killed = {"absent": 0, "complete": 0}, set()
    for _ in range(8):
        pid = spawn_cli(bench.args(command))
        time.sleep(rng.uniform(0, 1.3 * bench.seconds[command]))
        os.kill(pid, signal.SIGKILL)
        wait_exit(pid)
        killed.add(pid)
        seen[bench.check(command)] += 1
        no_pile_up(bench.out_dir, killed)
        remove(bench.output(command))
    assert wait_exit(spawn_cli(bench.args(command))) == 0  # a rerun succeeds ...
    assert bench.check(command) == "complete"
    assert leftovers(bench.out_dir) == []                 # ... and sweeps what the kills left
    remove(bench.output(command))
    assert seen["absent"] >= 1
    assert bench.inputs_untouched()


@pytest.mark.parametrize("phase", ["first-fsync", "before-publish", "after-publish"])
@pytest.mark.parametrize("command", COMMANDS)
def test_kill_at_each_step_of_publishing(bench, command, phase):
    pid = spawn_cli(bench.args(command), phase=phase)
    assert wait_exit(pid) is None  # killed by the signal
    assert bench.check(command) == ("complete" if phase == "after-publish" else "absent")
    no_pile_up(bench.out_dir, {pid})
    remove(bench.output(command))
    assert wait_exit(spawn_cli(bench.args(command))) == 0
    assert bench.check(command) == "complete" and leftovers(bench.out_dir) == []
    remove(bench.output(command))
    assert bench.inputs_untouched()


@pytest.mark.parametrize("phase", ["first-fsync", "before-publish", "random"])
@pytest.mark.parametrize("command", COMMANDS)
def test_kills_with_direct_writes(bench, command, phase, monkeypatch):
    """Outputs written around the page cache (every size, here) die the same way: nothing
    at the output path, then a rerun gives the same bytes as through the page cache."""
    monkeypatch.setenv(direct_file.ENVIRONMENT, "0")  # the forked children inherit it
    pid = spawn_cli(bench.args(command), phase=None if phase == "random" else phase)
    if phase == "random":
        time.sleep(random.Random(command).uniform(0, 0.8 * bench.seconds[command]))
        os.kill(pid, signal.SIGKILL)
    wait_exit(pid)
    assert bench.check(command) == "absent" or phase == "random"
    remove(bench.output(command))
    assert wait_exit(spawn_cli(bench.args(command))) == 0
    assert bench.check(command) == "complete" and leftovers(bench.out_dir) == []
    remove(bench.output(command))
    assert bench.inputs_untouched()


@pytest.mark.parametrize("phase", ["random", "first-fsync", "before-publish",
                                   "after-first-rename", "after-publish"])
@pytest.mark.parametrize("command", ["restore", "stitch"])
def test_kill_while_replacing_an_existing_output(bench, command, phase):
    """With --overwrite the output path holds the old output or the new one, never neither."""
    out = bench.output(command)
    assert wait_exit(spawn_cli(bench.args(command))) == 0
    new = tree_digest(out)
    old_args = bench.args(command)
    old_args[2] = str(bench.deltas[1])  # another output
    remove(out)
    assert wait_exit(spawn_cli(old_args)) == 0
    old = tree_digest(out)
    assert old != new
    rng = random.Random(phase)
    for _ in range(3 if phase == "random" else 1):
        pid = spawn_cli(bench.args(command, "--overwrite"), phase=None if phase == "random" else phase)
        if phase == "random":
            time.sleep(rng.uniform(0, 1.2 * bench.seconds[command]))
            os.kill(pid, signal.SIGKILL)
        wait_exit(pid)
        assert tree_digest(out) in (old, new)
        if tree_digest(out) == new:
            remove(out)
            assert wait_exit(spawn_cli(old_args)) == 0
    remove(out)
    assert wait_exit(spawn_cli(bench.args(command))) == 0 and leftovers(bench.out_dir) == []
    remove(out)


def test_kill_real_command_line_processes(bench):
    """The same with the installed ``sparsestitch`` command, killed while it runs."""
    rng, killed = random.Random(7), set()
    exe = shutil.which("sparsestitch")
    if exe is None:
        pytest.skip("the sparsestitch command is not installed")
    for command in COMMANDS:
        process = subprocess.Popen([exe, *bench.args(command)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            time.sleep(rng.uniform(0.3, 1.2))
        finally:
            process.kill()
            process.wait(timeout=60)  # killed: this returns at once
        killed.add(process.pid)
        bench.check(command)
        no_pile_up(bench.out_dir, killed, bench.output(command).name)
        remove(bench.output(command))
    assert bench.inputs_untouched()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        process.wait(timeout=120)
    finally:
        process.kill()  # a no-op once it has exited
    return process.pid


@pytest.mark.parametrize("command", COMMANDS)
def test_stale_temporaries_of_dead_processes_are_swept(bench, command):
    out = bench.output(command)
    gone, alive = dead_pid(), os.getpid()
    stale = [out.parent / f".{out.name}.sstmp-{gone}-0badc0de",
             out.parent / f".{out.name}.sstmp-{gone}-0badc0de.spool",
             out.parent / f".{out.name}.sstmp-{gone}-1badc0de"]
    stale[0].write_bytes(b"half a file")
    stale[1].write_bytes(b"spooled payloads")
    stale[2].mkdir()
    (stale[2] / "model-00001-of-00003.safetensors").write_bytes(b"half a shard")
    live = out.parent / f".{out.name}.sstmp-{alive}-2badc0de"
    live.write_bytes(b"someone is writing this")
    other = out.parent / f".unrelated.delta.sstmp-{gone}-3badc0de"
    other.write_bytes(b"another output's temporary")
    assert wait_exit(spawn_cli(bench.args(command))) == 0
    assert bench.check(command) == "complete"
    assert not any(p.exists() for p in stale)
    assert live.exists() and other.exists()  # a live writer's and another output's are kept
    for path in (live, other):
        path.unlink()
    remove(out)


def limited(fsize: int):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so writes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return limit


@pytest.mark.parametrize("command", COMMANDS)
def test_write_limit_gives_a_clear_error_and_leaves_nothing(bench, command):
    exe = shutil.which("sparsestitch")
    if exe is None:
        pytest.skip("the sparsestitch command is not installed")
    done = subprocess.run([exe, *bench.args(command)], capture_output=True, text=True,
                          preexec_fn=limited(64 << 10), timeout=120)
    assert done.returncode == 2
    out = bench.output(command)
    assert done.stderr.strip().splitlines() == [
        f"error: file {str(out)!r}: writing failed (File too large); nothing was written"]
    assert not out.exists() and leftovers(bench.out_dir) == []
    assert bench.inputs_untouched()


def test_full_disk_gives_a_clear_error_and_leaves_nothing(bench, tmp_path):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                             capture_output=True, timeout=60)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs mount privileges); the write-limit "
                    "test covers the same code path with EFBIG instead of ENOSPC")
    try:
        for command, out in (("restore", disk / "r"), ("compress", disk / "c.delta")):
            args = bench.args(command)
            args[args.index("-o") + 1] = str(out)
            with pytest.raises(sparsestitch.OutputError) as caught:
                if command == "restore":
                    sparsestitch.restore(bench.base_dir, bench.deltas[0], out)
                else:
                    sparsestitch.compress(bench.base_dir, bench.tunes[0], out, density=0.05)
            assert "No space left" in str(caught.value) and caught.value.path == str(out)
            assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True, timeout=60)


def test_an_output_folder_that_is_a_file_is_refused(bench, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"x")
    with pytest.raises(sparsestitch.OutputError) as caught:
        sparsestitch.restore(bench.base_dir, bench.deltas[0], blocker / "restored")
    assert caught.value.path == str(blocker / "restored")
    assert blocker.read_bytes() == b"x"


def race(args_a: list[str], args_b: list[str], stderr: tuple[Path, Path] | None = None
         ) -> tuple[int | None, int | None]:
    """Start two command lines at the same instant; return their exit codes."""
    read_end, write_end = os.pipe()
    pids = []
    try:
        for i, args in enumerate((args_a, args_b)):
            pids.append(spawn_cli(args, start_gate=read_end,
                                  stderr=None if stderr is None else stderr[i]))
        os.write(write_end, b"go")
    finally:
        os.close(read_end)
        os.close(write_end)
    return tuple(wait_all(pids))


@pytest.mark.parametrize("command", COMMANDS)
def test_two_writers_of_one_output_never_mix(bench, command):
    out = bench.output(command)
    for _ in range(3):
        codes = race(bench.args(command), bench.args(command))
        assert 0 in codes and set(codes) <= {0, 2}, codes
        assert bench.check(command) == "complete"
        assert leftovers(bench.out_dir) == []
        remove(out)


# What the losing writer of an output may be told.  Which one it gets depends only on where it
# was when the winner published; each is right, and each names the output and says nothing of
# the loser's was kept.
EXISTS = "output already exists; pass overwrite=True (--overwrite) to replace it"  # before it began
APPEARED = "output appeared while writing (another process?); the new output was discarded"
# (A folder is published with renameat2(RENAME_NOREPLACE) and a file with a hard link: both
# fail when the output appeared after the loser's last look, and that is reported as APPEARED.)


@pytest.fixture(scope="module")
def other_outputs(lab):
    """Per command, the command line of a different output at the same path, and that output's
    digest from an uninterrupted run."""
    found = {}
    for command in ("restore", "stitch"):
        args = lab.args(command)
        args[2] = str(lab.deltas[1])
        out = lab.output(command)
        remove(out)
        assert wait_exit(spawn_cli(args)) == 0
        found[command] = (args, tree_digest(out))
        remove(out)
        assert found[command][1] not in (None, lab.reference[command])
    return found


@pytest.mark.parametrize("command, order", [
    *((command, order) for command in ("restore", "stitch")
      for order in ("one-after-the-other", "while-the-loser-writes", "while-the-loser-publishes")),
    ("stitch", "at-the-same-instant"), ("restore", "at-the-same-instant"),
])
def test_two_writers_of_different_outputs_one_wins_the_other_is_told(bench, other_outputs,
                                                                     command, order, tmp_path):
    """Two processes write different outputs to one path (no --overwrite).  Exactly one
    succeeds and its complete output is what the path holds; the other exits with code 2 and one
    clear line naming the output; no temporaries are left.

    What the loser is told depends only on where it was when the winner published: before it
    started (EXISTS), or while it wrote or published (APPEARED).  Each order is forced step by
    step -- a :class:`Hold` stops the loser at that point until the winner has finished -- so
    each is checked on every run and none depends on timing.  A real race then checks the same
    invariants for whichever order it falls into.
    """
    out = bench.output(command)
    other_args, other_digest = other_outputs[command]
    writers = (bench.args(command), other_args)
    digests = (bench.reference[command], other_digest)
    for attempt in range(4 if order == "at-the-same-instant" else 2):
        # Alternate which output is written first, so either can be the winner.
        first = attempt % 2
        second = 1 - first
        err = (tmp_path / f"{attempt}-0.err", tmp_path / f"{attempt}-1.err")
        codes: list[int | None] = [None, None]
        if order == "one-after-the-other":
            codes[first] = wait_exit(spawn_cli(writers[first], stderr=err[first]))
            codes[second] = wait_exit(spawn_cli(writers[second], stderr=err[second]))
            expected = {EXISTS}
        elif order == "at-the-same-instant":
            codes[first], codes[second] = race(writers[first], writers[second],
                                               (err[first], err[second]))
            expected = {EXISTS, APPEARED}
        else:
            point = "before-publish" if order == "while-the-loser-writes" else "inside-publish"
            with Hold(point) as held:
                spawn_cli(writers[second], stderr=err[second], hold=held)
                held.reached()  # the second writer has passed its checks and wrote everything
                codes[first] = wait_exit(spawn_cli(writers[first], stderr=err[first]))
                codes[second] = held.release()
            expected = {APPEARED}

        assert sorted(codes, key=str) == [0, 2], f"exit codes {codes}: exactly one must win"
        winner = codes.index(0)
        loser = 1 - winner
        if order != "at-the-same-instant":
            assert winner == first, codes
        assert tree_digest(out) == digests[winner], "the output is not the winner's, complete"
        assert err[winner].read_text() == ""
        told = err[loser].read_text().splitlines()
        prefix = f"error: file {str(out)!r}: "
        assert len(told) == 1 and told[0].startswith(prefix), told
        assert told[0][len(prefix):] in expected, told
        assert leftovers(bench.out_dir) == []
        remove(out)
    assert bench.inputs_untouched()


def test_a_writer_never_replaces_an_output_that_appeared_while_it_wrote(tmp_path, monkeypatch):
    """The window between the last existence check and the rename: another process publishes
    there; this one must fail clearly and leave the other's output alone."""
    from sparsestitch.core import atomic

    target = tmp_path / "out.delta"
    for name in ("link", "replace"):
        real = getattr(os, name)

        def competitor_first(src, dst, real=real, **kwargs):
            if Path(dst) == target and not target.exists():
                target.write_bytes(b"the other process's complete output")
            return real(src, dst, **kwargs)
        monkeypatch.setattr(os, name, competitor_first)
    with pytest.raises(sparsestitch.OutputError, match="appeared while writing"):
        with atomic.atomic_path(target) as temporary:
            temporary.write_bytes(b"ours")
    assert target.read_bytes() == b"the other process's complete output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.delta"]


def test_a_folder_that_appears_after_the_last_check_is_not_swapped_away(tmp_path, monkeypatch):
    """Like the test above, for a folder output published just after publishing's own check
    that the output does not exist yet found nothing."""
    from sparsestitch.core import atomic

    target = tmp_path / "restored"
    real_exists, real_publish = Path.exists, atomic.publish
    publishing = []

    def exists(self, *args, **kwargs):
        found = real_exists(self, *args, **kwargs)
        if publishing and self == target and not found:
            publishing.clear()  # the competitor publishes once, right after this look
            target.mkdir()
            (target / "theirs.safetensors").write_bytes(b"the other process's complete output")
        return found

    def publish(*args, **kwargs):
        publishing.append(True)
        return real_publish(*args, **kwargs)
    monkeypatch.setattr(Path, "exists", exists)
    monkeypatch.setattr(atomic, "publish", publish)
    with pytest.raises(sparsestitch.OutputError) as caught:
        with atomic.atomic_path(target, folder=True) as temporary:
            (temporary / "ours.safetensors").write_bytes(b"ours")
    assert caught.value.path == str(target)
    assert sorted(p.name for p in target.iterdir()) == ["theirs.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["restored"]


@pytest.mark.parametrize("phase", ["no-swap-after-rename-1", "no-swap-after-rename-2",
                                   "no-swap-before-cleanup"])
def test_kill_at_each_step_of_replacing_a_folder_without_an_atomic_swap(bench, phase):
    """Without RENAME_EXCHANGE a folder is replaced in two renames; a kill at any step leaves
    the old output (put back when the path is next used) or the new one, never neither, and
    the next run cleans up without deleting either."""
    from sparsestitch.core import atomic
    from sparsestitch.checkpoint import Checkpoint

    out = bench.output("restore")
    old_args = bench.args("restore")
    old_args[2] = str(bench.deltas[1])
    assert wait_exit(spawn_cli(old_args)) == 0
    old, new = tree_digest(out), bench.reference["restore"]
    pid = spawn_cli(bench.args("restore", "--overwrite"), phase=phase)
    assert wait_exit(pid) is None  # killed by the signal
    if phase == "no-swap-after-rename-1":
        assert tree_digest(out) is None  # the documented moment: the old output sits aside
        with pytest.raises(sparsestitch.CheckpointError, match="next command that writes"):
            Checkpoint(out)  # a reader says so and changes nothing
        assert tree_digest(out) is None
        atomic.sweep_stale(out)  # what the next write of this path does first: put it back
        assert tree_digest(out) == old
    else:
        assert tree_digest(out) == new
    atomic.sweep_stale(out)  # what the next write of this path does first
    assert tree_digest(out) in (old, new) and leftovers(bench.out_dir) == []
    assert wait_exit(spawn_cli(bench.args("restore", "--overwrite"))) == 0
    assert bench.check("restore") == "complete" and leftovers(bench.out_dir) == []
    remove(out)
    assert bench.inputs_untouched()


def test_an_interrupted_replacement_is_recovered_by_the_next_run(bench):
    """The next command writing the path (here without --overwrite) finds the old output put
    back, so it refuses to replace it instead of writing over nothing."""
    out = bench.output("restore")
    old_args = bench.args("restore")
    old_args[2] = str(bench.deltas[1])
    assert wait_exit(spawn_cli(old_args)) == 0
    old = tree_digest(out)
    assert wait_exit(spawn_cli(bench.args("restore", "--overwrite"),
                               phase="no-swap-after-rename-1")) is None
    assert wait_exit(spawn_cli(bench.args("restore"))) == 2  # "output already exists"
    assert tree_digest(out) == old and leftovers(bench.out_dir) == []
    remove(out)


def test_an_output_the_user_deleted_is_never_brought_back(bench):
    """A kill after a replacement's second rename leaves the old output aside though the new
    one was published; if the user then deletes the output, neither a read-only command nor
    the next write may resurrect the old one (issue 19, item 6)."""
    out = bench.output("restore")
    old_args = bench.args("restore")
    old_args[2] = str(bench.deltas[1])
    assert wait_exit(spawn_cli(old_args)) == 0
    old = tree_digest(out)
    assert wait_exit(spawn_cli(bench.args("restore", "--overwrite"),
                               phase="no-swap-before-cleanup")) is None
    assert tree_digest(out) == bench.reference["restore"]
    remove(out)  # the user deletes the output
    assert wait_exit(spawn_cli(["verify", str(bench.deltas[0]), "--base", str(out)])) == 2
    assert tree_digest(out) is None  # nothing came back
    assert wait_exit(spawn_cli(old_args)) == 0  # a write of the path: it writes, nothing else
    assert tree_digest(out) == old and leftovers(bench.out_dir) == []
    remove(out)


def test_replacing_a_folder_without_an_atomic_swap_still_works(bench, monkeypatch):
    """Where renameat2 is missing the old folder is moved aside first (documented window)."""
    from sparsestitch.core import atomic

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = bench.output("restore")
    sparsestitch.restore(bench.base_dir, bench.deltas[1], out)
    sparsestitch.restore(bench.base_dir, bench.deltas[0], out, overwrite=True)
    assert bench.check("restore") == "complete" and leftovers(bench.out_dir) == []
