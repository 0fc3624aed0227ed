"""A reference reader written from docs/format.md alone: it decides whether a file is valid and
what it decodes to, so that "silently wrong" is measurable for crafted files too.  It shares
nothing with the library but the dtype conversions of format.md section 5 and xxh3."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from sparsestitch.delta.format import HEADER_HASH_KEY, HEADER_KEY, digest

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


def is_hex16(value) -> bool:
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
            or not _is_int(header.get("format_version"))
            or header["format_version"] not in (1, 2, 3, 4)):
        raise Invalid("not a version 1 to 4 delta header")
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
        if (r.get("base_xxh3") is not None) if kind == "added" else not is_hex16(r.get("base_xxh3")):
            raise Invalid("bad base_xxh3", name)
        entry = entries.get(name)
        if kind == "base":
            if entry is not None:
                raise Invalid("unchanged tensor has a payload", name)
            continue
        fields = [r.get(k) for k in ("count", "positions_nbytes", "values_nbytes")]
        if (not all(_is_int(v) and v >= 0 for v in fields) or fields[0] > _numel(shape)
                or not isinstance(r.get("positions"), dict) or not isinstance(r.get("values"), dict)
                or not isinstance(r["positions"].get("codec"), str)
                or not isinstance(r["values"].get("codec"), str)
                or not is_hex16(r.get("payload_xxh3"))
                or (kind == "added" and fields[0] != _numel(shape))):
            raise Invalid("bad record fields", name)
        quant = r["values"].get("codec") == "quant"
        if quant and header["format_version"] < 2:
            raise Invalid("quant values in a version 1 file", name)
        if r["values"].get("codec") == "ulp" and header["format_version"] < 3:
            raise Invalid("ulp values in a version 1 or 2 file", name)
        lowrank = r["values"].get("codec") == "lowrank"
        if lowrank and header["format_version"] < 4:
            raise Invalid("lowrank values in a version 1 to 3 file", name)
        if lowrank and (r["positions"].get("codec") != "all" or len(shape) < 2
                        or r["values"].get("rows") != shape[0]):
            raise Invalid("lowrank values need positions all over 2+ dimensions, rows = shape[0]",
                          name)
        # Every value codec stores at least count bytes in raw or zstd streams (quant: bits;
        # lowrank: factors of many values each).
        per_byte = 1 << 16 if lowrank else 8 if quant else 1
        if fields[0] > ZSTD_MAX_EXPANSION * per_byte * fields[2]:
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
    from sparsestitch.core.dtypes import dtype as lookup
    from sparsestitch.core.dtypes import from_wide, to_wide

    name, count, config, dt = r["name"], r["count"], r["values"], lookup(r["dtype"])
    codec, width = config.get("codec"), dt.itemsize
    if codec == "raw":
        return np.array(_planes(_stream(part, config, count * width, name), width, count), dt.bits)
    if codec not in ("xor", "tau", "quant", "ulp", "lowrank"):
        raise Invalid(f"unknown value codec {codec!r}", name)
    if codec == "lowrank":
        if r["dtype"] not in _FLOATS:
            raise Invalid("lowrank needs a float dtype", name)
        if base_kept is None:
            raise Invalid("lowrank needs the base", name)
        return _lowrank_values(r, part, base_kept)
    if codec == "ulp":
        if r["dtype"] not in _FLOATS:
            raise Invalid("ulp needs a float dtype", name)
        if base_kept is None:
            raise Invalid("ulp needs the base", name)
        return _ulp_values(r, part, base_kept)
    if codec == "quant":
        if base_kept is None:
            raise Invalid("quant needs the base", name)
        return _quant_values(r, part, base_kept)
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


def _lowrank_values(r: dict, part: bytes, base_kept: np.ndarray) -> np.ndarray:
    """format.md 4.3, lowrank: written from the text; bits read as Python integers, the
    sum in the spec's order, one component at a time over every element."""
    from sparsestitch.core.dtypes import dtype as lookup
    from sparsestitch.core.dtypes import from_wide, to_wide

    name, count, config, dt = r["name"], r["count"], r["values"], lookup(r["dtype"])
    rows = _int_field(config, "rows", 1, max(count, 1), name)
    cols = _int_field(config, "cols", 1, max(count, 1), name)
    if rows * cols != count:
        raise Invalid("lowrank rows x cols is not count", name)
    rank = _int_field(config, "rank", 0, min(rows, cols), name)
    bits = config.get("bits")
    if not isinstance(bits, list) or len(bits) != rank or not all(
            _is_int(k) and 1 <= k <= 8 for k in bits):
        raise Invalid("lowrank bits", name)
    if config.get("scale_dtype") not in ("F32", "F64"):
        raise Invalid("lowrank scale_dtype", name)
    scale_dt = lookup(config["scale_dtype"])
    sizes = [_int_field(config, k, 0, len(part), name)
             for k in ("scales_nbytes", "right_nbytes", "left_nbytes")]
    if sum(sizes) != len(part):
        raise Invalid("lowrank stream sizes", name)
    width = sum(bits)
    a, b = sizes[0], sizes[0] + sizes[1]
    scales = _planes(_stream(part[:a], config.get("scales"), 2 * rank * scale_dt.itemsize, name),
                     scale_dt.itemsize, 2 * rank)
    steps = to_wide(np.array(scales, scale_dt.bits), scale_dt).astype(dt.wide)

    def factor(raw: bytes, n: int, first_step: int) -> np.ndarray:
        value = int.from_bytes(raw, "little")
        if value >> (n * width):
            raise Invalid("lowrank bits past the last entry", name)
        out = np.empty((n, rank), dt.wide)
        for j in range(n):
            at = j * width
            for i, k in enumerate(bits):
                sign, level = (value >> at) & 1, (value >> (at + 1)) & ((1 << (k - 1)) - 1)
                entry = steps[first_step + i] * dt.wide.type(2 * level + 1)
                out[j, i] = -entry if sign else entry
                at += k
        return out
    right = factor(_stream(part[a:b], config.get("right"), (cols * width + 7) // 8, name),
                   cols, rank)
    left = factor(_stream(part[b:], config.get("left"), (rows * width + 7) // 8, name), rows, 0)
    acc = np.zeros((rows, cols), dt.wide)
    with np.errstate(all="ignore"):
        for i in range(rank):
            acc = acc + left[:, i:i + 1] * right[:, i][None, :]
        return from_wide(to_wide(base_kept, dt) + acc.reshape(-1), dt)


def _ulp_values(r: dict, part: bytes, base_kept: np.ndarray) -> np.ndarray:
    """format.md 4.3, ulp: written from the text, one value at a time, in Python integers."""
    name, count, width = r["name"], r["count"], _ITEMSIZE[r["dtype"]]
    mantissa = {"F64": 52, "F32": 23, "F16": 10, "BF16": 7}[r["dtype"]]
    field = (1 << (8 * width - 1 - mantissa)) - 1
    ones, top = (1 << (8 * width)) - 1, 1 << (8 * width - 1)
    stored = _planes(_stream(part, r["values"], count * width, name), width, count)
    bases = [int(b) for b in base_kept]
    order = sorted(range(count), key=lambda i: ((bases[i] >> mantissa) & field, i))
    out = [0] * count
    for z, i in zip(stored, order):
        distance = (z >> 1) ^ (ones if z & 1 else 0)
        base = bases[i]
        key = (base ^ (ones if base & top else top)) + distance & ones
        out[i] = key ^ (top if key & top else ones)
    return np.array(out, dtype=base_kept.dtype)


def _quant_values(r: dict, part: bytes, base_kept: np.ndarray) -> np.ndarray:
    """format.md 4.3, quant: written from the text, one value at a time where it matters."""
    from sparsestitch.core.dtypes import dtype as lookup
    from sparsestitch.core.dtypes import from_wide, to_wide

    name, count, config, dt = r["name"], r["count"], r["values"], lookup(r["dtype"])
    if r["dtype"] not in _FLOATS:
        raise Invalid("quant needs a float dtype", name)
    k = config.get("bits")
    if not _is_int(k) or k not in (1, 2, 3, 4, 8):
        raise Invalid("bad bits", name)
    group = _int_field(config, "group", 0, max(count, 1), name)
    if config.get("scale_dtype") not in ("BF16", "F32", "F64"):
        raise Invalid("bad scale_dtype", name)
    scale_dt = lookup(config["scale_dtype"])
    n_exc = _int_field(config, "exceptions", 0, count, name)
    sizes = [_int_field(config, key, 0, len(part), name) for key in
             ("codes_nbytes", "scales_nbytes", "exc_index_nbytes", "exc_bits_nbytes")]
    if sum(sizes) != len(part):
        raise Invalid("quant stream sizes", name)
    cuts = np.cumsum([0] + sizes)
    streams = [part[cuts[i]:cuts[i + 1]] for i in range(4)]
    n = count - n_exc
    groups = 0 if n == 0 else (1 if group == 0 else -(-n // group))
    per_group = 1 if k == 1 else 2
    codes = _stream(streams[0], config.get("codes"), (n * k + 7) // 8, name)
    scale_bits = _planes(_stream(streams[1], config.get("scales"),
                                 groups * per_group * scale_dt.itemsize, name),
                         scale_dt.itemsize, groups * per_group)
    index_raw = _stream(streams[2], config.get("exc_index"), n_exc * 4, name)
    index = _from_gaps(_planes(index_raw, 4, n_exc))
    if index and index[-1] >= count:
        raise Invalid("exception index out of range", name)
    width = dt.itemsize
    exact = _planes(_stream(streams[3], config.get("exc_bits"), n_exc * width, name), width, n_exc)
    bit_string = np.unpackbits(np.frombuffer(codes, np.uint8), bitorder="little")
    if bit_string[n * k:].any():
        raise Invalid("quant code bits past the last value", name)

    def wide_scale(bits: int):
        return to_wide(np.array([bits], scale_dt.bits), scale_dt).astype(dt.wide)[0]

    values = np.empty(count, dt.bits)
    exceptions = set(index)
    regular = [i for i in range(count) if i not in exceptions]
    with np.errstate(all="ignore"):
        for i, at in enumerate(regular):
            j = 0 if group == 0 else i // group
            a = wide_scale(scale_bits[j])
            b = wide_scale(scale_bits[groups + j]) if k > 1 else dt.wide.type(0)
            level = sum(int(bit_string[i * k + 1 + t]) << t for t in range(k - 1))
            m = a + b * dt.wide.type(level)
            tau = -m if bit_string[i * k] else m
            base_wide = to_wide(base_kept[at:at + 1], dt)[0]
            values[at] = from_wide(np.array([base_wide + tau], dt.wide), dt)[0]
    if index:
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
    from sparsestitch.core.dtypes import dtype as lookup

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


