"""The torch merge path (stitch/device.py) against the numpy one: bit-identical results.

The torch path runs here on the CPU; the CUDA test runs only where a GPU is present.
"""

from __future__ import annotations

import contextlib
import os
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsestitch.core.dtypes import dtype
from sparsestitch.ops.stitch import rule_combiner
from sparsestitch.combine.device import DeviceCombiner, resolve_device
from sparsestitch.engine.budget import MemoryBudget
from sparsestitch.engine.walk import Stored

import sparsestitch

from .conftest import save_checkpoint, small_model, finetune_of

#: Torch devices the device tests run on: the CPU device always, CUDA where there is one.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


#: Bit patterns every float dtype must survive: NaNs (quiet, signalling, negative, with
#: payloads), infinities, signed zeros, the smallest subnormal and the largest finite value.
SPECIAL_BITS = {
    "BF16": [0x7FC0, 0x7F81, 0xFFC1, 0x7F80, 0xFF80, 0x0000, 0x8000, 0x0001, 0x7F7F, 0xFF7F],
    "F16": [0x7E00, 0x7C01, 0xFE01, 0x7C00, 0xFC00, 0x0000, 0x8000, 0x0001, 0x7BFF, 0xFBFF],
    "F32": [0x7FC00000, 0x7F800001, 0xFFC00123, 0x7F800000, 0xFF800000, 0, 0x80000000, 1,
            0x7F7FFFFF, 0xFF7FFFFF],
    "F64": [0x7FF8000000000000, 0x7FF0000000000001, 0xFFF8000000000123, 0x7FF0000000000000,
            0xFFF0000000000000, 0, 0x8000000000000000, 1, 0x7FEFFFFFFFFFFFFF, 0xFFEFFFFFFFFFFFFF],
}


def _bits_like(rng, dt, base: np.ndarray, wild: float = 0.3) -> np.ndarray:
    """Fine-tuned bits for ``base``: the base with low mantissa bits changed (realistic small
    task vectors, many of equal magnitude: TIES's ties), except for a ``wild`` fraction of
    random bit patterns and :data:`SPECIAL_BITS`."""
    width = 8 * dt.itemsize
    nudged = base ^ rng.integers(1, 4, base.size).astype(dt.bits)
    random = rng.integers(0, 1 << width, base.size, dtype=np.uint64).astype(dt.bits)
    special = np.array(SPECIAL_BITS.get(dt.name, [0, 1]), np.uint64).astype(dt.bits)
    pick = rng.random(base.size)
    return np.where(pick >= wild, nudged, np.where(pick < wild / 2, random,
                                                 special[rng.integers(0, special.size,
                                                                      base.size)]))


def _base_bits(rng, dt, numel: int, repeated: float) -> np.ndarray:
    """Base bits: a ``repeated`` fraction of a few values (equal task vectors), the rest random
    and special patterns."""
    random = rng.integers(0, 1 << (8 * dt.itemsize), numel, dtype=np.uint64).astype(dt.bits)
    pool = random[rng.integers(0, min(4, numel), numel)]
    special = np.array(SPECIAL_BITS.get(dt.name, [0, 1]), np.uint64).astype(dt.bits)
    pick = rng.random(numel)
    return np.where(pick < repeated, pool, np.where(pick < 0.95, random,
                                               special[rng.integers(0, special.size, numel)]))


def _records(seed: int, dt_name: str, count: int, numel: int):
    rng = np.random.default_rng(seed)
    dt = dtype(dt_name)
    base = _base_bits(rng, dt, numel, repeated=float(rng.choice([0.3, 0.9, 1.0])))
    wild = float(rng.choice([0.0, 0.05, 0.3]))  # calm records: ties at TIES's threshold
    stored = []
    for _ in range(count):
        if rng.random() < 0.2:
            stored.append(None)
            continue
        positions = np.sort(rng.choice(numel, int(rng.integers(0, numel + 1)), replace=False))
        finetuned = _bits_like(rng, dt, base[positions], wild)
        stored.append(Stored(positions.astype(np.int64), finetuned, base[positions]))
    return dt, stored


RULE_OPTIONS = {
    "localize-stitch": st.just({}),
    "task-arithmetic": st.builds(dict, scale=st.sampled_from([1.0, 0.7, -1.5])),
    "ties": st.builds(dict, density=st.sampled_from([0.0, 0.05, 0.3, 0.5, 1.0]),
                      scale=st.sampled_from([1.0, 0.7])),
    "ties-mergekit": st.builds(dict, density=st.sampled_from([0.0, 0.3, 1.0]),
                               scale=st.sampled_from([1.0, 0.7])),
    "dare": st.builds(dict, drop=st.sampled_from([0.0, 0.5, 0.9]), seed=st.integers(0, 3),
                      scale=st.sampled_from([1.0, 0.7])),
    "dare-ties-mergekit": st.builds(dict, density=st.sampled_from([0.3, 1.0]),
                                    seed=st.integers(0, 3), rescale=st.sampled_from([0, 1])),
    "dare-linear-mergekit": st.builds(dict, density=st.sampled_from([0.5, 1.0]),
                                      normalize=st.sampled_from([0, 1])),
    "breadcrumbs-mergekit": st.builds(dict, density=st.sampled_from([0.4, 0.9]),
                                      gamma=st.sampled_from([0.0, 0.1])),
    "breadcrumbs-ties-mergekit": st.builds(dict, density=st.sampled_from([0.5, 1.0]),
                                           gamma=st.sampled_from([0.05, 0.2]),
                                           rescale=st.sampled_from([0, 1])),
}
WEIGHTS = st.lists(st.one_of(st.sampled_from([1.0, 0.5, -1.0, 0.0]), st.floats(-2, 2, width=32)),
                   min_size=5, max_size=5)


def test_every_rule_has_a_device_form():
    from sparsestitch.ops.stitch import RULES

    assert all(rule.has_torch_update for rule in RULES.values())
    assert set(RULES) == set(RULE_OPTIONS)


@contextmanager
def _numpy_combiner_forbidden():
    """Fail if anything hands the device combiner's work to the numpy combiner or to a
    rule's numpy reference math."""
    from sparsestitch.ops.stitch import RULES
    from sparsestitch.combine.combiners import RuleCombiner

    refuse = AssertionError("the device path ran the numpy combiner")
    patches = [mock.patch.object(RuleCombiner, "combine", side_effect=refuse)]
    patches += [mock.patch.object(type(rule), "update", side_effect=refuse)
                for rule in RULES.values() if rule.name != "ties-mergekit"]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=400, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dt_name=st.sampled_from(["BF16", "F16", "F32", "F64"]),
       count=st.integers(0, 5), numel=st.integers(1, 300),
       rule_and_options=st.sampled_from(sorted(RULE_OPTIONS)).flatmap(
           lambda rule: st.tuples(st.just(rule), RULE_OPTIONS[rule])),
       weights=WEIGHTS, stacked=st.booleans())
def test_torch_combiner_matches_numpy_bit_for_bit(device, seed, dt_name, count, numel,
                                                 rule_and_options, weights, stacked):
    """Every rule, every float dtype, random checkpoints and delta sets (NaN, inf, -0.0,
    subnormals, equal magnitudes at TIES's threshold, overlaps, weights, hot-swap's
    ``onto``): torch's combiner on the CPU device gives the numpy combiner's bits, running
    torch code only (the numpy combiner and the rules' numpy math refuse to run)."""
    rule, options = rule_and_options
    dt, stored = _records(seed, dt_name, count, numel)
    numpy_combiner = rule_combiner(rule, weights[:count], count, **options)
    onto = None
    if stacked:  # live bits under another patch: what the update is added to
        union = np.unique(np.concatenate([s.positions for s in stored if s is not None] or
                                         [np.empty(0, np.int64)]))
        onto = _bits_like(np.random.default_rng(seed + 1), dt, np.zeros(union.size, dt.bits))
    want = numpy_combiner.combine("layer.w", dt, numel, stored, onto)
    on_device = DeviceCombiner(numpy_combiner, device)
    with _numpy_combiner_forbidden():
        got = on_device.combine("layer.w", dt, numel, stored, onto)
    assert np.array_equal(want[0], got[0])
    assert got[1].dtype == dt.bits
    assert np.array_equal(want[1], got[1]), (want[1], got[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dt_name", ["I32", "U8", "BOOL", "I64"])
def test_non_float_tensors_on_the_device(dt_name, device):
    """Non-float tensors take the stored bits on the device too; disagreeing deltas are refused
    by both paths."""
    from sparsestitch.core.errors import TensorMismatchError

    dt = dtype(dt_name)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 50).astype(dt.bits)
    agreed = rng.integers(0, 2, 50).astype(dt.bits)
    stored = [Stored(np.arange(0, 50, k, dtype=np.int64), agreed[::k].copy(), base[::k].copy())
              for k in (2, 3)]
    combiner = rule_combiner("ties", None, 2)
    want = combiner.combine("w", dt, 50, stored)
    with _numpy_combiner_forbidden():
        got = DeviceCombiner(combiner, device).combine("w", dt, 50, stored)
    assert all(np.array_equal(a, b) for a, b in zip(want, got))
    stored[1].finetuned[0] ^= 1
    for run in (combiner, DeviceCombiner(combiner, device)):
        with pytest.raises(TensorMismatchError, match="non-float"):
            run.combine("w", dt, 50, stored)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=50, deadline=None)
@given(name=st.text(max_size=12), positions=st.lists(st.integers(0, 2**40), max_size=50))
def test_tie_order_in_torch_is_tiebreaks(device, name, positions):
    from sparsestitch.combine.device_rules import tie_order as torch_tie_order
    from sparsestitch.core.tiebreak import tie_order

    array = np.array(positions, np.int64)
    got = torch_tie_order(name, torch.from_numpy(array).to(device)).cpu().numpy()
    assert np.array_equal(got, tie_order(name, array).astype(np.int64))


def test_a_rule_without_a_device_form_is_refused_by_name():
    combiner = rule_combiner("dare", None, 1)
    with mock.patch.object(type(combiner.rule), "has_torch_update", False):
        with pytest.raises(ValueError, match="'dare' has no device form"):
            DeviceCombiner(combiner, "cpu")


def test_resolve_device():
    assert resolve_device("cpu") is None
    if not torch.cuda.is_available():
        assert resolve_device("auto") is None
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def _three_deltas(folder, density: float) -> list:
    """A base.safetensors in ``folder`` and three deltas of fine-tunes of it."""
    base = small_model()
    save_checkpoint(folder / "base.safetensors", base)
    tunes = [save_checkpoint(folder / f"ft{i}.safetensors", finetune_of(base, seed=i))
             for i in (1, 2, 3)]
    deltas = [folder / f"ft{i}.delta" for i in (1, 2, 3)]
    sparsestitch.compress(folder / "base.safetensors", tunes, deltas, density=density)
    return deltas


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rule", ["localize-stitch", "task-arithmetic", "ties", "ties-mergekit",
                                  "dare"])
def test_cuda_stitch_equals_cpu_stitch(tmp_path, rule):
    deltas = _three_deltas(tmp_path, density=0.3)
    cpu = sparsestitch.stitch(tmp_path / "base.safetensors", deltas, tmp_path / "cpu.safetensors",
                              rule=rule, device="cpu")
    gpu = sparsestitch.stitch(tmp_path / "base.safetensors", deltas, tmp_path / "gpu.safetensors",
                              rule=rule, device="cuda")
    assert cpu.read_bytes() == gpu.read_bytes()


ENGINE_CASES = [("localize-stitch", {}), ("task-arithmetic", {"scale": 0.6}),
                ("ties", {"density": 0.2}), ("ties-mergekit", {"density": 0.3}),
                ("dare", {"drop": 0.5, "seed": 3})]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule, options", ENGINE_CASES)
def test_engine_with_torch_combiner_writes_the_same_model(tmp_path, rule, options, device):
    """The whole streaming engine with the torch combiner (on the CPU device) vs the numpy
    stitcher, for every rule (small row blocks: the streamed path too)."""
    from safetensors.torch import load_file

    from .conftest import bits

    from sparsestitch.ops import stitch_engine as engine

    deltas = _three_deltas(tmp_path, density=0.4)
    weights = [1.0, 0.5, 1.0]
    want = sparsestitch.stitch(tmp_path / "base.safetensors", deltas, tmp_path / "numpy.safetensors",
                               rule=rule, weights=weights, **options)
    combiner = DeviceCombiner(rule_combiner(rule, weights, 3, **options), device)
    with _numpy_combiner_forbidden():
        got = engine.run(tmp_path / "base.safetensors", deltas, tmp_path / "torch.safetensors",
                         combiner, budget=MemoryBudget(4 * 4096))
    want_tensors, got_tensors = load_file(want), load_file(got)
    assert want_tensors.keys() == got_tensors.keys()
    for name, tensor in want_tensors.items():
        assert np.array_equal(bits(tensor), bits(got_tensors[name])), name


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dt_name=st.sampled_from(["BF16", "F16", "F32", "F64"]),
       count=st.integers(0, 5), numel=st.integers(1, 300),
       rule=st.sampled_from(["localize-stitch", "task-arithmetic"]),
       weights=st.lists(st.floats(-2, 2, width=32), min_size=5, max_size=5),
       cut=st.integers(0, 300), window=st.integers(1, 64))
def test_block_merges_on_torch_and_numpy_match_the_combiner(seed, dt_name, count, numel, rule,
                                                             weights, cut, window):
    """The block merges (C loop where built, numpy, torch), on a tensor cut into two blocks
    and small windows, write exactly what the union-based combiner computes."""
    from sparsestitch.combine.combiners import BlockMerge
    from sparsestitch.combine.device import DeviceBlockMerge

    dt, stored = _records(seed, dt_name, count, numel)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 1 << (8 * dt.itemsize), numel, dtype=np.uint64).astype(dt.bits)
    for s in stored:                      # the records' base bits come from this tensor
        if s is not None:
            s.base[:] = base[s.positions]
    options = {"scale": 0.7} if rule == "task-arithmetic" else {}
    combiner = rule_combiner(rule, weights[:count], count, **options)
    positions, bits = combiner.combine("w", dt, numel, stored)
    want = base.copy()
    want[positions] = bits
    cut = min(cut, numel)
    before = [None if s is None else (s.finetuned.copy(), s.base.copy()) for s in stored]
    with mock.patch.dict(os.environ, {"SPARSESTITCH_NATIVE": "0"}):
        numpy_merge = combiner.block_merge(dt, stored)
    assert numpy_merge.kernels is None
    for merge in (combiner.block_merge(dt, stored), numpy_merge,
                  DeviceCombiner(combiner, "cpu").block_merge(dt, stored)):
        merge.WINDOW = window
        got = base.copy()
        merge(got[:cut], 0)
        merge(got[cut:], cut)
        assert np.array_equal(got, want), (type(merge).__name__, getattr(merge, "kernels", None))
    for s, kept in zip(stored, before):   # the records are read, never modified
        assert s is None or (np.array_equal(s.finetuned, kept[0]) and np.array_equal(s.base, kept[1]))
    assert isinstance(DeviceCombiner(combiner, "cpu").block_merge(dt, stored), DeviceBlockMerge)
    assert isinstance(combiner.block_merge(dt, stored), BlockMerge)


def test_the_engine_runs_device_merges_in_its_writing_thread_only(tmp_path):
    """Reader threads decode; device work (and device memory) stays in the caller's thread."""
    import threading

    from sparsestitch.ops import stitch_engine as engine
    from sparsestitch.combine.device import DeviceBlockMerge

    deltas = _three_deltas(tmp_path, density=0.4)
    threads, real = [], DeviceBlockMerge.__call__

    def spy(self, block, first):
        threads.append(threading.current_thread())
        return real(self, block, first)
    with mock.patch.object(DeviceBlockMerge, "__call__", spy):
        engine.run(tmp_path / "base.safetensors", deltas, tmp_path / "out.safetensors",
                   DeviceCombiner(rule_combiner("localize-stitch", None, 3), "cpu"))
    assert threads and set(threads) == {threading.main_thread()}


@pytest.mark.parametrize("device", DEVICES)
def test_staging_reuses_its_buffers(device):
    """Copies go through a ring of reused host buffers (grown, never reallocated per array),
    pinned on CUDA."""
    from sparsestitch.combine.staging import Staging

    staging = Staging(device, slots=2)
    rng = np.random.default_rng(0)
    for _ in range(20):
        array = rng.integers(0, 2**16, 1000).astype(np.uint16)
        on_device = staging.to_device(array)
        assert on_device.dtype == torch.int16
        back = np.empty_like(array)
        staging.to_host(on_device, back)
        assert np.array_equal(back, array)
    assert staging.allocations == 2
    assert all(b.is_pinned() == (device == "cuda") for b in staging._buffers)
    kept = staging.to_device(np.arange(5, dtype=np.int64))
    staging.to_device(np.arange(5, 10, dtype=np.int64))
    staging.to_device(np.arange(10, 15, dtype=np.int64))  # the first buffer again
    assert kept.cpu().tolist() == [0, 1, 2, 3, 4]  # never aliases a staging buffer
