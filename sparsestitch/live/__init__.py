"""Hot-swap: deltas applied to a live model where it lives (CPU or GPU), and reverted.

* :func:`apply` -> :class:`Patch`: read, check, decode and merge deltas into a model in
  place; ``revert()`` puts it back bit for bit (:mod:`.patch`).
* :func:`prepare` -> :class:`PreparedPatch`: do that work once per skill, then switch it on
  and off with gather/compare/scatter only (:mod:`.prepared`).
* :func:`stitch_into`: stitch deltas into a model on its device for good (no file, no
  revert), bit-identical to stitching to a file (:mod:`.resident`).
* :mod:`.tensors`: a model's tensors seen as raw bits, matched against delta records.
"""

from .patch import Patch, PatchEntry, apply
from .prepared import PreparedPatch, prepare
from .resident import stitch_into

__all__ = ["apply", "Patch", "PatchEntry", "prepare", "PreparedPatch", "stitch_into"]
