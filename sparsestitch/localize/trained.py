"""Trained localization: learn which delta positions a task needs.

This is the data-driven localization of Localize-and-Stitch (He et al., TMLR 2024).
Each included position gets a score ``S``; during training the model runs with
parameters ``θ_base + σ(S) ⊙ τ`` (``τ = θ_finetuned − θ_base``) and the scores
minimize::

    task_loss + l1 * mean(σ(S))

where the mean runs over every included position.  The mean, rather than the sum,
makes ``l1`` independent of the model's size: ``l1 = 1`` prices keeping the whole
delta at one unit of task loss.  Scores start from the dataless top-k mask
(``+init_logit`` inside, ``−init_logit`` outside) and the final binary mask is
``round(σ(S))``, i.e. ``S > 0``, or, with ``exact_density``, the global top-k of
``S``.

Everything here holds whole tensors in memory; the streaming, file-based dataless
top-k lives in the core and is not used here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from sparsestitch.core.dtypes import TORCH_DTYPE_NAMES
from sparsestitch.core.dtypes import dtype as lookup_dtype
from sparsestitch.core.errors import OptionError, TensorMismatchError
from sparsestitch.core.options import FRACTION, Range, flag, number
from sparsestitch.core.tiebreak import tie_order
from sparsestitch.localize.topk import count_to_keep, magnitude_keys, topk_positions

__all__ = ["global_top_k", "dataless_masks", "learn_masks"]


def global_top_k(scores: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """Mark the ``k`` largest scores across all tensors.

    Equal scores are ordered by :func:`sparsestitch.core.tiebreak.tie_order` (a hash of the
    tensor's name and the position: ties spread over a tensor, not taken from its first
    rows), then by tensor order (sorted by name) and flat index -- the order compress's
    top-k uses (:func:`sparsestitch.localize.topk.topk_positions`).  The result does not
    depend on the mapping's iteration order.

    Parameters
    ----------
    scores : mapping of str to Tensor
        Real-valued scores, any shapes and devices.
    k : int
        How many positions to keep, ``0 <= k <= total number of positions``.

    Returns
    -------
    dict of str to Tensor
        Bool masks on the CPU, with the shapes of ``scores``; exactly ``k``
        positions are ``True`` in all.

    Examples
    --------
    >>> masks = global_top_k({"b": torch.tensor([1.0, 3.0]), "a": torch.tensor([3.0, 0.0])}, 2)
    >>> masks["a"].tolist(), masks["b"].tolist()
    ([True, False], [False, True])
    """
    names = sorted(scores)
    flat = [scores[name].detach().reshape(-1).to("cpu", torch.float32).numpy() for name in names]
    return _top_k_masks(names, flat, [tuple(scores[n].shape) for n in names], k)


def _top_k_masks(names: list[str], keys: list[np.ndarray], shapes: list[tuple[int, ...]],
                 k: int) -> dict[str, Tensor]:
    """Bool masks of the ``k`` largest of ``keys`` (one flat array per tensor, in ``names``
    order), ties as in :func:`global_top_k`."""
    total = sum(key.size for key in keys)
    if not 0 <= k <= total:
        raise OptionError(f"k={k} must lie between 0 and the {total} scored positions; "
                         "lower the density or include more tensors")
    orders = [tie_order(name, np.arange(key.size)) for name, key in zip(names, keys)]
    flat = np.concatenate(keys) if keys else np.empty(0, np.float32)
    kept = np.zeros(total, bool)
    kept[topk_positions(flat, k, np.concatenate(orders) if orders else None)] = True
    masks, start = {}, 0
    for name, key, shape in zip(names, keys, shapes):
        masks[name] = torch.from_numpy(kept[start:start + key.size].reshape(shape).copy())
        start += key.size
    return masks


def dataless_masks(base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], *,
                   density: float, include: Callable[[str], bool] | None = None
                   ) -> dict[str, Tensor]:
    """Keep the global top-k of ``|finetuned − base|`` (the dataless localization).

    The same positions :func:`sparsestitch.compress` keeps with ``scope="global"`` for these
    tensors: ``|τ|`` computed in the wide type as compress's ranking keys
    (:func:`sparsestitch.localize.topk.magnitude_keys`), exactly ``k = floor(density * N +
    1/2)`` positions kept, ``N`` being the number of positions in the included tensors, ties
    as in :func:`global_top_k`.  A tensor is included when it is floating point, present in
    both mappings and accepted by ``include``.

    Parameters
    ----------
    base, finetuned : mapping of str to Tensor
        Parameters of the base and the fine-tuned model.
    density : float
        Fraction of included positions to keep, in ``[0, 1]``.
    include : callable, optional
        ``include(name)`` says whether a tensor takes part; all do by default.

    Returns
    -------
    dict of str to Tensor
        Bool masks on the CPU for the included tensors only.

    Examples
    --------
    >>> base = {"w": torch.zeros(4)}
    >>> masks = dataless_masks(base, {"w": torch.tensor([0.1, -0.9, 0.2, 0.0])}, density=0.5)
    >>> masks["w"].tolist()
    [False, True, True, False]
    """
    names = _included_names(base, finetuned, include)
    keys = [_magnitude_keys(base[name], finetuned[name]) for name in names]
    k = count_to_keep(density, sum(key.size for key in keys))
    return _top_k_masks(names, keys, [tuple(base[n].shape) for n in names], k)


def _magnitude_keys(base: Tensor, finetuned: Tensor) -> np.ndarray:
    """Compress's ranking keys of one tensor pair (same dtype and shape)."""
    dt = lookup_dtype(TORCH_DTYPE_NAMES[str(base.dtype).removeprefix("torch.")])
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dt.itemsize]

    def as_bits(tensor: Tensor) -> np.ndarray:
        return tensor.detach().to("cpu").contiguous().view(width).reshape(-1).numpy().view(dt.bits)
    return magnitude_keys(as_bits(finetuned.to(base.dtype)), as_bits(base), dt)


def _check_options(density, l1, lr, epochs, init_logit, exact_density) -> None:
    """Refuse NaN, infinities, values out of range and strings for flags (an OptionError
    naming the option) before the model is touched."""
    number("density", density, FRACTION, "the fraction of positions kept")
    number("l1", l1, Range(0))
    number("lr", lr, Range(0))
    number("epochs", epochs, Range(0, whole=True))
    number("init_logit", init_logit)
    flag("exact_density", exact_density)


def learn_masks(model: nn.Module, base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor],
                batches: Iterable, loss: Callable[[Callable[..., object], object], Tensor], *,
                density: float = 0.01, include: Callable[[str], bool] | None = None,
                l1: float = 1.0, lr: float = 0.1, epochs: int = 10, init_logit: float = 5.0,
                exact_density: bool = False, device: torch.device | str = "cpu"
                ) -> dict[str, Tensor]:
    """Learn a binary mask over ``τ`` that keeps what the task's loss needs.

    Parameters
    ----------
    model : nn.Module
        The architecture both checkpoints belong to.  Its own parameters are never
        changed and receive no gradient: it runs through
        :func:`torch.func.functional_call` with ``θ_base + σ(S) ⊙ τ`` for included
        tensors and detached copies of its own values for everything else.  It is
        used in the mode the caller left it in (call ``model.eval()`` to switch
        dropout off).
    base, finetuned : mapping of str to Tensor
        Parameters of the base and the fine-tuned model, named as in
        ``model.state_dict()``.  A tensor gets scores when it is floating point,
        present in both mappings and accepted by ``include``.
    batches : iterable
        Re-iterable (a list or a ``DataLoader``): it is walked once per epoch.
        Batch size and order are the caller's.
    loss : callable
        ``loss(forward, batch)`` returns the scalar task loss; ``forward(*args,
        **kwargs)`` runs ``model`` with the masked parameters on ``device``.  Moving
        the batch to ``device`` is up to ``loss``.
    density : float
        Density ``k / N`` of the initial dataless top-k mask, and of the final one
        when ``exact_density`` is set.
    include : callable, optional
        ``include(name)`` says whether a tensor takes part; all do by default.
    l1 : float
        Weight ``λ`` of ``mean(σ(S))``; larger keeps fewer positions.
    lr : float
        Adam learning rate on the scores.
    epochs : int
        Passes over ``batches``.
    init_logit : float
        ``s0``: initial score, ``+s0`` inside the dataless mask and ``−s0`` outside.
    exact_density : bool
        End with exactly ``floor(density * N + 1/2)`` positions, the global top-k of
        ``S`` (ties by sorted tensor name, then flat index) instead of ``S > 0``.
    device : torch.device or str
        Where scores, deltas and the forward pass live.

    Returns
    -------
    dict of str to Tensor
        Bool masks on the CPU, shaped like the included tensors (only those).

    Notes
    -----
    Memory: for every included position, float32 ``S``, its gradient, Adam's two
    moments and ``τ``, plus the base value in its own dtype, are held on ``device``:
    about 24 bytes per position for a float32 base.  Each step adds transient copies
    (the masked parameters, ``σ(S)`` saved for backward) and the model's activations.

    Deviations from the authors' released code, which takes plain gradient steps
    summed over an epoch with a very large learning rate and applies the L1 step
    with the opposite sign: here the stated objective is minimized as written,
    with Adam on each batch.  Adam is chosen because the gradient on ``S``,
    ``σ'(S) · τ · ∂L/∂θ``, is tiny and its scale depends on the model; Adam's
    per-position normalization makes ``lr`` mean "score units per step", so a
    position whose contribution is consistently below the L1 price crosses zero
    after about ``init_logit / lr`` steps.

    Examples
    --------
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Linear(2, 1, bias=False)
    >>> base = {"weight": torch.zeros(1, 2)}
    >>> finetuned = {"weight": torch.tensor([[0.5, 1.0]])}
    >>> x = torch.randn(64, 2)
    >>> batches = [(x, x[:, :1])]  # only the first input matters, though its delta is smaller
    >>> def mse(forward, batch):
    ...     inputs, target = batch
    ...     return ((forward(inputs) - target) ** 2).mean()
    >>> masks = learn_masks(model, base, finetuned, batches, mse, density=0.5, epochs=150)
    >>> masks["weight"].tolist()
    [[True, False]]
    """
    if iter(batches) is batches:
        raise TypeError("batches is a one-shot iterator but is walked once per epoch; "
                        "pass a list or a DataLoader")
    _check_options(density, l1, lr, epochs, init_logit, exact_density)
    names = _included_names(base, finetuned, include)
    own_values = dict(model.state_dict(keep_vars=True))
    _check_model_has(own_values, names, base)
    base_values = {name: base[name].detach().to(device) for name in names}
    task_vector = {name: _task_vector(base, finetuned, name, device) for name in names}
    start = dataless_masks(base, finetuned, density=density, include=include)
    scores = {name: torch.where(start[name].to(device), init_logit, -init_logit)
              .to(torch.float32).requires_grad_() for name in names}
    # named_parameters and named_buffers skip tied aliases, which functional_call
    # would reject as two values for one tensor.
    frozen = {name: value.detach().to(device)
              for name, value in [*model.named_parameters(), *model.named_buffers()]
              if name not in scores}
    position_count = sum(tau.numel() for tau in task_vector.values())
    optimizer = torch.optim.Adam(list(scores.values()), lr=lr)

    def forward(*args, **kwargs):
        masked = {name: (base_values[name] + torch.sigmoid(scores[name]) * task_vector[name])
                  .to(base_values[name].dtype) for name in names}
        return functional_call(model, {**frozen, **masked}, args, kwargs)

    for _ in range(epochs):
        for batch in batches:
            kept_fraction = sum(torch.sigmoid(s).sum() for s in scores.values()) / position_count
            objective = loss(forward, batch) + l1 * kept_fraction
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()

    if exact_density:
        return global_top_k(scores, count_to_keep(density, position_count))
    return {name: (s.detach() > 0).cpu() for name, s in scores.items()}


def _included_names(base, finetuned, include):
    """Sorted names of floating tensors present in both mappings and accepted."""
    names = []
    for name in sorted(set(base) & set(finetuned)):
        if not (base[name].is_floating_point() and finetuned[name].is_floating_point()):
            continue
        if include is not None and not include(name):
            continue
        if base[name].shape != finetuned[name].shape:
            raise TensorMismatchError(
                f"base has shape {tuple(base[name].shape)} but finetuned has "
                f"{tuple(finetuned[name].shape)}; pass include= to leave it out",
                tensor=name)
        names.append(name)
    return names


def _task_vector(base, finetuned, name, device):
    """``finetuned − base`` in float32 on ``device``."""
    return (finetuned[name].detach().to(device, torch.float32)
            - base[name].detach().to(device, torch.float32))


def _check_model_has(own_values, names, base):
    """Scored tensors must exist in the model with the same shape, or nothing would be trained."""
    for name in names:
        if name not in own_values:
            raise TensorMismatchError(
                "is in base and finetuned but not in model.state_dict(); rename the "
                "checkpoint's tensors to the model's names or pass include= to leave it out",
                tensor=name)
        if own_values[name].shape != base[name].shape:
            raise TensorMismatchError(
                f"model has shape {tuple(own_values[name].shape)} but the checkpoints have "
                f"{tuple(base[name].shape)}", tensor=name)
