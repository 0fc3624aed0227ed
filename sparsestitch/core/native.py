"""The optional C loops (``sparsestitch._native``), or None.

``setup.py`` builds them where a C compiler is present; without one, on a big-endian
host (the loops read the format's little-endian integers natively), or with the
environment variable ``SPARSESTITCH_NATIVE=0``, sparsestitch runs its numpy code,
which gives the same bits and raises the same errors (the tests compare the two).

>>> kernels() is None or hasattr(kernels(), "merge_block")
True
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

#: Float dtype names the C loops handle (merge, ranking keys), with the kind number they take.
FLOAT_KINDS = {"BF16": 0, "F16": 1, "F32": 2, "F64": 3}
#: The kinds whose arithmetic is float32 (the others' is float64).
FLOAT32_WIDE_KINDS = (0, 1, 2)


def kernels() -> ModuleType | None:
    """The compiled module, unless it is missing or switched off by ``SPARSESTITCH_NATIVE=0``."""
    if _compiled is None or os.environ.get("SPARSESTITCH_NATIVE", "1") == "0":
        return None
    return _compiled


def float_kernels(dtype_name: str) -> tuple[ModuleType, int] | tuple[None, None]:
    """``(kernels(), the kind number its float loops take)`` for a float dtype they handle,
    else ``(None, None)``.

    >>> float_kernels("I32")
    (None, None)
    """
    loops = kernels()
    if loops is None or dtype_name not in FLOAT_KINDS:
        return None, None
    return loops, FLOAT_KINDS[dtype_name]


#: glibc's ``mallopt`` parameter for the number of malloc arenas.
_M_ARENA_MAX = -8
_arenas_limited = False


def one_malloc_arena() -> bool:
    """Have glibc's malloc serve every thread from one arena (``mallopt(M_ARENA_MAX, 1)``),
    before worker threads start; True where it took effect.  Idempotent; does nothing off
    glibc or with ``SPARSESTITCH_MALLOC_ARENAS=any``.

    Why: numpy's arrays of up to 32 MiB come from malloc's heap (glibc raises its mmap
    threshold to the largest block freed), and each thread that allocates at once gets an
    arena of its own, which keeps what was freed into it for its own thread.  Stitching, the
    read-ahead threads decode records that the writing thread frees: with an arena each, a
    stitch of four lossless deltas peaked 60-100% above its one-arena peak at the same speed
    (bench/malloc_arenas.py).  Only stitch asks for it: compress held a little less with
    one arena but its max_size and d1 b2 modes ran 7-13% slower, and merge from fine-tunes
    held no more.  The setting is process-wide (made once, by the command), so the variable
    can leave it alone.
    """
    global _arenas_limited
    if _arenas_limited or os.environ.get("SPARSESTITCH_MALLOC_ARENAS", "one") == "any":
        return _arenas_limited
    _arenas_limited = _mallopt((_M_ARENA_MAX, 1))
    return _arenas_limited


def _mallopt(*settings: tuple[int, int]) -> bool:
    """glibc's ``mallopt`` for each ``(parameter, value)`` in order; False off glibc or as
    soon as one is refused."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
            return False
        return all(bool(libc.mallopt(parameter, value)) for parameter, value in settings)
    except OSError:
        return False


#: glibc's ``mallopt`` parameters for its mmap and trim thresholds, and what compress sets.
_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD = -3, -1
KEEP_BLOCKS_BELOW = 32 << 20   # allocations below this come from malloc's heap
KEEP_FREED_UP_TO = 64 << 20    # free memory a heap keeps before giving it back
_freed_kept = False


def keep_freed_blocks() -> bool:
    """Have glibc's malloc keep freed blocks for the next ones instead of returning them to
    the system at once (``mallopt``: mmap threshold 32 MiB, trim threshold 64 MiB), before
    worker threads start; True where it took effect.  Idempotent; does nothing off glibc or
    with ``SPARSESTITCH_MALLOC_KEEP=0``.

    Why: a pass over a model allocates arrays of a block's size (a few MiB each) and frees
    them, millions of elements at a time.  glibc gives free memory at the top of a heap back
    to the system once it exceeds a trim threshold of twice its (dynamic) mmap threshold, so
    the next block's arrays were fresh pages again: compress ``--density 0.01`` on a 1.83 GB
    fine-tune took 0.88 M page faults and 4.6 s of system time, 21 K and 1.7 s with these
    thresholds (bench/results/, docs/results-compress.md).  Freed memory up to the trim
    threshold stays in the process, reused by the next blocks.  Process-wide, made once by
    the command."""
    global _freed_kept
    if _freed_kept or os.environ.get("SPARSESTITCH_MALLOC_KEEP", "1") == "0":
        return _freed_kept
    # the mmap threshold first: setting either fixes both (no dynamic adjustment)
    _freed_kept = _mallopt((_M_MMAP_THRESHOLD, KEEP_BLOCKS_BELOW),
                           (_M_TRIM_THRESHOLD, KEEP_FREED_UP_TO))
    return _freed_kept


def malloc_arena_limited() -> bool:
    """Whether :func:`one_malloc_arena` took effect in this process."""
    return _arenas_limited


def describe() -> str:
    """Which code runs, in words (``sparsestitch --version`` prints it)."""
    if _compiled is None:
        return "C loops not built: numpy only, slower; reinstall with a C compiler"
    if kernels() is None:
        return "C loops switched off by SPARSESTITCH_NATIVE=0"
    return "C loops on"


try:
    from .. import _native as _compiled
except ImportError:  # built without a C compiler: the numpy code runs
    _compiled = None
if sys.byteorder != "little":
    _compiled = None
