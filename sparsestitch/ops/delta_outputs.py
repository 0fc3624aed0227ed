"""The delta files of one run, one per fine-tune: each record handed to its writer, and the
header each gets when it is closed (identity, sources, and the fidelity report).

Compress writes through it, and so does merge when it keeps the deltas it made on the way
(``save_deltas``), so both write the same files for the same options.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._version import __version__
from ..checkpoint import Checkpoint
from ..core.sizes import numel
from ..delta.format import DeltaWriter, Record, digest, stores_exact_values
from ..localize.selection import TensorPlan, TensorScanner, encode_added
from ..localize.selectors import GivenMasks, Selector

#: A tensor holding more than this share of a delta's kept values is reported: the others
#: likely lost most of their change (a real LLM's 1% delta put 99.6% into its embedding).
CONCENTRATION_WARNING = 0.5

@dataclass
class Written:
    """What one writer received: its records, the kept count, the file size."""

    records: list[Record] = field(default_factory=list)
    kept: int = 0
    nbytes: int = 0
    summary: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def stored_tensors(self) -> int:
        return sum(r.kind != "base" for r in self.records)


class DeltaOutputs:
    """One :class:`~sparsestitch.delta.format.DeltaWriter` per fine-tune, and what each received."""

    def __init__(self, paths: Sequence[Path], overwrite: bool, base: Checkpoint,
                 tunes: Sequence[Checkpoint], plan: TensorPlan):
        self.paths = list(paths)
        self.base, self.tunes, self.plan = base, tunes, plan
        self.writers: list[DeltaWriter] = []
        try:
            for path in self.paths:
                self.writers.append(DeltaWriter(path, overwrite=overwrite))
        except BaseException as exc:
            self.abort(exc)
            raise
        self.written = [Written() for _ in self.paths]

    def add(self, i: int, record: Record, payload: bytes) -> None:
        """Record ``record`` (with its ``payload``) in delta ``i``."""
        self.writers[i].add(record, payload)
        self.written[i].records.append(record)
        self.written[i].kept += record.count if record.name in self.plan.localized else 0

    def add_added(self, scanner: TensorScanner) -> None:
        """The tensors each fine-tune has and the base lacks, stored whole."""
        for i, tune in enumerate(self.tunes):
            for name in tune.names:
                if name not in self.base:
                    self.add(i, *encode_added(tune, name))

    def metas(self, selectors: Sequence[Selector], warn: bool = False) -> list[dict]:
        """Every delta's header fields, after its fidelity report and warnings (``warn``:
        even where the selector does not measure the change's energy)."""
        metas = []
        for i, written in enumerate(self.written):
            written.summary = fidelity_summary(written.records, self.plan)
            if selectors[i].measures_energy or warn:
                written.warnings = concentration_warnings(written.records, self.plan)
            metas.append(self._meta(i, selectors[i], written))
        return metas

    def projected_sizes(self, metas: Sequence[dict]) -> list[int]:
        return [w.projected_size(m) for w, m in zip(self.writers, metas)]

    def payload_sizes(self) -> list[int]:
        return [w.payload_size() for w in self.writers]

    def close(self, metas: Sequence[dict]) -> list[Written]:
        """Write every delta (atomically); returns what each holds."""
        for writer, written, meta in zip(self.writers, self.written, metas):
            written.nbytes = writer.close(meta)
        return self.written

    def abort(self, exc: BaseException | None = None) -> None:
        """Discard every delta; existing files at the paths are untouched."""
        for writer in self.writers:
            writer.abort(exc)

    def _meta(self, tune_index: int, selector: Selector, written: Written) -> dict:
        identity = [[r.name, r.dtype, list(r.shape), r.base_xxh3] for r in written.records
                    if r.kind != "added"]
        masks = isinstance(selector, GivenMasks)
        return {
            "library_version": __version__,
            "method": selector.method,
            "density": None if masks else selector.density,
            "kept": written.kept,
            "candidates": self.plan.candidates,
            "base_identity": digest(json.dumps(identity, separators=(",", ":")).encode()),
            "sources": {"base": self.base.display_name,
                        "finetuned": self.tunes[tune_index].display_name},
            "localized_tensors": None if masks else len(self.plan.localized),
            "dense_patterns": list(self.plan.dense),
            "fidelity": written.summary,
        }



def fidelity_summary(records: Sequence[Record], plan: TensorPlan) -> dict:
    """The header's fidelity report: over the localized tensors, the relative L2 error of the
    whole task vector, the mean and worst per tensor, the share of the change kept, bits per
    parameter, and whether the delta is lossless."""
    localized = set(plan.localized)
    reports = [(r.name, r.fidelity) for r in records if r.name in localized and r.fidelity]
    energy = sum(f["tau_norm"] ** 2 for _, f in reports)
    lost = sum((f["relative_error"] * f["tau_norm"]) ** 2 for _, f in reports)
    exact = all(stores_exact_values(r) for r in records if r.kind != "base")
    payload_bits = 8 * sum(r.nbytes for r in records)
    summary = {"lossless": exact and lost == 0.0 and all(
                   r.kind != "base" or r.name not in localized or (r.fidelity or {}).get(
                       "relative_error", 0.0) == 0.0 for r in records),
               "bits_per_parameter": payload_bits / plan.candidates if plan.candidates else 0.0,
               "relative_error": float(np.sqrt(lost / energy)) if energy else 0.0,
               "energy_kept": 1.0 - lost / energy if energy else 1.0}
    if reports:
        worst = max(reports, key=lambda item: item[1]["relative_error"])
        summary.update(mean_tensor_relative_error=float(np.mean(
                           [f["relative_error"] for _, f in reports])),
                       worst_tensor_relative_error=worst[1]["relative_error"],
                       worst_tensor=worst[0])
    return {k: round(v, 9) if isinstance(v, float) else v for k, v in summary.items()}


def concentration_warnings(records: Sequence[Record], plan: TensorPlan) -> list[str]:
    """A warning when one tensor holds more than half of the kept values of the localized
    tensors, and more than twice its share of their elements (the others then keep little of
    their change)."""
    localized = set(plan.localized)
    counts = {r.name: r.count for r in records if r.name in localized and r.kind == "sparse"}
    total = sum(counts.values())
    if not total or len(plan.localized) < 2:
        return []
    name = max(counts, key=counts.get)
    share = counts[name] / total
    if share <= CONCENTRATION_WARNING or share <= 2 * numel(plan.shapes[name]) / plan.candidates:
        return []
    return [f"tensor {name!r} holds {100 * share:.1f}% of the kept values; the other tensors "
            "keep little of their change (scope='fidelity' spreads the budget by each "
            "tensor's own change)"]
