"""Tests for sparsestitch.localize.trained on a tiny model whose relevant positions are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sparsestitch
from sparsestitch.core.errors import OptionError, TensorMismatchError
from sparsestitch.delta.format import DeltaReader
from sparsestitch.localize.trained import dataless_masks, global_top_k, learn_masks
from sparsestitch.core.tiebreak import tie_order

from .conftest import finetune_of, save_checkpoint, small_model

# Positions of `used.weight` (4 x 8) that the target depends on, with their deltas;
# smaller deltas are cheaper to drop, so a larger l1 drops them first.
RELEVANT = {(0, 1): 1.0, (1, 3): 0.8, (2, 5): 0.6, (3, 7): 0.4, (0, 6): 0.3, (2, 0): 0.2}
HARMFUL = [(0, 0), (1, 1), (1, 6), (2, 2), (3, 3), (3, 4)]


class Tiny(nn.Module):
    """`used` maps inputs to outputs; `unused` never takes part in the forward pass."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.used = nn.Linear(8, 4)
        self.unused = nn.Linear(8, 4)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.used(self.dropout(x))


def tiny_problem():
    """Base at zero; the fine-tune holds the right deltas on RELEVANT, wrong ones on
    HARMFUL, and large deltas on `unused` so that the dataless start picks only those."""
    generator = torch.Generator().manual_seed(0)
    model = Tiny()
    base = {name: torch.zeros_like(value) for name, value in model.state_dict().items()}
    finetuned = {name: value.clone() for name, value in base.items()}
    target_weight = torch.zeros(4, 8)
    for position, value in RELEVANT.items():
        target_weight[position] = value
        finetuned["used.weight"][position] = value
    for position in HARMFUL:
        finetuned["used.weight"][position] = 0.5
    finetuned["unused.weight"] += 2.0
    finetuned["unused.bias"] += 2.0
    batches = []
    for _ in range(10):
        x = torch.randn(64, 8, generator=generator)
        batches.append((x, x @ target_weight.T))
    return model, base, finetuned, batches


def mse(forward, batch):
    inputs, target = batch
    return ((forward(inputs) - target) ** 2).mean()


def relevant_mask():
    mask = torch.zeros(4, 8, dtype=torch.bool)
    for position in RELEVANT:
        mask[position] = True
    return mask


TOTAL_POSITIONS = 2 * (4 * 8 + 4)
START_DENSITY = len(RELEVANT) / TOTAL_POSITIONS


def learn(model, base, finetuned, batches, **options):
    options = {"density": START_DENSITY, "l1": 0.1, "lr": 0.1, "epochs": 40, **options}
    return learn_masks(model, base, finetuned, batches, mse, **options)


def test_dataless_start_misses_the_relevant_positions():
    _, base, finetuned, _ = tiny_problem()
    masks = dataless_masks(base, finetuned, density=START_DENSITY)
    assert not masks["used.weight"].any()
    assert int(sum(mask.sum() for mask in masks.values())) == len(RELEVANT)


def test_learned_mask_recovers_the_relevant_positions():
    masks = learn(*tiny_problem())
    assert torch.equal(masks["used.weight"], relevant_mask())
    assert not masks["used.bias"].any()
    assert not masks["unused.weight"].any() and not masks["unused.bias"].any()


def test_masks_are_bool_cpu_and_shaped_like_the_tensors():
    model, base, finetuned, batches = tiny_problem()
    masks = learn(model, base, finetuned, batches, epochs=1)
    assert set(masks) == set(base)
    for name, mask in masks.items():
        assert mask.dtype == torch.bool
        assert mask.device.type == "cpu"
        assert mask.shape == base[name].shape


def test_larger_l1_keeps_fewer_positions():
    problem = tiny_problem()
    kept = [int(sum(mask.sum() for mask in learn(*problem, l1=l1).values()))
            for l1 in (0.1, 5.0)]
    assert kept[0] == len(RELEVANT)
    assert 0 < kept[1] < kept[0]


@pytest.mark.parametrize("density", [START_DENSITY, 0.2, 0.5])
def test_exact_density_keeps_exactly_k(density):
    masks = learn(*tiny_problem(), density=density, exact_density=True)
    assert int(sum(mask.sum() for mask in masks.values())) == round(density * TOTAL_POSITIONS)


def test_exact_density_at_the_true_count_gives_the_relevant_positions():
    masks = learn(*tiny_problem(), exact_density=True)
    assert torch.equal(masks["used.weight"], relevant_mask())


def test_deterministic_with_a_fixed_seed_despite_dropout():
    _, base, finetuned, batches = tiny_problem()
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        model = Tiny(dropout=0.3).train()
        runs.append(learn(model, base, finetuned, batches, epochs=8))
    assert all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])


def test_model_parameters_are_untouched_and_get_no_gradient():
    model, base, finetuned, batches = tiny_problem()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    learn(model, base, finetuned, batches, epochs=2)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    assert all(parameter.grad is None for parameter in model.parameters())


def test_include_limits_the_scored_tensors():
    masks = learn(*tiny_problem(), include=lambda name: name.startswith("used."), epochs=2)
    assert set(masks) == {"used.weight", "used.bias"}


def test_non_float_and_unshared_tensors_get_no_scores():
    base = {"w": torch.zeros(3), "ids": torch.arange(3), "only_base": torch.zeros(2)}
    finetuned = {"w": torch.tensor([0.0, 2.0, 1.0]), "ids": torch.arange(3),
                 "only_finetuned": torch.ones(2)}
    masks = dataless_masks(base, finetuned, density=1 / 3)
    assert set(masks) == {"w"}
    assert masks["w"].tolist() == [False, True, False]


def test_global_top_k_breaks_ties_by_tie_order():
    """Three scores of 1.0 compete for two places: the larger tie orders win (compress's rule),
    not the first tensor's first positions."""
    scores = {"b": torch.tensor([1.0, 1.0]), "a": torch.tensor([[1.0, 0.0], [0.0, 5.0]])}
    masks = global_top_k(scores, 3)
    tied = sorted([("a", 0), ("b", 0), ("b", 1)],
                  key=lambda t: -int(tie_order(t[0], np.array([t[1]]))[0]))[:2]
    assert masks["a"].reshape(-1).tolist() == [("a", 0) in tied, False, False, True]
    assert masks["b"].tolist() == [("b", 0) in tied, ("b", 1) in tied]


def test_dataless_masks_are_the_positions_compress_keeps(tmp_path):
    """One top-k: the in-memory dataless masks equal compress's global top-k, ties and all."""
    base = small_model()
    tune = finetune_of(base, seed=4)
    tune["layer.0.norm.weight"] = base["layer.0.norm.weight"] + 0.5  # one big tie group
    masks = dataless_masks(base, tune, density=0.05)
    base_path = save_checkpoint(tmp_path / "base.safetensors", base)
    tune_path = save_checkpoint(tmp_path / "tune.safetensors", tune)
    sparsestitch.compress(base_path, tune_path, tmp_path / "t.delta", density=0.05,
                          scope="global")
    with DeltaReader(tmp_path / "t.delta") as reader:
        for name, mask in masks.items():
            record = reader.record(name)
            kept = reader.positions(record) if record.kind == "sparse" else np.empty(0)
            assert np.flatnonzero(mask.reshape(-1).numpy()).tolist() == kept.tolist(), name


@pytest.mark.parametrize("k", [0, 6])
def test_global_top_k_extremes(k):
    masks = global_top_k({"a": torch.ones(2, 3)}, k)
    assert int(masks["a"].sum()) == k


def test_density_outside_unit_interval_is_refused():
    _, base, finetuned, _ = tiny_problem()
    with pytest.raises(ValueError, match="density"):
        dataless_masks(base, finetuned, density=1.5)


@pytest.mark.parametrize("option, value", [
    ("density", float("nan")), ("l1", float("nan")), ("lr", float("inf")), ("lr", -0.1),
    ("epochs", 2.5), ("epochs", -1), ("init_logit", float("nan")), ("exact_density", "no"),
])
def test_numeric_options_are_finite_and_in_range(option, value):
    """A NaN l1 or init_logit trained every score to NaN, and epochs=2.5 failed in range()."""
    model, base, finetuned, batches = tiny_problem()
    with pytest.raises(OptionError) as caught:
        learn(model, base, finetuned, batches, **{option: value})
    assert caught.value.option == option


def test_one_shot_iterator_is_refused():
    model, base, finetuned, batches = tiny_problem()
    with pytest.raises(TypeError, match="list or a DataLoader"):
        learn(model, base, finetuned, iter(batches))


def test_checkpoint_names_missing_from_the_model_are_refused():
    model, base, finetuned, batches = tiny_problem()
    base["head.weight"] = torch.zeros(2)
    finetuned["head.weight"] = torch.ones(2)
    with pytest.raises(TensorMismatchError, match="head.weight"):
        learn(model, base, finetuned, batches, epochs=1)


def test_shape_mismatch_between_checkpoints_is_refused():
    _, base, finetuned, _ = tiny_problem()
    finetuned["used.bias"] = torch.zeros(5)
    with pytest.raises(TensorMismatchError, match="used.bias"):
        dataless_masks(base, finetuned, density=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_learns_on_cuda():
    model, base, finetuned, batches = tiny_problem()
    model.cuda()
    cuda_batches = [(x.cuda(), y.cuda()) for x, y in batches]
    masks = learn(model, base, finetuned, cuda_batches, device="cuda")
    assert masks["used.weight"].device.type == "cpu"
    assert torch.equal(masks["used.weight"], relevant_mask())
