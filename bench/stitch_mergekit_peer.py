"""The peer run of bench/stitch.py: task arithmetic with mergekit (run in mergekit's venv).

    python stitch_mergekit_peer.py BASE TUNE [TUNE ...] --out OUT

Merges ``base + sum_i (tune_i - base)`` (weight 1 each, no normalization, lambda 1),
computing in float32 and writing bfloat16: the same merge as sparsestitch's
``rule="task-arithmetic"`` (float32 arithmetic, rounded once to the model dtype).  Times
``mergekit.merge.run_merge`` only (imports excluded) and prints one line
``@@result {"seconds": ..., "cpu_seconds": ..., "start_rss": ..., "peak_rss": ..., "config": ...}``
(``cpu_seconds``: user + system time of all threads during ``run_merge``).
"""

from __future__ import annotations

import argparse
import json
import time

from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions


def merge_config(base: str, tunes: list[str]) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": base,
            "models": [{"model": t, "parameters": {"weight": 1.0}} for t in tunes],
            "parameters": {"normalize": False, "lambda": 1.0},
            "dtype": "float32", "out_dtype": "bfloat16"}


def peak_rss() -> int:
    """Own peak RSS (VmHWM): ru_maxrss would include the launching parent's RSS."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("tunes", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = merge_config(args.base, args.tunes)
    options = MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False,
                           quiet=True, safe_serialization=True)
    start_rss = peak_rss()
    cpu = time.process_time()
    started = time.perf_counter()
    run_merge(MergeConfiguration.model_validate(config), args.out, options)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    print("@@result " + json.dumps({"seconds": seconds, "cpu_seconds": cpu, "start_rss": start_rss,
                                    "peak_rss": peak_rss(), "config": config,
                                    "options": options.model_dump()}), flush=True)


if __name__ == "__main__":
    main()
