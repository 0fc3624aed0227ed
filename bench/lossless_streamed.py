"""Row-block restores of lossless deltas: how often the base is read, and how long it takes.

``bench/lossless.py`` restores with the default budget, where every tensor is decoded whole.
Tensors larger than the budget are restored row block by row block; a ``ulp`` record (not
elementwise) then needs one more pass over the base tensor for its exponent histograms
(``walk.part_counts``).  This script restores the deltas ``bench/lossless.py`` left in its
work folder with a small ``--block-bytes``, in a fresh process per source tree, counting the
base elements read (``Checkpoint.read_rows``) against the base's size, timing the restore,
and comparing the result with the fine-tune bit for bit::

    python bench/lossless_streamed.py --pairs news-bf16,news-f32 \\
        --before bench/.cache/lossless/src-main --block-bytes 4MiB

Prints a table; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
import sparsestitch
from sparsestitch.checkpoint import Checkpoint
try:
    from sparsestitch.core.sizes import parse_memory
except ModuleNotFoundError:  # a tree from before the layout by concept
    from sparsestitch.sizes import parse_memory

base, delta, out, tune, block = sys.argv[2:7]
read = {"elements": 0}
original = Checkpoint.read_rows

def counting(self, name, start, stop):
    rows = original(self, name, start, stop)
    read["elements"] += rows.size
    return rows

Checkpoint.read_rows = counting
started = time.perf_counter()
sparsestitch.restore(base, delta, out, block_bytes=parse_memory(block), overwrite=True)
seconds = time.perf_counter() - started
Checkpoint.read_rows = original
with Checkpoint(base) as b, Checkpoint(out) as r, Checkpoint(tune) as t:
    total = sum(b.entry(n).numel for n in b.names)
    exact = all((r.read(n) == t.read(n)).all() for n in t.names)
print(json.dumps({"seconds": seconds, "base_elements": total,
                  "read_elements": read["elements"], "exact": bool(exact),
                  "source": sparsestitch.__file__}))
"""


def main(argv=None) -> None:
    from lossless import CACHE, FIDELITY, model_file, pairs

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default="news-bf16,news-f32")
    parser.add_argument("--before", help="a sparsestitch source tree (built)")
    parser.add_argument("--block-bytes", default="4MiB")
    parser.add_argument("--work", type=Path, default=CACHE / "work")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    available = pairs(FIDELITY)
    trees = {"after": ROOT}
    if args.before:
        trees = {"before": Path(args.before).resolve(), **trees}
    rows = []
    for name in args.pairs.split(","):
        base_dir, tune_dir = available[name]
        for label, tree in trees.items():
            delta = args.work / f"{name}-{label}.delta"
            out = args.work / f"{name}-{label}-streamed"
            done = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(base_dir),
                                   str(delta), str(out), str(model_file(tune_dir)),
                                   args.block_bytes], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            shutil.rmtree(out, ignore_errors=True)
            if not result["exact"]:
                raise SystemExit(f"{name} ({label}): the row-block restore is not exact")
            rows.append({"pair": name, "tree": label, "block_bytes": args.block_bytes,
                         **result, "base_reads": result["read_elements"] / result["base_elements"]})
            print(f"{name:12} {label:6} {result['seconds']:7.1f} s  base read "
                  f"{rows[-1]['base_reads']:.2f} times  exact", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
