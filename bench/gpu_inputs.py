"""Inputs of bench/gpu.py, made on the machine that measures (no files shipped): a llama-shaped
bf16 base and sparse deltas of it, fast enough that a 7B base and 8 deltas fit in the GPU
check's five minutes.

* The base: :func:`sparsestitch.checkpoint.synthetic.shapes_for_size` (llama layout), every tensor
  drawn on the torch device given (the GPU when there is one: 7B normal draws take well
  under a second there) as ``N(0, 0.02)`` in bfloat16, written with the library's sharded
  :class:`~sparsestitch.checkpoint.CheckpointWriter`.
* Each delta: per tensor, about ``density`` of the positions (uniform draws, sorted and
  deduplicated), a task vector of realistic statistics there (Laplace, scale a tenth of the
  weights' spread, a per-row factor from 0.25 to 4 so some rows change much more), the
  fine-tune ``round(base + tau)``, and the record written with the library's codecs and
  ``DeltaWriter``: positions ``rice`` and values ``tau``, the codecs compress picks for such
  records, encoded directly rather than all candidates tried (four times faster, which is
  what lets 8 deltas of 7B parameters be made in the check's budget).  Deltas are written
  in parallel processes.  Positions are not the top-k of a real fine-tune: the
  stitcher's cost depends on the stored count and codecs, not on which positions they are.
"""

from __future__ import annotations

import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from sparsestitch.checkpoint import Checkpoint, CheckpointWriter, OutputTensor, Shard
from sparsestitch.core.dtypes import dtype as lookup_dtype, from_wide, to_wide
from sparsestitch.delta.codecs import RiceGaps, TauValues
from sparsestitch.delta.format import DeltaWriter, Record, digest
from sparsestitch.checkpoint.synthetic import shapes_for_size
from sparsestitch.engine.walk import BaseHash

SHARD_BYTES = 5 << 30
WEIGHT_STD = 0.02


def write_base(folder: Path, size_bytes: int, device: str) -> dict:
    """A bf16 base of about ``size_bytes`` under ``folder / "base"``; its description."""
    import torch

    started = time.perf_counter()
    shapes = shapes_for_size(size_bytes, "BF16")
    shards, current, used = [], [], 0
    for name, shape in shapes:
        tensor = OutputTensor(name, "BF16", tuple(shape))
        if current and used + tensor.nbytes > SHARD_BYTES:
            shards.append(current)
            current, used = [], 0
        current.append(tensor)
        used += tensor.nbytes
    shards.append(current)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    out = folder / "base"
    writer = CheckpointWriter(out, [Shard(n, t, {"format": "pt"}) for n, t in zip(names, shards)],
                              folder=True, overwrite=True)
    generator = torch.Generator(device=device).manual_seed(0)
    try:
        for tensors in shards:
            for tensor in tensors:
                values = torch.randn(int(np.prod(tensor.shape)), generator=generator,
                                     device=device) * WEIGHT_STD
                bits = values.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
                writer.write(tensor.name, bits)
        writer.close()
    except BaseException as exc:
        writer.abort(exc)
        raise
    params = sum(int(np.prod(shape)) for _, shape in shapes)
    return {"path": str(out), "params": params, "bytes": 2 * params, "shards": len(shards),
            "tensors": len(shapes), "seconds": time.perf_counter() - started}


def write_delta(job: tuple) -> dict:
    """Delta ``task`` of the base at ``base_path`` into ``out`` (run in a worker process)."""
    base_path, out, task, density = job
    started = time.perf_counter()
    dt = lookup_dtype("BF16")
    kept = 0
    with Checkpoint(base_path) as base:
        writer = DeltaWriter(Path(out), overwrite=True)
        try:
            for index, name in enumerate(base.names):
                entry = base.entry(name)
                bits = base.read(name).reshape(-1)
                base_hash = BaseHash(name)
                base_hash.update(bits)
                rng = np.random.default_rng([task, index])
                count = max(1, int(density * bits.size))
                positions = np.sort(rng.integers(0, bits.size, count))
                positions = positions[np.concatenate([[True], positions[1:] != positions[:-1]])]
                row_items = max(1, bits.size // (entry.shape[0] if entry.shape else 1))
                row_factor = 0.25 * 16.0 ** rng.random(bits.size // row_items + 1)
                tau = (rng.laplace(0.0, WEIGHT_STD / 10, positions.size)
                       * row_factor[positions // row_items]).astype(np.float32)
                base_kept = bits[positions]
                finetuned = from_wide(to_wide(base_kept, dt) + tau, dt)
                changed = finetuned != base_kept
                positions, finetuned, base_kept = (positions[changed], finetuned[changed],
                                                   base_kept[changed])
                if positions.size == 0:
                    writer.add(Record(name, "BF16", entry.shape, "base", base_hash.hexdigest()))
                    continue
                writer.add(*_record(name, entry.shape, positions, finetuned, base_kept,
                                    base_hash.hexdigest()))
                kept += int(positions.size)
            identity = digest(repr(sorted(base.names)).encode())
            size = writer.close({"method": "synthetic (bench/gpu_inputs.py)", "density": density,
                                 "kept": kept, "base_identity": identity,
                                 "sources": {"base": "base", "finetuned": f"synthetic-{task}"}})
        except BaseException as exc:
            writer.abort(exc)
            raise
    return {"path": str(out), "kept": kept, "bytes": size,
            "seconds": time.perf_counter() - started}


def _record(name: str, shape: tuple, positions: np.ndarray, finetuned: np.ndarray,
            base_kept: np.ndarray, base_xxh3: str) -> tuple[Record, bytes]:
    """A bf16 record with ``rice`` positions and ``tau`` values (``encode_record`` with its
    choice of codecs made in advance)."""
    dt = lookup_dtype("BF16")
    pos_payload, pos_config = RiceGaps().encode(positions, shape)
    val_payload, val_config = TauValues().encode(finetuned, base_kept, dt)
    payload = pos_payload + val_payload
    record = Record(name, "BF16", tuple(shape), "sparse", base_xxh3, int(positions.size),
                    {"codec": "rice", **pos_config}, {"codec": "tau", **val_config},
                    len(pos_payload), len(val_payload), digest(payload))
    return record, payload


def write_deltas(base: Path, folder: Path, count: int, density: float, processes: int) -> list[dict]:
    """``count`` deltas of ``base`` at ``density``, written ``processes`` at a time."""
    jobs = [(str(base), str(folder / f"task{t}.delta"), t, density) for t in range(count)]
    if processes <= 1 or count <= 1:
        return [write_delta(job) for job in jobs]
    with get_context("spawn").Pool(min(processes, count)) as pool:
        return pool.map(write_delta, jobs, chunksize=1)
