"""What a delta keeps of a fine-tune, defined once: :class:`KeepOptions`.

compress, merge (where the density is called ``keep``: TIES has a density of its own), a
merge config's ``keep:`` section and stitch's ``keep`` all take these options; each front end
turns what it was given into one :class:`KeepOptions` (:meth:`KeepOptions.of` for keyword
arguments, :meth:`KeepOptions.from_mapping` for a config), and the command line's flags are
generated from the fields (:func:`sparsestitch.cli.common.keep_flags`), so the API, the
flags and the config keys name the same options with the same meaning.  The checks and what
the options decide (a density, quantized values, a planner) are :func:`.keep.choices`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace

from ..core.errors import OptionError
from ..core.patterns import as_patterns

SCOPE_CHOICES = ("fidelity", "global", "per-tensor")
BITS_CHOICES = ("1", "2", "3", "4", "8")


def _option(default, help: str, merge_help: str | None = None, **click):
    """A field with its command-line help (compress's wording, and merge's where it differs)
    and the click settings of its flag."""
    return field(default=default, metadata={"help": help, "merge_help": merge_help or help,
                                            "click": click})


@dataclass(frozen=True)
class KeepOptions:
    """What is kept of each fine-tune (see :func:`sparsestitch.compress` for each option)."""

    density: float | None = _option(
        None, "Fraction of the included float parameters to keep, above 0 (1.0: lossless); "
              "0.01 when only --bits is given; with no option at all the default is "
              "--max-error 0.5.",
        "Fraction of each fine-tune's float parameters kept, as compress's --density "
        "(default: compress's default for localize-stitch; every change for the other "
        "rules).", type=float)
    scope: str = _option(
        "fidelity", "fidelity: rank |tau| by each tensor's own change (no tensor loses its "
                    "update to another's larger |tau|); global: rank |tau| over the whole model "
                    "(the paper's rule); per-tensor: the density of each tensor.",
        "How --keep is spread over tensors (see compress).", choices=SCOPE_CHOICES)
    bits: int | None = _option(
        None, "Store the kept changes in this many bits each (lossy; the error is reported). "
              "--density 1.0 --bits 1 --group 0 is a BitDelta-like delta.",
        "Kept changes in this many bits each, as compress --bits (lossy).", choices=BITS_CHOICES)
    group: int = _option(128, "With --bits: kept values sharing one fitted scale (0: one per "
                              "tensor).", "With --bits: values per fitted scale (default 128).",
                         type=int)
    lossless: bool | None = _option(None, "Every changed element, exactly (the same as "
                                          "--density 1.0).", "Keep every change exactly.",
                                    flag=True)
    max_error: float | None = _option(
        None, "Target instead of --density/--bits: each localized tensor's relative L2 error "
              "||tau - tau_hat|| / ||tau|| at most this (checked per record).",
        "As compress --max-error.", type=float)
    max_size: int | str | None = _option(
        None, "Target instead of --density/--bits: the best fidelity whose file fits this "
              "size, e.g. 20MB.", compress_only=True)
    low_rank: bool | None = _option(
        None, "Also allow a matrix's change as rank-one products of quantized vectors, "
              "more bits for the larger singular values (lossy, format version 4); each "
              "tensor takes that or the default's sparse record, whichever costs less: with "
              "--max-size planned over the model, else within --max-error (0.5 by default).",
        flag=True, compress_only=True)
    include: tuple[str, ...] = _option((), "Only localize tensors matching this pattern.",
                                       multiple=True)
    exclude: tuple[str, ...] = _option((), "Leave tensors matching this pattern at the base.",
                                       multiple=True)
    dense: tuple[str, ...] = _option((), "Store tensors matching this pattern exactly.",
                                     "Keep every change of tensors matching this pattern.",
                                     multiple=True)

    @classmethod
    def names(cls, command: str = "compress") -> tuple[str, ...]:
        """The options' names as ``command`` (compress or merge) takes them."""
        return tuple(("keep" if f.name == "density" and command == "merge" else f.name)
                     for f in fields(cls)
                     if command == "compress" or not f.metadata["click"].get("compress_only"))

    @classmethod
    def of(cls, *, keep: float | None = None, density: float | None = None,
           include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None,
           dense: str | Iterable[str] | None = None, **options) -> "KeepOptions":
        """From keyword arguments (merge's ``keep`` is the density); patterns as a string or
        any iterable of them; ``None`` for an option means its default."""
        given = {key: value for key, value in options.items() if value is not None}
        return cls(density=keep if keep is not None else density,
                   include=as_patterns(include), exclude=as_patterns(exclude),
                   dense=as_patterns(dense), **given)

    @classmethod
    def from_mapping(cls, values: Mapping, command: str = "compress") -> "KeepOptions":
        """From a mapping of option names (a config's ``keep:`` section); a name that is not
        an option is an :class:`~sparsestitch.core.errors.OptionError` listing them."""
        known = cls.names(command)
        for key in values:
            if key not in known:
                raise OptionError(f"{key!r} is not an option of what is kept; the options are "
                                  f"{', '.join(known)}", option=str(key))
        return cls.of(**values)

    def chosen(self) -> bool:
        """Whether anything says what is kept (a density, bits or a target)."""
        return any(value is not None for value in (self.density, self.bits, self.lossless,
                                                   self.max_error, self.max_size))

    def for_rule(self, rule: str, masks=None) -> "KeepOptions":
        """merge's default: a rule other than Localize-and-Stitch keeps every change exactly
        (the full task vectors, as mergekit merges) unless something says what is kept."""
        if rule != "localize-stitch" and not self.chosen() and masks is None:
            return replace(self, lossless=True)
        return self
