"""Tensor-name selection with shell-style patterns (``--include``/``--exclude``/``--dense``)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable


def as_patterns(patterns: str | Iterable[str] | None) -> tuple[str, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        return (patterns,)
    return tuple(patterns)


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """True if ``name`` matches any pattern (``*`` and ``?`` wildcards).

    >>> matches("model.embed_tokens.weight", ("*embed*",))
    True
    """
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def selected(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """Included (no include patterns means everything) and not excluded."""
    return (not include or matches(name, include)) and not matches(name, exclude)
