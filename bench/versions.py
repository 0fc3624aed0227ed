"""Two versions of sparsestitch side by side: is a change faster, slower, or the same?

Question: after a refactor (or any change), do compress, restore and stitch take the same
time and memory as before, on the same inputs, producing the same bytes?

Each job runs in a fresh Python process whose ``sys.path`` starts with one source tree
(``--before``, e.g. a ``git worktree`` of the old commit with its C loops built in place,
and ``--after``, this checkout), so both versions run on this machine in the same rounds:
job A-before, A-after, B-before, B-after, ... (``--repeat`` rounds; tables show the best
round, ratios are after / before).  Inputs: a synthetic llama-shaped bf16 model and four
fine-tunes (:func:`sparsestitch.checkpoint.synthetic.write_zoo`, ``--size-mb``), and 1% and
density-1.0 deltas made once by the *before* version, so both read the same deltas.
Outputs of the two versions are compared byte for byte (a difference is reported, not
hidden: a change of selection rule changes compress's bytes on purpose).

    git worktree add --detach /tmp/before <old commit>
    (cd /tmp/before && python setup.py build_ext --inplace)
    python bench/versions.py --before /tmp/before --size-mb 300 --repeat 3

Prints a table; writes ``bench/results/versions.json`` (``--json``).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from common import describe_machine, interleaved, machine, table, write_json  # noqa: E402

CACHE = BENCH / ".cache" / "versions"


# ---- jobs (run in the child processes; every argument is a string) ----

def job_compress(base: str, tune: str, out: str, density: str) -> str:
    import sparsestitch
    sparsestitch.compress(base, tune, out, density=float(density), overwrite=True)
    return _digest(Path(out))


def job_restore(base: str, delta: str, out: str) -> str:
    import sparsestitch
    sparsestitch.restore(base, delta, out, overwrite=True)
    return _digest(Path(out))


def job_stitch(base: str, deltas: str, out: str, rule: str, max_memory: str) -> str:
    import sparsestitch
    options = {"scale": 0.5} if rule == "task-arithmetic" else {}
    sparsestitch.stitch(base, deltas.split(","), out, rule=rule, max_memory=max_memory,
                        overwrite=True, **options)
    return _digest(Path(out))


def _digest(path: Path) -> str:
    """sha256 of a file, or of a folder's weight files (names and bytes) -- the model card and
    metadata files a newer version may add are left out."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                 if p.suffix == ".safetensors")
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


# ---- driver ----

def prepare(before: Path, size_mb: int, tasks: int) -> dict:
    """The inputs (built once, reused): a zoo and deltas made by the ``before`` version."""
    from common import measure
    folder = CACHE / f"zoo-{size_mb}mb-{tasks}"
    if not (folder / "done").exists():
        shutil.rmtree(folder, ignore_errors=True)
        from sparsestitch.checkpoint.synthetic import write_zoo
        write_zoo(folder, size_mb << 20, tasks)
        (folder / "done").write_text("")
    deltas = {}
    for density in ("0.01", "1.0"):
        paths = [folder / f"task{t}-{density}.delta" for t in range(tasks)]
        for t, path in enumerate(paths):
            if not path.exists():
                measure("versions:job_compress", str(folder / "base"), str(folder / f"task{t}"),
                        str(path), density, sys_path=[str(before), str(BENCH)])
        deltas[density] = paths
    return {"base": folder / "base", "tunes": [folder / f"task{t}" for t in range(tasks)],
            "deltas": deltas}


def jobs_for(tree: Path, inputs: dict, scratch: Path, max_memory: str) -> dict[str, dict]:
    base, tune = str(inputs["base"]), str(inputs["tunes"][0])
    one_percent = ",".join(str(p) for p in inputs["deltas"]["0.01"])
    full = ",".join(str(p) for p in inputs["deltas"]["1.0"][:2])
    specs = {
        "compress 1%": ("job_compress", base, tune, str(scratch / "c1.delta"), "0.01"),
        "compress 5%": ("job_compress", base, tune, str(scratch / "c5.delta"), "0.05"),
        "compress 100%": ("job_compress", base, tune, str(scratch / "c100.delta"), "1.0"),
        "restore 1%": ("job_restore", base, str(inputs["deltas"]["0.01"][0]), str(scratch / "r")),
        "stitch 4x1% localize-stitch": ("job_stitch", base, one_percent, str(scratch / "s1"),
                                        "localize-stitch", max_memory),
        "stitch 4x1% task-arithmetic": ("job_stitch", base, one_percent, str(scratch / "s2"),
                                        "task-arithmetic", max_memory),
        "stitch 2x100% task-arithmetic": ("job_stitch", base, full, str(scratch / "s3"),
                                          "task-arithmetic", max_memory),
    }
    return {name: {"target": f"versions:{fn}", "args": args,
                   "sys_path": [str(tree), str(BENCH)], "preload": ["numpy", "sparsestitch"]}
            for name, (fn, *args) in specs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="source tree of the old version")
    parser.add_argument("--after", default=str(REPO), help="source tree of the new version")
    parser.add_argument("--size-mb", type=int, default=300)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-memory", default="512MiB")
    parser.add_argument("--only", default="", help="comma-separated job names to run")
    parser.add_argument("--json", default=str(BENCH / "results" / "versions.json"))
    args = parser.parse_args(argv)
    before, after = Path(args.before).resolve(), Path(args.after).resolve()
    inputs = prepare(before, args.size_mb, args.tasks)
    scratch = {v: CACHE / f"out-{v}" for v in ("before", "after")}
    for folder in scratch.values():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    jobs = {}
    per_version = {"before": jobs_for(before, inputs, scratch["before"], args.max_memory),
                   "after": jobs_for(after, inputs, scratch["after"], args.max_memory)}
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    for name in per_version["before"]:
        if only and name not in only:
            continue
        for version in ("before", "after"):
            jobs[f"{name} | {version}"] = per_version[version][name]
    started = time.perf_counter()
    results = interleaved(args.repeat, jobs)
    rows = []
    for key in jobs:
        name, version = key.split(" | ")
        if version != "after":
            continue
        old, new = results[f"{name} | before"], results[key]
        rows.append({"job": name, "before_s": old["best_s"], "after_s": new["best_s"],
                     "ratio": new["best_s"] / old["best_s"],
                     "before_rss": old["peak_rss"] / 2**20, "after_rss": new["peak_rss"] / 2**20,
                     "same_bytes": old["result"] == new["result"]})
    print(f"sparsestitch before ({before}) and after ({after}), best of {args.repeat} "
          f"interleaved rounds; {describe_machine(machine())}")
    print(table(rows, [("job", "job", "{}"), ("before_s", "before s", "{:.2f}"),
                       ("after_s", "after s", "{:.2f}"), ("ratio", "after/before", "{:.2f}"),
                       ("before_rss", "before MiB", "{:.0f}"), ("after_rss", "after MiB", "{:.0f}"),
                       ("same_bytes", "same bytes", "{}")]))
    path = write_json(args.json, {
        "command": "python bench/versions.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine(), "seconds": time.perf_counter() - started,
        "before": str(before), "after": str(after), "rows": rows,
        "runs": {k: {"all_s": v["all_s"], "peak_rss": v["peak_rss"]} for k, v in results.items()}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
