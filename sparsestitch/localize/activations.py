"""Activation-aware error: weigh each input feature of a linear layer by its activations.

A linear layer ``y = W x`` whose change ``tau`` is stored as ``tau_hat`` is off by
``(tau - tau_hat) x`` on an input ``x``; over calibration inputs ``X`` (one row per token) the
error is ``||(tau - tau_hat) X^T||``.  With the diagonal of ``X^T X`` (GPTQ's Hessian without
its cross terms, AWQ's and Wanda's per-channel activation scale) that is
``||(tau - tau_hat) D||`` with ``D = diag(s)``, ``s_j`` the root mean square of input feature
``j``: an elementwise weight per column.  Compress then ranks ``|tau_ij| s_j`` instead of
``|tau_ij|`` and measures every relative error in that norm -- the error targets, the size
target's allocation and the fidelity reports alike -- so a change in a column the data drives
hard is kept before an equal change in a quiet one.  The stored values stay plain ``tau``:
the file format does not change and every reader decodes such a delta as any other.

Statistics come from the *base* model on a few calibration examples:
:func:`activation_scales` runs a torch model over batches, :func:`text_activation_scales`
loads a Hugging Face causal LM folder (or GGUF file) with transformers and runs it over a
plain text file.  :func:`column_weights` checks them against the checkpoint and normalizes
them (root mean square 1 per tensor, floored at :data:`FLOOR` so no column is ignored
outright).  Data-free stays the default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ..core.errors import OptionError, SetupError
from ..core.sizes import row_items

#: A column's weight is at least this share of its tensor's root mean square weight: a feature
#: the calibration never drove still counts a little (its change is not free to drop).
FLOOR = 1e-3
#: Calibration tokens read from a text file by default, in sequences of this many.
DEFAULT_TOKENS = 4096
SEQUENCE = 512
#: Characters of a calibration text read per token asked for (so a huge file is not read whole).
CHARACTERS_PER_TOKEN = 64


def activation_scales(model, batches: Iterable, *, device="cpu") -> dict[str, np.ndarray]:
    """The mean square of every input feature of every ``torch.nn.Linear`` of ``model`` over
    the tokens of ``batches``, keyed by the weight's name (``<module>.weight``, as in the
    model's ``state_dict``).

    ``batches``: token id tensors (``[batch, length]``) or mappings of keyword arguments for
    ``model(**batch)``.  Runs without gradients, the model in the mode the caller left it."""
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            sums[name] = sums.get(name, 0) + (x * x).sum(0).cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [module.register_forward_hook(hook(f"{name}.weight"))
               for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, Mapping):
                    model(**{k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()})
                else:
                    model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).numpy() for name in sums if counts[name]}


def text_activation_scales(model_path: str | os.PathLike, text_path: str | os.PathLike, *,
                           tokens: int = DEFAULT_TOKENS) -> tuple[dict[str, np.ndarray], int]:
    """:func:`activation_scales` of the Hugging Face causal LM at ``model_path`` (a folder
    with config.json and a tokenizer, or a ``.gguf`` file) over the first ``tokens`` tokens of
    the plain text file ``text_path``, in sequences of :data:`SEQUENCE`; also the number of
    tokens used.  The model is loaded whole in float32 by transformers (a one-off: its memory
    is the model's, not compress's budget)."""
    text_path, model_path = Path(text_path), Path(model_path)
    try:  # the text's start only: a token takes a few characters, never hundreds
        with open(text_path, encoding="utf-8") as handle:
            text = handle.read(tokens * CHARACTERS_PER_TOKEN)
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(f"calibration text {text_path}: cannot read it as UTF-8 ({exc})") from None
    if not text.strip():
        raise OptionError(f"calibration text {text_path} is empty")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise SetupError("calibration from text needs transformers: pip install transformers") from None
    if model_path.suffix == ".gguf":
        where, extra = model_path.parent, {"gguf_file": model_path.name}
    elif model_path.is_dir() and (model_path / "config.json").is_file():
        where, extra = model_path, {}
    else:
        raise OptionError(f"calibration from text needs the base as a Hugging Face folder "
                          f"(config.json, tokenizer) or a .gguf file, not {model_path}; or pass "
                          "precomputed scales (sparsestitch.localize.activations)")
    from transformers.utils import logging as hf_logging
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # compress's output is its own (and --json's is JSON)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
        model = AutoModelForCausalLM.from_pretrained(where, **{_dtype_keyword(): torch.float32},
                                                     **extra)
    except (OSError, ValueError, ImportError) as exc:
        raise OptionError(f"calibration: transformers cannot load the base {model_path} as a "
                          f"causal LM ({exc})") from None
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    model.eval()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:tokens]
    if ids.numel() < 2:
        raise OptionError(f"calibration text {text_path} gives fewer than 2 tokens")
    batches = [ids[at:at + SEQUENCE].unsqueeze(0) for at in range(0, ids.numel(), SEQUENCE)]
    return activation_scales(model, batches), int(ids.numel())


def _dtype_keyword() -> str:
    """transformers' name for the dtype to load in: ``dtype`` from 4.56 (``torch_dtype``
    warns there), ``torch_dtype`` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def column_weights(scales: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]],
                   localized: Iterable[str], strict: bool = True) -> dict[str, np.ndarray]:
    """Per localized matrix with calibration ``scales`` (mean squares of its input features),
    the float32 weight of each column: ``sqrt(scale)``, divided by its root mean square,
    at least :data:`FLOOR`.  Scales for tensors the model lacks (unless not ``strict``: a
    module whose weight is tied to another's, as a tied ``lm_head``), of the wrong length, or
    not finite and non-negative are refused, naming the tensor; names that are not localized
    (excluded, stored exactly, vectors) are left out."""
    weights = {}
    localized = set(localized)
    for name, scale in scales.items():
        if name not in shapes and not strict:
            continue
        if name not in shapes:
            raise OptionError(f"calibration scales name a tensor the base does not have: {name!r}")
        shape = shapes[name]
        scale = np.asarray(scale, dtype=np.float64).reshape(-1)
        if len(shape) < 2 or name not in localized:
            continue
        if scale.size != row_items(shape):
            raise OptionError(f"calibration scales for tensor {name!r}: {scale.size} values, its "
                              f"rows have {row_items(shape)}")
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise OptionError(f"calibration scales for tensor {name!r} must be finite and >= 0")
        root = np.sqrt(scale)
        rms = math.sqrt(float(np.mean(scale)))
        weight = root / rms if rms > 0 else np.ones_like(root)
        weights[name] = np.maximum(weight, FLOOR).astype(np.float32)
    return weights


def weighted_keys(keys: np.ndarray, weights: np.ndarray,
                  positions: np.ndarray | None = None) -> np.ndarray:
    """Ranking keys (float32 bits of ``|tau|``) times their column's weight: the float32 bits
    of ``|tau_ij| * w_j`` (NaN keys stay NaN, infinities infinite).  The keys are of whole
    rows from a row's start, or of the flat ``positions`` of the tensor."""
    if positions is None:
        scaled = keys.view(np.float32).reshape(-1, weights.size) * weights
    else:
        scaled = keys.view(np.float32) * weights[positions % weights.size]
    return np.abs(scaled, out=scaled).reshape(-1).view(np.uint32)


def squared_weights(weights: np.ndarray, positions: np.ndarray | None, offset: int = 0,
                    count: int = 0) -> np.ndarray:
    """The squared weight (float64) of each element at flat ``positions`` plus ``offset``
    (None: the ``count`` elements from ``offset``): what its squared error counts."""
    index = np.arange(count, dtype=np.int64) if positions is None else positions
    square = weights.astype(np.float64) ** 2
    return square[(index + offset) % weights.size]
