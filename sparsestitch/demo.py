"""``sparsestitch demo``: the main job end to end on a built-in example zoo."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint
from .errors import OutputError
from .compress import compress
from .format import DeltaReader
from .restore import restore
from .stitch import stitch
from .synthetic import write_zoo


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
    """Build a base + ``tasks`` fine-tunes of about ``size_mb`` MB each, compress them at 1%,
    restore one (checking it bit for bit at every stored position), stitch all; print a table.

    ``workdir`` (default :func:`default_workdir`) must be absent, empty, or a folder an
    earlier demo made; see :func:`prepare_workdir`."""
    workdir = default_workdir() if workdir is None else Path(workdir)
    prepare_workdir(workdir)
    timings = {}
    started = time.perf_counter()
    base, tunes = write_zoo(workdir, size_mb << 20, tasks)
    timings["build zoo"] = time.perf_counter() - started
    echo(f"built {base} and {tasks} fine-tunes ({_folder_bytes(base) / 1e6:.0f} MB each) "
         f"in {timings['build zoo']:.1f} s")

    deltas = [workdir / f"{t.name}.delta" for t in tunes]
    started = time.perf_counter()
    summaries = compress(base, tunes, deltas, density=0.01)
    timings["compress"] = time.perf_counter() - started

    restored = workdir / "task0-restored"
    started = time.perf_counter()
    restore(base, deltas[0], restored)
    timings["restore"] = time.perf_counter() - started
    exact, changed = _check_restore(tunes[0], restored, deltas[0])

    merged = workdir / "merged"
    started = time.perf_counter()
    stitch(base, deltas, merged)
    timings["stitch"] = time.perf_counter() - started

    dense = _folder_bytes(tunes[0])
    echo("")
    echo(f"{'delta':<14} {'bytes':>12} {'vs dense':>9} {'kept':>12} {'bits/kept':>10}")
    for s in summaries:
        echo(f"{s.path.name:<14} {s.nbytes:>12,} {dense / s.nbytes:>8.1f}x {s.kept:>12,} "
             f"{8 * s.nbytes / s.kept:>10.2f}")
    echo("")
    echo(f"{'step':<28} {'seconds':>8}")
    echo(f"{'compress ' + str(tasks) + ' fine-tunes':<28} {timings['compress']:>8.2f}")
    echo(f"{'restore task0':<28} {timings['restore']:>8.2f}")
    echo(f"{'stitch ' + str(tasks) + ' deltas':<28} {timings['stitch']:>8.2f}")
    echo("")
    echo(f"restore check: all {exact:,} stored positions are bit-identical to the fine-tune; "
         f"the other {changed:,} (smallest) changes stay at the base value, as a 1% delta intends")
    echo(f"outputs in {workdir}/: base/, task*/, *.delta, task0-restored/, merged/")
    return {"summaries": summaries, "timings": timings, "exact": exact}


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
