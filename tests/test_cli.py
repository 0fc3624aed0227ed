"""The ``sparsestitch`` command: each subcommand does what the API does, errors are one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import sparsestitch
from sparsestitch.core.atomic import OUTPUT_MARKER
from sparsestitch.cli import main
from sparsestitch.cli.common import natural_key

from .conftest import finetune_of, save_checkpoint, small_model

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
    from sparsestitch.core import native

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


def test_progress_is_lines_in_a_log_only_when_asked_for(zoo, tmp_path, deltas, monkeypatch):
    """stderr here is not a terminal (as in a log): silent by default, a line per step with
    --progress (no carriage returns), nothing with --quiet or --json."""
    monkeypatch.setattr(sparsestitch.core.progress, "LINE_SECONDS", 0.0)
    out = tmp_path / "o.safetensors"
    silent = ok("restore", zoo["base"], deltas[0], "-o", out)
    assert silent.stderr == ""
    shown = ok("restore", zoo["base"], deltas[0], "-o", out, "--overwrite", "--progress")
    lines = shown.stderr.splitlines()
    assert lines and "\r" not in shown.stderr
    assert lines[-1].startswith("restore: ") and " (100%), " in lines[-1]
    for flag in ("--quiet", "--json"):
        assert ok("restore", zoo["base"], deltas[0], "-o", out, "--overwrite", flag).stderr == ""


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


def _tensor_table(stdout: str) -> list[list[str]]:
    """The rows of info's tensor table: between its dashed rule and the next blank line."""
    table = stdout.split("rel.error\n", 1)[1].split("\n", 1)[1]
    return [line.split() for line in table.split("\n\n")[0].strip().splitlines()]


def test_info_lists_stored_tensors(deltas):
    result = ok("info", deltas[0])
    described = sparsestitch.info(deltas[0])
    first = result.stdout.splitlines()[0]
    version = described.header["format_version"]  # 3 where a record's values are ulp
    assert first.startswith(f"{deltas[0]}: {described.file_size:,} bytes, format v{version}")
    assert "method topk-fidelity, density 0.05" in result.stdout
    assert "base base.safetensors, fine-tune ft1.safetensors" in result.stdout
    stored = [t.name for t in described.tensors if t.kind != "base"]
    unchanged = [t.name for t in described.tensors if t.kind == "base"]
    assert stored and unchanged
    assert [row[0] for row in _tensor_table(result.stdout)] == sorted(stored, key=natural_key)
    everything = _tensor_table(ok("info", deltas[0], "--all").stdout)
    assert [row[0] for row in everything] == sorted((t.name for t in described.tensors),
                                                    key=natural_key)
    by_bytes = _tensor_table(ok("info", deltas[0], "--sort", "bytes").stdout)
    sizes = [int(row[-3].replace(",", "")) for row in by_bytes]
    assert sizes == sorted(sizes, reverse=True)


def test_info_totals_per_layer_and_module_in_natural_order(tmp_path):
    model = {f"model.layers.{i}.mlp.weight": torch.randn(16, 8) for i in (0, 1, 2, 10)}
    model["model.embed.weight"] = torch.randn(32, 8)
    tune = {k: v + 0.1 * torch.randn(v.shape) for k, v in model.items()}
    base = save_checkpoint(tmp_path / "b.safetensors", model)
    ft = save_checkpoint(tmp_path / "f.safetensors", tune)
    ok("compress", base, ft, "-o", tmp_path / "d.delta", "--density", "0.5", "--quiet")
    out = ok("info", tmp_path / "d.delta").stdout
    rows = [row[0] for row in _tensor_table(out)]
    assert rows == ["model.embed.weight"] + [f"model.layers.{i}.mlp.weight" for i in (0, 1, 2, 10)]
    layers = out.split("\nlayer ", 1)[1]
    assert layers.index("model.layers.2 ") < layers.index("model.layers.10 ")
    assert "model.layers.*.mlp.weight" in out.split("\nmodule ", 1)[1]


def test_json_output_for_programs(zoo, tmp_path, deltas):
    described = json.loads(ok("info", deltas[0], "--json").stdout)
    assert described["kept"] == sparsestitch.info(deltas[0]).kept
    assert {t["name"] for t in described["tensors"]} == set(small_model())
    checked = json.loads(ok("verify", deltas[0], "--base", zoo["base"], "--json").stdout)
    assert checked["ok"] is True and checked["kept"] == described["kept"]
    made = json.loads(ok("compress", zoo["base"], zoo["ft1"], "-o", tmp_path / "j.delta",
                         "--density", "0.05", "--json").stdout)
    assert made[0]["bytes"] == (tmp_path / "j.delta").stat().st_size
    for command, inputs in (("restore", [zoo["base"], deltas[0]]),
                            ("stitch", [zoo["base"], *deltas])):
        out = tmp_path / f"{command}.safetensors"
        summary = json.loads(ok(command, *inputs, "-o", out, "--json").stdout)
        assert summary["output"] == str(out) and summary["bytes"] == out.stat().st_size


def test_a_closed_pipe_ends_the_command_quietly(deltas):
    """``sparsestitch info x.delta | head -1``: one line, no error, no traceback."""
    command = shutil.which("sparsestitch")
    args = [command] if command else [sys.executable, "-m", "sparsestitch.cli"]
    done = subprocess.run(" ".join(f"'{a}'" for a in [*args, "info", str(deltas[0]), "--all"])
                          + " | head -1", shell=True, capture_output=True, text=True, timeout=120)
    assert done.stdout.count("\n") == 1 and done.stdout.startswith(str(deltas[0]))
    assert done.stderr == ""


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
    """Without --overwrite nothing existing is replaced; with it, only an earlier output of
    the same kind: a folder sparsestitch did not write and a file of another kind stay."""
    target = tmp_path / "existing"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    inputs = {"compress": [zoo["base"], zoo["ft1"]], "restore": [zoo["base"], deltas[0]],
              "stitch": [zoo["base"], *deltas]}[command]
    target_file = tmp_path / "existing.out"
    target_file.write_bytes(b"precious")
    for out in (target, target_file):
        assert_one_line_error(run(command, *inputs, "-o", out, "--quiet"), str(out), "--overwrite")
        assert_one_line_error(run(command, *inputs, "-o", out, "--quiet", "--overwrite"),
                              str(out), "--overwrite replaces only")
    assert (target / "keep.txt").read_text() == "precious" and len(list(target.iterdir())) == 1
    assert target_file.read_bytes() == b"precious"
    earlier = tmp_path / ("earlier.delta" if command == "compress" else "earlier")
    ok(command, *inputs, "-o", earlier, "--quiet")
    before = tree_bytes(earlier)
    ok(command, *inputs, "-o", earlier, "--quiet", "--overwrite")
    assert tree_bytes(earlier) == before  # replaced by the same output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def tree_bytes(path: Path) -> dict:
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != OUTPUT_MARKER}


def test_demo_runs_end_to_end(tmp_path):
    workdir = tmp_path / "zoo"
    result = ok("demo", "--size-mb", "8", "--workdir", workdir)
    assert "restore check: all" in result.stdout and "bit-identical" in result.stdout
    line = next(l for l in result.stdout.splitlines() if l.startswith("default delta"))
    measured = float(line.split("relative error of ")[1].split()[0])
    reported = float(line.split("header reports ")[1].split(";")[0])
    assert 0 < measured <= 0.5 and abs(measured - reported) < 0.002
    for name in ("task0.delta", "task1.delta", "task2.delta", "task0-1pct.delta"):
        assert name in result.stdout
        sparsestitch.verify(workdir / name, base=workdir / "base")
    assert sparsestitch.info(workdir / "task0.delta").header["target"] == {"max_error": 0.5}
    for folder in ("base", "task0", "task0-restored", "task0-restored-1pct", "merged",
                   "merged-keep"):
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


def test_rule_options_use_one_name_and_the_users_terms(zoo, tmp_path, deltas):
    out = tmp_path / "m.safetensors"
    assert_one_line_error(run("stitch", zoo["base"], *deltas, "-o", out, "--density", "0.2"),
                          "--trim/--density applies to --rule ties, ties-mergekit, dare-ties-mergekit, "
                          "dare-linear-mergekit, breadcrumbs-mergekit, breadcrumbs-ties-mergekit, "
                          "not --rule "
                          "localize-stitch")
    assert_one_line_error(run("stitch", zoo["base"], *deltas, "-o", out, "--rule", "ties",
                              "--drop", "0.5"), "--drop applies to --rule dare, not --rule ties")
    ok("stitch", zoo["base"], *deltas, "-o", out, "--rule", "ties", "--density", "0.2")
    api = sparsestitch.stitch(zoo["base"], [str(d) for d in deltas], tmp_path / "api.safetensors",
                              rule="ties", density=0.2)
    assert out.read_bytes() == api.read_bytes()
    # one option, two spellings: --trim (not to be taken for --keep) and mergekit's --density
    assert "--trim, --density FLOAT" in ok("stitch", "--help").stdout
    assert "ties (--scale, --density)" in " ".join(ok("stitch", "--help").stdout.split())


def test_nothing_to_do_is_refused(zoo, tmp_path):
    result = run("stitch", zoo["base"], "-o", tmp_path / "m.safetensors")
    assert result.exit_code == 2 and "DELTAS" in result.stderr
    assert_one_line_error(run("compress", zoo["base"], zoo["ft1"], "-o", tmp_path / "x.delta",
                              "--density", "0"), "density 0 keeps nothing")
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "x.delta").exists()


def test_swapped_arguments_say_what_was_given_and_what_is_expected(zoo, tmp_path, deltas):
    folder_base = save_checkpoint(tmp_path / "base-folder", small_model())
    out = tmp_path / "o.safetensors"
    for args in ([deltas[0], deltas[0]], [deltas[0], zoo["base"]]):
        assert_one_line_error(run("restore", *args, "-o", out), str(deltas[0]),
                              "delta file, not a model checkpoint", "the base comes first")
    assert_one_line_error(run("restore", zoo["base"], folder_base, "-o", out), str(folder_base),
                          "a folder (a model checkpoint?), not a delta file",
                          "the base comes first")
    assert_one_line_error(run("restore", zoo["base"], zoo["ft1"], "-o", out), str(zoo["ft1"]),
                          "not a sparsestitch delta", "The base comes first")
    assert_one_line_error(run("verify", deltas[0], "--base", deltas[1]), str(deltas[1]),
                          "delta file, not a model checkpoint")
    gguf = tmp_path / "model.gguf"  # only its magic matters: it is refused before any parsing
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(64))
    for command in (["info", gguf], ["verify", gguf], ["restore", zoo["base"], gguf, "-o", out]):
        assert_one_line_error(run(*command), str(gguf), "a GGUF model, not a delta file",
                              "the base comes first")
    assert not out.exists()


def test_the_pickle_conversion_line_works_on_tied_weights(tmp_path):
    """The one-liner the refusal prints converts a checkpoint whose tensors share memory."""
    embed = torch.randn(8, 4)
    torch.save({"embed.weight": embed, "lm_head.weight": embed}, tmp_path / "IN.bin")
    line = assert_one_line_error(run("compress", tmp_path / "IN.bin", tmp_path / "IN.bin", "-o",
                                     tmp_path / "x.delta"), "python -c")
    code = line.split('python -c "', 1)[1].split('"', 1)[0]
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120)
    converted = sparsestitch.checkpoint.Checkpoint(tmp_path / "OUT.safetensors")
    assert converted.names == ["embed.weight", "lm_head.weight"]
    converted.close()


def test_a_single_file_folder_gets_no_index(tmp_path):
    model = small_model()
    base = save_checkpoint(tmp_path / "base", model)  # one model-00001-of-00001 file, no index
    tune = save_checkpoint(tmp_path / "tune", finetune_of(model))
    assert not (base / "model.safetensors.index.json").exists()
    ok("compress", base, tune, "-o", tmp_path / "t.delta", "--quiet")
    ok("restore", base, tmp_path / "t.delta", "-o", tmp_path / "restored", "--quiet")
    assert sorted(p.name for p in (tmp_path / "restored").iterdir()) == sorted(
        [p.name for p in base.iterdir()] + ["README.md", OUTPUT_MARKER])


def test_stitch_add_on_the_command_line(zoo, tmp_path, deltas):
    scratch = tmp_path / "scratch.safetensors"
    ok("stitch", zoo["base"], *deltas, "-o", scratch, "--quiet")
    merged = tmp_path / "merged.safetensors"
    ok("stitch", zoo["base"], deltas[0], "-o", merged, "--quiet")
    ok("stitch-add", zoo["base"], merged, deltas[1], "--previous", deltas[0], "--quiet")
    assert merged.read_bytes() == scratch.read_bytes()
    ties = tmp_path / "ties.safetensors"
    ok("stitch", zoo["base"], deltas[0], "-o", ties, "--rule", "ties", "--quiet")
    assert_one_line_error(run("stitch-add", zoo["base"], ties, deltas[1], "--previous", deltas[0]),
                          "stitched with the rule 'ties'",
                          "only localize-stitch and task-arithmetic merges can be extended")


def test_no_progress_bars_into_logs_and_threads_change_no_byte(zoo, tmp_path):
    """stderr is not a terminal here (as in a log file): no bar, no carriage returns."""
    outputs = []
    for threads in ("1", "3"):
        out = tmp_path / f"t{threads}.delta"
        result = ok("compress", zoo["base"], zoo["ft1"], "-o", out, "--threads", threads)
        assert result.stderr == ""
        outputs.append(out.read_bytes())
        restored = tmp_path / f"r{threads}.safetensors"
        assert ok("restore", zoo["base"], out, "-o", restored, "--threads", threads).stderr == ""
        outputs.append(restored.read_bytes())
    assert outputs[0] == outputs[2] and outputs[1] == outputs[3]


@pytest.mark.parametrize("flags, needle", [
    (["--rule", "task-arithmetic", "--scale", "nan"], "scale must be a finite number"),
    (["--rule", "ties", "--scale", "inf"], "scale must be a finite number"),
    (["--rule", "ties", "--density", "nan"], "density"),
    (["--rule", "dare", "--drop", "nan"], "drop"),
    (["--weights", "nan,1"], "weight 1 of 2 is nan"),
    (["--weights", "1,-inf"], "weight 2 of 2 is -inf"),
])
def test_nan_and_infinite_numbers_are_refused_by_every_merge_command(zoo, tmp_path, deltas, flags,
                                                                     needle):
    """They were accepted (exit 0) and made most of the output NaN."""
    out = tmp_path / "m.safetensors"
    merged = tmp_path / "merged.safetensors"
    ok("stitch", zoo["base"], deltas[0], "-o", merged, "--quiet",
       *(["--rule", "task-arithmetic"] if "task-arithmetic" in flags else []))
    before = merged.read_bytes()
    commands = [["stitch", zoo["base"], *deltas, "-o", out],
                ["merge", zoo["base"], zoo["ft1"], zoo["ft2"], "-o", out]]
    if "ties" not in flags and "dare" not in flags:
        commands.append(["stitch-add", zoo["base"], merged, deltas[1], "--previous", deltas[0],
                         "-o", out])
    for command in commands:
        assert_one_line_error(run(*command, *flags), needle)
        assert not out.exists()
    assert merged.read_bytes() == before


def test_compress_numbers_are_finite_and_in_range(zoo, tmp_path):
    out = tmp_path / "x.delta"
    for flags, needle in ((["--density", "nan"], "density"), (["--max-error", "nan"], "max_error"),
                          (["--max-error", "inf"], "max_error"),
                          (["--max-error", "-1"], "max_error"),
                          (["--density", "0.1", "--bits", "4", "--group", "-2"], "group")):
        assert_one_line_error(run("compress", zoo["base"], zoo["ft1"], "-o", out, *flags), needle)
        assert_one_line_error(run("merge", zoo["base"], zoo["ft1"], "-o", out,
                                  *[f.replace("--density", "--keep") for f in flags]),
                              needle.replace("density", "keep"))
    assert not out.exists()


def test_help_shows_each_rules_defaults():
    for command in ("stitch", "merge"):
        # click may break a rule's name after a hyphen when it wraps the help
        text = " ".join(ok(command, "--help").output.split()).replace("- ", "-")
        assert "(default: ties 0.2, ties-mergekit 0.2, dare-ties-mergekit 1," in text
        assert "(default: dare 0.9)" in text and "task-arithmetic 1" in text


def test_ties_trim_has_one_name_apart_from_keep(zoo, deltas, tmp_path):
    """--trim is TIES's fraction (--density, mergekit's name, still accepted, the same
    result); --keep is the kept fraction, as compress's --density."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ok("stitch", zoo["base"], *deltas, "-o", a, "--rule", "ties", "--trim", "0.3", "--quiet")
    ok("stitch", zoo["base"], *deltas, "-o", b, "--rule", "ties", "--density", "0.3", "--quiet")
    assert a.read_bytes() == b.read_bytes()
    assert_one_line_error(run("stitch", zoo["base"], *deltas, "-o", tmp_path / "c.safetensors",
                              "--trim", "0.3"), "--trim/--density applies to --rule ties")


def test_a_bug_shows_its_traceback_and_asks_for_a_report(deltas, monkeypatch):
    """A ValueError or KeyError from a defect is not dressed up as the user's mistake: the
    traceback is shown, with a request to report it, exit code 1; the tool's own errors keep
    their one line and exit code 2."""
    import sparsestitch.ops.describe

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")
    monkeypatch.setattr(sparsestitch.ops.describe, "info", broken)
    result = run("info", deltas[0])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "an internal invariant broke" in result.stderr
    assert "This is a bug in sparsestitch" in result.stderr
    monkeypatch.setattr(sparsestitch.ops.describe, "info",
                        lambda *a, **k: (_ for _ in ()).throw(sparsestitch.OptionError("x")))
    result = run("info", deltas[0])
    assert result.exit_code == 2 and result.stderr.strip() == "error: x"


def test_what_is_kept_is_defined_once_for_the_api_the_flags_and_configs():
    """KeepOptions is the one definition of what is kept: compress's and merge's keyword
    arguments, their flags (generated from its fields) and a merge config's keep: keys name
    the same options, with the same defaults."""
    import inspect
    from dataclasses import fields

    from sparsestitch.localize.keep_options import KeepOptions
    from sparsestitch.ops.merge_config import KEEP_KEYS

    for command, api in (("compress", sparsestitch.compress), ("merge", sparsestitch.merge)):
        names = KeepOptions.names(command)
        parameters = inspect.signature(api).parameters
        assert set(names) <= set(parameters), command
        flags = {p.name: p for p in main.commands[command].params}
        assert set(names) <= set(flags), command
        for option in fields(KeepOptions):
            name = "keep" if option.name == "density" and command == "merge" else option.name
            if name not in names:
                continue
            default = parameters[name].default
            assert default in (None, option.default) or (option.default is None
                                                         and default is False), (command, name)
            assert flags[name].help == option.metadata["help" if command == "compress" else
                                                       "merge_help"]
    assert KEEP_KEYS == set(KeepOptions.names("merge")) - {"keep"} | {"density"}
    assert "max_size" not in KeepOptions.names("merge")


def test_an_option_of_what_is_kept_that_does_not_exist_is_named():
    from sparsestitch.core.errors import OptionError
    from sparsestitch.localize.keep_options import KeepOptions

    with pytest.raises(OptionError, match="'densty' is not an option of what is kept"):
        KeepOptions.from_mapping({"densty": 0.1})
    assert KeepOptions.from_mapping({"density": 0.1, "include": "*.weight"}) == \
        KeepOptions(density=0.1, include=("*.weight",))
