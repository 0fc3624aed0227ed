"""Damaged and hostile files (:class:`Case`): bit flips, truncations, container and header edits,
resealed payloads, hostile decoder inputs, damaged base checkpoints."""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from sparsestitch.delta.codecs import rice
from sparsestitch.delta.codecs.base import gap_encode, pack_stream, to_planes
from sparsestitch.delta.format import HEADER_HASH_KEY, HEADER_KEY, DeltaReader
from sparsestitch.core.sizes import numel as count_elements

from .images import DeltaImage, regions

# ----------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    """One damaged or hostile delta file and what must happen to it."""

    family: str
    label: str
    data: bytes
    tensor: str | None = None        # the tensor an error must name (None: any or none)
    crafted: bool = False            # checksums were recomputed (a self-consistent container)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def bitflip_cases(source: str, data: bytes, rng: random.Random, per_region: int) -> list[Case]:
    """``per_region`` single-bit flips in each region (all of them where the region is smaller)."""
    cases = []
    for label, start, end, tensor in regions(data):
        bits = range(start * 8, end * 8)
        chosen = bits if len(bits) <= per_region else rng.sample(bits, per_region)
        for bit in chosen:
            cases.append(Case("bitflip", f"{source}:{label}:bit{bit}", flip(data, bit),
                              tensor=tensor if label == "payload" else None))
    return cases


def truncation_cases(source: str, data: bytes) -> list[Case]:
    """Cuts at the start, middle and end of every region, and one byte short of the end."""
    cuts = {0, 1, 7, len(data) - 1}
    for _, start, end, _ in regions(data):
        cuts |= {start, start + 1, (start + end) // 2, end - 1}
    return [Case("truncation", f"{source}:cut{n}", data[:n]) for n in sorted(cuts)
            if 0 <= n < len(data)]


def container_cases(source: str, image: DeltaImage) -> list[Case]:
    """Edits of the safetensors container header (the delta header stays valid)."""
    good = image.to_bytes()
    (size,) = struct.unpack("<Q", good[:8])
    text = good[8:8 + size].rstrip(b" ").decode()
    stored = list(image.entries)
    name = stored[len(stored) // 2]
    cases = []

    def add(label, data):
        cases.append(Case("container", f"{source}:{label}", data))

    def with_text(new_text: str | bytes) -> bytes:
        raw = new_text if isinstance(new_text, bytes) else new_text.encode("utf-8", "surrogatepass")
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + good[8 + size:]

    container = json.loads(text)
    data_len = len(good) - 8 - size

    def edited(edit) -> bytes:
        c = json.loads(text)
        edit(c)
        return with_text(json.dumps(c, separators=(",", ":"), ensure_ascii=False))

    for label, value in (("zero", 0), ("seven", 7), ("short", size - 8), ("long", size + 8),
                         ("file-size", len(good)), ("100MiB+1", (100 << 20) + 1),
                         ("2^63", 1 << 63), ("2^64-1", (1 << 64) - 1)):
        add(f"length-{label}", struct.pack("<Q", value) + good[8:])
    begin, end = container[name]["data_offsets"]
    for label, offsets in (("past-end", [begin, data_len + 64]), ("end-past-end", [data_len, data_len + 8]),
                           ("overlap", [max(begin - 1, 0), end - 1]), ("reversed", [end, begin]),
                           ("huge", [0, 1 << 62]), ("negative", [-8, end]), ("float", [begin + 0.5, end]),
                           ("three", [begin, end, end]), ("string", [str(begin), str(end)])):
        add(f"offsets-{label}", edited(lambda c: c[name].update(data_offsets=offsets)))
    for label, value in (("huge", [1 << 47]), ("shorter", [end - begin - 1]), ("2d", [1, end - begin]),
                         ("negative", [-1]), ("none", None), ("bool", [True]), ("2^64", [1 << 64])):
        add(f"shape-{label}", edited(lambda c: c[name].update(shape=value)))
    for label, value in (("F32", "F32"), ("unknown", "Q8"), ("lower", "u8"), ("none", None), ("int", 3)):
        add(f"dtype-{label}", edited(lambda c: c[name].update(dtype=value)))
    add("entry-not-object", edited(lambda c: c.update({name: [1, 2]})))
    add("entry-missing", edited(lambda c: c.pop(name)))
    add("entry-renamed", edited(lambda c: c.update({name + "x": c.pop(name)})))
    add("entry-extra-empty", edited(lambda c: c.update(
        {"zz.extra": {"dtype": "U8", "shape": [0], "data_offsets": [data_len, data_len]}})))
    add("metadata-missing", edited(lambda c: c.pop("__metadata__")))
    add("metadata-not-object", edited(lambda c: c.update(__metadata__=["x"])))
    add("metadata-value-int", edited(lambda c: c["__metadata__"].update({HEADER_HASH_KEY: 5})))
    add("header-key-missing", edited(lambda c: c["__metadata__"].pop(HEADER_KEY)))
    add("checksum-key-missing", edited(lambda c: c["__metadata__"].pop(HEADER_HASH_KEY)))
    add("checksum-wrong", edited(lambda c: c["__metadata__"].update({HEADER_HASH_KEY: "0" * 16})))
    add("checksum-upper", edited(lambda c: c["__metadata__"].update(
        {HEADER_HASH_KEY: c["__metadata__"][HEADER_HASH_KEY].upper()})))
    add("json-list", with_text("[" + text + "]"))
    add("json-string", with_text(json.dumps(text)))
    add("json-truncated", with_text(text[:len(text) // 2]))
    add("json-trailing-garbage", with_text(text + "x"))
    add("json-two-objects", with_text(text + text))
    add("json-nan", with_text(text.replace('"data_offsets":[', '"data_offsets":[NaN,', 1)))
    add("json-deep", with_text("[" * 100000 + "]" * 100000))
    add("non-utf8", with_text(text.encode().replace(b'"U8"', b'"U\xff"', 1)))
    add("non-utf8-overlong", with_text(text.encode().replace(b'"U8"', b'"U\xc0\xb8"', 1)))
    add("nul-in-json", with_text(text.encode().replace(b":", b":\x00", 1)))
    add("bom", with_text(b"\xef\xbb\xbf" + text.encode()))
    add("surrogate-key", with_text(text.replace(f'"{name}":', f'"{name}\\ud800":', 1)))
    add("surrogate-in-header", edited(lambda c: c["__metadata__"].update(
        {HEADER_KEY: c["__metadata__"][HEADER_KEY].replace('"method":"', '"method":"\ud800')})))
    entry_text = json.dumps({name: container[name]}, separators=(",", ":"))[1:-1]
    add("duplicate-entry", with_text(text[:-1] + "," + entry_text + "}"))
    meta_text = json.dumps({"__metadata__": container["__metadata__"]}, separators=(",", ":"))[1:-1]
    add("duplicate-metadata", with_text(text[:-1] + "," + meta_text + "}"))
    add("padding-not-spaces", struct.pack("<Q", size) + text.encode().ljust(size, b"\x00") + good[8 + size:])
    add("trailing-data", good + b"\x00" * 8)
    add("empty-file", b"")
    add("pickle", b"\x80\x04\x95" + bytes(64))
    return cases


def header_cases(source: str, image: DeltaImage) -> list[Case]:
    """Edits of the delta header and its records, resealed so they get past every checksum."""
    cases = []
    stored = [r for r in image.header["tensors"] if r["kind"] == "sparse"]
    added = [r for r in image.header["tensors"] if r["kind"] == "added"]
    unchanged = [r for r in image.header["tensors"] if r["kind"] == "base"]
    target = max(stored, key=lambda r: r["count"])

    def add(label, edit, *, tensor=None, text=None):
        copy = image.copy()
        if edit is not None:
            edit(copy)
        data = copy.to_bytes(header_text=text(copy) if text else None)
        cases.append(Case("header", f"{source}:{label}", data, tensor=tensor, crafted=True))

    def on(record_name):
        return lambda edit: (lambda img: edit(img.record(record_name)))

    # The header as a whole.
    for label, key, value in (("format", "format", "other.delta"), ("version-2", "format_version", 2),
                              ("version-str", "format_version", "1"), ("version-true", "format_version", True),
                              ("tensors-dict", "tensors", {}), ("tensors-none", "tensors", None),
                              ("tensors-strings", "tensors", ["a"])):
        add(f"header-{label}", lambda img, k=key, v=value: img.header.update({k: v}))
    add("header-not-object", None, text=lambda img: json.dumps(img.header["tensors"]))
    add("header-not-json", None, text=lambda img: img.header_text()[:-3])
    add("header-deep", None, text=lambda img: "[" * 100000 + "]" * 100000)
    add("header-duplicate-key", None,
        text=lambda img: img.header_text()[:-1] + ',"format_version":2}')
    add("header-duplicate-tensors", None,
        text=lambda img: img.header_text()[:-1] + ',"tensors":[]}')
    add("header-surrogate", None, text=lambda img: img.header_text().replace(
        '"method":"', '"method":"\\ud800', 1))
    add("header-raw-surrogate", None, text=lambda img: img.header_text().replace(
        '"method":"', '"method":"\ud800', 1))
    add("tensors-empty", lambda img: img.header.update(tensors=[]) or img.entries.clear())
    add("record-dropped", lambda img: img.header["tensors"].remove(img.record(unchanged[0]["name"])))
    add("record-twice", lambda img: img.header["tensors"].append(dict(img.record(unchanged[0]["name"]))))
    add("record-not-object", lambda img: img.header["tensors"].append(7))
    add("record-name-int", lambda img: img.header["tensors"].append({"name": 5, "kind": "base"}))

    name = target["name"]
    rec = on(name)
    # Record fields of the largest sparse record.
    numel = count_elements(target["shape"])
    for label, key, value in (
            ("count+1", "count", target["count"] + 1), ("count-1", "count", target["count"] - 1),
            ("count-0", "count", 0), ("count-numel", "count", numel),
            ("count-huge", "count", 1 << 40), ("count-neg", "count", -1),
            ("count-true", "count", True), ("count-float", "count", float(target["count"])),
            ("shape-wider", "shape", [target["shape"][0], target["shape"][1] + 1]),
            ("shape-transposed", "shape", target["shape"][::-1]),
            ("shape-flat", "shape", [numel]),
            ("shape-huge", "shape", [1 << 40, 1 << 10]), ("shape-zero-huge", "shape", [0, 1 << 64]),
            ("shape-2^64", "shape", [1 << 64]), ("shape-neg", "shape", [-1, 5]),
            ("shape-65d", "shape", [1] * 65), ("shape-none", "shape", None),
            ("dtype-unknown", "dtype", "Q8"), ("dtype-none", "dtype", None),
            ("dtype-same-width", "dtype", "F16" if target["dtype"] == "BF16" else "BF16"),
            ("dtype-wider", "dtype", "F64"), ("dtype-int", "dtype", "I16"),
            ("kind-base", "kind", "base"), ("kind-added", "kind", "added"),
            ("kind-unknown", "kind", "dense"),
            ("base-xxh3-other", "base_xxh3", "0123456789abcdef"),
            ("base-xxh3-bad", "base_xxh3", "xyz"), ("base-xxh3-none", "base_xxh3", None),
            ("payload-xxh3-bad", "payload_xxh3", "0" * 15),
            ("positions-codec-unknown", ("positions", "codec"), "zigzag"),
            ("positions-codec-none", ("positions", "codec"), None),
            ("positions-codec-list", ("positions", "codec"), ["rice"]),
            ("positions-codec-object", ("positions", "codec"), {"codec": "rice"}),
            ("values-codec-unknown", ("values", "codec"), "delta8"),
            ("values-codec-int", ("values", "codec"), 3),
            ("values-codec-list", ("values", "codec"), ["raw"]),
            ("values-codec-object", ("values", "codec"), {"raw": 1}),
            ("values-codec-none", ("values", "codec"), None),
            ("positions-not-object", "positions", "rice"), ("values-none", "values", None),
            ("split+1", "positions_nbytes", target["positions_nbytes"] + 1),
            ("split-1", "positions_nbytes", target["positions_nbytes"] - 1),
            ("nbytes-huge", "values_nbytes", 1 << 50), ("nbytes-neg", "values_nbytes", -1)):
        def edit(record, key=key, value=value):
            if label.startswith("split"):
                record["values_nbytes"] += record["positions_nbytes"] - value
            if isinstance(key, tuple):
                record[key[0]][key[1]] = value
            else:
                record[key] = value
        add(f"{name}:{label}", rec(edit), tensor=name)
    # Codec configs of every stored record: every field made hostile in turn.
    for record in stored + added:
        for part in ("positions", "values"):
            for key, value in _config_leaves(record[part]):
                if key[-1] == "codec":
                    continue
                for label, bad in _hostile_values(value):
                    def edit(r, part=part, key=key, bad=bad):
                        node = r[part]
                        for k in key[:-1]:
                            node = node[k]
                        node[key[-1]] = bad
                    add(f"{record['name']}:{part}.{'.'.join(key)}={label}", on(record["name"])(edit),
                        tensor=record["name"])
    if unchanged:
        un = unchanged[0]["name"]
        add(f"{un}:kind-sparse", on(un)(lambda r: r.update(kind="sparse")), tensor=un)
        add(f"{un}:base-xxh3-other", on(un)(lambda r: r.update(base_xxh3="0123456789abcdef")), tensor=un)
        add(f"{un}:shape-huge", on(un)(lambda r: r.update(shape=[1 << 44])), tensor=un)
        add(f"{un}:shape-over-limit", on(un)(lambda r: r.update(shape=[1 << 44, 2])), tensor=un)
        # no element, but a dimension past the limit (found by the seed-2 campaign)
        add(f"{un}:shape-empty-huge-dimension", on(un)(lambda r: r.update(shape=[0, 1 << 64])),
            tensor=un)
    if added:
        ad = added[0]["name"]
        add(f"{ad}:kind-sparse", on(ad)(lambda r: r.update(kind="sparse")), tensor=ad)
        add(f"{ad}:count-1", on(ad)(lambda r: r.update(count=r["count"] - 1)), tensor=ad)
        add(f"{ad}:shape-huge", on(ad)(lambda r: r.update(shape=[1 << 40], count=1 << 40)), tensor=ad)
        add(f"{ad}:shape-2^31", on(ad)(lambda r: r.update(shape=[1 << 31], count=1 << 31)), tensor=ad)
        add(f"{ad}:surrogate-name", lambda img: _rename(img, ad, ad + "\ud800"))
        add(f"{ad}:named-like-base", lambda img: _rename(img, ad, name), tensor=None)
    return cases


def resealed_payload_cases(source: str, image: DeltaImage, rng: random.Random, n: int) -> list[Case]:
    """``n`` payloads with 1 to 4 random bits flipped and the checksums recomputed: garbage that
    reaches the decoders (the reference reader says which ones still decode, and to what)."""
    names = [name for name, payload in image.payloads.items() if payload]
    cases = []
    for _ in range(n):
        name = rng.choice(names)
        copy = image.copy()
        payload = copy.payloads[name]
        for _ in range(rng.randint(1, 4)):
            payload = flip(payload, rng.randrange(8 * len(payload)))
        copy.payloads[name] = payload
        cases.append(Case("resealed", f"{source}:{name}:resealed-flips", copy.to_bytes(),
                          tensor=name, crafted=True))
    return cases


_POOL = [0, 1, 2, -1, 7, 8, 31, 32, 33, 1 << 16, (1 << 31) - 1, 1 << 32, 1 << 40, 1 << 44,
         (1 << 44) + 1, 1 << 63, 1 << 64, True, False, None, "", "x", "rice", "raw", "F16",
         1.5, float("inf"), [], {}, [1, 2], [0], {"codec": "rice"}]


def random_header_case(source: str, image: DeltaImage, rng: random.Random) -> Case:
    """One random field anywhere in the delta header replaced by a hostile value, resealed."""
    copy = image.copy()
    node, path = copy.header, []
    while True:  # walk down to a random leaf
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = rng.choice(keys)
        path.append(key)
        if not isinstance(node[key], (dict, list)) or not node[key] or rng.random() < 0.15:
            break
        node = node[key]
    old = node[path[-1]] if path else None
    pool = _POOL + ([old + 1, old - 1, old * 2, old // 2] if type(old) is int else [])
    value = rng.choice(pool)
    if path:
        node[path[-1]] = value
    tensor = None
    if (len(path) >= 3 and path[0] == "tensors" and isinstance(copy.header["tensors"][path[1]], dict)
            and value not in (float("inf"),)):  # Infinity is not JSON: a file-level error
        tensor = image.header["tensors"][path[1]]["name"]
    label = "/".join(map(str, path)) + f"={value!r}"
    # The library names the record's tensor; a renamed record is named by its new name.
    return Case("random-header", f"{source}:{label}", copy.to_bytes(),
                tensor=tensor if path[-1:] != ["name"] else None, crafted=True)


def random_damage_case(source: str, data: bytes, rng: random.Random) -> Case:
    """Unsealed random damage: several flips, a run of random bytes, a cut, or bytes inserted."""
    kind = rng.choice(["flips", "run", "cut", "insert", "zero-run"])
    out = bytearray(data)
    if kind == "flips":
        for _ in range(rng.randint(2, 16)):
            bit = rng.randrange(8 * len(out))
            out[bit // 8] ^= 1 << (bit % 8)
    elif kind in ("run", "zero-run"):
        at, size = rng.randrange(len(out)), rng.randint(1, 64)
        out[at:at + size] = bytes(size) if kind == "zero-run" else rng.randbytes(size)
        out = out[:len(data)]
    elif kind == "cut":
        out = out[:rng.randrange(len(out))]
    else:
        at = rng.randrange(len(out) + 1)
        out[at:at] = rng.randbytes(rng.randint(1, 16))
    return Case("random-damage", f"{source}:{kind}", bytes(out))


def _rename(image: DeltaImage, old: str, new: str) -> None:
    image.record(old)["name"] = new
    image.entries = {new if k == old else k: v for k, v in image.entries.items()}
    image.payloads[new] = image.payloads.pop(old)


def _config_leaves(config, prefix=()):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _config_leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _hostile_values(value):
    if isinstance(value, bool):
        return [("flip", not value), ("int", int(value)), ("none", None)]
    if isinstance(value, int):
        return [("+1", value + 1), ("-1", value - 1), ("huge", 1 << 40), ("2^63", 1 << 63),
                ("neg", -5), ("bool", True), ("float", value + 0.5), ("str", str(value)), ("none", None)]
    return [("none", None), ("int", 1)]


def decoder_cases(source: str, delta: Path) -> list[Case]:
    """Hostile payloads re-encoded with valid checksums: out-of-range, unsorted or repeated
    positions, counts that disagree, lying or corrupt zstd frames, exceptions out of range."""
    cases, image = [], DeltaImage.read(delta)
    with DeltaReader(delta) as reader:
        records = {r.name: r for r in reader.records if r.kind != "base"}
        decoded = {}
        for name, record in records.items():
            payload = reader.payload(record)
            decoded[name] = (reader.positions(record, payload), payload)

    def add(label, name, positions_part=None, positions_config=None, values_part=None,
            values_config=None, count=None):
        copy = image.copy()
        record = copy.record(name)
        payload = copy.payloads[name]
        pos_part = payload[:record["positions_nbytes"]] if positions_part is None else positions_part
        val_part = payload[record["positions_nbytes"]:] if values_part is None else values_part
        if positions_config is not None:
            record["positions"] = positions_config
        if values_config is not None:
            record["values"] = values_config
        if count is not None:
            record["count"] = count
        record["positions_nbytes"], record["values_nbytes"] = len(pos_part), len(val_part)
        copy.payloads[name] = pos_part + val_part
        cases.append(Case("decoder", f"{source}:{name}:{label}", copy.to_bytes(), tensor=name,
                          crafted=True))

    for name, record in records.items():
        positions, payload = decoded[name]
        numel, count = record.numel, record.count
        shape = record.shape
        variants = {}
        if count and numel > count:
            beyond = positions.copy()
            beyond[-1] = numel  # one past the end
            variants["out-of-range"] = beyond
            far = positions.copy()
            far[-1] = numel + 12345
            variants["far-out-of-range"] = far
        if count >= 2:
            swapped = positions.copy()
            swapped[[0, 1]] = swapped[[1, 0]]
            variants["unsorted"] = swapped
            dup = positions.copy()
            dup[1] = dup[0]
            variants["repeated"] = dup
        for label, bad in variants.items():
            for pos_codec in ("rice", "gaps", "csr", "bitmap"):
                encoded = _encode_positions_unchecked(pos_codec, bad, shape)
                if encoded is not None:
                    add(f"{label}-as-{pos_codec}", name, encoded[0], encoded[1])
        if numel > count:
            fewer = positions[:-1] if count else positions
            more = np.union1d(positions, [np.setdiff1d(np.arange(numel), positions)[0]])
            for label, other in (("one-fewer", fewer), ("one-more", more)):
                if other.size == count:
                    continue
                for pos_codec in ("rice", "gaps", "bitmap", "csr"):
                    encoded = _encode_positions_unchecked(pos_codec, other, shape)
                    if encoded is not None:
                        add(f"{label}-as-{pos_codec}", name, encoded[0], encoded[1])
        pos_part = payload[:record.positions_nbytes]
        val_part = payload[record.positions_nbytes:]
        for part_label, part, config, set_part in (
                ("positions", pos_part, record.positions, "positions"),
                ("values", val_part, record.values, "values")):
            for label, bad_part in _stream_attacks(part, config):
                kwargs = {f"{set_part}_part": bad_part}
                add(f"{part_label}-{label}", name, **kwargs)
        # A zstd frame that declares the size the record needs but holds garbage, or a huge size.
        need = count * record.dt.itemsize
        if record.values["codec"] in ("raw", "xor", "ulp") and need:
            liar = _lying_frame(need)
            add("values-lying-frame", name, values_part=liar,
                values_config={"codec": record.values["codec"], "zstd": True, "raw_nbytes": need})
            huge = 1 << 34
            add("values-huge-frame", name, values_part=_lying_frame(huge),
                values_config={"codec": record.values["codec"], "zstd": True, "raw_nbytes": huge})
        if record.values["codec"] == "tau" and count:
            index = gap_encode(np.array([count], np.int64)).astype("<u4")
            index_stream, index_config = pack_stream(to_planes(index))
            bits_stream, bits_config = pack_stream(to_planes(np.zeros(1, record.dt.bits)))
            tau_len = record.values["tau_nbytes"]
            config = dict(record.values, exceptions=1, exc_index=index_config,
                          exc_index_nbytes=len(index_stream), exc_bits=bits_config,
                          exc_bits_nbytes=len(bits_stream))
            add("tau-exception-out-of-range", name,
                values_part=val_part[:tau_len] + index_stream + bits_stream, values_config=config)
    # A tensor named twice in the container after a reseal would be a container case; a record
    # whose payload belongs to another record is a decoder case:
    names = [n for n in records if records[n].kind == "sparse"]
    if len(names) >= 2:
        a, b = names[0], names[1]
        copy = image.copy()
        copy.payloads[a], copy.payloads[b] = copy.payloads[b], copy.payloads[a]
        for x, y in ((a, b), (b, a)):
            rx, ry = image.record(y), copy.record(x)
            for key in ("positions", "values", "positions_nbytes", "values_nbytes", "count"):
                ry[key] = json.loads(json.dumps(rx[key]))
        cases.append(Case("decoder", f"{source}:swapped-payloads", copy.to_bytes(), crafted=True))
    return cases


def _encode_positions_unchecked(codec_id: str, positions: np.ndarray, shape) -> tuple[bytes, dict] | None:
    """Encode possibly invalid positions the way a hostile writer would (None: not expressible)."""
    numel = count_elements(shape)
    if codec_id == "rice":
        gaps = np.diff(positions.astype(np.int64), prepend=-1) - 1
        if (gaps < 0).any():
            return None  # a Rice gap cannot be negative
        k = rice.best_k(gaps.astype(np.uint64))
        unary, rem, bits = rice.encode(gaps.astype(np.uint64), k)
        return unary + rem, {"codec": "rice", "k": k, "unary_bits": bits}
    if codec_id == "gaps":
        gaps = (np.diff(positions.astype(np.int64), prepend=-1) - 1).astype(np.uint64)
        stream, config = pack_stream(to_planes(gaps.astype("<u8")))
        return stream, {"codec": "gaps", "width": 8, **config}
    if codec_id == "bitmap":
        if positions.max(initial=0) >= numel + 7 - (numel + 7) % 8 or len(set(positions.tolist())) != positions.size:
            return None
        mask = np.zeros((numel + 7) // 8 * 8, np.uint8)
        mask[positions] = 1
        stream, config = pack_stream(np.packbits(mask, bitorder="little"))
        return stream, {"codec": "bitmap", **config}
    if codec_id == "csr":
        if len(shape) < 2 or not shape[0] or (np.diff(positions) <= 0).any():
            return None
        cols = numel // shape[0]
        rows, columns = np.divmod(positions.astype(np.int64), cols)
        if positions.size and positions[-1] >= numel:  # out of range: a column past the row end
            rows[-1], columns[-1] = rows[-2] if positions.size > 1 else 0, positions[-1] - rows[-2] * cols \
                if positions.size > 1 else positions[-1]
        counts = np.bincount(rows, minlength=shape[0]).astype("<u4")
        if counts.size != shape[0]:
            return None
        rows_stream, rows_config = pack_stream(to_planes(counts))
        gaps, previous, row_before = [], -1, -1
        for row, col in zip(rows.tolist(), columns.tolist()):
            gaps.append(col if row != row_before else col - previous - 1)
            previous, row_before = col, row
        gaps = np.array(gaps, np.int64)
        if (gaps < 0).any():
            return None
        k = rice.best_k(gaps.astype(np.uint64))
        unary, rem, bits = rice.encode(gaps.astype(np.uint64), k)
        return rows_stream + unary + rem, {"codec": "csr", "rows": rows_config,
                                           "rows_nbytes": len(rows_stream), "k": k,
                                           "unary_bits": bits}
    return None


def _stream_attacks(part: bytes, config: dict):
    """Damaged versions of a payload part that keep its config (resealed by the caller)."""
    if not part:
        yield "extra-byte", b"\x00"
        return
    yield "short", part[:-1]
    yield "long", part + b"\x00"
    yield "empty", b""
    yield "zeros", bytes(len(part))
    yield "ones", b"\xff" * len(part)
    rng = np.random.default_rng(len(part))
    yield "random", rng.integers(0, 256, len(part), dtype=np.uint8).tobytes()
    if part[:4] == b"\x28\xb5\x2f\xfd":
        body = bytearray(part)
        body[len(body) // 2] ^= 0x55
        yield "frame-body-flipped", bytes(body)
        yield "frame-no-size", zstandard.ZstdCompressor(write_content_size=False).compress(
            zstandard.ZstdDecompressor().decompress(part))
        yield "frame-skippable-prefix", b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd" + part


def _lying_frame(declared: int) -> bytes:
    """A zstd frame header declaring ``declared`` content bytes, followed by a tiny bogus block."""
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"\x01" * 64)
    params = zstandard.get_frame_parameters(frame)
    assert params.content_size == 64
    # Frame header: magic, descriptor with an 8-byte content size, window descriptor, size.
    descriptor = 0b11000000  # FCS field 8 bytes, not single segment, no checksum, no dict id
    return (b"\x28\xb5\x2f\xfd" + bytes([descriptor, 0x50]) + struct.pack("<Q", declared)
            + b"\x01\x00\x00")  # last raw block of size 0


