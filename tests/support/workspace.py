"""A workspace holding every kind of input a command reads, for the output-path checks.

Sharded model folders (a base and two fine-tunes), two deltas, a stitched model, a zoo with a
member, a merge config, a Hub cache holding the base, links to a folder and to a delta, and a
user's own folder -- each command of :data:`COMMANDS` reads some of them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import sparsestitch
from sparsestitch.zoo import add, init

from .hub_cache import cache_model
from .models import finetune_of, save_checkpoint, small_model

BASE_COMMIT = "b" * 40

#: Each command with ``{OUT}`` where its output goes, and the inputs it reads.
COMMANDS = {
    "restore": (["restore", "base", "ft1.delta", "-o", "{OUT}"], ["base", "ft1.delta"]),
    "compress": (["compress", "base", "ft1", "-o", "{OUT}", "--density", "0.05"],
                 ["base", "ft1"]),
    "stitch": (["stitch", "base", "ft1.delta", "ft2.delta", "-o", "{OUT}"],
               ["base", "ft1.delta", "ft2.delta"]),
    "stitch-add": (["stitch-add", "base", "merged", "ft2.delta", "--previous", "ft1.delta",
                    "-o", "{OUT}"], ["base", "merged", "ft1.delta", "ft2.delta"]),
    "merge": (["merge", "base", "ft1", "ft2", "-o", "{OUT}", "--rule", "task-arithmetic"],
              ["base", "ft1", "ft2"]),
    "merge-config": (["merge", "--config", "merge.yaml", "-o", "{OUT}"],
                     ["merge.yaml", "base", "ft1", "ft2"]),
    "merge-save-deltas": (["merge", "base", "ft1", "ft2", "-o", "outs/saving",
                           "--rule", "task-arithmetic", "--save-deltas", "{OUT}"],
                          ["base", "ft1", "ft2"]),
    "zoo-get": (["zoo", "get", "zoo", "a", "-o", "{OUT}"], ["zoo", "base"]),
    "zoo-merge": (["zoo", "merge", "zoo", "a", "-o", "{OUT}"], ["zoo", "base"]),
}


def build_workspace(root: Path) -> Path:
    """Make every input under ``root`` (an empty folder); ``root/outs`` is for outputs."""
    model = small_model()
    save_checkpoint(root / "base", model, shards=2)
    save_checkpoint(root / "ft1", finetune_of(model, seed=1), shards=2)
    save_checkpoint(root / "ft2", finetune_of(model, seed=2), shards=2)
    sparsestitch.compress(root / "base", [root / "ft1", root / "ft2"],
                          [root / "ft1.delta", root / "ft2.delta"], density=0.05)
    sparsestitch.stitch(root / "base", [root / "ft1.delta"], root / "merged")
    init(root / "zoo", root / "base")
    add(root / "zoo", {"a": root / "ft1"}, workers=0)
    (root / "merge.yaml").write_text("base: base\nmodels: [ft1, ft2]\nrule: task-arithmetic\n")
    (root / "projects" / "thesis").mkdir(parents=True)
    (root / "projects" / "thesis" / "chapter1.tex").write_text("precious")
    cache_model(root / "hf-cache", "org/base", root / "base", BASE_COMMIT)
    os.symlink(root / "base", root / "base-link")
    os.symlink(root / "ft1.delta", root / "delta-link.delta")
    (root / "outs").mkdir()
    return root


def tree_state(root: Path, skip: set[str]) -> dict[str, str]:
    """Every file's bytes (hashed) and every link's target under ``root``, but the top-level
    entries in ``skip``."""
    state = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not (folder == str(root) and d in skip)]
        for name in dirs + files:
            path = Path(folder) / name
            if folder == str(root) and name in skip:
                continue
            key = str(path.relative_to(root))
            if path.is_symlink():
                state[key] = "link:" + os.readlink(path)
            elif path.is_file():
                state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state
