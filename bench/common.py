"""Small helpers shared by the benchmark scripts: machine, measured subprocess runs, tables, JSON.

The API is seven names:

* :func:`machine` -- a JSON-ready description of the machine and library versions, and
  :func:`describe_machine` -- the same as one line for a table caption;
* :func:`measure` -- run ``module:function(*args)`` in a fresh Python process and return
  its :class:`Measured` time (taken inside the child, around the call only) and peak RSS
  (see below);
* :func:`best_of` -- :func:`measure` repeated, summarised as best time and largest peak,
  and :func:`interleaved` -- the same for several jobs run in turn;
* :func:`table` -- format rows of dicts as a fixed-width text table;
* :func:`write_json` -- write a result file (creating its folder), sorted and indented.

Example::

    import sys; sys.path.insert(0, "bench")
    from common import best_of, machine, table
    run = best_of(3, "mybench:work", "/tmp/model", sys_path=["bench"], preload=["numpy"])
    print(table([{"op": "work", "s": run["best_s"]}], [("op", "op", "{}"), ("s", "s", "{:.2f}")]))

The target function runs in a child whose ``sys.path`` starts with ``sys_path``; its
arguments and return value must be JSON-serialisable.  Peak RSS includes the interpreter
and whatever the target's module imports; ``Measured.start_rss`` (the child's peak just
before the call) shows that floor.

Peak RSS is the child's ``VmHWM`` from ``/proc/self/status`` (the high-water mark of its
own address space).  ``ru_maxrss`` -- from ``getrusage`` or ``wait4`` alike -- is not used
where ``/proc`` exists: Linux carries the pre-``exec`` high-water mark over ``exec``, so a
child of a large parent would report at least the parent's RSS.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_MARK = "@@bench-result@@ "

_CHILD = r"""
import importlib, json, resource, sys, time

def peak_rss():
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

request = json.loads(sys.argv[1])
sys.path[:0] = request["sys_path"]
module_name, function_name = request["target"].split(":")
function = getattr(importlib.import_module(module_name), function_name)
for name in request["preload"]:
    importlib.import_module(name)
start_rss = peak_rss()
cpu_started = time.process_time()
started = time.perf_counter()
result = function(*request["args"])
seconds = time.perf_counter() - started
cpu = time.process_time() - cpu_started
report = {"seconds": seconds, "cpu_seconds": cpu, "start_rss": start_rss,
          "peak_rss": peak_rss(), "result": result}
sys.stdout.flush()
print("\n" + MARK + json.dumps(report), flush=True)
""".replace("MARK", repr(_MARK))


@dataclass(frozen=True)
class Measured:
    """One measured call: seconds inside the child, peak and pre-call RSS in bytes, result."""

    seconds: float
    peak_rss: int
    start_rss: int
    result: object
    cpu_seconds: float = 0.0   # every thread of the child, inside the call


def measure(target: str, *args, sys_path: list[str] | tuple[str, ...] = (),
            preload: list[str] | tuple[str, ...] = ()) -> Measured:
    """Call ``target`` (``"module:function"``) with ``args`` in a fresh Python process.

    ``preload`` names modules the child imports before the clock starts (import time is
    not what a benchmark measures; their memory still counts in both RSS figures).
    Raises ``RuntimeError`` with the child's output if it fails.
    """
    request = json.dumps({"target": target, "args": list(args), "preload": list(preload),
                          "sys_path": [str(p) for p in sys_path]})
    proc = subprocess.run([sys.executable, "-c", _CHILD, request], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{target}{tuple(args)} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-4000:]}")
    report = json.loads(lines[-1][len(_MARK):])
    return Measured(report["seconds"], report["peak_rss"], report["start_rss"], report["result"],
                    report.get("cpu_seconds", 0.0))


def best_of(repeat: int, target: str, *args, sys_path=(), preload=(), before=None) -> dict:
    """Run :func:`measure` ``repeat`` times; ``before()`` (if given) runs before each, untimed.

    Returns ``{"best_s", "all_s", "peak_rss", "start_rss", "result"}``: the fastest time,
    every time, the largest peak RSS over the runs, and the pre-call RSS and result of the
    fastest run.
    """
    job = {"target": target, "args": args, "sys_path": sys_path, "preload": preload,
           "before": before}
    return interleaved(repeat, {"job": job})["job"]


def interleaved(repeat: int, jobs: dict[str, dict]) -> dict[str, dict]:
    """:func:`best_of` for several jobs at once, run round robin: job 1, job 2, ..., job 1, ...

    On a shared machine the load drifts; interleaving exposes every job to the same drift,
    so ratios between them are fairer than between jobs timed minutes apart.  ``jobs`` maps
    a name to ``{"target", "args", "sys_path", "preload", "before"}`` (all but ``target``
    optional); returns a :func:`best_of` dict per name.
    """
    runs = {name: [] for name in jobs}
    for _ in range(repeat):
        for name, job in jobs.items():
            if job.get("before") is not None:
                job["before"]()
            runs[name].append(measure(job["target"], *job.get("args", ()),
                                      sys_path=job.get("sys_path", ()),
                                      preload=job.get("preload", ())))
    out = {}
    for name, measured in runs.items():
        fastest = min(measured, key=lambda r: r.seconds)
        out[name] = {"best_s": fastest.seconds, "all_s": [r.seconds for r in measured],
                     "cpu_s": fastest.cpu_seconds, "all_cpu_s": [r.cpu_seconds for r in measured],
                     "peak_rss": max(r.peak_rss for r in measured),
                     "start_rss": fastest.start_rss, "result": fastest.result,
                     "all_results": [r.result for r in measured]}
    return out


def machine() -> dict:
    """CPU model, cores, RAM, OS, Python and the versions of the libraries benchmarks use."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {}
    for name in ("numpy", "torch", "safetensors", "zstandard", "scipy", "xxhash", "sparsestitch"):
        try:
            from importlib.metadata import version
            versions[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing library is reported, not fatal
            versions[name] = None
    return {"cpu": cpu, "cores": cores, "ram_bytes": ram, "os": platform.platform(),
            "python": platform.python_version(), "versions": versions}


def describe_machine(info: dict) -> str:
    """One line for a table caption, from :func:`machine`'s dict."""
    v = info["versions"]
    return (f"{info['cpu']}, {info['cores']} cores, {info['ram_bytes'] / 2**30:.0f} GiB RAM, "
            f"Python {info['python']}, numpy {v['numpy']}, torch {v['torch']}, "
            f"safetensors {v['safetensors']}, zstandard {v['zstandard']}, scipy {v['scipy']}")


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Rows of dicts as a text table; ``columns`` are ``(key, header, format)``.

    A missing or None value prints as ``-``.

    >>> print(table([{"a": 1.5}], [("a", "A", "{:.1f}"), ("b", "B", "{}")]))
    A    B
    ---  -
    1.5  -
    """
    cells = [[("-" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in columns]
             for row in rows]
    headers = [header for _, header, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` as indented JSON with sorted keys, creating the folder; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


#: Where modules lived before the package was laid out by concept (2026-12-06): jobs that run
#: an older tree (``--before``) import them from there.
BEFORE_LAYOUT = {"sparsestitch.delta.format": "sparsestitch.format",
                 "sparsestitch.core.dtypes": "sparsestitch.dtypes",
                 "sparsestitch.core.sizes": "sparsestitch.sizes"}


def sparsestitch_module(name: str):
    """The sparsestitch module ``name`` (its path in this tree) from whichever tree is on
    ``sys.path`` first: this layout or the one before it."""
    import importlib
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        return importlib.import_module(BEFORE_LAYOUT[name])
