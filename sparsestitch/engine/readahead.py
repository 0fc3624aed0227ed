"""Ordered read-ahead: prepare the next items in worker threads while the caller uses
the current one.

The stitcher and the compressor read, check and decode tensor by tensor and must
write in file order.  The work per tensor is mostly numpy, the C loops, zstd, xxhash and
positional reads, which release the GIL, so a couple of threads keep both cores
busy; the caller alone writes, so outputs need no locking.  Memory is planned
with a per-item estimate against a budget.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from ..core.options import Range, number

T = TypeVar("T")

def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and ``taskset``
    narrow), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


#: Worker threads to use by default: numpy, zstd, pread and the C loops release the GIL.
DEFAULT_WORKERS = max(1, min(4, usable_cores()))


def workers_for(threads: int | None, default: int) -> int:
    """Worker threads for a user's ``threads`` (None: ``default``): one thread means the
    caller's alone (no workers).

    >>> workers_for(None, 2), workers_for(1, 2), workers_for(3, 2)
    (2, 0, 3)
    """
    if threads is None:
        return default
    threads = number("threads", threads, Range(1, whole=True))
    return 0 if threads == 1 else threads


def in_order(names: Sequence[str], prepare: Callable[[str], T],
             estimate: Callable[[str], int] = lambda name: 0, *, budget: int = 0,
             workers: int = 1) -> Iterator[tuple[str, T]]:
    """Yield ``(name, prepare(name))`` in the order of ``names``, with ``workers`` threads
    preparing the following names while the caller uses the current result, at most
    ``2 * workers`` queued and, with an ``estimate``, only as many as fit in ``budget``
    bytes (counting the one the caller holds); one alone is always allowed.
    ``workers=0`` prepares in the caller's thread (profilers see only that one).

    Stops the workers when the caller stops early or an error reaches it; an error in
    ``prepare`` reaches the caller when it gets to that name.
    """
    if workers == 0:  # everything in the caller's thread (profilers see only that one)
        for name in names:
            yield name, prepare(name)
        return
    queue: deque[tuple[str, int, Future]] = deque()
    held, following = 0, 0

    def read_ahead() -> None:
        nonlocal held, following
        while following < len(names):
            size = estimate(names[following])
            if held and (held + size > budget or len(queue) >= 2 * workers):
                return  # deeper queues only hold memory: the caller is the bottleneck then
            queue.append((names[following], size, pool.submit(prepare, names[following])))
            held += size
            following += 1

    with ThreadPoolExecutor(workers, thread_name_prefix="sparsestitch") as pool:
        try:
            while queue or following < len(names):
                read_ahead()
                name, size, future = queue.popleft()
                result = future.result()
                read_ahead()
                yield name, result
                del result  # before the next is prepared, unless the caller keeps it
                held -= size
        finally:
            for _, _, future in queue:
                future.cancel()
