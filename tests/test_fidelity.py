"""What a delta keeps: allocation by fidelity, the fidelity reports, the concentration warning."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import sparsestitch
from sparsestitch.delta.format import DeltaReader
from sparsestitch.core.tiebreak import tie_order

from .conftest import save_checkpoint


def skewed_pair(seed: int = 0, huge: float = 100.0):
    """An embedding whose task vector is ``huge`` times larger than every layer's: the
    paper's global top-k spends its whole budget there."""
    g = torch.Generator().manual_seed(seed)
    base = {"model.embed.weight": torch.randn(256, 64, generator=g)}
    base.update({f"model.layers.{i}.{kind}.weight": torch.randn(64, 64, generator=g)
                 for i in range(3) for kind in ("q", "mlp")})
    base["model.norm.weight"] = torch.ones(64)
    tune = {}
    for name, tensor in base.items():
        scale = huge if "embed" in name else 1.0
        tune[name] = tensor + 1e-3 * scale * torch.randn(tensor.shape, generator=g)
    return base, tune


def _written(tmp_path, base, tune, name="t", **options):
    base_path = save_checkpoint(tmp_path / "base.safetensors", base)
    tune_path = save_checkpoint(tmp_path / f"{name}.safetensors", tune)
    (summary,) = sparsestitch.compress(base_path, tune_path, tmp_path / f"{name}.delta",
                                       **options)
    return summary, tmp_path / f"{name}.delta"


def test_fidelity_allocation_never_starves_a_tensor(tmp_path, caplog):
    base, tune = skewed_pair()
    with caplog.at_level(logging.WARNING, logger="sparsestitch"):
        paper, paper_delta = _written(tmp_path, base, tune, "paper", density=0.01, scope="global")
    assert any("model.embed.weight" in w and "of the kept values" in w for w in paper.warnings)
    assert "model.embed.weight" in caplog.text  # said on stderr (logging's default)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sparsestitch"):
        ours, ours_delta = _written(tmp_path, base, tune, "ours", density=0.01)
    assert ours.warnings == [] and caplog.text == ""
    for delta, starved in ((paper_delta, True), (ours_delta, False)):
        with DeltaReader(delta) as reader:
            layers = [r for r in reader.records if "layers" in r.name]
            errors = [r.fidelity["relative_error"] for r in layers]
        if starved:
            assert max(errors) > 0.999  # the layers kept nothing of their change
        else:
            assert max(errors) < 0.97 and all(r.count > 0 for r in layers)
    # The objective it optimizes: the sum over tensors of relative squared errors.
    assert sum_of_squared_errors(ours_delta) < sum_of_squared_errors(paper_delta)


def sum_of_squared_errors(delta) -> float:
    with DeltaReader(delta) as reader:
        return sum(r.fidelity["relative_error"] ** 2 for r in reader.records if r.fidelity)


def test_fidelity_scope_is_the_top_k_of_normalized_magnitudes(tmp_path):
    """Against a reference written out here: |tau| as float32 keys, divided by the tensor's
    norm (float64 sum of squares over the blocks in order), top-k with compress's ties."""
    base, tune = skewed_pair(seed=3, huge=30.0)
    chunk = 1 << 12
    summary, delta = _written(tmp_path, base, tune, density=0.02, chunk_elements=chunk)
    names = sorted(base)
    keys, orders = [], []
    for name in names:
        magnitude = np.abs(tune[name].numpy().reshape(-1) - base[name].numpy().reshape(-1))
        magnitude = magnitude.astype(np.float32)
        energy = sum(float(np.dot(b.astype(np.float64), b.astype(np.float64)))
                     for b in np.array_split(magnitude, range(chunk, magnitude.size, chunk)))
        scaled = magnitude * np.float32(1.0 / np.sqrt(energy))
        keys.append(scaled.view(np.uint32))
        orders.append(tie_order(name, np.arange(magnitude.size)))
    flat, order = np.concatenate(keys), np.concatenate(orders)
    k = summary.kept
    ranking = np.lexsort((np.arange(flat.size), -order.astype(np.int64), -flat.astype(np.int64)))
    chosen = np.zeros(flat.size, bool)
    chosen[ranking[:k]] = True
    with DeltaReader(delta) as reader:
        at = 0
        for name, key in zip(names, keys):
            record = reader.record(name)
            got = reader.positions(record) if record.kind == "sparse" else np.empty(0)
            assert got.tolist() == np.flatnonzero(chosen[at:at + key.size]).tolist(), name
            at += key.size


def test_reports_say_what_was_kept(tmp_path):
    base, tune = skewed_pair(seed=5)
    summary, delta = _written(tmp_path, base, tune, density=0.05)
    with DeltaReader(delta) as reader:
        for record in reader.records:
            tau = tune[record.name].double().reshape(-1) - base[record.name].double().reshape(-1)
            kept = np.zeros(tau.numel(), bool)
            if record.kind == "sparse":
                kept[reader.positions(record)] = True
            energy = float((tau ** 2).sum())
            lost = float((tau[~torch.from_numpy(kept)] ** 2).sum())
            report = record.fidelity
            assert report["relative_error"] == pytest.approx(np.sqrt(lost / energy), rel=1e-4)
            assert report["energy_kept"] == pytest.approx(1 - lost / energy, abs=1e-6)
            assert report["tau_norm"] == pytest.approx(np.sqrt(energy), rel=1e-5)
        header = reader.header["fidelity"]
    assert header == summary.fidelity and not header["lossless"]
    assert header["bits_per_parameter"] == pytest.approx(
        8 * sum(r.nbytes for r in sparsestitch.info(delta).tensors) / summary.candidates)
    lossless, _ = _written(tmp_path, base, tune, "full", density=1.0)
    assert lossless.fidelity["lossless"] and lossless.fidelity["relative_error"] == 0.0
