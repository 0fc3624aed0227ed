"""Sizes: elements of a tensor shape, and bytes of a memory budget written by a user.

The bottom layer: every other module counts elements and parses ``--max-memory`` here.
"""

from __future__ import annotations

import math

from .errors import OptionError
from .options import short_repr


def numel(shape) -> int:
    """Elements of a tensor of ``shape``; ``()`` is a 0-d tensor of one element.

    >>> numel((3, 4)), numel(()), numel((0, 5))
    (12, 1, 0)
    """
    return math.prod(int(d) for d in shape)


def row_items(shape) -> int:
    """Elements per row (along the first dimension); 1 for 0-d and 1-d tensors.

    >>> row_items((3, 4, 5)), row_items((7,)), row_items(())
    (20, 1, 1)
    """
    return math.prod(int(d) for d in shape[1:])


#: The largest memory size ``parse_memory`` accepts (1 EiB): far above any machine, and small
#: enough for the int64 arithmetic of row blocks.
MAX_MEMORY = 1 << 60
#: Units ``parse_memory`` accepts, longest first (so ``MiB`` is not read as ``B``).
_UNITS = (("KIB", 1 << 10), ("MIB", 1 << 20), ("GIB", 1 << 30), ("TIB", 1 << 40),
          ("KB", 10**3), ("MB", 10**6), ("GB", 10**9), ("TB", 10**12),
          ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40), ("B", 1))


def parse_memory(value: int | str | None, default: int | None = None,
                 option: str = "max_memory") -> int:
    """Bytes in ``512MiB``, ``2GB``, ``1.5 MB``, ``4096`` (``default`` for None).

    >>> parse_memory("4KiB"), parse_memory("1.5 MB"), parse_memory(None, 7), parse_memory(4096)
    (4096, 1500000, 7, 4096)
    """
    if value is None:
        if default is None:
            raise OptionError("a memory size is required")
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        text = str(value).strip().upper().replace(" ", "")
        number, factor = text, 1
        for unit, unit_factor in _UNITS:
            if text.endswith(unit):
                number, factor = text[:-len(unit)], unit_factor
                break
        try:
            size = int(float(number) * factor)
        except (ValueError, OverflowError):
            size = -1
    if not 0 < size <= MAX_MEMORY:
        raise OptionError(f"{option}: memory size must be a positive number of bytes with an "
                          f"optional unit, like 512MiB, 2GB or 4096, up to 1EiB; got "
                          f"{short_repr(value)}", option=option)
    return size


def format_bytes(nbytes: float) -> str:
    """A byte count for people, in binary units.

    >>> format_bytes(1536), format_bytes(3 << 30), format_bytes(12)
    ('1.5 KiB', '3.0 GiB', '12 B')
    """
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(nbytes) >= factor:
            return f"{nbytes / factor:.1f} {unit}"
    return f"{int(nbytes)} B"
