"""The README's Python examples run as written, on real checkpoints named as they name them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file


from .conftest import bits, finetune_of, save_checkpoint, small_model

README = Path(__file__).resolve().parent.parent / "README.md"
# Blocks that need what a test cannot have (a model being trained on examples).
NEEDS_DATA = ("learn_masks",)


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


class CallableTensors(dict):
    """A dict of tensors that answers like a model (hot-swap accepts a mapping of tensors)."""

    def __call__(self, question):
        return {name: tensor.sum() for name, tensor in self.items()}


@pytest.fixture
def readme_folder(tmp_path, monkeypatch):
    """base/, math/ and code/ as Hugging Face folders, the names the README uses."""
    base = small_model()
    base["big.weight"] = torch.randn(256, 64, generator=torch.Generator().manual_seed(3))
    for name, tensors in (("base", base), ("math", finetune_of(base, seed=1)),
                          ("code", finetune_of(base, seed=2))):
        (tmp_path / name).mkdir()
        save_checkpoint(tmp_path / name / "model.safetensors", tensors)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_the_examples_this_test_runs():
    blocks = python_blocks()
    assert len(blocks) >= 5
    assert any("sparsestitch.merge(" in b for b in blocks)
    assert any("max_size=" in b for b in blocks)


def test_every_python_example_runs(readme_folder):
    namespace: dict = {}
    ran = 0
    for block in python_blocks():
        if any(marker in block for marker in NEEDS_DATA):
            continue
        model = CallableTensors(load_file(readme_folder / "base" / "model.safetensors"))
        namespace.update(model=model, question=None,
                         deltas=[readme_folder / "math.delta", readme_folder / "code.delta"])
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
        ran += 1
        if "patch.revert()" in block:  # the README promises the model is back, bit for bit
            base = load_file(readme_folder / "base" / "model.safetensors")
            assert all(np.array_equal(bits(model[n]), bits(base[n])) for n in base)
    assert ran >= 5
    restored = load_file(readme_folder / "math-restored" / "model.safetensors")
    math = load_file(readme_folder / "math" / "model.safetensors")
    assert restored.keys() == math.keys()
    assert (readme_folder / "math-small.delta").stat().st_size <= 2_000_000
