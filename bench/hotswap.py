"""Hot-swap of a default delta on the CPU: ``apply``, ``revert``, ``prepare`` and a prepared
switch against their floors, time and memory.

Question (issue 20): a default delta stores 15-100% of each tensor, so a hot-swap patch that
keeps positions and before/after bits per changed element costs more than the model itself.
How long does switching a skill take, and how much memory does it hold, against what the job
cannot avoid?

* ``apply`` (``sparsestitch.apply`` of one delta onto the resident base) against its floor:
  reading the delta file once (64 MiB reads) and writing the touched tensors once (``copy_``
  into them from copies made beforehand);
* a prepared switch (``PreparedPatch.apply``, then ``revert``) against copying the touched
  tensors once (``copy_``, preallocated);
* ``prepare`` and ``revert`` beside them.

Inputs: a base checkpoint (safetensors or GGUF, read with sparsestitch and held as torch
tensors, as a server holds its model) and fine-tunes of it, each compressed once with the
default options (``--cache``).  With ``--smollm-cache`` (the fidelity benchmark's cache) they
are SmolLM2-135M-Instruct float32 and its two real fine-tunes (news, dialog).

Every job runs in a fresh process (``bench/common.py``), rounds interleaved; inside it the
base is loaded first, then the peak RSS is reset (``/proc/self/clear_refs``) and the
operation timed, so "peak over" is what the operation held beyond the resident model.
``--before TREE`` runs the same jobs with an older source tree (its C extension built) in the
same rounds.

    python bench/hotswap.py --smollm-cache /work/cache/fidelity --repeat 3 \
        --before /work/before --json bench/results/hotswap.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from common import (describe_machine, interleaved, machine, sparsestitch_module,  # noqa: E402
                    table, write_json)

READ_CHUNK = 8 << 20
OPS = ("apply floor", "apply", "copy", "prepared")


# ---- in the child process ----

def _rss() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) in bytes."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                found[line[:5]] = int(line.split()[1]) * 1024
    return found["VmRSS"], found["VmHWM"]


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _rss()[0]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load(base: str) -> dict:
    import torch

    from sparsestitch.checkpoint import Checkpoint
    lookup_dtype = sparsestitch_module("sparsestitch.core.dtypes").dtype
    model = {}
    with Checkpoint(base) as ckpt:
        for name in ckpt.names:
            entry = ckpt.entry(name)
            bits = ckpt.read(name)
            dt = lookup_dtype(entry.dtype)
            tensor = torch.from_numpy(bits.view(f"i{dt.itemsize}").copy()).reshape(entry.shape)
            model[name] = tensor.view({"F32": torch.float32, "BF16": torch.bfloat16,
                                       "F16": torch.float16}[entry.dtype])
    return model


def _touched(delta: str) -> list[str]:
    DeltaReader = sparsestitch_module("sparsestitch.delta.format").DeltaReader
    with DeltaReader(delta) as reader:
        return [r.name for r in reader.records if r.kind == "sparse"]


def job(base: str, delta: str, op: str, repeat: str) -> dict:
    """Load ``base``, then time ``op`` on it (see the module docstring); peak memory over the
    resident model."""
    import torch

    import sparsestitch
    model = _load(base)
    touched = _touched(delta)
    touched_bytes = sum(model[n].numel() * model[n].element_size() for n in touched)
    sources = ({n: model[n].clone() for n in touched} if op in ("apply floor", "copy") else {})
    # the floor reads into one buffer made beforehand: a new buffer each read (fresh pages)
    # made reads up to 3x slower on a VM, a floor the job could beat
    buffer = memoryview(bytearray(READ_CHUNK)) if op == "apply floor" else None
    start_rss = _reset_peak()
    cpu = _cpu()
    started = time.perf_counter()
    out: dict = {"touched_bytes": touched_bytes, "delta_bytes": Path(delta).stat().st_size}
    if op in ("apply floor", "copy"):
        if op == "apply floor":
            with open(delta, "rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass
        for name in touched:
            model[name].copy_(sources[name])
        out["seconds"] = time.perf_counter() - started
    elif op == "apply":
        patch = sparsestitch.apply(model, delta)
        out["seconds"] = time.perf_counter() - started
        reverting = time.perf_counter()
        patch.revert()
        out["revert_s"] = time.perf_counter() - reverting
    elif op == "prepared":
        skill = sparsestitch.prepare(model, delta)
        out["prepare_s"] = time.perf_counter() - started
        out["prepared_bytes"] = skill.nbytes
        on, off = [], []
        for _ in range(int(repeat)):
            t0 = time.perf_counter()
            patch = skill.apply(model)
            t1 = time.perf_counter()
            patch.revert()
            on.append(t1 - t0)
            off.append(time.perf_counter() - t1)
        out["seconds"], out["revert_s"] = min(on), min(off)
    else:
        raise ValueError(op)
    out["cpu_s"] = _cpu() - cpu
    out["peak_over"] = _rss()[1] - start_rss
    out["threads"] = torch.get_num_threads()
    return out


# ---- driver ----

def compressed(cache: Path, base: Path, tune: Path, label: str) -> Path:
    """The default delta of ``tune`` (made once, with the current tree)."""
    import sparsestitch
    out = cache / f"{label}.delta"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        sparsestitch.compress(base, tune, out)
    return out


def inputs(args) -> tuple[Path, dict[str, Path]]:
    if args.smollm_cache:
        root = Path(args.smollm_cache) / "smollm"
        base = root / "base" / "model.safetensors"
        tunes = {name: root / f"ft-{name}" / "model.safetensors" for name in ("news", "dialog")}
    else:
        base = Path(args.base)
        tunes = {Path(t).stem: Path(t) for t in args.tunes}
    return base, {name: compressed(Path(args.cache), base, tune, name)
                  for name, tune in tunes.items()}


COLUMNS = [("delta", "delta", "{}"), ("tree", "tree", "{}"), ("op", "op", "{}"),
           ("seconds", "s (best)", "{:.3f}"), ("cpu_s", "CPU s", "{:.2f}"),
           ("x_floor", "x floor", "{:.2f}"), ("revert_s", "revert s", "{}"),
           ("prepare_s", "prepare s", "{}"), ("peak_over_mib", "peak over MiB", "{:.0f}"),
           ("touched_mib", "touched MiB", "{:.0f}")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smollm-cache", help="the fidelity benchmark's cache root")
    parser.add_argument("--base", help="base checkpoint (without --smollm-cache)")
    parser.add_argument("--tunes", nargs="*", default=[], help="fine-tuned checkpoints")
    parser.add_argument("--cache", default=str(BENCH / ".cache" / "hotswap"),
                        help="where the default deltas are kept")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--switches", type=int, default=5, help="prepared switches per round")
    parser.add_argument("--before", help="an older source tree, run in the same rounds")
    parser.add_argument("--json", default=str(BENCH / "results" / "hotswap.json"))
    args = parser.parse_args(argv)
    base, deltas = inputs(args)
    trees = {"now": REPO} | ({"before": Path(args.before)} if args.before else {})
    jobs = {}
    for name, delta in deltas.items():
        for tree_label, tree in trees.items():
            for op in OPS:
                if tree_label == "before" and op in ("apply floor", "copy"):
                    continue  # the floors do not depend on the tree
                jobs[(name, tree_label, op)] = {
                    "target": "hotswap:job", "args": (str(base), str(delta), op,
                                                      str(args.switches)),
                    "sys_path": [str(tree), str(BENCH)], "preload": ["torch", "sparsestitch"]}
    results = interleaved(args.repeat, {json.dumps(k): v for k, v in jobs.items()})
    rows = []
    for key, run in results.items():
        name, tree_label, op = json.loads(key)
        runs = run["all_results"]
        best = min(runs, key=lambda r: r["seconds"])
        rows.append({"delta": name, "tree": tree_label, "op": op,
                     "seconds": best["seconds"], "cpu_s": best["cpu_s"],
                     "revert_s": (f"{best['revert_s']:.3f}" if "revert_s" in best else "-"),
                     "prepare_s": (f"{best['prepare_s']:.2f}" if "prepare_s" in best else "-"),
                     "peak_over_mib": max(r["peak_over"] for r in runs) / 2**20,
                     "touched_mib": best["touched_bytes"] / 2**20,
                     "delta_bytes": best["delta_bytes"],
                     "all_s": [r["seconds"] for r in runs], "rounds": runs})
    floors = {(r["delta"], r["op"]): r["seconds"] for r in rows if r["tree"] == "now"}
    for row in rows:
        floor = floors[(row["delta"], "apply floor" if row["op"] in ("apply", "apply floor")
                        else "copy")]
        row["x_floor"] = row["seconds"] / floor
    rows.sort(key=lambda r: (r["delta"], r["tree"] != "now", OPS.index(r["op"])))
    info = machine()
    print(f"hot-swap, {base} ({describe_machine(info)})")
    print(table(rows, COLUMNS))
    write_json(args.json, {"machine": info, "base": str(base),
                           "deltas": {n: str(p) for n, p in deltas.items()},
                           "repeat": args.repeat, "switches": args.switches,
                           "trees": {k: str(v) for k, v in trees.items()}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
