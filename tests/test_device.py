"""The torch merge path (stitch/device.py) against the numpy one: bit-identical results.

The torch path runs here on the CPU; the CUDA test runs only where a GPU is present.
"""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsestitch.dtypes import dtype
from sparsestitch.stitch import rule_combiner
from sparsestitch.stitch.device import DeviceCombiner, resolve_device
from sparsestitch.walk import Stored

import sparsestitch

from .conftest import save_checkpoint, small_model, finetune_of


def _records(seed: int, dt_name: str, count: int, numel: int):
    rng = np.random.default_rng(seed)
    dt = dtype(dt_name)
    base = rng.integers(0, 1 << (8 * dt.itemsize), numel, dtype=np.uint64).astype(dt.bits)
    stored = []
    for _ in range(count):
        if rng.random() < 0.2:
            stored.append(None)
            continue
        positions = np.sort(rng.choice(numel, int(rng.integers(0, numel + 1)), replace=False))
        finetuned = rng.integers(0, 1 << (8 * dt.itemsize), positions.size,
                                 dtype=np.uint64).astype(dt.bits)
        stored.append(Stored(positions.astype(np.int64), finetuned, base[positions]))
    return dt, stored


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dt_name=st.sampled_from(["BF16", "F16", "F32", "F64"]),
       count=st.integers(0, 6), numel=st.integers(1, 300),
       rule=st.sampled_from(["localize-stitch", "task-arithmetic"]),
       weights=st.lists(st.floats(-2, 2, width=32), min_size=6, max_size=6))
def test_torch_path_matches_numpy_bit_for_bit(seed, dt_name, count, numel, rule, weights):
    """Random bit patterns (NaN, inf, subnormals included), overlaps, weights, both rules."""
    dt, stored = _records(seed, dt_name, count, numel)
    options = {"scale": 0.7} if rule == "task-arithmetic" else {}
    cpu = rule_combiner(rule, weights[:count], count, **options)
    want = cpu.combine("w", dt, numel, stored)
    got = DeviceCombiner(cpu, "cpu").combine("w", dt, numel, stored)
    assert np.array_equal(want[0], got[0])
    assert got[1].dtype == dt.bits
    assert np.array_equal(want[1], got[1])


def test_other_rules_fall_back_to_numpy():
    dt, stored = _records(3, "BF16", 3, 200)
    cpu = rule_combiner("ties", None, 3, density=0.5)
    want = cpu.combine("w", dt, 200, stored)
    got = DeviceCombiner(cpu, "cpu").combine("w", dt, 200, stored)
    assert all(np.array_equal(a, b) for a, b in zip(want, got))


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
@pytest.mark.parametrize("rule", ["localize-stitch", "task-arithmetic"])
def test_cuda_stitch_equals_cpu_stitch(tmp_path, rule):
    deltas = _three_deltas(tmp_path, density=0.3)
    cpu = sparsestitch.stitch(tmp_path / "base.safetensors", deltas, tmp_path / "cpu.safetensors",
                              rule=rule, device="cpu")
    gpu = sparsestitch.stitch(tmp_path / "base.safetensors", deltas, tmp_path / "gpu.safetensors",
                              rule=rule, device="cuda")
    assert cpu.read_bytes() == gpu.read_bytes()


def test_engine_with_torch_combiner_writes_the_same_model(tmp_path):
    """The whole streaming engine with the torch combiner (on the CPU) vs the numpy stitcher."""
    from safetensors.torch import load_file

    from .conftest import bits

    from sparsestitch.stitch import engine

    deltas = _three_deltas(tmp_path, density=0.4)
    want = sparsestitch.stitch(tmp_path / "base.safetensors", deltas, tmp_path / "numpy.safetensors")
    got = engine.run(tmp_path / "base.safetensors", deltas, tmp_path / "torch.safetensors",
                     DeviceCombiner(rule_combiner("localize-stitch", None, 3), "cpu"))
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
    from sparsestitch.stitch.combine import BlockMerge
    from sparsestitch.stitch.device import DeviceBlockMerge

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

    from sparsestitch.stitch import engine
    from sparsestitch.stitch.device import DeviceBlockMerge

    deltas = _three_deltas(tmp_path, density=0.4)
    threads, real = [], DeviceBlockMerge.__call__

    def spy(self, block, first):
        threads.append(threading.current_thread())
        return real(self, block, first)
    with mock.patch.object(DeviceBlockMerge, "__call__", spy):
        engine.run(tmp_path / "base.safetensors", deltas, tmp_path / "out.safetensors",
                   DeviceCombiner(rule_combiner("localize-stitch", None, 3), "cpu"))
    assert threads and set(threads) == {threading.main_thread()}
