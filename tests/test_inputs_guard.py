"""Inputs are never harmed (issue 19, items 1-7): every command's outputs are checked
against all its resolved inputs before any work starts, and ``--overwrite`` replaces only
an earlier output of the same kind.

One workspace holds every kind of input (sharded folders, deltas, a stitched model, a zoo,
a merge config, a Hub cache, a user's own folder); each case runs a command with
``--overwrite`` at an output that would land on, inside or around an input -- spelled
directly, through ``..``, through a symbolic link, through the Hub cache -- and checks the
refusal *and* every input's bytes afterwards.  Each command also writes a fresh output once,
so a refusal cannot come from a malformed command line.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

import sparsestitch
from sparsestitch.cli import main
from sparsestitch.zoo import add, init

from .conftest import finetune_of, save_checkpoint, small_model
from .support.workspace import BASE_COMMIT, COMMANDS, build_workspace, tree_state

def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace: every kind of input, made once for the module."""
    return build_workspace(tmp_path_factory.mktemp("ws"))


@pytest.fixture
def cache(ws, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(ws / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return ws / "hf-cache" / "models--org--base"


def targets_around(ws: Path, name: str) -> list[str]:
    """Outputs that would land on, inside or around the input ``name``, spelled several ways."""
    path = ws / name
    found = [name, f"outs/../{name}", str(path)]
    if path.is_dir():
        children = sorted(p.name for p in path.iterdir())
        found += [f"{name}/{children[0]}", f"{name}/{children[-1]}", f"{name}/new-file"]
    if name == "base":
        found += ["base-link/model-00001-of-00002.safetensors", "base-link"]
    if name == "zoo":
        found += ["zoo/zoo.json", "zoo/deltas/a.delta", "zoo/deltas"]
    if name == "ft1.delta":
        found += ["delta-link.delta"]
    return found


def run_in(ws: Path, command: str, out: str, *extra: str):
    template, _ = COMMANDS[command]
    args = [part.replace("{OUT}", out) for part in template] + list(extra)
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        return run(*args, "--quiet") if command not in ("zoo-get", "zoo-merge") else run(*args)
    finally:
        os.chdir(cwd)


def refused(result) -> str:
    assert result.exit_code == 2, (result.output, result.exception)
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


def case_targets(ws: Path, command: str) -> list[str]:
    _, inputs = COMMANDS[command]
    found = [t for name in inputs for t in targets_around(ws, name)]
    if command == "stitch-add":  # -o MERGED itself is the documented in-place extension
        found = [t for t in found if os.path.realpath(ws / t) != str(ws / "merged")]
    return found


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_output_may_land_on_inside_or_around_an_input(ws, command):
    """Every spelling of every input of every command, with --overwrite: refused, and no
    byte of any input changes."""
    skip = {"outs"}
    before = tree_state(ws, skip)
    targets = case_targets(ws, command)
    assert len(targets) >= 8
    for target in targets:
        line = refused(run_in(ws, command, target, "--overwrite"))
        assert "destroy that input" in line or "replaces only" in line, (target, line)
        assert tree_state(ws, skip) == before, target
    fresh = f"outs/{command}-fresh" + (".delta" if command == "compress" else "")
    result = run_in(ws, command, fresh)
    assert result.exit_code == 0, (result.output, result.exception)
    assert tree_state(ws, skip) == before


def test_a_folder_holding_inputs_is_never_replaced(ws):
    """The workspace itself (it holds every input) and its parent, as outputs."""
    before = tree_state(ws, {"outs"})
    for command in COMMANDS:
        for target in (".", "..", str(ws)):
            line = refused(run_in(ws, command, target, "--overwrite"))
            assert "holding" in line or "is the" in line or "replaces only" in line, line
    assert tree_state(ws, {"outs"}) == before


@pytest.mark.parametrize("command", ["restore", "stitch", "merge", "zoo-get", "compress"])
def test_overwrite_replaces_only_an_earlier_output(ws, command):
    """A user's own folder (with a subfolder) and a file of another kind survive --overwrite;
    an earlier output of the command is replaced; so is an empty folder, without it."""
    before = tree_state(ws, {"outs"})
    line = refused(run_in(ws, command, "projects", "--overwrite"))
    assert "replaces only" in line, line
    own = ws / "outs" / f"own-{command}"
    own.mkdir()
    (own / "notes.txt").write_text("mine")
    refused(run_in(ws, command, str(own), "--overwrite"))
    assert (own / "notes.txt").read_text() == "mine"
    assert tree_state(ws, {"outs"}) == before
    suffix = ".delta" if command == "compress" else ""
    earlier = f"outs/earlier-{command}{suffix}"
    for _ in range(2):
        assert run_in(ws, command, earlier, "--overwrite").exit_code == 0
    if command != "compress":
        # Someone puts a file of their own into the earlier output: no longer replaceable.
        (ws / earlier / "notes.txt").write_text("mine")
        line = refused(run_in(ws, command, earlier, "--overwrite"))
        assert "notes.txt" in line
        assert (ws / earlier / "notes.txt").read_text() == "mine"
        empty = ws / "outs" / f"empty-{command}"
        empty.mkdir()
        assert run_in(ws, command, str(empty)).exit_code == 0
        assert (empty / "config.json").is_file()


def test_a_merge_configs_out_cannot_replace_a_users_folder(ws):
    config = ws / "outs" / "escape.yaml"
    config.write_text("base: ../base\nmodels: [../ft1, ../ft2]\nrule: task-arithmetic\n"
                      "out: ../projects\n")
    before = tree_state(ws, {"outs"})
    line = refused(run("merge", "--config", config, "--overwrite", "--quiet"))
    assert "sparsestitch did not write" in line
    config.write_text("base: ../base\nmodels: [../ft1, ../ft2]\nrule: task-arithmetic\n"
                      f"out: {ws / 'outs' / 'escape.yaml'}\n")
    line = refused(run("merge", "--config", config, "--overwrite", "--quiet"))
    assert "merge config" in line
    assert tree_state(ws, {"outs"}) == before


def test_a_hub_base_is_protected_after_resolution(ws, cache):
    """``org/base`` resolves into the cache: its snapshot, the files in it (links to blobs),
    the blobs themselves and the whole cached repository are inputs."""
    before = tree_state(ws, {"outs"})
    snapshot = cache / "snapshots" / BASE_COMMIT
    blob = sorted((cache / "blobs").iterdir())[0]
    targets = [snapshot, snapshot / "model-00001-of-00002.safetensors", blob, cache / "refs",
               cache / "refs" / "main", cache, cache.parent]
    for command in ("restore", "stitch", "compress", "merge"):
        template, _ = COMMANDS[command]
        for target in targets:
            args = [str(target) if part == "{OUT}" else ("org/base" if part == "base" else part)
                    for part in template]
            cwd = os.getcwd()
            os.chdir(ws)
            try:
                line = refused(run(*args, "--overwrite", "--quiet"))
            finally:
                os.chdir(cwd)
            assert "org/base" in line or "replaces only" in line, (command, target, line)
    assert tree_state(ws, {"outs"}) == before
    os.chdir(ws)
    try:
        assert run("restore", "org/base", "ft1.delta", "-o", "outs/from-hub").exit_code == 0
    finally:
        os.chdir(Path(__file__).parent)


@pytest.mark.parametrize("spec", ["org/base@/etc", "org/base@../../..", "org/base@a//b",
                                  "org/base@refs/../../x"])
def test_hub_revisions_cannot_name_paths(ws, cache, spec):
    with pytest.raises(sparsestitch.CheckpointError, match="revision after @"):
        sparsestitch.checkpoint.hub.resolve(spec)


def test_a_refs_file_cannot_lead_out_of_the_cache(ws, cache, tmp_path):
    """A ``refs/`` file holding ``../../..`` (or a snapshot link planted outside) must not
    make a Hub id resolve to an arbitrary folder."""
    ref = cache / "refs" / "evil"
    ref.write_text("../../../../base")
    try:
        with pytest.raises(sparsestitch.CheckpointError):
            sparsestitch.checkpoint.hub.resolve("org/base@evil")
    finally:
        ref.unlink()
    outside = tmp_path / "elsewhere"
    save_checkpoint(outside, small_model())
    planted = cache / "snapshots" / ("c" * 40)
    os.symlink(outside, planted)
    (cache / "refs" / "planted").write_text("c" * 40)
    try:
        with pytest.raises(sparsestitch.CheckpointError, match="outside its own snapshots"):
            sparsestitch.checkpoint.hub.resolve("org/base@planted")
    finally:
        planted.unlink()
        (cache / "refs" / "planted").unlink()


def test_stitch_add_checks_its_inputs(tmp_path):
    """Item 2, as reported: single-file base and merged model; neither the base nor the delta
    being added may be replaced by the output."""
    model = small_model()
    base = save_checkpoint(tmp_path / "base.safetensors", model)
    tunes = [save_checkpoint(tmp_path / f"ft{i}.safetensors", finetune_of(model, seed=i))
             for i in (1, 2)]
    deltas = [tmp_path / "ft1.delta", tmp_path / "new.delta"]
    sparsestitch.compress(base, tunes, deltas, density=0.05)
    merged = sparsestitch.stitch(base, deltas[:1], tmp_path / "merged.safetensors")
    before = tree_state(tmp_path, set())
    for out in (base, deltas[1], deltas[0]):
        line = refused(run("stitch-add", base, merged, deltas[1], "--previous", deltas[0],
                           "-o", out, "--overwrite", "--quiet"))
        assert "destroy that input" in line, line
    assert tree_state(tmp_path, set()) == before
    assert run("stitch-add", base, merged, deltas[1], "--previous", deltas[0],
               "--quiet").exit_code == 0  # in place, as documented


def test_a_zoo_whose_internals_link_out_is_refused(ws, tmp_path):
    """Item 5: a zoo whose deltas/ is a link to a folder elsewhere: rm must not delete there,
    add must not write there."""
    zoo = tmp_path / "zoo"
    init(zoo, ws / "base")
    add(zoo, {"a": ws / "ft1"}, workers=0)
    elsewhere = tmp_path / "elsewhere"
    (zoo / "deltas").rename(elsewhere)
    os.symlink(elsewhere, zoo / "deltas")
    before = tree_state(elsewhere, set())
    for args in (["zoo", "rm", zoo, "a"], ["zoo", "add", zoo, f"b={ws / 'ft2'}", "--workers", "0"],
                 ["zoo", "ls", zoo], ["zoo", "get", zoo, "a", "-o", tmp_path / "out"]):
        line = refused(run(*args))
        assert "leading out of the zoo" in line, line
    assert tree_state(elsewhere, set()) == before
    lock = tmp_path / "lock-target"
    lock.write_text("precious")
    (zoo / "deltas").unlink()
    elsewhere.rename(zoo / "deltas")
    (zoo / ".zoo.lock").unlink(missing_ok=True)
    os.symlink(lock, zoo / ".zoo.lock")
    refused(run("zoo", "rm", zoo, "a"))
    assert lock.read_text() == "precious"


def test_random_output_paths_never_harm_an_input(ws, cache):
    """A draw of the output-path campaign (tests/support/path_campaign.py): random commands,
    anchors and path tails; every case's inputs checked byte for byte, and every overlap the
    independent oracle sees refused."""
    from .support.path_campaign import run as campaign

    report = campaign(60, seed=11, ws=ws)
    assert report["defects"] == []
    assert report["verdicts"].get("refused", 0) >= 15 and report["verdicts"].get("written", 0) >= 5


_REV_PARTS = ["main", "v1", "..", ".", "/", "//", "refs", "pr", "1", "/etc", "~", "a" * 40,
              "b" * 40, "x/../y", "%2e%2e", "\\", " ", "evil", "@"]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(_REV_PARTS), min_size=1, max_size=4).map("".join),
       st.sampled_from(["", "../../..", "/tmp", "b" * 40, "c" * 40, "b" * 39, "B" * 40,
                        "snapshots/" + "b" * 40, "\n", "b" * 40 + "\n"]))
def test_hub_ids_and_refs_never_resolve_outside_the_cache(ws, revision, ref_text):
    """Any revision text, and a refs/ file of any content: resolving either refuses with the
    library's error or lands on a commit's snapshot inside the cached repository."""
    cache = ws / "hf-cache"
    ref = cache / "models--org--base" / "refs" / "fuzz"
    ref.write_text(ref_text)
    snapshots = os.path.realpath(cache / "models--org--base" / "snapshots")
    os.environ["HF_HUB_CACHE"], os.environ["HF_HUB_OFFLINE"] = str(cache), "1"
    try:
        for spec in (f"org/base@{revision}", "org/base@fuzz"):
            try:
                resolved = sparsestitch.checkpoint.hub.resolve(spec)
            except sparsestitch.CheckpointError:
                continue
            assert os.path.dirname(os.path.realpath(resolved.path)) == snapshots, (spec, resolved)
    finally:
        ref.unlink()
        del os.environ["HF_HUB_CACHE"], os.environ["HF_HUB_OFFLINE"]
