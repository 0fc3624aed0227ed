"""Corrupt and hostile delta files and base checkpoints (the fast part of the fuzz campaign).

Every damaged file goes through ``info``, ``sparsestitch info``, ``verify`` (with and without the
base), ``restore`` and ``stitch``; each outcome is judged against an independent reader written
from docs/format.md (:mod:`tests.support.reference`).  A run must end in a
:class:`~sparsestitch.core.errors.SparsestitchError` naming the file (and the tensor the damage is in),
or in exactly the result the reference reader gives -- never in another exception, a different
result, or anything left at the output path.  ``python -m tests.support.campaign`` runs the same
families exhaustively and at random for as long as it is given.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import sparsestitch
from sparsestitch.cli import main
from sparsestitch.core.errors import (BaseMismatchError, CheckpointError, DeltaFormatError,
                                      ResourceLimitError)

from .conftest import save_checkpoint
from .support.damage import Case, bitflip_cases, container_cases, decoder_cases, header_cases, random_header_case, resealed_payload_cases, truncation_cases
from .support.images import DeltaImage
from .support.memory import measure
from .support.outcomes import Context, Tally, base_cases, pristine_results, run_base_case, run_case
from .support.zoo import CODECS, build_zoo, zoo_model


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corruption")
    zoo = build_zoo(folder)
    scratch = folder / "scratch"
    scratch.mkdir()
    ctx = Context(zoo.base, zoo.other, scratch)
    pristine = {label: pristine_results(path, ctx) for label, path in zoo.deltas.items()}
    return zoo, ctx, pristine


def run_all(lab, label: str, cases: list[Case]) -> Tally:
    zoo, ctx, pristine = lab
    tally = Tally()
    for case in cases:
        tally.add(case, run_case(case, ctx, pristine[label]))
    assert not tally.failures, "\n".join(f"{name}: {ops}" for name, ops in tally.failures[:10])
    assert not any(p.name.startswith(".") for p in ctx.scratch.iterdir()), "temporaries left"
    return tally


def sample(cases: list[Case], n: int, seed: int) -> list[Case]:
    """``n`` cases, at least one of every kind (the label after the last colon, digits dropped)."""
    by_kind: dict[str, list[Case]] = {}
    for case in cases:
        by_kind.setdefault(case.label.rsplit(":", 1)[-1].rstrip("0123456789"), []).append(case)
    rng = random.Random(seed)
    chosen = [rng.choice(group) for group in by_kind.values()]
    rest = [c for c in cases if c not in chosen]
    return chosen + rng.sample(rest, max(0, min(n - len(chosen), len(rest))))


def test_the_zoo_exercises_every_codec_and_float_width(lab):
    zoo, _, _ = lab
    assert zoo.codecs_used() == CODECS
    dtypes = set()
    for path in zoo.deltas.values():
        info = sparsestitch.info(path)
        dtypes |= {t.dtype for t in info.tensors if t.kind != "base"}
    assert {"BF16", "F16", "F32", "F64"} <= dtypes


def test_bit_flips_anywhere_are_detected(lab):
    zoo, _, _ = lab
    rng = random.Random(1)
    for label in ("mask", "d0.01", "d1.0", "lowrank"):
        data = zoo.deltas[label].read_bytes()
        tally = run_all(lab, label, bitflip_cases(label, data, rng, per_region=2))
        # No single-bit flip gets past the checksums: every one is refused.
        assert tally.cases["detected"] == tally.cases["tried"]


def test_flips_in_a_payload_name_the_tensor_and_leave_info_working(lab):
    zoo, ctx, pristine = lab
    data = zoo.deltas["mask"].read_bytes()
    cases = [c for c in bitflip_cases("mask", data, random.Random(2), per_region=1)
             if c.tensor is not None]
    assert len(cases) >= 4
    for case in cases:
        outcomes = run_case(case, ctx, pristine["mask"])
        assert outcomes["info"][0] == "identical"  # info reads no payload
        for op in ("verify", "verify_base", "restore", "stitch"):
            assert outcomes[op][0] == "detected", (case.label, op, outcomes[op])
            assert "ChecksumError" in outcomes[op][1] and repr(case.tensor) in outcomes[op][1]


def test_truncation_at_every_region_is_detected(lab):
    zoo, _, _ = lab
    for label in ("mask", "d0.5"):
        cases = truncation_cases(label, zoo.deltas[label].read_bytes())
        tally = run_all(lab, label, cases)
        assert tally.cases["detected"] == tally.cases["tried"] >= 30


def test_container_header_edits_are_detected(lab):
    zoo, _, _ = lab
    cases = container_cases("mask", DeltaImage.read(zoo.deltas["mask"]))
    tally = run_all(lab, "mask", cases)
    # A 2-d shape for a U8 entry of the same length reads identically; everything else is refused.
    assert tally.cases["detected"] >= tally.cases["tried"] - 1


def test_resealed_header_edits_are_detected_or_read_as_written(lab):
    zoo, _, _ = lab
    cases = header_cases("d0.01", DeltaImage.read(zoo.deltas["d0.01"]))
    tally = run_all(lab, "d0.01", sample(cases, 110, seed=3))
    assert tally.cases["detected"] >= 0.9 * tally.cases["tried"]


def test_hostile_payloads_reach_the_decoders_and_are_refused(lab):
    zoo, _, _ = lab
    cases = {label: decoder_cases(label, zoo.deltas[label]) for label in ("mask", "d0.01")}
    labels = {c.label.rsplit(":", 1)[-1] for group in cases.values() for c in group}
    for kind in ("out-of-range-as-rice", "out-of-range-as-csr", "unsorted-as-gaps",
                 "repeated-as-gaps", "one-more-as-bitmap", "values-lying-frame",
                 "values-huge-frame", "tau-exception-out-of-range"):
        assert kind in labels
    for label, group in cases.items():
        tally = run_all(lab, label, sample(group, 50, seed=4))
        # Other bytes in place of raw or xor values make a valid file with other values: those
        # are "faithful" (decoded exactly as the reference reader does); the rest are refused.
        assert tally.cases["detected"] >= 0.75 * tally.cases["tried"]


def test_random_garbage_behind_valid_checksums(lab):
    """Payload bits flipped and random header fields replaced, checksums recomputed: every file
    is refused or, where it is still valid, read exactly as the reference reader reads it."""
    zoo, _, _ = lab
    rng = random.Random(6)
    for label in ("mask", "d0.01", "lowrank"):
        image = DeltaImage.read(zoo.deltas[label])
        cases = resealed_payload_cases(label, image, rng, 20)
        cases += [random_header_case(label, image, rng) for _ in range(20)]
        tally = run_all(lab, label, cases)
        assert tally.cases["detected"] >= 5


@pytest.mark.parametrize("edit, error", [
    (lambda img, name: img.record(name).update(count=1 << 40), "DeltaFormatError"),  # > numel
    (lambda img, name: img.record(name).update(count=1 << 40, shape=[1 << 40]), "ResourceLimitError"),
    (lambda img, name: img.record(name).update(shape=[1 << 45]), "ResourceLimitError"),
    (lambda img, name: img.record(name)["values"].update(raw_nbytes=1 << 40), "ResourceLimitError"),
    (lambda img, name: img.header.update(format_version=True), "DeltaFormatError"),
])
def test_typical_hostile_fields_give_the_documented_error(lab, edit, error):
    zoo, ctx, _ = lab
    image = DeltaImage.read(zoo.deltas["d0.01"])
    name = next(r["name"] for r in image.header["tensors"] if r["kind"] == "sparse")
    edit(image, name)
    path = ctx.scratch / "typical.delta"
    path.write_bytes(image.to_bytes())
    with pytest.raises(sparsestitch.SparsestitchError) as caught:
        sparsestitch.verify(path)
    assert type(caught.value).__name__ == error
    assert caught.value.path == str(path) and str(path) in str(caught.value)
    path.unlink()


@pytest.mark.parametrize("part, codec", [("values", ["raw"]), ("values", {"raw": 1}),
                                         ("positions", {"codec": "rice"}), ("positions", ["rice"]),
                                         ("values", None)])
def test_a_codec_that_is_not_a_name_is_refused_by_every_command(lab, part, codec):
    """A list or object as a codec made every command, info included, fail with
    ``TypeError: unhashable``; it is refused on opening, naming the file and the tensor."""
    zoo, ctx, _ = lab
    image = DeltaImage.read(zoo.deltas["d0.01"])
    name = next(r["name"] for r in image.header["tensors"] if r["kind"] == "sparse")
    image.record(name)[part]["codec"] = codec
    path = ctx.scratch / "codec.delta"
    path.write_bytes(image.to_bytes())
    out = ctx.scratch / "codec.out"
    runs = {"info": lambda: sparsestitch.info(path),
            "verify": lambda: sparsestitch.verify(path),
            "verify --base": lambda: sparsestitch.verify(path, base=zoo.base),
            "restore": lambda: sparsestitch.restore(zoo.base, path, out),
            "restore --max-memory": lambda: sparsestitch.restore(zoo.base, path, out,
                                                                 max_memory="4KiB"),
            "stitch": lambda: sparsestitch.stitch(zoo.base, [zoo.other, path], out)}
    for op, run in runs.items():
        with pytest.raises(DeltaFormatError) as caught:
            run()
        assert (caught.value.path, caught.value.tensor) == (str(path), name), op
        assert "codec must be a codec name" in str(caught.value), op
        assert not out.exists()
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 2 and f"file {str(path)!r}, tensor {name!r}" in result.output
    path.unlink()


@pytest.mark.parametrize("max_memory", [None, "4KiB"])
def test_an_unknown_value_codec_is_named_on_every_restore_path(lab, max_memory):
    """With a tiny --max-memory records are decoded row block by row block, where an unknown
    value codec was reported without the file's name."""
    zoo, ctx, _ = lab
    image = DeltaImage.read(zoo.deltas["d0.5"])
    out = ctx.scratch / "unknown-codec.out"
    path = ctx.scratch / "unknown-codec.delta"
    for record in (r for r in image.header["tensors"] if r["kind"] == "sparse" and r["count"]):
        copy = image.copy()
        copy.record(record["name"])["values"]["codec"] = "zigzag"
        path.write_bytes(copy.to_bytes())
        for run in (lambda: sparsestitch.restore(zoo.base, path, out, max_memory=max_memory),
                    lambda: sparsestitch.stitch(zoo.base, [zoo.other, path], out,
                                                max_memory=max_memory)):
            with pytest.raises(DeltaFormatError, match="unknown value codec 'zigzag'") as caught:
                run()
            assert (caught.value.path, caught.value.tensor) == (str(path), record["name"])
            assert not out.exists()
        args = ["restore", str(zoo.base), str(path), "-o", str(out)]
        args += ["--max-memory", max_memory] if max_memory else []
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and f"file {str(path)!r}, tensor {record['name']!r}" \
            in result.output, result.output
    path.unlink()


# ---------------------------------------------------------------------------------------------
# The base side


def test_damaged_base_checkpoint_is_refused_or_reads_identically(lab):
    zoo, ctx, pristine = lab
    data = zoo.base.read_bytes()
    tally = Tally()
    for case in base_cases(data, random.Random(5), per_region=2):
        tally.add(case, run_base_case(case, zoo.deltas["mask"], ctx, pristine["mask"]))
    assert not tally.failures, tally.failures[:5]
    assert tally.cases["detected"] >= 0.9 * tally.cases["tried"]


def test_a_base_one_bit_off_in_one_tensor_is_a_base_mismatch(lab, tmp_path):
    zoo, _, _ = lab
    tensors = zoo_model()
    tensors["mlp.f32"].view(torch.int32)[3, 7] ^= 1
    base = save_checkpoint(tmp_path / "other-base.safetensors", tensors)
    delta = zoo.deltas["d0.5"]
    for run in (lambda out: sparsestitch.restore(base, delta, out),
                lambda out: sparsestitch.stitch(base, [delta, zoo.other], out),
                lambda out: sparsestitch.verify(delta, base=base)):
        out = tmp_path / "out.safetensors"
        with pytest.raises(BaseMismatchError) as caught:
            run(out)
        assert caught.value.tensor == "mlp.f32" and caught.value.path == str(delta)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-base.safetensors"]


def test_damaged_sharded_base_folder_names_the_broken_file(lab, tmp_path):
    zoo, _, _ = lab
    folder = save_checkpoint(tmp_path / "base", zoo_model(), shards=3)
    delta = tmp_path / "sharded.delta"
    sparsestitch.compress(folder, zoo.finetunes[0], delta, density=0.05)
    index = folder / "model.safetensors.index.json"
    shard = folder / "model-00002-of-00003.safetensors"
    good_index, good_shard = index.read_bytes(), shard.read_bytes()
    damages = [
        (index, good_index[:len(good_index) // 2], index),
        (index, json.dumps({"weight_map": {"ghost": "model-00009-of-00003.safetensors"}}).encode(),
         folder / "model-00009-of-00003.safetensors"),
        (index, json.dumps({"weight_map": {"x": "../escape.safetensors"}}).encode(), index),
        (index, b"\xff\xfe not json", index),
        (shard, good_shard[:len(good_shard) - 3], shard),
        (shard, good_shard[:5], shard),
    ]
    for target, content, named in damages:
        target.write_bytes(content)
        out = tmp_path / "out"
        with pytest.raises(CheckpointError) as caught:
            sparsestitch.restore(folder, delta, out)
        assert caught.value.path == str(named), caught.value
        assert not out.exists()
        target.write_bytes(good_index if target == index else good_shard)
    sparsestitch.restore(folder, delta, tmp_path / "out")  # intact again


# ---------------------------------------------------------------------------------------------
# Bounded resources


def test_crafted_huge_sizes_are_refused_before_allocating(lab, tmp_path):
    zoo, _, _ = lab
    image = DeltaImage.read(zoo.deltas["mask"])
    good = image.to_bytes()
    crafted = {}

    def craft(label, edit):
        copy = image.copy()
        edit(copy)
        crafted[label] = copy.to_bytes()

    crafted["length-2^63"] = (1 << 63).to_bytes(8, "little") + good[8:]
    crafted["length-90MiB"] = (90 << 20).to_bytes(8, "little") + good[8:]
    craft("added-2^31-elements", lambda img: img.record("head.new").update(shape=[1 << 31],
                                                                           count=1 << 31))
    craft("added-2^40-elements", lambda img: img.record("head.new").update(shape=[1 << 40],
                                                                           count=1 << 40))
    craft("count-2^40", lambda img: img.record("rows.bf16").update(count=1 << 40))
    craft("bitmap-2^40-bits", lambda img: img.record("pruned.f32").update(shape=[1 << 40]))
    craft("csr-2^31-rows", lambda img: img.record("rows.bf16").update(shape=[(1 << 31) - 1, 1]))
    craft("frame-declares-16GiB", lambda img: img.record("rows.bf16")["values"].update(
        raw_nbytes=16 << 30))
    # Valid by itself (a delta for a base with such a tensor): only the base can refuse it.
    craft("sparse-2^44-elements", lambda img: img.record("mlp.f32").update(shape=[1 << 44]))
    jobs = []
    for label, data in crafted.items():
        path = tmp_path / f"{label}.delta"
        path.write_bytes(data)
        for op in ("info", "verify", "restore"):
            jobs.append({"label": label, "op": op, "delta": path, "base": zoo.base,
                         "out": tmp_path / f"{label}.out"})
    measured = measure(jobs)
    for job, result in zip(jobs, measured["results"]):
        assert result["peak"] < 16 << 20, (job["label"], job["op"], result["peak"])
        if job["op"] == "info" or (job["op"] == "verify" and job["label"] == "sparse-2^44-elements"):
            assert result["status"] in ("ok", "error"), result
            continue  # info reads the header only; the declared sizes are refused on decoding
        assert result["status"] == "error", (job["label"], job["op"], result)
        assert result["path"] == str(job["delta"]), result
    assert measured["maxrss"] < 1 << 30
    assert not list(tmp_path.glob("*.out"))


def test_memory_is_a_small_multiple_of_what_a_legitimate_file_describes(tmp_path):
    base = {"w": torch.randn(64, 64)}
    tune = {"w": base["w"] + 1, "big.added": torch.zeros(1 << 22)}  # 16 MiB, zstd makes it tiny
    save_checkpoint(tmp_path / "base.safetensors", base)
    save_checkpoint(tmp_path / "ft.safetensors", tune)
    delta = tmp_path / "ft.delta"
    sparsestitch.compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", delta,
                          density=1.0)
    described = 4 << 22
    assert delta.stat().st_size < described / 1000
    jobs = [{"op": op, "delta": delta, "base": tmp_path / "base.safetensors",
             "out": tmp_path / f"{op}.safetensors"} for op in ("verify", "restore")]
    measured = measure(jobs)
    for result in measured["results"]:
        assert result["status"] == "ok", result
        assert result["peak"] < 8 * described, result["peak"] / described
    assert (tmp_path / "restore.safetensors").stat().st_size > described


def _add_record(image: DeltaImage, record: dict, payload: bytes) -> None:
    image.header["tensors"].append(dict(record, positions_nbytes=0, values_nbytes=len(payload),
                                        payload_xxh3="0" * 16))
    image.entries[record["name"]] = {"dtype": "U8"}
    image.payloads[record["name"]] = payload


def test_a_tiny_delta_cannot_make_verify_or_restore_allocate_what_it_declares(tmp_path):
    """Issue 19, item 9: kilobytes that declare gigabytes (a 1-bit quant record of every
    element, an added tensor of zeros) are decoded in runs within --max-memory: peak resident
    memory over the interpreter stays under the budget (+ 64 MiB of slack), whatever the file
    declares."""
    from sparsestitch.delta.codecs.base import pack_stream
    from sparsestitch.delta.codecs.quant import QuantValues

    base = {"w": torch.randn(64, 64)}
    save_checkpoint(tmp_path / "base.safetensors", base)
    good = tmp_path / "good.delta"
    sparsestitch.compress(tmp_path / "base.safetensors", tmp_path / "base.safetensors", good,
                          masks={})
    n = 1 << 28
    codes, codes_config = pack_stream(np.zeros(n // 8, np.uint8))
    scales, scales_config = pack_stream(np.array([0x3F80], "<u2").view(np.uint8))  # bf16 1.0
    empty, empty_config = pack_stream(b"")
    quant = {"codec": "quant", "bits": 1, "group": 0, "scale_dtype": "BF16", "exceptions": 0,
             "codes": codes_config, "codes_nbytes": len(codes), "scales": scales_config,
             "scales_nbytes": len(scales), "exc_index": empty_config, "exc_index_nbytes": 0,
             "exc_bits": empty_config, "exc_bits_nbytes": 0, "max_abs_error": 0.0,
             "error_sq": 0.0}
    assert QuantValues().codec_id == "quant"
    crafted = DeltaImage.read(good)
    crafted.header["format_version"] = 2
    _add_record(crafted, {"name": "huge.quant", "dtype": "F32", "shape": [n], "kind": "sparse",
                          "base_xxh3": "0" * 16, "count": n, "positions": {"codec": "all"},
                          "values": quant}, codes + scales)
    quant_delta = tmp_path / "quant.delta"
    quant_delta.write_bytes(crafted.to_bytes())
    zeros, zeros_config = pack_stream(np.zeros(n, np.uint8))
    crafted = DeltaImage.read(good)
    _add_record(crafted, {"name": "huge.added", "dtype": "U8", "shape": [n], "kind": "added",
                          "base_xxh3": None, "count": n, "positions": {"codec": "all"},
                          "values": {"codec": "raw", **zeros_config}}, zeros)
    added_delta = tmp_path / "added.delta"
    added_delta.write_bytes(crafted.to_bytes())
    assert quant_delta.stat().st_size < 64 << 10 and added_delta.stat().st_size < 64 << 10
    budget = 64 << 20
    jobs = [{"op": "verify", "delta": quant_delta, "max_memory": budget},
            {"op": "verify", "delta": added_delta, "max_memory": budget},
            {"op": "verify", "delta": added_delta, "base": tmp_path / "base.safetensors",
             "max_memory": budget},
            {"op": "restore", "delta": added_delta, "base": tmp_path / "base.safetensors",
             "out": tmp_path / "restored.safetensors", "max_memory": budget}]
    measured = measure(jobs, address_space=4 << 30)
    for job, result in zip(jobs, measured["results"]):
        assert result["status"] == "ok", (job, result)
        assert result["peak"] < budget, (job, result["peak"] >> 20)
    assert measured["maxrss"] - measured["baseline"] < budget + (64 << 20), (
        (measured["maxrss"] - measured["baseline"]) >> 20)
    restored = tmp_path / "restored.safetensors"
    assert restored.stat().st_size > n


def test_a_stored_record_is_decoded_once_however_many_blocks(tmp_path, monkeypatch):
    """Issue 19, item 10: a record too large for --max-memory is decoded once, in order,
    alongside the row blocks -- each of its streams opened once -- not once per block."""
    from sparsestitch.delta.codecs import streams

    base = {"w": torch.randn(2048, 1024)}
    tune = {"w": base["w"] + 0.01 * torch.randn(2048, 1024)}
    save_checkpoint(tmp_path / "base.safetensors", base)
    save_checkpoint(tmp_path / "ft.safetensors", tune)
    for options in ({"lossless": True}, {"density": 1.0, "bits": 2}):
        delta = tmp_path / "ft.delta"
        sparsestitch.compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", delta,
                              overwrite=True, **options)
        whole = sparsestitch.restore(tmp_path / "base.safetensors", delta,
                                     tmp_path / "whole.safetensors", overwrite=True)
        opened = []
        real = streams.open_stream
        monkeypatch.setattr(streams, "open_stream",
                            lambda *args, **kwargs: opened.append(1) or real(*args, **kwargs))
        blocks = sparsestitch.restore(tmp_path / "base.safetensors", delta,
                                      tmp_path / "blocks.safetensors", max_memory="1MiB",
                                      overwrite=True)
        monkeypatch.setattr(streams, "open_stream", real)
        assert blocks.read_bytes() == whole.read_bytes()
        # 8 MiB in blocks of 256 KiB: each value stream opened once, the positions stream
        # twice (a first pass counts positions per row to cut the blocks), not 32 times
        assert 1 <= len(opened) <= 6, (options, len(opened))


def test_resource_limit_error_is_a_delta_format_error():
    assert issubclass(ResourceLimitError, sparsestitch.DeltaFormatError)
