"""Hub ids resolved offline through a hand-built Hugging Face cache, and model cards.

The cache follows huggingface_hub's layout (``models--ORG--NAME/{blobs,refs,snapshots}``,
snapshot files symlinked to content-addressed blobs) with real safetensors files; the
environment points huggingface_hub at it and forbids network access.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import sparsestitch

from sparsestitch.checkpoint import Checkpoint
from sparsestitch.core.errors import CheckpointError
from sparsestitch.checkpoint.hub import parse_hub_id, resolve, resolve_checkpoint, write_model_card
from sparsestitch.zoo import add, get, init, ls

from .conftest import bits, finetune_of, save_checkpoint, small_model
from .support.hub_cache import cache_model

pytest.importorskip("huggingface_hub")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A cache holding org/base (main) and org/math (main, and tag v1 at an older commit)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = small_model()
    made = tmp_path / "made"
    save_checkpoint(made / "base", base)
    save_checkpoint(made / "math-v1", finetune_of(base, seed=1))
    save_checkpoint(made / "math", finetune_of(base, seed=2))
    snapshots = {
        "org/base": cache_model(cache, "org/base", made / "base", "b" * 40),
        "org/math@v1": cache_model(cache, "org/math", made / "math-v1", "1" * 40, refs=("v1",)),
        "org/math": cache_model(cache, "org/math", made / "math", "2" * 40),
    }
    return snapshots, made


def test_hub_ids_resolve_to_their_snapshots(hub):
    snapshots, _ = hub
    assert resolve_checkpoint("org/base") == snapshots["org/base"]
    assert resolve_checkpoint("org/math@main") == snapshots["org/math"]
    assert resolve_checkpoint("org/math@v1") == snapshots["org/math@v1"]
    assert resolve_checkpoint("org/math@" + "1" * 40) == snapshots["org/math@v1"]
    resolved = resolve("org/math@v1")
    assert (resolved.repo_id, resolved.revision, resolved.commit) == ("org/math", "v1", "1" * 40)
    with Checkpoint(resolve_checkpoint("org/base")) as ckpt:  # readable through the symlinks
        assert "embed.weight" in ckpt.names


@pytest.mark.parametrize("spec, command", [
    ("org/missing", "hf download org/missing"),
    ("org/missing@v2", "hf download org/missing --revision v2"),
    ("org/math@v9", "hf download org/math --revision v9"),
])
def test_a_missing_model_says_how_to_fetch_it(hub, spec, command):
    with pytest.raises(CheckpointError) as caught:
        resolve_checkpoint(spec)
    message = str(caught.value)
    assert command in message and "nothing is downloaded" in message and spec in message
    # an id is not called a file, and the message ends with what to do, not a class name
    assert message.startswith(f"Hub model {spec!r}: ") and message.endswith(command)


def test_local_paths_win_and_other_names_are_not_hub_ids(hub, tmp_path, monkeypatch):
    _, made = hub
    monkeypatch.chdir(made.parent)
    (made.parent / "org").mkdir()
    local = save_checkpoint(made.parent / "org" / "base", small_model(seed=4))
    assert resolve_checkpoint("org/base") == Path("org/base") and local.is_dir()
    with pytest.raises(CheckpointError, match="no such file or folder"):
        resolve_checkpoint("just-a-missing-name")
    assert parse_hub_id("../org/x") is None and parse_hub_id("/abs/path") is None
    assert parse_hub_id("org/x@refs/pr/3") == ("org/x", "refs/pr/3")


def test_a_zoo_of_hub_models(hub, tmp_path):
    snapshots, made = hub
    zoo = tmp_path / "zoo"
    manifest = init(zoo, "org/base")
    assert manifest["base"]["source"]["commit"] == "b" * 40
    results = add(zoo, ["org/math@v1", "org/math"], workers=0)
    assert [(r.name, r.status) for r in results] == [("math-v1", "added"), ("math", "added")]
    sources = {m["name"]: m["source"] for m in ls(zoo)}
    assert sources["math-v1"]["kind"] == "hub"
    assert (sources["math-v1"]["repo_id"], sources["math-v1"]["revision"],
            sources["math-v1"]["commit"]) == ("org/math", "v1", "1" * 40)
    assert sources["math"]["commit"] == "2" * 40
    # Each revision's own weights were compressed: the same records (payload checksums
    # included) as compressing the files that went into the cache at that commit; only the
    # source names in the header differ (a snapshot folder is named by its commit).
    def records(delta):
        header = dict(sparsestitch.info(delta).header)
        return header.pop("sources"), header
    for folder in ("math-v1", "math"):
        sparsestitch.compress(made / "base", made / folder, tmp_path / f"{folder}.delta")
        names, content = records(zoo / "deltas" / f"{folder}.delta")
        assert content == records(tmp_path / f"{folder}.delta")[1]
        assert names == {"base": "b" * 40, "finetuned": sources[folder]["commit"]}
    assert records(tmp_path / "math.delta")[1] != records(tmp_path / "math-v1.delta")[1]
    out = get(zoo, "math-v1", tmp_path / "restored")
    plain = sparsestitch.restore(made / "base", tmp_path / "math-v1.delta", tmp_path / "plain")
    restored, expected = (load_file(p / "model-00001-of-00001.safetensors") for p in (out, plain))
    assert all(np.array_equal(bits(restored[k]), bits(expected[k])) for k in expected)
    front = (out / "README.md").read_text().split("---")[1]
    assert 'base_model: "org/base"' in front and 'library_name: "transformers"' in front
    assert "`org/math` at commit `" + "1" * 40 in (out / "README.md").read_text()
    assert (out / "config.json").exists()


def test_model_card_front_matter_survives_odd_names(tmp_path):
    yaml = pytest.importorskip("yaml")
    (tmp_path / "config.json").write_text("{}")
    odd = 'org/model: "quoted"\nsecond line #not a comment'
    card = write_model_card(tmp_path, base=odd, how="# Title\n\nBody.", tags=["merge", "x: y"],
                            relation="merge")
    text = card.read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta == {"base_model": odd, "base_model_relation": "merge",
                    "library_name": "transformers", "tags": ["sparsestitch", "merge", "x: y"]}
    assert body.strip() == "# Title\n\nBody."
    assert json.loads(json.dumps(meta))  # plain data, nothing YAML-specific


def test_every_command_takes_hub_ids_where_it_takes_checkpoints(hub, tmp_path):
    """compress, restore, stitch and verify read org/name[@rev] from the cache; the delta names
    the base by its Hub id; the outputs are the same as from the snapshot folders."""
    snapshots, _ = hub
    from click.testing import CliRunner
    from sparsestitch.cli import main

    by_id, by_path = tmp_path / "by-id.delta", tmp_path / "by-path.delta"
    sparsestitch.compress("org/base", "org/math@v1", by_id, density=0.1)
    sparsestitch.compress(snapshots["org/base"], snapshots["org/math@v1"], by_path, density=0.1)
    assert sparsestitch.info(by_id).header["sources"] == {"base": "org/base",
                                                          "finetuned": "org/math@v1"}
    with sparsestitch.delta.format.DeltaReader(by_id) as a, sparsestitch.delta.format.DeltaReader(by_path) as b:
        assert [r.payload_xxh3 for r in a.records] == [r.payload_xxh3 for r in b.records]
    sparsestitch.verify(by_id, base="org/base")
    restored = sparsestitch.restore("org/base", by_id, tmp_path / "restored")
    card = (restored / "README.md").read_text()
    assert 'base_model: "org/base"' in card
    result = CliRunner().invoke(main, ["stitch", "org/base", str(by_id), str(by_path), "-o",
                                       str(tmp_path / "merged"), "--quiet"])
    assert result.exit_code == 0, result.output
    with pytest.raises(CheckpointError, match="hf download org/nope"):
        sparsestitch.restore("org/nope", by_id, tmp_path / "never")
    assert not (tmp_path / "never").exists()
