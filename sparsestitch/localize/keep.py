"""What a delta keeps, from compress's arguments -- shared by compress and merge.

:func:`choices` checks the options (a density, quantized values, or a target: lossless,
``max_error``, ``max_size``) and returns what they decide; :func:`make_selectors` builds one
selector per fine-tune (:mod:`.selectors`); (:func:`~sparsestitch.engine.fits.check_compatible` refuses a
fine-tune that does not match its base).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.errors import OptionError
from ..core.options import FRACTION, Range, flag, number, optional_number, short_repr
from ..core.sizes import numel, parse_memory
from ..delta.codecs.quant import BITS as QUANT_BITS
from .selection import TensorPlan
from .selectors import (
    BracketedTopK,
    FidelityExactTopK,
    FidelityTopK,
    GivenMasks,
    GlobalTopK,
    KeepAll,
    PerTensorTopK,
    Selector,
)
from .keep_options import KeepOptions
from .lowrank import LowRankPlanner
from .targets import ErrorPlanner, EveryChangePlanner, SizePlanner
from .topk import count_to_keep

SCOPES = ("fidelity", "global", "per-tensor")
#: The density when neither a density nor a target is given.
DEFAULT_DENSITY = 0.01
#: What a delta keeps when nothing is chosen: every localized tensor within this relative
#: error of its task vector.  On SmolLM2-135M (two full fine-tunes) it kept 97.5% and 98.6% of
#: the perplexity gain at ~17x smaller than the float32 fine-tune, where the paper's 1% kept
#: 33% (docs/results-fidelity.md).
DEFAULT_MAX_ERROR = 0.5


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise OptionError(f"scope must be one of {SCOPES}, got {short_repr(scope)}",
                          option="scope")


def make_selectors(plan: TensorPlan, density: float, scope: str, mask_sets, count: int,
                    exact: bool = False) -> list[Selector]:
    """One selector per fine-tune for these options (``exact``: never the bracketed one)."""
    if mask_sets is not None:
        return [GivenMasks(masks, plan.shapes, plan.base_path) for masks in mask_sets]
    candidates = plan.candidates
    if scope == "per-tensor":
        sizes = {n: numel(plan.shapes[n]) for n in plan.localized}
        return [PerTensorTopK(density, sizes) for _ in range(count)]
    if count_to_keep(density, candidates) == candidates:
        return [KeepAll(density) for _ in range(count)]
    fidelity = scope == "fidelity"
    if not exact and BracketedTopK.applies(density, candidates):
        bracketed = FidelityTopK if fidelity else BracketedTopK
        return [bracketed(density, candidates, plan.shapes) for _ in range(count)]
    return [(FidelityExactTopK if fidelity else GlobalTopK)(density, candidates)
            for _ in range(count)]




def choices(keep: KeepOptions, mask_sets, density_option: str = "density"):
    """``(density, quantize options, planner)`` for what ``keep`` asks, checked: each
    option's type and range (:mod:`sparsestitch.core.options`), the scope, then that they do
    not contradict each other.  Every front end (API, command line, merge configs, a zoo's
    options) comes through here; ``density_option`` is the density's name where the caller
    calls it otherwise (merge's ``keep``)."""
    check_scope(keep.scope)
    density, bits, group, lossless, max_error, max_size = (
        keep.density, keep.bits, keep.group, keep.lossless, keep.max_error, keep.max_size)
    density = optional_number(density_option, density, FRACTION, "the fraction kept")
    lossless = flag("lossless", lossless)
    max_error = optional_number("max_error", max_error, Range(0), "the relative error allowed")
    group = number("group", group, Range(0, whole=True),
                   "0: one scale per tensor, else values per scale")
    given = [name for name, value in ((density_option, density), ("bits", bits),
                                      ("masks", mask_sets)) if value is not None]
    targets = [name for name, value in (("lossless", lossless or None), ("max_error", max_error),
                                        ("max_size", max_size)) if value is not None]
    # density 1.0 with lossless says the same thing twice; anything else a target decides
    redundant = lossless and density == 1.0 and bits is None and mask_sets is None
    if len(targets) > 1 or (targets and given and not redundant):
        raise OptionError(f"{' and '.join(targets + given)} are contradictory: a target "
                          "decides what is kept and in how many bits; give one of them",
                          option=targets[0])
    quantize = quantize_options(bits, group)
    planner = None
    if flag("low_rank", keep.low_rank):
        if given or lossless:
            dropped = ", ".join(given + (["lossless"] if lossless else []))
            raise OptionError(f"low_rank decides what is kept itself (with max_size, or "
                              f"max_error, {DEFAULT_MAX_ERROR} by default); drop {dropped}",
                              option="low_rank")
        if max_size is not None:
            return 1.0, None, LowRankPlanner(group, max_size=parse_memory(max_size,
                                                                          option="max_size"))
        return 1.0, None, LowRankPlanner(group, max_error=DEFAULT_MAX_ERROR
                                         if max_error is None else max_error)
    if lossless:
        density = 1.0
    elif max_error is not None:
        density, planner = 1.0, ErrorPlanner(max_error, group)
    elif max_size is not None:
        density, planner = 1.0, SizePlanner(parse_memory(max_size, option="max_size"), group)
    elif density is None and bits is None and mask_sets is None:  # nothing chosen
        density, planner = 1.0, ErrorPlanner(DEFAULT_MAX_ERROR, group)
    elif density is None:
        density = DEFAULT_DENSITY
    elif density == 1.0 and quantize is not None and mask_sets is None:
        planner = EveryChangePlanner(quantize["bits"], quantize["group"])  # records stream
    if mask_sets is None and density == 0:
        raise OptionError(f"{density_option} 0 keeps nothing of the fine-tune; keep a fraction "
                          "above 0 (the paper's 0.01 keeps 1%), or 1.0 for a lossless delta",
                          option=density_option)
    return density, quantize, planner


def quantize_options(bits: int | None, group: int) -> dict | None:
    """The value codec options for ``bits``/``group``, checked (None: exact values)."""
    if bits is None:
        return None
    allowed = ", ".join(map(str, QUANT_BITS))
    bits = number("bits", bits, Range(1, whole=True), f"bits per kept value: {allowed}")
    if bits not in QUANT_BITS:
        raise OptionError(f"bits must be one of {allowed} (bits per kept value), got {bits!r}",
                          option="bits")
    group = number("group", group, Range(0, whole=True),
                   "0: one scale per tensor, else values per scale")
    return {"bits": bits, "group": group}




def as_mask_list(masks, count: int):
    if masks is None:
        return None
    if isinstance(masks, Mapping):
        masks = [masks]
    masks = list(masks)
    if len(masks) != count:
        raise OptionError(f"{count} fine-tuned checkpoints but {len(masks)} mask sets")
    return masks
