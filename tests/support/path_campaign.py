"""Output-path campaign: random output paths for every command, checked against an
independent oracle and the inputs' bytes after each case.

Question: can any spelling of an output path -- on, inside or around an input, through
``..``, a link or the Hub cache, with or without ``--overwrite`` -- make a command write over
an input?  Each case draws a command from :data:`~tests.support.workspace.COMMANDS`, an
anchor (one of its inputs, a link to one, the Hub snapshot, the workspace, the outputs
folder, a user's folder) and a random tail of path parts, and runs the command line.  The
oracle (written here, not shared with the library) resolves the output with
``os.path.realpath`` and compares it with every file and folder the command reads:

* refused   -- the oracle sees an overlap and the command refused (exit 2, one error line)
* written   -- no overlap, and the command wrote its output (removed again after the case)
* declined  -- no overlap, and the command refused for another reason (an existing folder
               it did not make, a missing parent, ...)
* harmed    -- any input's bytes changed (a defect)
* missed    -- the oracle sees an overlap and the command did not refuse (a defect)

    python -m tests.support.path_campaign --cases 600 --seed 0

Prints a table and writes bench/results/path_campaign.json; exits 1 on any defect.  A
smaller draw runs in the test suite (tests/test_inputs_guard.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

from click.testing import CliRunner

from sparsestitch.cli import main
from tests.support.workspace import BASE_COMMIT, COMMANDS, build_workspace, tree_state

SKIP = {"outs"}


def read_paths(ws: Path, inputs: list[str]) -> set[Path]:
    """Every file and folder reading ``inputs`` touches, resolved (the Hub cache included when
    the base is read through it)."""
    found = set()
    for name in inputs:
        for folder, dirs, files in os.walk(ws / name, followlinks=True):
            found.add(Path(os.path.realpath(folder)))
            for item in files:
                found.add(Path(os.path.realpath(Path(folder) / item)))
                found.add(Path(os.path.realpath(folder)) / item)
        found.add(Path(os.path.realpath(ws / name)))
    return found


def overlaps(out: Path, protected: set[Path]) -> bool:
    out = Path(os.path.abspath(out))
    spots = {Path(os.path.realpath(out.parent)) / out.name, Path(os.path.realpath(out))}
    return any(spot == p or p in spot.parents or spot in p.parents
               for spot in spots for p in protected)


def touches(path: Path, protected: set[Path]) -> bool:
    """Whether ``path`` (changed, added or removed by a case) is, or lies in, something read."""
    spots = {Path(os.path.realpath(path.parent)) / path.name, Path(os.path.realpath(path))}
    return any(spot == p or (p.is_dir() and p in spot.parents) for spot in spots
               for p in protected)


def random_target(rng: random.Random, ws: Path, inputs: list[str]) -> str:
    anchors = inputs + ["base-link", "delta-link.delta", ".", "outs", "projects",
                        f"hf-cache/models--org--base/snapshots/{BASE_COMMIT}", "hf-cache"]
    path = Path(rng.choice(anchors))
    for _ in range(rng.randint(0, 3)):
        here = ws / path
        options = ["..", ".", "new", "new.delta"]
        if here.is_dir():
            options += sorted(p.name for p in here.iterdir())[:6]
        path = path / rng.choice(options)
    text = str(path)
    return str(ws / text) if rng.random() < 0.3 else text


def run_case(rng: random.Random, ws: Path, hub_base: bool) -> tuple[str, str, str]:
    command = rng.choice(list(COMMANDS))
    template, inputs = COMMANDS[command]
    target = random_target(rng, ws, inputs)
    while command == "stitch-add" and os.path.realpath(ws / target) == os.path.realpath(ws / "merged"):
        target = random_target(rng, ws, inputs)  # -o MERGED itself: the documented in-place case
    overwrite = rng.random() < 0.7
    args = [part.replace("{OUT}", target) for part in template]
    if hub_base and command in ("restore", "stitch", "compress", "merge"):
        args = ["org/base" if a == "base" else a for a in args]
        inputs = [name for name in inputs if name != "base"] + ["hf-cache/models--org--base"]
    protected = read_paths(ws, inputs)
    protected = {p for p in protected if p != Path(os.path.realpath(ws))}
    before = tree_state(ws, SKIP)
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        result = CliRunner().invoke(main, args + (["--overwrite"] if overwrite else []))
        expected = overlaps(Path(target) if os.path.isabs(target) else ws / target, protected)
    finally:
        os.chdir(cwd)
    after = tree_state(ws, SKIP)
    new = sorted(set(after) - set(before), key=len, reverse=True)
    changed = [k for k, v in before.items() if after.get(k) != v] + new
    if any(touches(ws / key, protected) for key in changed):
        verdict = "harmed"
    elif expected:
        verdict = "refused" if result.exit_code == 2 else "missed"
    else:
        verdict = "written" if result.exit_code == 0 else "declined"
    for name in new:  # the case's own outputs (deepest first), so the next case starts clean
        path = ws / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    return command, verdict, target


def run(cases: int, seed: int, ws: Path) -> dict:
    rng = random.Random(seed)
    tally, by_command, defects = Counter(), Counter(), []
    for _ in range(cases):
        command, verdict, target = run_case(rng, ws, rng.random() < 0.25)
        tally[verdict] += 1
        by_command[command, verdict] += 1
        if verdict in ("harmed", "missed"):
            defects.append({"command": command, "verdict": verdict, "target": target})
        if (ws / "outs").exists():  # keep outputs from piling up between cases
            for item in (ws / "outs").iterdir():
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    return {"cases": cases, "seed": seed, "machine": platform.platform(), "verdicts": dict(tally),
            "by_command": {f"{c}:{v}": n for (c, v), n in sorted(by_command.items())},
            "defects": defects}


def main_cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="bench/results/path_campaign.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        ws = build_workspace(Path(folder))
        os.environ["HF_HUB_CACHE"] = str(ws / "hf-cache")  # the runs resolve org/base there
        os.environ["HF_HUB_OFFLINE"] = "1"
        report = run(args.cases, args.seed, ws)
    print(f"{'verdict':10} {'cases':>6}")
    for verdict in ("refused", "written", "declined", "harmed", "missed"):
        print(f"{verdict:10} {report['verdicts'].get(verdict, 0):6}")
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if report["defects"] else 0


if __name__ == "__main__":
    sys.exit(main_cli())
