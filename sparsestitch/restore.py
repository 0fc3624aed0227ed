"""Restore a fine-tuned checkpoint from its base and delta, bit for bit at stored positions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .stitch import engine


def _exact(name, dt, numel, stored):
    (record,) = stored
    if record is None:
        return np.empty(0, np.int64), np.empty(0, dt.bits)
    return record.positions, record.finetuned


def restore(base: str | os.PathLike, delta: str | os.PathLike, out: str | os.PathLike, *,
            overwrite: bool = False, progress: bool = False,
            block_bytes: int = engine.DEFAULT_BLOCK_BYTES) -> Path:
    """Write the fine-tuned model a delta describes: the base with the stored values put back.

    Every stored position gets the fine-tuned bits exactly; every other position keeps
    the base's bits (so a ``density=1.0`` delta restores the fine-tune bit for bit).
    The output mirrors the base: a ``.safetensors`` file, or a folder with the same
    shards, index and non-weight files.

    >>> restore("base.safetensors", "math.delta", "math.safetensors")  # doctest: +SKIP
    """
    return engine.run(base, [delta], out, _exact, overwrite=overwrite, progress=progress,
                      description="restore",
                      block_bytes=block_bytes)
