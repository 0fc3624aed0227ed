"""Progress: a tqdm bar for a person at a terminal, plain lines for a log, or silence.

A bar redraws itself with carriage returns, which turn a log file into one endless line;
where standard error is not a terminal and progress was asked for (``--progress``), each
step prints a line instead, at most one every :data:`LINE_SECONDS`, and one at the end.

tqdm's own write lock is a ``multiprocessing`` lock: a semaphore shared with every process
forked from this one.  A process killed while holding it (``kill -9`` mid-update) leaves it
held for all its relatives, whose next bar then waits forever.  Bars here use a lock of this
process only, and no bar at all is made when progress is off.
"""

from __future__ import annotations

import sys
import threading
import time

from tqdm import tqdm

from .sizes import format_bytes

tqdm.set_lock(threading.RLock())

#: Seconds between two progress lines in a log.
LINE_SECONDS = 10.0


def bar(total: int, description: str, enabled: bool, unit: str = "B"):
    """Progress over ``total`` units: a tqdm bar on a terminal, :class:`Lines` elsewhere, a
    :class:`Silent` bar when ``enabled`` is false."""
    if not enabled:
        return Silent()
    if not sys.stderr.isatty():
        return Lines(total, description, unit)
    return tqdm(total=total, desc=description, unit=unit, unit_scale=True, leave=False,
                dynamic_ncols=True)


class Silent:
    """The bar of a quiet run: takes updates, shows nothing, touches no lock."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Silent":
        return self

    def __exit__(self, *exc) -> None:
        pass


class Lines:
    """``description: done of total (percent), seconds`` lines on standard error."""

    def __init__(self, total: int, description: str, unit: str = "B",
                 every: float | None = None):
        self.total, self.description, self.unit = total, description, unit
        self.every = LINE_SECONDS if every is None else every
        self.done = 0
        self.started = self.last = time.monotonic()

    def _amount(self, n: int) -> str:
        return format_bytes(n) if self.unit == "B" else f"{n:,} {self.unit}"

    def _line(self) -> None:
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        print(f"{self.description}: {self._amount(self.done)} of {self._amount(self.total)}"
              f"{share}, {time.monotonic() - self.started:.0f} s", file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line()

    def close(self) -> None:
        self._line()

    def __enter__(self) -> "Lines":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
