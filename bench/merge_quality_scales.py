"""Task arithmetic and DARE at scales 0.1-0.3, on the cached fine-tunes, heads and data of
bench/merge_quality.py (run that first; it makes the cache).  Its first grid started at 0.3,
and both methods picked that edge; this settles what a smaller lambda gives.

    python bench/merge_quality_scales.py [CACHE]   # default bench/.cache/merge_quality

Prints validation and test normalized means per scale; writes
bench/results/merge_quality_low_scales.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import merge_quality as mq  # noqa: E402
from mq_tasks import TASK_NAMES, load_task  # noqa: E402

import sparsestitch  # noqa: E402

SCALES = (0.1, 0.15, 0.2, 0.25, 0.3)


def main() -> None:
    torch.set_num_threads(2)
    device = torch.device("cpu")
    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else BENCH / ".cache" / "merge_quality"
    tasks = [load_task(name) for name in TASK_NAMES]
    missing = [t.name for t in tasks if not (cache / "finetuned" / t.name / "model.safetensors").exists()]
    if missing:
        sys.exit(f"no cached fine-tunes of {missing} under {cache}: run bench/merge_quality.py first")
    encoder, tokenizer = mq.load_pretrained()
    base_path = mq.save_base(encoder, cache)
    encoded = {t.name: mq.encode_task(tokenizer, t) for t in tasks}
    paths, heads = {}, {}
    for t in tasks:
        paths[t.name], heads[t.name] = mq.cached_fine_tune(
            encoder, base_path, t, encoded[t.name], mq.FineTuneProtocol(), cache, device)
    names = [t.name for t in tasks]
    evaluator = mq.Evaluator(encoder, heads, encoded, device)
    individual = {n: evaluator.accuracy(paths[n], [n])[n] for n in names}
    individual_val = {n: evaluator.accuracy(paths[n], [n], "val")[n] for n in names}
    work = cache / "work-scales"
    work.mkdir(parents=True, exist_ok=True)
    full = mq.compress_all(base_path, [paths[n] for n in names], work / "full", names,
                           density=1.0)
    out = {}
    for rule, options in (("task-arithmetic", {}), ("dare", {"drop": mq.DARE_DROP, "seed": 0})):
        for scale in SCALES:
            started = time.time()
            sparsestitch.stitch(base_path, full.paths, work / "merged", rule=rule, scale=scale,
                                overwrite=True, **options)
            val = mq.normalized_mean(evaluator.accuracy(work / "merged", names, "val"),
                                     individual_val)
            test = mq.normalized_mean(evaluator.accuracy(work / "merged", names, "test"),
                                      individual)
            out[f"{rule} {scale}"] = {"val": val, "test": test}
            print(f"{rule:16s} scale {scale:<5} val {val:.4f} test {test:.4f}  "
                  f"({time.time() - started:.0f} s)", flush=True)
    (BENCH / "results" / "merge_quality_low_scales.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
