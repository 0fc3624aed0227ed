"""One typed error hierarchy for sparsestitch.

Every error carries the file (``path``) and, where one is involved, the tensor
(``tensor``) it is about, and its message says what to do next.  Catch
:class:`SparsestitchError` to handle everything the library raises on purpose.
"""

from __future__ import annotations

import os


class SparsestitchError(Exception):
    """Base class of every error sparsestitch raises on purpose."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None,
                 tensor: str | None = None, label: str = "file"):
        self.path = os.fspath(path) if path is not None else None
        self.tensor = tensor
        where = []
        if self.path is not None:  # ``label``: what the path names ("Hub model" for an id)
            where.append(f"{label} {self.path!r}")
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)


class DeltaFormatError(SparsestitchError):
    """A delta file is not a valid sparsestitch delta (corrupt, truncated, unknown version)."""


class ChecksumError(DeltaFormatError):
    """Stored bytes do not match their recorded checksum (the file was altered or damaged)."""


class ResourceLimitError(DeltaFormatError):
    """A file declares sizes beyond the documented limits (refused before allocating)."""


class CheckpointError(SparsestitchError):
    """A model checkpoint cannot be read (missing, not safetensors, corrupt header, pickle)."""


class TensorMismatchError(SparsestitchError):
    """Two checkpoints (or a checkpoint and a delta) disagree on a tensor's name, shape or dtype."""


class BaseMismatchError(TensorMismatchError):
    """A delta is applied to a base other than the one it was made from."""


class OutputError(SparsestitchError):
    """The output path cannot be written (exists, is a file where a folder is needed, disk full)."""


class OptionError(SparsestitchError, ValueError):
    """An option of the wrong type or out of its range (a NaN scale, a string where a boolean
    belongs); the message names the option.  A ValueError too, as bad arguments are.
    ``requirement`` is the message without the option's name (``must be ..., got ...``), where
    one was checked alone, for callers that name it otherwise (a config file's key)."""

    def __init__(self, message: str, *, option: str | None = None,
                 requirement: str | None = None, path: str | os.PathLike | None = None):
        self.option, self.requirement = option, requirement
        super().__init__(message, path=path)


class SetupError(SparsestitchError, RuntimeError):
    """This machine lacks what the command needs (an optional package, a Ray node with a
    CPU); the message says what to install or change."""


class ConfigError(OptionError):
    """A merge config that cannot be run: ``path`` is the config file and ``key`` where in it
    the problem is (``models[1].weight``), both named in the message."""

    def __init__(self, path: str | os.PathLike, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}", option=key, path=path)
