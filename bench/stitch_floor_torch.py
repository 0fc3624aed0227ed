"""The I/O floor bench/stitch.py compares against: ``safetensors.torch.load_file`` +
``save_file`` of every shard of the base.  torch is imported here, at module import, so that
``common.measure`` keeps the import out of the timed call (and out of the sparsestitch runs).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from stitch_runs import peak_rss


def load_save(base: str, out: str, fsync: bool) -> dict:
    """Load each shard whole, save it under ``out``; ``fsync`` also flushes it to disk."""
    cpu = time.process_time()
    shards = sorted(Path(base).glob("*.safetensors"))
    Path(out).mkdir()
    for shard in shards:
        with safe_open(shard, "pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(shard)
        save_file(tensors, Path(out) / shard.name, metadata=metadata)
        del tensors
        if fsync:
            with open(Path(out) / shard.name, "rb+") as written:
                os.fsync(written.fileno())
    return {"shards": len(shards), "peak_rss": peak_rss(), "cpu_seconds": time.process_time() - cpu}
