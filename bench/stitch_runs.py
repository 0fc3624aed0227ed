"""What bench/stitch.py times, one function per measured run (each called in a fresh process
by ``common.measure``).  Imports stay at module level, so ``measure`` keeps them out of the
timed call; torch is not imported here (the torch floor is in stitch_floor_torch.py).

Every function writes a complete output at ``out`` and returns a JSON-ready dict.
"""

from __future__ import annotations

import cProfile
import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np

import sparsestitch
from sparsestitch.core import native as native_loops
from sparsestitch.core.direct_file import DirectFile, writes_direct


def peak_rss() -> int:
    """This process's own peak resident set size in bytes (``VmHWM``).

    Not ``ru_maxrss``: Linux carries the parent's RSS at fork across ``execve`` into the
    child's ``ru_maxrss``, so a child of a large parent reads as at least that large.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _base_shards(base: str) -> list[Path]:
    return sorted(Path(base).glob("*.safetensors"))


#: Bytes the floors read at a time, into one buffer reused for every read.
FLOOR_CHUNK = 8 << 20


def floor_stream(base: str, out: str, fsync: bool) -> dict:
    """I/O floor: copy every shard tensor by tensor (positioned reads into one reused
    buffer, then written), as a streaming merger must at least do.  Shards are written as
    sparsestitch writes large outputs (around the page cache where the filesystem takes it,
    :class:`~sparsestitch.core.direct_file.DirectFile`, fsynced): until the tenth round this
    floor read into a fresh buffer per tensor and wrote through the page cache, which on this
    VM is slower than what it bounds (a task-arithmetic merge took 0.39x that floor)."""
    cpu = time.process_time()
    Path(out).mkdir()
    tensors, buffer = 0, memoryview(bytearray(FLOOR_CHUNK))
    for shard in _base_shards(base):
        with open(shard, "rb") as src:
            target = Path(out) / shard.name
            dst = (DirectFile(target, direct=writes_direct(os.fstat(src.fileno()).st_size))
                   if fsync else open(target, "wb"))  # no fsync: through the page cache
            try:
                (size,) = struct.unpack("<Q", src.read(8))
                header_bytes = src.read(size)
                dst.write(struct.pack("<Q", size) + header_bytes)
                header = json.loads(header_bytes)
                header.pop("__metadata__", None)
                data_start = 8 + size
                for begin, end in sorted(tuple(e["data_offsets"]) for e in header.values()):
                    at = begin
                    while at < end:
                        got = os.preadv(src.fileno(), [buffer[:min(len(buffer), end - at)]],
                                        data_start + at)
                        if got <= 0:
                            raise OSError(f"{shard}: ended early")
                        dst.write(buffer[:got])
                        at += got
                    tensors += 1
            finally:
                dst.close()  # a DirectFile's close writes what is staged and fsyncs
    return {"tensors": tensors, "peak_rss": peak_rss(), "cpu_seconds": time.process_time() - cpu}


def stitch_run(base: str, deltas: list[str], out: str, rule: str, max_memory: str,
               device: str = "cpu", native: bool = True) -> dict:
    """``sparsestitch.stitch``; ``cpu_seconds`` (all threads, user + system) is a cross-check
    of the wall time that the other load on a shared machine inflates far less.
    ``native=False`` runs it without the C loops (``SPARSESTITCH_NATIVE=0``)."""
    if not native:
        os.environ["SPARSESTITCH_NATIVE"] = "0"
    cpu = time.process_time()
    sparsestitch.stitch(base, deltas, out, rule=rule, max_memory=max_memory, device=device)
    return {"deltas": len(deltas), "peak_rss": peak_rss(),
            "cpu_seconds": time.process_time() - cpu,
            "native": native_loops.kernels() is not None}


def profile_stitch(base: str, deltas: list[str], out: str, rule: str, max_memory: str,
                   stats_path: str) -> dict:
    """``stitch_run`` under cProfile; the stats go to ``stats_path``.  The engine's reader
    threads are turned off (``READ_WORKERS = 0``) so that cProfile, which sees one thread,
    sees all the work: the profile shows where CPU time goes, not the threaded wall time."""
    from sparsestitch.ops import stitch_engine as engine

    if hasattr(engine, "READ_WORKERS"):
        engine.READ_WORKERS = 0
    profiler = cProfile.Profile()
    profiler.enable()
    sparsestitch.stitch(base, deltas, out, rule=rule, max_memory=max_memory)
    profiler.disable()
    profiler.dump_stats(stats_path)
    return {"stats": stats_path, "peak_rss": peak_rss()}


def remove(path: str | Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def floor_merge(base: str, inputs: list[str], out: str, fsync: bool = True) -> dict:
    """I/O floor of a merge: read every input (a file, or a folder's shards) into one reused
    buffer, then copy the base tensor by tensor into one model (fsync) -- what any
    streaming merger must at least do."""
    cpu = time.process_time()
    buffer = np.empty(FLOOR_CHUNK, np.uint8)
    for path in inputs:  # every input read once
        path = Path(path)
        for file in ([path] if path.is_file() else sorted(path.glob("*.safetensors"))):
            with open(file, "rb", buffering=0) as src:
                while src.readinto(memoryview(buffer)):
                    pass
    result = floor_stream(base, out, fsync)  # the base read and the model written
    return dict(result, cpu_seconds=time.process_time() - cpu, peak_rss=peak_rss())


def floor_compress(base: str, tune: str, delta_bytes: int, out: str) -> dict:
    """I/O floor of compress: read base and fine-tune, write ``delta_bytes`` and fsync."""
    cpu = time.process_time()
    buffer = np.zeros(16 << 20, np.uint8)
    for folder in (base, tune):
        for shard in sorted(Path(folder).glob("*.safetensors")):
            with open(shard, "rb", buffering=0) as src:
                while src.readinto(memoryview(buffer)):
                    pass
    with open(out, "wb") as dst:
        left = delta_bytes
        while left > 0:
            dst.write(memoryview(buffer)[:min(left, buffer.size)])
            left -= buffer.size
        dst.flush()
        os.fsync(dst.fileno())
    return {"peak_rss": peak_rss(), "cpu_seconds": time.process_time() - cpu}


def merge_run(base: str, tunes: list[str], out: str, rule: str, options: dict,
              max_memory: str | None) -> dict:
    """``sparsestitch.merge`` of full fine-tunes."""
    cpu = time.process_time()
    sparsestitch.merge(base, tunes, out, rule=rule, max_memory=max_memory, **options)
    return {"peak_rss": peak_rss(), "cpu_seconds": time.process_time() - cpu}


def compress_run(base: str, tune, out, options: dict) -> dict:
    """``sparsestitch.compress`` of one fine-tune (or a list, in one run); the deltas' size."""
    cpu = time.process_time()
    summaries = sparsestitch.compress(base, tune, out, **options)
    return {"peak_rss": peak_rss(), "cpu_seconds": time.process_time() - cpu,
            "bytes": sum(s.nbytes for s in summaries)}


def profile_merge(base: str, tunes: list[str], out: str, rule: str, options: dict,
                  stats_path: str) -> dict:
    """``merge_run`` under cProfile, reader threads off (see :func:`profile_stitch`)."""
    from sparsestitch.ops import stitch_engine as engine

    engine.READ_WORKERS = 0
    profiler = cProfile.Profile()
    profiler.enable()
    sparsestitch.merge(base, tunes, out, rule=rule, threads=1, **options)
    profiler.disable()
    profiler.dump_stats(stats_path)
    return {"stats": stats_path, "peak_rss": peak_rss()}
