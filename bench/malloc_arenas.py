"""One malloc arena or one per thread: peak memory and time of the commands that run worker
threads, with ``sparsestitch.core.native.one_malloc_arena`` on (the default) and off
(``SPARSESTITCH_MALLOC_ARENAS=any``, glibc's own choice), in the same interleaved rounds.

Jobs, on the synthetic llama-shaped bf16 model of ``bench/compress.py`` (the same cache):
the stitch of four lossless deltas of its fine-tune (task arithmetic), lossless and default
compress, and ``merge --rule localize-stitch --keep 0.01``.  Only stitch asks for one arena
(compress did until 2026-12-07: see docs/results-compress.md); the other rows are controls
whose two runs are the same code.

    python bench/malloc_arenas.py --size 0.5 --repeat 2

Prints a table; writes ``bench/results/malloc_arenas.json`` (``--json``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from common import describe_machine, interleaved, machine, table, write_json  # noqa: E402

JOBS = ("stitch 4 full", "lossless", "default", "merge 1%")


def job(arenas: str, kind: str, base: str, tune: str, deltas: str, out: str) -> dict:
    """One command with ``SPARSESTITCH_MALLOC_ARENAS=arenas`` (read when its threads start)."""
    os.environ["SPARSESTITCH_MALLOC_ARENAS"] = arenas
    import sparsestitch
    from sparsestitch.core import native

    if kind == "stitch 4 full":
        sparsestitch.stitch(base, deltas.split(","), out, rule="task-arithmetic", scale=0.25,
                            overwrite=True)
    elif kind == "merge 1%":
        sparsestitch.merge(base, [tune], out, rule="localize-stitch", keep=0.01, overwrite=True)
    else:
        options = {"lossless": True} if kind == "lossless" else {}
        sparsestitch.compress(base, tune, out, overwrite=True, **options)
    return {"one_arena": native.malloc_arena_limited()}  # whether the command asked for it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=0.5, help="synthetic model, GB")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--cache", default=str(BENCH / ".cache" / "compress"))
    parser.add_argument("--json", default=str(BENCH / "results" / "malloc_arenas.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from compress import full_deltas, synthetic_model

    model = synthetic_model(Path(args.cache), args.size)
    scratch = Path(args.cache) / f"arenas-{args.size:g}gb"
    scratch.mkdir(parents=True, exist_ok=True)
    deltas = ",".join(str(p) for p in full_deltas(model, scratch))
    kinds = [k.strip() for k in args.jobs.split(",") if k.strip()]
    specs = {}
    for kind in kinds:
        out = scratch / ("out-" + kind.replace(" ", "-").replace("%", "pc")
                         + (".delta" if kind in ("lossless", "default") else ""))
        for arenas in ("one", "any"):
            specs[f"{kind} ({arenas})"] = {
                "target": "malloc_arenas:job", "sys_path": [str(BENCH), str(REPO)],
                "args": (arenas, kind, str(model["base"]), str(model["tune"]), deltas, str(out)),
                "preload": ["sparsestitch", "numpy"]}
    results = interleaved(args.repeat, specs)
    rows = []
    for kind in kinds:
        one, anyone = results[f"{kind} (one)"], results[f"{kind} (any)"]
        for name, r in ((f"{kind}, one arena", one), (f"{kind}, glibc's arenas", anyone)):
            rows.append({"job": name, "wall": f"{r['best_s']:.2f}", "cpu": f"{r['cpu_s']:.2f}",
                         "rss": f"{(r['peak_rss'] - r['start_rss']) >> 20:,}",
                         "ratio": f"{r['best_s'] / anyone['best_s']:.2f}"})
    info = machine()
    print(f"\nllama bf16 {args.size:g} GB")
    print(table(rows, [("job", "job", "{}"), ("wall", "wall s", "{}"), ("cpu", "CPU s", "{}"),
                       ("rss", "RSS over start MiB", "{}"), ("ratio", "wall / glibc's", "{}")]))
    print(f"\n{describe_machine(info)}; best of {args.repeat} interleaved rounds")
    write_json(args.json, {"machine": info, "size_gb": args.size, "repeat": args.repeat,
                           "results": results, "rows": rows})


if __name__ == "__main__":
    main()
