"""The activation-aware error (``compress(calibration=...)``, ``--calibration``): each linear
layer's change ranked by ``|tau_ij| * s_j`` and every error measured as ``||(tau - tau_hat) D||``,
``D`` the root mean square activation of each input feature -- checked against a dense numpy
reference computed from the restored model, never from what the delta reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

import sparsestitch
from sparsestitch.cli import main
from sparsestitch.core.dtypes import dtype as lookup_dtype, from_wide, to_wide
from sparsestitch.core.errors import OptionError
from sparsestitch.delta.codecs.quant import QuantStream, QuantValues
from sparsestitch.delta.format import DeltaReader
from sparsestitch.localize.activations import (FLOOR, activation_scales, column_weights,
                                               weighted_keys)
from sparsestitch.localize.topk import magnitude_keys

from .conftest import save_checkpoint

MATRICES = {"model.layers.0.mlp.up_proj.weight": (48, 40),
            "model.layers.0.self_attn.q_proj.weight": (40, 40),
            "model.layers.0.mlp.down_proj.weight": (40, 48)}


def _pair(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(shape, generator=g).to(dtype) for name, shape in MATRICES.items()}
    base["model.norm.weight"] = torch.ones(40).to(dtype)
    tune = {name: (t.float() + 0.01 * torch.randn(t.shape, generator=g)).to(dtype)
            for name, t in base.items()}
    return base, tune


def _scales(seed: int, spread: float = 1.5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    scales = {name: rng.lognormal(0.0, spread, shape[1]) for name, shape in MATRICES.items()}
    scales["model.layers.0.mlp.up_proj.weight"][:3] = 0.0  # dead features: floored weights
    return scales


def _weights(scale: np.ndarray) -> np.ndarray:
    """The reference weights: sqrt of the scales over their root mean square, floored."""
    root = np.sqrt(scale)
    return np.maximum(root / np.sqrt(np.mean(scale)), FLOOR)


def _weighted_errors(base, tune, restored_path, scales) -> dict[str, float]:
    restored = load_file(restored_path)
    errors = {}
    for name in MATRICES:
        w = _weights(scales[name])
        tau = (tune[name].double() - base[name].double()).numpy() * w
        tau_hat = (restored[name].double() - base[name].double()).numpy() * w
        errors[name] = float(np.linalg.norm(tau - tau_hat) / np.linalg.norm(tau))
    return errors


def _header(delta) -> dict:
    with DeltaReader(delta) as reader:
        return reader.header


def _written(tmp_path, base, tune, scales, **options):
    base_path = save_checkpoint(tmp_path / "base.safetensors", base)
    tune_path = save_checkpoint(tmp_path / "tune.safetensors", tune)
    delta = tmp_path / "aa.delta"
    sparsestitch.compress(base_path, tune_path, delta, calibration=scales, overwrite=True,
                          **options)
    restored = sparsestitch.restore(base_path, delta, tmp_path / "r.safetensors",
                                    overwrite=True)
    reported = {t.name: t.fidelity["relative_error"] for t in sparsestitch.info(delta).tensors
                if t.fidelity and t.name in MATRICES}
    return delta, restored, reported


OPTIONS = [{}, {"max_error": 0.2}, {"max_size": "9KB"}, {"density": 0.1, "scope": "per-tensor"},
           {"density": 0.05}, {"density": 1.0, "bits": 2}, {"low_rank": True},
           {"low_rank": True, "max_size": "6KB"}, {"low_rank": True, "max_error": 0.2}]


@settings(max_examples=24, deadline=None)
@given(seed=st.integers(0, 10_000), which=st.sampled_from(range(len(OPTIONS))),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       chunk=st.sampled_from([1 << 20, 999, 40]))
def test_reported_errors_are_the_weighted_errors_of_the_restored_model(tmp_path_factory, seed,
                                                                       which, dtype, chunk):
    """Whatever the mode, dtype and blocks, each matrix's reported relative error is
    ||(tau - tau_hat) D|| / ||tau D|| of what restore gives."""
    tmp_path = tmp_path_factory.mktemp("aa")
    base, tune = _pair(seed, dtype)
    scales = _scales(seed)
    _, restored, reported = _written(tmp_path, base, tune, scales, chunk_elements=chunk,
                                     **OPTIONS[which])
    measured = _weighted_errors(base, tune, restored, scales)
    for name, error in measured.items():
        assert reported[name] == pytest.approx(error, rel=1e-4, abs=1e-6), (name, OPTIONS[which])


@pytest.mark.parametrize("max_error", [0.1, 0.3, 0.5])
def test_max_error_holds_in_the_weighted_norm_and_differs_from_the_plain_one(tmp_path, max_error):
    base, tune = _pair(3)
    scales = _scales(3, spread=2.0)
    delta, restored, _ = _written(tmp_path, base, tune, scales, max_error=max_error)
    measured = _weighted_errors(base, tune, restored, scales)
    assert all(error <= max_error * (1 + 1e-6) for error in measured.values()), measured
    plain = tmp_path / "plain.delta"
    sparsestitch.compress(tmp_path / "base.safetensors", tmp_path / "tune.safetensors", plain,
                          max_error=max_error)
    header = _header(delta)
    assert header["calibration"] == {"error": "activation-weighted", "source": "scales",
                                     "tokens": None, "tensors": 3}
    assert "calibration" not in _header(plain)
    assert delta.read_bytes() != plain.read_bytes()


def test_a_top_k_keeps_the_largest_weighted_changes(tmp_path):
    """Per tensor, the kept positions are exactly the k largest ``|tau_ij| * w_j`` (a dense
    argsort; random floats have no ties)."""
    base, tune = _pair(5)
    scales = _scales(5, spread=2.0)
    delta, _, _ = _written(tmp_path, base, tune, scales, density=0.1, scope="per-tensor")
    with DeltaReader(delta) as reader:
        for name in MATRICES:
            record = reader.record(name)
            kept = np.sort(reader.positions(record))
            weighted = np.abs((tune[name].double() - base[name].double()).numpy()) \
                * _weights(scales[name]).astype(np.float32)
            expected = np.sort(np.argsort(-weighted.reshape(-1), kind="stable")[:kept.size])
            assert np.array_equal(kept, expected), name
            plain = np.sort(np.argsort(-np.abs(weighted / _weights(scales[name])).reshape(-1))
                            [:kept.size])
            assert not np.array_equal(kept, plain)  # the weights changed what is kept


def test_weighted_keys_by_rows_and_by_positions_agree():
    rng = np.random.default_rng(0)
    tau = rng.standard_normal((7, 5)).astype(np.float32)
    tau[1, 2], tau[3, 4] = np.inf, np.nan
    keys = magnitude_keys(tau.view(np.uint32).reshape(-1), np.zeros(35, np.uint32),
                          lookup_dtype("F32"))
    weights = rng.uniform(0.1, 3.0, 5).astype(np.float32)
    by_rows = weighted_keys(keys, weights)
    by_positions = weighted_keys(keys.copy(), weights, np.arange(35))
    assert np.array_equal(by_rows, by_positions)
    values = by_rows.view(np.float32).reshape(7, 5)
    assert np.isinf(values[1, 2]) and np.isnan(values[3, 4]) and (by_rows >> 31 == 0).all()
    finite = np.isfinite(tau)
    assert np.array_equal(values[finite], (np.abs(tau) * weights)[finite])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 700), bits=st.sampled_from([1, 2, 4, 8]),
       group=st.sampled_from([0, 16, 128]), parts=st.integers(1, 4),
       dtype=st.sampled_from(["F32", "BF16"]))
def test_quant_stream_weighted_error_is_the_dense_weighted_error(seed, n, bits, group, parts,
                                                                 dtype):
    """A weighted QuantStream writes the unweighted one's bytes, and its ``error_sq`` is
    sum(w * (restored - fine-tuned)^2) over the decoded values."""
    dt = lookup_dtype(dtype)
    rng = np.random.default_rng(seed)
    base = from_wide(rng.standard_normal(n), dt)
    kept = from_wide(to_wide(base, dt) + rng.standard_normal(n) * 0.01, dt)
    weights = rng.uniform(0.0, 5.0, n)
    streams = [QuantStream(dt, bits, group, n), QuantStream(dt, bits, group, n)]
    cuts = np.linspace(0, n, parts + 1).astype(int)
    for a, b in zip(cuts[:-1], cuts[1:]):
        streams[0].add(kept[a:b], base[a:b])
        streams[1].add(kept[a:b], base[a:b], weights[a:b])
    (plain, plain_config), (weighted, config) = streams[0].finish(), streams[1].finish()
    assert weighted == plain
    restored = QuantValues().decode(weighted, {"codec": "quant", **config}, base, dt, n)
    error = to_wide(restored, dt).astype(np.float64) - to_wide(kept, dt).astype(np.float64)
    assert config["error_sq"] == pytest.approx(float(np.sum(weights * error * error)),
                                               rel=1e-9, abs=1e-300)
    assert plain_config["error_sq"] == pytest.approx(float(np.sum(error * error)), rel=1e-9,
                                                     abs=1e-300)
    with pytest.raises(ValueError, match="every part"):
        stream = QuantStream(dt, bits, group)
        stream.add(kept, base, weights)
        stream.add(kept, base)


def test_activation_scales_are_each_input_features_mean_square():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    batches = [torch.randn(4, 6), torch.randn(2, 3, 6)]
    scales = activation_scales(model, batches)
    inputs = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    with torch.no_grad():
        hidden = torch.relu(model[0](inputs.float())).double()
    assert sorted(scales) == ["0.weight", "2.weight"]
    assert np.allclose(scales["0.weight"], (inputs ** 2).mean(0).numpy(), rtol=1e-12)
    assert np.allclose(scales["2.weight"], (hidden ** 2).mean(0).numpy(), rtol=1e-6)


def test_scales_are_checked_against_the_model():
    shapes = {"a.weight": (4, 3), "v": (3,)}
    assert set(column_weights({"a.weight": [1.0, 4.0, 0.0], "v": [1, 2, 3]}, shapes,
                              ["a.weight", "v"])) == {"a.weight"}
    weights = column_weights({"a.weight": [1.0, 4.0, 0.0]}, shapes, ["a.weight"])["a.weight"]
    assert weights.dtype == np.float32 and weights[2] == np.float32(FLOOR)
    assert np.allclose(weights[:2], np.array([1.0, 2.0]) / np.sqrt(5.0 / 3.0))
    # a module tied to another's weight (lm_head on the embedding) has no tensor of its own
    assert column_weights({"b.weight": [1.0] * 3}, shapes, ["a.weight"], strict=False) == {}
    for scales, words in (({"b.weight": [1.0] * 3}, "does not have: 'b.weight'"),
                          ({"a.weight": [1.0] * 4}, "'a.weight': 4 values, its rows have 3"),
                          ({"a.weight": [1.0, -1.0, 1.0]}, "finite and >= 0"),
                          ({"a.weight": [1.0, np.nan, 1.0]}, "finite and >= 0")):
        with pytest.raises(OptionError, match=words):
            column_weights(scales, shapes, ["a.weight"])


def test_calibration_is_refused_where_it_cannot_weigh_the_error(tmp_path):
    base, tune = _pair(1)
    base_path = save_checkpoint(tmp_path / "base.safetensors", base)
    tune_path = save_checkpoint(tmp_path / "tune.safetensors", tune)
    scales = _scales(1)
    masks = {name: np.ones(shape, bool) for name, shape in MATRICES.items()}
    for options, words in (({"lossless": True}, "lossless"),
                           ({"density": 0.1, "bits": 4}, "bits at a density below 1"),
                           ({"masks": masks}, "masks")):
        with pytest.raises(OptionError, match=f"calibration .* {words}"):
            sparsestitch.compress(base_path, tune_path, tmp_path / "x.delta",
                                  calibration=scales, **options)
        assert not (tmp_path / "x.delta").exists()
    with pytest.raises(OptionError, match="no localized matrix has scales"):
        sparsestitch.compress(base_path, tune_path, tmp_path / "x.delta",
                              calibration={"model.norm.weight": np.ones(40)})
    with pytest.raises(OptionError, match="Hugging Face folder"):  # a text file, a bare file
        text = tmp_path / "calib.txt"
        text.write_text("hello world")
        sparsestitch.compress(base_path, tune_path, tmp_path / "x.delta", calibration=text)


def _tiny_llama(folder):
    """A real (random) Llama causal LM and a word-level tokenizer, saved as Hugging Face
    folders as transformers writes them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "the a cat dog sat ran on under mat log and then".split()
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)
    return model


def test_calibration_from_a_text_file_on_a_real_causal_lm(tmp_path):
    pytest.importorskip("transformers")
    base_folder = tmp_path / "base"
    model = _tiny_llama(base_folder)
    torch.manual_seed(1)
    tune_folder = tmp_path / "tune"
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(tune_folder, safe_serialization=True)
    text = tmp_path / "calib.txt"
    text.write_text("the cat sat on the mat and then the dog ran under the log\n" * 20)
    delta = tmp_path / "aa.delta"
    result = CliRunner().invoke(main, ["compress", str(base_folder), str(tune_folder), "-o",
                                       str(delta), "--calibration", str(text),
                                       "--calibration-tokens", "100", "--json"])
    assert result.exit_code == 0, result.output
    header = _header(delta)
    assert header["calibration"]["tokens"] == 100 and header["calibration"]["source"] == "calib.txt"
    assert header["calibration"]["tensors"] == 15  # 7 linear layers x 2, and lm_head
    assert json.loads(result.output)[0]["fidelity"]["relative_error"] <= 0.5
    shown = CliRunner().invoke(main, ["info", str(delta)])
    assert "errors activation-weighted in 15 matrices (100 tokens of calib.txt)" in shown.output
    missing = CliRunner().invoke(main, ["compress", str(base_folder), str(tune_folder), "-o",
                                        str(tmp_path / "m.delta"), "--calibration",
                                        str(tmp_path / "nope.txt")])
    assert missing.exit_code == 2 and "nope.txt" in missing.output
    assert not (tmp_path / "m.delta").exists()


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_the_planners_estimate_is_the_weighted_error_where_the_sample_is_everything(bits):
    """A tensor small enough to be its own sample: an option's estimated error is what the
    record it describes has, in the weighted norm (sample weights on the right columns)."""
    from sparsestitch.localize.budget import OptionSearch
    from sparsestitch.localize.stats import TensorStats, keys_at_least, keys_energy

    dt = lookup_dtype("F32")
    rng = np.random.default_rng(bits)
    rows, cols = 40, 48
    base = rng.standard_normal(rows * cols).astype(np.float32)
    tune = (base + 0.01 * rng.standard_normal(base.size)).astype(np.float32)
    weights = column_weights({"w": rng.lognormal(0.0, 2.0, cols)}, {"w": (rows, cols)},
                             ["w"])["w"]
    keys = weighted_keys(magnitude_keys(tune.view(np.uint32), base.view(np.uint32), dt),
                         weights)
    stats = TensorStats.empty("w", dt, base.size, weights)
    for start in range(0, rows, 7):  # blocks of whole rows, as the walk hands them
        block = slice(start * cols, min(rows, start + 7) * cols)
        stats.add(tune.view(np.uint32)[block], base.view(np.uint32)[block], block.start,
                  keys=keys[block])
    search = OptionSearch(stats, group=16)
    option = search.option(0.3, bits)
    chosen = keys_at_least(keys, option.threshold)
    stream = QuantStream(dt, bits, 16, chosen.size)
    stream.add(tune.view(np.uint32)[chosen], base.view(np.uint32)[chosen],
               (weights.astype(np.float64) ** 2)[chosen % cols])
    _, config = stream.finish()
    energy = keys_energy(keys)
    real = (energy - keys_energy(keys[chosen]) + config["error_sq"]) / energy
    assert option.kept == chosen.size
    assert option.error == pytest.approx(real, rel=1e-9)


def test_low_rank_records_follow_the_weighted_singular_vectors():
    """A low-rank record of a matrix with column weights takes ``tau D``'s leading singular
    vectors (Eckart-Young in the weighted norm): with the same bits its weighted error is
    below the plain record's, and it reports exactly that error."""
    from sparsestitch.delta.codecs.lowrank import LowRankValues
    from sparsestitch.localize.lowrank import HeldChange, encode_matrix

    dt = lookup_dtype("F32")
    rng = np.random.default_rng(7)
    base = rng.standard_normal((40, 48)).astype(np.float32)
    tau = (0.01 * rng.standard_normal((40, 48))).astype(np.float32)
    tune = base + tau
    tau = tune.astype(np.float64) - base           # the change as the file stores it
    weights = column_weights({"w": rng.lognormal(0.0, 2.0, 48)}, {"w": (40, 48)}, ["w"])["w"]
    errors = {}
    for label, w in (("weighted", weights), ("plain", None)):
        change = HeldChange((tune - base).astype(np.float32), base.view(np.uint32).reshape(-1),
                            "0" * 16, w)
        record, payload = encode_matrix("w", dt, (40, 48), change, [8] * 6)
        restored = LowRankValues().decode(payload, record.values, base.view(np.uint32).reshape(-1),
                                          dt, 40 * 48).view(np.float32).reshape(40, 48)
        error = (restored.astype(np.float64) - base - tau) * weights
        errors[label] = np.linalg.norm(error) / np.linalg.norm(tau * weights)
        if w is not None:
            assert record.fidelity["relative_error"] == pytest.approx(errors[label], rel=1e-6)
    assert errors["weighted"] < 0.9 * errors["plain"], errors


def test_low_rank_memory_counts_the_weighted_copy():
    """With calibration a matrix's change is also held column-weighted (one copy at a time):
    the low-rank planner's memory bound counts it, so a budget is never overrun by it."""
    from sparsestitch.localize.lowrank import Spectrum, working_bytes

    plain = Spectrum("w", 512, 256, 0.0, np.empty(0), 512 * 256 * 4)
    weighted = Spectrum("w", 512, 256, 0.0, np.empty(0), 512 * 256 * 4, weighted=True)
    for tunes in (1, 3):
        assert working_bytes(weighted, tunes, 8) - working_bytes(plain, tunes, 8) == 512 * 256 * 4


def test_an_output_on_the_calibration_text_is_refused_and_the_text_kept(tmp_path):
    from sparsestitch.core.errors import OutputError

    base, tune = _pair(2)
    base_path = save_checkpoint(tmp_path / "base.safetensors", base)
    tune_path = save_checkpoint(tmp_path / "tune.safetensors", tune)
    text = tmp_path / "calibration.txt"
    text.write_text("the text a user keeps")
    with pytest.raises(OutputError, match="calibration text"):
        sparsestitch.compress(base_path, tune_path, text, calibration=text, overwrite=True)
    assert text.read_text() == "the text a user keeps"
