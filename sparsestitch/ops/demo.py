"""``sparsestitch demo``: the main job end to end on a built-in example zoo."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint
from ..checkpoint.synthetic import write_zoo
from ..core.dtypes import dtype as lookup_dtype
from ..core.dtypes import to_wide
from ..core.errors import OutputError
from ..delta.format import DeltaReader
from .compress import compress
from .restore import restore
from .stitch import stitch

#: Written into every folder the demo makes: only such a folder is ever cleared by a rerun.
MARKER = ".sparsestitch-demo"


def default_workdir() -> Path:
    """Where the demo writes by default: the system's temporary folder, not the current one
    (the example zoo takes about 650 MB)."""
    return Path(tempfile.gettempdir()) / "sparsestitch-demo"


def prepare_workdir(workdir: Path) -> None:
    """Make ``workdir`` empty for a run: create it, or clear one an earlier demo made.

    A folder the demo did not make (no :data:`MARKER` in it) is refused unless it is empty:
    it may hold the user's files.
    """
    if workdir.exists() or workdir.is_symlink():
        if not workdir.is_dir() or workdir.is_symlink():
            raise OutputError("the demo's work folder exists and is not a folder; choose another "
                              "--workdir", path=workdir)
        if any(workdir.iterdir()) and not (workdir / MARKER).is_file():
            raise OutputError("this folder was not made by the demo and is not empty; the demo "
                              "only clears folders it made. Choose another --workdir (or an "
                              "empty folder)", path=workdir)
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by `sparsestitch demo`; a rerun clears this folder\n")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")


def run_demo(workdir: str | Path | None = None, *, size_mb: int = 100, tasks: int = 3,
             echo=print) -> dict:
    """Build a base + ``tasks`` fine-tunes of about ``size_mb`` MB each; compress them with
    the default (a fidelity target: what a user gets with no option) and at the paper's 1%;
    restore one from each (the default within its reported error, the 1% one bit for bit at
    every stored position, both checked); stitch the 1% deltas, and the default deltas
    localized again (``keep=0.01``); print tables.

    ``workdir`` (default :func:`default_workdir`) must be absent, empty, or a folder an
    earlier demo made; see :func:`prepare_workdir`."""
    workdir = default_workdir() if workdir is None else Path(workdir)
    prepare_workdir(workdir)
    timings = {}

    def timed(label, work):
        started = time.perf_counter()
        result = work()
        timings[label] = time.perf_counter() - started
        return result

    base, tunes = timed("build zoo", lambda: write_zoo(workdir, size_mb << 20, tasks))
    echo(f"built {base} and {tasks} fine-tunes ({_folder_bytes(base) / 1e6:.0f} MB each) "
         f"in {timings['build zoo']:.1f} s")
    deltas = [workdir / f"{t.name}.delta" for t in tunes]
    one_percent = [workdir / f"{t.name}-1pct.delta" for t in tunes]
    defaults = timed(f"compress {tasks} fine-tunes (default)", lambda: compress(base, tunes, deltas))
    sparse = timed(f"compress {tasks} fine-tunes (1%)",
                   lambda: compress(base, tunes, one_percent, density=0.01))

    restored = workdir / "task0-restored"
    timed("restore task0 (default)", lambda: restore(base, deltas[0], restored))
    error = _restored_error(base, tunes[0], restored)
    restored_1pct = workdir / "task0-restored-1pct"
    timed("restore task0 (1%)", lambda: restore(base, one_percent[0], restored_1pct))
    exact, changed = _check_restore(tunes[0], restored_1pct, one_percent[0])

    merged = workdir / "merged"
    timed(f"stitch {tasks} deltas (1%)", lambda: stitch(base, one_percent, merged))
    localized = workdir / "merged-keep"
    timed(f"stitch {tasks} deltas (default, keep 1%)",
          lambda: stitch(base, deltas, localized, keep=0.01))

    dense = _folder_bytes(tunes[0])
    echo("")
    echo(f"{'delta':<18} {'bytes':>12} {'vs dense':>9} {'kept':>12} {'bits/kept':>10} "
         f"{'rel. error':>10}")
    for s in [*defaults, *sparse]:
        echo(f"{s.path.name:<18} {s.nbytes:>12,} {dense / s.nbytes:>8.1f}x {s.kept:>12,} "
             f"{8 * s.nbytes / s.kept:>10.2f} {s.fidelity.get('relative_error', 0.0):>10.3f}")
    echo("")
    echo(f"{'step':<40} {'seconds':>8}")
    for label, seconds in timings.items():
        if label != "build zoo":
            echo(f"{label:<40} {seconds:>8.2f}")
    echo("")
    report = defaults[0].fidelity
    echo(f"default delta (task0.delta, what compress writes with no option): restored with a "
         f"relative error of {error:.3f} of the fine-tuning change (its header reports "
         f"{report.get('relative_error', 0.0):.3f}; worst tensor "
         f"{report.get('worst_tensor_relative_error', 0.0):.3f}, the target is 0.5)")
    echo(f"1% delta (task0-1pct.delta): restore check: all {exact:,} stored positions are "
         f"bit-identical to the fine-tune; the other {changed:,} (smallest) changes stay at "
         "the base value, as a 1% delta intends")
    echo(f"outputs in {workdir}/: base/, task*/, *.delta, task0-restored*/, merged/, merged-keep/")
    return {"summaries": defaults, "summaries_1pct": sparse, "timings": timings,
            "exact": exact, "relative_error": error}


def _restored_error(base: Path, tune: Path, restored: Path) -> float:
    """||restored - tune|| / ||tune - base|| over the float tensors (float64 sums)."""
    lost = change = 0.0
    with Checkpoint(base) as b, Checkpoint(tune) as t, Checkpoint(restored) as r:
        for name in t.names:
            dt = lookup_dtype(b.entry(name).dtype)
            if not dt.is_float:
                continue
            base_values, tuned, got = (to_wide(c.read(name).reshape(-1), dt).astype(np.float64)
                                       for c in (b, t, r))
            lost += float(np.sum((got - tuned) ** 2))
            change += float(np.sum((tuned - base_values) ** 2))
    return (lost / change) ** 0.5 if change else 0.0


def _check_restore(tune: Path, restored: Path, delta: Path) -> tuple[int, int]:
    """Count stored positions equal to the fine-tune bit for bit; raise if any differs."""
    exact = unstored = 0
    with Checkpoint(tune) as want, Checkpoint(restored) as got, DeltaReader(delta) as reader:
        for record in reader.records:
            if record.kind == "base":
                continue
            positions = reader.positions(record)
            a = want.read(record.name).reshape(-1)[positions]
            b = got.read(record.name).reshape(-1)[positions]
            if not np.array_equal(a, b):
                raise AssertionError(f"restore differs from the fine-tune in {record.name}")
            exact += positions.size
        for name in want.names:
            unstored += int((want.read(name) != got.read(name)).sum())
    return exact, unstored
