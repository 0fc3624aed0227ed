"""Exact records written a run at a time through temporary files (tensors too large for the
memory budget, stored losslessly): the streams against the codecs' own decoders, and
compress end to end within a budget far below the tensors' whole selections."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sparsestitch
from sparsestitch.checkpoint import Checkpoint
from sparsestitch.core.errors import CheckpointError
from sparsestitch.core.dtypes import dtype as lookup_dtype
from sparsestitch.delta.codecs import value_codec
from sparsestitch.delta.format import DeltaReader, decode_positions, decode_values, digest
from sparsestitch.delta.spooled import BitAppender, SpooledExactRecord
from sparsestitch.localize.streamed_exact import STREAMED_CODECS

from .conftest import save_checkpoint


def _payload_bytes(payload) -> bytes:
    out = io.BytesIO()
    payload.copy_to(out)
    payload.close()
    return out.getvalue()


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(["BF16", "F16", "F32", "F64", "I32", "U8"]),
       codec_id=st.sampled_from(["xor", "raw", "ulp"]),
       numel=st.integers(1, 3000), density=st.sampled_from([0.0, 0.01, 0.3, 0.9, 1.0]),
       runs=st.lists(st.integers(1, 700), min_size=1, max_size=6),
       seed=st.integers(0, 2**31 - 1))
def test_a_record_written_in_runs_decodes_to_the_kept_bits(tmp_path_factory, dtype, codec_id,
                                                           numel, density, runs, seed):
    """Any dtype, any density (every element: positions ``all``), runs of any length at any
    bit offset of the bitmap: positions and values decode by the codecs' whole-record
    decoders to exactly the changed positions and the fine-tuned bits (NaN payloads, -0.0,
    infinities included: the bits are random)."""
    dt = lookup_dtype(dtype)
    codec = value_codec(codec_id)
    if not codec.applies(dt):
        return
    rng = np.random.default_rng(seed)
    base = rng.integers(0, np.iinfo(dt.bits).max, numel, dtype=dt.bits, endpoint=True)
    changed = rng.random(numel) < density
    tune = base.copy()
    noise = rng.integers(1, 64, numel).astype(dt.bits)
    tune[changed] = base[changed] ^ noise[changed]
    count = int(changed.sum())
    if count == 0:
        return
    totals = codec.run_contexts(base[changed], dt)
    record_dir = tmp_path_factory.mktemp("spool")
    builder = SpooledExactRecord(record_dir / "out.delta", "t", dt, (numel,), count, codec,
                                 totals)
    at, bounds = 0, []
    for length in runs * (numel // max(1, sum(runs)) + 1):
        if at >= numel:
            break
        bounds.append((at, min(numel, at + length)))
        at += length
    for lo, hi in bounds:
        marks = changed[lo:hi]
        if builder.bitmap is None:
            builder.add_run(None, tune[lo:hi], base[lo:hi])
        else:
            builder.add_run(marks, tune[lo:hi][marks], base[lo:hi][marks])
    record, payload = builder.finish("0" * 16)
    data = _payload_bytes(payload)
    assert len(data) == record.nbytes and digest(data) == record.payload_xxh3
    assert record.positions["codec"] == ("all" if count == numel else "bitmap")
    positions = decode_positions(record, data)
    np.testing.assert_array_equal(positions, np.flatnonzero(changed))
    values = decode_values(record, data, base[positions])
    np.testing.assert_array_equal(values, tune[changed])
    assert record.values["raw_nbytes"] == count * dt.itemsize


def test_more_values_than_the_first_pass_counted_are_refused(tmp_path):
    """An input that changed between the two passes cannot make a wrong record: a
    CheckpointError naming the tensor (one line on the command line, exit code 2)."""
    dt = lookup_dtype("BF16")
    codec = value_codec("ulp")
    base = np.arange(100, dtype=np.uint16) + 0x3F00
    totals = codec.run_contexts(base[:50], dt)
    builder = SpooledExactRecord(tmp_path / "o.delta", "w", dt, (100,), 50, codec, totals)
    marks = np.zeros(100, bool)
    marks[:60] = True
    with pytest.raises(CheckpointError, match="tensor 'w': more changed elements than the "
                       "first read counted"):
        builder.add_run(marks, base[:60] + 1, base[:60])
    builder.close()
    builder = SpooledExactRecord(tmp_path / "o.delta", "w", dt, (100,), 50, codec, totals)
    builder.add_run(marks[:40], base[:40] + 1, base[:40])
    with pytest.raises(CheckpointError, match="the first read counted 50: the base or the "
                       "fine-tune changed while compress read them"):
        builder.finish("0" * 16)


@pytest.mark.parametrize("spooled", [False, True])
def test_a_quantized_record_kept_count_unlike_the_plans_is_a_changed_input(tmp_path, spooled):
    """The statistics pass counted what a threshold keeps; a selection pass keeping another
    count read different inputs: a CheckpointError naming the tensor, its temporary file
    gone (was an AssertionError)."""
    from sparsestitch.localize.budget import Option
    from sparsestitch.localize.planned import StreamedRecord
    from sparsestitch.localize.selectors import Choice, TuneBlock

    dt = lookup_dtype("BF16")
    base = (np.arange(100, dtype=np.uint16) + 0x3F00)
    record = StreamedRecord("w", dt, (100,), Option(0.5, 4, 50, 100.0, 0.01, 1), 32, 1.0,
                            spool=tmp_path / "o.delta" if spooled else None)
    record.add(TuneBlock("w", dt, 0, base, base + 1), Choice(np.arange(40)))
    with pytest.raises(CheckpointError, match="tensor 'w': 40 elements at or above the "
                       "threshold, the first read counted 50: the base or the fine-tune "
                       "changed while compress read them"):
        record.finish("0" * 16)
    assert list(tmp_path.iterdir()) == []


def _models(tmp_path, tunes: int = 2):
    """A base with a large float32 matrix (2 M elements), a large int32 tensor and a small
    one, and ``tunes`` fine-tunes: the matrix changed in every element in the first, in
    40% of its rows' elements in the others; the int32 tensor in some elements."""
    generator = torch.Generator().manual_seed(3)
    base = {"big": torch.randn(2048, 1023, generator=generator),
            "ids": torch.randint(0, 1 << 30, (1500, 999), generator=generator, dtype=torch.int32),
            "small": torch.randn(8, 8, generator=generator)}
    base_path = save_checkpoint(tmp_path / "base.safetensors", base)
    paths = []
    for i in range(tunes):
        change = 0.01 * (torch.randn(base["big"].shape, generator=generator).abs() + 0.5)
        if i:
            change *= torch.rand(base["big"].shape, generator=generator) < 0.4
        ids = base["ids"].clone()
        ids[::7, ::3] += 1
        paths.append(save_checkpoint(tmp_path / f"ft{i}.safetensors",
                                     {"big": base["big"] + change, "ids": ids,
                                      "small": base["small"] + 0.5}))
    return base_path, paths


def test_lossless_compress_within_a_budget_below_a_tensors_selection_is_exact(tmp_path):
    """Before, a lossless delta of a tensor whose whole selection exceeded the budget was
    refused (an explicit budget) or grew the budget (the default).  Now such a tensor is read
    twice and written through temporary files: within 40 MiB (the float32 matrix alone
    selected whole needs 66 MiB), every fine-tune restores bit for bit; the records are exact
    and in the format's codecs; nothing is left beside the output."""
    base_path, tunes = _models(tmp_path)
    outs = [tmp_path / f"d{i}.delta" for i in range(len(tunes))]
    sparsestitch.compress(base_path, tunes, outs, lossless=True, max_memory="40MiB")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".safetensors")) \
        == ["d0.delta", "d1.delta"]
    for out, tune in zip(outs, tunes):
        with DeltaReader(out) as reader:
            kinds = {r.name: (r.positions["codec"], r.values["codec"]) for r in reader.records}
        assert kinds["big"][0] == ("all" if out.name == "d0.delta" else "bitmap")
        assert kinds["big"][1] in {c.codec_id for c in STREAMED_CODECS}
        restored = sparsestitch.restore(base_path, out, tmp_path / f"r-{out.stem}",
                                        max_memory="40MiB")
        with Checkpoint(tune) as want, Checkpoint(restored) as got:
            for name in want.names:
                np.testing.assert_array_equal(got.read(name), want.read(name), err_msg=name)
        sparsestitch.verify(out, base=base_path, max_memory="40MiB")


def test_streamed_records_are_the_same_bytes_whatever_the_thread_count(tmp_path):
    """The streams of records written through temporary files are compressed by zstd's
    workers, whose output does not depend on how many there are: one thread or two write
    the same delta."""
    base_path, tunes = _models(tmp_path, tunes=1)
    for threads in (1, 2):
        sparsestitch.compress(base_path, tunes, [tmp_path / f"t{threads}.delta"], lossless=True,
                              max_memory="40MiB", threads=threads)
    with DeltaReader(tmp_path / "t1.delta") as reader:
        assert reader.record("big").values["zstd"]  # a compressed stream, streamed
    assert (tmp_path / "t1.delta").read_bytes() == (tmp_path / "t2.delta").read_bytes()


def test_lossless_compress_of_tensors_above_the_budget_holds_the_budget(tmp_path):
    """Peak resident memory (a fresh interpreter): lossless compress of two fine-tunes whose
    2 M-element tensors each need 66 MiB to select whole stays within the budget's 40 MiB
    plus the interpreter's allocator allowance (64 MiB) over the interpreter's own footprint;
    what numpy and Python allocate (tracemalloc) stays under the budget."""
    base_path, tunes = _models(tmp_path)
    script = (
        "import json, sys, tracemalloc\n"
        "import sparsestitch\n"
        "def rss(field):\n"
        "    with open('/proc/self/status') as status:\n"
        "        return [int(l.split()[1]) * 1024 for l in status if l.startswith(field)][0]\n"
        "start = rss('VmRSS:')\n"
        "tracemalloc.start()\n"
        f"sparsestitch.compress({str(base_path)!r}, {[str(t) for t in tunes]!r},\n"
        f"    [{str(tmp_path / 'm0.delta')!r}, {str(tmp_path / 'm1.delta')!r}],\n"
        "    lossless=True, max_memory='40MiB')\n"
        "traced = tracemalloc.get_traced_memory()[1]\n"
        "print(json.dumps({'over': rss('VmHWM:') - start, 'traced': traced}))\n")
    import json
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["traced"] <= 40 << 20, result
    assert result["over"] <= (40 + 64) << 20, result


def test_default_records_too_large_to_hold_are_built_in_temporary_files(tmp_path, monkeypatch):
    """The default target's quantized records that would hold more than a quarter of the
    budget (their bitmap, codes and payload; forced here for every record; with non-finite
    changes, stored as exceptions, the last of their streams) are built in
    temporary files beside the output: the same kept positions and the same quantized values
    as the records built in memory (the restored models are bit-identical), the same error
    reported, the same positions stream (a Rice list made from the bitmap a window at a
    time), nothing left beside the output.  Records that fit
    are built as before: a small budget writes the same bytes."""
    from sparsestitch.localize import planned

    generator = torch.Generator().manual_seed(5)
    base = {"big": torch.randn(2048, 2048, generator=generator),
            "sparse": torch.randn(2048, 2048, generator=generator),
            "small": torch.randn(64, 64, generator=generator)}
    big = base["big"] + 0.01 * torch.randn(2048, 2048, generator=generator)
    big[0, 0], big[1, 1] = float("inf"), float("nan")  # the quant record's exceptions
    changed = {"big": big,
               "sparse": base["sparse"] + 0.05 * torch.randn(2048, 2048, generator=generator)
               * (torch.rand(2048, 2048, generator=generator) < 0.05),
               "small": base["small"] + 0.01}
    base_path = save_checkpoint(tmp_path / "base.safetensors", base)
    tune_path = save_checkpoint(tmp_path / "tune.safetensors", changed)
    sparsestitch.compress(base_path, tune_path, tmp_path / "held.delta")
    sparsestitch.compress(base_path, tune_path, tmp_path / "small-budget.delta",
                          max_memory="40MiB")
    assert (tmp_path / "small-budget.delta").read_bytes() == \
        (tmp_path / "held.delta").read_bytes()
    monkeypatch.setattr(planned.StreamedRecord, "held_bytes",
                        staticmethod(lambda numel, option: 1 << 60))
    sparsestitch.compress(base_path, tune_path, tmp_path / "spooled.delta")
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".delta") \
        == ["held.delta", "small-budget.delta", "spooled.delta"]
    with DeltaReader(tmp_path / "held.delta") as held, \
            DeltaReader(tmp_path / "spooled.delta") as spooled:
        for want, got in zip(held.records, spooled.records):
            assert (got.name, got.kind, got.count) == (want.name, want.kind, want.count)
            if got.kind == "sparse":
                assert got.values["codec"] == want.values["codec"] == "quant"
                assert got.values["error_sq"] == want.values["error_sq"]
                assert got.fidelity == want.fidelity
        # a sparse record's positions as a Rice list made from its bitmap a window at a
        # time, within 5% of the held record's smallest list (here gaps in byte planes)
        sparse_spooled, sparse_held = spooled.record("sparse"), held.record("sparse")
        assert sparse_spooled.positions["codec"] == "rice"
        assert sparse_held.positions["codec"] != "bitmap"
        assert sparse_spooled.positions_nbytes <= 1.05 * sparse_held.positions_nbytes, \
            (sparse_spooled.positions_nbytes, sparse_held.positions_nbytes)
    restored = [sparsestitch.restore(base_path, tmp_path / f"{kind}.delta",
                                     tmp_path / f"{kind}.safetensors")
                for kind in ("held", "spooled")]
    with Checkpoint(restored[0]) as want, Checkpoint(restored[1]) as got:
        for name in want.names:
            np.testing.assert_array_equal(got.read(name), want.read(name), err_msg=name)


def test_a_record_is_spooled_by_what_holding_it_would_cost():
    """The estimate behind the choice: a bitmap's quarter byte an element, the codes' bits
    four times over, and listed positions below a fifth of the elements."""
    from sparsestitch.localize.budget import Option
    from sparsestitch.localize.planned import BITMAP_FROM, StreamedRecord

    numel = 1 << 30  # a 70B model's embedding
    dense = Option(1.0, 4, numel, 0.0, 0.0)
    sparse = Option(0.01, 2, numel // 100, 0.0, 0.0)
    assert StreamedRecord.held_bytes(numel, dense) == numel // 4 + numel * 2
    assert StreamedRecord.held_bytes(numel, sparse) == numel // 4 + numel // 100 + 16 * (numel // 100)
    assert BITMAP_FROM * numel > numel // 100
    assert StreamedRecord.held_bytes(4096, sparse) < (1 << 30) // 4


def _limited(fsize: int):
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so writes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return limit


@pytest.mark.parametrize("spooled", ["lossless", "quantized"])
def test_a_failed_write_of_a_spooled_record_leaves_nothing(tmp_path, spooled):
    """The temporary files of records written through them fail like the output (here a
    file-size limit, which the spools pass first): an :class:`OutputError` naming the output,
    nothing left beside it, the inputs untouched.  Lossless: the exact records of tensors
    above a 33 MiB budget; quantized: every default record forced through the spools."""
    import subprocess
    import sys

    from .support.processes import leftovers, tree_digest

    inputs = tmp_path / "in"
    inputs.mkdir()
    base_path, tunes = _models(inputs, tunes=1)
    before = tree_digest(inputs)
    outs = tmp_path / "out"
    outs.mkdir()
    out = outs / "d.delta"
    options = "lossless=True, max_memory='33MiB'" if spooled == "lossless" else ""
    script = (
        "import sparsestitch\n"
        "from sparsestitch.localize import planned\n"
        "planned.StreamedRecord.held_bytes = staticmethod(lambda numel, option: 1 << 60)\n"
        "try:\n"
        f"    sparsestitch.compress({str(base_path)!r}, {str(tunes[0])!r}, {str(out)!r},"
        f" {options})\n"
        "except sparsestitch.OutputError as exc:\n"
        "    print(exc.path, '|', exc)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          preexec_fn=_limited(64 << 10), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"{out} | "), done.stdout
    assert "File too large" in done.stdout
    assert not out.exists() and leftovers(outs) == []
    assert tree_digest(inputs) == before


@settings(max_examples=80, deadline=None)
@given(numel=st.integers(1, 5000), density=st.sampled_from([0.001, 0.01, 0.1, 0.45]),
       window=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_a_rice_list_made_from_a_bitmap_in_windows_is_the_codecs(numel, density, window, seed):
    """The ``rice`` streams made from a packed bitmap a window at a time, with bit strings
    joined across windows at any bit offset, are the codec's own for the listed positions
    (where the Rice parameter is the same; it is chosen by the same rule)."""
    from unittest import mock

    from sparsestitch.delta.codecs import rice_gaps

    rng = np.random.default_rng(seed)
    marks = rng.random(numel) < density
    if not marks.any():
        return
    packed = np.packbits(marks, bitorder="little")
    with mock.patch.object(rice_gaps, "WINDOW_BYTES", window):
        k, unary_bits, remainder_bits = rice_gaps.bitmap_plan(packed, int(marks.sum()))
        unary, remainders = io.BytesIO(), io.BytesIO()
        streams = BitAppender(unary), BitAppender(remainders)
        rice_gaps.encode_bitmap(packed, k, *streams)
        for stream in streams:
            stream.finish()
    want, config = rice_gaps.RiceGaps().encode(np.flatnonzero(marks), (numel,))
    assert (streams[0].nbits, streams[1].nbits) == (unary_bits, remainder_bits)
    if config["k"] == k:
        assert unary.getvalue() + remainders.getvalue() == want
        assert config["unary_bits"] == unary_bits


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, width=16), min_size=1, max_size=3000),
       st.integers(1, 5), st.data())
def test_whole_bins_kept_energy_is_the_kept_keys_energy(values, blocks, data):
    """A threshold at a key bin's edge keeps whole bins: the kept energy taken from the
    statistics pass (kept_bin_energy) is, bit for bit, what summing the kept keys gives --
    per bin and in total, over a tensor read in several blocks."""
    from sparsestitch.localize.planned import kept_bin_energy
    from sparsestitch.localize.stats import BINS, TensorStats, key_histogram, stats_keys

    dt = lookup_dtype("F16")
    tau = np.array(values, np.float16)
    base = np.zeros(tau.size, np.float16)
    finetuned_bits, base_bits = tau.view(np.uint16), base.view(np.uint16)
    stats = TensorStats.empty("w", dt, tau.size)
    cuts = sorted(data.draw(st.lists(st.integers(0, tau.size), max_size=blocks)))
    edges = [0, *cuts, tau.size]
    for first, end in zip(edges, edges[1:]):
        stats.add(finetuned_bits[first:end], base_bits[first:end], first)
    keys = stats_keys(finetuned_bits, base_bits, dt)
    edges_of_bins = {int(k) >> 16 << 16 for k in keys} | {0, 1 << 16}
    threshold = data.draw(st.sampled_from(sorted(edges_of_bins)))
    counts, summed = np.zeros(BINS, np.int64), np.zeros(BINS, np.float64)
    for first, end in zip(edges, edges[1:]):
        block = keys[first:end]
        key_histogram(block[block >= threshold], counts, summed)
    kept, final = kept_bin_energy(stats.bin_energy, threshold)
    assert final == (threshold > 0)
    if final:
        assert np.array_equal(kept.view(np.uint64), summed.view(np.uint64))
        assert float(kept.sum()) == float(summed.sum())
    assert not kept_bin_energy(stats.bin_energy, threshold + 1)[1]
    assert not kept_bin_energy(None, threshold)[1]
