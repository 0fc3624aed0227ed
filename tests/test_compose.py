"""Continual composition: ``stitch_add`` writes exactly what stitching every delta would."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import sparsestitch
from sparsestitch.core.errors import BaseMismatchError, TensorMismatchError
from sparsestitch.delta.format import DeltaReader
from sparsestitch.ops.stitch import COMPOSABLE_RULES

from .test_rules import FLOAT_DTYPES, random_bits
from .test_stitch import file_bytes, random_deltas, random_model, write_delta, write_model


def _zoo(tmp: Path, seed: int, count: int, shards: int = 0, added: dict | None = None):
    """A base (a file, or a folder of ``shards``) and ``count`` random deltas of it."""
    rng = np.random.default_rng(seed)
    model = random_model(rng, FLOAT_DTYPES + ("I64",), 4)
    base = write_model(tmp / ("base" if shards else "base.safetensors"), model, max(shards, 1))
    masks, tunes = random_deltas(rng, model, count)
    deltas = [write_delta(tmp / f"d{i}.delta", model, m, t, (added or {}) if i == count - 1 else {})
              for i, (m, t) in enumerate(zip(masks, tunes))]
    return model, base, deltas


def _name(base: Path, label: str) -> str:
    return label if base.is_dir() else f"{label}.safetensors"


def contents(path: Path):
    """A folder's files by name, or a file's bytes."""
    return file_bytes(path) if path.is_dir() else path.read_bytes()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(1, 5), shards=st.integers(0, 3),
       rule=st.sampled_from(COMPOSABLE_RULES), weighted=st.booleans(),
       in_place=st.booleans())
def test_adding_a_delta_equals_stitching_all_from_scratch(seed, count, shards, rule, weighted,
                                                          in_place):
    options = {"scale": 0.7} if rule == "task-arithmetic" and weighted else {}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        _, base, deltas = _zoo(tmp, seed, count, shards)
        weights = [1.0 + i / 3 for i in range(count)] if weighted else None
        scratch = sparsestitch.stitch(base, deltas, tmp / _name(base, "scratch"), rule=rule,
                                      weights=weights, **options)
        merged = sparsestitch.stitch(base, deltas[:-1], tmp / _name(base, "merged"), rule=rule,
                                     weights=weights and weights[:-1], **options)
        out = None if in_place else tmp / _name(base, "added")
        result = sparsestitch.stitch_add(base, deltas[:-1], deltas[-1], merged, out, rule=rule,
                                         weights=weights, max_memory=256, **options)
        assert result == (merged if in_place else out)
        assert contents(result) == contents(scratch)
        assert not [p for p in tmp.iterdir() if ".sstmp-" in p.name]


def test_additions_chain_and_keep_tensors_a_delta_adds(tmp_path):
    rng = np.random.default_rng(1)
    head = ("F32", (3, 2), random_bits(rng, "F32", 6))
    _, base, deltas = _zoo(tmp_path, 1, 3, shards=2, added={"head.weight": head})
    scratch = sparsestitch.stitch(base, deltas, tmp_path / "scratch")
    merged = sparsestitch.stitch(base, deltas[:1], tmp_path / "merged")
    for i in (1, 2):
        sparsestitch.stitch_add(base, deltas[:i], deltas[i], merged)
    assert contents(merged) == contents(scratch)


def test_only_tensors_the_new_delta_stores_are_decoded(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    model = {n: ("BF16", (16, 4), random_bits(rng, "BF16", 64)) for n in ("a", "b", "c")}
    base = write_model(tmp_path / "base.safetensors", model)
    old = [write_delta(tmp_path / f"old{i}.delta", model,
                       {n: np.ones(64, bool) for n in model},
                       {n: random_bits(rng, "BF16", 64, near=model[n][2]) for n in model})
           for i in range(2)]
    new_mask = np.zeros(64, bool)
    new_mask[[3, 40]] = True
    new = write_delta(tmp_path / "new.delta", model, {"b": new_mask},
                      {"b": random_bits(rng, "BF16", 64, near=model["b"][2])})
    merged = sparsestitch.stitch(base, old, tmp_path / "merged.safetensors")
    decoded = []
    payload = DeltaReader.payload
    monkeypatch.setattr(DeltaReader, "payload",
                        lambda self, record: decoded.append(record.name) or payload(self, record))
    out = sparsestitch.stitch_add(base, old, new, merged, tmp_path / "out.safetensors")
    assert sorted(decoded) == ["b", "b", "b"]
    monkeypatch.undo()
    scratch = sparsestitch.stitch(base, [*old, new], tmp_path / "scratch.safetensors")
    assert contents(out) == contents(scratch)


@pytest.mark.parametrize("rule", ["ties", "dare"])
def test_rules_that_are_not_elementwise_are_refused(tmp_path, rule):
    with pytest.raises(ValueError, match="from scratch"):
        sparsestitch.stitch_add(tmp_path / "base.safetensors", [], tmp_path / "d.delta",
                                tmp_path / "merged.safetensors", rule=rule)


def test_a_merged_model_made_otherwise_is_refused_and_left_alone(tmp_path):
    _, base, deltas = _zoo(tmp_path, 3, 3)
    merged = sparsestitch.stitch(base, deltas[:2], tmp_path / "merged.safetensors",
                                 weights=[1, 2])
    before = merged.read_bytes()
    attempts = [dict(deltas=deltas[:2], weights=[1, 1, 1]),        # other weights
                dict(deltas=deltas[1::-1], weights=[2, 1, 1]),     # other order
                dict(deltas=deltas[:1], weights=[1, 2])]           # other deltas
    for attempt in attempts:
        with pytest.raises(TensorMismatchError, match="merged"):
            sparsestitch.stitch_add(base, attempt["deltas"], deltas[2], merged,
                                    weights=attempt["weights"])
    with pytest.raises(TensorMismatchError, match="merged"):
        sparsestitch.stitch_add(base, deltas[:2], deltas[2], merged, rule="task-arithmetic",
                                weights=[1, 2, 1])
    plain = shutil.copy(base, tmp_path / "plain.safetensors")      # no recipe
    with pytest.raises(TensorMismatchError, match="recipe"):
        sparsestitch.stitch_add(base, [], deltas[2], plain)
    assert merged.read_bytes() == before


def test_a_new_delta_for_another_base_is_refused_before_replacing(tmp_path):
    model, base, deltas = _zoo(tmp_path, 4, 2)
    rng = np.random.default_rng(5)
    other = {n: (d, shape, random_bits(rng, d, bits.size)) for n, (d, shape, bits) in model.items()}
    masks, tunes = random_deltas(rng, other, 1)
    stranger = write_delta(tmp_path / "stranger.delta", other, masks[0], tunes[0])
    merged = sparsestitch.stitch(base, deltas, tmp_path / "merged.safetensors")
    before = merged.read_bytes()
    with pytest.raises(BaseMismatchError):
        sparsestitch.stitch_add(base, deltas, stranger, merged)
    assert merged.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".sstmp-" in p.name]
