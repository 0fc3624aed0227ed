"""Does sparsestitch reproduce mergekit's merges bit for bit?

Question: with the same inputs, do sparsestitch's ``task-arithmetic`` and ``ties-mergekit``
rules write exactly the bits mergekit writes (``dtype: float32``, ``out_dtype: bfloat16``)?

Inputs: a small synthetic llama-shaped bf16 model and three full fine-tunes
(:func:`sparsestitch.checkpoint.synthetic.write_zoo`).  mergekit (``bench/requirements-stitch-peer.txt``,
in its own venv, see bench/stitch.py) merges the fine-tunes; sparsestitch compresses them at
density 1.0 (every position stored) and stitches the deltas.  Each merge is compared tensor
by tensor: elements whose bits differ.

    python bench/mergekit_agreement.py            # ~1 minute on 2 cores

Prints a table; writes ``bench/results/mergekit-agreement.json``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import describe_machine, machine, table, write_json  # noqa: E402

import sparsestitch  # noqa: E402
from sparsestitch.checkpoint import Checkpoint  # noqa: E402
from sparsestitch.checkpoint.synthetic import write_zoo  # noqa: E402

CACHE = BENCH / ".cache" / "mergekit-agreement"
MERGEKIT_PYTHON = BENCH / ".cache" / "stitch" / "mergekit-venv" / "bin" / "python"
#: (name, mergekit method and options, sparsestitch rule and options)
MERGES = [
    ("task arithmetic, weights 1/0.5/2, lambda 0.7",
     {"method": "task_arithmetic", "weights": [1.0, 0.5, 2.0], "scale": 0.7},
     {"rule": "task-arithmetic", "weights": [1.0, 0.5, 2.0], "scale": 0.7}),
    ("TIES, density 0.3, weights 1/0.5/2",
     {"method": "ties", "weights": [1.0, 0.5, 2.0], "density": 0.3},
     {"rule": "ties-mergekit", "weights": [1.0, 0.5, 2.0], "density": 0.3}),
    ("TIES, density 0.6, lambda 1.3",
     {"method": "ties", "density": 0.6, "scale": 1.3},
     {"rule": "ties-mergekit", "density": 0.6, "scale": 1.3}),
]


def mergekit(base: Path, tunes: list[Path], out: Path, method: str, weights=None,
             density: float = 1.0, scale: float = 1.0) -> None:
    args = [str(MERGEKIT_PYTHON), str(BENCH / "stitch_mergekit_peer.py"), str(base),
            *map(str, tunes), "--out", str(out), "--method", method, "--density", str(density),
            "--lambda", str(scale)]
    if weights:
        args += ["--weights", ",".join(str(w) for w in weights)]
    subprocess.run(args, check=True, capture_output=True, text=True)


def bits_of(folder: Path) -> dict[str, np.ndarray]:
    with Checkpoint(folder) as ckpt:
        return {name: ckpt.read(name).reshape(-1) for name in ckpt.names}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=20)
    parser.add_argument("--json", default=str(BENCH / "results" / "mergekit-agreement.json"))
    args = parser.parse_args(argv)
    if not MERGEKIT_PYTHON.exists():
        print(f"mergekit's venv is missing ({MERGEKIT_PYTHON}); see bench/requirements-stitch-peer.txt")
        return 2
    shutil.rmtree(CACHE, ignore_errors=True)
    base, tunes = write_zoo(CACHE / "zoo", args.size_mb << 20, 3, seed=7)
    deltas = [CACHE / f"{t.name}.delta" for t in tunes]
    sparsestitch.compress(base, tunes, deltas, density=1.0)
    rows = []
    for label, theirs, ours in MERGES:
        mine, peer = CACHE / f"ours-{len(rows)}", CACHE / f"mergekit-{len(rows)}"
        mergekit(base, tunes, peer, **theirs)
        options = dict(ours)
        sparsestitch.stitch(base, deltas, mine, **options)
        a, b = bits_of(mine), bits_of(peer)
        differing = {n: int(np.count_nonzero(a[n] != b[n])) for n in a if n in b}
        total = sum(v.size for v in a.values())
        rows.append({"merge": label, "tensors": len(differing), "elements": total,
                     "differing": sum(differing.values()),
                     "same_tensor_names": sorted(a) == sorted(b),
                     "worst": max(differing, key=differing.get) if differing else None,
                     "mergekit": theirs, "sparsestitch": ours})
    print(f"sparsestitch vs mergekit, {args.size_mb} MB bf16 model, 3 full fine-tunes; "
          f"{describe_machine(machine())}")
    print(table(rows, [("merge", "merge", "{}"), ("tensors", "tensors", "{}"),
                       ("elements", "elements", "{:,}"), ("differing", "differing bits", "{:,}"),
                       ("same_tensor_names", "same names", "{}")]))
    path = write_json(args.json, {"command": "python bench/mergekit_agreement.py "
                                  + " ".join(argv or sys.argv[1:]), "machine": machine(),
                                  "rows": rows})
    print(f"wrote {path}")
    return 0 if all(r["differing"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
