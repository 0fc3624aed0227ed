"""sparsestitch: fine-tuned models as tiny sparse deltas, stitched back together streaming.

Public API::

    compress(base, finetuned, out)                 # localize + pack (default: max_error 0.5)
    restore(base, delta, out)                      # the fine-tuned model (exact where stored exactly)
    stitch(base, deltas, out, rule="localize-stitch")
    stitch_add(base, deltas, new_delta, merged)    # add one delta to a stitched model
    apply(model, deltas) -> Patch                  # hot-swap into a live model; .revert()
    prepare(model, deltas).apply(model) -> Patch   # the same, decoded once: fast switching
    stitch_into(model, deltas, rule=...)           # stitch into a model on its device, no file
    info(delta) / verify(delta, base=None)
"""

from ._version import __version__
from .core.errors import (
                          BaseMismatchError,
                          CheckpointError,
                          ChecksumError,
                          ConfigError,
                          DeltaFormatError,
                          OptionError,
                          OutputError,
                          ResourceLimitError,
                          SetupError,
                          SparsestitchError,
                          TensorMismatchError,
)
from .live import Patch, PreparedPatch, apply, prepare, stitch_into
from .ops.compress import DeltaSummary, compress
from .ops.describe import DeltaInfo, info, verify
from .ops.merge import merge
from .ops.restore import restore
from .ops.stitch import stitch, stitch_add

__all__ = [
    "__version__", "compress", "merge", "restore", "stitch", "info", "verify", "DeltaSummary", "DeltaInfo",
    "stitch_add", "apply", "Patch", "prepare", "PreparedPatch", "stitch_into",
    "SparsestitchError", "DeltaFormatError", "ChecksumError", "ResourceLimitError",
    "CheckpointError", "TensorMismatchError", "BaseMismatchError", "OutputError", "OptionError",
    "ConfigError", "SetupError",
]
