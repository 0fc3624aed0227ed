"""The same inputs give byte-identical delta files and stitched outputs on every run, whatever the
thread count, the chunk size of compress, the memory budget of stitch and restore, the output's
name, and whichever other fine-tunes are compressed in the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sparsestitch

from .support.processes import tree_digest
from .support.zoo import build_zoo, clustered_masks, zoo_model

RULES = {"localize-stitch": {}, "task-arithmetic": {"scale": 0.7},
         "ties": {"density": 0.5, "scale": 1.0}, "dare": {"drop": 0.3, "seed": 11, "scale": 1.0}}
COMPRESSIONS = {"global-0.01": {"density": 0.01}, "per-tensor-0.5": {"density": 0.5,
                                                                     "scope": "per-tensor"},
                "dense-1.0": {"density": 1.0}, "mask": {"masks": "clustered"}}

# Runs every operation in a fresh interpreter with a given thread count; prints output digests.
_SCRIPT = r"""
import json, sys
import torch
torch.set_num_threads(int(sys.argv[1]))
sys.path.insert(0, sys.argv[3])
import sparsestitch
from tests.test_determinism import run_everything
print(json.dumps(run_everything(**json.loads(sys.argv[2]))))
"""


def run_everything(folder: str, base: str, tunes: list[str], tag: str, chunk_elements=None,
                   max_memory=None, block_bytes=None) -> dict[str, str]:
    """Compress (every variant), restore and stitch (every rule) into ``folder/tag``; return
    ``{output: digest}``."""
    out = Path(folder) / tag
    out.mkdir()
    options = {} if chunk_elements is None else {"chunk_elements": chunk_elements}
    digests, deltas = {}, {}
    for label, settings in COMPRESSIONS.items():
        settings = dict(settings)
        if settings.get("masks") == "clustered":
            settings["masks"] = clustered_masks(zoo_model())
        deltas[label] = out / f"{label}.delta"
        sparsestitch.compress(base, tunes[0], deltas[label], **settings, **options)
    second = out / "second.delta"
    sparsestitch.compress(base, tunes[1], second, density=0.05, **options)
    restore_options = {} if block_bytes is None else {"block_bytes": block_bytes}
    for label, delta in deltas.items():
        sparsestitch.restore(base, delta, out / f"restored-{label}.safetensors", **restore_options)
    for rule, rule_options in RULES.items():
        sparsestitch.stitch(base, [deltas["global-0.01"], second, deltas["mask"]],
                            out / f"stitched-{rule}.safetensors", rule=rule,
                            max_memory=max_memory, **rule_options)
    for path in sorted(out.iterdir()):
        digests[path.name] = tree_digest(path)
    return digests


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("determinism")
    zoo = build_zoo(folder / "zoo")
    reference = run_everything(str(folder), str(zoo.base), [str(t) for t in zoo.finetunes], "ref")
    return folder, zoo, reference


def test_outputs_are_identical_on_every_run(zoo):
    folder, z, reference = zoo
    again = run_everything(str(folder), str(z.base), [str(t) for t in z.finetunes], "again")
    assert again == reference


@pytest.mark.parametrize("chunk_elements", [97, 1024])
def test_compress_chunk_size_does_not_change_the_files(zoo, chunk_elements):
    folder, z, reference = zoo
    got = run_everything(str(folder), str(z.base), [str(t) for t in z.finetunes],
                         f"chunk{chunk_elements}", chunk_elements=chunk_elements)
    assert got == reference


@pytest.mark.parametrize("max_memory, block_bytes", [("4KiB", 1), ("64KiB", 3000)])
def test_memory_budget_does_not_change_the_outputs(zoo, max_memory, block_bytes):
    folder, z, reference = zoo
    got = run_everything(str(folder), str(z.base), [str(t) for t in z.finetunes],
                         f"mem{block_bytes}", max_memory=max_memory, block_bytes=block_bytes)
    assert got == reference


def test_thread_count_does_not_change_the_outputs(zoo):
    folder, z, reference = zoo
    root = str(Path(__file__).resolve().parents[1])
    runs = []
    for threads in (1, 2):  # both at once: each spends most of its time importing torch
        spec = {"folder": str(folder), "base": str(z.base),
                "tunes": [str(t) for t in z.finetunes], "tag": f"threads{threads}"}
        env = dict(os.environ, **{k: str(threads) for k in (
            "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")})
        runs.append(subprocess.Popen([sys.executable, "-c", _SCRIPT, str(threads),
                                      json.dumps(spec), root], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=root))
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
        assert json.loads(stdout.strip().splitlines()[-1]) == reference


def test_a_delta_does_not_depend_on_its_name_or_on_other_fine_tunes_in_the_run(zoo, tmp_path):
    _, z, reference = zoo
    together = [tmp_path / "one.delta", tmp_path / "two.delta"]
    sparsestitch.compress(z.base, z.finetunes, together, density=0.01)
    alone = tmp_path / "another-name.delta"
    sparsestitch.compress(z.base, z.finetunes[0], alone, density=0.01)
    assert tree_digest(together[0]) == tree_digest(alone) == reference["global-0.01.delta"]
