"""Microbenchmark behind docs/results-stitch.md's remaining-problems section: the elementwise
combine of one tensor, as the stitcher does it now (``RuleCombiner``: ``rules.sorted_union``,
one stable argsort, then the rule's scatter-adds into the union) against a dense alternative
(scatter-add every delta straight into a tensor-sized wide buffer plus a per-position count,
then ``flatnonzero`` of the count gives the union; no sort at all), and ``sorted_union`` on
int32 copies of the positions.  The dense path must give the same positions and bits; this
checks that before timing.

    python bench/stitch_union_micro.py [--size-gb 2] [--deltas 16] [--tensor NAME]

Uses the cached model and deltas of bench/stitch.py (run that first); by default the tensor
with the most stored positions summed over the deltas.  Prints best-of-``--repeat`` seconds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from sparsestitch.checkpoint import Checkpoint
from sparsestitch.dtypes import dtype as lookup_dtype, from_wide, to_wide
from sparsestitch.format import DeltaReader
from sparsestitch.stitch.combine import CANONICAL_NAN, rule_combiner
from sparsestitch.stitch.engine import RowBlocks, gather
from sparsestitch.stitch.rules import sorted_union

CACHE = Path(__file__).resolve().parent / ".cache" / "stitch"


def dense_combine(rule, weights, dt, numel, stored):
    """Localize-stitch / task arithmetic by dense accumulation; same float operations per
    position, in the same order, as ``rules.localize_stitch`` / ``rules.task_arithmetic``."""
    wide = np.dtype(dt.wide)
    total = np.zeros(numel, wide)
    covering = np.zeros(numel, np.uint8 if len(stored) < 256 else np.uint16)
    start = np.zeros(numel, dt.bits)
    for s, weight in zip(stored, weights):
        if s is None:
            continue
        total[s.positions] += wide.type(weight) * (to_wide(s.finetuned, dt) - to_wide(s.base, dt))
        covering[s.positions] += 1
        start[s.positions] = s.base
    union = np.flatnonzero(covering)
    if rule == "localize-stitch":
        update = total[union] / np.maximum(covering[union].astype(wide), 1)
    else:
        update = wide.type(1.0) * total[union]
    merged = to_wide(start[union], dt) + update
    bits = from_wide(merged, dt)
    bits[np.isnan(merged)] = CANONICAL_NAN[dt.name]
    return union, bits


def best(function, repeat):
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", default="2")
    parser.add_argument("--deltas", type=int, default=16)
    parser.add_argument("--tensor", default=None)
    parser.add_argument("--rule", default="localize-stitch",
                        choices=("localize-stitch", "task-arithmetic"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    folder = CACHE / f"llama-{args.size_gb}gb-v1"
    paths = sorted(folder.glob("delta-d0.01-task*.delta"))[:args.deltas]
    readers = [DeltaReader(p) for p in paths]
    base = Checkpoint(folder / "base")
    name = args.tensor or max(base.names, key=lambda n: sum(
        r.record(n).count for r in readers if r.record(n) is not None))
    entry = base.entry(name)
    dt = lookup_dtype(entry.dtype)
    blocks = RowBlocks.of(entry.shape, dt.itemsize, 1 << 40)  # one block: decode once here
    decode_s, (stored, _) = best(lambda: gather(base, readers, name, blocks), args.repeat)
    count = sum(s.positions.size for s in stored if s is not None)
    combiner = rule_combiner(args.rule, None, len(readers))
    now_s, (positions, bits) = best(lambda: combiner(name, dt, entry.numel, stored), args.repeat)
    union_s, union = best(lambda: sorted_union([s.positions for s in stored if s is not None]),
                          args.repeat)
    narrow = [s.positions.astype(np.int32) for s in stored if s is not None]
    narrow_s, _ = best(lambda: sorted_union(narrow), args.repeat)
    dense_s, (dense_positions, dense_bits) = best(
        lambda: dense_combine(args.rule, combiner.weights, dt, entry.numel, stored), args.repeat)
    assert np.array_equal(positions, dense_positions) and np.array_equal(bits, dense_bits)
    print(f"{name}: {entry.numel:,} elements, {len(readers)} deltas, {count:,} stored positions, "
          f"union {union.positions.size:,} ({union.positions.size / entry.numel:.0%} of the "
          f"tensor), rule {args.rule}; best of {args.repeat}")
    print(f"  decode (engine.gather, one block)        {decode_s:7.3f} s")
    print(f"  RuleCombiner now                         {now_s:7.3f} s"
          f"  ({1e9 * now_s / count:.0f} ns per stored position)")
    print(f"    of which rules.sorted_union            {union_s:7.3f} s")
    print(f"    rules.sorted_union on int32 positions  {narrow_s:7.3f} s")
    print(f"  dense accumulation (same bits: checked)  {dense_s:7.3f} s"
          f"  ({1e9 * dense_s / count:.0f} ns per stored position)")


if __name__ == "__main__":
    main()
