"""The checks of option values -- numbers, whole numbers, flags -- that every front end shares.

The Python API, the command line, merge configs and a zoo's ``-O KEY=VALUE`` all reach these
through the functions that turn options into what they decide (:func:`.keep.choices`, the
rules' :meth:`~.stitch.rules.MergeRule.check_options`, :func:`.stitch.combine.rule_combiner`),
so a NaN scale, a string where a boolean belongs or a fractional seed is refused the same way
everywhere, before any tensor is read, by an :class:`~.errors.OptionError` naming the option.
A number is an ``int`` or ``float`` (numpy's too), never a ``bool`` or a string: a config's
``lossless: 'no'`` or ``seed: '3'`` is a mistake to report, not a value to guess.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import OptionError


@dataclass(frozen=True)
class Range:
    """The values a numeric option takes: finite numbers (``whole``: whole numbers) from
    ``low`` to ``high`` (None: no bound on that side), ``high`` itself excluded when
    ``below_high``.

    >>> Range(0, 1, below_high=True).describe()
    'a finite number within [0, 1)'
    """

    low: float | None = None
    high: float | None = None
    below_high: bool = False
    whole: bool = False

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a finite number"
        if self.low is not None and self.high is not None:
            return f"{kind} within [{self.low:g}, {self.high:g}{')' if self.below_high else ']'}"
        if self.low is not None:
            return f"{kind} of {self.low:g} or more"
        if self.high is not None:
            return f"{kind} {'below' if self.below_high else 'of at most'} {self.high:g}"
        return kind

    def holds(self, value: float) -> bool:
        if self.low is not None and value < self.low:
            return False
        if self.high is not None and (value >= self.high if self.below_high else
                                      value > self.high):
            return False
        return True


def short_repr(value, limit: int = 80) -> str:
    """``repr(value)`` for a message: cut to ``limit`` characters, and never failing (Python
    refuses to print an int of over 4300 digits, and a config file can hold one).

    >>> short_repr(10**5000), short_repr("x" * 100, 10)
    ('(int too large to show)', "'xxxxxx...")
    """
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"({type(value).__name__} too large to show)"
    return text if len(text) <= limit else text[:limit - 3] + "..."


#: Any finite number (NaN and the infinities refused).
FINITE = Range()
#: A fraction of something, from none to all of it.
FRACTION = Range(0, 1)


def number(option: str, value, limits: Range = FINITE, meaning: str = "") -> float | int:
    """``value`` checked against ``limits``: a float, or an int for whole numbers.
    ``meaning`` says in the message what the option is.

    >>> number("scale", 0.5), number("seed", 3, Range(0, whole=True))
    (0.5, 3)
    >>> number("seed", 1.7, Range(0, whole=True))
    Traceback (most recent call last):
    ...
    sparsestitch.core.errors.OptionError: seed must be a whole number of 0 or more, got 1.7
    """
    kind = numbers.Integral if limits.whole else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise _refused(option, value, limits, meaning)
    try:
        checked = int(value) if limits.whole else float(value)
    except OverflowError:  # an int beyond any float, like a config's 10**400
        raise _refused(option, value, limits, meaning) from None
    if not (limits.whole or math.isfinite(checked)) or not limits.holds(checked):
        raise _refused(option, value, limits, meaning)
    return checked


def _refused(option: str, value, limits: Range, meaning: str) -> OptionError:
    about = f" ({meaning})" if meaning else ""
    requirement = f"must be {limits.describe()}{about}, got {short_repr(value)}"
    return OptionError(f"{option} {requirement}", option=option, requirement=requirement)


def optional_number(option: str, value, limits: Range = FINITE, meaning: str = ""
                    ) -> float | int | None:
    """:func:`number`, with None (the option not given) passed through."""
    return None if value is None else number(option, value, limits, meaning)


def flag(option: str, value) -> bool | None:
    """A boolean option: True, False or None (not given), nothing else.

    >>> flag("lossless", "no")
    Traceback (most recent call last):
    ...
    sparsestitch.core.errors.OptionError: lossless must be true or false, got 'no'
    """
    if value is not None and not isinstance(value, bool):
        requirement = f"must be true or false, got {short_repr(value)}"
        raise OptionError(f"{option} {requirement}", option=option, requirement=requirement)
    return value


def weights(values: Iterable | None, count: int) -> list[float]:
    """Per-input weights, one for each of ``count`` inputs (None: all 1).

    A weight is any finite number: negative weights subtract a task vector (task arithmetic's
    negation, as mergekit allows), zero leaves it out.  No rule divides by the weights' sum
    (Localize-and-Stitch divides by the number of deltas covering a position, mergekit's
    TIES by a sum that is never zero where it divides), so weights summing to zero merge
    without a division by zero: the deltas cancel.

    >>> weights([1, 0.5], 2)
    [1.0, 0.5]
    """
    if values is None:
        return [1.0] * count
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise OptionError(f"weights must be a list of numbers, one per input, got "
                          f"{short_repr(values)}", option="weights")
    values = list(values)
    if len(values) != count:
        raise OptionError(f"{count} deltas but {len(values)} weights", option="weights")
    checked = []
    for i, value in enumerate(values):
        try:
            checked.append(number("weights", value))
        except OptionError:
            raise OptionError(f"weights must be finite numbers; weight {i + 1} of {count} is "
                              f"{short_repr(value)}", option="weights") from None
    return checked
