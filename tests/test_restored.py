"""Deltas localized again at merge time: a delta read as the fine-tune it restores merges
exactly as that restored fine-tune does (``merge`` of deltas, ``stitch --keep``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import sparsestitch
from sparsestitch.checkpoint import Checkpoint
from sparsestitch.cli import main
from sparsestitch.core.errors import BaseMismatchError
from sparsestitch.ops.restored import RestoredCheckpoint

from .conftest import finetune_of, save_checkpoint, small_model
from .test_checkpoint import assert_same_tensors as _same


def assert_same_tensors(a, b):
    """Two checkpoint files hold the same tensors, bit for bit."""
    from safetensors.torch import load_file
    _same(load_file(a), load_file(b))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A base, two default deltas of it (one adding a tensor), and their restored fine-tunes."""
    tmp = tmp_path_factory.mktemp("restored")
    base = small_model()
    paths = {"base": save_checkpoint(tmp / "base.safetensors", base)}
    for i in (1, 2):
        tune = finetune_of(base, seed=i)
        if i == 2:
            tune["extra.bias"] = torch.linspace(-1, 1, 12).to(torch.bfloat16)
        paths[f"ft{i}"] = save_checkpoint(tmp / f"ft{i}.safetensors", tune)
        paths[f"d{i}"] = tmp / f"d{i}.delta"
        sparsestitch.compress(paths["base"], paths[f"ft{i}"], paths[f"d{i}"])  # the default
        paths[f"r{i}"] = sparsestitch.restore(paths["base"], paths[f"d{i}"],
                                              tmp / f"r{i}.safetensors")
    return paths


def test_a_delta_reads_as_the_file_restore_writes(zoo):
    with Checkpoint(zoo["base"]) as base, Checkpoint(zoo["r2"]) as restored, \
            RestoredCheckpoint(base, zoo["d2"]) as virtual:
        assert virtual.names == restored.names
        for name in restored.names:
            assert virtual.entry(name).dtype == restored.entry(name).dtype
            assert np.array_equal(virtual.read(name), restored.read(name)), name
            rows = restored.entry(name).shape[0] if restored.entry(name).shape else 1
            # in blocks, skipping ahead, then starting again from the first row
            for start, stop in [(0, 1), (min(2, rows), rows), (0, rows)]:
                assert np.array_equal(virtual.read_rows(name, start, stop),
                                      restored.read_rows(name, start, stop)), (name, start)


@pytest.mark.parametrize("rule, options", [("localize-stitch", {}), ("ties", {"density": 0.5}),
                                           ("task-arithmetic", {"scale": 0.7})])
@pytest.mark.parametrize("keep, scope", [(0.05, "fidelity"), (0.2, "global"),
                                         (0.1, "per-tensor")])
def test_merging_deltas_with_keep_equals_merging_their_restored_fine_tunes(
        zoo, tmp_path, rule, options, keep, scope):
    kwargs = {"rule": rule, "keep": keep, "scope": scope, "chunk_elements": 200, **options}
    from_deltas = sparsestitch.merge(zoo["base"], [zoo["d1"], zoo["d2"]], tmp_path / "a.safetensors",
                                     **kwargs)
    from_tunes = sparsestitch.merge(zoo["base"], [zoo["r1"], zoo["r2"]], tmp_path / "b.safetensors",
                                    **kwargs)
    assert_same_tensors(from_deltas, from_tunes)
    stitched = sparsestitch.stitch(zoo["base"], [zoo["d1"], zoo["d2"]], tmp_path / "c.safetensors",
                                   rule=rule, keep=keep, scope=scope, max_memory="1MiB",
                                   **options)
    assert_same_tensors(stitched, from_tunes)


def test_keep_changes_what_a_default_delta_contributes(zoo, tmp_path):
    plain = sparsestitch.stitch(zoo["base"], [zoo["d1"], zoo["d2"]], tmp_path / "p.safetensors")
    kept = sparsestitch.stitch(zoo["base"], [zoo["d1"], zoo["d2"]], tmp_path / "k.safetensors",
                               keep=0.05)
    with Checkpoint(zoo["base"]) as base, Checkpoint(plain) as a, Checkpoint(kept) as b:
        name = "layer.0.mlp.weight"
        changed_plain = int((a.read(name) != base.read(name)).sum())
        changed_kept = int((b.read(name) != base.read(name)).sum())
    assert 0 < changed_kept < changed_plain


def test_a_delta_of_another_base_is_refused_and_nothing_is_written(zoo, tmp_path):
    other = save_checkpoint(tmp_path / "other.safetensors", small_model(seed=9))
    out = tmp_path / "never.safetensors"
    with pytest.raises(BaseMismatchError, match="another base") as caught:
        sparsestitch.stitch(other, [zoo["d1"]], out, keep=0.05)
    assert caught.value.path == str(zoo["d1"])
    assert not out.exists()


def test_stitch_keep_on_the_command_line(zoo, tmp_path):
    out = tmp_path / "cli.safetensors"
    result = CliRunner().invoke(main, ["stitch", str(zoo["base"]), str(zoo["d1"]), str(zoo["d2"]),
                                       "-o", str(out), "--keep", "0.05", "--quiet"])
    assert result.exit_code == 0, result.output
    api = sparsestitch.stitch(zoo["base"], [zoo["d1"], zoo["d2"]], tmp_path / "api.safetensors",
                              keep=0.05)
    assert_same_tensors(out, api)
    refused = CliRunner().invoke(main, ["stitch", str(zoo["base"]), str(zoo["d1"]), "-o",
                                        str(tmp_path / "x.safetensors"), "--keep", "0.05",
                                        "--device", "cuda"])
    assert refused.exit_code != 0 and "on the CPU" in refused.output


def test_zoo_merge_keep_localizes_its_members(tmp_path):
    from sparsestitch.zoo import add, init
    from sparsestitch.zoo import merge as zoo_merge
    base = small_model()
    paths = {"base": save_checkpoint(tmp_path / "base.safetensors", base)}
    for i in (1, 2):
        paths[f"ft{i}"] = save_checkpoint(tmp_path / f"ft{i}.safetensors", finetune_of(base, seed=i))
    zoo = tmp_path / "zoo"
    init(zoo, paths["base"])
    add(zoo, {"a": paths["ft1"], "b": paths["ft2"]}, workers=0)   # default deltas
    merged = zoo_merge(zoo, ["a", "b"], tmp_path / "m.safetensors", keep=0.05)
    want = sparsestitch.stitch(paths["base"], [zoo / "deltas" / "a.delta", zoo / "deltas" / "b.delta"],
                               tmp_path / "w.safetensors", keep=0.05)
    assert_same_tensors(merged, want)
    result = CliRunner().invoke(main, ["zoo", "merge", str(zoo), "a", "b", "-o",
                                       str(tmp_path / "cli.safetensors"), "--keep", "0.05"])
    assert result.exit_code == 0, result.output
    assert_same_tensors(tmp_path / "cli.safetensors", want)


def test_localize_stitch_over_deltas_made_for_restoring_says_to_localize(zoo, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="sparsestitch"):
        sparsestitch.stitch(zoo["base"], [zoo["d1"], zoo["d2"]], tmp_path / "a.safetensors")
    assert "d1.delta" in caplog.text and "--keep 0.05" in caplog.text
    caplog.clear()
    sparse = [tmp_path / f"s{i}.delta" for i in (1, 2)]
    for i, path in zip((1, 2), sparse):
        sparsestitch.compress(zoo["base"], zoo[f"ft{i}"], path, density=0.05)
    with caplog.at_level("WARNING", logger="sparsestitch"):
        sparsestitch.stitch(zoo["base"], sparse, tmp_path / "b.safetensors")
        sparsestitch.stitch(zoo["base"], [zoo["d1"], zoo["d2"]], tmp_path / "c.safetensors",
                            keep=0.05)
    assert caplog.text == ""
