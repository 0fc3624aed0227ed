"""Merging full fine-tunes: ``sparsestitch merge`` against mergekit and the I/O floor, and the
dense delta path (compress at density 1.0, stitch of full deltas) against theirs.

Inputs (cached in ``bench/.cache/stitch/``, shared with bench/stitch.py): a synthetic
Llama-shaped bf16 base of ``--size-gb`` (sharded HF folder with a complete LlamaConfig, so
mergekit plans it as a real architecture) and ``--n`` full fine-tunes of it.

Measured, in interleaved rounds (every run in its own process, after ``os.sync()`` and a
read of all its inputs so the page cache is warm; best round shown, all rounds listed):

* floors: read the base and the fine-tunes and write one model (fsync); read base and one
  fine-tune and write a delta-sized file (fsync); read base and the full deltas and write
  one model (fsync);
* mergekit ``task_arithmetic`` (default options, and ``--out-shard-size 1e9``) and
  ``ties`` (density 0.5), in mergekit's own venv (bench/requirements-stitch-peer.txt);
* ``sparsestitch.merge``: task-arithmetic and ties-mergekit (the same outputs as mergekit's:
  compared element by element), and Localize-and-Stitch at 1% straight from the fine-tunes;
* ``sparsestitch.compress`` of one fine-tune at density 1.0 (lossless), and
  ``sparsestitch.stitch`` task-arithmetic of the ``--n`` full deltas.

Usage::

    python bench/merge_peer.py                       # 1.5 GB x 4 fine-tunes, 2 rounds
    python bench/merge_peer.py --quick               # 0.2 GB x 2, 1 round (smoke test)

Prints tables; writes ``bench/results/merge_peer.json`` (``--json``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import stitch as stitch_bench  # noqa: E402
import stitch_synth as synth  # noqa: E402
from common import describe_machine, machine, table, write_json  # noqa: E402
from stitch import (Config, compare_outputs, mergekit_python, mergekit_versions,  # noqa: E402
                    prepare_peer, run_rounds, size_folder)
from stitch_runs import remove  # noqa: E402

import sparsestitch  # noqa: E402

COLUMNS = [("what", "run", "{}"), ("seconds", "best s", "{:.2f}"),
           ("all_seconds", "all rounds s", "{}"), ("cpu_seconds", "CPU s", "{:.2f}"),
           ("x_mergekit", "÷ mergekit best", "{}"), ("x_floor", "÷ its floor", "{}"),
           ("peak_rss_mib", "peak RSS MiB", "{:.0f}"), ("agreement", "vs mergekit", "{}")]


def run_config(key: str, what: str, target: str, args: tuple, inputs: list, out: Path,
               **row) -> Config:
    return Config(key, dict(row, what=what), inputs, out, target, args)


def mergekit_config(key: str, what: str, base: str, tunes: list[str], out: Path,
                    extra: list[str]) -> Config:
    argv = [str(mergekit_python()), str(BENCH / "stitch_mergekit_peer.py"), base, *tunes,
            "--out", str(out), *extra]
    return Config(key, {"what": what, "peer": True}, [base, *tunes], out, argv=argv)


def full_deltas(base: str, tunes: list[str], folder: Path) -> tuple[list[str], list[int]]:
    """Each fine-tune's lossless delta (made once by sparsestitch.compress, cached)."""
    paths = [folder / f"{Path(t).name}.lossless.delta" for t in tunes]
    missing = [(t, p) for t, p in zip(tunes, paths) if not p.is_file()]
    if missing:
        print(f"  compressing {len(missing)} fine-tune(s) losslessly ...", flush=True)
        sparsestitch.compress(base, [t for t, _ in missing], [p for _, p in missing],
                              lossless=True, overwrite=True)
    return [str(p) for p in paths], [p.stat().st_size for p in paths]


def build_configs(base: str, tunes: list[str], deltas: list[str], delta_bytes: list[int],
                  work: Path, max_memory: str, with_mergekit: bool) -> list[Config]:
    n = len(tunes)
    configs = [
        run_config("floor merge", f"floor: read base + {n} fine-tunes, write one model (fsync)",
                   "stitch_runs:floor_merge", (base, tunes, str(work / "floor")), [base, *tunes],
                   work / "floor", kind="floor", floor="merge"),
        run_config("floor compress", "floor: read base + 1 fine-tune, write its delta (fsync)",
                   "stitch_runs:floor_compress",
                   (base, tunes[0], delta_bytes[0], str(work / "floor.delta")),
                   [base, tunes[0]], work / "floor.delta", kind="floor", floor="compress"),
        run_config("floor stitch", f"floor: read base + {n} full deltas, write one model (fsync)",
                   "stitch_runs:floor_merge", (base, deltas, str(work / "floor-s")),
                   [base, *deltas], work / "floor-s", kind="floor", floor="stitch"),
    ]
    if with_mergekit:
        configs += [
            mergekit_config("mergekit ta", f"mergekit task_arithmetic, {n} fine-tunes", base,
                            tunes, work / "mk-ta", []),
            mergekit_config("mergekit ta 1B", "mergekit task_arithmetic --out-shard-size 1e9",
                            base, tunes, work / "mk-ta-1b", ["--out-shard-size", "1e9"]),
            mergekit_config("mergekit ties", "mergekit ties, density 0.5", base, tunes,
                            work / "mk-ties", ["--method", "ties", "--density", "0.5"]),
            mergekit_config("mergekit dare_ties", "mergekit dare_ties, density 0.5", base, tunes,
                            work / "mk-dare", ["--method", "dare_ties", "--density", "0.5"]),
            mergekit_config("mergekit breadcrumbs", "mergekit breadcrumbs, density 0.5", base,
                            tunes, work / "mk-bc", ["--method", "breadcrumbs", "--density",
                                                    "0.5"]),
        ]
    configs += [
        run_config("merge ta", f"sparsestitch merge task-arithmetic, {n} fine-tunes",
                   "stitch_runs:merge_run", (base, tunes, str(work / "st-ta"), "task-arithmetic",
                                             {}, max_memory), [base, *tunes], work / "st-ta",
                   floor="merge", same_as="mergekit ta"),
        run_config("merge ties", "sparsestitch merge ties-mergekit, density 0.5",
                   "stitch_runs:merge_run", (base, tunes, str(work / "st-ties"), "ties-mergekit",
                                             {"density": 0.5}, max_memory), [base, *tunes],
                   work / "st-ties", floor="merge", same_as="mergekit ties"),
        run_config("merge dare_ties", "sparsestitch merge dare-ties-mergekit, density 0.5 "
                   "(random drops: not mergekit's bits)", "stitch_runs:merge_run",
                   (base, tunes, str(work / "st-dare"), "dare-ties-mergekit", {"density": 0.5},
                    max_memory), [base, *tunes], work / "st-dare", floor="merge"),
        run_config("merge breadcrumbs", "sparsestitch merge breadcrumbs-mergekit, density 0.5",
                   "stitch_runs:merge_run", (base, tunes, str(work / "st-bc"),
                                             "breadcrumbs-mergekit", {"density": 0.5},
                                             max_memory), [base, *tunes], work / "st-bc",
                   floor="merge", same_as="mergekit breadcrumbs"),
        run_config("merge ls", "sparsestitch merge localize-stitch, keep 1%",
                   "stitch_runs:merge_run", (base, tunes, str(work / "st-ls"), "localize-stitch",
                                             {"keep": 0.01}, max_memory), [base, *tunes],
                   work / "st-ls", floor="merge"),
        run_config("compress lossless", "sparsestitch compress --lossless, 1 fine-tune",
                   "stitch_runs:compress_run", (base, tunes[0], str(work / "c.delta"),
                                                {"lossless": True, "max_memory": max_memory, "overwrite": True}),
                   [base, tunes[0]], work / "c.delta", floor="compress"),
        run_config("compress lossless all", f"sparsestitch compress --lossless, {n} fine-tunes "
                   "in one run", "stitch_runs:compress_run",
                   (base, tunes, [str(work / f"c{i}.delta") for i in range(n)],
                    {"lossless": True, "max_memory": max_memory, "overwrite": True}),
                   [base, *tunes], work / "c0.delta"),
        run_config("stitch full", f"sparsestitch stitch task-arithmetic, {n} full deltas",
                   "stitch_runs:stitch_run", (base, deltas, str(work / "st-full"),
                                              "task-arithmetic", max_memory),
                   [base, *deltas], work / "st-full", floor="stitch"),
    ]
    return configs


def summarize(configs: list[Config], base: str) -> tuple[list[dict], dict]:
    rows = {c.key: c.summary() for c in configs}
    peers = [r for r in rows.values() if r.get("peer")]
    best_peer = min(peers, key=lambda r: r["seconds"]) if peers else None
    agreement = {}
    for config in configs:
        row = rows[config.key]
        floor = row.get("floor")
        if row.get("kind") != "floor" and floor:
            row["x_floor"] = f"{row['seconds'] / rows['floor ' + floor]['seconds']:.2f}"
        if best_peer is not None:
            row["x_mergekit"] = f"{row['seconds'] / best_peer['seconds']:.2f}"
            row["x_mergekit_rss"] = row["peak_rss"] / best_peer["peak_rss"]
        same = row.get("same_as")
        if same and same in rows:
            compared = compare_outputs(next(c for c in configs if c.key == same).out,
                                       config.out, Path(base))
            agreement[config.key] = compared
            row["agreement"] = ("bit-identical" if compared["fraction_differing"] == 0 else
                                f"{compared['fraction_differing']:.2e} differ")
    return list(rows.values()), agreement


def goals(rows: list[dict]) -> list[dict]:
    by = {r["key"]: r for r in rows}
    peers = [r for r in rows if r.get("peer")]
    result = []

    def goal(name, value, limit, holds):
        result.append({"goal": name, "value": round(value, 3), "limit": limit,
                       "met": bool(holds)})
    if peers and "merge ta" in by:
        best = min(peers, key=lambda r: r["seconds"])
        ratio = best["seconds"] / by["merge ta"]["seconds"]
        goal("merge TA: x faster than mergekit's best", ratio, ">= 2", ratio >= 2)
        rss = by["merge ta"]["peak_rss"] / min(p["peak_rss"] for p in peers)
        goal("merge TA: peak RSS / mergekit's smallest", rss, "<= 0.25", rss <= 0.25)
    for ours, theirs in (("merge ties", "mergekit ties"), ("merge dare_ties", "mergekit dare_ties"),
                         ("merge breadcrumbs", "mergekit breadcrumbs")):
        if ours in by and theirs in by:  # issue 23: 3x faster at a quarter of the memory
            speed = by[theirs]["seconds"] / by[ours]["seconds"]
            goal(f"{ours}: x faster than {theirs}", speed, ">= 3", speed >= 3)
            rss = by[ours]["peak_rss"] / by[theirs]["peak_rss"]
            goal(f"{ours}: peak RSS / {theirs}'s", rss, "<= 0.25", rss <= 0.25)
    checks = [("merge ta", "merge", 1.5, "merge TA: x I/O floor"),
              ("merge ls", "merge", 2.0, "merge localize-stitch 1%: x I/O floor"),
              ("compress lossless", "compress", 2.0, "compress density 1.0: x its floor"),
              ("stitch full", "stitch", 1.5, "stitch of full deltas: x its floor")]
    for key, floor, limit, name in checks:
        if key in by:
            ratio = by[key]["seconds"] / by["floor " + floor]["seconds"]
            goal(name, ratio, f"<= {limit}", ratio <= limit)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.5)
    parser.add_argument("--n", type=int, default=4, help="fine-tunes merged")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--max-memory", default="1GiB")
    parser.add_argument("--jobs", type=int, default=2, help="processes preparing inputs")
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--skip", default="", help="comma-separated runs to leave out, e.g. "
                        "'mergekit ties,merge ties'")
    parser.add_argument("--quick", action="store_true", help="0.2 GB, 2 fine-tunes, 1 round")
    parser.add_argument("--json", default=str(BENCH / "results" / "merge_peer.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.size_gb, args.n, args.repeat = 0.2, 2, 1
    started = time.perf_counter()
    folder = size_folder(args.size_gb)
    folder.mkdir(parents=True, exist_ok=True)
    base = str(synth.make_base(folder, int(args.size_gb * 1e9)))
    inputs = prepare_peer({"size_gb": args.size_gb, "base": base}, args.n, args.jobs, False)
    tunes = inputs["tunes"]
    skipped = {key.strip() for key in args.skip.split(",") if key.strip()}
    if {"floor compress", "floor stitch", "stitch full"} <= skipped:  # no run reads them
        deltas, delta_bytes = [""] * len(tunes), [0] * len(tunes)
    else:
        deltas, delta_bytes = full_deltas(base, tunes, folder)
    work = folder / "work-merge"
    work.mkdir(exist_ok=True)
    with_mergekit = not args.no_mergekit and mergekit_python().is_file()
    configs = build_configs(base, tunes, deltas, delta_bytes, work, args.max_memory,
                            with_mergekit)
    configs = [c for c in configs if c.key not in skipped]
    run_rounds(configs, args.repeat, keep_last=True)
    rows, agreement = summarize(configs, base)
    for config in configs:
        remove(config.out)
    info = machine()
    results = {"command": " ".join(["python", "bench/merge_peer.py", *(argv or sys.argv[1:])]),
               "machine": info, "source": stitch_bench.code_source(),
               "size_gb": args.size_gb, "n": args.n, "max_memory": args.max_memory,
               "inputs": inputs, "full_delta_bytes": delta_bytes,
               "mergekit": mergekit_versions() if with_mergekit else None,
               "rows": rows, "agreement": agreement, "goals": goals(rows),
               "seconds": time.perf_counter() - started}
    print(f"\n{args.n} fine-tunes of a {args.size_gb:g} GB bf16 Llama-shaped model; "
          f"{describe_machine(info)}")
    print(table(rows, COLUMNS))
    print(table(results["goals"], [("goal", "goal", "{}"), ("value", "value", "{}"),
                                   ("limit", "goal", "{}"), ("met", "met", "{}")]))
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
