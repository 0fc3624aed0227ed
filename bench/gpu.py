"""The GPU measurements of issue 15, on inputs made here (bench/gpu_inputs.py).

    python bench/gpu.py                         # on a GPU: a 7B bf16 base, 8 deltas at 1%
    python bench/gpu.py --size-gb 0.05 --device cpu   # the rehearsal on a machine without one

Sections, each timed and skipped (with the reason in the JSON) once ``--budget-s`` is spent:

* **floors**, in the same run: safetensors load + save of the base (the I/O a stitch cannot
  avoid), a host-to-device copy of the deltas' bytes from pinned memory, ``index_add_`` of
  the deltas' kept count into a base-sized bf16 vector;
* **stitch**: ``sparsestitch.stitch`` of the 8 deltas on the device, against the I/O floor
  (goal: at most 1.2x); with ``--compare-cpu`` the CPU stitch too, and whether the two
  outputs are byte-identical;
* **hot swap** of one delta on the model resident on the device: ``apply`` from a warm
  file and ``revert`` (goal: apply at most 150 ms), ``prepare`` then the prepared switch on
  and off (goal: at most 10 ms), and every tensor compared with a copy taken before
  (revert exact: the goal is equality, not a fingerprint);
* **stitch into the resident model** (``sparsestitch.stitch_into``) of the 8 deltas, its
  time, and whether the model then equals the stitched file.

Writes ``bench/results/gpu-<device>-<UTC time>.json`` (the device named in the file name and
inside).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))  # this checkout's sparsestitch, not an installed one
sys.path.insert(1, str(BENCH))

import torch  # noqa: E402

import gpu_inputs  # noqa: E402
from common import machine, write_json  # noqa: E402

import sparsestitch  # noqa: E402


class Clock:
    """The run's time budget: sections start only while time is left."""

    def __init__(self, budget_s: float):
        self.started, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def run(self, name: str, section, *args) -> dict:
        if self.elapsed() > self.budget_s:
            return {"skipped": f"time budget of {self.budget_s:g} s spent before {name}"}
        print(f"[{self.elapsed():6.1f} s] {name} ...", flush=True)
        started = time.perf_counter()
        result = section(*args)
        result["section_seconds"] = time.perf_counter() - started
        return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device, repeat: int = 5, warmup: int = 1) -> dict:
    """Best and median wall ms of ``function()``, synchronised with the device."""
    times = []
    for i in range(warmup + repeat):
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - started))
    return {"best_ms": min(times), "median_ms": statistics.median(times)}


def floors(base: Path, deltas: list[Path], kept: int, params: int, device: torch.device,
           work: Path) -> dict:
    """The I/O floor (safetensors load + save of the base) and the device floors."""
    from safetensors.torch import load_file, save_file

    out = work / "floor"
    out.mkdir(exist_ok=True)
    started = time.perf_counter()
    for shard in sorted(base.glob("*.safetensors")):
        save_file(load_file(shard), out / shard.name)
    io_s = time.perf_counter() - started
    for path in out.glob("*"):
        path.unlink()
    delta_bytes = sum(p.stat().st_size for p in deltas)
    host = torch.empty(delta_bytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    on_device = torch.empty(delta_bytes, dtype=torch.uint8, device=device)
    copy = timed(lambda: on_device.copy_(host, non_blocking=True), device)
    target = torch.zeros(params, dtype=torch.bfloat16, device=device)
    generator = torch.Generator(device=device).manual_seed(1)
    index = torch.randint(0, params, (kept,), generator=generator, device=device)
    values = torch.randn(kept, generator=generator, device=device).to(torch.bfloat16)
    scatter = timed(lambda: target.index_add_(0, index, values), device)
    return {"io_load_save_base_s": io_s, "h2d_delta_bytes": delta_bytes,
            "h2d_copy_delta_bytes_ms": copy, "index_add_kept": kept,
            "index_add_kept_ms": scatter}


def stitch_section(base: Path, deltas: list[Path], device: torch.device, work: Path,
                   compare_cpu: bool, max_memory: str) -> dict:
    started = time.perf_counter()
    out = sparsestitch.stitch(base, deltas, work / "stitched", device=str(device),
                              max_memory=max_memory, overwrite=True)
    result = {"device_stitch_s": time.perf_counter() - started, "output": str(out)}
    if compare_cpu and device.type != "cpu":
        started = time.perf_counter()
        cpu = sparsestitch.stitch(base, deltas, work / "stitched-cpu", device="cpu",
                                  max_memory=max_memory, overwrite=True)
        result["cpu_stitch_s"] = time.perf_counter() - started
        result["identical_to_cpu"] = all(
            (cpu / p.name).read_bytes() == p.read_bytes() for p in out.glob("*.safetensors"))
    return result


def load_resident(base: Path, device: torch.device) -> dict:
    from safetensors.torch import load_file

    model = {}
    for shard in sorted(base.glob("*.safetensors")):
        model.update({n: t.to(device) for n, t in load_file(shard).items()})
    return model


def hot_swap(base: Path, delta: Path, device: torch.device, repeat: int) -> dict:
    """apply from a warm file, prepared switch, revert exactness, on the resident model."""
    model = load_resident(base, device)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    model_bytes = sum(t.numel() * t.element_size() for t in model.values())
    before = ({n: t.clone() for n, t in model.items()}
              if free is None or free > 1.3 * model_bytes else None)
    rows = {}
    # Checking the base hashes every byte of the model on the host: one round of it is enough.
    for verify, rounds, warmup in ((False, repeat, 1), (True, 1, 0)):
        rows[f"apply verify_base={verify}"] = apply_and_revert(
            lambda: sparsestitch.apply(model, delta, verify_base=verify), device, rounds, warmup)
    for resident in (False, True):
        started = time.perf_counter()
        skill = sparsestitch.prepare(model, delta, resident=resident)
        synchronize(device)
        rows[f"prepared resident={resident}"] = {
            "prepare_s": time.perf_counter() - started, "positions": skill.count,
            **apply_and_revert(lambda: skill.apply(model), device, repeat, warmup=1)}
    exact = None if before is None else all(torch.equal(model[n], t) for n, t in before.items())
    del before
    return {"params": sum(t.numel() for t in model.values()), "delta": str(delta),
            "timings": rows, "revert_exact": exact,
            "revert_exact_note": None if exact is not None else
            "not checked: no device memory for a copy of the model"}


def apply_and_revert(apply, device: torch.device, repeat: int, warmup: int) -> dict:
    """Best and median ms of ``patch = apply()`` and of ``patch.revert()``, synchronised;
    ``warmup`` rounds first (the allocator, the page cache) are not counted."""
    apply_ms, revert_ms = [], []
    for i in range(warmup + repeat):
        synchronize(device)
        started = time.perf_counter()
        patch = apply()
        synchronize(device)
        applied = time.perf_counter()
        patch.revert()
        synchronize(device)
        if i >= warmup:
            apply_ms.append(1e3 * (applied - started))
            revert_ms.append(1e3 * (time.perf_counter() - applied))
    return {"apply_ms_best": min(apply_ms), "apply_ms_median": statistics.median(apply_ms),
            "revert_ms_best": min(revert_ms), "revert_ms_median": statistics.median(revert_ms)}


def stitch_into_section(base: Path, deltas: list[Path], device: torch.device,
                        stitched: str | None) -> dict:
    from safetensors.torch import load_file

    model = load_resident(base, device)
    synchronize(device)
    started = time.perf_counter()
    changed = sparsestitch.stitch_into(model, deltas, verify_base=False)
    synchronize(device)
    result = {"stitch_into_s": time.perf_counter() - started, "tensors_changed": len(changed)}
    if stitched:
        result["equals_stitched_file"] = all(
            torch.equal(model[n], t.to(device)) for shard in sorted(Path(stitched).glob(
                "*.safetensors")) for n, t in load_file(shard).items())
    return result


def goals(result: dict) -> list[dict]:
    """The issue's goals against what was measured (None: not measured)."""
    def get(*keys):
        value = result
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    io = get("floors", "io_load_save_base_s")
    stitch_s = get("stitch", "device_stitch_s")
    swap = get("hot_swap", "timings") or {}
    switch = [swap[k]["apply_ms_median"] for k in ("prepared resident=True",
                                                   "prepared resident=False") if k in swap]
    rows = [("stitch <= 1.2x the I/O floor", stitch_s / io if stitch_s and io else None, 1.2),
            ("prepared switch on <= 10 ms (best placement)", min(switch) if switch else None,
             10.0),
            ("apply from a warm file <= 150 ms",
             swap.get("apply verify_base=False", {}).get("apply_ms_median"), 150.0)]
    out = [{"goal": g, "measured": m, "met": None if m is None else m <= limit}
           for g, m, limit in rows]
    out.append({"goal": "revert exact", "measured": get("hot_swap", "revert_exact"),
                "met": get("hot_swap", "revert_exact")})
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({machine()['cpu']})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=14.0,
                        help="base size in GB of bf16 (14: 7B parameters)")
    parser.add_argument("--deltas", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", default="/tmp/sparsestitch-gpu-bench")
    parser.add_argument("--jobs", type=int, default=8, help="processes writing deltas")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-memory", default="4GiB")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="no section starts after this many seconds")
    parser.add_argument("--compare-cpu", action="store_true",
                        help="also stitch on the CPU and compare the outputs byte for byte")
    parser.add_argument("--out", help="JSON path (default bench/results/gpu-<device>-<time>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget_s)
    print(f"[{clock.elapsed():6.1f} s] writing a {args.size_gb:g} GB base on {device} ...",
          flush=True)
    inputs = gpu_inputs.write_base(work, int(args.size_gb * 1e9), str(device))
    print(f"[{clock.elapsed():6.1f} s] writing {args.deltas} deltas ...", flush=True)
    infos = gpu_inputs.write_deltas(Path(inputs["path"]), work, args.deltas, args.density,
                                    args.jobs)
    inputs.update(deltas=infos, deltas_seconds=clock.elapsed() - inputs["seconds"])
    (work / "inputs.json").write_text(json.dumps(inputs, indent=1))
    base, deltas = Path(inputs["path"]), [Path(i["path"]) for i in infos]
    kept = sum(i["kept"] for i in infos)
    result = {"device": device_name(device), "machine": machine(), "inputs": inputs,
              "args": vars(args)}
    result["floors"] = clock.run("floors", floors, base, deltas, kept, inputs["params"],
                                 device, work)
    result["stitch"] = clock.run("stitch", stitch_section, base, deltas, device, work,
                                 args.compare_cpu, args.max_memory)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["hot_swap"] = clock.run("hot swap", hot_swap, base, deltas[0], device, args.repeat)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["stitch_into"] = clock.run("stitch into the resident model", stitch_into_section,
                                      base, deltas, device, result["stitch"].get("output"))
    result["goals"] = goals(result)
    result["total_seconds"] = clock.elapsed()
    slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = write_json(args.out or BENCH / "results" / f"gpu-{slug}-{stamp}.json", result)
    for row in result["goals"]:
        print(f"  {row['goal']:<36} measured {row['measured']!s:<22} met {row['met']}")
    print(f"[{clock.elapsed():6.1f} s] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
