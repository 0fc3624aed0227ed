"""Small real models, fine-tunes and deltas that between them use every dtype class and codec."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import sparsestitch
from sparsestitch.delta.format import DeltaReader

from .models import save_checkpoint

CODECS = {"rice", "csr", "bitmap", "gaps", "all", "tau", "xor", "raw", "quant", "ulp", "lowrank"}

# ----------------------------------------------------------------------------------------------
# The zoo: a small model, fine-tunes and deltas that exercise every codec


def zoo_model(seed: int = 0) -> dict[str, torch.Tensor]:
    """Base tensors of every float width, a clustered-rows matrix, a 0-d and an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    return {
        "emb.bf16": torch.randn(64, 48, generator=g).to(torch.bfloat16),
        "attn.f16": torch.randn(48, 48, generator=g).to(torch.float16),
        "mlp.f32": torch.randn(96, 32, generator=g),
        "proj.f64": torch.randn(24, 16, generator=g).to(torch.float64),
        "rows.bf16": torch.randn(256, 64, generator=g).to(torch.bfloat16),
        "pruned.f32": torch.randn(64, 32, generator=g),
        "norm.bf16": torch.ones(48).to(torch.bfloat16),
        "scalar.f64": torch.tensor(0.5, dtype=torch.float64),
        "empty.f32": torch.zeros(0, 8),
        "ids.i64": torch.arange(16),
    }


def zoo_finetune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Heavy-tailed changes everywhere, a third of ``pruned.f32`` zeroed, two integer entries
    changed, a new head added."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in base.items():
        if tensor.is_floating_point() and tensor.numel():
            noise = torch.randn(tensor.shape, generator=g, dtype=torch.float64) ** 3 * 0.02
            out[name] = (tensor.to(torch.float64) + noise).to(tensor.dtype)
        else:
            out[name] = tensor.clone()
    pruned = out["pruned.f32"].clone()
    pruned[torch.rand(pruned.shape, generator=g) < 0.35] = 0.0
    out["pruned.f32"] = pruned
    out["ids.i64"][[3, 9]] += 1000
    out["head.new"] = torch.randn(10, 4, generator=g)
    return out


def zoo_lowrank_finetune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A rank-2 change of every float matrix and a constant one of every other float tensor:
    what low-rank records hold best (the heavy-tailed noise of :func:`zoo_finetune` is
    cheaper as sparse records, so a planner choosing per tensor never picks them there)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in base.items():
        if not tensor.is_floating_point() or not tensor.numel():
            out[name] = tensor.clone()
            continue
        if tensor.dim() == 2:
            rows, cols = tensor.shape
            change = (torch.randn(rows, 2, generator=g, dtype=torch.float64)
                      @ torch.randn(2, cols, generator=g, dtype=torch.float64)) * 0.02
        else:
            change = torch.full(tensor.shape, 0.01, dtype=torch.float64)
        out[name] = (tensor.to(torch.float64) + change).to(tensor.dtype)
    return out


def clustered_masks(base: dict[str, torch.Tensor], seed: int = 0) -> dict[str, np.ndarray]:
    """Kept positions clustered in a few rows (which makes ``csr`` win), plus a pruned block."""
    rng = np.random.default_rng(seed)
    rows = np.zeros(tuple(base["rows.bf16"].shape), bool)
    for r in range(0, rows.shape[0], 16):
        rows[r, rng.choice(rows.shape[1], 20, replace=False)] = True
    pruned = np.zeros(tuple(base["pruned.f32"].shape), bool)
    pruned[:32] = True
    strided = np.zeros(tuple(base["mlp.f32"].shape), bool)
    strided.reshape(-1)[5::100] = True  # equal gaps: ``gaps`` + zstd beats Rice and a bitmap
    return {"rows.bf16": rows, "pruned.f32": pruned, "mlp.f32": strided}


@dataclass
class Zoo:
    folder: Path
    base: Path
    finetunes: list[Path]
    deltas: dict[str, Path]      # label -> delta file
    other: Path                  # a second good delta, stitched beside the one under test

    def codecs_used(self) -> set[str]:
        used = set()
        for path in self.deltas.values():
            with DeltaReader(path) as reader:
                for record in reader.records:
                    if record.kind != "base":
                        used |= {record.positions["codec"], record.values["codec"]}
        return used


def build_zoo(folder: Path, seed: int = 0) -> Zoo:
    """Write a base, two fine-tunes and deltas at densities 0.001 / 0.01 / 0.5 / 1.0, two
    quantized ones (1 bit, one scale per tensor; 4 bits at 30%), a low-rank one (of a third
    fine-tune, changed along two directions per matrix) and clustered masks into
    ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    base = zoo_model(seed)
    base_path = save_checkpoint(folder / "base.safetensors", base)
    tunes = [save_checkpoint(folder / f"ft{i}.safetensors", zoo_finetune(base, seed + 10 + i))
             for i in (1, 2)]
    second = zoo_finetune(base, seed + 12)
    del second["head.new"]  # two deltas may not add different tensors of one name
    second["ids.i64"] = base["ids.i64"].clone()
    save_checkpoint(tunes[1], second)
    deltas = {}
    for label, density, scope, quantize in (
            ("d0.001", 0.001, "global", {}), ("d0.01", 0.01, "global", {}),
            ("d0.5", 0.5, "per-tensor", {}), ("d1.0", 1.0, "global", {}),
            ("q1", 1.0, "fidelity", {"bits": 1, "group": 0}),
            ("q4", 0.3, "fidelity", {"bits": 4, "group": 16})):
        deltas[label] = folder / f"{label}.delta"
        sparsestitch.compress(base_path, tunes[0], deltas[label], density=density, scope=scope,
                              **quantize)
    deltas["lowrank"] = folder / "lowrank.delta"   # a few components of each matrix
    low = save_checkpoint(folder / "ft_lowrank.safetensors", zoo_lowrank_finetune(base, seed + 20))
    sparsestitch.compress(base_path, low, deltas["lowrank"], low_rank=True, max_size=10000)
    deltas["mask"] = folder / "mask.delta"
    sparsestitch.compress(base_path, tunes[0], deltas["mask"], masks=clustered_masks(base, seed))
    other = folder / "other.delta"
    sparsestitch.compress(base_path, tunes[1], other, density=0.05)
    return Zoo(folder, base_path, tunes, deltas, other)



def medium_model(seed: int = 0) -> dict[str, torch.Tensor]:
    """About 3 MB of bfloat16 matrices: big enough that a command runs for a tenth of a second."""
    g = torch.Generator().manual_seed(seed)
    model = {f"layer.{i}.weight": torch.randn(384, 512, generator=g).to(torch.bfloat16)
             for i in range(8)}
    model["position_ids"] = torch.arange(16)
    return model


def medium_finetune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype)
            if v.is_floating_point() else v.clone() for k, v in base.items()}


