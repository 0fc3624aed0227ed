"""Which of mergekit's own configs sparsestitch runs unchanged, and why the others are refused.

Reads every YAML config of a mergekit source tree at run time (its ``examples/``; never copied
into this repository) -- a git directory (read with ``git show``) or a work tree -- and gives
each to :func:`sparsestitch.ops.mergekit_config.translate` as ``merge --config`` would (Hub ids
are taken as named; their checkpoints are not opened).  Prints, per config, the method and
either the sparsestitch rule and options it runs as, or every problem found; writes JSON.

    python bench/mergekit_configs.py --mergekit /work/.mirror/arcee-ai+mergekit/repo \
        --json bench/results/mergekit_configs.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from common import write_json  # noqa: E402

from sparsestitch.core.errors import ConfigError  # noqa: E402
from sparsestitch.ops.mergekit_config import is_mergekit, translate  # noqa: E402


def configs(tree: Path) -> dict[str, str]:
    """``{path in the tree: YAML text}`` of the configs under ``examples/``."""
    if (tree / "HEAD").is_file() and not (tree / ".git").exists():  # a bare git directory
        names = subprocess.run(["git", "-C", str(tree), "ls-tree", "-r", "--name-only", "HEAD",
                                "examples"], check=True, capture_output=True, text=True).stdout
        return {name: subprocess.run(["git", "-C", str(tree), "show", f"HEAD:{name}"],
                                     check=True, capture_output=True, text=True).stdout
                for name in names.split() if name.endswith((".yml", ".yaml"))}
    return {str(p.relative_to(tree)): p.read_text() for p in sorted((tree / "examples").rglob("*"))
            if p.suffix in (".yml", ".yaml")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit", required=True, help="a mergekit source tree or git dir")
    parser.add_argument("--json", default=str(BENCH / "results" / "mergekit_configs.json"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in sorted(configs(Path(args.mergekit)).items()):
            data = yaml.safe_load(text)
            row = {"config": name, "method": (data or {}).get("merge_method")}
            if not isinstance(data, dict) or not is_mergekit(data):
                row["result"] = "not a merge config (no merge_method)"
            else:
                try:
                    parsed = translate(Path(tmp) / Path(name).name, data, cwd=Path(tmp))
                    row.update(result="runs", rule=parsed.rule, options=parsed.parameters,
                               weights=parsed.weights)
                except ConfigError as exc:
                    row.update(result="refused", problems=str(exc).split(": ", 1)[1])
            rows.append(row)
    for row in rows:
        how = (f"runs as {row['rule']} {row['options']}" if row["result"] == "runs" else
               row.get("problems", row["result"]))
        print(f"{row['config']:<40} {str(row['method']):<14} {how}")
    runs = sum(row["result"] == "runs" for row in rows)
    print(f"{runs} of {len(rows)} configs run unchanged")
    write_json(args.json, {"mergekit": args.mergekit, "rows": rows, "runs": runs,
                           "configs": len(rows)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
