"""Zoo jobs on one machine: N fine-tunes of a bf16 model added to a zoo three ways.

* **serial** -- ``zoo.add(..., workers=0)``: every fine-tune in one process, one at a time;
* **local processes** -- ``zoo.add(..., workers=CORES)``: one fresh process per fine-tune;
* **Ray local** -- ``zoo.add(..., ray="auto")``: one Ray task per fine-tune on a local Ray
  instance with CORES CPUs (started once, before the rounds; its start is reported apart).

Each run adds all fine-tunes to a fresh zoo (made by copying an initialised one) at
density 1%, with the page cache emptied of the base and the fine-tunes first
(``posix_fadvise(DONTNEED)``), so that storage reads are real.  Modes run in turn, round
after round (:func:`common.interleaved`), so a drifting machine load hits them alike.

Reported per mode: wall time of the ``add`` call (best and all rounds), bytes fetched from
storage by all workers together (``read_bytes`` of ``/proc/PID/io``: page-cache hits are not
counted) and expressed as how many times the base was fetched, bytes read through read
calls (``rchar``: cache hits included), and the largest peak RSS (``VmHWM``) of a worker.
For scale, the time to read the base and all fine-tunes cold, once, with plain reads.

Usage::

    python bench/zoo.py                          # 299 MB model x 8 fine-tunes, 3 rounds
    python bench/zoo.py --size-mb 100 --tasks 8 --rounds 2

``--size-mb`` is the target given to :func:`sparsestitch.checkpoint.synthetic.write_zoo`, which rounds
up to whole llama layers: 200 gives the 299 MB model of bench/compression.py.

Prints a table and writes ``bench/results/zoo.json``.  Models are generated once into
``bench/.cache/zoo/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import describe_machine, interleaved, machine, table, write_json  # noqa: E402

MODES = ("serial", "local processes", "Ray local")


# ------------------------------------------------------------- jobs run in child processes

def add_job(zoo: str, tunes: list[str], mode: str, cores: int) -> dict:
    """One ``zoo.add`` of every fine-tune; returns its wall time and each worker's figures."""
    from sparsestitch.zoo import add
    ray_target = False
    if mode == "Ray local":
        import ray
        ray.init(address="auto", log_to_driver=False)  # the instance the driver started
        ray_target = "auto"
    started = time.perf_counter()
    results = add(zoo, tunes, workers=0 if mode == "serial" else cores, ray=ray_target,
                  density=0.01)
    seconds = time.perf_counter() - started
    return {"seconds": seconds,
            "members": [{"name": r.name, "status": r.status, "pid": r.pid, "host": r.host,
                         "seconds": r.seconds, "read_bytes": r.read_bytes, "rchar": r.rchar,
                         "peak_rss": r.peak_rss, "size": r.entry["size"]} for r in results]}


def read_job(files: list[str]) -> int:
    """Read files once with plain 8 MiB reads (the storage floor of a cold job)."""
    total, buffer = 0, bytearray(8 << 20)
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while n := handle.readinto(buffer):
                total += n
    return total


# ----------------------------------------------------------------------------- driver

def models(cache: Path, size_mb: int, tasks: int, seed: int = 0) -> tuple[Path, list[Path]]:
    from sparsestitch.checkpoint.synthetic import write_zoo
    folder = cache / f"zoo-{size_mb}mb-{tasks}t-seed{seed}"
    if not (folder / "complete").exists():
        print(f"generating a {size_mb} MB base and {tasks} fine-tunes in {folder} ...", flush=True)
        started = time.perf_counter()
        write_zoo(folder, size_mb * 10**6, tasks, seed=seed, overwrite=True)
        (folder / "complete").write_text("ok\n")
        print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    return folder / "base", [folder / f"task{t}" for t in range(tasks)]


def weight_files(checkpoint: Path) -> list[Path]:
    return sorted(checkpoint.glob("*.safetensors"))


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (clean pages; no privileges needed)."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fresh_zoo(template: Path, work: Path, label: str) -> Path:
    zoo = work / label.replace(" ", "-")
    if zoo.exists():
        shutil.rmtree(zoo)
    shutil.copytree(template, zoo)
    return zoo


def summarise(mode: str, run: dict, base_bytes: int, tune_bytes: int) -> dict:
    members = run["result"]["members"]
    read = sum(m["read_bytes"] for m in members)
    logical = sum(m["rchar"] for m in members)
    return {"mode": mode, "best_s": run["best_s"], "all_s": run["all_s"],
            "median_s": statistics.median(run["all_s"]),
            "per_tune_s": run["best_s"] / len(members),
            "read_gb": read / 1e9, "base_fetches": (read - tune_bytes) / base_bytes,
            "logical_gb": logical / 1e9,
            "logical_per_tune": logical / len(members) / (base_bytes + tune_bytes / len(members)),
            "worker_rss_mib": max(m["peak_rss"] for m in members) / 2**20,
            "job_rss_mib": run["peak_rss"] / 2**20,
            "workers": len({(m["host"], m["pid"]) for m in members}),
            "delta_mb": sum(m["size"] for m in members) / 1e6}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=str(BENCH / "results" / "zoo.json"))
    args = parser.parse_args(argv)
    import ray
    from sparsestitch.zoo import init

    info = machine()
    cores = info["cores"]
    cache = BENCH / ".cache" / "zoo"
    base, tunes = models(cache, args.size_mb, args.tasks)
    files = weight_files(base) + [f for t in tunes for f in weight_files(t)]
    base_bytes = sum(f.stat().st_size for f in weight_files(base))
    tune_bytes = sum(f.stat().st_size for t in tunes for f in weight_files(t))
    work = cache / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    template = work / "template"
    init(template, base)
    started = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - started
    try:
        jobs = {mode: {"target": "zoo:add_job", "sys_path": [str(BENCH)],
                       "preload": ["sparsestitch.zoo", "sparsestitch.ops.compress"],
                       "args": [str(fresh_zoo(template, work, mode)), [str(t) for t in tunes],
                                mode, cores]} for mode in MODES}
        jobs["cold read"] = {"target": "zoo:read_job", "sys_path": [str(BENCH)],
                             "args": [[str(f) for f in files]]}
        for mode, job in jobs.items():
            # every run: an empty zoo, and base and fine-tunes fetched from storage again
            job["before"] = (lambda job=job, mode=mode: (
                mode in MODES and fresh_zoo(template, work, mode), evict(files)))
        runs = interleaved(args.rounds, jobs)
    finally:
        ray.shutdown()
    rows = [summarise(mode, runs[mode], base_bytes, tune_bytes) for mode in MODES]
    floor = runs["cold read"]
    rows.append({"mode": "cold read, once", "best_s": floor["best_s"], "all_s": floor["all_s"],
                 "median_s": statistics.median(floor["all_s"]),
                 "per_tune_s": floor["best_s"] / args.tasks,
                 "read_gb": (base_bytes + tune_bytes) / 1e9, "base_fetches": 1.0})
    results = {"machine": info, "size_mb": args.size_mb, "tasks": args.tasks,
               "rounds": args.rounds, "base_bytes": base_bytes, "tune_bytes": tune_bytes,
               "ray_start_s": ray_start_s, "density": 0.01, "rows": rows,
               "raw": {mode: runs[mode]["result"] for mode in MODES}}
    print(report(results))
    write_json(args.json, results)
    print(f"wrote {args.json}")
    return results


def report(results: dict) -> str:
    columns = [("mode", "mode", "{}"), ("best_s", "wall s (best)", "{:.2f}"),
               ("median_s", "median s", "{:.2f}"), ("per_tune_s", "s / fine-tune", "{:.2f}"),
               ("read_gb", "storage GB", "{:.2f}"), ("base_fetches", "base fetched x", "{:.2f}"),
               ("logical_gb", "read() GB", "{:.1f}"), ("worker_rss_mib", "worker RSS MiB", "{:.0f}"),
               ("workers", "workers", "{}")]
    head = (f"{results['tasks']} fine-tunes of a {results['base_bytes'] / 1e6:.0f} MB bf16 model "
            f"(synthetic), density 1%, {results['rounds']} interleaved rounds; page cache emptied "
            f"of the models before every run; Ray local start {results['ray_start_s']:.1f} s "
            f"(not counted)\n{describe_machine(results['machine'])}\n")
    return head + table(results["rows"], columns)


if __name__ == "__main__":
    main()
