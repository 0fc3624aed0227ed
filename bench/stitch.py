"""Stitch speed and memory: sparsestitch against the I/O floor, and against mergekit.

CPU section, for each ``--size-gb`` (a synthetic llama-shaped bf16 model, sharded HF folder,
from :func:`sparsestitch.checkpoint.synthetic.write_zoo`) and each N of ``--deltas``: the wall time of
``sparsestitch.stitch`` (rules localize-stitch and task-arithmetic) with ``--max-memory``,
each run in its own process with its peak RSS, against I/O floors measured in the same run:
``safetensors.torch.load_file`` + ``save_file`` of the base, and a streaming per-tensor
read + write, each with and without fsync (sparsestitch's writer fsyncs every shard).  The
deltas are written directly with the library's writer from synthetic task vectors (exact
global top-``--density`` of |tau|; see bench/stitch_synth.py), not by ``compress``.

A cProfile run (largest N, localize-stitch, smallest size by default) shows where the stitch
time goes.  Peak RSS is each child's own ``VmHWM``.

Peer section: the same task-arithmetic merge of ``--peer-deltas`` full fine-tunes with
mergekit (in its own venv, see bench/requirements-stitch-peer.txt), beside sparsestitch
stitching their 1% deltas (at ``--peer-size-gb``, default the largest size) and, at the
small ``--peer-full-size-gb``, also their density-1.0 deltas (made by
``sparsestitch.compress``; kept small, see docs/results-stitch.md); outputs are compared
tensor by tensor.

GPU section: when CUDA is present, the floors quoted in the issue (index_add of 70M bf16,
210 MB pinned host->device, prefix sum of 70M gaps), hot-swap apply + revert if
``sparsestitch.apply`` exists, and a ``--gpu-size-gb`` model with ``--gpu-deltas`` deltas
against the same floors; otherwise it prints "GPU section skipped: no CUDA device".

Every timed run starts after ``os.sync()`` (no writeback left from the previous run) and a
warm-up that reads all of its inputs, so every configuration sees a warm page cache.  Runs
are interleaved round by round (``--repeat`` rounds) so slow phases of a shared machine hit
every configuration alike; tables show the best round.

Usage::

    python bench/stitch.py --quick      # smoke test: 30 s to 1 min on 2 shared cores
    python bench/stitch.py --size-gb 0.5,2 --deltas 1,4,16 --max-memory 512MiB

Inputs are generated once into ``bench/.cache/stitch/`` (git-ignored) and reused.
Prints tables; writes ``bench/results/stitch.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shlex
import subprocess
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import stitch_synth as synth  # noqa: E402
from common import describe_machine, machine, measure, table, write_json  # noqa: E402
from stitch_runs import remove  # noqa: E402

import sparsestitch  # noqa: E402
from sparsestitch.checkpoint import Checkpoint  # noqa: E402
from sparsestitch.core.dtypes import dtype as lookup_dtype, to_wide  # noqa: E402

CACHE = BENCH / ".cache" / "stitch"
MERGEKIT_VENV = CACHE / "mergekit-venv"
RULES = ("localize-stitch", "task-arithmetic")
GOAL_RATIO = 1.3
MIB = 1 << 20


def parse_bytes(text: str) -> int:
    """``512MiB`` / ``1GiB`` / ``2e9`` -> bytes (the units ``sparsestitch stitch`` accepts)."""
    text = text.strip()
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("GB", 10**9),
                         ("MB", 10**6), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * factor)
    return int(float(text))


# ------------------------------------------------------------------------------- inputs

def size_folder(size_gb: float) -> Path:
    return CACHE / f"llama-{size_gb:g}gb-v{synth.GENERATOR_VERSION}"


def _write_delta_job(job: tuple) -> dict:
    base, out, task, density = job
    info = synth.write_delta(Path(base), Path(out), task, density)
    Path(out).with_suffix(".json").write_text(json.dumps(info, indent=1))
    return info


def _write_finetune_job(job: tuple) -> dict:
    base, out, task = job
    info = synth.write_finetune(Path(base), Path(out), task)
    Path(str(out) + ".json").write_text(json.dumps(info, indent=1))
    return info


def _pool_map(function, jobs: list, processes: int) -> list:
    if not jobs:
        return []
    if processes <= 1 or len(jobs) == 1:
        return [function(job) for job in jobs]
    with get_context("fork").Pool(min(processes, len(jobs))) as pool:
        return pool.map(function, jobs, chunksize=1)


def prepare_model(size_gb: float, tasks: int, density: float, jobs: int) -> dict:
    """Base model and ``tasks`` sparse deltas for one size (cached); their description."""
    folder = size_folder(size_gb)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = synth.make_base(folder, int(size_gb * 1e9))
    deltas = [folder / f"delta-d{density:g}-task{t:02d}.delta" for t in range(tasks)]
    todo = [(str(base), str(p), t, density) for t, p in enumerate(deltas)
            if not p.with_suffix(".json").is_file()]
    if todo:
        print(f"  writing {len(todo)} synthetic delta(s) of the {size_gb:g} GB model ...",
              flush=True)
        _pool_map(_write_delta_job, todo, jobs)
        for _, path, _, _ in todo:
            sparsestitch.verify(path, base=base)  # the library's own full check
    infos = [json.loads(p.with_suffix(".json").read_text()) for p in deltas]
    stats = synth.base_stats(folder)
    return {"size_gb": size_gb, "density": density, "base": str(base), "base_bytes": stats["nbytes"],
            "base_params": stats["numel"], "base_seconds": stats["seconds"],
            "shards": len(list(base.glob("*.safetensors"))),
            "tensors": len(stats["tensors"]), "deltas": [str(p) for p in deltas],
            "delta_bytes": [i["bytes"] for i in infos], "delta_kept": [i["kept"] for i in infos],
            "delta_seconds": [i["seconds"] for i in infos],
            "prepare_seconds_this_run": time.perf_counter() - started}


def prepare_peer(model: dict, tasks: int, jobs: int, full: bool) -> dict:
    """Full fine-tunes 0..tasks-1 and (with ``full``) their density-1.0 deltas made by
    ``sparsestitch.compress``, cached."""
    folder = size_folder(model["size_gb"])
    base = Path(model["base"])
    tunes = [folder / f"ft-task{t:02d}" for t in range(tasks)]
    todo = [(str(base), str(p), t) for t, p in enumerate(tunes)
            if not Path(str(p) + ".json").is_file()]
    if todo:
        print(f"  writing {len(todo)} full synthetic fine-tune(s) ...", flush=True)
        _pool_map(_write_finetune_job, todo, jobs)
    made = {"tunes": [str(p) for p in tunes],
            "tune_bytes": [synth.folder_bytes(p) for p in tunes]}
    if not full:
        return made
    full = [folder / f"delta-d1-task{t:02d}.delta" for t in range(tasks)]
    manifest = folder / f"delta-d1-n{tasks}.json"
    if not manifest.is_file():
        print(f"  compressing {tasks} fine-tune(s) at density 1.0 with sparsestitch.compress ...",
              flush=True)
        started = time.perf_counter()
        summaries = sparsestitch.compress(base, tunes, full, density=1.0, overwrite=True)
        manifest.write_text(json.dumps({"seconds": time.perf_counter() - started,
                                        "bytes": [s.nbytes for s in summaries]}))
    compressed = json.loads(manifest.read_text())
    return dict(made, full_deltas=[str(p) for p in full], full_delta_bytes=compressed["bytes"],
                full_compress_seconds=compressed["seconds"])


# ----------------------------------------------------------------------- measured runs

def warm(paths) -> None:
    """Read every file under ``paths`` once so the run that follows sees a warm page cache."""
    for path in paths:
        path = Path(path)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            with open(file, "rb", buffering=0) as handle:
                while handle.readinto(_WARM_BUFFER):
                    pass


_WARM_BUFFER = bytearray(16 << 20)


def measure_command(argv: list[str]) -> dict:
    """Run a command (another interpreter) and return its peak RSS and reported result.

    ``common.measure`` runs functions under this interpreter only; mergekit lives in its own
    venv, so its runs are launched here.  The command prints one JSON line starting with
    ``@@result`` holding ``seconds`` and its own ``peak_rss`` (VmHWM).
    """
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = proc.stdout.read()
    finally:
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    lines = [line for line in output.splitlines() if line.startswith("@@result ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{shlex.join(argv)} failed (exit {proc.returncode}):\n{output[-4000:]}")
    report = json.loads(lines[-1][len("@@result "):])
    return {"seconds": report["seconds"], "cpu_seconds": report["cpu_seconds"],
            "process_seconds": wall,
            "peak_rss": report["peak_rss"], "wait4_maxrss": usage.ru_maxrss * 1024,
            "start_rss": report.get("start_rss"), "result": report}


class Config:
    """One measured configuration: what to run, which files it reads, where it writes."""

    def __init__(self, key: str, row: dict, inputs: list, out: Path, target: str | None = None,
                 args: tuple = (), argv: list[str] | None = None):
        self.key, self.row, self.inputs, self.out = key, row, inputs, out
        self.target, self.args, self.argv = target, args, argv
        self.runs: list[dict] = []

    def run_once(self, keep: bool = False) -> dict:
        remove(self.out)
        os.sync()
        warm(self.inputs)
        started = time.perf_counter()
        if self.argv is not None:
            result = measure_command(self.argv)
        else:
            m = measure(self.target, *self.args, sys_path=[str(BENCH)])
            # The child's own VmHWM: common.measure's wait4 ru_maxrss (kept for reference)
            # is at least this parent's RSS at spawn time (see stitch_runs.peak_rss).
            result = {"seconds": m.seconds, "cpu_seconds": m.result["cpu_seconds"],
                      "peak_rss": m.result["peak_rss"],
                      "wait4_maxrss": m.peak_rss, "start_rss": m.start_rss, "result": m.result}
            result["process_seconds"] = time.perf_counter() - started
        if not keep:
            remove(self.out)
        self.runs.append(result)
        return result

    def summary(self) -> dict:
        best = min(self.runs, key=lambda r: r["seconds"])
        return dict(self.row, key=self.key, seconds=best["seconds"],
                    all_seconds=", ".join(f"{r['seconds']:.2f}" for r in self.runs),
                    cpu_seconds=min(r["cpu_seconds"] for r in self.runs),
                    process_seconds=best["process_seconds"],
                    peak_rss=max(r["peak_rss"] for r in self.runs),
                    peak_rss_mib=max(r["peak_rss"] for r in self.runs) / MIB,
                    wait4_maxrss_mib=max(r["wait4_maxrss"] for r in self.runs) / MIB,
                    start_rss_mib=(best["start_rss"] or 0) / MIB)


def run_rounds(configs: list[Config], repeat: int, keep_last: bool = False) -> None:
    """Run every configuration ``repeat`` times, interleaved; ``keep_last`` keeps the outputs
    of each configuration's last run."""
    for round_index in range(repeat):
        for config in configs:
            result = config.run_once(keep=keep_last and round_index == repeat - 1)
            print(f"    round {round_index + 1}/{repeat}  {config.key:<44} "
                  f"{result['seconds']:8.2f} s  CPU {result['cpu_seconds']:8.2f} s  "
                  f"peak RSS {result['peak_rss'] / MIB:7.0f} MiB",
                  flush=True)


def floor_configs(base: str, work: Path) -> list[Config]:
    configs = []
    for fsync in (False, True):
        suffix = " + fsync" if fsync else ""
        configs.append(Config(f"floor load_file+save_file{suffix}",
                              {"what": f"floor: load_file + save_file{suffix}", "kind": "floor",
                               "floor": "load_save", "fsync": fsync}, [base],
                              work / "floor-load-save", "stitch_floor_torch:load_save",
                              (base, str(work / "floor-load-save"), fsync)))
        configs.append(Config(f"floor stream read+write{suffix}",
                              {"what": f"floor: per-tensor read + write{suffix}", "kind": "floor",
                               "floor": "stream", "fsync": fsync}, [base],
                              work / "floor-stream", "stitch_runs:floor_stream",
                              (base, str(work / "floor-stream"), fsync)))
    return configs


def stitch_config(key: str, what: str, base: str, deltas: list[str], out: Path, rule: str,
                  max_memory: str, device: str = "cpu", native: bool = True, **row) -> Config:
    """A ``sparsestitch.stitch`` run (``native=False``: with ``SPARSESTITCH_NATIVE=0``)."""
    return Config(key, dict(row, what=what, kind="stitch", n=len(deltas), rule=rule,
                            native=native),
                  [base, *deltas], out, "stitch_runs:stitch_run",
                  (base, deltas, str(out), rule, max_memory, device, native))


def add_ratios(rows: list[dict]) -> dict:
    floors = {(r["floor"], r["fsync"]): r["seconds"] for r in rows if r["kind"] == "floor"}
    for row in rows:
        row["x_load_save"] = row["seconds"] / floors[("load_save", False)]
        row["x_load_save_fsync"] = row["seconds"] / floors[("load_save", True)]
        row["x_stream_fsync"] = row["seconds"] / floors[("stream", True)]
    return floors


CPU_COLUMNS = [("what", "run", "{}"), ("n", "N", "{}"), ("seconds", "best s", "{:.2f}"),
               ("all_seconds", "all rounds s", "{}"), ("cpu_seconds", "CPU s", "{:.2f}"),
               ("x_load_save", "x load+save", "{:.2f}"),
               ("x_load_save_fsync", "x load+save+fsync", "{:.2f}"),
               ("x_stream_fsync", "x stream+fsync", "{:.2f}"),
               ("peak_rss_mib", "peak RSS MiB", "{:.0f}")]


def cpu_section(model: dict, ns: list[int], max_memory: str, repeat: int,
                device: str = "cpu") -> dict:
    base = model["base"]
    work = size_folder(model["size_gb"]) / "work"
    work.mkdir(exist_ok=True)
    out = work / "stitched"
    configs = floor_configs(base, work)
    configs.append(stitch_config("stitch N=0", "sparsestitch, no deltas (read, hash, write)",
                                 base, [], out, "localize-stitch", max_memory, device=device))
    for n in ns:
        for rule in RULES:
            configs.append(stitch_config(f"stitch N={n} {rule}", f"sparsestitch {rule}", base,
                                         model["deltas"][:n], out, rule, max_memory,
                                         device=device))
    # The same code without its C loops, in the same rounds: what they are worth here.
    configs.append(stitch_config(f"stitch N={max(ns)} numpy only", "sparsestitch localize-stitch, "
                                 "numpy only (SPARSESTITCH_NATIVE=0)", base,
                                 model["deltas"][:max(ns)], out, "localize-stitch", max_memory,
                                 device=device, native=False))
    run_rounds(configs, repeat)
    rows = [c.summary() for c in configs]
    add_ratios(rows)
    return {"model": model, "rows": rows}


def profile_section(model: dict, n: int, max_memory: str, top: int = 25) -> dict:
    work = size_folder(model["size_gb"]) / "work"
    out = work / "profiled"
    stats_path = work / f"stitch-n{n}.prof"
    remove(out)
    os.sync()
    warm([model["base"], *model["deltas"][:n]])
    m = measure("stitch_runs:profile_stitch", model["base"], model["deltas"][:n], str(out),
                "localize-stitch", max_memory, str(stats_path), sys_path=[str(BENCH)])
    remove(out)
    stats = pstats.Stats(str(stats_path))
    total = stats.total_tt
    entries = []
    for (file, line, function), (_, calls, own, cumulative, _) in stats.stats.items():
        short = file.split("/site-packages/")[-1].split("/main/")[-1]
        entries.append({"function": f"{short}:{line}({function})", "calls": calls,
                        "own_s": own, "cumulative_s": cumulative,
                        "own_pct": 100 * own / total if total else 0.0})
    by_own = sorted(entries, key=lambda e: -e["own_s"])[:top]
    by_cumulative = sorted((e for e in entries if "sparsestitch/" in e["function"]),
                           key=lambda e: -e["cumulative_s"])[:top]
    return {"n": n, "rule": "localize-stitch", "profiled_seconds": m.seconds,
            "profile_total_s": total, "by_own_time": by_own,
            "sparsestitch_by_cumulative": by_cumulative}


PROFILE_COLUMNS = [("function", "function", "{}"), ("calls", "calls", "{}"),
                   ("own_s", "own s", "{:.2f}"), ("own_pct", "own %", "{:.1f}"),
                   ("cumulative_s", "cumulative s", "{:.2f}")]


# ------------------------------------------------------------------------------- peer

def mergekit_python() -> Path:
    return MERGEKIT_VENV / "bin" / "python"


def mergekit_versions() -> dict:
    code = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
            "('mergekit', 'torch', 'transformers', 'safetensors', 'accelerate', 'pydantic', "
            "'numpy')}))")
    out = subprocess.run([str(mergekit_python()), "-c", code], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def compare_outputs(reference: Path, other: Path, base: Path) -> dict:
    """Per-tensor agreement of two merged checkpoints (bits read with sparsestitch's reader)."""
    per_tensor = []
    with Checkpoint(reference) as a, Checkpoint(other) as b, Checkpoint(base) as c:
        missing = sorted(set(a.names) ^ set(b.names))
        for name in a.names:
            if name not in b:
                continue
            dt = lookup_dtype(a.entry(name).dtype)
            x, y = a.read(name), b.read(name)
            if b.entry(name).dtype != a.entry(name).dtype:
                per_tensor.append({"name": name, "dtype_differs": True})
                continue
            wide_x, wide_y = to_wide(x, dt), to_wide(y, dt)
            update = np.abs(wide_x - to_wide(c.read(name), dt))
            diff = np.abs(wide_x - wide_y)
            per_tensor.append({"name": name, "numel": int(x.size),
                               "max_abs_diff": float(diff.max()) if diff.size else 0.0,
                               "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
                               "differing": int(np.count_nonzero(x != y)),
                               "max_abs_update": float(update.max()) if update.size else 0.0})
    numel = sum(t.get("numel", 0) for t in per_tensor)
    differing = sum(t.get("differing", 0) for t in per_tensor)
    worst = max(per_tensor, key=lambda t: t.get("max_abs_diff", 0.0))
    return {"tensors": len(per_tensor), "names_only_in_one": missing,
            "max_abs_diff": worst.get("max_abs_diff", 0.0), "worst_tensor": worst["name"],
            "worst_tensor_max_abs_update": worst.get("max_abs_update"),
            "mean_abs_diff": sum(t.get("mean_abs_diff", 0.0) * t.get("numel", 0)
                                 for t in per_tensor) / max(1, numel),
            "tensors_differing": sum(1 for t in per_tensor if t.get("differing")),
            "elements_differing": differing, "elements": numel,
            "fraction_differing": differing / max(1, numel),
            "max_abs_update": max(t.get("max_abs_update", 0.0) for t in per_tensor),
            "per_tensor": per_tensor}


def peer_section(model: dict, n: int, repeat: int, max_memory: str, jobs: int,
                 full: bool) -> dict:
    """mergekit task arithmetic of ``n`` full fine-tunes beside sparsestitch stitching their
    1% deltas and, with ``full``, their density-1.0 deltas; outputs compared."""
    if not mergekit_python().is_file():
        return {"skipped": f"no mergekit venv at {MERGEKIT_VENV}; create it with: "
                           f"python -m venv {MERGEKIT_VENV} && {MERGEKIT_VENV}/bin/pip install "
                           "torch==2.13.0 && "
                           f"{MERGEKIT_VENV}/bin/pip install -r bench/requirements-stitch-peer.txt"}
    versions = mergekit_versions()
    inputs = prepare_peer(model, n, jobs, full)
    base = model["base"]
    work = size_folder(model["size_gb"]) / "work"
    work.mkdir(exist_ok=True)
    mk_out = work / "peer-mergekit"
    argv = [str(mergekit_python()), str(BENCH / "stitch_mergekit_peer.py"), base,
            *inputs["tunes"], "--out", str(mk_out)]
    configs = [Config("mergekit task_arithmetic",
                      {"what": f"mergekit task_arithmetic, {n} full fine-tunes",
                       "input_bytes": sum(inputs["tune_bytes"])},
                      [base, *inputs["tunes"]], mk_out, argv=argv),
               stitch_config("sparsestitch 1% deltas", f"sparsestitch task-arithmetic, {n} x "
                             f"{model['density']:g} deltas", base, model["deltas"][:n],
                             work / "peer-st-sparse", "task-arithmetic", max_memory,
                             input_bytes=sum(model["delta_bytes"][:n]))]
    if full:
        configs.append(stitch_config(
            "sparsestitch density-1.0 deltas", f"sparsestitch task-arithmetic, {n} x "
            "density-1.0 deltas", base, inputs["full_deltas"], work / "peer-st-full",
            "task-arithmetic", max_memory, input_bytes=sum(inputs["full_delta_bytes"])))
    run_rounds(configs, repeat, keep_last=True)
    rows = [c.summary() for c in configs]
    print("  comparing outputs ...", flush=True)
    agreement = {}
    for config, row in zip(configs[1:], rows[1:]):
        compared = compare_outputs(mk_out, config.out, Path(base))
        agreement[config.key] = compared
        row["max_abs_diff_vs_mergekit"] = compared["max_abs_diff"]
        row["fraction_differing"] = compared["fraction_differing"]
    for row in rows:
        row["input_gb"] = row["input_bytes"] / 1e9
        row["x_mergekit"] = row["seconds"] / rows[0]["seconds"]
    for config in configs:
        remove(config.out)
    return {"n": n, "size_gb": model["size_gb"], "base_bytes": model["base_bytes"],
            "versions": versions, "inputs": inputs, "rows": rows, "agreement": agreement,
            "mergekit_argv": argv,
            "mergekit_config": configs[0].runs[-1]["result"]["config"]}


PEER_COLUMNS = [("what", "run", "{}"), ("input_gb", "input GB", "{:.2f}"),
                ("seconds", "best s", "{:.2f}"), ("all_seconds", "all rounds s", "{}"),
                ("cpu_seconds", "CPU s", "{:.2f}"),
                ("process_seconds", "process s", "{:.2f}"), ("x_mergekit", "x mergekit", "{:.2f}"),
                ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
                ("max_abs_diff_vs_mergekit", "max |diff| vs mergekit", "{:.3g}"),
                ("fraction_differing", "elements differing", "{:.2e}")]


# -------------------------------------------------------------------------------- GPU

HOT_SWAP_COLUMNS = [("way", "way", "{}"), ("apply_ms_best", "apply ms (best)", "{:.1f}"),
                    ("apply_ms_median", "apply ms (median)", "{:.1f}"),
                    ("revert_ms_best", "revert ms (best)", "{:.1f}"),
                    ("prepare_s", "prepare s", "{}"), ("x_prepared", "× prepared apply", "{:.1f}")]


def hot_swap_cpu_section(model: dict, repeat: int) -> dict:
    """``apply`` from the delta file (with and without the base check) against
    ``prepare`` + ``PreparedPatch.apply``, one delta on a model resident in host memory.
    Runs in this process (the model must stay resident between calls)."""
    import stitch_gpu
    result = stitch_gpu.hot_swap(model["base"], model["deltas"][0], "cpu", repeat=repeat)
    rows = [{"way": way, **timings} for way, timings in result["timings"].items()]
    reference = result["timings"].get("prepared resident=False", {}).get("apply_ms_best")
    for row in rows:
        row["prepare_s"] = f"{row['prepare_s']:.2f}" if "prepare_s" in row else "-"
        row["x_prepared"] = row["apply_ms_best"] / reference if reference else float("nan")
    return {**result, "rows": rows}


def gpu_section(args) -> dict:
    try:
        import torch
    except ImportError:
        return {"skipped": "GPU section skipped: torch is not installed"}
    if not torch.cuda.is_available():
        return {"skipped": "GPU section skipped: no CUDA device"}
    import stitch_gpu
    model = prepare_model(args.gpu_size_gb, args.gpu_deltas, args.density, args.jobs)
    result = {"device": torch.cuda.get_device_name(0),
              "floors": stitch_gpu.floors(model["base_params"])}
    result["hot_swap"] = stitch_gpu.hot_swap(model["base"], model["deltas"][0], "cuda")
    result["stitch"] = cpu_section(model, [args.gpu_deltas], args.max_memory, args.repeat,
                                   device="auto")
    return result


# -------------------------------------------------------------------------------- main

def goals(sections: list[dict], budget: int, top_n: int) -> list[dict]:
    out = []
    for section in sections:
        size = section["model"]["size_gb"]
        for row in section["rows"]:
            if row["kind"] == "stitch" and row["n"] == top_n and row["native"]:
                for floor, label in (("x_load_save", "load_file + save_file"),
                                     ("x_load_save_fsync", "load_file + save_file + fsync"),
                                     ("x_stream_fsync", "per-tensor read + write + fsync")):
                    out.append({"goal": f"stitch N={top_n} <= {GOAL_RATIO}x floor ({label})",
                                "size_gb": size, "rule": row["rule"],
                                "measured": f"{row[floor]:.2f}x", "met": row[floor] <= GOAL_RATIO})
        stitch_rows = [r for r in section["rows"] if r["kind"] == "stitch"]
        worst = max(stitch_rows, key=lambda r: r["peak_rss"])
        out.append({"goal": f"peak RSS < {budget / MIB:.0f} MiB at every N", "size_gb": size,
                    "rule": worst["rule"],
                    "measured": f"worst {worst['peak_rss_mib']:.0f} MiB ({worst['key']})",
                    "met": all(r["peak_rss"] < budget for r in stitch_rows)})
    return out


def code_source() -> dict:
    """Which sparsestitch the runs import, and the repository's commit and uncommitted changes
    to the package (benchmark children import whatever files are there when they start)."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True)
        return done.stdout.rstrip("\n") if done.returncode == 0 else ""
    return {"package": str(Path(sparsestitch.__file__).resolve().parent),
            "head": git("rev-parse", "--short", "HEAD"),
            "dirty": git("status", "--porcelain", "--", "sparsestitch").splitlines()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", default="2", help="model size(s) in GB, comma-separated")
    parser.add_argument("--deltas", default="1,4,16", help="numbers of deltas to stitch")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--max-memory", default="512MiB")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved rounds per config")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--peer-deltas", type=int, default=4)
    parser.add_argument("--peer-size-gb", type=float, default=None,
                        help="model size for the peer comparison (default: the largest)")
    parser.add_argument("--peer-full-size-gb", type=float, default=0.02,
                        help="model size for the peer comparison that includes density-1.0 "
                             "deltas (kept small: see docs/results-stitch.md)")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--profile-size-gb", type=float, default=None,
                        help="model size of the cProfile run at the largest N (default: the "
                             "smallest of --size-gb)")
    parser.add_argument("--skip-cpu", action="store_true", help="only the peer and GPU sections")
    parser.add_argument("--skip-hot-swap", action="store_true")
    parser.add_argument("--hot-swap-size-gb", type=float, default=None,
                        help="model size of the CPU hot-swap run (default: the smallest)")
    parser.add_argument("--gpu-size-gb", type=float, default=14.0)
    parser.add_argument("--gpu-deltas", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2, help="processes generating inputs")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 0.05 GB, N = 1,4, one round, peer N = 2")
    parser.add_argument("--json", default=None,
                        help="result file (default bench/results/stitch.json; with --quick "
                             "bench/.cache/stitch/quick.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_gb, args.deltas, args.repeat, args.peer_deltas = "0.05", "1,4", 1, 2
        args.peer_full_size_gb = 0.01
        args.gpu_size_gb = 0.05
    if args.json is None:
        args.json = str(CACHE / "quick.json" if args.quick else BENCH / "results" / "stitch.json")
    sizes = [float(s) for s in args.size_gb.split(",")]
    ns = sorted(int(n) for n in args.deltas.split(","))
    budget = parse_bytes(args.max_memory)
    info = machine()
    print(f"machine: {describe_machine(info)}")
    source = code_source()
    print(f"sparsestitch from {source['package']} (repository HEAD {source['head']}, "
          f"uncommitted changes under sparsestitch/: {source['dirty'] or 'none'})")
    report = {"command": shlex.join([sys.executable.rsplit("/", 1)[-1], "bench/stitch.py",
                                     *(sys.argv[1:] if argv is None else argv)]),
              "machine": info, "source": source, "max_memory": args.max_memory, "budget_bytes": budget,
              "density": args.density, "repeat": args.repeat,
              "deltas_made_by": "bench/stitch_synth.py: written directly with the library's "
                                "encode_record + DeltaWriter from synthetic task vectors, exact "
                                "global top-k of |tau|; density-1.0 peer deltas by "
                                "sparsestitch.compress",
              "cache": "warm: every run is preceded by os.sync() and a read of all its inputs",
              "cpu": [], "goals": []}
    started = time.perf_counter()
    models = {}
    for size in sizes:
        print(f"preparing the {size:g} GB model and {max(ns)} deltas ...", flush=True)
        models[size] = prepare_model(size, max(ns), args.density, args.jobs)
    if not args.skip_cpu:
        for size in sizes:
            model = models[size]
            print(f"\nCPU: {size:g} GB model ({model['base_bytes'] / 1e9:.2f} GB, "
                  f"{model['base_params'] / 1e9:.2f} B params, {model['shards']} shards), "
                  f"N = {ns}, --max-memory {args.max_memory}", flush=True)
            section = cpu_section(model, ns, args.max_memory, args.repeat)
            report["cpu"].append(section)
            print(table(section["rows"], CPU_COLUMNS))
            report["goals"] = goals(report["cpu"], budget, max(ns))
            write_json(args.json, report)  # partial results survive an interrupted run
        if not args.skip_profile:
            size = args.profile_size_gb or min(sizes)
            if size not in models:
                models[size] = prepare_model(size, max(ns), args.density, args.jobs)
            model = models[size]
            print(f"\nprofiling stitch N={max(ns)} localize-stitch on the "
                  f"{model['size_gb']:g} GB model ...", flush=True)
            report["profile"] = profile_section(model, max(ns), args.max_memory)
            print(table(report["profile"]["by_own_time"][:15], PROFILE_COLUMNS))
            write_json(args.json, report)
    report["peer"] = []
    if args.skip_peer:
        report["peer"] = {"skipped": "--skip-peer"}
    else:
        peers = [(args.peer_size_gb or max(sizes), False), (args.peer_full_size_gb, True)]
        for size, full in peers:
            if size not in models:
                models[size] = prepare_model(size, args.peer_deltas, args.density, args.jobs)
            print(f"\npeer: task arithmetic of {args.peer_deltas} fine-tunes of the {size:g} GB "
                  f"model{', with density-1.0 deltas' if full else ''}", flush=True)
            peer = peer_section(models[size], args.peer_deltas, args.repeat, args.max_memory,
                                args.jobs, full)
            report["peer"].append(peer)
            write_json(args.json, report)
            print(table(peer["rows"], PEER_COLUMNS) if "rows" in peer else peer["skipped"])
    if not args.skip_hot_swap:
        size = args.hot_swap_size_gb or min(sizes)
        if size not in models:
            models[size] = prepare_model(size, 1, args.density, args.jobs)
        print(f"\nhot swap on CPU: one delta on the resident {size:g} GB model ...", flush=True)
        report["hot_swap_cpu"] = hot_swap_cpu_section(models[size], args.repeat + 1)
        print(table(report["hot_swap_cpu"]["rows"], HOT_SWAP_COLUMNS))
        write_json(args.json, report)
    print()
    report["gpu"] = gpu_section(args)
    print(report["gpu"].get("skipped") or json.dumps(report["gpu"], indent=1, default=str))
    if report["goals"]:
        print("\ngoals")
        print(table(report["goals"], [("goal", "goal", "{}"), ("size_gb", "GB", "{:g}"),
                                      ("rule", "rule", "{}"), ("measured", "measured", "{}"),
                                      ("met", "met", "{}")]))
    report["seconds"] = time.perf_counter() - started
    path = write_json(args.json, report)
    print(f"\nwrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
