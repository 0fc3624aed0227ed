"""Hot-swap of deltas that store most of each tensor (the default's quantized values in bitmap
records, lossless ``ulp``/``xor`` values, dense 2-bit records): tensors patched whole, in
place and within ``max_memory``, bit-identical to stitching to a file, and reverted exactly."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sparsestitch
from sparsestitch.core.errors import BaseMismatchError, SparsestitchError
from sparsestitch.live.marks import SavedMarks

from .test_live import assert_bits, base_bits, bits_of, live, patching
from .test_rules import random_bits
from .test_stitch import load_bits, write_model

#: compress options: the default (a fidelity target: quantized values, mostly bitmap
#: positions), exact values (lossless codecs, ``ulp`` among them), every element at 2 bits,
#: and a sparse share.
OPTIONS = {"default": {}, "lossless": {"lossless": True}, "d1 b2": {"density": 1.0, "bits": 2},
           "d0.3": {"density": 0.3}}


def _fine_tune_pair(tmp, seed: int = 0):
    """A base with bfloat16 and float32 matrices and two dense fine-tunes of it (files)."""
    rng = np.random.default_rng(seed)
    model = {"a.weight": ("BF16", (48, 64), random_bits(rng, "BF16", 48 * 64)),
             "b.weight": ("F32", (40, 24), random_bits(rng, "F32", 40 * 24)),
             "c.bias": ("F32", (24,), random_bits(rng, "F32", 24))}
    base = write_model(tmp / "base.safetensors", model)
    tunes = []
    for i in range(2):
        tuned = {n: (d, s, random_bits(rng, d, b.size, near=b)) for n, (d, s, b) in model.items()}
        tunes.append(write_model(tmp / f"ft{i}.safetensors", tuned))
    return model, base, tunes


def _deltas(tmp, base, tunes, options: dict) -> list:
    outs = [tmp / f"d{i}.delta" for i in range(len(tunes))]
    sparsestitch.compress(base, tunes, outs, **options)
    return outs


@pytest.mark.parametrize("label", sorted(OPTIONS))
@pytest.mark.parametrize("mode", ["auto", "positions", "whole"])
def test_compressed_deltas_patch_as_stitch_writes_them_and_revert_exactly(tmp_path, label, mode):
    model, base, tunes = _fine_tune_pair(tmp_path)
    deltas = _deltas(tmp_path, base, tunes, OPTIONS[label])
    tensors = live(model)
    for merge in ({}, {"rule": "task-arithmetic", "weights": [0.7, 0.3]}):
        for chosen in ([deltas[0]], deltas):
            if merge.get("weights") and len(chosen) == 1:
                continue
            want = load_bits(sparsestitch.stitch(base, chosen, tmp_path / "out.safetensors",
                                                 overwrite=True, **merge))
            with patching(mode):
                patch = sparsestitch.apply(tensors, chosen, max_memory=8192, **merge)
            assert_bits(tensors, model, want)
            if mode == "whole":
                assert all(entry.positions is None for entry in patch.entries)
            patch.revert()
            assert_bits(tensors, model, base_bits(model))
            with patching(mode):
                skill = sparsestitch.prepare(tensors, chosen, **merge)
            assert_bits(tensors, model, base_bits(model))
            for _ in range(2):
                with skill.apply(tensors):
                    assert_bits(tensors, model, want)
                assert_bits(tensors, model, base_bits(model))


def test_a_dense_default_delta_is_patched_whole_by_default_and_keeps_what_it_replaced(tmp_path):
    """One delta's bitmap (or every-element) records: each entry keeps the bits its record
    replaced, one per stored element, and no copy or mask of the tensor; two deltas merged
    by a rule keep a mask."""
    from sparsestitch.delta.format import DeltaReader
    model, base, tunes = _fine_tune_pair(tmp_path, seed=1)
    deltas = _deltas(tmp_path, base, tunes, {"density": 1.0, "bits": 2})
    delta = deltas[0]
    tensors = live(model)
    patch = sparsestitch.apply(tensors, delta)
    with DeltaReader(delta) as reader:
        for entry in patch.entries:
            assert entry.positions is None and entry.originals is None and entry.mask is None
            kept = sum(part[4].size for part in entry.saved.parts)
            assert kept == reader.record(entry.live.name).count
    now, before = bits_of(tensors, model), base_bits(model)
    changed = sum(int(np.count_nonzero(now[n] != before[n])) for n in model)
    patch.revert()
    with sparsestitch.apply(tensors, deltas) as merged:
        for entry in merged.entries:
            assert entry.saved is None
            assert entry.mask.shape == tensors[entry.live.name].shape
    skill = sparsestitch.prepare(tensors, delta)
    assert skill.count == changed
    assert skill.nbytes == sum(tensors[n].numel() * tensors[n].element_size() for n in skill.names)


def test_reverting_a_whole_patch_after_the_weights_changed_raises_and_changes_nothing(tmp_path):
    model, base, tunes = _fine_tune_pair(tmp_path, seed=2)
    (delta,) = _deltas(tmp_path, base, tunes[:1], {"density": 1.0, "bits": 2})
    tensors = live(model)
    patch = sparsestitch.apply(tensors, delta)
    tensors["b.weight"][3, 5] += 1          # e.g. a training step on the patched model
    changed = bits_of(tensors, model)
    with pytest.raises(SparsestitchError, match="changed since the patch was applied") as caught:
        patch.revert()
    assert caught.value.tensor == "b.weight" and patch.active
    assert_bits(tensors, model, changed)


def test_a_prepared_whole_patch_refuses_a_modified_tensor_before_writing(tmp_path):
    model, base, tunes = _fine_tune_pair(tmp_path, seed=3)
    (delta,) = _deltas(tmp_path, base, tunes[:1], {"density": 1.0, "bits": 2})
    tensors = live(model)
    skill = sparsestitch.prepare(tensors, delta)
    tensors["c.bias"][0] += 1
    changed = bits_of(tensors, model)
    with pytest.raises(BaseMismatchError, match="changed since it was prepared"):
        skill.apply(tensors)
    assert_bits(tensors, model, changed)


def test_a_failure_while_merging_whole_puts_every_tensor_back(tmp_path, monkeypatch):
    model, base, tunes = _fine_tune_pair(tmp_path, seed=4)
    (delta,) = _deltas(tmp_path, base, tunes[:1], {"density": 1.0, "bits": 2})
    tensors = live(model)
    from sparsestitch.live import patch as live_patch
    real, calls = live_patch.merge_in_place, []

    lock = threading.Lock()

    def fail_on_the_second(live, *args, **kwargs):
        with lock:                   # which call is the second, decided as it starts
            calls.append(live.name)
            second = len(calls) == 2
        real(live, *args, **kwargs)  # the tensor is fully merged, then the failure
        if second:
            raise OSError("disk read failed")
    monkeypatch.setattr(live_patch, "merge_in_place", fail_on_the_second)
    for threads in (1, 3):
        calls.clear()
        with pytest.raises(OSError, match="disk read failed"):
            sparsestitch.apply(tensors, delta, threads=threads)
        assert len(calls) >= 2
        assert_bits(tensors, model, base_bits(model))


def test_a_module_with_a_dense_delta_switches_in_place(tmp_path):
    model, base, tunes = _fine_tune_pair(tmp_path, seed=5)
    deltas = _deltas(tmp_path, base, tunes, {})
    want = load_bits(sparsestitch.stitch(base, deltas, tmp_path / "out.safetensors"))
    module = torch.nn.Module()
    for name, tensor in live(model).items():
        module.register_parameter(name.replace(".", "_"), torch.nn.Parameter(tensor))
    tensors = {n: module.get_parameter(n.replace(".", "_")) for n in model}
    with sparsestitch.apply(tensors, deltas):
        assert_bits(tensors, model, want)
    assert_bits(tensors, model, base_bits(model))


@pytest.mark.parametrize("change", ["one more", "one fewer"])
def test_a_bitmap_marking_other_than_its_count_is_refused_and_the_model_left_as_it_was(
        tmp_path, change):
    """A bitmap record whose bits disagree with its count (resealed, so every checksum holds)
    is refused by the bitmap-window path of ``apply`` and of a streamed restore, naming file
    and tensor; the live tensors keep their bits and no output is written."""
    from sparsestitch.core.errors import DeltaFormatError
    from sparsestitch.delta.codecs.base import pack_stream, unpack_stream

    from .support.images import DeltaImage

    model, base, tunes = _fine_tune_pair(tmp_path, seed=2)
    (delta,) = _deltas(tmp_path, base, tunes[:1], {"density": 0.5, "bits": 4})
    image = DeltaImage.read(delta)
    record = next(r for r in image.header["tensors"]
                  if r["kind"] == "sparse" and r["positions"]["codec"] == "bitmap")
    name, numel = record["name"], int(np.prod(record["shape"]))
    payload = image.payloads[name]
    split = record["positions_nbytes"]
    bits = np.unpackbits(np.frombuffer(unpack_stream(payload[:split], record["positions"],
                                                     (numel + 7) // 8), np.uint8),
                         bitorder="little")
    at = np.flatnonzero(bits[:numel] == (0 if change == "one more" else 1))[0]
    bits[at] ^= 1
    stream, config = pack_stream(np.packbits(bits, bitorder="little"))
    record["positions"] = {"codec": "bitmap", **config}
    record["positions_nbytes"] = len(stream)
    image.payloads[name] = stream + payload[split:]
    bad = tmp_path / "bad.delta"
    bad.write_bytes(image.to_bytes())
    tensors = live(model)
    with patching("whole"), pytest.raises(DeltaFormatError, match="bitmap marks") as caught:
        sparsestitch.apply(tensors, bad)
    assert (caught.value.path, caught.value.tensor) == (str(bad), name)
    assert_bits(tensors, model, base_bits(model))
    out = tmp_path / "restored.safetensors"
    with pytest.raises(DeltaFormatError, match="bitmap marks"):
        sparsestitch.restore(base, bad, out, block_bytes=64)
    assert not out.exists()
    # the stitch's block merge reads bitmaps as bits, whole tensors and streamed ones
    for budget in (None, "64KiB"):
        with pytest.raises(DeltaFormatError, match="bitmap marks"):
            sparsestitch.stitch(base, [delta, bad], out, rule="task-arithmetic",
                                max_memory=budget)
        assert not out.exists()


@settings(max_examples=80, deadline=None)
@given(numel=st.integers(1, 200), density=st.floats(0, 1), cuts=st.lists(st.integers(0, 200),
       max_size=5), dense_part=st.integers(-1, 5), bit=st.integers(0, 7), seed=st.integers(0, 99))
def test_saved_marks_undo_and_see_through_as_a_dense_reference_says(numel, density, cuts,
                                                                   dense_part, bit, seed):
    """SavedMarks against plain arrays: the tensor put back, and the bits before the patch at
    any sorted positions and in any chunk; over any cut into blocks, some blocks of every
    element (a window of None)."""
    rng = np.random.default_rng(seed)
    before = rng.integers(0, 1 << 16, numel, dtype=np.uint16)
    edges = sorted({0, numel, *[c % (numel + 1) for c in cuts]})
    blocks = list(zip(edges, edges[1:]))
    marked = rng.random(numel) < density
    saved, after = SavedMarks(), before.copy()
    for i, (lo, hi) in enumerate(blocks):
        if i == dense_part:
            marked[lo:hi] = True
            saved.add(lo, hi, None, 0, before[lo:hi].copy())
        else:
            window = np.packbits(np.concatenate([np.zeros(bit, bool), marked[lo:hi]]),
                                 bitorder="little")
            saved.add(lo, hi, window, bit, before[lo:hi][marked[lo:hi]])
    after[marked] = rng.integers(0, 1 << 16, int(marked.sum()), dtype=np.uint16)
    positions = np.flatnonzero(rng.random(numel) < 0.5)
    values = after[positions]
    saved.before(values, positions)
    assert np.array_equal(values, before[positions])
    start = int(rng.integers(0, numel))
    chunk = after[start:start + 37].copy()
    saved.before_chunk(chunk, start)
    assert np.array_equal(chunk, before[start:start + 37])
    flat = after.copy()
    saved.put_back(flat)
    assert np.array_equal(flat, before)


def test_a_patch_over_a_saved_bits_patch_sees_the_base_through_it(tmp_path):
    """The same default delta applied twice: the first patch keeps the bits it replaced
    (SavedMarks), the second is computed from the base seen through it -- its update is
    tau again, added to the current values -- and both revert, last in, first out."""
    from sparsestitch.delta.format import DeltaReader

    from .test_rules import narrow, widen
    model, base, tunes = _fine_tune_pair(tmp_path, seed=6)
    (delta,) = _deltas(tmp_path, base, tunes[:1], {})
    once = load_bits(sparsestitch.stitch(base, [delta], tmp_path / "once.safetensors"))
    tensors = live(model)
    first = sparsestitch.apply(tensors, delta)
    assert any(entry.saved is not None for entry in first.entries)
    with sparsestitch.apply(tensors, delta):
        got = bits_of(tensors, model)
        with DeltaReader(delta) as reader:
            for name, (dtype_name, _, bits) in model.items():
                record = reader.record(name)
                want = bits.copy()
                if record is not None and record.kind == "sparse":
                    at = reader.positions(record)
                    current, start = widen(once[name][at], dtype_name), widen(bits[at], dtype_name)
                    want[at] = narrow(current + (current - start), dtype_name)
                assert np.array_equal(got[name], want), name
    assert_bits(tensors, model, once)
    first.revert()
    assert_bits(tensors, model, base_bits(model))


@pytest.mark.parametrize("label", sorted(OPTIONS))
def test_lone_replace_says_what_the_merge_does(tmp_path, label):
    """``lone_replace`` (decided before a tensor is patched, from its records) agrees with
    the merge's own choice (``RecordRuns.lone`` and the rule's ``replaces_lone``), for one
    delta and two, under the default rule and task arithmetic; asked to keep what it replaces
    in a merge by rule, ``merge_in_place`` refuses before writing anything."""
    from sparsestitch.combine.combiners import rule_combiner
    from sparsestitch.delta.format import DeltaReader
    from sparsestitch.engine.budget import MemoryBudget
    from sparsestitch.engine.walk import RecordRuns, RowBlocks
    from sparsestitch.live.patch import lone_replace, merge_in_place
    from sparsestitch.core.dtypes import dtype as lookup_dtype
    from sparsestitch.live.tensors import LiveTensor

    model, base, tunes = _fine_tune_pair(tmp_path, seed=7)
    deltas = _deltas(tmp_path, base, tunes, OPTIONS[label])
    tensors = live(model)
    budget = MemoryBudget.of(None)
    for chosen in ([deltas[0]], deltas):
        for combine in (rule_combiner("localize-stitch", None, len(chosen)),
                        rule_combiner("task-arithmetic", [0.5] * len(chosen), len(chosen))):
            readers = [DeltaReader(p) for p in chosen]
            try:
                for name, tensor in tensors.items():
                    target = LiveTensor(name, tensor, lookup_dtype(model[name][0]))
                    records = [r.record(name) for r in readers]
                    blocks = RowBlocks.of(target.shape, target.dt.itemsize, budget.block_bytes)
                    with RecordRuns(target, name, blocks, readers, records, budget) as runs:
                        merged_by_marks = runs.lone is not None and \
                            combine.replaces_lone(target.dt, runs.lone)
                    assert lone_replace(target, records, combine) == merged_by_marks, name
                    if not merged_by_marks and any(r is not None and r.kind == "sparse"
                                                   for r in records):
                        before = bits_of(tensors, model)[name].copy()
                        with pytest.raises(AssertionError, match="merge by rule"):
                            merge_in_place(target, readers, records, combine, budget,
                                           keep=lambda *part: None)
                        assert np.array_equal(bits_of(tensors, model)[name], before)
            finally:
                for reader in readers:
                    reader.close()
