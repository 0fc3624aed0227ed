"""Wrong inputs and impossible outputs: each is a clear error of the documented type naming the
file (and the tensor), a non-zero exit of the command line with one ``error:`` line, and nothing
at the output path."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import sparsestitch
from sparsestitch.cli import main
from sparsestitch.core.errors import (BaseMismatchError, CheckpointError, DeltaFormatError,
                                      OptionError, OutputError, SparsestitchError,
                                      TensorMismatchError)

from .conftest import save_checkpoint
from .support.processes import tree_digest
from .support.zoo import build_zoo, zoo_finetune, zoo_model


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("bad-input"))


def refused(args: list[str], error: type[SparsestitchError], path, tensor=None,
            out: Path | None = None) -> SparsestitchError:
    """Run the command line and the API both; check exit code, message, error and output path."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"file {str(path)!r}" in lines[0], result.output
    if tensor is not None:
        assert f"tensor {tensor!r}" in lines[0], result.output
    assert "Traceback" not in result.output
    with pytest.raises(error) as caught:
        api(args)
    assert caught.value.path == str(path) and caught.value.tensor == tensor
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if ".sstmp-" in p.name]
    return caught.value


def api(args: list[str]):
    """The API call a command line stands for."""
    command, *rest = args
    positional = [a for i, a in enumerate(rest)
                  if not a.startswith("-") and (i == 0 or rest[i - 1] not in ("-o", "--base"))]
    out = rest[rest.index("-o") + 1] if "-o" in rest else None
    overwrite = "--overwrite" in rest
    if command == "compress":
        return sparsestitch.compress(positional[0], positional[1:], [out], overwrite=overwrite)
    if command == "restore":
        return sparsestitch.restore(*positional, out, overwrite=overwrite)
    if command == "stitch":
        return sparsestitch.stitch(positional[0], positional[1:], out, overwrite=overwrite)
    if command == "verify":
        base = rest[rest.index("--base") + 1] if "--base" in rest else None
        return sparsestitch.verify(positional[0], base=base)
    return sparsestitch.info(positional[0])


def variant(tmp_path: Path, name: str, edit) -> Path:
    tensors = zoo_model()
    edit(tensors)
    return save_checkpoint(tmp_path / name, tensors)


# ---------------------------------------------------------------------------------------------
# Inputs that do not belong together


def test_a_delta_for_another_base(zoo, tmp_path):
    other = save_checkpoint(tmp_path / "other-base.safetensors", zoo_model(seed=7))
    out = tmp_path / "out.safetensors"
    delta = zoo.deltas["d0.01"]
    first = sorted(zoo_model())[0]  # the engine checks tensors in name order
    for command in (["restore", str(other), str(delta), "-o", str(out)],
                    ["stitch", str(other), str(delta), "-o", str(out)]):
        refused(command, BaseMismatchError, delta, first, out)
    refused(["verify", str(delta), "--base", str(other)], BaseMismatchError, delta, first)


@pytest.mark.parametrize("change, tensor", [
    ("missing", "proj.f64"), ("extra", "zz.extra"), ("shape", "mlp.f32"), ("dtype", "attn.f16")])
def test_base_tensors_that_do_not_match_the_delta(zoo, tmp_path, change, tensor):
    def edit(tensors):
        if change == "missing":
            del tensors[tensor]
        elif change == "extra":
            tensors[tensor] = torch.zeros(3)
        elif change == "shape":
            tensors[tensor] = tensors[tensor].reshape(32, 96)
        else:
            tensors[tensor] = tensors[tensor].to(torch.bfloat16)
    base = variant(tmp_path, "base.safetensors", edit)
    out = tmp_path / "out.safetensors"
    delta = zoo.deltas["d0.5"]
    refused(["restore", str(base), str(delta), "-o", str(out)], BaseMismatchError, delta, tensor, out)
    refused(["verify", str(delta), "--base", str(base)], BaseMismatchError, delta, tensor)


@pytest.mark.parametrize("change, tensor", [
    ("missing", "proj.f64"), ("shape", "mlp.f32"), ("dtype", "attn.f16")])
def test_a_fine_tune_that_does_not_match_its_base(zoo, tmp_path, change, tensor):
    tensors = zoo_finetune(zoo_model(), 11)
    if change == "missing":
        del tensors[tensor]
    elif change == "shape":
        tensors[tensor] = tensors[tensor].reshape(32, 96)
    else:
        tensors[tensor] = tensors[tensor].to(torch.float32)
    tune = save_checkpoint(tmp_path / "ft.safetensors", tensors)
    out = tmp_path / "ft.delta"
    refused(["compress", str(zoo.base), str(tune), "-o", str(out)], TensorMismatchError, tune,
            tensor, out)


def test_extra_fine_tune_tensors_are_stored_whole_not_refused(zoo, tmp_path):
    delta = tmp_path / "ft.delta"
    sparsestitch.compress(zoo.base, zoo.finetunes[0], delta, density=0.01)
    assert {t.name: t.kind for t in sparsestitch.info(delta).tensors}["head.new"] == "added"


# ---------------------------------------------------------------------------------------------
# Files of the wrong kind


class _Trap:
    def __reduce__(self):
        return (os.system, (f"touch {tempfile.gettempdir()}/sparsestitch-unpickled",))


def test_pickles_are_never_unpickled(zoo, tmp_path):
    marker = Path(tempfile.gettempdir()) / "sparsestitch-unpickled"
    marker.unlink(missing_ok=True)
    payload = pickle.dumps({"w": _Trap()})
    out = tmp_path / "out.safetensors"
    bin_file = tmp_path / "pytorch_model.bin"
    bin_file.write_bytes(payload)
    error = refused(["restore", str(bin_file), str(zoo.deltas["d0.01"]), "-o", str(out)],
                    CheckpointError, bin_file, out=out)
    assert "safetensors" in str(error) and "never unpickles" in str(error)
    folder = tmp_path / "pickled-model"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(payload)
    refused(["compress", str(folder), str(zoo.finetunes[0]), "-o", str(tmp_path / "x.delta")],
            CheckpointError, folder, out=tmp_path / "x.delta")
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(payload)
    refused(["restore", str(disguised), str(zoo.deltas["d0.01"]), "-o", str(out)],
            CheckpointError, disguised, out=out)
    disguised_delta = tmp_path / "disguised.delta"
    disguised_delta.write_bytes(payload)
    refused(["restore", str(zoo.base), str(disguised_delta), "-o", str(out)],
            DeltaFormatError, disguised_delta, out=out)
    assert not marker.exists()


def test_a_delta_and_a_checkpoint_swapped(zoo, tmp_path):
    out = tmp_path / "out"
    delta = zoo.deltas["d0.01"]
    error = refused(["compress", str(delta), str(zoo.finetunes[0]), "-o", str(out)],
                    CheckpointError, delta, out=out)
    assert "delta" in str(error)
    error = refused(["restore", str(zoo.base), str(zoo.finetunes[0]), "-o", str(out)],
                    DeltaFormatError, zoo.finetunes[0], out=out)
    assert "not a sparsestitch delta" in str(error)


@pytest.mark.parametrize("content", [b"", b"hello world, not a model", b"\x00" * 64])
def test_empty_and_foreign_files(zoo, tmp_path, content):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(content)
    out = tmp_path / "out.safetensors"
    refused(["restore", str(junk), str(zoo.deltas["d0.01"]), "-o", str(out)], CheckpointError,
            junk, out=out)
    refused(["restore", str(zoo.base), str(junk), "-o", str(out)], DeltaFormatError, junk, out=out)
    refused(["info", str(junk)], DeltaFormatError, junk)


def test_missing_paths_and_folders_where_files_belong(zoo, tmp_path):
    out = tmp_path / "out.safetensors"
    missing = tmp_path / "no-such-file.delta"
    refused(["restore", str(zoo.base), str(missing), "-o", str(out)], DeltaFormatError, missing,
            out=out)
    refused(["restore", str(tmp_path / "no-such-base"), str(zoo.deltas["d0.01"]), "-o", str(out)],
            CheckpointError, tmp_path / "no-such-base", out=out)
    a_folder = tmp_path / "a-folder"
    a_folder.mkdir()
    refused(["verify", str(a_folder)], DeltaFormatError, a_folder)
    refused(["restore", str(zoo.base), str(a_folder), "-o", str(out)], DeltaFormatError, a_folder,
            out=out)
    refused(["restore", str(a_folder), str(zoo.deltas["d0.01"]), "-o", str(out)], CheckpointError,
            a_folder, out=out)


def test_a_pipe_is_refused_instead_of_waited_on(zoo, tmp_path):
    pipe = tmp_path / "pipe.delta"
    os.mkfifo(pipe)
    out = tmp_path / "out.safetensors"
    refused(["info", str(pipe)], DeltaFormatError, pipe)
    refused(["restore", str(pipe), str(zoo.deltas["d0.01"]), "-o", str(out)], CheckpointError,
            pipe, out=out)


def test_an_unreadable_input(zoo):
    """chmod 000 does not stop root, so the reading process drops to an unprivileged user."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    folder = Path(tempfile.mkdtemp(prefix="sparsestitch-unreadable-"))
    try:
        os.chmod(folder, 0o777)
        delta, base = folder / "locked.delta", folder / "locked.safetensors"
        delta.write_bytes(zoo.deltas["d0.01"].read_bytes())
        base.write_bytes(zoo.base.read_bytes())
        readable_delta = folder / "open.delta"
        readable_delta.write_bytes(zoo.deltas["d0.01"].read_bytes())
        readable_base = folder / "open.safetensors"
        readable_base.write_bytes(zoo.base.read_bytes())
        for path in (delta, base):
            os.chmod(path, 0)
        for path in (readable_delta, readable_base):
            os.chmod(path, 0o644)
        out = folder / "out.safetensors"
        got = _as_nobody([("restore", readable_base, delta, out), ("restore", base, readable_delta, out)])
        assert got[0] == ["DeltaFormatError", str(delta), None], got
        assert got[1] == ["CheckpointError", str(base), None], got
        assert not out.exists()
    finally:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def _as_nobody(calls) -> list:
    """Run restore calls in a forked child that has switched to user nobody; return the errors."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            results = []
            for _, base, delta, out in calls:
                try:
                    sparsestitch.restore(base, delta, out)
                    results.append(["ok", None, None])
                except SparsestitchError as exc:
                    results.append([type(exc).__name__, exc.path, exc.tensor, str(exc)])
            os.write(write_end, json.dumps(results).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 65536):
        data += chunk
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        pytest.skip("could not switch to user nobody here")
    results = json.loads(data)
    for result in results:
        if len(result) == 4:
            assert "Permission denied" in result.pop(), result
    return results


# ---------------------------------------------------------------------------------------------
# Outputs that cannot or must not be written


@pytest.mark.parametrize("existing", ["file", "folder"])
def test_an_existing_output_is_refused_and_untouched(zoo, tmp_path, existing):
    out = tmp_path / "out"
    if existing == "file":
        out.write_bytes(b"precious")
    else:
        out.mkdir()
        (out / "precious.txt").write_bytes(b"precious")
    before, mtime = tree_digest(out), out.stat().st_mtime_ns
    for args in (["restore", str(zoo.base), str(zoo.deltas["d0.01"]), "-o", str(out)],
                 ["stitch", str(zoo.base), str(zoo.deltas["d0.01"]), "-o", str(out)],
                 ["compress", str(zoo.base), str(zoo.finetunes[0]), "-o", str(out)]):
        error = refused(args, OutputError, out)
        assert "already exists" in str(error) and "--overwrite" in str(error)
        assert tree_digest(out) == before and out.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_folder_whose_parent_is_a_file(zoo, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    out = blocker / "restored"
    for args in (["restore", str(zoo.base), str(zoo.deltas["d0.01"]), "-o", str(out)],
                 ["compress", str(zoo.base), str(zoo.finetunes[0]), "-o", str(blocker / "x.delta")]):
        refused(args, OutputError, Path(args[-1]))
    assert blocker.read_bytes() == b"x"


@pytest.mark.parametrize("command", ["compress", "restore", "stitch"])
def test_an_output_that_is_an_input_is_refused_even_with_overwrite(zoo, tmp_path, command):
    copies = {name: tmp_path / path.name for name, path in
              (("base", zoo.base), ("ft", zoo.finetunes[0]), ("delta", zoo.deltas["d0.01"]))}
    for name, path in (("base", zoo.base), ("ft", zoo.finetunes[0]), ("delta", zoo.deltas["d0.01"])):
        copies[name].write_bytes(path.read_bytes())
    digests = {name: tree_digest(path) for name, path in copies.items()}
    inputs = {"compress": ["ft", "base"], "restore": ["base", "delta"], "stitch": ["delta", "base"]}
    for victim in inputs[command]:
        middle = [str(copies["ft" if command == "compress" else "delta"])]
        args = [command, str(copies["base"]), *middle, "-o", str(copies[victim]), "--overwrite"]
        error = refused(args, OutputError, copies[victim])
        assert "would destroy that input" in str(error)
    args = ["restore", str(copies["base"]), str(copies["delta"]), "-o", str(tmp_path), "--overwrite"]
    refused(args, OutputError, tmp_path)  # a folder holding the inputs
    assert {name: tree_digest(path) for name, path in copies.items()} == digests



# ---------------------------------------------------------------------------------------------
# Options of the wrong type or out of range: refused by name before anything is read


@pytest.mark.parametrize("options, option", [
    ({"lossless": "no"}, "lossless"), ({"lossless": 1}, "lossless"),
    ({"density": 0.1, "bits": 4.0}, "bits"), ({"density": 0.1, "bits": True}, "bits"),
    ({"density": 0.1, "bits": 4, "group": 2.5}, "group"), ({"max_error": True}, "max_error"),
    ({"density": "0.1"}, "density"), ({"max_error": float("nan")}, "max_error"),
    ({"max_error": float("inf")}, "max_error"), ({"density": float("nan")}, "density"),
    ({"chunk_elements": 0}, "chunk_elements"), ({"chunk_elements": 1e4}, "chunk_elements"),
    ({"threads": 2.0}, "threads"), ({"threads": 0}, "threads"),
    ({"max_error": None, "max_memory": "infMiB"}, "max_memory"),
])
def test_compress_and_merge_options_of_the_wrong_type(zoo, tmp_path, options, option):
    """``lossless='no'`` read as true, ``bits=4.0`` passed the checks and failed mid-run."""
    out = tmp_path / "x.delta"
    with pytest.raises(OptionError) as caught:
        sparsestitch.compress(zoo.base, zoo.finetunes[0], out, **options)
    assert caught.value.option == option and option in str(caught.value)
    merge_options = {("keep" if k == "density" else k): v for k, v in options.items()}
    with pytest.raises(OptionError) as caught:
        sparsestitch.merge(zoo.base, zoo.finetunes[:2], out, **merge_options)
    assert caught.value.option == ("keep" if option == "density" else option)
    assert not out.exists()


@pytest.mark.parametrize("options, option", [
    ({"rule": "dare", "seed": 1.7}, "seed"), ({"rule": "dare", "seed": -5}, "seed"),
    ({"rule": "task-arithmetic", "scale": float("nan")}, "scale"),
    ({"weights": [float("nan"), 1.0]}, "weights"), ({"max_memory": "nanGiB"}, "max_memory"),
    ({"max_memory": 10**30}, "max_memory"), ({"threads": 1.5}, "threads"),
])
def test_stitch_options_of_the_wrong_type(zoo, tmp_path, options, option):
    out = tmp_path / "m.safetensors"
    deltas = [zoo.deltas["d0.01"], zoo.other]
    with pytest.raises(OptionError) as caught:
        sparsestitch.stitch(zoo.base, deltas, out, **options)
    assert caught.value.option == option
    assert not out.exists()


def test_zoo_options_are_checked_before_any_worker_starts(zoo, tmp_path):
    """``-O lossless=no`` is the string 'no', which read as true."""
    from sparsestitch.cli.zoo import zoo as zoo_cli
    from sparsestitch.zoo import add, init, ls

    folder = tmp_path / "zoo"
    init(folder, zoo.base)
    for pair, option in (("lossless=no", "lossless"), ("max_error=NaN", "max_error"),
                         ("bits=4.0", "bits"), ("colour=1", "colour")):
        result = CliRunner().invoke(zoo_cli, ["add", str(folder), str(zoo.finetunes[0]), "-O", pair,
                                              "--workers", "0"])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert result.output.startswith("error: ") and option in result.output, result.output
    for options, option in (({"lossless": "no"}, "lossless"), ({"retries": -5}, "retries"),
                            ({"workers": -1}, "workers"), ({"workers": 1.5}, "workers")):
        with pytest.raises(OptionError) as caught:
            add(folder, [zoo.finetunes[0]], **{"workers": 0, **options})
        assert caught.value.option == option
    assert ls(folder) == [] and not list((folder / "deltas").glob("*.delta"))
