"""The ``sparsestitch`` command line: thin commands that parse, call ops and print.

``app`` holds the command group and the delta commands; ``merge`` and ``zoo`` their own
groups of commands; ``common`` what they share.
"""

from .app import main

__all__ = ["main"]
