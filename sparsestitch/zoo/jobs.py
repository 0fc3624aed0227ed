"""Running many adds: in this process, in local worker processes, or as Ray tasks.

Every path runs :func:`.worker.add_one` once per fine-tune, so they write the same bytes.
Nothing large travels between processes: a task is a few paths and options, a result is a
manifest entry; every worker reads the base and its fine-tune from (shared) storage itself,
and the page cache makes the base's bytes come from storage once per machine.

Failures: an input that is wrong (a :class:`~sparsestitch.core.errors.SparsestitchError` or
``ValueError``: a bad checkpoint, a name conflict) fails that member at once, with its
message; a worker that dies (killed, out of memory, a lost node) or an ``OSError`` (a
storage hiccup) is retried up to ``retries`` more times.  A member is committed only once
complete (see :mod:`.worker`), so a rerun of the same job skips what is done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from ..core.errors import SetupError, SparsestitchError
from .worker import add_one

DETERMINISTIC = (SparsestitchError, ValueError)


def failed(task: dict, error: str, attempts: int) -> dict:
    return {"name": task["name"], "status": "failed", "entry": None, "error": error,
            "attempts": attempts}


def run_serial(zoo, tasks: list[dict], retries: int = 0) -> list[dict]:
    """Each add in this process, one after the other."""
    results = []
    for task in tasks:
        for attempt in range(1, retries + 2):
            try:
                results.append({**add_one(zoo, task), "attempts": attempt})
                break
            except DETERMINISTIC as exc:
                results.append(failed(task, _describe(exc), attempt))
                break
            except OSError as exc:
                if attempt > retries:
                    results.append(failed(task, _describe(exc), attempt))
    return results


# ------------------------------------------------------------------- local processes

def run_local(zoo, tasks: list[dict], workers: int, retries: int = 2) -> list[dict]:
    """Each add in its own fresh Python process (``python -m sparsestitch.zoo.child``),
    ``workers`` at a time; a process that dies (SIGKILL, out of memory) or fails with an
    OSError is run again, up to ``retries`` times.

    Fresh interpreters rather than ``multiprocessing``: nothing of the caller (threads,
    locks, an unguarded ``__main__``) leaks into the workers, and each one's peak memory
    is its own.
    """
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="zoo-add") as pool:
        return list(pool.map(lambda task: _in_process(os.fspath(zoo), task, retries), tasks))


def _in_process(zoo: str, task: dict, retries: int) -> dict:
    request = json.dumps({"zoo": zoo, "task": task})
    why = ""
    for attempt in range(1, retries + 2):
        done = subprocess.run([sys.executable, "-m", "sparsestitch.zoo.child"], input=request,
                              capture_output=True, text=True, check=False)
        message = child_message(done.stdout)
        if message is not None and message["kind"] == "ok":
            return {**message["result"], "attempts": attempt}
        if message is not None and message["kind"] == "error":
            return failed(task, message["error"], attempt)
        why = (message["error"] if message is not None else
               f"worker exited with code {done.returncode}"
               + (f": {done.stderr.strip().splitlines()[-1]}" if done.stderr.strip() else ""))
    return failed(task, f"gave up after {retries + 1} attempts: {why}", retries + 1)


MARK = "@@sparsestitch-zoo@@ "


def child_message(stdout: str) -> dict | None:
    """The result line a child printed last (libraries may print before it)."""
    lines = [line for line in stdout.splitlines() if line.startswith(MARK)]
    return json.loads(lines[-1][len(MARK):]) if lines else None


def child_main() -> None:
    """Body of ``python -m sparsestitch.zoo.child``: a request on stdin, one result line."""
    request = json.loads(sys.stdin.read())
    try:
        message = {"kind": "ok", "result": add_one(request["zoo"], request["task"])}
    except DETERMINISTIC as exc:
        message = {"kind": "error", "error": _describe(exc)}
    except OSError as exc:  # a storage hiccup: the parent retries
        message = {"kind": "retry", "error": _describe(exc)}
    print("\n" + MARK + json.dumps(message), flush=True)


# ----------------------------------------------------------------------------- Ray

def group_by_node(tasks: list[dict], nodes: list[tuple[str, float]]) -> dict[str, list[dict]]:
    """Split ``tasks`` into one contiguous group per node, sized by its CPUs, so each node
    works on its own fine-tunes and reads the base into its page cache once.

    >>> groups = group_by_node([{"name": str(i)} for i in range(5)], [("a", 2), ("b", 6)])
    >>> {node: [t["name"] for t in group] for node, group in groups.items()}
    {'a': ['0'], 'b': ['1', '2', '3', '4']}
    """
    total = sum(cpus for _, cpus in nodes)
    if not nodes or total <= 0:
        raise SetupError("the Ray cluster has no node with a CPU")
    groups, start, share = {}, 0, 0.0
    for node, cpus in nodes:
        share += cpus
        stop = round(len(tasks) * share / total)
        groups[node] = tasks[start:stop]
        start = stop
    return {node: group for node, group in groups.items() if group}


def _ray_add(zoo: str, task: dict) -> dict:
    """A Ray task: :func:`add_one`; input errors come back as a failed result (retrying
    cannot help), other exceptions are raised so that Ray retries the task."""
    try:
        result = add_one(zoo, task)
    except DETERMINISTIC as exc:
        return failed(task, _describe(exc), 1)
    import ray
    return {**result, "node": ray.get_runtime_context().get_node_id()}


def run_ray(zoo, tasks: list[dict], address: str | bool | None = True, retries: int = 2,
            cpus_per_task: float = 1) -> list[dict]:
    """Each add as a Ray task (one per fine-tune), grouped by node; Ray reruns a task whose
    worker or node died, and one that raised an OSError, up to ``retries`` times.

    Uses the Ray instance this process is connected to, else ``ray.init(address)``
    (``True``: a running cluster if ``RAY_ADDRESS`` names one, else a local instance);
    an instance started here is shut down at the end.  Every node must see the zoo, the
    base and the fine-tunes at the same paths, and have sparsestitch installed.
    """
    try:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    except ImportError:
        raise SetupError("Ray is not installed: pip install 'sparsestitch[ray]' "
                           "(or run without --ray: local processes)") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=None if address in (True, None) else address,
                 include_dashboard=False, log_to_driver=False)
    try:
        nodes = [(n["NodeID"], n["Resources"].get("CPU", 0.0)) for n in ray.nodes()
                 if n.get("Alive") and n["Resources"].get("CPU", 0.0) > 0]
        # Ray workers live on from task to task, and glibc's per-thread malloc arenas keep
        # what compress's threads freed: measured, a worker's RSS grew 166 -> 434 MiB over
        # six 299 MB fine-tunes, against 143 -> 163 MiB with two arenas.  The variable must
        # be set when the worker starts, hence a runtime_env (its own workers).
        arenas = {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}
        remote = ray.remote(num_cpus=cpus_per_task, max_retries=retries,
                            retry_exceptions=[OSError],
                            runtime_env={"env_vars": arenas})(_ray_add)
        refs = {}
        for node, group in group_by_node(tasks, nodes).items():
            # soft: if the node is lost, the retry may run anywhere
            placed = remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True))
            refs.update({placed.remote(os.fspath(zoo), task): task for task in group})
        results, pending = {}, list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                task = refs[ref]
                try:
                    results[task["name"]] = {"attempts": None, **ray.get(ref)}
                except Exception as exc:  # noqa: BLE001 - retries exhausted: report, go on
                    results[task["name"]] = failed(task, f"gave up after {retries + 1} "
                                                   f"attempts: {_describe(exc)}", retries + 1)
        return [results[task["name"]] for task in tasks]
    finally:
        if started_here:
            ray.shutdown()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:2000]
