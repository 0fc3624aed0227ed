"""Every change of a tensor too large for the memory budget, stored exactly, in two passes.

A lossless delta (and a tensor stored exactly in any delta: non-float, ``--dense``) keeps
every changed element with its exact bits.  Selected whole, that holds about 13 bytes per
bfloat16 element (the kept bits, the base's, a bitmap, the stream and its compressed copy):
gigabytes for a 7B model's embedding, 14 GB for a 70B's.  Above the budget the tensor is
read twice instead, a row block at a time: the first pass counts its changes, hashes the
base, takes a strided sample to choose the value codec (as :func:`~..delta.codecs.encode_values`
chooses on a sample) and counts the codec's contexts; the second writes the streams into
temporary files beside the output (:class:`~..delta.spooled.SpooledExactRecord`).  The record is
exact and in the same format; positions are ``all`` or a bitmap, values ``xor``, ``raw`` or
``ulp`` (``tau`` and the list codecs are not streamed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.dtypes import dtype as lookup_dtype
from ..delta.codecs import VALUE_CODECS, VALUE_SAMPLE_SIZE
from ..delta.format import Record
from ..delta.spooled import SpooledExactRecord
from ..engine.walk import BaseHash
from .selection import TensorScanner

#: Value codecs that can write a record a run at a time (they have ``run_planes``).
STREAMED_CODECS = tuple(c for c in VALUE_CODECS if c.exact and hasattr(c, "run_planes"))

#: Elements per row block of both passes: a quarter of compress's blocks, since a block's
#: bits are copied a few times over (changed marks, kept values, their planes).
BLOCK_ELEMENTS = 1 << 18

#: What one zstd context, the copy buffer and the spools' buffers hold at most, and what
#: each zstd worker adds (measured: 26-43 MiB for two workers, 39-62 for four).
FIXED_BYTES = 16 << 20
WORKER_BYTES = 24 << 20


def held_bytes(itemsize: int, threads: int = 1) -> int:
    """What writing one tensor's records this way holds at worst: a block of the base and
    of two fine-tunes (the one being read and the last), and the kept bits, their base bits
    and planes of one block, besides :data:`FIXED_BYTES` and the zstd workers'."""
    return BLOCK_ELEMENTS * (itemsize * (3 + 3) + 2) + FIXED_BYTES + WORKER_BYTES * max(1, threads)


def streamed_exact_records(scanner: TensorScanner, name: str, output: Path, threads: int = 1
                           ) -> list[tuple[Record, object]]:
    """Every fine-tune's exact record of tensor ``name`` (every changed element), written
    through temporary files beside ``output``: ``(record, payload)`` each, the payload a
    :class:`~..delta.spooled.SpooledPayload` (or ``b""`` for an unchanged tensor); the
    streams are compressed by ``threads`` zstd workers."""
    entry = scanner.base.entry(name)
    dt = lookup_dtype(entry.dtype)
    scanner = TensorScanner(scanner.base, scanner.tunes, scanner.plan,
                            min(scanner.chunk_elements, BLOCK_ELEMENTS))
    survey = _Survey(len(scanner.tunes), entry.numel, dt)
    base_hash = BaseHash(name)
    for block in scanner.tune_blocks(name, base_hash=base_hash):
        survey.add(block.tune, block.finetuned, block.base)
    base_xxh3 = base_hash.hexdigest()
    builders: list[SpooledExactRecord | None] = []
    try:
        for tune in range(len(scanner.tunes)):
            count = survey.counts[tune]
            codec = survey.codec(tune)
            builders.append(None if count == 0 else SpooledExactRecord(
                output, name, dt, entry.shape, count, codec,
                survey.contexts[tune] if codec.codec_id == "ulp" else None, threads))
        for block in scanner.tune_blocks(name):
            builder = builders[block.tune]
            if builder is None:
                continue
            if builder.bitmap is None:  # every element changed
                builder.add_run(None, block.finetuned, block.base)
            else:
                changed = block.finetuned != block.base
                builder.add_run(changed, block.finetuned[changed], block.base[changed])
        return [(Record(name, entry.dtype, entry.shape, "base", base_xxh3), b"")
                if builder is None else builder.finish(base_xxh3) for builder in builders]
    except BaseException:
        for builder in builders:
            if builder is not None:
                builder.close()
        raise


class _Survey:
    """The first pass: each fine-tune's count of changes, a strided sample of them (every
    ``step``-th changed element) and, for floats, the ``ulp`` contexts at them."""

    def __init__(self, tunes: int, numel: int, dt):
        self.dt = dt
        self.step = max(1, numel // VALUE_SAMPLE_SIZE)
        self.counts = [0] * tunes
        self.samples: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(tunes)]
        self.ulp = next((c for c in STREAMED_CODECS if c.codec_id == "ulp"), None)
        self.contexts: list[np.ndarray | None] = [None] * tunes

    def add(self, tune: int, finetuned: np.ndarray, base: np.ndarray) -> None:
        changed = finetuned != base
        kept, base_kept = finetuned[changed], base[changed]
        first = -self.counts[tune] % self.step  # the first kept index here that is sampled
        self.samples[tune].append((kept[first::self.step].copy(),  # not views of the block
                                   base_kept[first::self.step].copy()))
        self.counts[tune] += kept.size
        if self.dt.is_float and kept.size:
            counts = self.ulp.run_contexts(base_kept, self.dt)
            known = self.contexts[tune]
            self.contexts[tune] = counts if known is None else known + counts

    def codec(self, tune: int):
        """The streamed value codec whose stream of the sample is smallest (ties: the
        registry's order)."""
        kept = np.concatenate([k for k, _ in self.samples[tune]])
        base = np.concatenate([b for _, b in self.samples[tune]])
        candidates = [c for c in STREAMED_CODECS if c.applies(self.dt)]
        return min(candidates, key=lambda c: len(c.encode(kept, base, self.dt)[0]))
