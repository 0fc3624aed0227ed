"""The passes of a target over one tensor: statistics, then records selected by threshold.

For each localized tensor a planner (:mod:`.targets`) decides, from the tensor's statistics
(one pass: :func:`tensor_stats`), the options to try for each fine-tune; each option is then
selected by its threshold in one more pass over the blocks and encoded, until the planner
accepts the record (an error target: its real error within the target; a size target: its
one option).  A quantized option is encoded *as the blocks arrive* (:class:`StreamedRecord`):
its positions go into a bitmap (one bit per element) or, below a fifth of the elements, a
list; its values into a :class:`~sparsestitch.delta.codecs.quant.QuantStream`, which holds a couple of runs;
so the record is never gathered whole.  Exact values need the record whole (their codecs
pick an order and a layout over all of it): those options gather a
:class:`~.selection.Selection` first.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ..core.dtypes import DType
from ..core.dtypes import dtype as lookup_dtype
from ..core.errors import OptionError
from ..delta import codecs
from ..delta.codecs import rice_gaps
from ..delta.codecs.base import LIST_BELOW, pack_stream
from ..delta.codecs.bitmap import BitmapBuilder, pack_dense
from ..delta.codecs.quant import QuantStream
from ..delta.format import Record, digest
from ..delta.spooled import AppendFile, BitAppender, SpooledPayload, changed_between_reads
from ..engine.walk import BaseHash
from .activations import squared_weights
from .budget import Option
from .selection import Encoded, SelectionParts, TensorScanner, fidelity_report
from .selectors import Choice, TuneBlock, changed_positions
from .stats import BINS, TensorStats, key_histogram, keys_at_least, select_at_least

#: Kept positions are written as a bitmap from this share of a tensor's elements up (where
#: a compressed bitmap costs what a Rice-coded list does, and an int64 list would cost 64
#: bits per kept position to hold).
BITMAP_FROM = 0.2


def tensor_stats(scanner: TensorScanner, name: str, base_hash: BaseHash | None = None,
                 held: list | None = None) -> list[TensorStats]:
    """Every fine-tune's :class:`~.localize.stats.TensorStats` of tensor ``name`` (one
    pass over its blocks; nothing held but the histograms and samples, and the blocks
    themselves, with their keys, appended to ``held`` when given)."""
    entry = scanner.base.entry(name)
    dt = lookup_dtype(entry.dtype)
    weights = scanner.column_weights.get(name)
    stats = [TensorStats.empty(name, dt, entry.numel, weights) for _ in scanner.tunes]
    for block in scanner.tune_blocks(name, base_hash=base_hash):
        tensor = stats[block.tune]
        binned = block.binned_into(tensor.counts, tensor.bin_energy)  # keys made and binned
        tensor.add(block.finetuned, block.base, block.offset, keys=block.magnitudes,
                   changed=block.changed, binned=binned)
        if held is not None:
            held.append(block)
    return stats


def choice_of(block: TuneBlock, threshold: int) -> Choice:
    """What a threshold keeps of a block: keys at or above it (0: every change; -1: nothing)."""
    if threshold < 0:
        return Choice.nothing()
    if threshold == 0:
        choice = changed_positions(block)
        return Choice(None) if choice.kept.size == block.base.size else choice
    return Choice(keys_at_least(block.magnitudes, threshold))


def keyed_changes(block: TuneBlock) -> bool:
    """Whether the elements whose keys are at least 1 (nonzero) are exactly the block's
    changed ones, and some element is unchanged: then "every change" selects by a threshold
    of 1 in one pass, with no position array (the same set in the same order, so the same
    record).  A nonzero key is always a change; a change can have a zero key (a sign of zero
    flipped, a float64 change below float32's range), which this count rules out."""
    return block.changed < block.base.size and \
        int(np.count_nonzero(block.magnitudes)) == block.changed


def kept_bin_energy(bin_energy: np.ndarray | None, threshold: int) -> tuple[np.ndarray, bool]:
    """``(kept energy per key bin, whether it is final)``: for a threshold at a bin's edge,
    from the statistics pass's ``bin_energy`` (whole bins: the same keys summed in the same
    order, so the same bits as summing the kept keys again); else zeros, to be summed."""
    kept = np.zeros(BINS, np.float64)
    if bin_energy is None or threshold <= 0 or threshold % (1 << 16):
        return kept, False
    kept[threshold >> 16:] = bin_energy[threshold >> 16:]
    return kept, True


class StreamedRecord:
    """A quantized option's record, encoded as the selection pass hands it each block's
    kept entries (see the module docstring); :meth:`finish` gives ``(record, payload)``."""

    def __init__(self, name: str, dt: DType, shape: tuple[int, ...], option: Option,
                 group: int, energy: float | None, spool: Path | None = None,
                 bin_energy: np.ndarray | None = None):
        self.name, self.dt, self.shape, self.energy = name, dt, shape, energy
        numel = int(np.prod(shape, dtype=np.int64))
        self.numel, self.expected = numel, option.kept or None  # None: not known before
        self.bitmap = BitmapBuilder(numel)     # the kept positions
        # spool: the codes go to a temporary file beside this output as they are made, and
        # the payload is built in another (SpooledPayload): a tensor too large to hold them
        self.spool = spool
        self.values = QuantStream(dt, option.bits, group, self.expected,
                                  codes_file=None if spool is None else AppendFile(spool))
        self.counts, self.kept = np.zeros(BINS, np.int64), 0
        self.kept_energy, self.energy_from_stats = kept_bin_energy(bin_energy, option.threshold)

    def add(self, block: TuneBlock, choice: Choice) -> None:
        kept = choice.kept
        finetuned, base, keys = ((block.finetuned, block.base, block.magnitudes) if kept is None
                                 else (block.finetuned[kept], block.base[kept],
                                       block.magnitudes[kept]))
        count = keys.size
        if not self.energy_from_stats:
            key_histogram(keys, self.counts, self.kept_energy)
        self.values.add(finetuned, base, None if block.column_weights is None else
                        squared_weights(block.column_weights, kept, block.offset, count))
        self.kept += count
        mask = None
        if kept is not None:
            mask = np.zeros(block.base.size, bool)
            mask[kept] = True
        self.bitmap.add(mask, block.base.size, count)

    def add_at_least(self, block: TuneBlock, threshold: int) -> None:
        """:meth:`add` of the elements whose keys are at least ``threshold`` (> 0), selected
        and marked in the bitmap in one pass, with no position array."""
        kept = []

        def set_bits(window: np.ndarray, first: int) -> int:
            kept.extend(select_at_least(block.magnitudes, threshold, block.finetuned,
                                        block.base, window, first))
            return int(kept[2].size)
        self.bitmap.mark(block.base.size, set_bits)
        finetuned, base, keys = kept
        if not self.energy_from_stats:
            key_histogram(keys, self.counts, self.kept_energy)
        self.values.add(finetuned, base)
        self.kept += keys.size

    def finish(self, base_xxh3: str) -> Encoded:
        if self.expected is not None and self.kept != self.expected:
            self.close()
            raise changed_between_reads(self.name, f"{self.kept:,} elements at or above the "
                                        f"threshold, the first read counted {self.expected:,}")
        if self.kept == 0:  # nothing changed: the base's record, with its report
            self.values.close()
            return Record(self.name, self.dt.name, tuple(self.shape), "base", base_xxh3,
                          fidelity=fidelity_report(self.energy or 0.0, 0.0)), b""
        bitmap = self.bitmap.finish()
        self.bitmap = None
        if self.spool is not None:
            return self._finish_spooled(bitmap, base_xxh3)
        if self.kept == self.numel:
            pos_payload, pos_config = b"", {"codec": "all"}
        elif self.kept >= BITMAP_FROM * self.numel:
            payload, config = pack_dense(bitmap)
            pos_payload, pos_config = payload, {"codec": "bitmap", **config}
        else:  # a list may be smaller: the smallest of the codecs, the bitmap among them
            pos_payload, pos_config = codecs.encode_position_bitmap(
                codecs.PackedPositions(bitmap, self.kept), self.shape, rank_on_sample=True)
        val_payload, val_config = self.values.finish()
        val_config = {"codec": "quant", **val_config}
        payload = pos_payload + val_payload
        return Record(self.name, self.dt.name, tuple(self.shape), "sparse", base_xxh3,
                      self.kept, pos_config, val_config, len(pos_payload), len(val_payload),
                      digest(payload), self._report(val_config)), payload

    def _finish_spooled(self, bitmap: np.ndarray, base_xxh3: str) -> Encoded:
        """:meth:`finish` into a :class:`SpooledPayload`: positions ``all``, the bitmap or,
        below half the elements where smaller, a ``rice`` list made from the bitmap a window
        at a time (the list itself would be gigabytes), then the values' streams, the codes
        copied from their file."""
        payload = SpooledPayload(self.spool)
        try:
            pos_nbytes, pos_config = 0, {"codec": "all"}
            if self.kept < self.numel:
                pos_nbytes, pos_config = _spooled_positions(bitmap, self.kept, payload)
            del bitmap
            _, val_config = self.values.finish(into=payload)
        except BaseException:
            payload.close()
            raise
        finally:
            self.values.close()
        val_config = {"codec": "quant", **val_config}
        return Record(self.name, self.dt.name, tuple(self.shape), "sparse", base_xxh3,
                      self.kept, pos_config, val_config, pos_nbytes,
                      payload.nbytes - pos_nbytes, payload.hexdigest(),
                      self._report(val_config)), payload

    @staticmethod
    def held_bytes(numel: int, option: Option) -> int:
        """What a record of this option held in memory costs at most: the bitmap and its
        compressed copy, the codes about four times over (runs, joined, compressed, in the
        payload) and, below :data:`BITMAP_FROM`, the listed positions and their gaps."""
        kept = option.kept or numel  # 0: not known before the pass
        listed = 16 * kept if kept < BITMAP_FROM * numel else 0
        return numel // 4 + kept * option.bits // 2 + listed

    def close(self) -> None:
        """Drop the temporary file of a spooled record's codes (after an error)."""
        self.values.close()

    def _report(self, val_config: dict) -> dict:
        kept_energy = float(self.kept_energy.sum())
        energy = kept_energy if self.energy is None else self.energy  # None: every change kept
        return fidelity_report(energy, kept_energy, val_config["error_sq"])


def _spooled_positions(bitmap: np.ndarray, kept: int, payload: SpooledPayload
                       ) -> tuple[int, dict]:
    """Append the positions a packed bitmap marks to ``payload`` as the smaller of the
    bitmap's stream and the ``rice`` list (which wins ties, as in the codec registry)."""
    elements = bitmap.size * 8
    stream, config = pack_dense(bitmap) if kept >= BITMAP_FROM * elements else pack_stream(bitmap)
    if kept * LIST_BELOW < elements:
        k, unary_bits, remainder_bits = rice_gaps.bitmap_plan(bitmap, kept)
        unary_nbytes, remainder_nbytes = (unary_bits + 7) // 8, (remainder_bits + 7) // 8
        if unary_nbytes + remainder_nbytes <= len(stream):
            files = [AppendFile(payload.output), AppendFile(payload.output)]
            try:
                streams = [BitAppender(f) for f in files]
                rice_gaps.encode_bitmap(bitmap, k, *streams)
                for appender in streams:
                    appender.finish()
                nbytes = payload.add_raw(files[0], unary_nbytes) + \
                    payload.add_raw(files[1], remainder_nbytes)
            finally:
                for f in files:
                    f.close()
            return nbytes, {"codec": "rice", "k": k, "unary_bits": unary_bits}
    nbytes, config = payload.add_packed(stream, config)
    return nbytes, {"codec": "bitmap", **config}


def planned_records(scanner: TensorScanner, name: str, hold_blocks: bool = False,
                    exact_limit: int | None = None, spool: Path | None = None,
                    spool_above: int = 0) -> list[Encoded]:
    """Every fine-tune's record of a localized tensor under a planner: the statistics in
    one pass (for an error target), then each fine-tune's options in the planner's order,
    each selected by its threshold in one more pass and encoded, until the planner
    accepts the record.  ``hold_blocks``: the statistics pass keeps the blocks it read, with
    their keys (the base's bits once, each fine-tune's bits and keys), and the later passes
    take them instead of reading and keying the tensor again -- for callers whose memory
    budget has room for that.  ``exact_limit``: options with exact values keeping
    more elements than this (gathered whole, unlike quantized ones) are passed over, and an
    :class:`OptionError` names the tensor when only such options are left.  ``spool``: a
    quantized record that would hold more than ``spool_above`` bytes
    (:meth:`StreamedRecord.held_bytes`) has its codes and payload built in temporary files
    beside this output instead."""
    planner, count = scanner.planner, len(scanner.tunes)
    entry = scanner.base.entry(name)
    dt = lookup_dtype(entry.dtype)
    base_hash = BaseHash(name)
    held = [] if hold_blocks and planner.needs_stats else None
    if planner.needs_stats:
        stats = tensor_stats(scanner, name, base_hash, held)
        base_xxh3 = base_hash.hexdigest()
        options = {i: planner.options(stats[i], i) for i in range(count)}
        energy = {i: stats[i].energy for i in range(count)}
    else:
        base_xxh3 = None
        options = {i: iter([planner.option(i, name)]) for i in range(count)}
        energy = {i: planner.energy(i, name) for i in range(count)}
    records: list[Encoded | None] = [None] * count

    def next_option(i: int) -> Option:
        passed = None
        for option in options[i]:
            if option.bits is None and exact_limit is not None and option.kept > exact_limit:
                passed = passed or option
                continue
            return option
        if passed is None:  # a planner's options end with one that always qualifies
            raise AssertionError(f"{name}: the planner ran out of options for fine-tune {i}")
        raise OptionError(f"tensor {name!r}: the target needs {passed.kept:,} of its values "
                          f"stored exactly, more than the {exact_limit:,} max_memory has room "
                          f"for; allow more memory or loosen the target")
    current = {i: next_option(i) for i in range(count)}
    while current:
        sinks = {i: (StreamedRecord(name, dt, entry.shape, option, planner.group, energy[i],
                                    spool if spool is not None and StreamedRecord.held_bytes(
                                        entry.numel, option) > spool_above else None,
                                    stats[i].bin_energy if planner.needs_stats else None)
                     if option.bits is not None and option.threshold >= 0
                     and (option.kept > 0 or option.threshold == 0)
                     else SelectionParts()) for i, option in current.items()}
        blocks = held if held is not None else \
            scanner.tune_blocks(name, base_hash=base_hash if base_xxh3 is None else None)
        try:
            for block in blocks:
                if block.tune in current:
                    sink, threshold = sinks[block.tune], current[block.tune].threshold
                    if isinstance(sink, StreamedRecord) and block.column_weights is None and (
                            threshold > 0 or (threshold == 0 and keyed_changes(block))):
                        # (a weighted block takes add: its weights need the positions)
                        sink.add_at_least(block, max(threshold, 1))
                    else:
                        sink.add(block, choice_of(block, threshold))
        except BaseException:
            for sink in sinks.values():
                if isinstance(sink, StreamedRecord):
                    sink.close()
            raise
        if base_xxh3 is None:
            base_xxh3 = base_hash.hexdigest()
        for i, option in list(current.items()):
            sink = sinks.pop(i)
            if isinstance(sink, StreamedRecord):
                record = sink.finish(base_xxh3)
            else:
                selection = replace(sink.finish(dt), energy=energy[i])
                quantize = None if option.bits is None else {"bits": option.bits,
                                                             "group": planner.group}
                record = scanner.encode_as(name, base_xxh3, selection, quantize,
                                           rank_on_sample=True)
            if planner.accepts(record[0]):
                records[i] = record
                del current[i]
            else:
                if isinstance(record[1], SpooledPayload):
                    record[1].close()
                current[i] = next_option(i)
    return records
