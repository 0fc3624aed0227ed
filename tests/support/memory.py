"""Peak memory of operations on crafted files, measured in a subprocess with an address-space cap."""

from __future__ import annotations

import json
import os

# ----------------------------------------------------------------------------------------------
# Peak memory of operations on crafted files, measured in a subprocess with an address-space cap
# (so a regression fails the test instead of exhausting the machine)

_MEASURE = r"""
import json, resource, sys, tracemalloc
import sparsestitch
def rss(field):
    with open("/proc/self/status") as status:
        return [int(line.split()[1]) * 1024 for line in status if line.startswith(field)][0]
baseline = rss("VmRSS:")
results = []
for job in json.load(sys.stdin):
    tracemalloc.start()
    try:
        op, delta, base, memory = job["op"], job["delta"], job.get("base"), job.get("max_memory")
        if op == "info":
            sparsestitch.info(delta)
        elif op == "verify":
            sparsestitch.verify(delta, base=base, max_memory=memory)
        elif op == "restore":
            sparsestitch.restore(base, delta, job["out"], max_memory=memory)
        else:
            sparsestitch.stitch(base, [delta], job["out"], max_memory=memory)
        result = {"status": "ok"}
    except sparsestitch.SparsestitchError as exc:
        result = {"status": "error", "type": type(exc).__name__, "message": str(exc),
                  "path": exc.path, "tensor": exc.tensor}
    except BaseException as exc:
        result = {"status": "crash", "type": type(exc).__name__, "message": str(exc)[:300]}
    result["peak"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    results.append(result)
# VmHWM, not ru_maxrss: Linux carries a forking parent's high-water mark over exec.
with open("/proc/self/status") as status:
    peak = [int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")]
print(json.dumps({"results": results, "baseline": baseline, "maxrss": peak[0] if peak else
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def measure(jobs: list[dict], address_space: int = 3 << 30) -> dict:
    """Run ``jobs`` (``{"op", "delta", "base", "out", "max_memory"}``) in a fresh interpreter
    limited to ``address_space`` bytes; return each job's outcome and traced peak memory, the
    process's resident memory after importing sparsestitch (``baseline``) and its peak
    (``maxrss``)."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    done = subprocess.run([sys.executable, "-c", _MEASURE], input=json.dumps(jobs, default=str),
                          capture_output=True, text=True, preexec_fn=limit, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


