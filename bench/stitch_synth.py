"""Synthetic inputs for bench/stitch.py: a llama-shaped base, 1% deltas, full fine-tunes.

The base comes from :func:`sparsestitch.checkpoint.synthetic.write_zoo`.  Deltas are *not*
made by ``sparsestitch.compress`` from materialized fine-tunes (16 fine-tunes
of a 2 GB model cost ~50 minutes on 2 shared cores): each is written directly
with the library's own writer (``encode_record`` + ``DeltaWriter``) from a
synthetic task vector, keeping the exact global top-``density`` of ``|tau|``.

The task vector has the structure of :func:`sparsestitch.checkpoint.synthetic.task_vector`
(per-tensor scale x row scale x column scale x Laplace noise) but is drawn
more cheaply: ``|tau| = scale * row * col * E`` with ``E`` exponential (float32
ziggurat) and the sign a hash of (task, tensor, position), so the same
``tau`` can be rebuilt at the kept positions only or, for the mergekit
comparison, over whole tensors.  A fine-tune is ``round(wide(base) + tau)``
in bfloat16.  Selection ranks the float32 ``|tau|`` (before rounding), so it
can differ from ``compress`` on the rounded fine-tune at the margin.

Global top-k in one pass per task: a 1/256 sample of every tensor estimates
the threshold ``T``; the pass keeps every element with ``|tau| >= 0.8 T`` as a
candidate; if at least ``k`` candidates were kept the exact top-k lies among
them (otherwise the bound is lowered and the pass repeated), and the library's
:func:`~sparsestitch.localize.topk.resolve_candidates` finishes the selection with
compress's tie order (:mod:`sparsestitch.core.tiebreak`).
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import numpy as np

from sparsestitch._version import __version__
from sparsestitch.checkpoint import Checkpoint, CheckpointWriter, OutputTensor, Shard
from sparsestitch.core.dtypes import dtype as lookup_dtype, from_wide, to_wide
from sparsestitch.delta.format import DeltaWriter, Record, digest, encode_record
from sparsestitch.localize.topk import count_to_keep, resolve_candidates
from sparsestitch.core.sizes import numel as count_elements
from sparsestitch.checkpoint.synthetic import llama_config as synthetic_llama_config, write_zoo
from sparsestitch.core.tiebreak import ranked

#: Bump when anything below changes what gets written: cached inputs are keyed by it.
GENERATOR_VERSION = 2  # 2: compress's tie order at the threshold
TASK_SEED = 7919
STRENGTH = 0.02
SAMPLE_EVERY = 256
BOUND_FACTOR = 0.8


def llama_config(base: Checkpoint) -> dict:
    """A complete LlamaForCausalLM config for a base written by ``write_zoo`` (mergekit plans
    its merge from the architecture, so it needs the real layer count and sizes)."""
    config = synthetic_llama_config([(n, base.entry(n).shape) for n in base.names])
    config["note"] = "synthetic sparsestitch benchmark model; weights are random"
    return config


def make_base(folder: Path, size_bytes: int) -> Path:
    """The base model folder under ``folder`` (written once, then reused)."""
    base = folder / "base"
    done = folder / "base.done.json"
    if done.is_file() and base.is_dir():
        return base
    started = time.perf_counter()
    base, _ = write_zoo(folder, size_bytes, 0, overwrite=True)
    with Checkpoint(base) as ckpt:
        (base / "config.json").write_text(json.dumps(llama_config(ckpt), indent=2) + "\n")
        stats = {name: _tensor_stats(ckpt, name) for name in ckpt.names}
        nbytes = sum(ckpt.entry(n).nbytes for n in ckpt.names)
        numel = sum(ckpt.entry(n).numel for n in ckpt.names)
    done.write_text(json.dumps({"seconds": time.perf_counter() - started, "nbytes": nbytes,
                                "numel": numel, "tensors": stats}, indent=1))
    return base


def base_stats(folder: Path) -> dict:
    return json.loads((folder / "base.done.json").read_text())


def _tensor_stats(ckpt: Checkpoint, name: str) -> dict:
    entry = ckpt.entry(name)
    bits = ckpt.read(name).reshape(-1)
    wide = to_wide(bits, lookup_dtype(entry.dtype))
    return {"std": float(wide.std(dtype=np.float64)), "base_xxh3": digest(bits)}


def _scales(name: str, shape: tuple[int, ...], std: float, task: int):
    """The task vector's generator after its scale draws: ``(rng, row scale, column scale)``.

    For 1-D tensors the row scale is the tensor scale and the column scale is None.
    """
    rng = np.random.default_rng([TASK_SEED, task, zlib.crc32(name.encode())])
    scale = STRENGTH * std * float(np.exp(rng.normal(0.0, 0.7)))
    if len(shape) == 2:
        rows = np.exp(rng.normal(0.0, 0.5, shape[0])).astype(np.float32) * np.float32(scale)
        cols = np.exp(rng.normal(0.0, 0.3, shape[1])).astype(np.float32)
        return rng, rows, cols
    return rng, np.float32(scale), None


def magnitudes(name: str, shape: tuple[int, ...], std: float, task: int) -> np.ndarray:
    """``|tau|`` of one tensor for one task, flat float32 (deterministic)."""
    rng, rows, cols = _scales(name, shape, std, task)
    numel = count_elements(shape)
    mag = rng.standard_exponential(numel, dtype=np.float32)
    if cols is None:
        mag *= rows
        return mag
    grid = mag.reshape(shape)
    grid *= rows[:, None]
    grid *= cols[None, :]
    return mag


def signs(name: str, task: int, positions: np.ndarray) -> np.ndarray:
    """+1 / -1 per flat position: the top bit of a splitmix64 hash (float32)."""
    key = np.uint64((zlib.crc32(name.encode()) << 20) ^ (task * 0x9E3779B1) ^ TASK_SEED)
    with np.errstate(over="ignore"):
        z = positions.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + key
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return np.where((z >> np.uint64(63)) == 1, np.float32(-1.0), np.float32(1.0))


def _estimate_threshold(names, shapes, stats, task: int, k: int) -> float:
    """The k-th largest ``|tau|``, estimated from a 1/SAMPLE_EVERY sample of each tensor."""
    keys, weights = [], []
    sampler = np.random.default_rng([TASK_SEED, task, 1])
    for name in names:
        shape = shapes[name]
        _, rows, cols = _scales(name, shape, stats[name]["std"], task)
        numel = count_elements(shape)
        m = max(1, numel // SAMPLE_EVERY)
        e = sampler.standard_exponential(m, dtype=np.float32)
        if cols is None:
            keys.append(e * rows)
        else:
            keys.append(e * rows[sampler.integers(0, shape[0], m)]
                        * cols[sampler.integers(0, shape[1], m)])
        weights.append(np.full(m, numel / m))
    keys, weights = np.concatenate(keys), np.concatenate(weights)
    order = np.argsort(keys)[::-1]
    at = int(np.searchsorted(np.cumsum(weights[order]), k))
    return float(keys[order[min(at, order.size - 1)]])


def write_delta(base: Path, out: Path, task: int, density: float) -> dict:
    """Write the delta of synthetic fine-tune ``task`` keeping the global top ``density``."""
    stats = base_stats(base.parent)["tensors"]
    started = time.perf_counter()
    with Checkpoint(base) as ckpt:
        names = list(ckpt.names)
        shapes = {n: ckpt.entry(n).shape for n in names}
        candidates_total = sum(ckpt.entry(n).numel for n in names)
        k = count_to_keep(density, candidates_total)
        if k >= candidates_total:
            bound = -1.0
        else:
            bound = BOUND_FACTOR * _estimate_threshold(names, shapes, stats, task, k)
        while True:
            kept_pos, kept_mag = {}, {}
            for name in names:
                mag = magnitudes(name, shapes[name], stats[name]["std"], task)
                chosen = np.flatnonzero(mag >= bound)
                kept_pos[name], kept_mag[name] = chosen, mag[chosen]
                del mag
            found = sum(p.size for p in kept_pos.values())
            if found >= k or bound <= 0:
                break
            bound *= 0.5  # the estimate was off: widen and redo (exactness over speed)
        # |tau| >= 0 as float32 bits orders like the value: the library's ranking keys.
        pick = resolve_candidates(np.concatenate(
            [ranked(kept_mag[n].view(np.uint32), n, kept_pos[n]) for n in names]), k)
        starts = dict(zip(names, np.cumsum([0] + [kept_pos[n].size for n in names])))
        writer = DeltaWriter(out, overwrite=True)
        records, kept_total = [], 0
        try:
            for name in names:
                entry = ckpt.entry(name)
                dt = lookup_dtype(entry.dtype)
                mag, pos = kept_mag.pop(name), kept_pos.pop(name)
                keep = pick[starts[name]:starts[name] + pos.size]
                pos, mag = pos[keep], mag[keep]
                base_xxh3 = stats[name]["base_xxh3"]
                if pos.size == 0:
                    record, payload = Record(name, entry.dtype, entry.shape, "base", base_xxh3), b""
                else:
                    base_kept = ckpt.read(name).reshape(-1)[pos]
                    tau = mag * signs(name, task, pos)
                    finetuned = from_wide(to_wide(base_kept, dt) + tau, dt)
                    record, payload = encode_record(name, dt, entry.shape, pos, finetuned,
                                                    base_kept, base_xxh3)
                writer.add(record, payload)
                records.append(record)
                kept_total += record.count
            identity = [[r.name, r.dtype, list(r.shape), r.base_xxh3] for r in records]
            size = writer.close({
                "library_version": __version__, "method": "topk-global", "density": density,
                "kept": kept_total, "candidates": candidates_total,
                "base_identity": digest(repr(identity).encode()),
                "sources": {"base": base.name, "finetuned": f"synthetic-task{task}"},
                "localized_tensors": len(names), "dense_patterns": [],
                "written_by": f"bench/stitch_synth.py v{GENERATOR_VERSION} (synthetic tau, "
                              "global top-k of |tau|, library DeltaWriter)"})
        except BaseException as exc:
            writer.abort(exc)
            raise
    return {"path": str(out), "task": task, "density": density, "kept": kept_total,
            "bound_candidates": found, "bytes": size, "seconds": time.perf_counter() - started}


def write_finetune(base: Path, out: Path, task: int) -> dict:
    """The full synthetic fine-tune ``task`` as a model folder shaped like ``base``."""
    stats = base_stats(base.parent)["tensors"]
    started = time.perf_counter()
    with Checkpoint(base) as ckpt:
        shards = [Shard(file_name, [OutputTensor(n, ckpt.entry(n).dtype, ckpt.entry(n).shape)
                                    for n in names], {"format": "pt"})
                  for file_name, names in ckpt.layout]
        writer = CheckpointWriter(out, shards, folder=True, extra_files=ckpt.extra_files,
                                  overwrite=True)
        try:
            for shard in shards:
                for tensor in shard.tensors:
                    name = tensor.name
                    dt = lookup_dtype(tensor.dtype)
                    bits = ckpt.read(name).reshape(-1)
                    tau = magnitudes(name, tensor.shape, stats[name]["std"], task)
                    tau *= signs(name, task, np.arange(bits.size, dtype=np.uint64))
                    writer.write(name, from_wide(to_wide(bits, dt) + tau, dt))
            writer.close()
        except BaseException as exc:
            writer.abort(exc)
            raise
    return {"path": str(out), "task": task, "seconds": time.perf_counter() - started}


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
