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

import json
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from ._version import __version__
from .atomic import check_not_an_input, output_error
from .checkpoint import Checkpoint
from .dtypes import dtype as lookup_dtype
from .errors import CheckpointError, TensorMismatchError
from .format import HEADER_KEY, DeltaWriter, Record, digest, encode_record, pread_bytes
from .localize.topk import (TopK, bracket_bins, count_to_keep, magnitude_keys,
                            resolve_candidates, split_bracket)
from .patterns import as_patterns, matches, selected
from .pipeline import DEFAULT_WORKERS, in_order
from .progress import bar

#: Elements per block and checkpoint read at a time.  Small blocks keep the per-block
#: passes in cache: compressing the 2.27 GB benchmark model took 3.9 s with 1 << 20 against
#: 5.0 s with 1 << 23 (two threads).
CHUNK_ELEMENTS = 1 << 20
#: Threads scanning and encoding tensors for the global top-k path (0: the caller's thread).
WORKERS = min(2, DEFAULT_WORKERS)
# The bracketed global top-k samples every SAMPLE_EVERY-th block of about SAMPLE_BLOCK elements
# (blocks of whole rows; larger blocks cost fewer reads for the same fraction sampled).
SAMPLE_BLOCK = 1 << 16
SAMPLE_EVERY = 16
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
    for path in out_paths:
        check_not_an_input(path, [base, *finetuned_paths])
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
        # Threads scanning and encoding tensors ahead of the writer; each holds one block
        # of chunk_elements per checkpoint.
        self.workers = WORKERS
        self.localized = [n for n in base.names
                          if lookup_dtype(base.entry(n).dtype).is_float
                          and selected(n, include, exclude) and not matches(n, dense)]
        self.candidates = sum(base.entry(n).numel for n in self.localized)
        self.selectors = self._make_selectors()
        # Keeping every localized element (density 1.0, global) needs no ranking passes.
        self._keep_all = (mask_sets is None and scope == "global"
                          and count_to_keep(density, self.candidates) == self.candidates)
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
        writers = [DeltaWriter(p, overwrite=overwrite) for p in out_paths]
        self.records = [[] for _ in self.tunes]
        self.kept = [0] * len(self.tunes)
        try:
            if not self._run_bracketed(writers):
                self._run_exact(writers)
            for i, tune in enumerate(self.tunes):
                for name in tune.names:
                    if name not in self.base:
                        self._add(writers, i, *self._encode_added(tune, name))
            sizes = [w.close(self._meta(i, self.records[i], self.kept[i]))
                     for i, w in enumerate(writers)]
        except BaseException as exc:
            for w in writers:
                w.abort(exc)
            raise
        return [(size, self.kept[i], sum(r.kind != "base" for r in self.records[i]))
                for i, size in enumerate(sizes)]

    def _add(self, writers, i: int, record: Record, payload: bytes) -> None:
        writers[i].add(record, payload)
        self.records[i].append(record)
        self.kept[i] += record.count if record.name in self.localized else 0

    # -- exact path: histogram passes (TopK), then one selecting and encoding pass --

    def _run_exact(self, writers) -> None:
        if self.selectors and not self._keep_all:
            self._histogram_pass("localize 1/3", TopK.count_high)
            if any(s.needs_low_pass for s in self.selectors.values()):
                self._histogram_pass("localize 2/3", TopK.count_low)
        with bar(self._total_bytes(), "encode", self.progress) as progress:
            for name in self.base.names:
                base_xxh3, kept = self._scan(name, self._choose_exact)
                for i, (positions, finetuned, base) in enumerate(kept):
                    self._add(writers, i, *self._encode(name, base_xxh3, positions, finetuned, base))
                progress.update(self.base.entry(name).nbytes)

    def _choose_exact(self, i, name, tune_block, base_block, offset, dt, masks):
        if not dt.is_float or matches(name, self.dense):
            return np.flatnonzero(tune_block != base_block), None
        if self.mask_sets is not None:
            mask = masks[i]
            return (np.flatnonzero(mask[offset:offset + base_block.size]) if mask is not None
                    else np.empty(0, np.int64)), None
        if name in self.localized:
            if self._keep_all:  # density 1.0: no ranking needed
                return np.arange(base_block.size, dtype=np.int64), None
            return self._selector(i, name).select(magnitude_keys(tune_block, base_block, dt)), None
        return np.empty(0, np.int64), None  # an excluded float tensor stays at the base

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

    # -- bracketed path (global top-k): sample, one full pass to a spool, resolve, encode --

    def _run_bracketed(self, writers) -> bool:
        """Global top-k reading the model about once; False if it cannot be used or missed."""
        if self.mask_sets is not None or self.scope != "global":
            return False
        k = count_to_keep(self.density, self.candidates)
        if k == 0 or k == self.candidates:
            return False
        brackets = self._sample_brackets(k)
        spools = [tempfile.TemporaryFile(dir=w.path.parent or None) for w in writers]
        try:
            index = [dict() for _ in self.tunes]  # name -> (offset, definite, candidates)
            candidate_keys = [[] for _ in self.tunes]
            definite = [0] * len(self.tunes)
            hashes = {}

            def choose(i, name, tune_block, base_block, offset, dt, masks):
                if name not in self.localized:
                    return self._choose_exact(i, name, tune_block, base_block, offset, dt, masks)
                above, inside, inside_keys = split_bracket(
                    magnitude_keys(tune_block, base_block, dt), *brackets[i])
                return above, (inside, inside_keys)

            with bar(self._total_bytes(), "localize", self.progress) as progress:
                with self._ahead(self.base.names,
                                 lambda name: self._scan(name, choose)) as scanned:
                    for name, (hashes[name], kept) in scanned:
                        for i, (positions, finetuned, base, *candidates) in enumerate(kept):
                            spool = spools[i]
                            index[i][name] = (spool.tell(), positions.size,
                                              candidates[0].size if candidates else 0)
                            arrays = [positions, finetuned, base]
                            if candidates:
                                arrays += candidates[:3]
                                candidate_keys[i].append(candidates[3])
                            try:
                                for array in arrays:
                                    spool.write(np.ascontiguousarray(array).tobytes())
                            except OSError as exc:
                                raise output_error(exc, writers[i].path) from exc
                            if name in self.localized:
                                definite[i] += positions.size
                        progress.update(self.base.entry(name).nbytes)
            for i, spool in enumerate(spools):  # the encode pass reads them with pread
                try:
                    spool.flush()
                except OSError as exc:
                    raise output_error(exc, writers[i].path) from exc
            chosen = []
            for i in range(len(self.tunes)):
                keys = _concat(candidate_keys[i], np.uint32)
                pick = resolve_candidates(keys, k - definite[i])
                if pick is None:
                    return False  # the sample misled; the exact path recomputes everything
                chosen.append(pick)
            # Where each tensor's candidates start in the resolved picks, per fine-tune.
            first_candidate = [{} for _ in self.tunes]
            for i in range(len(self.tunes)):
                taken = 0
                for name in self.base.names:
                    first_candidate[i][name] = taken
                    taken += index[i][name][2]

            def encode(name):
                """Every fine-tune's record of ``name``, read back from the spools."""
                dt = lookup_dtype(self.base.entry(name).dtype)
                records = []
                for i, spool in enumerate(spools):
                    offset, n_definite, n_candidates = index[i][name]
                    arrays, at = [], offset
                    for dtype, n in ((np.int64, n_definite), (dt.bits, n_definite),
                                     (dt.bits, n_definite), (np.int64, n_candidates),
                                     (dt.bits, n_candidates), (dt.bits, n_candidates)):
                        try:
                            arrays.append(_read_array(spool, at, dtype, n))
                        except OSError as exc:  # the spool sits beside this output
                            raise output_error(exc, writers[i].path) from exc
                        at += n * np.dtype(dtype).itemsize
                    start = first_candidate[i][name]
                    pick = chosen[i][start:start + n_candidates]
                    positions = np.concatenate([arrays[0], arrays[3][pick]])
                    order = np.argsort(positions, kind="stable")
                    finetuned = np.concatenate([arrays[1], arrays[4][pick]])[order]
                    base = np.concatenate([arrays[2], arrays[5][pick]])[order]
                    records.append(self._encode(name, hashes[name], positions[order],
                                                finetuned, base))
                return records

            with bar(self._total_bytes(), "encode", self.progress) as progress:
                with self._ahead(self.base.names, encode) as encoded:
                    for name, records in encoded:
                        for i, (record, payload) in enumerate(records):
                            self._add(writers, i, record, payload)
                        progress.update(self.base.entry(name).nbytes)
            return True
        finally:
            for spool in spools:
                spool.close()

    def _sample_brackets(self, k: int) -> list[tuple[int, int]]:
        """Per fine-tune ``(low_key, high_key)`` bracketing the k-th largest key, from a sample
        of every SAMPLE_EVERY-th block of about SAMPLE_BLOCK elements of every localized tensor."""
        weighted = [np.zeros(1 << 16) for _ in self.tunes]
        sampled = 0
        with self._ahead(self.localized, self._sample_tensor) as samples:
            for _, (histograms, count) in samples:
                sampled += count
                for total, histogram in zip(weighted, histograms):
                    total += histogram
        expected_above = k * sampled / max(self.candidates, 1)
        out = []
        for hist in weighted:
            low_bin, high_bin = bracket_bins(hist, k, expected_above)
            out.append((low_bin << 16, (high_bin << 16) | 0xFFFF))
        return out

    def _ahead(self, names, prepare):
        """``prepare`` each of ``names`` in this job's threads, yielded in order (a context
        manager: leaving it early stops the threads)."""
        return closing(in_order(names, prepare, workers=self.workers))

    def _sample_tensor(self, name: str) -> tuple[list[np.ndarray], int]:
        """Per fine-tune, the weighted histogram of the top 16 key bits over this tensor's
        sample blocks, and the number of elements sampled."""
        entry = self.base.entry(name)
        dt = lookup_dtype(entry.dtype)
        rows = entry.shape[0] if entry.shape else 1
        step = max(1, SAMPLE_BLOCK // max(1, _row_items(entry.shape)))
        starts = range(0, rows, step * SAMPLE_EVERY)
        sampled_rows = sum(min(step, rows - s) for s in starts)
        weight = rows / sampled_rows if sampled_rows else 0.0
        high_bits = [[] for _ in self.tunes]
        sampled = 0
        for start in starts:
            stop = min(rows, start + step)
            base_block = self.base.read_rows(name, start, stop)
            sampled += base_block.size
            for i, tune in enumerate(self.tunes):
                keys = magnitude_keys(tune.read_rows(name, start, stop), base_block, dt)
                high_bits[i].append(keys >> 16)
        histograms = [weight * np.bincount(np.concatenate(bits), minlength=1 << 16) if bits
                      else np.zeros(1 << 16) for bits in high_bits]
        return histograms, sampled

    # -- shared --

    def _scan(self, name: str, choose):
        """Read one tensor block by block; ``choose`` picks kept (and candidate) positions.

        Returns the base tensor's checksum and, per fine-tune, ``(positions, fine-tuned bits,
        base bits)`` plus, where ``choose`` returned candidates, ``(positions, fine-tuned bits,
        base bits, keys)`` of those.
        """
        entry = self.base.entry(name)
        dt = lookup_dtype(entry.dtype)
        masks = [self._mask_for(i, name) for i in range(len(self.tunes))]
        base_hash = xxhash.xxh3_64()
        parts = [[[], [], [], [], [], [], []] for _ in self.tunes]
        row_items = _row_items(entry.shape)
        for start, stop in self._blocks(name):
            base_block = self.base.read_rows(name, start, stop)
            base_hash.update(memoryview(base_block.view(np.uint8)))
            offset = start * row_items
            for i, tune in enumerate(self.tunes):
                tune_block = tune.read_rows(name, start, stop)
                kept, candidates = choose(i, name, tune_block, base_block, offset, dt, masks)
                lists = parts[i]
                lists[0].append(kept + offset)
                lists[1].append(tune_block[kept])
                lists[2].append(base_block[kept])
                if candidates is not None:
                    where, keys = candidates
                    lists[3].append(where + offset)
                    lists[4].append(tune_block[where])
                    lists[5].append(base_block[where])
                    lists[6].append(keys)
        out = []
        for lists in parts:
            kept = (_concat(lists[0], np.int64), _concat(lists[1], dt.bits),
                    _concat(lists[2], dt.bits))
            if lists[6]:  # choose returned candidates (the bracketed path)
                kept += (_concat(lists[3], np.int64), _concat(lists[4], dt.bits),
                         _concat(lists[5], dt.bits), _concat(lists[6], np.uint32))
            out.append(kept)
        return base_hash.hexdigest(), out

    def _encode(self, name, base_xxh3, positions, finetuned, base) -> tuple[Record, bytes]:
        entry = self.base.entry(name)
        if positions.size == 0:
            return Record(name, entry.dtype, entry.shape, "base", base_xxh3), b""
        return encode_record(name, lookup_dtype(entry.dtype), entry.shape, positions, finetuned,
                             base, base_xxh3)

    def _total_bytes(self) -> int:
        return sum(self.base.entry(n).nbytes for n in self.base.names)

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
            "base_identity": digest(json.dumps(identity, separators=(",", ":")).encode()),
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


def _read_array(spool, offset: int, dtype, count: int) -> np.ndarray:
    """``count`` values of ``dtype`` at ``offset`` of a spool file, without moving its file
    position (several threads read one spool)."""
    nbytes = count * np.dtype(dtype).itemsize
    data = pread_bytes(spool.fileno(), nbytes, offset)
    if len(data) != nbytes:
        raise OSError(f"spool ended early ({len(data)} of {nbytes} bytes)")
    return np.frombuffer(data, dtype=dtype).copy()


def _row_items(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
