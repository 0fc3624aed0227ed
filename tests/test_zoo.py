"""Model zoos: the manifest, every command, racing and killed writers, local and Ray jobs.

Checkpoints are real safetensors files; racing writers are real processes killed with
SIGKILL; the Ray tests start a real local Ray instance (skipped when Ray is absent).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import sparsestitch
from sparsestitch.cli.zoo import zoo as zoo_cli
from sparsestitch.core.errors import OutputError
from sparsestitch.checkpoint.synthetic import write_zoo
from sparsestitch.zoo import (ManifestError, UnknownMemberError, ZooAddError, add, get, init, ls,
                              merge, rm, verify)
from sparsestitch.zoo import manifest as mf

from .conftest import bits, finetune_of, save_checkpoint, small_model

DELTA_OPTIONS = {"density": 0.02}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A small base folder, four fine-tunes, and one whose embedding has another shape."""
    root = tmp_path_factory.mktemp("zoo-models")
    base = small_model()
    paths = {"base": save_checkpoint(root / "base", base)}
    for i in range(1, 5):
        paths[f"ft{i}"] = save_checkpoint(root / f"ft{i}", finetune_of(base, seed=i))
    wrong = finetune_of(base, seed=9)
    wrong["embed.weight"] = torch.zeros(10, 32, dtype=torch.bfloat16)
    paths["wrong"] = save_checkpoint(root / "wrong", wrong)
    return paths


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A 16 MB synthetic bf16 base and three fine-tunes: each compress takes long enough
    (~0.1-0.3 s) for a test to kill the worker doing it; and a zoo made serially from them,
    the reference every other path must match byte for byte."""
    root = tmp_path_factory.mktemp("zoo-synthetic")
    base, tunes = write_zoo(root / "models", 16 << 20, 3, seed=3)
    reference = root / "reference"
    init(reference, base)
    add(reference, tunes, workers=0, **DELTA_OPTIONS)
    return base, tunes, reference


def shas(zoo: Path) -> dict[str, str]:
    """Each member's sha256, computed from its file (not trusted from the manifest)."""
    return {m["name"]: hashlib.sha256((zoo / m["file"]).read_bytes()).hexdigest()
            for m in ls(zoo)}


def tensors(path: Path) -> dict:
    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert np.array_equal(bits(ta[name]), bits(tb[name])), name


# ------------------------------------------------------------------ the commands, serially

def test_members_record_what_compress_wrote(models, tmp_path):
    zoo = tmp_path / "zoo"
    manifest = init(zoo, models["base"])
    results = add(zoo, [models["ft1"], models["ft2"]], workers=0, **DELTA_OPTIONS)
    assert [(r.name, r.status) for r in results] == [("ft1", "added"), ("ft2", "added")]
    # The zoo's identity (from init) is the one compress writes into every delta.
    plain = tmp_path / "plain.delta"
    summary, = sparsestitch.compress(models["base"], models["ft1"], plain, **DELTA_OPTIONS)
    header = sparsestitch.info(plain).header
    assert manifest["base"]["identity"] == header["base_identity"]
    entry = next(m for m in ls(zoo) if m["name"] == "ft1")
    data = (zoo / "deltas" / "ft1.delta").read_bytes()
    assert data == plain.read_bytes()  # the zoo adds nothing to the delta itself
    assert entry["file"] == "deltas/ft1.delta"
    assert entry["size"] == len(data) == summary.nbytes
    assert entry["checksums"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert (entry["kept"], entry["candidates"]) == (summary.kept, summary.candidates)
    assert entry["density"] == summary.density
    assert entry["fidelity"] == header.get("fidelity")
    assert entry["base_identity"] == header["base_identity"]
    assert entry["library_version"] == sparsestitch.__version__
    assert entry["options"]["density"] == 0.02 and entry["options"]["scope"] == "fidelity"
    assert entry["source"] == {**entry["source"], "kind": "path",
                               "path": str(Path(models["ft1"]).resolve())}
    assert entry["dense_bytes"] == sparsestitch.info(plain).dense_bytes
    assert verify(zoo).ok


def test_get_and_merge_match_restore_and_stitch(models, tmp_path):
    zoo = tmp_path / "zoo"
    init(zoo, models["base"])
    add(zoo, {"math": models["ft1"], "code": models["ft2"]}, workers=0, **DELTA_OPTIONS)
    got = get(zoo, "math", tmp_path / "math")
    sparsestitch.restore(models["base"], zoo / "deltas" / "math.delta", tmp_path / "plain-math")
    assert_same_tensors(got, tmp_path / "plain-math")
    card = (got / "README.md").read_text()
    assert f'base_model: "{Path(models["base"]).resolve()}"' in card
    assert f"zoo get {zoo} math -o {tmp_path / 'math'}" in card      # runnable as it is
    assert "Compress options: --density 0.02" in card and "null" not in card
    held = sparsestitch.ops.describe.exactness(zoo / "deltas" / "math.delta")
    assert held.sentence()[1:] in card
    merged = merge(zoo, ["math", "code"], tmp_path / "merged", rule="ties", density=0.5)
    sparsestitch.stitch(models["base"], [zoo / "deltas" / "math.delta",
                                         zoo / "deltas" / "code.delta"],
                        tmp_path / "plain-merged", rule="ties", density=0.5)
    assert_same_tensors(merged, tmp_path / "plain-merged")
    card = (merged / "README.md").read_text()
    assert 'base_model_relation: "merge"' in card and "--rule ties --density 0.5" in card
    assert f"zoo merge {zoo} math code -o {tmp_path / 'merged'}" in card
    with pytest.raises(OutputError):  # never over an existing output without overwrite
        get(zoo, "math", tmp_path / "math")
    with pytest.raises(UnknownMemberError, match="'nope'"):
        get(zoo, "nope", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("options", [{}, {"density": 1.0, "bits": 2}, {"lossless": True}])
def test_a_restored_members_card_claims_exact_bits_only_for_exact_values(models, tmp_path,
                                                                         options):
    zoo = tmp_path / "zoo"
    init(zoo, models["base"])
    add(zoo, {"math": models["ft1"]}, workers=0, **options)
    card = (get(zoo, "math", tmp_path / "math") / "README.md").read_text()
    if options.get("lossless"):
        assert "this is the fine-tune bit for bit" in card
    else:  # quantized values, even with every changed parameter kept (density 1.0)
        assert "quantized values, close to the fine-tune's but not its bits" in card
        assert "bit for bit" not in card and "exact values" not in card


def test_a_scratch_folder_gives_the_same_delta_and_is_left_empty(models, tmp_path):
    zoo, scratch = tmp_path / "zoo", tmp_path / "node-local"
    init(zoo, models["base"])
    add(zoo, [models["ft1"]], workers=0, scratch=scratch, **DELTA_OPTIONS)
    sparsestitch.compress(models["base"], models["ft1"], tmp_path / "plain.delta", **DELTA_OPTIONS)
    assert (zoo / "deltas" / "ft1.delta").read_bytes() == (tmp_path / "plain.delta").read_bytes()
    assert list(scratch.iterdir()) == [] and verify(zoo).ok


def test_rerun_skips_repairs_and_refuses_conflicts(models, tmp_path):
    zoo = tmp_path / "zoo"
    init(zoo, models["base"])
    add(zoo, [models["ft1"]], workers=0, **DELTA_OPTIONS)
    delta = zoo / "deltas" / "ft1.delta"
    good = delta.read_bytes()
    assert add(zoo, [models["ft1"]], workers=0, **DELTA_OPTIONS)[0].status == "skipped"
    # A damaged delta is not "present and verified": the rerun writes the same bytes again.
    delta.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert not verify(zoo, against_base=False).ok
    assert add(zoo, [models["ft1"]], workers=0, **DELTA_OPTIONS)[0].status == "repaired"
    assert delta.read_bytes() == good and verify(zoo).ok
    with pytest.raises(ZooAddError, match="MemberConflictError.*made with --density 0.02, this "
                                          "add asks for --density 0.05"):  # other options
        add(zoo, [models["ft1"]], workers=0, density=0.05)
    with pytest.raises(ZooAddError, match="exists, added from"):  # another source, same name
        add(zoo, {"ft1": models["ft2"]}, workers=0, **DELTA_OPTIONS)
    assert delta.read_bytes() == good and [m["name"] for m in ls(zoo)] == ["ft1"]


def test_base_changed_since_init_adds_nothing(models, tmp_path):
    base = save_checkpoint(tmp_path / "base", small_model())
    zoo = tmp_path / "zoo"
    init(zoo, base)
    save_checkpoint(base, small_model(seed=5))  # rewritten in place, same names and shapes
    with pytest.raises(ZooAddError, match="BaseMismatchError.*changed since zoo init"):
        add(zoo, [models["ft1"]], workers=0)
    assert ls(zoo) == [] and not any(p.is_file() for p in (zoo / "deltas").iterdir())
    assert list((zoo / "deltas" / ".incoming").iterdir()) == []


def test_a_file_in_the_way_is_never_replaced(models, tmp_path):
    zoo = tmp_path / "zoo"
    init(zoo, models["base"])
    stranger = zoo / "deltas" / "ft1.delta"
    stranger.write_bytes(b"someone's notes")
    results = add(zoo, [models["ft1"]], workers=0, check=False)
    assert results[0].status == "failed" and "not a delta of this zoo" in results[0].error
    assert stranger.read_bytes() == b"someone's notes"
    assert verify(zoo).unlisted == ["ft1.delta"]


def test_rm_is_all_or_nothing(models, tmp_path):
    zoo = tmp_path / "zoo"
    init(zoo, models["base"])
    add(zoo, [models["ft1"], models["ft2"]], workers=0)
    with pytest.raises(UnknownMemberError, match="nothing was removed"):
        rm(zoo, ["ft1", "nope"])
    assert [m["name"] for m in ls(zoo)] == ["ft1", "ft2"]
    assert rm(zoo, ["ft1"]) == ["ft1"]
    assert [m["name"] for m in ls(zoo)] == ["ft2"]
    assert sorted(p.name for p in (zoo / "deltas").iterdir() if p.is_file()) == ["ft2.delta"]


def test_init_refuses_a_used_folder_and_a_bad_base(models, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not an empty folder"):
        init(tmp_path / "used", models["base"])
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
    with pytest.raises(sparsestitch.CheckpointError, match="no such file"):
        init(tmp_path / "zoo", tmp_path / "missing")
    assert not (tmp_path / "zoo").exists()


# -------------------------------------------------------------------- manifest validation

def _valid_manifest(models, tmp_path) -> tuple[Path, dict]:
    zoo = tmp_path / "zoo"
    init(zoo, models["base"])
    add(zoo, [models["ft1"]], workers=0)
    return zoo, json.loads((zoo / "zoo.json").read_text())


def _member(m, **changes):
    m["members"][0].update(changes)
    return m


BREAKAGES = {
    "truncated": (lambda m: json.dumps(m)[:-20], "not valid JSON"),
    "duplicate key": (lambda m: json.dumps(m)[:-1] + ', "format": "x"}', "duplicate key 'format'"),
    "NaN": (lambda m: json.dumps(_member(m, density=float("nan"))), "NaN is not allowed"),
    "newer version": (lambda m: {**m, "format_version": 2}, "upgrade sparsestitch"),
    "path escape": (lambda m: _member(m, file="../../victim"),
                    "member 'ft1': 'file' must be 'deltas/ft1.delta'"),
    "negative size": (lambda m: _member(m, size=-1), "member 'ft1': field 'size' must be"),
    "boolean count": (lambda m: _member(m, kept=True), "member 'ft1': field 'kept' must be"),
    "bad name": (lambda m: _member(m, name="a/b"), "members[0]: invalid member name 'a/b'"),
    "twice": (lambda m: {**m, "members": m["members"] * 2}, "member 'ft1' is listed twice"),
    "other base": (lambda m: _member(m, base_identity="0" * 16),
                   "member 'ft1': base_identity 0000000000000000 differs"),
    "bad checksum": (lambda m: _member(m, checksums={"xxh3_64": "xyz", "sha256": "0" * 64}),
                     "member 'ft1': checksums.xxh3_64 must be lowercase hex"),
    "missing field": (lambda m: {**m, "members": [{k: v for k, v in m["members"][0].items()
                                                   if k != "kept"}]},
                      "member 'ft1': field 'kept' is missing"),
    "lone surrogate": (lambda m: json.dumps(m).replace('"spec": "', '"spec": "\\ud800', 1),
                       "lone surrogate"),
    "not an object": (lambda m: [m], "manifest must be a JSON object"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_bad_manifest_is_refused_and_left_alone(models, tmp_path, breakage):
    zoo, manifest = _valid_manifest(models, tmp_path)
    make, message = BREAKAGES[breakage]
    broken = make(manifest)
    data = (broken if isinstance(broken, str) else json.dumps(broken)).encode()
    (zoo / "zoo.json").write_bytes(data)
    with pytest.raises(ManifestError) as caught:
        ls(zoo)
    assert "zoo.json" in str(caught.value) and message in str(caught.value)
    with pytest.raises(ManifestError):  # updates refuse it too ...
        add(zoo, [models["ft2"]], workers=0)
    with pytest.raises(ManifestError):
        rm(zoo, ["ft1"])
    assert (zoo / "zoo.json").read_bytes() == data  # ... and change nothing
    assert (zoo / "deltas" / "ft1.delta").exists() and not (zoo / "deltas" / "ft2.delta").exists()


# ------------------------------------------------------------------ racing, killed writers

HAMMER = r"""
import sys
from sparsestitch.zoo import manifest as mf
zoo, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
template = mf.read(zoo)["members"][0]
def append(name):
    def change(m):
        m["members"].append({**template, "name": name, "file": mf.delta_file(name)})
    return change
for i in range(count):
    mf.update(zoo, append(f"{tag}-{i:04d}"))
"""


def test_racing_manifest_writers_and_a_killed_one_lose_nothing(models, tmp_path):
    """Four processes append members in read-modify-write updates; one is SIGKILLed while
    it hammers (mostly inside the lock, so most likely holding it or mid-write).  Every
    update of the survivors is there, the victim's form a gap-free prefix, and the file is
    valid: a broken lock would lose updates, a non-atomic write would corrupt it."""
    zoo, _ = _valid_manifest(models, tmp_path)
    counts = {"a": 30, "b": 30, "c": 30, "victim": 100000}
    procs = {tag: subprocess.Popen([sys.executable, "-c", HAMMER, str(zoo), tag, str(n)])
             for tag, n in counts.items()}
    deadline = time.monotonic() + 30
    while sum(m["name"].startswith("victim") for m in ls(zoo)) < 20:
        assert time.monotonic() < deadline and procs["victim"].poll() is None
        time.sleep(0.005)
    procs["victim"].send_signal(signal.SIGKILL)
    for tag, proc in procs.items():
        assert proc.wait(timeout=60) == (-signal.SIGKILL if tag == "victim" else 0)
    names = [m["name"] for m in ls(zoo)]
    for tag in "abc":
        assert [n for n in names if n.startswith(tag + "-")] == [f"{tag}-{i:04d}" for i in range(30)]
    victims = [n for n in names if n.startswith("victim")]
    assert len(victims) >= 20 and victims == [f"victim-{i:04d}" for i in range(len(victims))]
    mf.update(zoo, lambda m: None)  # the lock is free again, whoever held it when killed
    assert not list(zoo.glob(".zoo.json.tmp-*"))


ADD_ONE = r"""
import sys
from sparsestitch.zoo import add
add(sys.argv[1], {sys.argv[2]: sys.argv[3]}, workers=0, density=0.02)
"""


def _kill_first_worker(zoo: Path, killed: list, stop: threading.Event) -> None:
    """Watch the zoo's work folders (``PID-RANDOM@HOST``) and SIGKILL the first worker seen."""
    incoming = zoo / "deltas" / ".incoming"
    while not stop.is_set() and not killed:
        for folder in incoming.iterdir() if incoming.is_dir() else ():
            pid = int(folder.name.split("-", 1)[0])
            if pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.0005)


def test_racing_adds_with_a_killed_process_then_a_rerun_completes(synthetic, tmp_path):
    base, tunes, reference = synthetic
    zoo = tmp_path / "zoo"
    init(zoo, base)
    names = [f"t{i}" for i in range(len(tunes))]
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=_kill_first_worker, args=(zoo, killed, stop))
    killer.start()
    procs = [subprocess.Popen([sys.executable, "-c", ADD_ONE, str(zoo), n, str(t)])
             for n, t in zip(names, tunes)]
    codes = [p.wait(timeout=120) for p in procs]
    stop.set()
    killer.join()
    assert len(killed) == 1 and codes.count(-signal.SIGKILL) == 1, codes
    survivors = {n for n, c in zip(names, codes) if c == 0}
    assert {m["name"] for m in ls(zoo)} == survivors and verify(zoo).ok
    results = add(zoo, dict(zip(names, map(str, tunes))), workers=2, **DELTA_OPTIONS)
    assert sorted(r.status for r in results) == ["added", "skipped", "skipped"]
    assert list(shas(zoo).values()) == list(shas(reference).values())
    assert list((zoo / "deltas" / ".incoming").iterdir()) == []  # the kill's leftovers swept


def test_racing_adds_of_one_name(models, tmp_path):
    """Whatever the interleaving: the same checkpoint added twice under one name gives one
    member; two checkpoints under one name give the first committed, and the other fails
    without touching it."""
    zoo = tmp_path / "zoo"
    init(zoo, models["base"])
    jobs = [("x", models["ft1"]), ("x", models["ft1"]), ("y", models["ft1"]), ("y", models["ft2"])]
    procs = [subprocess.Popen([sys.executable, "-c", ADD_ONE, str(zoo), name, str(path)],
                              stderr=subprocess.PIPE, text=True) for name, path in jobs]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    outcomes = [(p.returncode, err) for p, err in zip(procs, errors)]
    assert [code for code, _ in outcomes[:2]] == [0, 0]
    y_codes = sorted(code for code, _ in outcomes[2:])
    assert y_codes[0] == 0 and y_codes[1] != 0
    assert any("MemberConflictError" in err for _, err in outcomes[2:])
    members = {m["name"]: m for m in ls(zoo)}
    assert sorted(members) == ["x", "y"] and verify(zoo).ok
    winner = models["ft1"] if outcomes[2][0] == 0 else models["ft2"]
    assert members["y"]["source"]["path"] == str(Path(winner).resolve())


def test_local_workers_retry_a_killed_one(synthetic, tmp_path):
    base, tunes, reference = synthetic
    zoo = tmp_path / "zoo"
    init(zoo, base)
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=_kill_first_worker, args=(zoo, killed, stop))
    killer.start()
    try:
        results = add(zoo, tunes, workers=1, **DELTA_OPTIONS)
    finally:
        stop.set()
        killer.join()
    assert len(killed) == 1
    # "skipped" only if the kill landed after the commit, in the last clean-up instant
    assert all(r.status in ("added", "skipped") for r in results)
    assert sorted(r.attempts for r in results) == [1, 1, 2]
    assert killed[0] not in {r.pid for r in results}
    assert shas(zoo) == shas(reference) and verify(zoo).ok


def test_an_input_error_fails_its_member_only_and_is_not_retried(models, tmp_path):
    zoo = tmp_path / "zoo"
    init(zoo, models["base"])
    with pytest.raises(ZooAddError) as caught:
        add(zoo, [models["ft1"], models["wrong"]], workers=2, retries=2)
    by_name = {r.name: r for r in caught.value.results}
    assert by_name["ft1"].status == "added"
    wrong = by_name["wrong"]
    assert wrong.status == "failed" and wrong.attempts == 1
    assert "TensorMismatchError" in wrong.error and "embed.weight" in wrong.error
    assert [m["name"] for m in ls(zoo)] == ["ft1"]


def test_without_ray_the_ray_path_says_how_to_get_it(models, tmp_path, monkeypatch):
    zoo = tmp_path / "zoo"
    init(zoo, models["base"])
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(RuntimeError, match=r"pip install 'sparsestitch\[ray\]'"):
        add(zoo, [models["ft1"]], ray=True)
    assert ls(zoo) == []


# ------------------------------------------------------------------------------- the CLI

def cli(*args):
    return CliRunner().invoke(zoo_cli, [str(a) for a in args])


def test_cli_commands(models, tmp_path):
    zoo = tmp_path / "zoo"
    assert cli("init", zoo, "--base", models["base"]).exit_code == 0
    out = cli("add", zoo, f"math={models['ft1']}", f"code={models['ft2']}", "--density", "0.02",
              "--workers", "0")
    assert out.exit_code == 0, out.output
    assert "math" in out.output and "added" in out.output
    listing = cli("ls", zoo)
    assert listing.exit_code == 0 and "x smaller" in listing.output
    assert [line.split()[0] for line in listing.output.splitlines()[3:]] == ["code", "math"]
    assert "rel. error 0." in listing.output and "bits_per_parameter" not in listing.output
    as_json = json.loads(cli("ls", zoo, "--json").output)
    assert [m["name"] for m in as_json["members"]] == ["code", "math"]
    assert {"size", "x_smaller", "density", "relative_error", "lossless", "source"} <= \
        set(as_json["members"][0]) and "format" not in as_json   # the listing, not the manifest
    assert cli("get", zoo, "math", "-o", tmp_path / "math").exit_code == 0
    assert (tmp_path / "math" / "README.md").exists()
    merged = cli("merge", zoo, "math", "code", "-o", tmp_path / "m", "--rule", "task-arithmetic",
                 "--scale", "0.5")
    assert merged.exit_code == 0, merged.output
    verified = cli("verify", zoo)
    assert verified.exit_code == 0 and "ok: 2 member(s)" in verified.output
    (zoo / "deltas" / "code.delta").write_bytes(b"x")
    broken = cli("verify", zoo, "--json")
    assert broken.exit_code == 2 and json.loads(broken.output)["problems"]["code"]
    broken = cli("verify", zoo)
    assert broken.exit_code == 2 and "FAILED: 1 of 2 member(s) checked" in broken.output
    failed = cli("add", zoo, models["wrong"], "--workers", "0")
    assert failed.exit_code == 2 and "TensorMismatchError" in failed.output
    assert cli("rm", zoo, "code").exit_code == 0
    missing = cli("get", zoo, "code", "-o", tmp_path / "c")
    assert missing.exit_code == 2 and "no member 'code'" in missing.stderr
    assert cli("add", zoo, models["ft3"], "--ray=nowhere").exit_code == 2


# ----------------------------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_writes_the_same_bytes_as_the_local_path(ray_instance, synthetic, tmp_path):
    base, tunes, reference = synthetic
    zoo = tmp_path / "zoo"
    init(zoo, base)
    results = add(zoo, tunes, ray=True, **DELTA_OPTIONS)
    assert all(r.status == "added" for r in results)
    assert shas(zoo) == shas(reference)
    assert {r.pid for r in results}.isdisjoint({os.getpid()})  # it ran in Ray's workers
    assert add(zoo, tunes, ray=True, **DELTA_OPTIONS)[0].status == "skipped"


def test_ray_retries_a_killed_worker(ray_instance, synthetic, tmp_path):
    base, tunes, reference = synthetic
    zoo = tmp_path / "zoo"
    init(zoo, base)
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=_kill_first_worker, args=(zoo, killed, stop))
    killer.start()
    try:
        results = add(zoo, tunes, ray=True, retries=3, **DELTA_OPTIONS)
    finally:
        stop.set()
        killer.join()
    assert len(killed) == 1
    assert all(r.status in ("added", "skipped") for r in results)
    assert killed[0] not in {r.pid for r in results}
    assert shas(zoo) == shas(reference) and verify(zoo).ok
