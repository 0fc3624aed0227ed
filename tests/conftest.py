"""Shared fixtures: real safetensors checkpoints built in a temporary folder.

The builders live in :mod:`tests.support.models`; they are re-exported here for the tests that
import them from ``.conftest``.
"""

from __future__ import annotations

import pytest
import torch

from .support.models import bits, finetune_of, save_checkpoint, small_model

__all__ = ["bits", "finetune_of", "save_checkpoint", "small_model"]


@pytest.fixture
def zoo(tmp_path):
    """A base file and two fine-tune files of :func:`small_model`."""
    torch.manual_seed(0)
    base = small_model()
    paths = {"base": save_checkpoint(tmp_path / "base.safetensors", base)}
    for i in (1, 2):
        paths[f"ft{i}"] = save_checkpoint(tmp_path / f"ft{i}.safetensors", finetune_of(base, seed=i))
    return paths
