"""Delta files taken apart (container header, delta header, payloads) and put back together with
fresh checksums, so crafted damage gets past the checksums and reaches the decoders."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from sparsestitch.delta.format import HEADER_HASH_KEY, HEADER_KEY, digest

from .reference import is_hex16

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
                        and is_hex16(record.get("payload_xxh3"))):  # keep deliberately bad ones
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


