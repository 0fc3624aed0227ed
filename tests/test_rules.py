"""Merge rules against a dense, obviously-correct reference.

The reference works on whole tensors: every delta's task vector is zero outside
its mask, arithmetic is in float32 (float64 for F64) in the rules' documented
order, the result is rounded once by torch, and positions no delta touches keep
the base's bits.  Other test modules import :func:`reference_merge` and
:func:`random_bits` from here.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsestitch.combine import rules as rules_module
from sparsestitch.core import native
from sparsestitch.core.dtypes import dtype as lookup_dtype
from sparsestitch.core.errors import OptionError, TensorMismatchError
from sparsestitch.ops.stitch import RULES, rule_combiner
from sparsestitch.core.tiebreak import tie_order
from sparsestitch.engine.walk import Stored

FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8,
                "BOOL": torch.bool}
_SIGNED = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

#: Options for each rule in the tests (TIES/DARE with non-default values too).
RULE_OPTIONS = {
    "localize-stitch": [{}],
    "task-arithmetic": [{}, {"scale": 0.3}],
    "ties": [{}, {"density": 0.5, "scale": 1.5}, {"density": 1.0}],
    "ties-mergekit": [{}, {"density": 0.5, "scale": 1.5}, {"density": 1.0},
                      {"density": 0.5, "normalize": 0}],
    "dare": [{"drop": 0.5, "seed": 3}, {"drop": 0.0}, {"drop": 0.9, "seed": 11, "scale": 2.0}],
    "dare-ties-mergekit": [{"density": 0.5, "seed": 3}, {},
                           {"density": 0.3, "rescale": 0, "normalize": 1, "scale": 1.5}],
    "dare-linear-mergekit": [{"density": 0.5, "seed": 1}, {"density": 0.7, "normalize": 1}],
    "breadcrumbs-mergekit": [{"density": 0.5, "gamma": 0.1}, {"density": 0.9, "gamma": 0.01},
                             {"density": 0.4, "gamma": 0.2, "rescale": 1, "normalize": 1}],
    "breadcrumbs-ties-mergekit": [{"density": 0.5, "gamma": 0.1},
                                  {"density": 0.5, "gamma": 0.1, "rescale": 1, "normalize": 1}],
}
#: mergekit's generalized task arithmetic: (sparsification, sign election, its defaults).
MERGEKIT_RULES = {
    "ties-mergekit": ("magnitude", True, {"density": 0.2, "normalize": 1, "rescale": 0}),
    "dare-ties-mergekit": ("random", True, {"density": 1.0, "normalize": 0, "rescale": 1}),
    "dare-linear-mergekit": ("random", False, {"density": 1.0, "normalize": 0, "rescale": 1}),
    "breadcrumbs-mergekit": ("outliers", False, {"density": 1.0, "normalize": 0, "rescale": 0}),
    "breadcrumbs-ties-mergekit": ("outliers", True, {"density": 1.0, "normalize": 0,
                                                     "rescale": 0}),
}


def to_torch(bits: np.ndarray, dtype_name: str) -> torch.Tensor:
    """A torch tensor with exactly these bits."""
    signed = bits.view(f"i{bits.itemsize}") if bits.itemsize > 1 else bits
    return torch.from_numpy(np.ascontiguousarray(signed).copy()).view(TORCH_DTYPES[dtype_name])


def to_bits(tensor: torch.Tensor, dtype_name: str) -> np.ndarray:
    dt = lookup_dtype(dtype_name)
    return tensor.contiguous().view(_SIGNED[dt.itemsize]).numpy().view(dt.bits).copy()


def widen(bits: np.ndarray, dtype_name: str) -> np.ndarray:
    wide = torch.float64 if dtype_name == "F64" else torch.float32
    return to_torch(bits, dtype_name).to(wide).numpy()


def narrow(values: np.ndarray, dtype_name: str) -> np.ndarray:
    """Round once, by torch (round-to-nearest-even)."""
    return to_bits(torch.from_numpy(values).to(TORCH_DTYPES[dtype_name]), dtype_name)


def random_bits(rng: np.random.Generator, dtype_name: str, size: int, near=None) -> np.ndarray:
    """Random finite values of ``dtype_name``: normal, quantized (equal magnitudes, exact
    ties) and special (0, -0, tiny); ``near`` (bits) gives values close to those."""
    if dtype_name == "BOOL":
        return rng.integers(0, 2, size).astype(np.uint8)
    if not lookup_dtype(dtype_name).is_float:
        return rng.integers(-50, 50, size).astype(lookup_dtype(dtype_name).bits)
    kind = rng.integers(0, 3, size)
    values = np.where(kind == 0, rng.standard_normal(size),
                      np.where(kind == 1, rng.choice([-1.0, -0.5, 0.25, 0.5, 1.0, 2.0], size),
                               rng.choice([0.0, -0.0, 1e-30, -3e-8, 1e-3], size)))
    if near is not None:
        values = widen(near, dtype_name).astype(np.float64) + 0.1 * values
    return narrow(values.astype(np.float64 if dtype_name == "F64" else np.float32), dtype_name)


def random_masks(rng: np.random.Generator, count: int, size: int) -> list[np.ndarray]:
    """Masks of mixed density, some overlapping, some empty or full."""
    densities = rng.choice([0.0, 0.05, 0.3, 0.7, 1.0], count)
    return [rng.random(size) < d for d in densities]


def reference_merge(rule: str, dtype_name: str, base: np.ndarray, masks: list[np.ndarray],
                    finetuned: list[np.ndarray], weights=None, name: str = "", **options
                    ) -> np.ndarray:
    """The merged bits of one flat tensor, computed densely."""
    if not lookup_dtype(dtype_name).is_float:
        out = base.copy()
        for mask, tune in zip(masks, finetuned):
            out[mask] = tune[mask]
        return out
    weights = [1.0] * len(masks) if weights is None else weights
    base_wide = widen(base, dtype_name)
    wide = base_wide.dtype.type
    with np.errstate(all="ignore"):
        taus = [widen(tune, dtype_name) - base_wide for tune in finetuned]
    total = np.zeros_like(base_wide)
    covering = np.zeros_like(base_wide)
    lone, lone_bits = np.zeros(base.size, bool), base.copy()
    if rule == "localize-stitch":
        for mask, tau, weight in zip(masks, taus, weights):
            total = np.where(mask, total + wide(weight) * tau, total)
            covering += mask
        touched, update = covering > 0, total / np.maximum(covering, 1)
        # A position one delta of weight 1 covers alone takes that fine-tune's bits.
        for mask, tune, weight in zip(masks, finetuned, weights):
            if weight == 1.0:
                alone = mask & (covering == 1)
                lone_bits[alone], lone[alone] = tune[alone], True
    elif rule == "task-arithmetic":
        for mask, tau, weight in zip(masks, taus, weights):
            total = np.where(mask, total + wide(weight) * tau, total)
        touched = np.any(masks, axis=0) if masks else np.zeros(base.size, bool)
        update = wide(options.get("scale", 1.0)) * total
    elif rule == "ties":
        keep = int(np.floor(options.get("density", 0.2) * base.size + 0.5))
        trimmed = []
        for mask, tau, weight in zip(masks, taus, weights):
            weighted = np.where(mask, wide(weight) * tau, 0)
            ties = tie_order(name, np.arange(base.size)).astype(np.int64)
            order = np.lexsort((np.arange(base.size), -ties, -np.abs(weighted)))[:keep]
            trimmed.append(np.where(np.isin(np.arange(base.size), order), weighted, 0))
        summed = np.zeros_like(base_wide)
        for vector in trimmed:
            summed = summed + vector
        elected = np.sign(summed)
        for vector in trimmed:
            agree = (np.sign(vector) == elected) & (vector != 0)
            total = np.where(agree, total + vector, total)
            covering += agree
        touched = covering > 0
        update = wide(options.get("scale", 1.0)) * (total / np.maximum(covering, 1))
    elif rule in MERGEKIT_RULES:  # mergekit's formulas, on whole tensors (untouched: base)
        update = _mergekit_reference(rule, base_wide, masks, taus, weights, name, options)
        touched = np.any(masks, axis=0) if masks else np.zeros(base.size, bool)
    elif rule == "dare":
        drop, seed = options.get("drop", 0.9), options.get("seed", 0)
        touched = np.zeros(base.size, bool)
        for i, (mask, tau, weight) in enumerate(zip(masks, taus, weights)):
            rng = np.random.default_rng([seed, i, zlib.crc32(name.encode())])
            survives = np.zeros(base.size, bool)
            survives[np.flatnonzero(mask)] = rng.random(int(mask.sum())) >= drop
            total = np.where(survives, total + wide(weight) * (tau / wide(1 - drop)), total)
            touched |= survives
        update = wide(options.get("scale", 1.0)) * total
    else:
        raise AssertionError(rule)
    with np.errstate(all="ignore"):
        merged = narrow(base_wide + update, dtype_name)
    return np.where(lone, lone_bits, np.where(touched, merged, base))


def _mergekit_reference(rule, base_wide, masks, taus, weights, name, options) -> np.ndarray:
    """mergekit's generalized task arithmetic (sparsify, weights, sign election, mixing), as
    its sparsify.py and generalized_task_arithmetic.py write it, on whole tensors."""
    sparsify, consensus, defaults = MERGEKIT_RULES[rule]
    options = {**defaults, "scale": 1.0, "seed": 0, "gamma": 0.01, **options}
    size, tdt = base_wide.size, torch.float64 if base_wide.dtype == np.float64 else torch.float32
    deltas = [torch.from_numpy(np.where(mask, tau, 0).astype(base_wide.dtype))
              for mask, tau in zip(masks, taus)]
    for i, delta in enumerate(deltas):
        density, gamma = (value[i] if isinstance(value, (list, tuple)) else value
                          for value in (options["density"], options["gamma"]))
        if density >= 1:
            continue
        keep = torch.zeros(size, dtype=tdt)
        if sparsify == "magnitude":
            keep[torch.argsort(delta.abs().float(), descending=True)[:int(density * size)]] = 1
        elif sparsify == "random":
            rng = np.random.default_rng([options["seed"], i, zlib.crc32(name.encode())])
            keep[torch.from_numpy(rng.random(size) < density)] = 1
        else:
            n_top = int(gamma * size)
            n_bot = size - int(density * size) - n_top
            if n_bot < 0:
                n_top, n_bot = n_top + n_bot, 0
            keep[torch.sort(delta.abs().float(), descending=False).indices[n_bot:-n_top]] = 1
        masked = delta * keep
        if options["rescale"]:
            before, after = delta.abs().sum(), masked.abs().sum()
            if not (before < 1e-7 or after < 1e-7):
                masked = masked * (before / after)
        deltas[i] = masked
    deltas = torch.stack(deltas) if deltas else torch.zeros((0, size), dtype=tdt)
    weight = torch.tensor(weights, dtype=tdt).unsqueeze(-1)
    weighted = deltas * weight
    if consensus:
        agree = weighted.sign() == (weighted.sum(dim=0) >= 0).to(tdt) * 2 - 1
        mixed = (weighted * agree).sum(dim=0)
        divisor = (weight * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = weight.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if options["normalize"]:
        mixed = mixed / divisor
    if options["scale"] != 1:
        mixed = mixed * options["scale"]
    return mixed.numpy()


def sparse_merge(rule, dtype_name, base, masks, finetuned, weights=None, name="", **options):
    """The same merge through the library's combiner, from per-delta stored entries."""
    dt = lookup_dtype(dtype_name)
    stored = []
    for mask, tune in zip(masks, finetuned):
        positions = np.flatnonzero(mask)
        stored.append(Stored(positions, tune[positions], base[positions]) if positions.size
                      else None)
    combine = rule_combiner(rule, weights, len(masks), **options)
    positions, bits = combine.combine(name, dt, base.size, stored)
    out = base.copy()
    out[positions] = bits
    return out


@st.composite
def merge_cases(draw, dtypes=FLOAT_DTYPES):
    rule = draw(st.sampled_from(sorted(RULES)))
    options = draw(st.sampled_from(RULE_OPTIONS[rule]))
    dtype_name = draw(st.sampled_from(dtypes))
    count = draw(st.integers(0, 6))
    size = draw(st.integers(1, 60))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weights = draw(st.none() | st.just([float(w) for w in rng.choice([1.0, 0.5, -1.0, 2.0], count)]))
    base = random_bits(rng, dtype_name, size)
    finetuned = [random_bits(rng, dtype_name, size, near=base) for _ in range(count)]
    return rule, dtype_name, base, random_masks(rng, count, size), finetuned, weights, options


@settings(max_examples=150, deadline=None)
@given(merge_cases())
def test_every_rule_matches_the_dense_reference(case):
    rule, dtype_name, base, masks, finetuned, weights, options = case
    want = reference_merge(rule, dtype_name, base, masks, finetuned, weights, "layer.w", **options)
    got = sparse_merge(rule, dtype_name, base, masks, finetuned, weights, "layer.w", **options)
    assert np.array_equal(got, want)


@settings(max_examples=60, deadline=None)
@given(merge_cases(), st.data())
def test_mergekit_rules_take_a_density_and_gamma_per_delta(case, data):
    """mergekit's per-model parameters: each delta sparsified with its own density (and
    gamma), against the dense reference; a list of the wrong length is refused by name."""
    _, dtype_name, base, masks, finetuned, weights, _ = case
    if not masks:
        return
    rule = data.draw(st.sampled_from(sorted(MERGEKIT_RULES)))
    fractions = st.sampled_from([0.1, 0.3, 0.5, 0.9, 1.0])
    options = {"density": data.draw(st.lists(fractions, min_size=len(masks),
                                             max_size=len(masks)))}
    if "breadcrumbs" in rule:
        options["gamma"] = data.draw(st.lists(st.sampled_from([0.0, 0.05, 0.2]),
                                              min_size=len(masks), max_size=len(masks)))
    want = reference_merge(rule, dtype_name, base, masks, finetuned, weights, "layer.w", **options)
    got = sparse_merge(rule, dtype_name, base, masks, finetuned, weights, "layer.w", **options)
    assert np.array_equal(got, want)
    with pytest.raises(OptionError, match=f"density gives {len(masks) + 1} values"):
        rule_combiner(rule, None, len(masks), density=options["density"] + [0.5])


@pytest.mark.parametrize("name, layers, want", [
    ("model.layers.2.mlp.w", 5, 0.5),      # layer 2 of 5: t = 0.5, halfway from 0.1 to 0.9
    ("model.layers.4.mlp.w", 5, 0.9),      # the last layer: the last value
    ("model.embed_tokens.weight", 5, 0.1),  # outside the layers: the first value
    ("transformer.h.0.attn.w", 1, 0.9),    # a single layer sits at 1
])
def test_a_density_gradient_takes_its_value_at_the_tensors_layer(name, layers, want):
    """mergekit's gradients (``density: [0.1, 0.9]``): the value at the tensor's place among
    the layers; the merge equals the one with that value given alone."""
    rng = np.random.default_rng(5)
    base = random_bits(rng, "F32", 40)
    finetuned = [random_bits(rng, "F32", 40, near=base) for _ in range(2)]
    masks = random_masks(rng, 2, 40)
    for rule in ("ties-mergekit", "breadcrumbs-mergekit"):
        got = sparse_merge(rule, "F32", base, masks, finetuned, [1.0, 0.5], name,
                           density=[[0.1, 0.9], 0.3], layers=layers)
        alone = sparse_merge(rule, "F32", base, masks, finetuned, [1.0, 0.5], name,
                             density=[want, 0.3])
        assert np.array_equal(got, alone), rule
        same = sparse_merge(rule, "F32", base, masks, finetuned, [1.0, 0.5], name,
                            density=[[0.1, 0.9], [0.1, 0.9]], layers=layers)
        assert np.array_equal(same, sparse_merge(rule, "F32", base, masks, finetuned,
                                                 [1.0, 0.5], name, density=want))
    with pytest.raises(OptionError, match="needs layers"):
        rule_combiner("ties-mergekit", None, 2, density=[[0.1, 0.9], 0.3])


def test_per_tensor_filters_take_the_first_match_and_refuse_what_none_gives():
    """mergekit's per-tensor filters: the first whose text is in the tensor's name (or that
    has none) gives the value; a malformed filter is refused when the options are checked,
    and a tensor no filter matches when it is merged, naming it."""
    rng = np.random.default_rng(6)
    base = random_bits(rng, "F32", 30)
    finetuned = [random_bits(rng, "F32", 30, near=base) for _ in range(2)]
    masks = random_masks(rng, 2, 30)
    filters = [{"filter": "mlp", "value": 0.3}, {"filter": None, "value": 0.8}]
    for name, want in (("layers.0.mlp.w", 0.3), ("layers.0.attn.w", 0.8)):
        got = sparse_merge("ties-mergekit", "F32", base, masks, finetuned, None, name,
                           density=[filters, 0.5])
        assert np.array_equal(got, sparse_merge("ties-mergekit", "F32", base, masks, finetuned,
                                                None, name, density=[want, 0.5]))
    with pytest.raises(OptionError, match="a filter is"):
        rule_combiner("ties-mergekit", None, 2, density=[[{"filter": "mlp"}], 0.5])
    with pytest.raises(OptionError, match="no filter gives tensor 'layers.0.attn.w' a value"):
        sparse_merge("ties-mergekit", "F32", base, masks, finetuned, None, "layers.0.attn.w",
                     density=[filters[:1], 0.5])


@settings(max_examples=30, deadline=None)
@given(merge_cases(dtypes=("I64", "I32", "U8", "BOOL")))
def test_non_float_tensors_take_the_stored_bits(case):
    _, dtype_name, base, masks, _, weights, options = case
    rng = np.random.default_rng(0)
    agreed = random_bits(rng, dtype_name, base.size)
    want = reference_merge("ties", dtype_name, base, masks, [agreed] * len(masks))
    for rule in RULES:
        got = sparse_merge(rule, dtype_name, base, masks, [agreed] * len(masks), weights)
        assert np.array_equal(got, want)


def test_non_float_deltas_that_disagree_are_refused():
    base = np.arange(4, dtype=np.uint64)
    a = Stored(np.array([1]), np.array([7], np.uint64), base[[1]])
    b = Stored(np.array([1, 2]), np.array([8, 9], np.uint64), base[[1, 2]])
    with pytest.raises(TensorMismatchError, match="cannot be averaged"):
        rule_combiner("localize-stitch", None, 2).combine("pos", lookup_dtype("I64"), 4, [a, b])


def test_untouched_positions_keep_base_bits_and_touched_round_once():
    base = np.array([0x8000, 0x3F80, 0x4000], np.uint16)      # bf16 -0.0, 1.0, 2.0
    tune = np.array([0x8000, 0x3F81, 0x4000], np.uint16)      # 1.0 + one ulp
    got = sparse_merge("localize-stitch", "BF16", base, [np.array([False, True, False])], [tune])
    assert got.tolist() == [0x8000, 0x3F81, 0x4000]
    # one ulp and no change average to half an ulp: exact in float32, rounded once, to even
    same = base.copy()
    got = sparse_merge("localize-stitch", "BF16", base, [np.ones(3, bool)] * 2, [tune, same])
    assert got[1] == 0x3F80


def test_localize_stitch_weights_scale_before_averaging():
    base = np.zeros(2, np.float32).view(np.uint32)
    a = np.array([2.0, 2.0], np.float32).view(np.uint32)
    b = np.array([4.0, 4.0], np.float32).view(np.uint32)
    masks = [np.array([True, True]), np.array([False, True])]
    got = sparse_merge("localize-stitch", "F32", base, masks, [a, b], [0.5, 2.0]).view(np.float32)
    assert got.tolist() == [1.0, (1.0 + 8.0) / 2]


def test_ties_trims_per_tensor_by_magnitude_then_tie_order():
    base = np.zeros(6, np.float32).view(np.uint32)
    tune = np.array([1.0, -3.0, 2.0, -2.0, 0.5, 3.0], np.float32).view(np.uint32)
    got = sparse_merge("ties", "F32", base, [np.ones(6, bool)], [tune], name="w", density=0.5)
    # keep round(0.5 * 6) = 3: |-3| at 1, |3| at 5, then of |2| at 2 and |-2| at 3 the one of
    # larger tie order (a hash of name and position, not the lower position)
    second = 2 if tie_order("w", np.array([2]))[0] > tie_order("w", np.array([3]))[0] else 3
    want = [0.0, -3.0, 0.0, 0.0, 0.0, 3.0]
    want[second] = [2.0, -2.0][second - 2]
    assert got.view(np.float32).tolist() == want


@pytest.mark.parametrize("rule, options, message", [
    ("ties", {"density": 1.5}, "density"), ("ties", {"density": -0.1}, "density"),
    ("dare", {"drop": 1.0}, "drop"), ("nope", {}, "unknown rule"),
    ("localize-stitch", {"scale": 2.0}, "takes no options, not scale"),
])
def test_bad_rules_and_options_are_refused(rule, options, message):
    base = np.zeros(3, np.float32).view(np.uint32)
    with pytest.raises(ValueError, match=message):
        sparse_merge(rule, "F32", base, [np.ones(3, bool)], [base + 1], **options)


@pytest.mark.parametrize("rule, option, value", [
    ("task-arithmetic", "scale", float("nan")), ("task-arithmetic", "scale", float("inf")),
    ("ties", "scale", float("-inf")), ("ties", "density", float("nan")),
    ("ties", "density", True), ("ties", "density", "0.5"), ("dare", "drop", float("nan")),
    ("dare", "seed", 1.7), ("dare", "seed", -5), ("dare", "seed", True), ("dare", "seed", "3"),
    ("task-arithmetic", "scale", 10**400), ("task-arithmetic", "scale", [1.0]),
])
def test_rule_options_are_finite_numbers_of_their_kind_and_range(rule, option, value):
    """Every front end builds its combiner here: a NaN scale was accepted and made most of the
    output NaN, a seed of 1.7 ran as 1."""
    with pytest.raises(OptionError) as caught:
        rule_combiner(rule, None, 2, **{option: value})
    assert caught.value.option == option and str(caught.value).startswith(option)
    assert isinstance(caught.value, ValueError)


def test_a_seed_of_any_size_is_a_seed():
    """Whole numbers are never converted to floats (10**400 has none)."""
    assert rule_combiner("dare", None, 1, seed=10**400).options["seed"] == 10**400


def test_rule_options_keep_their_kind():
    combiner = rule_combiner("dare", None, 1, drop=np.float32(0.5), seed=np.int64(7), scale=2)
    options = combiner.options
    assert options == {"drop": 0.5, "seed": 7, "scale": 2.0}
    assert type(options["seed"]) is int and type(options["scale"]) is float


@pytest.mark.parametrize("weights", [[float("nan"), 1.0], [1.0, float("inf")], [True, 1.0],
                                     ["1", 1.0], [10**400, 1.0], "11", [None, 1.0]])
def test_weights_are_finite_numbers(weights):
    with pytest.raises(OptionError, match="weights") as caught:
        rule_combiner("localize-stitch", weights, 2)
    assert caught.value.option == "weights"


def test_weights_must_match_deltas():
    with pytest.raises(ValueError, match="2 deltas but 1 weights"):
        rule_combiner("localize-stitch", [1.0], 2)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_weights_summing_to_zero_or_negative_merge_without_nan(rule):
    """Negative weights subtract a task vector (task arithmetic's negation); no rule divides
    by the weights' sum, so weights summing to zero cancel instead of dividing by zero."""
    base = np.array([1.0, 2.0, 3.0, 4.0], np.float32).view(np.uint32)
    tune = np.array([2.0, 4.0, 6.0, 8.0], np.float32).view(np.uint32)
    both = [np.ones(4, bool)] * 2
    options = {"ties": {"density": 1.0}, "ties-mergekit": {"density": 1.0},
               "dare": {"drop": 0.0}}.get(rule, {})
    cancelled = sparse_merge(rule, "F32", base, both, [tune, tune], [1.0, -1.0], **options)
    assert not np.isnan(cancelled.view(np.float32)).any()
    zero = sparse_merge(rule, "F32", base, both, [tune, tune], [0.0, 0.0], **options)
    assert zero.view(np.float32).tolist() == base.view(np.float32).tolist()


def _dare_survivors(seed: int, drop: float, size: int, name: str = "w", others: int = 0
                    ) -> np.ndarray:
    """DARE of a delta storing 1.0 at every position, after ``others`` that store nothing."""
    base = np.zeros(size, np.float32).view(np.uint32)
    tune = np.ones(size, np.float32).view(np.uint32)
    masks = [np.zeros(size, bool)] * others + [np.ones(size, bool)]
    got = sparse_merge("dare", "F32", base, masks, [tune] * (others + 1), name=name,
                       drop=drop, seed=seed)
    return got.view(np.float32)


def test_dare_is_seeded_rescaled_and_drops_at_the_rate_asked():
    size, drop = 20000, 0.75
    first = _dare_survivors(5, drop, size)
    assert np.array_equal(first, _dare_survivors(5, drop, size))            # deterministic
    assert not np.array_equal(first, _dare_survivors(6, drop, size))        # seeded
    assert not np.array_equal(first, _dare_survivors(5, drop, size, name="v"))  # per tensor
    assert set(np.unique(first).tolist()) == {0.0, 1.0 / (1 - drop)}        # rescaled survivors
    kept = np.count_nonzero(first) / size
    assert abs(kept - (1 - drop)) < 5 * np.sqrt(drop * (1 - drop) / size)   # binomial, 5 sigma


def test_dare_draws_depend_on_the_delta_index_not_on_other_deltas():
    alone = _dare_survivors(1, 0.5, 500, others=1)
    # delta 1's draws are its own whether or not delta 0 stores the tensor
    base = np.zeros(500, np.float32).view(np.uint32)
    one = np.ones(500, np.float32).view(np.uint32)
    both = sparse_merge("dare", "F32", base, [np.ones(500, bool)] * 2, [base, one], drop=0.5,
                        seed=1, name="w").view(np.float32)
    assert np.array_equal(alone, both)
    assert not np.array_equal(alone, _dare_survivors(1, 0.5, 500))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, float("nan"), 0.5, -0.5, 3.0,
                                 float("inf"), -float("inf")]), min_size=1, max_size=60),
       st.data())
def test_ties_trims_by_selection_exactly_as_by_a_full_sort(values, data):
    """TIES keeps the ``limit`` largest magnitudes, ties by the hash then position, NaN last:
    selection (``top_magnitudes``) gives the full lexsort's set, special values included."""
    from sparsestitch.combine.rules import top_magnitudes
    from sparsestitch.core.tiebreak import tie_order
    tau = np.array(values, np.float32)
    positions = np.sort(data.draw(st.lists(st.integers(0, 10**6), min_size=tau.size,
                                           max_size=tau.size, unique=True))).astype(np.int64)
    limit = data.draw(st.integers(0, tau.size))
    ties = tie_order("w", positions).astype(np.int64)
    want = np.sort(np.lexsort((positions, -ties, -np.abs(tau)))[:limit])
    assert np.array_equal(top_magnitudes(tau, positions, limit, "w"), want)


# Values torch's sums and comparisons treat apart: both zeros, infinities, NaN, a subnormal.
SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, 3.0])


@settings(max_examples=120, deadline=None)
@given(st.integers(1, rules_module.NATIVE_MIX_ROWS), st.integers(1, 20_000),
       st.sampled_from([np.float32, np.float64]), st.booleans(), st.booleans(),
       st.sampled_from([1.0, 0.3, 1.7]), st.integers(0, 2**32 - 1))
def test_the_compiled_mix_has_the_bits_of_mergekits_torch_operations(
        count, size, wide, consensus, normalize, scale, seed):
    """gta_mix (one pass) against mergekit's torch operations (nine): the same bits, with
    values spanning 12 decades, both zeros, infinities and NaN, negative and zero weights (a
    NaN's sign and payload aside: vector and scalar code pass on different ones, and every
    combiner makes a NaN result the dtype's canonical NaN)."""
    if native.kernels() is None:
        pytest.skip("the compiled loops are not built")
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((count, size)) * 10.0 ** rng.integers(-6, 6, (count, size))
    special = rng.random((count, size)) < 0.1
    values[special] = rng.choice(SPECIAL, int(special.sum()))
    deltas = torch.from_numpy(values.astype(wide))
    weights = [float(w) for w in rng.choice([1.0, 0.5, 0.3, -0.7, 0.0, 1e-9, 2.5], count)]
    steps = rules_module.MergekitSteps("magnitude", consensus, normalize=int(normalize),
                                       scale=scale)
    weight = torch.tensor(weights, dtype=deltas.dtype).unsqueeze(-1)
    got = rules_module._mixed_natively(deltas, weights, weight, steps)
    want = rules_module._mixed_by_torch(deltas, weight, steps)
    bits = np.uint32 if wide == np.float32 else np.uint64
    both_nan = np.isnan(got.numpy()) & np.isnan(want.numpy())  # made canonical after the rule
    assert np.array_equal(np.where(both_nan, 0, got.numpy().view(bits)),
                          np.where(both_nan, 0, want.numpy().view(bits)))


def test_the_compiled_mix_leaves_more_rows_to_torch():
    """Over NATIVE_MIX_ROWS task vectors torch sums in another order: its operations run."""
    deltas = torch.ones((rules_module.NATIVE_MIX_ROWS + 1, 8))
    steps = rules_module.MergekitSteps("magnitude", True)
    weights = [1.0] * deltas.shape[0]
    weight = torch.tensor(weights).unsqueeze(-1)
    assert rules_module._mixed_natively(deltas, weights, weight, steps) is None


def test_dares_draws_in_chunks_are_the_contracts_single_draw(monkeypatch):
    """DARE's drops drawn DRAW_CHUNK at a time are numpy's single draw of every element."""
    steps = rules_module.MergekitSteps("random", True, density=0.37, seed=5, name="layers.1.w")
    want = np.random.default_rng([5, 2, zlib.crc32(b"layers.1.w")]).random(10_007) < 0.37
    monkeypatch.setattr(rules_module, "DRAW_CHUNK", 1_000)
    assert np.array_equal(rules_module._kept(None, 10_007, 2, steps).numpy(), want)
