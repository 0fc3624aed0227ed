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
