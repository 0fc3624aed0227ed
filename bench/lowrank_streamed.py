"""Low-rank records of matrices too large to hold: time, memory and error, before and after.

Question (issues 20 and 22): ``compress --low-rank`` held a matrix's change and its Gram
matrix whole, so a 70B model's MLP matrix (8192 x 28672) needed about 9.6 GiB and was
refused within the 1 GiB default. Matrices above the budget are now read again for each
product (``sparsestitch/localize/lowrank_stream.py``). What does that cost, and how does
its record compare with the held one where both run?

Inputs (built once into ``--cache``): ``f32 8192^2`` -- a float32 8192 x 8192 base (a 7B
model's largest square matrices are 4096^2; this is four times that) and a fine-tune whose
change is 16 directions plus noise; ``bf16 8192x28672`` -- a 70B Llama's MLP
down-projection in bfloat16, its change 32 directions plus noise. Each job runs in a fresh
process with numpy, torch and sparsestitch imported before the clock starts; RSS is the
peak over the interpreter's own. ``--before`` runs the same jobs with an older tree (a
refusal is recorded as such).

    python bench/lowrank_streamed.py --before /work/prev12
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from common import describe_machine, interleaved, machine, table, write_json  # noqa: E402

PAIRS = {"f32 8192^2": (8192, 8192, "float32", 16), "bf16 8192x28672": (8192, 28672, "bfloat16", 32)}
JOBS = [("f32 8192^2", {"max_memory": "256MiB"}),
        ("f32 8192^2", {"max_memory": "4GiB"}),
        ("f32 8192^2", {"max_memory": "256MiB", "max_size": "2MB"}),
        ("f32 8192^2", {"max_memory": "4GiB", "max_size": "2MB"}),
        ("bf16 8192x28672", {}),
        ("bf16 8192x28672", {"max_memory": "256MiB"}),
        ("bf16 8192x28672", {"max_size": 14680064}),
        ("bf16 8192x28672", {"max_memory": "256MiB", "max_size": 14680064})]


def make_pair(cache: Path, label: str) -> tuple[str, str]:
    rows, cols, dtype, rank = PAIRS[label]
    folder = cache / label.replace(" ", "-").replace("^", "")
    base, tune = folder / "base.safetensors", folder / "tune.safetensors"
    if not (folder / "done").exists():
        import torch
        from safetensors.torch import save_file
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(rows + cols)
        weights = torch.randn(rows, cols, generator=g).mul_(0.02)
        change = (0.002 * torch.randn(rows, rank, generator=g)) @ torch.randn(
            rank, cols, generator=g).div_(rank ** 0.5)
        change += 0.0005 * torch.randn(rows, cols, generator=g)
        kind = getattr(torch, dtype)
        save_file({"mlp.weight": weights.to(kind)}, base)
        save_file({"mlp.weight": (weights + change).to(kind)}, tune)
        (folder / "done").write_text("")
    return str(base), str(tune)


def job(base: str, tune: str, out: str, options: str) -> dict:
    """One ``compress --low-rank`` (in the child): its bytes and reported error, or the
    refusal's message."""
    import sparsestitch
    from sparsestitch.core.errors import OptionError
    try:
        (summary,) = sparsestitch.compress(base, tune, out, low_rank=True, overwrite=True,
                                           **json.loads(options))
    except OptionError as exc:
        return {"refused": str(exc)}
    return {"bytes": summary.nbytes, "relative_error": summary.fidelity["relative_error"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=str(BENCH / ".cache" / "lowrank"))
    parser.add_argument("--before", help="also run every job with this source tree")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", default=str(BENCH / "results" / "lowrank_streamed.json"))
    args = parser.parse_args(argv)
    cache = Path(args.cache)
    trees = {"now": REPO} | ({"before": Path(args.before)} if args.before else {})
    jobs = {}
    for i, (label, options) in enumerate(JOBS):
        base, tune = make_pair(cache, label)
        for tree_name, tree in trees.items():
            name = f"{label} {json.dumps(options)} ({tree_name})"
            jobs[name] = {"target": "lowrank_streamed:job", "sys_path": [str(tree), str(BENCH)],
                          "args": [base, tune, str(cache / f"out-{i}-{tree_name}.delta"),
                                   json.dumps(options)],
                          "preload": ["numpy", "torch", "sparsestitch"]}
    measured = interleaved(args.repeat, jobs)
    rows = [{"job": name, "wall_s": r["best_s"], "cpu_s": r["cpu_s"],
             "rss_over_start_mib": (r["peak_rss"] - r["start_rss"]) / 2**20, **r["result"]}
            for name, r in measured.items()]
    print(table(rows, [("job", "job", "{}"), ("wall_s", "wall s", "{:.2f}"),
                       ("cpu_s", "CPU s", "{:.2f}"),
                       ("rss_over_start_mib", "RSS over start MiB", "{:,.0f}"),
                       ("bytes", "delta bytes", "{:,}"),
                       ("relative_error", "relative error", "{:.4f}")]))
    for row in rows:
        if "refused" in row:
            print(f"{row['job']}: refused: {row['refused']}")
    info = machine()
    print(describe_machine(info))
    write_json(args.json, {"command": " ".join(sys.argv), "machine": info,
                           "rows": rows, "repeat": args.repeat})
    return 0


if __name__ == "__main__":
    sys.exit(main())
