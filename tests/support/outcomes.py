"""Running every operation (``info``, ``verify`` with and without the base, ``restore``, ``stitch``)
on a case and classifying each outcome against the reference reader's verdict:
*detected*, *identical*, *faithful* (good) or *crashed*, *silent*, *unnamed*, *leftover* (defects)."""

from __future__ import annotations

import json
import random
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import sparsestitch
from sparsestitch.core.errors import SparsestitchError

from .damage import Case, flip
from .reference import (
    Decoded,
    Invalid,
    Listing,
    read_tensors,
    reference_decode,
    reference_listing,
)

OPS = ("info", "cli_info", "verify", "verify_base", "restore", "stitch", "verify_runs",
       "restore_runs")
#: Operations that read the base checkpoint.
BASE_OPS = ("verify_base", "restore", "stitch", "restore_runs")
#: The budget of the ``*_runs`` operations: so small that every record is decoded in runs
#: (:class:`~sparsestitch.delta.format.RecordCursor`), the path large records take.
RUNS_BUDGET = "64KiB"
#: Outcomes that are acceptable; every other one is a defect.
GOOD = ("detected", "identical", "faithful")

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
        if op == "verify_runs":
            return "ok", _info_summary(sparsestitch.verify(delta, max_memory=RUNS_BUDGET))
        out = ctx.output(op)
        if op == "restore":
            sparsestitch.restore(base, delta, out)
        elif op == "restore_runs":
            sparsestitch.restore(base, delta, out, max_memory=RUNS_BUDGET)
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
        op = {"verify_runs": "verify", "restore_runs": "restore"}.get(op, op)
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
    from sparsestitch.core.dtypes import dtype as lookup
    from sparsestitch.delta.format import DeltaWriter, Record, encode_record

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


