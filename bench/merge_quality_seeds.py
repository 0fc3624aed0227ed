"""Merge quality over fine-tuning seeds, with paired bootstrap confidence intervals.

``bench/merge_quality.py`` measures one set of four MiniLM fine-tunes (seed 0).  This
script repeats its merge table for the fine-tunes of several seeds -- the ones
``bench/fidelity_models.py prepare --minilm --seeds 0,1,2`` caches, reused here and never
trained again -- and adds rows for the deltas sparsestitch can now write:

* today's rows: pretrained encoder, individual fine-tunes, each fine-tune alone on all
  tasks, simple average, task arithmetic, TIES and DARE (lambda tuned on validation over
  ``merge_quality.SCALES``), Localize-and-Stitch from dataless 1% and 5% deltas with
  ``scope="global"`` (the paper's top-k of |tau|) and from trained 1% masks, and each
  fine-tune restored from its own 1% delta;
* rows for stored deltas (issue 23): Localize-and-Stitch over compress's default deltas as
  they are, and localized again at stitch time (``stitch(..., keep=0.05)``), and each
  fine-tune restored from its default delta;
* new rows: Localize-and-Stitch from dataless deltas with ``scope="fidelity"`` (the new
  default of ``compress``) at 1% and 5%, and from quantized deltas (every changed value in
  1 bit, group 128; 20% of values in 2 bits, group 128), plus each fine-tune restored from
  those deltas.

Every row keeps, per task, which test examples it classifies correctly, so differences
between rows get a paired bootstrap: test examples are resampled (with replacement, every
task at once, 2,000 times, a fixed RNG seed) and both rows of a comparison are scored on
the same resampled examples.  The four test sets are the same texts for every seed (the
data split is seeded with 0), so the pooled interval applies one resample to all seeds.
The intervals measure test-set noise given these fine-tunes; with three seeds, variation
between seeds is shown per seed, not folded into an interval.

Each seed's rows are cached (``<cache>/seed<s>/rows.json``, written after every row) and
its trained masks too, so a restarted run resumes where it stopped.

Usage::

    python bench/merge_quality_seeds.py --threads 1          # ~35-50 min per seed, 2 busy cores
    python bench/merge_quality_seeds.py --cached-only --partial   # report the cached rows only
    python bench/merge_quality_seeds.py --smoke --cache /tmp/mqs-smoke --json /tmp/mqs.json
    python bench/merge_quality_seeds.py --only ties,task_arithmetic,ls_default,ls_default_keep5 \
        --partial                                           # issue 23: stored deltas merged
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import merge_quality as mq  # noqa: E402
from common import describe_machine, machine, write_json  # noqa: E402
from fidelity_models import _minilm_head, prepare_minilm  # noqa: E402
from fidelity_models import digest_files as _digest  # noqa: E402
from mq_tasks import TASK_NAMES, load_task  # noqa: E402

import sparsestitch  # noqa: E402

REPO = BENCH.parent

# Delta sets: how each is compressed (arguments of merge_quality.compress_all).
DELTA_SETS = {
    "full": {"density": 1.0},
    "global1": {"density": 0.01, "scope": "global"},
    "global5": {"density": 0.05, "scope": "global"},
    "trained1": {"masks": "trained"},
    "fidelity1": {"density": 0.01, "scope": "fidelity"},
    "fidelity5": {"density": 0.05, "scope": "fidelity"},
    "q1d100": {"density": 1.0, "bits": 1, "group": 128, "scope": "fidelity"},
    "q2d20": {"density": 0.2, "bits": 2, "group": 128, "scope": "fidelity"},
    "default": {},   # compress's default (max_error 0.5): what a zoo stores, made for restoring
}

# Rows: key -> (label, kind, arguments).  Order is the table's.
ROWS = {
    "pretrained": ("pretrained encoder + fine-tuned heads", "pretrained", {}),
    "individual": ("individual fine-tunes (each on its own task)", "individual", {}),
    **{f"alone_{t}": (f"fine-tune '{t}' alone on all tasks", "alone", {"task": t})
       for t in TASK_NAMES},
    "average": ("simple average", "average", {}),
    "task_arithmetic": ("task arithmetic", "tuned", {"rule": "task-arithmetic"}),
    "ties": ("TIES", "tuned", {"rule": "ties", "density": mq.TIES_DENSITY}),
    "dare": ("DARE", "tuned", {"rule": "dare", "drop": mq.DARE_DROP, "seed": 0}),
    "ls_global1": ("Localize-and-Stitch, dataless 1%, scope global (paper)", "stitch",
                   {"deltas": "global1"}),
    "ls_global5": ("Localize-and-Stitch, dataless 5%, scope global (paper)", "stitch",
                   {"deltas": "global5"}),
    "ls_trained1": ("Localize-and-Stitch, trained 1%", "stitch", {"deltas": "trained1"}),
    "ls_fidelity1": ("Localize-and-Stitch, dataless 1%, scope fidelity (new default)",
                     "stitch", {"deltas": "fidelity1"}),
    "ls_fidelity5": ("Localize-and-Stitch, dataless 5%, scope fidelity (new default)",
                     "stitch", {"deltas": "fidelity5"}),
    "ls_q1d100": ("Localize-and-Stitch, every changed value in 1 bit (group 128)", "stitch",
                  {"deltas": "q1d100"}),
    "ls_q2d20": ("Localize-and-Stitch, 20% of values (fidelity) in 2 bits (group 128)",
                 "stitch", {"deltas": "q2d20"}),
    "ls_default": ("Localize-and-Stitch over default deltas, as they are", "stitch",
                   {"deltas": "default"}),
    "ls_default_keep5": ("Localize-and-Stitch over default deltas localized at 5% (--keep 0.05)",
                         "stitch", {"deltas": "default", "keep": 0.05}),
    "restored_default": ("each fine-tune restored from its own default delta", "restored",
                         {"deltas": "default"}),
    "restored_global1": ("each fine-tune restored from its own dataless 1% global delta",
                         "restored", {"deltas": "global1"}),
    "restored_trained1": ("each fine-tune restored from its own trained 1% delta",
                          "restored", {"deltas": "trained1"}),
    "restored_fidelity1": ("each fine-tune restored from its own dataless 1% fidelity delta",
                           "restored", {"deltas": "fidelity1"}),
    "restored_q1d100": ("each fine-tune restored from its own 1-bit delta", "restored",
                        {"deltas": "q1d100"}),
    "restored_q2d20": ("each fine-tune restored from its own 20% 2-bit delta", "restored",
                       {"deltas": "q2d20"}),
}

# The order rows are computed in (the table keeps ROWS's order): the evaluations every row
# needs first, then the rows of the key comparisons, cheapest first, so that a seed stopped
# part way still answers the most questions; trained masks (the slowest) last.
COMPUTE_ORDER = [
    "pretrained", "individual", *[f"alone_{t}" for t in TASK_NAMES],
    "ls_global1", "ls_fidelity1", "ls_global5", "ls_fidelity5",
    "ls_default_keep5", "ls_default", "restored_default",
    "restored_q1d100", "restored_q2d20", "task_arithmetic", "average", "ls_q1d100", "ls_q2d20",
    "ties", "restored_global1", "restored_fidelity1", "dare", "ls_trained1", "restored_trained1",
]
assert sorted(COMPUTE_ORDER) == sorted(ROWS)

# Paired comparisons (A, B): the difference is A - B in normalized mean.
# "key": the questions the benchmark is run for -- the new fidelity scope against the paper's
# global top-k at the same density; Localize-and-Stitch against task arithmetic and TIES;
# quantized deltas against their lossless counterparts (a fine-tune restored losslessly is
# the fine-tune itself, the "individual" row; merged, the lossless counterpart of a
# density-1.0 Localize-and-Stitch is the simple average, which is what it computes wherever
# all four fine-tunes changed a value).
KEY_COMPARISONS = [
    ("ls_fidelity1", "ls_global1"),
    ("ls_fidelity5", "ls_global5"),
    ("ls_global1", "ties"),
    ("ls_global1", "task_arithmetic"),
    ("ls_trained1", "ties"),
    ("ls_trained1", "task_arithmetic"),
    ("ls_global5", "ties"),
    ("ls_global5", "task_arithmetic"),
    ("ls_fidelity1", "ties"),
    ("ls_fidelity5", "ties"),
    ("restored_q1d100", "individual"),
    ("restored_q2d20", "individual"),
    ("ls_q1d100", "average"),
    ("ls_q1d100", "ties"),
    ("ls_q2d20", "ties"),
    ("ls_default_keep5", "ties"),
    ("ls_default_keep5", "task_arithmetic"),
    ("ls_default_keep5", "ls_default"),
    ("ls_default", "ties"),
]
CONTEXT_COMPARISONS = [
    ("ls_trained1", "ls_global1"),
    ("restored_fidelity1", "restored_global1"),
    ("ls_trained1", "dare"),
    ("ties", "task_arithmetic"),
    ("dare", "task_arithmetic"),
]


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    seeds = tuple(int(s) for s in args.seeds.split(","))
    names = list(TASK_NAMES)
    mini = prepare_minilm(Path(args.minilm_cache), seeds=seeds, tasks=names)
    encoder, tokenizer = mq.load_pretrained()
    tasks = {name: load_task(name) for name in names}
    encoded = {name: mq.encode_task(tokenizer, tasks[name]) for name in names}
    mask_protocol = mq.MaskProtocol()
    if args.smoke:  # tiny splits, one scale, short mask learning: checks the plumbing only
        mq.SCALES = (0.3,)
        mask_protocol = replace(mask_protocol, examples=32, epochs=1)
        for split in encoded.values():
            for part in ("val", "test"):
                split[part] = (split[part][0][:64], split[part][1][:64])
    cache = Path(args.cache)
    per_seed = {}
    for seed in seeds:
        only = set(args.only.split(",")) if args.only else None
        if only and only - set(ROWS):
            raise SystemExit(f"--only: unknown rows {sorted(only - set(ROWS))}")
        result = run_seed(seed, mini, encoder, encoded, tasks, mask_protocol,
                          cache / f"seed{seed}", smoke=args.smoke, cached_only=args.cached_only,
                          only=only)
        if result is None:
            print(f"seed {seed}: no rows cached, left out (--cached-only)", flush=True)
            continue
        if not complete(result) and not args.partial:
            print(f"seed {seed}: {len(result['rows'])} of {len(ROWS)} rows cached, left out "
                  "(--partial reports them)", flush=True)
            continue
        per_seed[seed] = result
        # The report of the seeds done so far, rewritten after each seed: a run stopped
        # before its last seed still leaves the complete ones' tables and intervals.
        write_report(args, argv, per_seed, seeds, names, encoded, mask_protocol, started)


def complete(result):
    return all(key in result["rows"] for key in ROWS)


def write_report(args, argv, per_seed, seeds, names, encoded, mask_protocol, started):
    analysis = analyse(per_seed, names, args.resamples, args.bootstrap_seed)
    report = {
        "command": " ".join(["python", "bench/merge_quality_seeds.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "smoke": args.smoke,
        "seeds": list(per_seed),
        "seeds_complete": [seed for seed, result in per_seed.items() if complete(result)],
        "seeds_requested": list(seeds),
        "tasks": {name: {"test": len(encoded[name]["test"][0]),
                         "val": len(encoded[name]["val"][0])} for name in names},
        "scales": list(mq.SCALES),
        "ties_density": mq.TIES_DENSITY,
        "dare_drop": mq.DARE_DROP,
        "mask_protocol": asdict(mask_protocol),
        "delta_sets": DELTA_SETS,
        "bootstrap": {"resamples": args.resamples, "rng": "numpy.random.default_rng",
                      "rng_seed": args.bootstrap_seed,
                      "statistic": "difference in normalized mean accuracy (A - B); each "
                                   "resample draws every task's test examples with "
                                   "replacement, the same draw for A, B, the individual "
                                   "fine-tune (the normalizer) and every seed",
                      "interval": "2.5 and 97.5 percentiles"},
        **analysis,
        "per_seed": {str(seed): {**{k: v for k, v in result.items() if k != "rows"},
                                 "complete": complete(result),
                                 "rows": analysis_rows_of(result, names)}
                     for seed, result in per_seed.items()},
        "per_example_correct": {
            "encoding": "hex of numpy.packbits (big bit order) of the bool array of test "
                        "examples in split order (mq_tasks.load_task, split seed 0); "
                        "'n' examples",
            "rows": {str(seed): {key: row["correct"] for key, row in result["rows"].items()}
                     for seed, result in per_seed.items()}},
        "timings_s": {"total_s": time.time() - started,
                      **{f"seed{seed}": result["timings_s"] for seed, result in per_seed.items()}},
    }
    print(format_report(report))
    print(f"wrote {write_json(args.json, report)}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds, e.g. 0,1,2")
    parser.add_argument("--minilm-cache", default="/work/cache/fidelity/minilm",
                        help="fidelity_models.prepare_minilm's cache: base, seed<s>/ fine-tunes "
                             "and heads")
    parser.add_argument("--cache", default=str(REPO / "bench/.cache/merge_quality_seeds"),
                        help="per-seed deltas, merges, trained masks and rows (resumable)")
    parser.add_argument("--json", default=str(REPO / "bench/results/merge_quality_seeds.json"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="bootstrap RNG seed")
    parser.add_argument("--cached-only", action="store_true",
                        help="compute nothing: report the seeds whose rows are all cached "
                             "and skip the others")
    parser.add_argument("--partial", action="store_true",
                        help="with --cached-only, also report seeds with only some rows "
                             "cached: their rows in the per-seed tables and comparisons, "
                             "never in the means over complete seeds")
    parser.add_argument("--only", help="compute only these rows (keys, comma-separated; e.g. "
                                       "ties,task_arithmetic,ls_default,ls_default_keep5); "
                                       "report with --partial")
    parser.add_argument("--smoke", action="store_true",
                        help="64 val/test examples per task, one scale, 32-example 1-epoch "
                             "masks: a quick check of the plumbing, not a result")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------- one seed


def pack(correct: torch.Tensor) -> dict:
    return {"n": len(correct), "hex": np.packbits(correct.numpy().astype(bool)).tobytes().hex()}


def unpack(packed: dict) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(packed["hex"]), np.uint8))
    return bits[:packed["n"]].astype(bool)


def run_seed(seed, mini, encoder, encoded, tasks, mask_protocol, folder, *, smoke=False,
             cached_only=False, only=None):
    """Every row of one seed's table, resumed from ``folder/rows.json`` where cached.

    With ``cached_only`` nothing is computed: the cached rows (possibly not all of them),
    or None if there are none; ``only`` (row keys) computes just those rows."""
    names = list(tasks)
    folder.mkdir(parents=True, exist_ok=True)
    base = mini.base
    fine_tunes = [mini.fine_tunes[seed][name] for name in names]
    key = {"seed": seed, "smoke": smoke, "scales": list(mq.SCALES),
           "mask_protocol": asdict(mask_protocol), "delta_sets": DELTA_SETS,
           "checkpoints_sha256": _digest([base / "model.safetensors",
                                          *[f / "model.safetensors" for f in fine_tunes],
                                          *[mini.heads[seed][n] for n in names]]),
           "test_sizes": {n: len(encoded[n]["test"][0]) for n in names}}
    record_path = folder / "rows.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if record.get("key") != key:
        record = {"key": key, "rows": {}, "timings_s": {}, "deltas": {}}
    rows, timings = record["rows"], record["timings_s"]

    def save():
        tmp = record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, record_path)

    if all(k in rows for k in ROWS):
        print(f"seed {seed}: all {len(ROWS)} rows cached", flush=True)
        return record
    if cached_only:
        return record if rows else None
    heads = {name: _minilm_head(mini.heads[seed][name], name) for name in names}
    evaluator = mq.Evaluator(encoder, heads, encoded, torch.device("cpu"))
    work = folder / "work"
    work.mkdir(exist_ok=True)

    def timed(label, fn, *args, **kwargs):
        began = time.time()
        value = fn(*args, **kwargs)
        timings[label] = timings.get(label, 0.0) + time.time() - began
        return value

    own = timed("evaluate_fine_tunes_s", lambda: {
        name: evaluator.correct(mini.fine_tunes[seed][name], names) for name in names})
    individual_correct = {name: own[name][name] for name in names}
    individual = {name: c.sum().item() / len(c) for name, c in individual_correct.items()}
    individual_val = timed("evaluate_fine_tunes_s", lambda: {
        name: evaluator.accuracy(mini.fine_tunes[seed][name], [name], "val")[name]
        for name in names})
    record["individual_test"], record["individual_val"] = individual, individual_val
    ft_bytes = sum(mq.checkpoint_bytes(path) for path in fine_tunes) / len(fine_tunes)
    record["fine_tune_bytes"] = ft_bytes

    deltas = {}

    def delta_set(name):
        if name not in deltas:
            options = dict(DELTA_SETS[name])
            if options.get("masks") == "trained":
                options = {"density": mask_protocol.density,
                           "masks": timed("learn_trained_masks_s", trained_masks, seed, evaluator,
                                          base, mini, tasks, encoded, mask_protocol, folder)}
            deltas[name] = timed("compress_s", mq.compress_all, base, fine_tunes, work / name,
                                 names, **options)
            record["deltas"][name] = {
                "bytes_per_task": deltas[name].bytes_per_task,
                "kept_per_task": [s.kept for s in deltas[name].summaries],
                "candidates": deltas[name].summaries[0].candidates,
                "fidelity": {n: s.fidelity for n, s in zip(names, deltas[name].summaries)},
                "warnings": {n: s.warnings for n, s in zip(names, deltas[name].summaries)
                             if s.warnings}}
        return deltas[name]

    def merged(name, rule, split="test", **options):
        out = work / "merged"
        sparsestitch.stitch(base, delta_set(name).paths, out, rule=rule, overwrite=True,
                            **options)
        return evaluator.correct(out, names, split)

    def accuracy(correct):
        return {name: c.sum().item() / len(c) for name, c in correct.items()}

    for row_key in COMPUTE_ORDER:
        label, kind, params = ROWS[row_key]
        if row_key in rows or (only and row_key not in only):
            continue
        began = time.time()
        details, bytes_per_task = {}, ft_bytes
        if kind == "pretrained":
            correct, bytes_per_task = evaluator.correct(base, names), 0
        elif kind == "individual":
            correct = individual_correct
        elif kind == "alone":
            correct = own[params["task"]]
        elif kind == "average":
            correct = merged("full", "task-arithmetic", scale=1 / len(names))
            bytes_per_task, details = delta_set("full").bytes_per_task, {"scale": 1 / len(names)}
        elif kind == "tuned":
            options = {k: v for k, v in params.items() if k != "rule"}
            best, on_val = mq.tune_scale(
                lambda scale, split: accuracy(merged("full", params["rule"], split, scale=scale,
                                                     **options)), individual_val)
            correct = merged("full", params["rule"], scale=best, **options)
            bytes_per_task = delta_set("full").bytes_per_task
            details = {"scale": best, "validation_normalized_mean": on_val, **options}
        elif kind == "stitch":
            keep = {"keep": params["keep"]} if "keep" in params else {}
            correct = merged(params["deltas"], "localize-stitch", **keep)
            bytes_per_task = delta_set(params["deltas"]).bytes_per_task
        elif kind == "restored":
            correct = {}
            for name, path in zip(names, delta_set(params["deltas"]).paths):
                out = work / "restored"
                sparsestitch.restore(base, path, out, overwrite=True)
                correct.update(evaluator.correct(out, [name]))
            bytes_per_task = delta_set(params["deltas"]).bytes_per_task
        else:
            raise AssertionError(kind)
        acc = accuracy(correct)
        rows[row_key] = {"method": label, "accuracy": acc,
                         "mean": sum(acc.values()) / len(acc),
                         "normalized_mean": mq.normalized_mean(acc, individual),
                         "bytes_per_task": bytes_per_task,
                         "correct": {name: pack(c) for name, c in correct.items()},
                         "seconds": time.time() - began, **details}
        save()
        print(f"seed {seed} {label:<72} normalized {rows[row_key]['normalized_mean']:.4f}"
              f"  ({time.time() - began:.0f} s)", flush=True)
    timings["rows_s"] = sum(row["seconds"] for row in rows.values())
    save()
    return record


def trained_masks(seed, evaluator, base, mini, tasks, encoded, protocol, folder):
    """Trained 1% masks of every task for one seed, cached as ``masks/<task>.npz``."""
    masks = []
    for name, task in tasks.items():
        path = folder / "masks" / f"{name}.npz"
        key = {"protocol": asdict(protocol), "train_examples": len(encoded[name]["train"][0]),
               "sha256": _digest([base / "model.safetensors",
                                  mini.fine_tunes[seed][name] / "model.safetensors",
                                  mini.heads[seed][name]])}
        key_path = path.with_suffix(".json")
        if path.exists() and key_path.exists() and json.loads(key_path.read_text()) == key:
            with np.load(path) as stored:
                masks.append({tensor: stored[tensor] for tensor in stored.files})
            continue
        began = time.time()
        mask = mq.learn_task_masks(evaluator, base, mini.fine_tunes[seed][name], task,
                                   encoded[name], protocol, evaluator.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **mask)
        key_path.write_text(json.dumps(key))
        print(f"seed {seed}: learned {name} mask in {time.time() - began:.0f} s", flush=True)
        masks.append(mask)
    return masks


# ---------------------------------------------------------------------- analysis


def analyse(per_seed, names, resamples, rng_seed):
    """Row summaries over seeds and paired bootstrap intervals of the comparisons."""
    seeds = list(per_seed)
    complete_seeds = [seed for seed in seeds if complete(per_seed[seed])]
    correct = {seed: {key: {name: unpack(row["correct"][name]) for name in names}
                      for key, row in result["rows"].items()}
               for seed, result in per_seed.items()}
    sizes = {name: len(correct[seeds[0]]["individual"][name]) for name in names}
    rng = np.random.default_rng(rng_seed)
    draws = {name: rng.integers(0, sizes[name], size=(resamples, sizes[name])) for name in names}

    def boot_nm(seed, key):
        """Normalized mean of row ``key`` on every resample, normalized on the same draw."""
        total = np.zeros(resamples)
        for name in names:
            row = correct[seed][key][name][draws[name]].mean(1)
            ref = correct[seed]["individual"][name][draws[name]].mean(1)
            total += row / ref
        return total / len(names)

    cached = {}

    def nm_star(seed, key):
        if (seed, key) not in cached:
            cached[(seed, key)] = boot_nm(seed, key)
        return cached[(seed, key)]

    def interval(samples):
        low, high = np.percentile(samples, [2.5, 97.5])
        return [float(low), float(high)]

    rows = []
    for key, (label, _, _) in ROWS.items():
        if not complete_seeds:
            break
        seeds_ = complete_seeds  # means over seeds only where every row has every seed
        values = [per_seed[s]["rows"][key]["normalized_mean"] for s in seeds_]
        rows.append({
            "key": key, "method": label,
            "normalized_mean": float(np.mean(values)),
            "normalized_mean_per_seed": dict(zip(map(str, seeds_), values)),
            "normalized_mean_std_over_seeds": float(np.std(values, ddof=1)) if len(seeds_) > 1
            else 0.0,
            "accuracy": {name: float(np.mean([per_seed[s]["rows"][key]["accuracy"][name]
                                              for s in seeds_])) for name in names},
            "accuracy_per_seed": {str(s): per_seed[s]["rows"][key]["accuracy"] for s in seeds_},
            "normalized_accuracy_per_seed": {
                str(s): {name: per_seed[s]["rows"][key]["accuracy"][name]
                         / per_seed[s]["individual_test"][name] for name in names}
                for s in seeds_},
            "mean": float(np.mean([per_seed[s]["rows"][key]["mean"] for s in seeds_])),
            "bytes_per_task": float(np.mean([per_seed[s]["rows"][key]["bytes_per_task"]
                                             for s in seeds_])),
            "scale_per_seed": {str(s): per_seed[s]["rows"][key]["scale"] for s in seeds_
                               if "scale" in per_seed[s]["rows"][key]},
        })
    comparisons = []
    for group, pairs in (("key", KEY_COMPARISONS), ("context", CONTEXT_COMPARISONS)):
        for a, b in pairs:
            entry = {"a": a, "b": b, "group": group,
                     "a_method": ROWS[a][0], "b_method": ROWS[b][0], "per_seed": {}}
            both = [seed for seed in seeds
                    if a in per_seed[seed]["rows"] and b in per_seed[seed]["rows"]]
            if not both:
                continue
            pooled = np.zeros(resamples)
            observed = []
            for seed in both:
                diff = (per_seed[seed]["rows"][a]["normalized_mean"]
                        - per_seed[seed]["rows"][b]["normalized_mean"])
                samples = nm_star(seed, a) - nm_star(seed, b)
                pooled += samples / len(both)
                observed.append(diff)
                per_task = {name: per_seed[seed]["rows"][a]["accuracy"][name]
                            - per_seed[seed]["rows"][b]["accuracy"][name] for name in names}
                entry["per_seed"][str(seed)] = {"difference": diff, "ci95": interval(samples),
                                                "accuracy_difference_per_task": per_task}
            entry["pooled"] = {"difference": float(np.mean(observed)), "ci95": interval(pooled),
                               "seeds_a_ahead": sum(d > 0 for d in observed),
                               "seeds": [str(seed) for seed in both]}
            comparisons.append(entry)
    return {"rows": rows, "comparisons": comparisons,
            "rows_over_seeds": [str(seed) for seed in complete_seeds]}


def analysis_rows_of(result, names):
    """One seed's rows without the per-example bits: accuracy, normalized accuracy per task."""
    return {key: {**{k: v for k, v in row.items() if k != "correct"},
                  "normalized_accuracy": {name: row["accuracy"][name]
                                          / result["individual_test"][name] for name in names}}
            for key, row in result["rows"].items()}


# ------------------------------------------------------------------------ report


def verdict(difference, ci):
    if ci[0] <= 0 <= ci[1]:
        return "no difference detected"
    return "A ahead" if difference > 0 else "B ahead"


def format_report(report):
    names = list(report["tasks"])
    seeds = [str(s) for s in report["seeds"]]
    over = report["rows_over_seeds"]
    lines = []
    if report["rows"]:
        fine_tune_bytes = np.mean([report["per_seed"][s]["fine_tune_bytes"] for s in over])
        header = ["method", *names, "mean", "normalized mean", *[f"seed {s}" for s in over],
                  "bytes / task", "% of fine-tune"]
        lines += [f"test accuracy (%), mean over the complete seeds {', '.join(over)}", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in report["rows"]:
            label = row["method"]
            if row["scale_per_seed"] and row["key"] != "average":
                label += " (λ " + ", ".join(f"{v:g}" for v in row["scale_per_seed"].values()) + ")"
            cells = [label, *[f"{100 * row['accuracy'][n]:.1f}" for n in names],
                     f"{100 * row['mean']:.1f}", f"{100 * row['normalized_mean']:.1f}",
                     *[f"{100 * row['normalized_mean_per_seed'][s]:.1f}" for s in over],
                     f"{row['bytes_per_task'] / 1e6:.2f} MB",
                     f"{100 * row['bytes_per_task'] / fine_tune_bytes:.2f}%"]
            lines.append("| " + " | ".join(cells) + " |")
    for s in seeds:
        seed_rows = report["per_seed"][s]["rows"]
        state = "" if report["per_seed"][s]["complete"] else \
            f" -- INCOMPLETE: {len(seed_rows)} of {len(ROWS)} rows"
        lines += ["", f"seed {s}: normalized accuracy, % of the seed's own fine-tune on each task "
                      f"(its test accuracy in the individual row){state}", "",
                  "| method | " + " | ".join(names) + " | normalized mean | bytes / task |",
                  "|---|" + "---|" * (len(names) + 2)]
        for key, (label, _, _) in ROWS.items():
            if key not in seed_rows:
                lines.append(f"| {label} | " + " | ".join("not run" for _ in names) + " | | |")
                continue
            row = seed_rows[key]
            if "scale" in row and key != "average":
                label += f" (λ {row['scale']:g})"
            if key == "individual":
                values = [f"{100 * row['accuracy'][n]:.1f} acc" for n in names]
            else:
                values = [f"{100 * row['normalized_accuracy'][n]:.1f}" for n in names]
            lines.append(f"| {label} | " + " | ".join(values)
                         + f" | {100 * row['normalized_mean']:.1f}"
                         + f" | {row['bytes_per_task'] / 1e6:.2f} MB |")
    lines += ["", "paired differences A - B in normalized mean (points), 95% bootstrap CI; "
                  "pooled: the mean over the seeds listed", "",
              "| A | B | " + " | ".join(f"seed {s}" for s in seeds)
              + " | pooled | seeds | verdict |",
              "|---|---|" + "---|" * (len(seeds) + 3)]

    def cell(d):
        return f"{100 * d['difference']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"

    for c in report["comparisons"]:
        pooled = c["pooled"]
        lines.append(f"| {c['a_method']} | {c['b_method']} | "
                     + " | ".join(cell(c["per_seed"][s]) if s in c["per_seed"] else "not run"
                                  for s in seeds)
                     + f" | {cell(pooled)} | {', '.join(pooled['seeds'])}"
                     + f" | {verdict(pooled['difference'], pooled['ci95'])} |")
    lines.append(f"\n{describe_machine(report['machine'])}; {report['torch_threads']} torch "
                 f"threads; total {report['timings_s']['total_s'] / 60:.1f} min this run")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
