"""Real safetensors checkpoints (single files and sharded Hugging Face folders) and small models
and fine-tunes to put in them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """Save ``tensors`` as one .safetensors file (path ends in .safetensors) or as a
    Hugging Face folder with ``shards`` shards, an index and a config.json."""
    path = Path(path)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return path
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        file_name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in group}, str(path / file_name),
                  metadata={"format": "pt"})
        weight_map.update({k: file_name for k in group})
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "test"}))
    (path / "tokenizer.json").write_text("{}")
    return path


def small_model(seed: int = 0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A few tensors of mixed shapes and dtypes, like a tiny transformer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(64, 32, generator=g).to(dtype),
        "layer.0.attn.weight": torch.randn(32, 32, generator=g).to(dtype),
        "layer.0.mlp.weight": torch.randn(96, 32, generator=g).to(dtype),
        "layer.0.norm.weight": torch.ones(32).to(dtype),
        "layer.0.conv.weight": torch.randn(4, 3, 5, generator=g).to(torch.float32),
        "scalar": torch.tensor(1.5, dtype=torch.float64),
        "position_ids": torch.arange(16),
        "mask": torch.ones(8, dtype=torch.bool),
    }


def finetune_of(base: dict[str, torch.Tensor], seed: int = 1, scale: float = 0.05
                ) -> dict[str, torch.Tensor]:
    """Every float tensor nudged by heavy-tailed noise; non-float tensors unchanged."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in base.items():
        if tensor.is_floating_point():
            noise = torch.distributions.Laplace(0.0, scale).sample(tensor.shape) if tensor.dim() else \
                torch.tensor(scale)
            noise = noise * (1 + torch.rand(tensor.shape, generator=g))
            out[name] = (tensor.to(torch.float64) + noise.to(torch.float64)).to(tensor.dtype)
        else:
            out[name] = tensor.clone()
    return out


def bits(tensor: torch.Tensor) -> np.ndarray:
    """The raw bits of a tensor, for bit-exact comparisons."""
    t = tensor.contiguous()
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(width).numpy().copy() if t.dtype != torch.bool else t.numpy().astype(np.uint8)
