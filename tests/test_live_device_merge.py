"""Hot-swap with the device merge (live/device_merge.py), which ``apply`` uses for CUDA tensors,
run on torch's CPU device: every test of test_live.py and test_prepared.py again, and ``apply``
against ``stitch`` with the numpy combiner and decoders forbidden."""

from __future__ import annotations

import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings, strategies as st

import sparsestitch
from sparsestitch.live import patch as patch_module

from .test_live import *  # noqa: F401,F403 - collected again here, under the fixture below
from .test_live import assert_bits, base_bits, live, random_merge_case
from .test_prepared import *  # noqa: F401,F403
from .test_resident import _torch_only
from .test_rules import RULE_OPTIONS


@pytest.fixture(autouse=True, scope="module")
def merge_on_the_cpu_device():
    with mock.patch.object(patch_module, "DEVICE_MERGED", ("cpu", "cuda")):
        yield


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(1, 4),
       rule=st.sampled_from(sorted(RULE_OPTIONS)), pick=st.integers(0, 2))
def test_apply_merges_on_the_device_equal_to_stitch(seed, count, rule, pick):
    with tempfile.TemporaryDirectory() as tmp:
        model, deltas, merge, stitched = random_merge_case(Path(tmp), seed, count, rule, pick)
        tensors = live(model)
        with _torch_only():
            patch = sparsestitch.apply(tensors, deltas, **merge)
        assert_bits(tensors, model, stitched)
        patch.revert()
        assert_bits(tensors, model, base_bits(model))
