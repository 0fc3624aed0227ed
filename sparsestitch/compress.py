"""Compress fine-tuned checkpoints into sparse delta files against their base.

Data flows one way: checkpoint reader -> localization (top-k keys or given
masks) -> codecs -> delta writer.  Every pass walks tensors in name order and
each tensor in row blocks of at most ``chunk_elements`` elements, reading each
base block once for all fine-tunes, so memory stays near one block per input
plus the kept values of the tensor being encoded.

Global top-k needs three passes (two histogram passes, then selection and
encoding, see :mod:`sparsestitch.localize.topk`); per-tensor top-k and given
masks need fewer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from ._version import __version__
from .checkpoint import Checkpoint
from .dtypes import dtype as lookup_dtype
from .errors import CheckpointError, TensorMismatchError
from .format import HEADER_KEY, DeltaWriter, Record, digest, encode_record
from .localize.topk import TopK, count_to_keep, magnitude_keys
from .patterns import as_patterns, matches, selected
from .progress import bar

CHUNK_ELEMENTS = 1 << 23
SCOPES = ("global", "per-tensor")


@dataclass(frozen=True)
class DeltaSummary:
    """What one compress run wrote for one fine-tune."""

    path: Path
    nbytes: int
    kept: int             # kept positions over all tensors
    candidates: int       # elements of the included float tensors
    stored_tensors: int
    seconds: float

    @property
    def density(self) -> float:
        return self.kept / self.candidates if self.candidates else 0.0


def compress(base: str | os.PathLike, finetuned: str | os.PathLike | Sequence[str | os.PathLike],
             out: str | os.PathLike | Sequence[str | os.PathLike], *, density: float = 0.01,
             scope: str = "global", include: str | Iterable[str] | None = None,
             exclude: str | Iterable[str] | None = None, dense: str | Iterable[str] | None = None,
             masks: Mapping | Sequence[Mapping] | None = None, overwrite: bool = False,
             progress: bool = False, chunk_elements: int = CHUNK_ELEMENTS) -> list[DeltaSummary]:
    """Write one delta file per fine-tuned checkpoint.

    Parameters
    ----------
    base, finetuned:
        ``.safetensors`` files or Hugging Face folders; ``finetuned`` may be a list
        (the base is then read once per pass for all of them).
    out:
        One output path per fine-tune.
    density:
        Fraction of the included float elements to keep (exactly ``k = round(density * N)``).
    scope:
        ``"global"`` ranks |tau| over all included tensors together (the paper's rule);
        ``"per-tensor"`` keeps ``density`` of each tensor.
    include, exclude:
        Shell patterns over tensor names choosing which float tensors are localized;
        excluded tensors are left at the base value (not stored).
    dense:
        Patterns of tensors stored exactly (every changed element), e.g. a new head.
    masks:
        Instead of top-k, a mapping ``{tensor name: bool array}`` (or one per fine-tune)
        of positions to keep, e.g. from :func:`sparsestitch.localize.trained.learn_masks`;
        tensors not in it are left at the base value.

    Non-float tensors are never localized: those that differ from the base are stored
    exactly.  Tensors the fine-tune has and the base lacks are stored whole ("added").

    Examples
    --------
    >>> compress("base.safetensors", ["math.safetensors", "code.safetensors"],
    ...          ["math.delta", "code.delta"], density=0.01)  # doctest: +SKIP
    """
    started = time.perf_counter()
    finetuned_paths = _as_path_list(finetuned)
    out_paths = _as_path_list(out)
    if len(out_paths) != len(finetuned_paths):
        raise ValueError(f"{len(finetuned_paths)} fine-tuned checkpoints but {len(out_paths)} outputs")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    mask_sets = _as_mask_list(masks, len(finetuned_paths))
    if masks is None:
        count_to_keep(density, 0)  # validates the range
    include, exclude, dense = as_patterns(include), as_patterns(exclude), as_patterns(dense)
    with Checkpoint(base) as base_ckpt:
        _refuse_delta(base_ckpt)
        tunes = [Checkpoint(p) for p in finetuned_paths]
        try:
            for tune in tunes:
                _refuse_delta(tune)
                _check_compatible(base_ckpt, tune)
            job = _Job(base_ckpt, tunes, density, scope, include, exclude, dense, mask_sets,
                       chunk_elements, progress)
            results = job.run(out_paths, overwrite)
        finally:
            for tune in tunes:
                tune.close()
    seconds = time.perf_counter() - started
    return [DeltaSummary(path, size, kept, job.candidates, stored, seconds)
            for path, (size, kept, stored) in zip(out_paths, results)]


class _Job:
    """One compress run: the passes over the tensors and one writer per fine-tune."""

    def __init__(self, base, tunes, density, scope, include, exclude, dense, mask_sets,
                 chunk_elements, progress):
        self.base, self.tunes = base, tunes
        self.density, self.scope, self.mask_sets = density, scope, mask_sets
        self.dense, self.chunk_elements, self.progress = dense, chunk_elements, progress
        self.localized = [n for n in base.names
                          if lookup_dtype(base.entry(n).dtype).is_float
                          and selected(n, include, exclude) and not matches(n, dense)]
        self.candidates = sum(base.entry(n).numel for n in self.localized)
        self.selectors = self._make_selectors()
        for masks in mask_sets or ():
            unknown = sorted(set(masks) - set(base.names))
            if unknown:
                raise TensorMismatchError(f"masks name {len(unknown)} tensor(s) the base lacks",
                                          path=base.path, tensor=unknown[0])

    def _make_selectors(self) -> dict:
        """TopK selectors keyed by (fine-tune index, tensor name or None for global)."""
        if self.mask_sets is not None:
            return {}
        if self.scope == "global":
            k = count_to_keep(self.density, self.candidates)
            return {(i, None): TopK(k) for i in range(len(self.tunes))}
        return {(i, n): TopK(count_to_keep(self.density, self.base.entry(n).numel))
                for i in range(len(self.tunes)) for n in self.localized}

    def _selector(self, tune_index: int, name: str) -> TopK:
        return self.selectors[(tune_index, None if self.scope == "global" else name)]

    def run(self, out_paths, overwrite) -> list[tuple[int, int, int]]:
        if self.selectors:
            self._histogram_pass("localize 1/3", TopK.count_high)
            if any(s.needs_low_pass for s in self.selectors.values()):
                self._histogram_pass("localize 2/3", TopK.count_low)
        writers = [DeltaWriter(p, overwrite=overwrite) for p in out_paths]
        try:
            kept = [0] * len(self.tunes)
            stored = [0] * len(self.tunes)
            records = [[] for _ in self.tunes]
            total = sum(self.base.entry(n).nbytes for n in self.base.names)
            with bar(total, "encode", self.progress) as progress:
                for name in self.base.names:
                    for i, (record, payload) in enumerate(self._encode_tensor(name)):
                        writers[i].add(record, payload)
                        records[i].append(record)
                        kept[i] += record.count if name in self.localized else 0
                        stored[i] += record.kind != "base"
                    progress.update(self.base.entry(name).nbytes)
            for i, tune in enumerate(self.tunes):
                for name in tune.names:
                    if name not in self.base:
                        record, payload = self._encode_added(tune, name)
                        writers[i].add(record, payload)
                        records[i].append(record)
                        stored[i] += 1
            sizes = [w.close(self._meta(i, records[i], kept[i])) for i, w in enumerate(writers)]
        except BaseException as exc:
            for w in writers:
                w.abort(exc)
            raise
        return list(zip(sizes, kept, stored))

    def _histogram_pass(self, description: str, count) -> None:
        total = sum(self.base.entry(n).nbytes for n in self.localized)
        with bar(total, description, self.progress) as progress:
            for name in self.localized:
                dt = lookup_dtype(self.base.entry(name).dtype)
                for start, stop in self._blocks(name):
                    base_block = self.base.read_rows(name, start, stop)
                    for i, tune in enumerate(self.tunes):
                        keys = magnitude_keys(tune.read_rows(name, start, stop), base_block, dt)
                        count(self._selector(i, name), keys)
                    progress.update(base_block.nbytes)

    def _encode_tensor(self, name: str) -> list[tuple[Record, bytes]]:
        entry = self.base.entry(name)
        dt = lookup_dtype(entry.dtype)
        masks = [self._mask_for(i, name) for i in range(len(self.tunes))]
        base_hash = xxhash.xxh3_64()
        kept_positions = [[] for _ in self.tunes]
        kept_bits = [[] for _ in self.tunes]
        base_bits = [[] for _ in self.tunes]
        row_items = _row_items(entry.shape)
        for start, stop in self._blocks(name):
            base_block = self.base.read_rows(name, start, stop)
            base_hash.update(memoryview(base_block.view(np.uint8)))
            offset = start * row_items
            for i, tune in enumerate(self.tunes):
                tune_block = tune.read_rows(name, start, stop)
                if self.mask_sets is not None:
                    chosen = (np.flatnonzero(masks[i][offset:offset + base_block.size])
                              if masks[i] is not None else np.empty(0, np.int64))
                elif name in self.localized:
                    keys = magnitude_keys(tune_block, base_block, dt)
                    chosen = self._selector(i, name).select(keys)
                else:
                    chosen = np.flatnonzero(tune_block != base_block)
                kept_positions[i].append(chosen + offset)
                kept_bits[i].append(tune_block[chosen])
                base_bits[i].append(base_block[chosen])
        base_xxh3 = base_hash.hexdigest()
        out = []
        for i in range(len(self.tunes)):
            positions = _concat(kept_positions[i], np.int64)
            if positions.size == 0:
                out.append((Record(name, entry.dtype, entry.shape, "base", base_xxh3), b""))
                continue
            out.append(encode_record(name, dt, entry.shape, positions,
                                     _concat(kept_bits[i], dt.bits), _concat(base_bits[i], dt.bits),
                                     base_xxh3))
        return out

    def _encode_added(self, tune: Checkpoint, name: str) -> tuple[Record, bytes]:
        entry = tune.entry(name)
        bits = tune.read(name).reshape(-1)
        return encode_record(name, lookup_dtype(entry.dtype), entry.shape,
                             np.arange(bits.size, dtype=np.int64), bits, None, None)

    def _mask_for(self, tune_index: int, name: str) -> np.ndarray | None:
        if self.mask_sets is None:
            return None
        mask = self.mask_sets[tune_index].get(name)
        if mask is None:
            return None
        mask = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask)
        entry = self.base.entry(name)
        if tuple(mask.shape) != entry.shape or mask.dtype != np.bool_:
            raise TensorMismatchError(f"mask has shape {tuple(mask.shape)} and dtype {mask.dtype}; "
                                      f"expected a bool array of shape {entry.shape}", tensor=name)
        return mask.reshape(-1)

    def _blocks(self, name: str):
        shape = self.base.entry(name).shape
        rows = shape[0] if shape else 1
        step = max(1, self.chunk_elements // max(1, _row_items(shape)))
        for start in range(0, rows, step):
            yield start, min(rows, start + step)

    def _meta(self, tune_index: int, records: list[Record], kept: int) -> dict:
        identity = [[r.name, r.dtype, list(r.shape), r.base_xxh3] for r in records if r.kind != "added"]
        method = ("mask" if self.mask_sets is not None
                  else "topk-global" if self.scope == "global" else "topk-per-tensor")
        return {
            "library_version": __version__,
            "method": method,
            "density": None if self.mask_sets is not None else self.density,
            "kept": kept,
            "candidates": self.candidates,
            "base_identity": digest(repr(identity).encode()),
            "sources": {"base": self.base.path.name, "finetuned": self.tunes[tune_index].path.name},
            "localized_tensors": len(self.localized) if self.mask_sets is None else None,
            "dense_patterns": list(self.dense),
        }


def _check_compatible(base: Checkpoint, tune: Checkpoint) -> None:
    missing = [n for n in base.names if n not in tune]
    if missing:
        raise TensorMismatchError(f"the fine-tuned checkpoint lacks {len(missing)} base tensor(s), "
                                  f"e.g. {missing[0]!r}; is it a fine-tune of this base?",
                                  path=tune.path, tensor=missing[0])
    for name in base.names:
        b, t = base.entry(name), tune.entry(name)
        if (b.dtype, b.shape) != (t.dtype, t.shape):
            raise TensorMismatchError(f"base has {b.dtype}{list(b.shape)}, fine-tune has "
                                      f"{t.dtype}{list(t.shape)}; convert the fine-tune to the base's "
                                      "dtype, or compare against the right base", path=tune.path,
                                      tensor=name)


def _refuse_delta(ckpt: Checkpoint) -> None:
    if any(HEADER_KEY in meta for meta in ckpt.metadata.values()):
        raise CheckpointError("this is a sparsestitch delta, not a model checkpoint", path=ckpt.path)


def _as_path_list(value) -> list[Path]:
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value]


def _as_mask_list(masks, count: int):
    if masks is None:
        return None
    if isinstance(masks, Mapping):
        masks = [masks]
    masks = list(masks)
    if len(masks) != count:
        raise ValueError(f"{count} fine-tuned checkpoints but {len(masks)} mask sets")
    return masks


def _row_items(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
