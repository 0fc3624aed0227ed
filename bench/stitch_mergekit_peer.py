"""The peer run of bench/stitch.py and bench/mergekit_agreement.py: a mergekit merge (run in
mergekit's venv).

    python stitch_mergekit_peer.py BASE TUNE [TUNE ...] --out OUT [--method ties --density D]
                                   [--weights 1,0.5] [--lambda L]

Task arithmetic merges ``base + lambda * sum_i w_i (tune_i - base)`` (no normalization),
computing in float32 and writing bfloat16: the same merge as sparsestitch's
``rule="task-arithmetic"`` (float32 arithmetic, rounded once to the model dtype); TIES is
mergekit's ``ties`` with ``density`` per model (sparsestitch's ``rule="ties-mergekit"``).
Times
``mergekit.merge.run_merge`` only (imports excluded) and prints one line
``@@result {"seconds": ..., "cpu_seconds": ..., "start_rss": ..., "peak_rss": ..., "config": ...}``
(``cpu_seconds``: user + system time of all threads during ``run_merge``).
"""

from __future__ import annotations

import argparse
import json
import time

import os

from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions


def _offline_file_lists() -> None:
    """With ``HF_HUB_OFFLINE=1``: mergekit lists a Hub model's files over the network
    (``list_repo_files``) before taking its snapshot, which fails offline; answer that listing
    from the snapshot in the local cache instead (what the network would list for it)."""
    import huggingface_hub

    def cached_files(repo_id, *args, revision=None, **kwargs):
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                   local_files_only=True)
        return sorted(os.listdir(folder))

    huggingface_hub.list_repo_files = cached_files


if os.environ.get("HF_HUB_OFFLINE") == "1":
    _offline_file_lists()


def merge_config(base: str, tunes: list[str], method: str = "task_arithmetic",
                 weights: list[float] | None = None, density: float = 1.0,
                 scale: float = 1.0) -> dict:
    weights = weights or [1.0] * len(tunes)
    models = [{"model": t, "parameters": {"weight": w} | (
        {"density": density} if method != "task_arithmetic" else {})}
        for t, w in zip(tunes, weights)]
    parameters = {"lambda": scale} | ({"normalize": False} if method == "task_arithmetic" else {})
    return {"merge_method": method, "base_model": base, "models": models,
            "parameters": parameters, "dtype": "float32", "out_dtype": "bfloat16"}


def peak_rss() -> int:
    """Own peak RSS (VmHWM): ru_maxrss would include the launching parent's RSS."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base", nargs="?")
    parser.add_argument("tunes", nargs="*")
    parser.add_argument("--config", help="a mergekit YAML config, run as it is (base and "
                                         "tunes then not given)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", default="task_arithmetic",
                        choices=["task_arithmetic", "ties", "dare_ties", "breadcrumbs"])
    parser.add_argument("--weights", default=None)
    parser.add_argument("--density", type=float, default=1.0)
    parser.add_argument("--lambda", dest="scale", type=float, default=1.0)
    parser.add_argument("--out-shard-size", default=None,
                        help="mergekit's output shard size in bytes, e.g. 1e9 (default: mergekit's)")
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    if args.config:
        import yaml
        with open(args.config) as handle:
            config = yaml.safe_load(handle)
    else:
        config = merge_config(args.base, args.tunes, args.method, weights, args.density,
                              args.scale)
    shard = {} if args.out_shard_size is None else {"out_shard_size": int(float(args.out_shard_size))}
    options = MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False,
                           quiet=True, safe_serialization=True, **shard)
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
