"""One command through the public API in this fresh process: wall and CPU seconds, and the
peak resident memory over the interpreter's own (sparsestitch and numpy imported), as one
JSON line appended to ``--json`` (for jobs too large to repeat, such as a 70B model's
embedding; bench/compress.py runs the interleaved comparisons).

    python bench/one_job.py compress BASE TUNE OUT '{"lossless": true}' --json FILE
    python bench/one_job.py restore BASE DELTA OUT --json FILE
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        return [int(line.split()[1]) * 1024 for line in status if line.startswith(field)][0]


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("op", choices=["compress", "restore"])
    parser.add_argument("args", nargs="+")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    import numpy  # noqa: F401  (imported before the start is read, as bench/common.py does)

    import sparsestitch
    start = _status("VmRSS:")
    wall, cpu = time.perf_counter(), time.process_time()
    if args.op == "compress":
        base, tune, out, options = args.args
        sparsestitch.compress(base, tune, out, overwrite=True, **json.loads(options))
    else:
        base, delta, out = args.args
        sparsestitch.restore(base, delta, out, overwrite=True)
    result = {"op": args.op, "args": args.args, "wall_s": time.perf_counter() - wall,
              "cpu_s": time.process_time() - cpu,
              "rss_over_start_mib": (_status("VmHWM:") - start) / 2**20,
              "output_bytes": _size(Path(args.args[2])),
              "machine": machine(), "command": " ".join(sys.argv)}
    with open(args.json, "a") as out:
        out.write(json.dumps(result) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
