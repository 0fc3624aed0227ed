"""The one meaning of ``--max-memory``: what the work of a command may hold at once.

A :class:`MemoryBudget` is the bytes a command may hold on top of the interpreter and its
libraries (``--max-memory``, 1 GiB when not given); every part that holds data asks it for
its share instead of doing its own arithmetic:

* :attr:`~MemoryBudget.block_bytes` -- one base or output row block (a quarter);
* :attr:`~MemoryBudget.tensor_bytes` -- one tensor's work held whole between reading and
  writing (half: read-ahead holds up to this; a tensor that would hold more is merged as its
  row blocks are written);
* :attr:`~MemoryBudget.stream_bytes` -- one stream of a record's payload kept in memory;
  larger streams are read from the file or a temporary spool, a range at a time;
* :attr:`~MemoryBudget.run_values` -- kept values decoded at a time by a record cursor.

>>> budget = MemoryBudget.of("64MiB")
>>> budget.block_bytes >> 20, budget.tensor_bytes >> 20, budget.stream_bytes >> 20
(16, 32, 4)
>>> budget.run_values
87381
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import OptionError
from ..core.sizes import format_bytes, parse_memory

#: The budget when the user gives none.
DEFAULT_MEMORY = 1 << 30
#: Bytes a decoded run holds per kept value: its position, fine-tuned and base bits, and the
#: decoders' temporaries (wide values, planes), rounded up.
RUN_BYTES_PER_VALUE = 48


@dataclass(frozen=True)
class MemoryBudget:
    total: int

    @classmethod
    def of(cls, max_memory: int | str | None = None) -> "MemoryBudget":
        """The budget ``--max-memory`` (``512MiB`` style, or bytes) names; 1 GiB for None."""
        return cls(parse_memory(max_memory, DEFAULT_MEMORY))

    @property
    def block_bytes(self) -> int:
        return max(1, self.total // 4)

    @property
    def tensor_bytes(self) -> int:
        return 2 * self.block_bytes

    @property
    def stream_bytes(self) -> int:
        return max(1, self.total // 16)

    @property
    def run_values(self) -> int:
        return max(1024, self.total // 16 // RUN_BYTES_PER_VALUE)

    def require(self, minimum: int, what: str) -> "MemoryBudget":
        """This budget, or an :class:`~sparsestitch.core.errors.OptionError` naming the minimum
        when it is below what ``what`` needs to work at all."""
        if self.total < minimum:
            raise OptionError(f"max_memory {format_bytes(self.total)} is below the "
                              f"{format_bytes(minimum)} {what} needs; allow at least that",
                              option="max_memory")
        return self
