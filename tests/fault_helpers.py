"""Shared machinery of the reliability tests and the fuzz campaign (``bench/fuzz_campaign.py``).

* :func:`build_zoo` makes a base, fine-tunes and real deltas whose records, between them, use
  every dtype class and every codec (rice, csr, bitmap, gaps, all; tau, xor, raw).
* :class:`DeltaImage` takes a delta file apart (container header, delta header, payloads) and
  puts it back together with fresh checksums, so crafted damage gets past the checksums and
  reaches the decoders.
* The ``*_cases`` functions produce damaged or hostile files (:class:`Case`), and
  :func:`run_case` runs every operation (``info``, ``verify`` with and without the base,
  ``restore``, ``stitch``) on one and classifies each outcome against the pristine file's:
  *detected* (a :class:`~sparsestitch.errors.SparsestitchError` naming the file, and the tensor
  where the case concerns one), *identical* (the same result as the pristine file), *faithful*
  (``info`` listing a crafted file's header as written: ``info`` reads no payload), *crashed*
  (any other exception), *silent* (a different result and no error), *unnamed* (an error that does
  not name the file or tensor), *leftover* (a failed run left something at or beside the output).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zstandard

import sparsestitch
from sparsestitch.codecs import rice
from sparsestitch.codecs.base import gap_encode, pack_stream, to_planes
from sparsestitch.errors import SparsestitchError
from sparsestitch.format import HEADER_HASH_KEY, HEADER_KEY, DeltaReader, digest

from .conftest import save_checkpoint

CODECS = {"rice", "csr", "bitmap", "gaps", "all", "tau", "xor", "raw"}
OPS = ("info", "cli_info", "verify", "verify_base", "restore", "stitch")
#: Operations that read the base checkpoint.
BASE_OPS = ("verify_base", "restore", "stitch")
#: Outcomes that are acceptable; every other one is a defect.
GOOD = ("detected", "identical", "faithful")


# ----------------------------------------------------------------------------------------------
# The zoo: a small model, fine-tunes and deltas that exercise every codec


def zoo_model(seed: int = 0) -> dict[str, torch.Tensor]:
    """Base tensors of every float width, a clustered-rows matrix, a 0-d and an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    return {
        "emb.bf16": torch.randn(64, 48, generator=g).to(torch.bfloat16),
        "attn.f16": torch.randn(48, 48, generator=g).to(torch.float16),
        "mlp.f32": torch.randn(96, 32, generator=g),
        "proj.f64": torch.randn(24, 16, generator=g).to(torch.float64),
        "rows.bf16": torch.randn(256, 64, generator=g).to(torch.bfloat16),
        "pruned.f32": torch.randn(64, 32, generator=g),
        "norm.bf16": torch.ones(48).to(torch.bfloat16),
        "scalar.f64": torch.tensor(0.5, dtype=torch.float64),
        "empty.f32": torch.zeros(0, 8),
        "ids.i64": torch.arange(16),
    }


def zoo_finetune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Heavy-tailed changes everywhere, a third of ``pruned.f32`` zeroed, two integer entries
    changed, a new head added."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in base.items():
        if tensor.is_floating_point() and tensor.numel():
            noise = torch.randn(tensor.shape, generator=g, dtype=torch.float64) ** 3 * 0.02
            out[name] = (tensor.to(torch.float64) + noise).to(tensor.dtype)
        else:
            out[name] = tensor.clone()
    pruned = out["pruned.f32"].clone()
    pruned[torch.rand(pruned.shape, generator=g) < 0.35] = 0.0
    out["pruned.f32"] = pruned
    out["ids.i64"][[3, 9]] += 1000
    out["head.new"] = torch.randn(10, 4, generator=g)
    return out


def clustered_masks(base: dict[str, torch.Tensor], seed: int = 0) -> dict[str, np.ndarray]:
    """Kept positions clustered in a few rows (which makes ``csr`` win), plus a pruned block."""
    rng = np.random.default_rng(seed)
    rows = np.zeros(tuple(base["rows.bf16"].shape), bool)
    for r in range(0, rows.shape[0], 16):
        rows[r, rng.choice(rows.shape[1], 20, replace=False)] = True
    pruned = np.zeros(tuple(base["pruned.f32"].shape), bool)
    pruned[:32] = True
    strided = np.zeros(tuple(base["mlp.f32"].shape), bool)
    strided.reshape(-1)[5::100] = True  # equal gaps: ``gaps`` + zstd beats Rice and a bitmap
    return {"rows.bf16": rows, "pruned.f32": pruned, "mlp.f32": strided}


@dataclass
class Zoo:
    folder: Path
    base: Path
    finetunes: list[Path]
    deltas: dict[str, Path]      # label -> delta file
    other: Path                  # a second good delta, stitched beside the one under test

    def codecs_used(self) -> set[str]:
        used = set()
        for path in self.deltas.values():
            with DeltaReader(path) as reader:
                for record in reader.records:
                    if record.kind != "base":
                        used |= {record.positions["codec"], record.values["codec"]}
        return used


def build_zoo(folder: Path, seed: int = 0) -> Zoo:
    """Write a base, two fine-tunes and deltas at densities 0.001 / 0.01 / 0.5 / 1.0 plus
    clustered masks into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    base = zoo_model(seed)
    base_path = save_checkpoint(folder / "base.safetensors", base)
    tunes = [save_checkpoint(folder / f"ft{i}.safetensors", zoo_finetune(base, seed + 10 + i))
             for i in (1, 2)]
    second = zoo_finetune(base, seed + 12)
    del second["head.new"]  # two deltas may not add different tensors of one name
    second["ids.i64"] = base["ids.i64"].clone()
    save_checkpoint(tunes[1], second)
    deltas = {}
    for label, density, scope in (("d0.001", 0.001, "global"), ("d0.01", 0.01, "global"),
                                  ("d0.5", 0.5, "per-tensor"), ("d1.0", 1.0, "global")):
        deltas[label] = folder / f"{label}.delta"
        sparsestitch.compress(base_path, tunes[0], deltas[label], density=density, scope=scope)
    deltas["mask"] = folder / "mask.delta"
    sparsestitch.compress(base_path, tunes[0], deltas["mask"], masks=clustered_masks(base, seed))
    other = folder / "other.delta"
    sparsestitch.compress(base_path, tunes[1], other, density=0.05)
    return Zoo(folder, base_path, tunes, deltas, other)


# ----------------------------------------------------------------------------------------------
# Taking delta files apart and putting them back together


@dataclass
class DeltaImage:
    """A delta file's parts: container entries (in data order), delta header, payloads."""

    entries: dict[str, dict]          # container header without __metadata__
    metadata: dict[str, str]
    header: dict                      # the parsed delta header
    payloads: dict[str, bytes]

    @classmethod
    def read(cls, path: Path) -> "DeltaImage":
        data = Path(path).read_bytes()
        (size,) = struct.unpack("<Q", data[:8])
        container = json.loads(data[8:8 + size])
        metadata = container.pop("__metadata__")
        start = 8 + size
        payloads = {name: data[start + e["data_offsets"][0]:start + e["data_offsets"][1]]
                    for name, e in container.items()}
        return cls(container, metadata, json.loads(metadata[HEADER_KEY]), payloads)

    def copy(self) -> "DeltaImage":
        return DeltaImage(json.loads(json.dumps(self.entries)), dict(self.metadata),
                          json.loads(json.dumps(self.header)), dict(self.payloads))

    def record(self, name: str) -> dict:
        return next(r for r in self.header["tensors"] if r["name"] == name)

    def header_text(self) -> str:
        return json.dumps(self.header, separators=(",", ":"), sort_keys=True)

    def to_bytes(self, *, header_text: str | None = None, container_text: str | None = None,
                 reseal: bool = True) -> bytes:
        """Lay the payloads out afresh; with ``reseal`` recompute payload sizes and checksums
        of every record and the header checksum, so the file passes every checksum."""
        if reseal:
            tensors = self.header.get("tensors") if isinstance(self.header, dict) else None
            for record in tensors if isinstance(tensors, list) else ():
                if (isinstance(record, dict) and isinstance(record.get("name"), str)
                        and record["name"] in self.payloads
                        and _hex16(record.get("payload_xxh3"))):  # keep deliberately bad ones
                    payload = self.payloads[record["name"]]
                    record["payload_xxh3"] = digest(payload)
        text = self.header_text() if header_text is None else header_text
        metadata = dict(self.metadata)
        metadata[HEADER_KEY] = text
        if reseal:
            metadata[HEADER_HASH_KEY] = digest(text.encode("utf-8", "surrogatepass"))
        container, offset = {"__metadata__": metadata}, 0
        for name, entry in self.entries.items():
            n = len(self.payloads[name])
            container[name] = dict(entry, shape=[n], data_offsets=[offset, offset + n])
            offset += n
        if container_text is None:
            container_text = json.dumps(container, separators=(",", ":"), ensure_ascii=False)
        raw = container_text.encode("utf-8", "surrogatepass")
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + b"".join(self.payloads[n] for n in self.entries)


def regions(data: bytes) -> list[tuple[str, int, int, str | None]]:
    """``(label, start, end, tensor)`` of a delta file's byte regions, for stratified damage."""
    (size,) = struct.unpack("<Q", data[:8])
    text = data[8:8 + size]
    json_end = 8 + len(text.rstrip(b" "))
    out = [("length", 0, 8, None), ("container-json", 8, json_end, None)]
    if json_end < 8 + size:
        out.append(("padding", json_end, 8 + size, None))
    hash_at = text.find(HEADER_HASH_KEY.encode())
    if hash_at >= 0:
        value = 8 + hash_at + len(HEADER_HASH_KEY) + 3
        out.append(("header-checksum", value, value + 16, None))
    container = json.loads(text)
    container.pop("__metadata__", None)
    for name, entry in container.items():
        begin, end = entry["data_offsets"]
        if end > begin:
            out.append(("payload", 8 + size + begin, 8 + size + end, name))
    return out


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
    numel = int(np.prod(target["shape"])) if target["shape"] else 1
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
            ("values-codec-unknown", ("values", "codec"), "delta8"),
            ("values-codec-int", ("values", "codec"), 3),
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
        if record.values["codec"] in ("raw", "xor") and need:
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
    numel = int(np.prod(shape)) if shape else 1
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


# ----------------------------------------------------------------------------------------------
# Running operations and classifying their outcomes against the reference reader


def _info_summary(result) -> tuple:
    return (result.file_size, json.dumps(result.header, sort_keys=True),
            tuple((t.name, t.dtype, tuple(t.shape), t.kind, t.count, t.positions_codec,
                   t.values_codec, t.nbytes) for t in result.tensors))


def _listing_summary(data: bytes, listing: "Listing") -> tuple:
    rows = []
    for r in listing.records:
        stored = r["kind"] != "base"
        rows.append((r["name"], r["dtype"], tuple(r["shape"]), r["kind"],
                     r["count"] if stored else 0,
                     r["positions"].get("codec") if stored else None,
                     r["values"].get("codec") if stored else None,
                     r["positions_nbytes"] + r["values_nbytes"] if stored else 0))
    return (len(data), json.dumps(listing.header, sort_keys=True), tuple(rows))


@dataclass
class Context:
    """Where operations read the base and write, and the base's tensors for the reference."""

    base: Path
    other: Path
    scratch: Path
    counter: int = 0
    base_tensors: dict = field(default_factory=dict)

    def __post_init__(self):
        self.base_tensors = read_tensors(self.base)

    def output(self, op: str) -> Path:
        self.counter += 1
        return self.scratch / f"{op}-{self.counter}.safetensors"


def run_op(op: str, delta: Path, ctx: Context, base: Path | None = None) -> tuple[str, object]:
    """Run one operation; ``("ok", result)`` or ``("error", (exception, output path))``."""
    out, base = None, base or ctx.base
    try:
        if op == "info":
            return "ok", _info_summary(sparsestitch.info(delta))
        if op == "cli_info":
            return _cli_info(delta)
        if op == "verify":
            return "ok", _info_summary(sparsestitch.verify(delta))
        if op == "verify_base":
            return "ok", _info_summary(sparsestitch.verify(delta, base=base))
        out = ctx.output(op)
        if op == "restore":
            sparsestitch.restore(base, delta, out)
        else:
            sparsestitch.stitch(base, [delta, ctx.other], out)
        result = read_tensors(out)
        out.unlink()
        return "ok", result
    except Exception as exc:  # noqa: BLE001 -- classified by the caller
        return "error", (exc, out)


def _cli_info(delta: Path) -> tuple[str, object]:
    """``sparsestitch info --all``: exit 0, or exit 2 with one ``error:`` line naming the file."""
    from click.testing import CliRunner

    from sparsestitch.cli import main

    result = CliRunner().invoke(main, ["info", "--all", str(delta)])
    if result.exit_code == 0:
        return "ok", "printed"
    if result.exit_code == 2 and isinstance(result.exception, SystemExit):
        named = f"file {str(delta)!r}" in result.output
        return "error", (SparsestitchError(result.output.strip(), path=delta if named else None), None)
    return "error", (result.exception or RuntimeError(result.output), None)


def expected(op: str, data: bytes, ctx: Context, memo: dict | None = None):
    """What ``op`` must give for ``data`` according to the reference reader (Invalid if refused).

    ``memo`` (one per ``data``) keeps the reference's decodings between operations."""
    memo = {} if memo is None else memo
    try:
        if op == "info":
            return _listing_summary(data, reference_listing(data))
        if op == "cli_info":
            reference_listing(data)
            return "printed"
        with_base = op != "verify"
        if with_base not in memo:
            try:
                memo[with_base] = reference_decode(data, ctx.base_tensors if with_base else None)
            except Invalid as exc:
                memo[with_base] = exc
        decoded = memo[with_base]
        if isinstance(decoded, Invalid):
            raise decoded
        if op in ("verify", "verify_base"):
            return _listing_summary(data, decoded.listing)
        if op == "restore":
            return decoded.tensors
        canonical = ctx.scratch / "canonical.delta"
        write_canonical(decoded, canonical)
        status, value = run_op("stitch", canonical, ctx)
        canonical.unlink()
        assert status == "ok", f"stitching the canonical re-encoding failed: {value}"
        return value
    except Invalid as exc:
        return exc


def write_canonical(decoded: "Decoded", path: Path) -> None:
    """A clean delta (library writer) with exactly the decoded records' positions and values."""
    from sparsestitch.dtypes import dtype as lookup
    from sparsestitch.format import DeltaWriter, Record, encode_record

    writer = DeltaWriter(path, overwrite=True)
    for r in decoded.listing.records:
        dt, shape = lookup(r["dtype"]), tuple(r["shape"])
        if r["kind"] == "base":
            writer.add(Record(r["name"], r["dtype"], shape, "base", r["base_xxh3"]))
            continue
        positions, values, base_kept = decoded.records[r["name"]]
        writer.add(*encode_record(r["name"], dt, shape, positions, values, base_kept, r["base_xxh3"]))
    meta = {k: v for k, v in decoded.listing.header.items()
            if k not in ("format", "format_version", "tensors")}
    writer.close(meta)


def classify(case: Case, op: str, status: str, value, want, pristine) -> str:
    """One operation's outcome (see the module docstring)."""
    if status == "ok":
        if isinstance(want, Invalid):
            return "silent"
        if value != want:
            return "silent"
        return "identical" if value == pristine.get(op) else "faithful"
    exc, out = value
    if out is not None and (out.exists() or any(p.name.startswith(f".{out.name}.sstmp-")
                                                 for p in out.parent.iterdir())):
        return "leftover"
    if not isinstance(exc, SparsestitchError):
        return "crashed"
    if exc.path is None or exc.path not in str(exc):
        return "unnamed"
    if case.tensor is not None and op not in ("info", "cli_info") and exc.tensor != case.tensor:
        return "unnamed"
    return "detected" if isinstance(want, Invalid) else "refused-valid"


def run_case(case: Case, ctx: Context, pristine: dict, ops=OPS) -> dict[str, tuple[str, str]]:
    """``{op: (outcome, detail)}`` for one case, written to a scratch file."""
    delta = ctx.scratch / "case.delta"
    delta.write_bytes(case.data)
    outcomes, memo = {}, {}
    for op in ops:
        want = expected(op, case.data, ctx, memo)
        status, value = run_op(op, delta, ctx)
        outcome = classify(case, op, status, value, want, pristine)
        detail = "" if status == "ok" else f"{type(value[0]).__name__}: {value[0]}"
        if outcome != "detected" and isinstance(want, Invalid):
            detail += f" [reference: {want}]"
        outcomes[op] = (outcome, detail[:400])
    return outcomes


def pristine_results(delta: Path, ctx: Context) -> dict[str, object]:
    results = {}
    for op in OPS:
        status, value = run_op(op, delta, ctx)
        assert status == "ok", f"pristine {op} failed: {value}"
        assert value == expected(op, delta.read_bytes(), ctx), f"reference disagrees on {op}"
        results[op] = value
    return results


def base_regions(data: bytes) -> list[tuple[str, int, int, str | None]]:
    """Byte regions of a safetensors checkpoint: length, header, each tensor's data."""
    (size,) = struct.unpack("<Q", data[:8])
    entries = json.loads(data[8:8 + size])
    entries.pop("__metadata__", None)
    out = [("length", 0, 8, None), ("header", 8, 8 + size, None)]
    for name, e in entries.items():
        begin, end = e["data_offsets"]
        if end > begin:
            out.append(("tensor", 8 + size + begin, 8 + size + end, name))
    return out


def base_cases(data: bytes, rng: random.Random, per_region: int) -> list[Case]:
    """Bit flips in every region of a base checkpoint, and cuts at every region boundary."""
    cases, cuts = [], {0, 7, len(data) - 1}
    for label, start, end, tensor in base_regions(data):
        bits = range(start * 8, end * 8)
        for bit in (bits if len(bits) <= per_region else rng.sample(bits, per_region)):
            cases.append(Case("base-bitflip", f"base:{label}:bit{bit}", flip(data, bit), tensor=tensor))
        cuts |= {start, (start + end) // 2, end - 1}
    cases += [Case("base-truncation", f"base:cut{n}", data[:n]) for n in sorted(cuts) if n < len(data)]
    return cases


def run_base_case(case: Case, delta: Path, ctx: Context, pristine: dict) -> dict[str, tuple[str, str]]:
    """Run the base-reading operations of a good ``delta`` against a damaged base (``case``)."""
    base = ctx.scratch / "case-base.safetensors"
    base.write_bytes(case.data)
    try:
        tensors = read_tensors(base)
        changed = tensors != ctx.base_tensors
        invalid = None if not changed else Invalid("the base's tensors differ")
    except Invalid as exc:
        invalid = exc
    outcomes = {}
    for op in BASE_OPS:
        status, value = run_op(op, delta, ctx, base=base)
        if status == "ok":
            outcome = "silent" if invalid is not None or value != pristine[op] else "identical"
            detail = ""
        else:
            exc, out = value
            detail = f"{type(exc).__name__}: {exc}"
            if out is not None and (out.exists() or any(p.name.startswith(f".{out.name}.sstmp-")
                                                         for p in out.parent.iterdir())):
                outcome = "leftover"
            elif not isinstance(exc, SparsestitchError):
                outcome = "crashed"
            elif exc.path not in (str(base), str(delta)) or exc.path not in str(exc):
                outcome = "unnamed"
            elif case.tensor is not None and exc.tensor != case.tensor:
                outcome = "unnamed"
            else:
                outcome = "detected" if invalid is not None else "refused-valid"
        outcomes[op] = (outcome, detail[:400])
    return outcomes


@dataclass
class Tally:
    """Counts over cases (a case is bad if any operation on it is) and over operation runs."""

    cases: Counter = field(default_factory=Counter)
    runs: Counter = field(default_factory=Counter)
    by_family: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)

    def add(self, case: Case, outcomes: dict[str, tuple[str, str]]) -> None:
        kinds = [o for o, _ in outcomes.values()]
        bad = [k for k in kinds if k not in GOOD]
        if bad:
            verdict = sorted(bad)[0]
        elif "detected" in kinds:
            verdict = "detected"
        elif "faithful" in kinds:
            verdict = "faithful"
        else:
            verdict = "identical"
        for counter in (self.cases, self.by_family.setdefault(case.family, Counter())):
            counter[verdict] += 1
            counter["tried"] += 1
        for kind in kinds:
            self.runs[kind] += 1
        if bad:
            self.failures.append((case.label, {op: o for op, o in outcomes.items() if o[0] not in GOOD}))

    def bad_count(self) -> int:
        return sum(v for k, v in self.cases.items() if k not in GOOD + ("tried",))


# ----------------------------------------------------------------------------------------------
# A reference reader written from docs/format.md alone: it decides whether a file is valid and
# what it decodes to, so that "silently wrong" is measurable for crafted files too.  It shares
# nothing with the library but the dtype conversions of format.md section 5 and xxh3.


class Invalid(Exception):
    """The file breaks docs/format.md (``tensor``: the record concerned, if any)."""

    def __init__(self, message: str, tensor: str | None = None):
        super().__init__(message)
        self.tensor = tensor


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
             "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOATS = {"F64", "F32", "F16", "BF16"}
#: A zstd block of at most 128 KiB takes at least 4 bytes (an RLE block): no frame expands more.
ZSTD_MAX_EXPANSION = 1 << 15
_HEX = set("0123456789abcdef")


def _known_dtype(value) -> bool:
    return isinstance(value, str) and value in _ITEMSIZE


def _is_int(value) -> bool:
    return type(value) is int


def _no_dups(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise Invalid("duplicate JSON key")
    return dict(pairs)


def _strict_json(raw: bytes):
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_dups,
                           parse_constant=lambda c: (_ for _ in ()).throw(Invalid(c)))
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # lone surrogates
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise Invalid(f"bad JSON: {exc}") from None
    return value


def _hex16(value) -> bool:
    return isinstance(value, str) and len(value) == 16 and set(value) <= _HEX


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_container(data: bytes) -> tuple[dict, dict, int]:
    """``(entries, metadata, data_start)`` of a safetensors file, per format.md section 1."""
    if len(data) < 8:
        raise Invalid("shorter than the length field")
    (n,) = struct.unpack("<Q", data[:8])
    if n > 100 << 20 or n > len(data) - 8:
        raise Invalid("header length out of range")
    header = _strict_json(data[8:8 + n])
    if not isinstance(header, dict):
        raise Invalid("header is not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise Invalid("bad __metadata__")
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or not _known_dtype(e.get("dtype")):
            raise Invalid("bad entry", name)
        shape, offsets = e.get("shape"), e.get("data_offsets")
        if (not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) and o >= 0 for o in offsets) or offsets[0] > offsets[1]
                or _numel(shape) * _ITEMSIZE[e["dtype"]] != offsets[1] - offsets[0]):
            raise Invalid("bad entry", name)
        spans.append((offsets[0], offsets[1], name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise Invalid("entries not contiguous", name)
        at = end
    if 8 + n + at != len(data):
        raise Invalid("entries do not end at the end of the file")
    return header, metadata, 8 + n


@dataclass
class Listing:
    """What a valid delta header says (the reference for ``info``)."""

    header: dict
    records: list[dict]
    payloads: dict[str, bytes]


def reference_listing(data: bytes) -> Listing:
    """Everything ``info`` must check: container, header checksum, header and record fields."""
    entries, metadata, start = read_container(data)
    text = metadata.get(HEADER_KEY)
    if text is None or metadata.get(HEADER_HASH_KEY) != digest(text.encode("utf-8")):
        raise Invalid("header missing or checksum mismatch")
    header = _strict_json(text.encode("utf-8"))
    if (not isinstance(header, dict) or header.get("format") != "sparsestitch.delta"
            or not _is_int(header.get("format_version")) or header["format_version"] != 1):
        raise Invalid("not a version 1 delta header")
    records = header.get("tensors")
    if not isinstance(records, list) or len(records) > 1 << 20:
        raise Invalid("bad tensors list")
    names, payloads = set(), {}
    for r in records:
        if not isinstance(r, dict) or not isinstance(r.get("name"), str):
            raise Invalid("bad record")
        name = r["name"]
        if name in names:
            raise Invalid("record listed twice", name)
        names.add(name)
        shape, kind = r.get("shape"), r.get("kind")
        if (kind not in ("base", "sparse", "added") or not _known_dtype(r.get("dtype"))
                or not isinstance(shape, list) or len(shape) > 64
                or not all(_is_int(d) and 0 <= d <= 1 << 44 for d in shape)
                or _numel(shape) > 1 << 44):
            raise Invalid("bad kind, dtype or shape", name)
        if (r.get("base_xxh3") is not None) if kind == "added" else not _hex16(r.get("base_xxh3")):
            raise Invalid("bad base_xxh3", name)
        entry = entries.get(name)
        if kind == "base":
            if entry is not None:
                raise Invalid("unchanged tensor has a payload", name)
            continue
        fields = [r.get(k) for k in ("count", "positions_nbytes", "values_nbytes")]
        if (not all(_is_int(v) and v >= 0 for v in fields) or fields[0] > _numel(shape)
                or not isinstance(r.get("positions"), dict) or not isinstance(r.get("values"), dict)
                or not _hex16(r.get("payload_xxh3"))
                or (kind == "added" and fields[0] != _numel(shape))):
            raise Invalid("bad record fields", name)
        # Every value codec stores at least count bytes in raw or zstd streams.
        if fields[0] > ZSTD_MAX_EXPANSION * fields[2]:
            raise Invalid("more values than the payload can hold", name)
        if entry is None or entry["dtype"] != "U8" or entry["data_offsets"][1] - entry["data_offsets"][0] \
                != fields[1] + fields[2]:
            raise Invalid("payload missing or of the wrong size", name)
        begin, end = entry["data_offsets"]
        payloads[name] = data[start + begin:start + end]
    if set(entries) - set(payloads):
        raise Invalid("payload no record describes")
    return Listing(header, records, payloads)


def _stream(raw: bytes, config, need: int, tensor: str) -> bytes:
    if (not isinstance(config, dict) or type(config.get("zstd")) is not bool
            or not _is_int(config.get("raw_nbytes")) or config["raw_nbytes"] != need):
        raise Invalid("bad stream config", tensor)
    if not config["zstd"]:
        if len(raw) != need:
            raise Invalid("raw stream of the wrong size", tensor)
        return bytes(raw)
    if need > ZSTD_MAX_EXPANSION * len(raw):
        raise Invalid("more bytes than a zstd frame of this size can hold", tensor)
    try:
        if zstandard.frame_content_size(raw) != need:
            raise Invalid("zstd frame size", tensor)
        out = zstandard.ZstdDecompressor().decompress(raw, max_output_size=max(need, 1),
                                                       allow_extra_data=False)
    except zstandard.ZstdError:
        raise Invalid("bad zstd frame", tensor) from None
    if len(out) != need:
        raise Invalid("zstd frame size", tensor)
    return out


def _planes(raw: bytes, width: int, n: int) -> list[int]:
    """Byte planes -> integers: byte ``j`` of value ``i`` is ``raw[j * n + i]``."""
    planes = np.frombuffer(raw, np.uint8).reshape(width, n).astype(np.uint64)
    values = sum(planes[j] << np.uint64(8 * j) for j in range(width))
    return np.asarray(values, np.uint64).reshape(n).tolist()


def _rice(unary: bytes, rem: bytes, n: int, k: int, unary_bits: int, tensor: str) -> list[int]:
    if len(unary) != (unary_bits + 7) // 8 or len(rem) != (n * k + 7) // 8:
        raise Invalid("rice stream sizes", tensor)
    ubits = np.unpackbits(np.frombuffer(unary, np.uint8), bitorder="little")[:unary_bits]
    ends = np.flatnonzero(ubits).tolist()
    if len(ends) != n or (n and ends[-1] != unary_bits - 1):
        raise Invalid("unary stream", tensor)
    rbits = np.unpackbits(np.frombuffer(rem, np.uint8), bitorder="little")[:n * k].tolist()
    out, prev = [], -1
    for i, end in enumerate(ends):
        q = end - prev - 1
        prev = end
        low = sum(b << j for j, b in enumerate(rbits[i * k:(i + 1) * k]))
        out.append((q << k) | low)
    return out


def _from_gaps(gaps: list[int]) -> list[int]:
    """Positions from gaps (format.md 4.1): the first as is, then each previous + gap + 1."""
    positions, at = [], -1
    for gap in gaps:
        at += gap + 1
        positions.append(at)
    return positions


def _int_field(config, key, lo, hi, tensor) -> int:
    value = config.get(key)
    if not _is_int(value) or not lo <= value <= hi:
        raise Invalid(f"bad {key}", tensor)
    return value


def _positions(r: dict, part: bytes) -> list[int]:
    name, shape, count, config = r["name"], r["shape"], r["count"], r["positions"]
    numel, codec = _numel(shape), config.get("codec")
    if codec == "all":
        if count != numel or part:
            raise Invalid("all", name)
        return list(range(count))
    if codec == "rice":
        k = _int_field(config, "k", 0, 32, name)
        ub = _int_field(config, "unary_bits", count, count + numel, name)
        cut = (ub + 7) // 8
        return _from_gaps(_rice(part[:cut], part[cut:], count, k, ub, name))
    if codec == "gaps":
        width = config.get("width")
        if width not in (4, 8) or not _is_int(width):
            raise Invalid("gaps width", name)
        return _from_gaps(_planes(_stream(part, config, count * width, name), width, count))
    if codec == "bitmap":
        raw = _stream(part, config, (numel + 7) // 8, name)
        return np.flatnonzero(np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")).tolist()
    if codec == "csr":
        if len(shape) < 2:
            raise Invalid("csr needs 2+ dimensions", name)
        rows = shape[0]
        cols = _numel(shape[1:])
        rows_nbytes = _int_field(config, "rows_nbytes", 0, len(part), name)
        k = _int_field(config, "k", 0, 32, name)
        ub = config.get("unary_bits")
        if not _is_int(ub) or ub < 0 or rows_nbytes + (ub + 7) // 8 > len(part):
            raise Invalid("csr unary_bits", name)
        counts = _planes(_stream(part[:rows_nbytes], config.get("rows"), rows * 4, name), 4, rows)
        if sum(counts) != count or any(c > cols for c in counts):
            raise Invalid("csr row counts", name)
        cut = rows_nbytes + (ub + 7) // 8
        gaps = _rice(part[rows_nbytes:cut], part[cut:], count, k, ub, name)
        positions, i = [], 0
        for row, c in enumerate(counts):
            col = -1
            for _ in range(c):
                col += gaps[i] + 1
                i += 1
                if col >= cols:
                    raise Invalid("csr column out of range", name)
                positions.append(row * cols + col)
        return positions
    raise Invalid(f"unknown position codec {codec!r}", name)


def _values(r: dict, part: bytes, base_kept: np.ndarray | None) -> np.ndarray:
    from sparsestitch.dtypes import dtype as lookup, from_wide, to_wide

    name, count, config, dt = r["name"], r["count"], r["values"], lookup(r["dtype"])
    codec, width = config.get("codec"), dt.itemsize
    if codec == "raw":
        return np.array(_planes(_stream(part, config, count * width, name), width, count), dt.bits)
    if codec not in ("xor", "tau"):
        raise Invalid(f"unknown value codec {codec!r}", name)
    if base_kept is None:
        raise Invalid(f"{codec} needs the base", name)
    if codec == "xor":
        stream = np.array(_planes(_stream(part, config, count * width, name), width, count), dt.bits)
        return stream ^ base_kept
    if r["dtype"] not in _FLOATS:
        raise Invalid("tau needs a float dtype", name)
    n_exc = _int_field(config, "exceptions", 0, count, name)
    sizes = [_int_field(config, k, 0, len(part), name)
             for k in ("tau_nbytes", "exc_index_nbytes", "exc_bits_nbytes")]
    if sum(sizes) != len(part):
        raise Invalid("tau stream sizes", name)
    a, b = sizes[0], sizes[0] + sizes[1]
    wide_bits = np.dtype(dt.wide.str.replace("f", "u"))
    tau = np.array(_planes(_stream(part[:a], config.get("tau"), count * wide_bits.itemsize, name),
                           wide_bits.itemsize, count), wide_bits).view(dt.wide)
    with np.errstate(all="ignore"):
        values = from_wide(to_wide(base_kept, dt) + tau, dt)
    index_raw = _stream(part[a:b], config.get("exc_index"), n_exc * 4, name)
    index = _from_gaps(_planes(index_raw, 4, n_exc))
    if index and index[-1] >= count:
        raise Invalid("exception index out of range", name)
    exact = _planes(_stream(part[b:], config.get("exc_bits"), n_exc * width, name), width, n_exc)
    values[index] = np.array(exact, dt.bits)
    return values


@dataclass
class Decoded:
    listing: Listing
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]]   # restored output (with a base)
    records: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]  # positions, bits, base


def read_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """``{name: (dtype, shape, bytes)}`` of a safetensors file or folder (trusted input)."""
    out = {}
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else [Path(path)]
    for file in files:
        data = file.read_bytes()
        entries, _, start = read_container(data)
        for name, e in entries.items():
            b, t = e["data_offsets"]
            out[name] = (e["dtype"], tuple(e["shape"]), data[start + b:start + t])
    return out


def reference_decode(data: bytes, base: dict | None) -> Decoded:
    """Decode and check a whole delta (against ``base`` from :func:`read_tensors`, if given)."""
    listing = reference_listing(data)
    if base is not None:
        described = {r["name"]: r for r in listing.records if r["kind"] != "added"}
        for name, (dtype_name, shape, raw) in base.items():
            r = described.get(name)
            if r is None:
                raise Invalid("no record for a base tensor", name)
            if (r["dtype"], tuple(r["shape"])) != (dtype_name, shape):
                raise Invalid("dtype or shape differs from the base", name)
        for r in listing.records:
            if r["kind"] != "added" and r["name"] not in base:
                raise Invalid("record for a tensor the base lacks", r["name"])
            if r["kind"] == "added" and r["name"] in base:
                raise Invalid("added tensor the base has", r["name"])
    from sparsestitch.dtypes import dtype as lookup

    restored, records = {}, {}
    for r in listing.records:
        name, dt = r["name"], lookup(r["dtype"])
        base_bits = None
        if base is not None and r["kind"] != "added":
            base_bits = np.frombuffer(base[name][2], dt.bits).copy()
            if digest(base[name][2]) != r["base_xxh3"]:
                raise Invalid("base checksum differs", name)
        if r["kind"] == "base":
            if base_bits is not None:
                restored[name] = (r["dtype"], tuple(r["shape"]), base_bits.tobytes())
            continue
        payload = listing.payloads[name]
        if digest(payload) != r["payload_xxh3"]:
            raise Invalid("payload checksum", name)

        positions = _positions(r, payload[:r["positions_nbytes"]])
        numel = _numel(r["shape"])
        if len(positions) != r["count"] or (positions and (positions[0] < 0 or positions[-1] >= numel)):
            raise Invalid("positions invalid", name)
        index = np.array(positions, np.int64)
        if (np.diff(index) <= 0).any():
            raise Invalid("positions not strictly increasing", name)
        if r["kind"] == "added":
            kept = None
        elif base_bits is not None:
            kept = base_bits[index]
        else:
            kept = np.zeros(len(positions), dt.bits)
        values = _values(r, payload[r["positions_nbytes"]:], kept)
        records[name] = (index, values, kept)
        if base is not None or r["kind"] == "added":
            out = base_bits if base_bits is not None else np.zeros(numel, dt.bits)
            out[index] = values
            restored[name] = (r["dtype"], tuple(r["shape"]), out.tobytes())
    return Decoded(listing, restored, records)


# ----------------------------------------------------------------------------------------------
# Peak memory of operations on crafted files, measured in a subprocess with an address-space cap
# (so a regression fails the test instead of exhausting the machine)

_MEASURE = r"""
import json, resource, sys, tracemalloc
import sparsestitch
results = []
for job in json.load(sys.stdin):
    tracemalloc.start()
    try:
        op, delta, base = job["op"], job["delta"], job.get("base")
        if op == "info":
            sparsestitch.info(delta)
        elif op == "verify":
            sparsestitch.verify(delta, base=base)
        elif op == "restore":
            sparsestitch.restore(base, delta, job["out"])
        else:
            sparsestitch.stitch(base, [delta], job["out"])
        result = {"status": "ok"}
    except sparsestitch.SparsestitchError as exc:
        result = {"status": "error", "type": type(exc).__name__, "message": str(exc),
                  "path": exc.path, "tensor": exc.tensor}
    except BaseException as exc:
        result = {"status": "crash", "type": type(exc).__name__, "message": str(exc)[:300]}
    result["peak"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    results.append(result)
# VmHWM, not ru_maxrss: Linux carries a forking parent's high-water mark over exec.
with open("/proc/self/status") as status:
    peak = [int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")]
print(json.dumps({"results": results, "maxrss": peak[0] if peak else
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def measure(jobs: list[dict], address_space: int = 3 << 30) -> dict:
    """Run ``jobs`` (``{"op", "delta", "base", "out"}``) in a fresh interpreter limited to
    ``address_space`` bytes; return each job's outcome and traced peak memory, and the
    process's peak resident memory (``maxrss``)."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    done = subprocess.run([sys.executable, "-c", _MEASURE], input=json.dumps(jobs, default=str),
                          capture_output=True, text=True, preexec_fn=limit, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


# ----------------------------------------------------------------------------------------------
# Killing the command line at random moments


def medium_model(seed: int = 0) -> dict[str, torch.Tensor]:
    """About 3 MB of bfloat16 matrices: big enough that a command runs for a tenth of a second."""
    g = torch.Generator().manual_seed(seed)
    model = {f"layer.{i}.weight": torch.randn(384, 512, generator=g).to(torch.bfloat16)
             for i in range(8)}
    model["position_ids"] = torch.arange(16)
    return model


def medium_finetune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype)
            if v.is_floating_point() else v.clone() for k, v in base.items()}


def spawn_cli(args: list[str], phase: str | None = None, start_gate: int | None = None, *,
              stderr: str | os.PathLike | None = None, hold: "Hold | None" = None) -> int:
    """Fork a child that runs ``sparsestitch ARGS`` (output silenced) and return its pid.

    ``phase`` makes the child SIGKILL itself at that point of writing its output:
    ``"first-fsync"`` (a data file fully written, not yet synced), ``"before-publish"`` (just
    before the rename into place), ``"after-publish"`` (just after it), ``"after-first-rename"``
    (after the first rename, link or swap of publishing: mid-way through replacing a folder);
    ``"no-swap-after-rename-1"``, ``"no-swap-after-rename-2"`` and ``"no-swap-before-cleanup"``
    replace a folder as on a filesystem without an atomic swap and kill at that step.
    ``start_gate`` is a pipe's read end: the child waits for one byte on it before starting.
    ``stderr`` names a file that gets the child's standard error (its ``error: ...`` line)
    instead of discarding it.  ``hold`` (a :class:`Hold`) stops the child at one point of
    publishing until the test lets it go on.

    Reap the child with :func:`wait_exit` (or :meth:`Hold.release`): both give up after a
    bounded time and kill it, so a hung child fails the test instead of stalling the run.
    """
    pid = os.fork()
    if pid:
        if hold is not None:
            hold._forked(pid)
        return pid
    code = 70
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        if stderr is not None:
            os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        else:
            os.dup2(null, 2)
        # pytest's capturing replaces sys.stdout/sys.stderr with objects not on fds 1 and 2
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        if phase is not None:
            _arm(phase)
        if hold is not None:
            hold._arm()
        if start_gate is not None:
            os.read(start_gate, 1)
        from sparsestitch.cli import main

        main.main(args=args, prog_name="sparsestitch", standalone_mode=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 -- any other exception is reported as exit code 71
        code = 71
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)


def _arm(phase: str) -> None:
    import signal

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    calls = Counter()

    def wrap(module, name, before=None, after=None):
        real = getattr(module, name)

        def patched(*args, **kwargs):
            calls[name] += 1
            if before is not None and before(calls[name]):
                die()
            result = real(*args, **kwargs)
            if after is not None and after(calls[name]):
                die()
            return result
        setattr(module, name, patched)

    from sparsestitch import atomic

    if phase == "first-fsync":
        wrap(os, "fsync", before=lambda n: n == 1)
    elif phase == "before-publish":
        wrap(atomic, "publish", before=lambda n: True)
    elif phase == "after-publish":
        wrap(atomic, "publish", after=lambda n: True)
    elif phase == "after-first-rename":
        for module, name in ((os, "replace"), (os, "link"), (os, "rename"), (atomic, "_exchange")):
            if hasattr(module, name):
                wrap(module, name, after=lambda n: True)
    elif phase.startswith("no-swap-"):  # a filesystem without renameat2(RENAME_EXCHANGE)
        atomic._exchange = lambda a, b: False
        if phase == "no-swap-before-cleanup":
            wrap(atomic, "_remove", before=lambda n: True)
        else:
            step = {"no-swap-after-rename-1": 1, "no-swap-after-rename-2": 2}[phase]
            wrap(os, "replace", after=lambda n: n == step)
    else:
        raise ValueError(phase)


class Hold:
    """Stop a :func:`spawn_cli` child at one point of publishing its output and let it go on
    when the test says so: the way to put two writers' steps in a chosen order without
    depending on timing.

    ``"before-publish"``: the output is completely written under its temporary name and
    :func:`sparsestitch.atomic.publish` is about to run.  ``"inside-publish"``: publishing has
    made its checks that the output does not exist yet and is about to link or rename the
    temporary into place.

    Use as a context manager: leaving it kills and reaps a child still held or running.
    """

    POINTS = ("before-publish", "inside-publish")

    def __init__(self, point: str, timeout: float = 120.0):
        if point not in self.POINTS:
            raise ValueError(point)
        self.point, self.timeout, self.pid, self._reaped = point, timeout, None, False
        self._reached_r, self._reached_w = os.pipe()   # child -> test: "I am held"
        self._resume_r, self._resume_w = os.pipe()     # test -> child: "go on"

    def __enter__(self) -> "Hold":
        return self

    def __exit__(self, *exc) -> None:
        if self.pid is not None and not self._reaped:
            _kill_and_reap(self.pid)
            self._reaped = True
        for fd in (self._reached_r, self._reached_w, self._resume_r, self._resume_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._reached_r = self._reached_w = self._resume_r = self._resume_w = None

    def reached(self) -> None:
        """Block until the child is held (at most ``timeout`` seconds; then it is killed)."""
        import select

        ready, _, _ = select.select([self._reached_r], [], [], self.timeout)
        if not ready:
            _kill_and_reap(self.pid)
            self._reaped = True
            raise TimeoutError(f"process {self.pid} did not reach {self.point} in {self.timeout} s")
        if os.read(self._reached_r, 1) != b"h":  # end of file: the child ended before that point
            code = wait_exit(self.pid, self.timeout)
            self._reaped = True
            raise AssertionError(f"process {self.pid} ended (exit code {code}) before reaching "
                                 f"{self.point}")

    def release(self) -> int | None:
        """Let the held child go on; reap it and return its exit code (as :func:`wait_exit`)."""
        os.write(self._resume_w, b"g")
        self._reaped = True  # wait_exit kills and reaps it whatever happens
        return wait_exit(self.pid, self.timeout)

    def _forked(self, pid: int) -> None:  # in the test process
        self.pid = pid
        os.close(self._reached_w)  # so that reading sees end of file if the child dies
        os.close(self._resume_r)
        self._reached_w = self._resume_r = None

    def _arm(self) -> None:  # in the child
        from sparsestitch import atomic

        os.close(self._reached_r)
        os.close(self._resume_w)
        state = {"publishing": False, "held": False}

        def hold_here():
            if state["held"]:
                return
            state["held"] = True
            os.write(self._reached_w, b"h")
            if os.read(self._resume_r, 1) != b"g":  # the test went away: do not publish
                os._exit(75)

        def wrap(module, name, before):
            real = getattr(module, name)

            def patched(*args, **kwargs):
                before()
                return real(*args, **kwargs)
            setattr(module, name, patched)

        if self.point == "before-publish":
            wrap(atomic, "publish", hold_here)
        else:
            real_publish = atomic.publish

            def publish(*args, **kwargs):
                state["publishing"] = True
                try:
                    return real_publish(*args, **kwargs)
                finally:
                    state["publishing"] = False
            atomic.publish = publish
            for module, name in ((os, "link"), (os, "replace"), (os, "rename"),
                                 (atomic, "_renameat2")):
                wrap(module, name, lambda: state["publishing"] and hold_here())


def wait_exit(pid: int, timeout: float = 120.0) -> int | None:
    """Reap ``pid``: its exit code, or None if a signal ended it.  A child still running after
    ``timeout`` seconds is killed and TimeoutError raised (a hang is a failure too); so is one
    whose wait is cut short by any other exception (Ctrl-C, pytest-timeout), so that no child
    outlives the wait."""
    import time

    deadline = time.monotonic() + timeout
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None
            if time.monotonic() > deadline:
                raise TimeoutError(f"process {pid} still running after {timeout} s; killed")
            time.sleep(0.005)
    except ChildProcessError:
        raise  # not our child, or already reaped: nothing to kill
    except BaseException:
        _kill_and_reap(pid)
        raise


def wait_all(pids: list[int], timeout: float = 120.0) -> list[int | None]:
    """:func:`wait_exit` each of ``pids`` in turn; if one fails, kill and reap the rest too."""
    codes = []
    try:
        for pid in pids:
            codes.append(wait_exit(pid, timeout))
    finally:
        for pid in pids[len(codes) + 1:]:  # wait_exit has already killed pids[len(codes)]
            _kill_and_reap(pid)
    return codes


def _kill_and_reap(pid: int) -> None:
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # SIGKILL cannot be ignored: this returns promptly


def tree_digest(path: Path) -> str | None:
    """sha256 over a file's bytes or a folder's (relative name, bytes) pairs; None if absent."""
    import hashlib

    path = Path(path)
    if not path.exists():
        return None
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else "").encode() + b"\0")
        h.update(file.read_bytes())
    return h.hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Temporaries (``.NAME.sstmp-PID-...``) in ``folder``."""
    return sorted(p.name for p in Path(folder).iterdir() if ".sstmp-" in p.name)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
