"""The delta container (format.py) and the safetensors layout under it (safetensors_file.py)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file
from safetensors.torch import load_file

import sparsestitch
from sparsestitch.core.dtypes import SAFETENSORS_DTYPES, dtype
from sparsestitch.delta.format import (FORMAT_NAME, HEADER_HASH_KEY, HEADER_KEY, DeltaReader,
                                       DeltaWriter, Record, encode_record)
from sparsestitch.checkpoint.safetensors_file import encode_header, read_header
from sparsestitch.core.sizes import numel as count_elements

from .conftest import bits

META = {"method": "test", "density": 0.5, "sources": {"base": "b", "finetuned": "f"}}


def xxh3(data) -> str:
    """Checksums recomputed independently of sparsestitch.delta.format.digest."""
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(data).tobytes())


def random_bits(rng, dt, shape):
    return rng.integers(0, 1 << 8 * dt.itemsize, shape, dtype=np.uint64).astype(dt.bits)


def make_tensors():
    """``{name: (dtype name, base bits or None, fine-tuned bits or None, kept positions)}``.

    Fine-tuned None: unchanged ("base" record); base None: added by the fine-tune.
    """
    rng = np.random.default_rng(7)
    tensors = {}
    for name, dt_name, shape, positions in [
        ("a.sparse", "BF16", (12, 10), np.sort(rng.choice(120, 15, replace=False))),
        ("d.scalar", "F64", (), np.array([0])),
        ("f.dense", "F16", (5, 5), np.arange(25)),
        ("g.ints", "I32", (40,), np.array([0, 3, 39])),
    ]:
        dt = dtype(dt_name)
        base = random_bits(rng, dt, shape)
        finetuned = base.copy().reshape(-1)
        finetuned[positions] = random_bits(rng, dt, positions.size)
        tensors[name] = (dt_name, base, finetuned.reshape(shape), positions)
    tensors["b.unchanged"] = ("F32", random_bits(rng, dtype("F32"), (7,)), None, np.arange(0))
    tensors["c.added"] = ("I64", None, random_bits(rng, dtype("I64"), (3, 2)), np.arange(6))
    tensors["e.empty_added"] = ("F16", None, np.zeros((0, 4), np.uint16), np.arange(0))
    return tensors


def write_delta(path, tensors) -> list[Record]:
    writer = DeltaWriter(path)
    records = []
    for name, (dt_name, base, finetuned, positions) in tensors.items():
        dt = dtype(dt_name)
        if finetuned is None:
            record, payload = Record(name, dt_name, base.shape, "base", xxh3(base)), b""
        else:
            flat = finetuned.reshape(-1)
            base_kept = None if base is None else base.reshape(-1)[positions]
            record, payload = encode_record(name, dt, finetuned.shape, positions, flat[positions],
                                            base_kept, None if base is None else xxh3(base))
        writer.add(record, payload)
        records.append(record)
    writer.close(META)
    return records


@pytest.fixture
def delta(tmp_path):
    tensors = make_tensors()
    path = tmp_path / "x.delta"
    return path, tensors, write_delta(path, tensors)


def data_area(path) -> tuple[dict, int]:
    """The safetensors header entries and where the data area starts, parsed by hand."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + size]), 8 + size


def test_every_record_kind_roundtrips(delta):
    path, tensors, written = delta
    assert {r.kind for r in written} == {"sparse", "base", "added"}
    with DeltaReader(path) as reader:
        assert reader.records == written
        assert reader.record("nope") is None
        for name, (dt_name, base, finetuned, positions) in tensors.items():
            record = reader.record(name)
            shape = (base if finetuned is None else finetuned).shape
            assert (record.dtype, record.shape) == (dt_name, shape)
            if record.kind == "base":
                assert record.nbytes == 0 and record.base_xxh3 == xxh3(base)
                continue
            if record.kind == "added":  # docs/format.md section 3: every element, all + raw
                assert record.base_xxh3 is None and record.count == finetuned.size
                assert (record.positions["codec"], record.values["codec"]) == ("all", "raw")
            got_positions, got_bits = reader.decode(record, base)
            np.testing.assert_array_equal(got_positions, positions)
            assert got_bits.dtype == dtype(dt_name).bits
            np.testing.assert_array_equal(got_bits, finetuned.reshape(-1)[positions])


def test_reading_one_tensor_reads_only_its_bytes(delta, monkeypatch):
    from sparsestitch.delta import format as delta_format

    path, tensors, _ = delta
    entries, data_start = data_area(path)
    ranges = []
    real_pread = delta_format.pread_bytes

    def logged(fd, nbytes, offset):
        data = real_pread(fd, nbytes, offset)
        ranges.append((offset, offset + len(data)))
        return data
    monkeypatch.setattr(delta_format, "pread_bytes", logged)
    with DeltaReader(path) as reader:
        for name in ("a.sparse", "g.ints", "c.added"):
            ranges.clear()
            begin, end = (data_start + o for o in entries[name]["data_offsets"])
            base = tensors[name][1]
            reader.decode(reader.record(name), base)
            assert ranges and all(begin <= lo <= hi <= end for lo, hi in ranges), name
            assert sum(hi - lo for lo, hi in ranges) == end - begin


def test_delta_is_a_safetensors_file_listing_the_stored_records(delta):
    path, _, written = delta
    stored = [r for r in written if r.kind != "base"]
    with safe_open(str(path), "np") as f, DeltaReader(path) as reader:
        assert sorted(f.keys()) == sorted(r.name for r in stored)
        for record in stored:
            tensor = f.get_tensor(record.name)
            assert tensor.dtype == np.uint8 and tensor.shape == (record.nbytes,)
            assert tensor.tobytes() == reader.payload(record)
            assert xxh3(tensor) == record.payload_xxh3
        metadata = f.metadata()
    assert set(metadata) == {HEADER_KEY, HEADER_HASH_KEY}
    assert metadata[HEADER_HASH_KEY] == xxhash.xxh3_64_hexdigest(metadata[HEADER_KEY].encode())
    header = json.loads(metadata[HEADER_KEY])
    # sorted keys and no whitespace make files byte-reproducible (docs/format.md section 2)
    assert metadata[HEADER_KEY] == json.dumps(header, sort_keys=True, separators=(",", ":"))
    assert header["format"] == FORMAT_NAME and header["format_version"] == 1
    assert {k: header[k] for k in META} == META
    assert [t["name"] for t in header["tensors"]] == [r.name for r in written]
    # payloads lie in record order from offset 0, and the JSON is padded with spaces to 8 bytes
    entries, data_start = data_area(path)
    offsets = [entries[r.name]["data_offsets"] for r in stored]
    assert [begin for begin, _ in offsets] == [0] + [end for _, end in offsets[:-1]]
    assert offsets[-1][1] == path.stat().st_size - data_start
    raw = path.read_bytes()
    assert data_start % 8 == 0 and raw[:data_start].rstrip(b" ").endswith(b"}")
    assert json.loads(raw[8:data_start]) == entries


def test_writer_is_deterministic(tmp_path):
    write_delta(tmp_path / "one.delta", make_tensors())
    write_delta(tmp_path / "two.delta", make_tensors())
    assert (tmp_path / "one.delta").read_bytes() == (tmp_path / "two.delta").read_bytes()


def test_writer_publishes_only_on_close(tmp_path):
    path = tmp_path / "x.delta"
    record, payload = encode_record("w", dtype("U8"), (4,), np.arange(4),
                                    np.arange(4, dtype=np.uint8), None, None)
    writer = DeltaWriter(path)
    writer.add(record, payload)
    with pytest.raises(ValueError, match="added twice"):
        writer.add(record, payload)
    with pytest.raises(ValueError, match="payload"):
        writer.add(Record("v", "U8", (4,), "added", None, 4, {}, {}, 1, 1, "0" * 16), b"x")
    assert not path.exists()
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    writer = DeltaWriter(path)
    writer.add(record, payload)
    assert writer.close({}) == path.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["x.delta"]


def test_compress_writes_every_header_field(zoo, tmp_path):
    path = tmp_path / "ft1.delta"
    sparsestitch.compress(zoo["base"], zoo["ft1"], path, density=0.1)
    with safe_open(str(path), "np") as f:
        header = json.loads(f.metadata()[HEADER_KEY])
    codecs_used = {t["values"]["codec"] for t in header["tensors"] if t["kind"] != "base"}
    assert header["format"] == FORMAT_NAME  # the lowest version that holds the codecs used
    assert header["format_version"] == (3 if "ulp" in codecs_used else 1)
    assert header["library_version"] == sparsestitch.__version__
    assert header["method"] == "topk-fidelity" and header["density"] == 0.1
    assert set(header["fidelity"]) >= {"lossless", "relative_error", "energy_kept",
                                       "bits_per_parameter"}
    assert header["sources"] == {"base": "base.safetensors", "finetuned": "ft1.safetensors"}
    identity = [[t["name"], t["dtype"], t["shape"], t["base_xxh3"]] for t in header["tensors"]
                if t["kind"] != "added"]
    assert header["base_identity"] == xxhash.xxh3_64_hexdigest(
        json.dumps(identity, separators=(",", ":")).encode())
    assert 0 < header["kept"] <= header["candidates"]
    base = load_file(zoo["base"])
    assert sorted(t["name"] for t in header["tensors"]) == sorted(base)
    with DeltaReader(path) as reader:
        for item in header["tensors"]:
            assert item["base_xxh3"] == xxh3(bits(base[item["name"]])), item["name"]
            if item["kind"] != "base":
                assert item["payload_xxh3"] == xxh3(np.frombuffer(
                    reader.payload(reader.record(item["name"])), np.uint8))


def test_compress_is_deterministic(zoo, tmp_path):
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        sparsestitch.compress(zoo["base"], [zoo["ft1"], zoo["ft2"]],
                              [tmp_path / folder / "ft1.delta", tmp_path / folder / "ft2.delta"],
                              density=0.05)
    for name in ("ft1.delta", "ft2.delta"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert (tmp_path / "one/ft1.delta").read_bytes() != (tmp_path / "one/ft2.delta").read_bytes()


# -- safetensors_file -----------------------------------------------------------------------------

@st.composite
def safetensors_layouts(draw):
    names = draw(st.lists(st.text(min_size=1, max_size=6).filter(lambda n: n != "__metadata__"),
                          max_size=5, unique=True))
    entries = []
    for name in names:
        dt = dtype(draw(st.sampled_from(SAFETENSORS_DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        numel = count_elements(shape)
        entries.append((name, dt.name, shape, numel * dt.itemsize))
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=10), max_size=3))
    return entries, metadata


@settings(max_examples=40, deadline=None)
@given(safetensors_layouts())
def test_encode_header_and_read_header_agree_with_the_reference_reader(tmp_path_factory, layout):
    entries, metadata = layout
    path = tmp_path_factory.getbasetemp() / "layout.safetensors"  # one file, rewritten per example
    header = encode_header(entries, metadata)
    path.write_bytes(header + bytes(sum(e[3] for e in entries)))
    assert len(header) % 8 == 0
    with open(path, "rb") as handle:
        parsed = read_header(handle, path, path.stat().st_size)
    assert parsed.data_start == len(header)
    assert parsed.metadata == (metadata or {})
    at = parsed.data_start
    for (name, dt_name, shape, nbytes), entry in zip(entries, parsed.entries.values()):
        assert (entry.name, entry.dtype, entry.shape, entry.start, entry.nbytes) == \
            (name, dt_name, shape, at, nbytes)
        at += nbytes
    with safe_open(str(path), "np") as f:  # the reference implementation accepts it
        assert sorted(f.keys()) == sorted(e[0] for e in entries)
        assert (f.metadata() or {}) == (metadata or {})


def test_read_header_reads_files_written_by_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones((), np.int8),
               "z": np.zeros((0, 2), np.float64)}
    save_file(tensors, str(path), metadata={"k": "v"})
    with open(path, "rb") as handle:
        parsed = read_header(handle, path, path.stat().st_size)
    assert parsed.metadata == {"k": "v"}
    raw = path.read_bytes()
    for name, array in tensors.items():
        entry = parsed.entries[name]
        assert entry.shape == array.shape and entry.nbytes == array.nbytes
        assert raw[entry.start:entry.start + entry.nbytes] == array.tobytes()
