"""Reliability campaign: damaged and hostile delta files and base checkpoints, and killed runs.

Question: does any input make sparsestitch crash, give a silently wrong result, or leave
something at the output path?  Every case is a real delta made by ``sparsestitch.compress``
(every float width, every codec), damaged one way or another, then put through ``info``,
``sparsestitch info``, ``verify`` (with and without the base), ``restore`` and ``stitch``; each
outcome is judged against an independent reader written from docs/format.md
(:mod:`tests.support.reference`).  Verdicts per case:

* detected   -- every operation that must refuse it raised the library's own error naming the
                file (and the tensor the damage is in); the others gave the reference result
* identical  -- every operation gave exactly the pristine file's result (harmless damage)
* faithful   -- the damage made another valid file, and every operation read it exactly as the
                reference reader does (e.g. other bytes in place of stored values)
* crashed    -- some operation raised anything else
* silent     -- some operation succeeded with a result the reference reader disagrees with
* unnamed    -- an error that does not name the file or tensor
* leftover   -- a failed run left something at or beside the output path
* refused-valid -- the library refused a file the reference reader accepts

Phase 1 runs every systematic family (bit flips per region, truncation at every region,
container edits, resealed header edits, hostile payloads, base-checkpoint damage) over every
zoo delta; phase 2 draws random cases (multi-bit and byte-run damage, resealed random header
fields, resealed payload garbage, base flips) until the time is up; phase 3 kills the command
line (``kill -9``) at random moments and checks the output is absent or complete.

    python -m tests.support.campaign --minutes 5 --seed 0

Prints a table and writes bench/results/reliability_campaign.json; exits 1 if any case is
crashed, silent, unnamed, leftover or refused-valid.  The fast part runs in the test suite
(tests/test_corruption.py, tests/test_faults.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import sparsestitch
from tests.support import damage, images, outcomes, processes
from tests.support import zoo as zoo_builder
from tests.support.models import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]

BAD = ("crashed", "silent", "unnamed", "leftover", "refused-valid")


def systematic(zoo, ctx, pristine, rng, flips_per_region: int):
    """Every case of every deterministic family, delta by delta; yields ``(case, run)``."""
    for label, path in zoo.deltas.items():
        data, image = path.read_bytes(), images.DeltaImage.read(path)
        families = [damage.bitflip_cases(label, data, rng, flips_per_region),
                    damage.truncation_cases(label, data), damage.container_cases(label, image),
                    damage.header_cases(label, image), damage.decoder_cases(label, path)]
        for cases in families:
            for case in cases:
                yield case, lambda case=case, label=label: outcomes.run_case(case, ctx, pristine[label])
    for case in outcomes.base_cases(zoo.base.read_bytes(), rng, flips_per_region):
        yield case, lambda case=case: outcomes.run_base_case(case, zoo.deltas["mask"], ctx,
                                                       pristine["mask"])


def randomized(zoo, ctx, pristine, rng):
    """Random cases forever; yields ``(case, run)``."""
    opened = {label: images.DeltaImage.read(path) for label, path in zoo.deltas.items()}
    base = zoo.base.read_bytes()
    while True:
        label = rng.choice(list(zoo.deltas))
        kind = rng.choice(["damage", "header", "payload", "base"])
        if kind == "damage":
            case = damage.random_damage_case(label, zoo.deltas[label].read_bytes(), rng)
        elif kind == "header":
            case = damage.random_header_case(label, opened[label], rng)
        elif kind == "payload":
            case = damage.resealed_payload_cases(label, opened[label], rng, 1)[0]
        else:
            bit = rng.randrange(8 * len(base))
            case = damage.Case("base-bitflip", f"base:random:bit{bit}", damage.flip(base, bit),
                           tensor=_base_tensor_at(base, bit // 8))
            yield case, lambda case=case: outcomes.run_base_case(case, zoo.deltas["mask"], ctx,
                                                           pristine["mask"])
            continue
        yield case, lambda case=case, label=label: outcomes.run_case(case, ctx, pristine[label])


def _base_tensor_at(data: bytes, offset: int) -> str | None:
    for label, start, end, tensor in outcomes.base_regions(data):
        if label == "tensor" and start <= offset < end:
            return tensor
    return None


def kill_trials(folder: Path, trials: int, rng: random.Random) -> Counter:
    """``kill -9`` compress, restore and stitch at random moments; count what the output was."""
    model = zoo_builder.medium_model()
    base = save_checkpoint(folder / "base", model, shards=3)
    tunes = [save_checkpoint(folder / f"ft{i}", zoo_builder.medium_finetune(model, i), shards=3)
             for i in (1, 2)]
    deltas = [folder / "ft1.delta", folder / "ft2.delta"]
    import sparsestitch

    sparsestitch.compress(base, tunes, deltas, density=0.05)
    out = folder / "out"
    out.mkdir()
    commands = {
        "compress": (out / "c.delta", ["compress", str(base), str(tunes[0]), "--density", "0.05"]),
        "restore": (out / "r", ["restore", str(base), str(deltas[0])]),
        "stitch": (out / "s", ["stitch", str(base), *map(str, deltas)]),
    }
    inputs = {p: processes.tree_digest(p) for p in [base, *tunes, *deltas]}
    counts = Counter()
    for command, (target, args) in commands.items():
        args = [*args, "-o", str(target), "--quiet"]
        started = time.perf_counter()
        assert processes.wait_exit(processes.spawn_cli(args)) == 0, f"{command} failed"
        seconds = time.perf_counter() - started
        reference = processes.tree_digest(target)
        processes.remove(target)
        for _ in range(trials):
            pid = processes.spawn_cli(args)
            time.sleep(rng.uniform(0, 1.3 * seconds))
            os.kill(pid, signal.SIGKILL)
            processes.wait_exit(pid)
            digest = processes.tree_digest(target)
            state = "absent" if digest is None else "complete" if digest == reference else "BROKEN"
            counts[f"{command}:{state}"] += 1
            owners = {name.split(".sstmp-")[1].split("-")[0] for name in processes.leftovers(out)
                      if name.startswith(f".{target.name}")}
            counts["temporaries piled up"] += len(owners) > 1
            processes.remove(target)
        try:
            rerun = processes.wait_exit(processes.spawn_cli(args)) == 0 and processes.tree_digest(target) == reference
        except TimeoutError:
            rerun = False
        counts[f"{command}:rerun failed"] += not rerun
        counts["temporaries left after rerun"] += bool(processes.leftovers(out))
        processes.remove(target)
    counts["inputs modified"] = sum(processes.tree_digest(p) != d for p, d in inputs.items())
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0,
                        help="total time; phase 2 runs until it is used up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flips-per-region", type=int, default=8)
    parser.add_argument("--kills", type=int, default=20, help="kill -9 trials per command")
    parser.add_argument("--out", default=str(ROOT / "bench/results/reliability_campaign.json"))
    args = parser.parse_args()
    # A regression that allocates without bound must fail here, not exhaust the machine.
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    started = time.perf_counter()
    deadline = started + 60 * args.minutes
    reserve = 10 + 1.5 * args.kills  # seconds kept for the kill -9 trials
    scratch_root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    folder = Path(tempfile.mkdtemp(prefix="sparsestitch-campaign-", dir=scratch_root))
    try:
        rng = random.Random(args.seed)
        zoo = zoo_builder.build_zoo(folder / "zoo", seed=args.seed)
        (folder / "scratch").mkdir()
        ctx = outcomes.Context(zoo.base, zoo.other, folder / "scratch")
        pristine = {label: outcomes.pristine_results(path, ctx) for label, path in zoo.deltas.items()}
        tally = outcomes.Tally()
        for phase, cases in (("systematic", systematic(zoo, ctx, pristine, rng,
                                                       args.flips_per_region)),
                             ("random", randomized(zoo, ctx, pristine, rng))):
            phase_started = time.perf_counter()
            for case, run in cases:
                tally.add(case, run())
                if phase == "random" and time.perf_counter() > deadline - reserve:
                    break
            print(f"{phase}: {tally.cases['tried']} cases so far, "
                  f"{time.perf_counter() - phase_started:.0f} s", flush=True)
        kills = kill_trials(folder / "kills", args.kills, rng)
        elapsed = time.perf_counter() - started
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    verdicts = ("tried", "detected", "identical", "faithful") + BAD
    rows = [{"family": family, **counts} for family, counts in sorted(tally.by_family.items())]
    rows.append({"family": "all", **tally.cases})
    width = max(len(row["family"]) for row in rows)
    print("  ".join(["family".ljust(width)] + [v.rjust(9) for v in verdicts]))
    for row in rows:
        print("  ".join([row["family"].ljust(width)] + [str(row.get(v, 0)).rjust(9) for v in verdicts]))
    print("operation runs:", dict(tally.runs))
    print("kill -9 trials:", dict(kills))
    bad = sum(tally.cases[v] for v in BAD)
    broken = sum(v for k, v in kills.items() if "BROKEN" in k or "failed" in k
                 or "piled" in k or "left" in k or "modified" in k)
    command = (f"python -m tests.support.campaign --minutes {args.minutes:g} --seed {args.seed} "
               f"--flips-per-region {args.flips_per_region} --kills {args.kills}")
    path = Path(args.out)
    path.write_text(json.dumps({
        "command": command, "seconds": round(elapsed, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "os": platform.platform(), "python": platform.python_version(),
                    "sparsestitch": sparsestitch.__version__},
        "codecs": sorted(zoo_builder.CODECS), "cases": dict(tally.cases),
        "by_family": {f: dict(c) for f, c in tally.by_family.items()},
        "operation_runs": dict(tally.runs), "kill_trials": dict(kills),
        "failures": [{"case": label, "outcomes": verdict} for label, verdict in tally.failures[:50]],
    }, indent=2, sort_keys=True) + "\n")
    print(f"{tally.cases['tried']} cases in {elapsed:.0f} s: {tally.cases['detected']} detected, "
          f"{tally.cases['identical']} identical, {tally.cases['faithful']} faithful, {bad} bad; "
          f"kill trials broken: {broken}.  Wrote {path}")
    return 1 if bad or broken else 0


if __name__ == "__main__":
    sys.exit(main())
