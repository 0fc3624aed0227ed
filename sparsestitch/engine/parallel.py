"""Independent pieces of one tensor's work run side by side.

The read-ahead (:mod:`.readahead`) prepares several tensors at once, but only as many as fit
in the memory budget: a large tensor is prepared alone, and its records' decoding and its
merge would then keep one core busy while the others wait.  What these pieces call (zstd,
the C loops) releases the GIL, so threads run them in parallel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

#: Work below this many elements (or entries) stays in one thread: starting threads costs
#: more than it saves.
PARALLEL_MIN = 1 << 21


def each(calls: Sequence[Callable[[], T]], threads: int) -> list[T]:
    """``[call() for call in calls]``, ``threads`` at a time (1 or fewer: in this thread, in
    order).  The first error is raised once the running calls end."""
    if threads <= 1 or len(calls) <= 1:
        return [call() for call in calls]
    with ThreadPoolExecutor(min(threads, len(calls)), thread_name_prefix="sparsestitch-part"
                            ) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]


def parts(size: int, threads: int, align: int = 1) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: ``size`` cut into up to ``threads`` consecutive parts whose
    inner cuts are multiples of ``align``; one part below :data:`PARALLEL_MIN` a thread.

    >>> parts(10, 1), parts(5 << 20, 2, 1 << 16)
    ([(0, 10)], [(0, 2621440), (2621440, 5242880)])
    """
    count = max(1, min(threads, size // PARALLEL_MIN))
    cuts = [0] + [(size * i // count) // align * align for i in range(1, count)] + [size]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
