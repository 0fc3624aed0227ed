"""Does sparsestitch reproduce mergekit's merges bit for bit?

Question: with the same inputs, do sparsestitch's ``task-arithmetic`` and ``ties-mergekit``
rules write exactly the bits mergekit writes (``dtype: float32``, ``out_dtype: bfloat16``)?
And does a mergekit config of each method sparsestitch accepts, run unchanged by both tools
(``mergekit-yaml``'s ``run_merge`` and ``sparsestitch merge --config``), give the same model?
Random drops (``dare_*``) cannot agree bit for bit (mergekit's ``torch.bernoulli`` is
unseeded): for those the share of differing elements is reported, and the mean of the merged
update compared.

Inputs: a small synthetic llama-shaped bf16 model and three full fine-tunes
(:func:`sparsestitch.checkpoint.synthetic.write_zoo`).  mergekit (``bench/requirements-stitch-peer.txt``,
in its own venv, see bench/stitch.py) merges the fine-tunes; sparsestitch compresses them at
density 1.0 (every position stored) and stitches the deltas.  Each merge is compared tensor
by tensor: elements whose bits differ.

    python bench/mergekit_agreement.py            # ~2 minutes on 2 cores
    python bench/mergekit_agreement.py --mergekit /path/to/mergekit   # + its examples/, unchanged

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


#: mergekit configs run unchanged by both tools: (label, method, top-level parameters, per-model
#: parameters, whether bit-identical outputs are expected).
CONFIGS = [
    ("task_arithmetic", "task_arithmetic", {"lambda": 0.7}, {}, True),
    ("ties, density 0.3", "ties", {}, {"density": 0.3}, True),
    ("ties, normalize false", "ties", {"normalize": False}, {"density": 0.5}, True),
    ("linear", "linear", {}, {}, False),   # mergekit averages the models themselves
    ("breadcrumbs, density 0.6, gamma 0.05", "breadcrumbs", {}, {"density": 0.6, "gamma": 0.05},
     True),
    ("breadcrumbs_ties, density 0.6, gamma 0.05", "breadcrumbs_ties", {},
     {"density": 0.6, "gamma": 0.05}, True),
    ("dare_ties, density 0.5", "dare_ties", {}, {"density": 0.5}, False),
    ("dare_linear, density 0.5", "dare_linear", {}, {"density": 0.5}, False),
    # a list: one value per model, in CONFIG_WEIGHTS' order
    ("ties, density 0.2 / 0.5 / 0.8 per model", "ties", {}, {"density": [0.2, 0.5, 0.8]}, True),
    ("breadcrumbs_ties, density 0.4 / 0.7 / 0.9, gamma 0.02 / 0.05 / 0.1", "breadcrumbs_ties", {},
     {"density": [0.4, 0.7, 0.9], "gamma": [0.02, 0.05, 0.1]}, True),
    # gradients over the layers: at the top for every model, and one model's own
    ("ties, density gradient [0.2, 0.9]", "ties", {"density": [0.2, 0.9]}, {}, True),
    ("breadcrumbs, density [0.3, 0.6, 0.95] for model 1", "breadcrumbs", {},
     {"density": [[0.3, 0.6, 0.95], 0.5, 0.7], "gamma": 0.02}, True),
    ("ties, weight [0.2, 1.0] and [1.5, 0.5, 1.0] for models 1 and 3", "ties", {},
     {"weight": [[0.2, 1.0], 0.5, [1.5, 0.5, 1.0]], "density": 0.4}, True),
    ("task_arithmetic, weight [0.2, 1.0] for model 1, lambda 0.7", "task_arithmetic",
     {"lambda": 0.7}, {"weight": [[0.2, 1.0], 0.5, 2.0]}, True),
    # mergekit's examples/ties.yml on these models: gradients and per-tensor filters
    ("ties.yml: density [1, 0.7, 0.1]; weight [0, 0.3, 0.7, 1]; weight mlp 0.5, else 0",
     "ties", {"normalize": True, "int8_mask": True},
     {"density": [[1, 0.7, 0.1], 0.5, 0.33],
      "weight": [1.0, [0, 0.3, 0.7, 1], [{"filter": "mlp", "value": 0.5}, {"value": 0}]]},
     True),
]
CONFIG_WEIGHTS = [1.0, 0.5, 2.0]


def config_rows(base: Path, tunes: list[Path]) -> list[dict]:
    """Every :data:`CONFIGS` entry written as a YAML file, run by mergekit and by sparsestitch
    (``merge --config``, the command line), and compared element by element."""
    import yaml
    rows = []
    for i, (label, method, top, per_model, exact) in enumerate(CONFIGS):
        config = {"merge_method": method, "base_model": str(base), "dtype": "float32",
                  "out_dtype": "bfloat16", "parameters": top,
                  "models": [{"model": str(t), "parameters": {
                      "weight": w, **{key: value[j] if isinstance(value, list) else value
                                      for key, value in per_model.items()}}}
                      for j, (t, w) in enumerate(zip(tunes, CONFIG_WEIGHTS))]}
        if method == "linear":  # mergekit's linear averages the models listed, no base
            del config["base_model"]
        path = CACHE / f"config-{i}.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        theirs, ours = CACHE / f"config-{i}-mergekit", CACHE / f"config-{i}-sparsestitch"
        subprocess.run([str(MERGEKIT_PYTHON), str(BENCH / "stitch_mergekit_peer.py"), "--config",
                        str(path), "--out", str(theirs)], check=True, capture_output=True,
                       text=True)
        subprocess.run([sys.executable, "-m", "sparsestitch.cli", "merge", "--config", str(path),
                        "-o", str(ours), "--quiet"], check=True, capture_output=True, text=True,
                       cwd=str(BENCH.parent))
        a, b, base_bits = bits_of(ours), bits_of(theirs), bits_of(base)
        differing = sum(int(np.count_nonzero(a[n] != b[n])) for n in a if n in b)
        total = sum(v.size for v in a.values())
        rows.append({"merge": f"config: {label}", "tensors": len(a), "elements": total,
                     "differing": differing, "same_tensor_names": sorted(a) == sorted(b),
                     "expected": "bit for bit" if exact else "close (another order of "
                                 "operations or random draws)",
                     "mean_update_ratio": _mean_update_ratio(a, b, base_bits),
                     "config": config})
    return rows


def _mean_update_ratio(ours: dict, theirs: dict, base: dict, dtype=None) -> float:
    """mean |ours - base| / mean |theirs - base| over every element (1: the same size of
    update); the bits are ``dtype``'s (default bfloat16)."""
    import torch
    dtype = dtype or torch.bfloat16
    num = den = 0.0
    for name, bits in base.items():
        b = torch.from_numpy(bits.view(np.int16)).view(dtype).float()
        o = torch.from_numpy(ours[name].view(np.int16)).view(dtype).float()
        t = torch.from_numpy(theirs[name].view(np.int16)).view(dtype).float()
        num += float((o - b).abs().sum())
        den += float((t - b).abs().sum())
    return num / den if den else float("nan")


def mergekit(base: Path, tunes: list[Path], out: Path, method: str, weights=None,
             density: float = 1.0, scale: float = 1.0) -> None:
    args = [str(MERGEKIT_PYTHON), str(BENCH / "stitch_mergekit_peer.py"), str(base),
            *map(str, tunes), "--out", str(out), "--method", method, "--density", str(density),
            "--lambda", str(scale)]
    if weights:
        args += ["--weights", ",".join(str(w) for w in weights)]
    subprocess.run(args, check=True, capture_output=True, text=True)


def example_rows(mergekit_tree: str, base: Path, tunes: list[Path]) -> list[dict]:
    """mergekit's own example configs, read from its source tree (a git dir or a folder) at
    run time and run unchanged by both tools: the Hub models they name are served from a
    local Hugging Face cache (``HF_HUB_CACHE``, offline) that holds float16 copies of this
    bench's synthetic base (for ``base_model``) and fine-tunes (for the others, in turn).
    Examples sparsestitch refuses are listed with the reason (bench/mergekit_configs.py has
    the full list)."""
    import os

    import torch
    import yaml
    from safetensors.torch import load_file, save_file

    from mergekit_configs import configs
    from sparsestitch.core.errors import ConfigError
    from sparsestitch.ops.merge_config import load

    hub = CACHE / "hub"
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    half = {}
    for source in [base, *tunes]:  # the examples compute and write float16
        folder = CACHE / "float16" / source.name
        folder.mkdir(parents=True, exist_ok=True)
        for file in source.iterdir():
            if file.suffix == ".safetensors":
                save_file({k: v.to(torch.float16) for k, v in load_file(file).items()},
                          folder / file.name)
            elif file.suffix == ".json":
                text = file.read_text().replace('"bfloat16"', '"float16"')
                (folder / file.name).write_text(text)
        half[source] = folder

    def serve(repo_id: str, folder: Path) -> None:
        repo = hub / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / ("0" * 40)
        if snapshot.exists():
            return
        snapshot.mkdir(parents=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text("0" * 40)
        for file in folder.iterdir():
            shutil.copy(file, snapshot / file.name)

    rows = []
    for name, text in configs(Path(mergekit_tree)).items():
        data = yaml.safe_load(text)
        path = CACHE / "examples" / Path(name).name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)  # unchanged
        models = [m["model"] if isinstance(m, dict) else m for m in data.get("models") or []]
        fine = iter(tunes)
        for repo_id in dict.fromkeys(models):
            if repo_id != data.get("base_model"):
                serve(repo_id, half[next(fine, tunes[-1])])
        if data.get("base_model"):
            serve(data["base_model"], half[base])
        try:
            os.environ.update(HF_HUB_CACHE=env["HF_HUB_CACHE"], HF_HUB_OFFLINE="1")
            load(path)
        except ConfigError as exc:
            rows.append({"merge": f"example: {name}", "refused": str(exc)})
            continue
        variants = [(path, "unchanged", "close (mergekit computes in float16, sparsestitch in "
                                        "float32 and rounds once)")]
        if data.get("dtype") not in (None, "float32"):  # the same computed as sparsestitch does
            computed = path.with_name(path.stem + "-float32.yml")
            computed.write_text(yaml.safe_dump({**data, "dtype": "float32",
                                                "out_dtype": data["dtype"]}, sort_keys=False))
            variants.append((computed, "dtype: float32, out_dtype as its dtype",
                             "bit for bit" if data.get("merge_method") != "linear" else
                             "close (mergekit averages the models: another order of operations)"))
        for config, how, expected in variants:
            theirs, ours = CACHE / f"example-{config.stem}-mergekit", CACHE / f"example-{config.stem}"
            subprocess.run([str(MERGEKIT_PYTHON), str(BENCH / "stitch_mergekit_peer.py"),
                            "--config", str(config), "--out", str(theirs)], check=True,
                           capture_output=True, text=True, env=env)
            subprocess.run([sys.executable, "-m", "sparsestitch.cli", "merge", "--config",
                            str(config), "-o", str(ours), "--quiet"], check=True,
                           capture_output=True, text=True, cwd=str(BENCH.parent), env=env)
            a, b, base_bits = bits_of(ours), bits_of(theirs), bits_of(half[base])
            rows.append({"merge": f"example: {name} ({how})", "tensors": len(a),
                         "elements": sum(v.size for v in a.values()),
                         "differing": sum(int(np.count_nonzero(a[n] != b[n]))
                                          for n in a if n in b),
                         "same_tensor_names": sorted(a) == sorted(b), "expected": expected,
                         "mean_update_ratio": _mean_update_ratio(a, b, base_bits,
                                                                 torch.float16)})
    return rows


def bits_of(folder: Path) -> dict[str, np.ndarray]:
    with Checkpoint(folder) as ckpt:
        return {name: ckpt.read(name).reshape(-1) for name in ckpt.names}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=20)
    parser.add_argument("--json", default=str(BENCH / "results" / "mergekit-agreement.json"))
    parser.add_argument("--mergekit", help="mergekit's source tree or git dir: also run its "
                                           "example configs unchanged")
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
    rows += config_rows(base, tunes)
    if args.mergekit:
        rows += example_rows(args.mergekit, base, tunes)
    print(f"sparsestitch vs mergekit, {args.size_mb} MB bf16 model, 3 full fine-tunes; "
          f"{describe_machine(machine())}")
    print(table(rows, [("merge", "merge", "{}"), ("tensors", "tensors", "{}"),
                       ("elements", "elements", "{:,}"), ("differing", "differing bits", "{:,}"),
                       ("same_tensor_names", "same names", "{}"),
                       ("mean_update_ratio", "update ours/theirs", "{:.4f}")]))
    path = write_json(args.json, {"command": "python bench/mergekit_agreement.py "
                                  + " ".join(argv or sys.argv[1:]), "machine": machine(),
                                  "rows": rows})
    print(f"wrote {path}")
    for row in rows:
        if "refused" in row:
            print(f"{row['merge']}: refused by sparsestitch: {row['refused'][:300]}")
    return 0 if all(r.get("differing", 0) == 0 for r in rows
                    if r.get("expected", "bit for bit") == "bit for bit") else 1


if __name__ == "__main__":
    sys.exit(main())
