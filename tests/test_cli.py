"""The ``sparsestitch`` command: each subcommand does what the API does, errors are one line."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import sparsestitch
from sparsestitch.cli import main

from .conftest import save_checkpoint, small_model

SUBCOMMANDS = ["compress", "restore", "stitch", "info", "verify", "demo"]


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args: str):
    result = run(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def assert_one_line_error(result, *needles: str) -> str:
    """Non-zero exit, no traceback, exactly one stderr line 'error: ...' holding ``needles``."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.fixture
def deltas(zoo, tmp_path):
    """ft1 and ft2 compressed at 5% through the command line."""
    d1, d2 = tmp_path / "ft1.delta", tmp_path / "ft2.delta"
    ok("compress", zoo["base"], zoo["ft1"], zoo["ft2"], "-o", d1, "-o", d2, "--density", "0.05",
       "--quiet")
    return d1, d2


@pytest.mark.parametrize("command", [None] + SUBCOMMANDS)
def test_help_shows_examples(command):
    args = ([command] if command else []) + ["--help"]
    result = ok(*args)
    assert "Example" in result.stdout
    assert f"sparsestitch {command or 'compress'} " in result.stdout


def test_installed_command_runs_as_a_subprocess():
    command = shutil.which("sparsestitch")
    args = [command] if command else [sys.executable, "-m", "sparsestitch.cli"]
    done = subprocess.run(args + ["--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Examples:" in done.stdout
    for command in SUBCOMMANDS:
        assert command in done.stdout


def test_version():
    from sparsestitch import native

    shown = ok("--version").stdout
    assert sparsestitch.__version__ in shown
    assert native.describe() in shown  # whether the C loops run


def test_compress_matches_the_api(zoo, tmp_path, deltas):
    for tune, delta in zip((zoo["ft1"], zoo["ft2"]), deltas):
        api = tmp_path / "api.delta"
        sparsestitch.compress(zoo["base"], tune, api, density=0.05, overwrite=True)
        assert delta.read_bytes() == api.read_bytes()


def test_compress_reports_and_default_output_name(zoo, tmp_path):
    result = ok("compress", zoo["base"], zoo["ft1"], "--density", "0.1", "--scope", "per-tensor",
                "--exclude", "*norm*", "--dense", "embed.*", "--quiet")
    default = tmp_path / "ft1.safetensors.delta"
    assert default.is_file()
    line = result.stdout.strip()
    assert line.startswith(f"{default}: ") and "bits/kept" in line and "kept " in line
    header = sparsestitch.info(default).header
    assert header["method"] == "topk-per-tensor" and header["density"] == 0.1
    assert header["dense_patterns"] == ["embed.*"]
    kinds = {t.name: t.kind for t in sparsestitch.info(default).tensors}
    assert kinds["layer.0.norm.weight"] == "base"


def test_restore_matches_the_api(zoo, tmp_path, deltas):
    result = ok("restore", zoo["base"], deltas[0], "-o", tmp_path / "cli.safetensors", "--quiet")
    assert result.stdout.startswith(f"wrote {tmp_path / 'cli.safetensors'}")
    sparsestitch.restore(zoo["base"], deltas[0], tmp_path / "api.safetensors")
    assert (tmp_path / "cli.safetensors").read_bytes() == \
        (tmp_path / "api.safetensors").read_bytes()


@pytest.mark.parametrize("options, api_options", [
    ([], {}),
    (["--rule", "task-arithmetic", "--scale", "0.5", "--weights", "1,0.5"],
     {"rule": "task-arithmetic", "scale": 0.5, "weights": [1.0, 0.5]}),
])
def test_stitch_matches_the_api(zoo, tmp_path, deltas, options, api_options):
    cli_out, api_out = tmp_path / "cli.safetensors", tmp_path / "api.safetensors"
    ok("stitch", zoo["base"], *deltas, "-o", cli_out, "--max-memory", "1KiB", "--quiet", *options)
    sparsestitch.stitch(zoo["base"], [str(d) for d in deltas], api_out, **api_options)
    assert cli_out.read_bytes() == api_out.read_bytes()


def test_info_lists_stored_tensors(deltas):
    result = ok("info", deltas[0])
    described = sparsestitch.info(deltas[0])
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"{deltas[0]}: {described.file_size:,} bytes, format v1")
    assert "method topk-global, density 0.05" in result.stdout
    stored = [t.name for t in described.tensors if t.kind != "base"]
    unchanged = [t.name for t in described.tensors if t.kind == "base"]
    assert stored and unchanged
    table = result.stdout.split("bits/kept\n", 1)[1]
    rows = [line.split()[0] for line in table.strip().splitlines()]
    assert rows == stored
    everything = ok("info", deltas[0], "--all").stdout.split("bits/kept\n", 1)[1]
    assert [line.split()[0] for line in everything.strip().splitlines()] == [
        t.name for t in described.tensors]


def test_verify_with_and_without_base(zoo, deltas):
    plain = ok("verify", deltas[0]).stdout
    assert plain.startswith(f"ok: {deltas[0]} (8 tensors, ")
    assert "matches" not in plain
    assert f"matches {zoo['base']}" in ok("verify", deltas[0], "--base", zoo["base"]).stdout


def test_verify_against_the_wrong_base_fails_in_one_line(tmp_path, deltas):
    other = save_checkpoint(tmp_path / "other.safetensors", small_model(seed=4))
    line = assert_one_line_error(run("verify", deltas[0], "--base", other), str(deltas[0]))
    assert "tensor '" in line


def test_missing_input_names_the_file(zoo, tmp_path):
    missing = tmp_path / "nope.safetensors"
    assert_one_line_error(run("compress", missing, zoo["ft1"], "-o", tmp_path / "x.delta"),
                          str(missing), "no such file")
    assert_one_line_error(run("restore", zoo["base"], tmp_path / "nope.delta", "-o",
                              tmp_path / "r.safetensors"), str(tmp_path / "nope.delta"))
    assert_one_line_error(run("info", tmp_path / "nope.delta"), str(tmp_path / "nope.delta"))
    assert not (tmp_path / "x.delta").exists() and not (tmp_path / "r.safetensors").exists()


def test_wrong_kind_of_file_names_the_file(zoo, deltas):
    assert_one_line_error(run("info", zoo["base"]), str(zoo["base"]), "not a sparsestitch delta")
    out = deltas[0].with_name("x.delta")
    assert_one_line_error(run("compress", deltas[0], zoo["ft1"], "-o", out), str(deltas[0]))
    assert not out.exists()


def test_pickle_input_gets_the_conversion_line(zoo, tmp_path):
    pickle = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, pickle)
    assert_one_line_error(run("compress", zoo["base"], pickle, "-o", tmp_path / "x.delta"),
                          str(pickle), "save_file(", "safe_serialization=True")


def test_bad_option_values_exit_non_zero(zoo, tmp_path):
    assert_one_line_error(run("compress", zoo["base"], zoo["ft1"], "-o", tmp_path / "x.delta",
                              "--density", "1.5"), "density")
    result = run("compress", zoo["base"], zoo["ft1"], "--scope", "sideways")
    assert result.exit_code == 2 and "sideways" in result.stderr


@pytest.mark.parametrize("command", ["compress", "restore", "stitch"])
def test_existing_output_is_refused_and_left_untouched(zoo, tmp_path, deltas, command):
    target = tmp_path / "existing"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    inputs = {"compress": [zoo["base"], zoo["ft1"]], "restore": [zoo["base"], deltas[0]],
              "stitch": [zoo["base"], *deltas]}[command]
    target_file = tmp_path / "existing.out"
    target_file.write_bytes(b"precious")
    for out in (target, target_file):
        assert_one_line_error(run(command, *inputs, "-o", out, "--quiet"), str(out), "--overwrite")
    assert (target / "keep.txt").read_text() == "precious" and len(list(target.iterdir())) == 1
    assert target_file.read_bytes() == b"precious"
    ok(command, *inputs, "-o", target_file, "--quiet", "--overwrite")
    assert target_file.read_bytes() != b"precious"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_demo_runs_end_to_end(tmp_path):
    workdir = tmp_path / "zoo"
    result = ok("demo", "--size-mb", "8", "--workdir", workdir)
    assert "restore check: all" in result.stdout and "bit-identical" in result.stdout
    for name in ("task0.delta", "task1.delta", "task2.delta"):
        assert name in result.stdout
        sparsestitch.verify(workdir / name, base=workdir / "base")
    for folder in ("base", "task0", "task0-restored", "merged"):
        assert (workdir / folder / "model.safetensors.index.json").is_file(), folder
        assert (workdir / folder / "config.json").is_file(), folder


@pytest.mark.parametrize("size", ["lots", "0", "-5MiB"])
def test_a_bad_memory_size_is_one_clear_line_and_writes_nothing(zoo, deltas, tmp_path, size):
    out = tmp_path / "merged.safetensors"
    assert_one_line_error(run("stitch", zoo["base"], *deltas, "-o", out, "--max-memory", size),
                          "memory size must be", "512MiB", repr(size))
    assert not out.exists()


def test_demo_never_clears_a_folder_it_did_not_make(tmp_path):
    """A user's folder given as --workdir is refused and keeps every file; a folder an earlier
    demo made is cleared and reused."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    assert_one_line_error(run("demo", "--size-mb", "1", "--workdir", mine), str(mine),
                          "not made by the demo")
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.txt"]
    assert (mine / "thesis.txt").read_text() == "precious"
    a_file = tmp_path / "file"
    a_file.write_text("precious")
    assert_one_line_error(run("demo", "--size-mb", "1", "--workdir", a_file), "not a folder")
    assert a_file.read_text() == "precious"
    reused = tmp_path / "reused"
    ok("demo", "--size-mb", "1", "--workdir", reused)
    (reused / "stale.delta").write_text("left by the first run")
    ok("demo", "--size-mb", "1", "--workdir", reused)  # its own folder: cleared, run again
    assert not (reused / "stale.delta").exists() and (reused / "merged").is_dir()


def test_demo_writes_outside_the_current_folder_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "system-tmp"))
    (tmp_path / "system-tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    ok("demo", "--size-mb", "1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["system-tmp"]
    assert (tmp_path / "system-tmp" / "sparsestitch-demo" / "merged").is_dir()
