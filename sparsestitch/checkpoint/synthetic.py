"""Synthetic llama-shaped checkpoints with realistic fine-tuning deltas (demo, tests, bench).

Real fine-tunes change every weight a little and a few a lot: task vectors are
heavy-tailed, their scale differs between tensors and between rows and
columns.  The generator mimics that: base weights are Gaussian with a
per-tensor scale; tau = tensor scale x row scale x column scale x Laplace
noise, so the top 1% of |tau| concentrates in some tensors and rows.
Everything is seeded and bfloat16 unless asked otherwise.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from ..core.dtypes import dtype as lookup_dtype
from ..core.dtypes import from_wide
from ..core.sizes import numel
from . import CheckpointWriter, OutputTensor, Shard


def llama_shapes(hidden: int, layers: int, vocab: int, intermediate: int | None = None
                 ) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a llama-style decoder.

    >>> len(llama_shapes(64, 2, 100))
    21
    """
    intermediate = intermediate or (hidden * 8 // 3 + 63) // 64 * 64
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)),
                   (p + "self_attn.q_proj.weight", (hidden, hidden)),
                   (p + "self_attn.k_proj.weight", (hidden, hidden)),
                   (p + "self_attn.v_proj.weight", (hidden, hidden)),
                   (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "mlp.gate_proj.weight", (intermediate, hidden)),
                   (p + "mlp.up_proj.weight", (intermediate, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, intermediate))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def shapes_for_size(target_bytes: int, dtype_name: str = "BF16") -> list[tuple[str, tuple[int, ...]]]:
    """A llama-shaped layout of roughly ``target_bytes``."""
    itemsize = lookup_dtype(dtype_name).itemsize
    hidden = 256
    while True:
        layers = max(2, min(32, hidden // 64))
        shapes = llama_shapes(hidden, layers, vocab=8 * hidden)
        size = sum(numel(s) for _, s in shapes) * itemsize
        if size >= target_bytes or hidden >= 8192:
            return shapes
        hidden += 128


def llama_config(shapes: list[tuple[str, tuple[int, ...]]], dtype_name: str = "BF16") -> dict:
    """A complete ``LlamaForCausalLM`` config for a layout of :func:`llama_shapes` (mergekit
    plans merges from it; ``transformers`` loads the model with it).

    >>> llama_config(llama_shapes(64, 2, 100))["num_hidden_layers"]
    2
    """
    sizes = dict(shapes)
    vocab, hidden = sizes["model.embed_tokens.weight"]
    heads = max(1, hidden // 64)
    torch_dtypes = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": hidden, "intermediate_size": sizes["model.layers.0.mlp.up_proj.weight"][0],
            "num_hidden_layers": sum(1 for n in sizes if n.endswith(".input_layernorm.weight")),
            "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": vocab,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "tie_word_embeddings": False,
            "hidden_act": "silu", "torch_dtype": torch_dtypes.get(dtype_name, "bfloat16"),
            "note": "synthetic sparsestitch example; weights are random"}


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Wide (float32) base weights for one tensor."""
    rng = np.random.default_rng([seed, _name_key(name)])
    if name.endswith("norm.weight"):
        return (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = shape[-1] if shape else 1
    return (rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(fan_in)))


def task_vector(name: str, base: np.ndarray, task_seed: int, strength: float = 0.02) -> np.ndarray:
    """A heavy-tailed, row/column-structured task vector for one tensor (float32)."""
    rng = np.random.default_rng([task_seed, _name_key(name)])
    scale = strength * float(base.std() or 1.0) * float(np.exp(rng.normal(0.0, 0.7)))
    tau = rng.laplace(0.0, 1.0, base.shape).astype(np.float32) * np.float32(scale)
    if base.ndim == 2:
        tau *= np.exp(rng.normal(0, 0.5, (base.shape[0], 1))).astype(np.float32)
        tau *= np.exp(rng.normal(0, 0.3, (1, base.shape[1]))).astype(np.float32)
    return tau


def write_zoo(folder: str | Path, size_bytes: int, tasks: int, *, seed: int = 0,
              dtype_name: str = "BF16", shard_bytes: int | None = None,
              overwrite: bool = False) -> tuple[Path, list[Path]]:
    """Write a base and ``tasks`` fine-tunes as Hugging Face folders under ``folder``.

    Returns ``(base_folder, [fine-tune folders])``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = shapes_for_size(size_bytes, dtype_name)
    dt = lookup_dtype(dtype_name)
    shard_bytes = shard_bytes or max(1, size_bytes // 2)
    shards = _shard(shapes, dtype_name, shard_bytes)
    config = llama_config(shapes, dtype_name)
    names = ["base"] + [f"task{t}" for t in range(tasks)]
    outputs = [folder / n for n in names]
    writers = []
    for out in outputs:
        writer = CheckpointWriter(out, shards, folder=True, overwrite=overwrite)
        writers.append(writer)
    try:
        for shard in shards:
            for tensor in shard.tensors:
                base = base_tensor(tensor.name, tensor.shape, seed)
                writers[0].write(tensor.name, from_wide(base, dt))
                for t in range(tasks):
                    tau = task_vector(tensor.name, base, seed * 1000 + t + 1)
                    writers[t + 1].write(tensor.name, from_wide(base + tau, dt))
        for writer in writers:
            writer.close()
    except BaseException as exc:
        for writer in writers:
            writer.abort(exc)
        raise
    for out in outputs:
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return outputs[0], outputs[1:]


def _shard(shapes, dtype_name: str, shard_bytes: int) -> list[Shard]:
    itemsize = lookup_dtype(dtype_name).itemsize
    groups, current, size = [], [], 0
    for name, shape in shapes:
        nbytes = numel(shape) * itemsize
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    groups.append(current)
    total = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{total:05d}.safetensors",
                  [OutputTensor(n, dtype_name, s) for n, s in sorted(g)],
                  {"format": "pt"})
            for i, g in enumerate(groups)]


def _name_key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))
