"""Lossless deltas against lmzip: sparsestitch ``lossless=True`` and ``lmz append``, same files.

For each (base, fine-tune) pair:

* **sparsestitch**: ``compress(base, ft, out, lossless=True)`` (every changed element,
  exactly), then ``restore`` and a bit-for-bit comparison of every tensor with the fine-tune;
  bytes, seconds of each, and the split of the payload into position and value bytes;
* **lmzip** (``lmz``, ZipNN's successor, installed in its own virtual environment): an
  archive of the base (``lmz compress``, made once per base and copied), then ``lmz append``
  of the fine-tune; its delta is the archive's size after the append minus before.  lmz
  codes each fine-tuned tensor as the XOR with the base tensor of the same name when a
  sample says that is smaller (plane split, per-plane rANS/zstd).  ``lmz extract`` of the
  appended member is compared byte for byte with the fine-tune file;
* optionally (``--before SRC``) the same sparsestitch runs from another source tree (the
  code before a codec change), so the table shows before and after.

Reported per pair: elements, changed fraction, bytes, bits per changed element, bits per
parameter, the ratio sparsestitch / lmz, seconds.  Jobs of one pair run in turn (before,
after, lmz), ``--repeat`` rounds interleaved, each in a fresh process (:mod:`common`).

Pairs (``--pairs``, comma-separated names or ``all``):

* ``step1-bf16``, ``step4-bf16``, ``step1-f32``, ``step4-f32``: SmolLM2-135M after 1 and 4
  AdamW steps (``bench/lossless_pairs.py`` makes them, in ``bench/.cache/lossless/pairs``);
* ``news-bf16``, ``dialog-bf16``, ``news-f32``, ``dialog-f32``: the fidelity benchmark's
  full fine-tunes of SmolLM2 (``/work/cache/fidelity/smollm``);
* ``minilm-<task>``: all-MiniLM-L6-v2 fine-tunes (seed 0; f32).

Usage (the lmz environment is git-ignored)::

    python3.11 -m venv bench/.cache/lossless/lmzip-venv
    bench/.cache/lossless/lmzip-venv/bin/pip install 'lmzip[zstd]==1.3.0'
    /work/venv-bench/bin/python bench/lossless_pairs.py          # the training-step pairs
    python bench/lossless.py --before bench/.cache/lossless/src-before

Writes ``bench/results/lossless.json`` (``--json``) and prints the table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from common import (describe_machine, interleaved, machine, sparsestitch_module,  # noqa: E402
                    table, write_json)

CACHE = BENCH / ".cache" / "lossless"
LMZ = CACHE / "lmzip-venv" / "bin" / "lmz"
FIDELITY = Path("/work/cache/fidelity")
MINILM_TASKS = ("bbc", "language", "names", "tweets")


def pairs(fidelity: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (base folder, fine-tune folder)."""
    smol = fidelity / "smollm"
    out = {}
    for steps in (1, 4):
        out[f"step{steps}-bf16"] = (smol / "base-bf16", CACHE / "pairs" / f"step{steps}-bf16")
        out[f"step{steps}-f32"] = (smol / "base", CACHE / "pairs" / f"step{steps}-f32")
    for name in ("news", "dialog"):
        out[f"{name}-bf16"] = (smol / "base-bf16", smol / f"ft-{name}-bf16")
        out[f"{name}-f32"] = (smol / "base", smol / f"ft-{name}")
    for task in MINILM_TASKS:
        out[f"minilm-{task}"] = (fidelity / "minilm" / "base",
                                 fidelity / "minilm" / "seed0" / "finetuned" / task)
    return out


# ------------------------------------------------------------- jobs run in child processes

def compress_job(base: str, tune: str, out: str) -> dict:
    """sparsestitch lossless compress; bytes, positions/values split, codecs, source tree."""
    import sparsestitch
    DeltaReader = sparsestitch_module("sparsestitch.delta.format").DeltaReader

    (summary,) = sparsestitch.compress(base, tune, out, lossless=True, overwrite=True)
    positions = values = 0
    codecs: dict[str, int] = {}
    with DeltaReader(out) as reader:
        version = reader.header["format_version"]
        for record in reader.records:
            if record.kind == "base":
                continue
            positions += record.positions_nbytes
            values += record.values_nbytes
            key = f"{record.positions['codec']}+{record.values['codec']}"
            codecs[key] = codecs.get(key, 0) + record.nbytes
    return {"nbytes": summary.nbytes, "kept": summary.kept, "positions_nbytes": positions,
            "values_nbytes": values, "codec_bytes": codecs, "format_version": version,
            "source": str(Path(sparsestitch.__file__).resolve().parent.parent)}


def restore_job(base: str, delta: str, out: str) -> dict:
    import sparsestitch

    sparsestitch.restore(base, delta, out, overwrite=True)
    return {}


def lmz_append_job(lmz: str, archive: str, base_archive: str, member: str) -> dict:
    """``lmz append`` to a fresh copy of the base's archive (the copy is not timed)."""
    shutil.copyfile(base_archive, archive)
    started = time.perf_counter()
    subprocess.run([lmz, "append", "-q", archive, member], check=True)
    return {"seconds": time.perf_counter() - started,
            "nbytes": os.path.getsize(archive) - os.path.getsize(base_archive)}


def lmz_extract_job(lmz: str, archive: str, member: str, out: str) -> dict:
    if os.path.exists(out):
        os.unlink(out)
    started = time.perf_counter()
    subprocess.run([lmz, "extract", archive, member, out], check=True,
                   stdout=subprocess.DEVNULL)
    return {"seconds": time.perf_counter() - started}


# ------------------------------------------------------------- the driver

def model_file(folder: Path) -> Path:
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise SystemExit(f"{folder}: expected one .safetensors file, found {len(files)}")
    return files[0]


def changed_elements(base: Path, tune: Path) -> tuple[int, int, dict[str, int]]:
    """(elements, elements whose bits differ, dtypes by elements) over the base's tensors."""
    from sparsestitch.checkpoint import Checkpoint

    total = changed = 0
    dtypes: dict[str, int] = {}
    with Checkpoint(base) as b, Checkpoint(tune) as t:
        for name in b.names:
            x, y = b.read(name), t.read(name)
            total += x.size
            changed += int((x != y).sum())
            dtype = b.entry(name).dtype
            dtypes[dtype] = dtypes.get(dtype, 0) + x.size
    return total, changed, dtypes


def same_tensors(a: Path, b: Path) -> bool:
    from sparsestitch.checkpoint import Checkpoint

    with Checkpoint(a) as x, Checkpoint(b) as y:
        if sorted(x.names) != sorted(y.names):
            return False
        return all(x.entry(n).dtype == y.entry(n).dtype and (x.read(n) == y.read(n)).all()
                   for n in x.names)


def lmz_base_archive(lmz: Path, base: Path, work: Path) -> tuple[Path, int]:
    """The base's archive (made once per base file: a folder holding only model.safetensors)."""
    key = base.parent.name + "-" + base.parent.parent.name
    archive = work / f"base-{key}.lmz"
    if not archive.exists():
        folder = work / f"base-{key}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        os.link(base, folder / "model.safetensors")
        subprocess.run([str(lmz), "compress", "-q", "-f", str(folder), str(archive)], check=True)
        shutil.rmtree(folder)
    return archive, archive.stat().st_size


def run_pair(name: str, base_dir: Path, tune_dir: Path, args, work: Path) -> dict:
    base, tune = model_file(base_dir), model_file(tune_dir)
    total, changed, dtypes = changed_elements(base, tune)
    print(f"{name}: {total:,} elements, {changed:,} changed ({100 * changed / total:.2f}%)",
          flush=True)
    trees = {"after": ROOT}
    if args.before:
        trees = {"before": Path(args.before).resolve(), **trees}
    member = work / "member" / f"ft-{name}.safetensors"  # lmz names members by file name
    member.parent.mkdir(parents=True, exist_ok=True)
    if member.exists():
        member.unlink()
    os.link(tune, member)
    archive, archive_size = lmz_base_archive(args.lmz, base, work)
    jobs = {f"compress-{label}": {"target": "lossless:compress_job",
                                  "args": (str(base_dir), str(tune_dir),
                                           str(work / f"{name}-{label}.delta")),
                                  "sys_path": [str(tree), str(BENCH)]}
            for label, tree in trees.items()}
    jobs["lmz-append"] = {"target": "lossless:lmz_append_job",
                          "args": (str(args.lmz), str(work / f"{name}.lmz"), str(archive),
                                   str(member)),
                          "sys_path": [str(BENCH)]}
    runs = interleaved(args.repeat, jobs)
    restores = {f"restore-{label}": {"target": "lossless:restore_job",
                                     "args": (str(base_dir), str(work / f"{name}-{label}.delta"),
                                              str(work / f"{name}-{label}-restored")),
                                     "sys_path": [str(tree), str(BENCH)]}
                for label, tree in trees.items()}
    restores["lmz-extract"] = {"target": "lossless:lmz_extract_job",
                               "args": (str(args.lmz), str(work / f"{name}.lmz"), member.name,
                                        str(work / f"{name}-lmz-extracted.safetensors")),
                               "sys_path": [str(BENCH)]}
    runs.update(interleaved(args.repeat, restores))
    result = {"name": name, "base": str(base), "finetuned": str(tune), "elements": total,
              "changed": changed, "changed_fraction": changed / total, "dtypes": dtypes,
              "lmz_base_archive_nbytes": archive_size}
    for label in trees:
        done = runs[f"compress-{label}"]["result"]
        exact = same_tensors(tune, model_file(work / f"{name}-{label}-restored"))
        if not exact:
            raise SystemExit(f"{name}: sparsestitch ({label}) did not restore the fine-tune")
        result[label] = {**done, "restored_exactly": exact,
                         "compress_s": runs[f"compress-{label}"]["best_s"],
                         "restore_s": runs[f"restore-{label}"]["best_s"],
                         "compress_all_s": runs[f"compress-{label}"]["all_s"],
                         "restore_all_s": runs[f"restore-{label}"]["all_s"]}
        shutil.rmtree(work / f"{name}-{label}-restored", ignore_errors=True)
    lmz_bytes = runs["lmz-append"]["result"]["nbytes"]
    extracted = work / f"{name}-lmz-extracted.safetensors"
    lmz_exact = extracted.read_bytes() == tune.read_bytes()
    if not lmz_exact:
        raise SystemExit(f"{name}: lmz extract did not give the fine-tune back")
    extracted.unlink()
    (work / f"{name}.lmz").unlink()
    member.unlink()
    result["lmz"] = {"nbytes": lmz_bytes, "restored_exactly": lmz_exact,
                     "append_s": min(r for r in [runs["lmz-append"]["result"]["seconds"]]),
                     "append_process_s": runs["lmz-append"]["best_s"],
                     "extract_s": runs["lmz-extract"]["best_s"]}
    for label in trees:
        mine = result[label]["nbytes"]
        result[label]["bits_per_changed"] = 8 * mine / changed if changed else None
        result[label]["bits_per_parameter"] = 8 * mine / total
        result[label]["ratio_to_lmz"] = mine / lmz_bytes
    result["lmz"]["bits_per_changed"] = 8 * lmz_bytes / changed if changed else None
    result["lmz"]["bits_per_parameter"] = 8 * lmz_bytes / total
    return result


def rows(results: list[dict], labels: list[str]) -> list[dict]:
    out = []
    for r in results:
        row = {"pair": r["name"], "changed": 100 * r["changed_fraction"],
               "lmz_mb": r["lmz"]["nbytes"] / 1e6, "lmz_bpc": r["lmz"]["bits_per_changed"],
               "lmz_s": r["lmz"]["append_s"], "lmz_x": r["lmz"]["extract_s"]}
        for label in labels:
            row[f"{label}_mb"] = r[label]["nbytes"] / 1e6
            row[f"{label}_bpc"] = r[label]["bits_per_changed"]
            row[f"{label}_bpp"] = r[label]["bits_per_parameter"]
            row[f"{label}_ratio"] = r[label]["ratio_to_lmz"]
            row[f"{label}_c"] = r[label]["compress_s"]
            row[f"{label}_r"] = r[label]["restore_s"]
        out.append(row)
    return out


def columns(labels: list[str]) -> list[tuple[str, str, str]]:
    cols = [("pair", "pair", "{}"), ("changed", "changed %", "{:.2f}"),
            ("lmz_mb", "lmz MB", "{:.2f}"), ("lmz_bpc", "lmz b/chg", "{:.2f}")]
    for label in labels:
        cols += [(f"{label}_mb", f"{label} MB", "{:.2f}"),
                 (f"{label}_bpc", f"{label} b/chg", "{:.2f}"),
                 (f"{label}_bpp", f"{label} b/par", "{:.2f}"),
                 (f"{label}_ratio", f"{label}/lmz", "{:.3f}")]
    cols += [("lmz_s", "lmz append s", "{:.1f}"), ("lmz_x", "lmz extract s", "{:.1f}")]
    for label in labels:
        cols += [(f"{label}_c", f"{label} compress s", "{:.1f}"),
                 (f"{label}_r", f"{label} restore s", "{:.1f}")]
    return cols


def lmz_version(lmz: Path) -> str:
    done = subprocess.run([str(lmz), "--version"], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def lmz_doctor(lmz: Path) -> str:
    done = subprocess.run([str(lmz), "doctor"], capture_output=True, text=True)
    return done.stdout


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default="all")
    parser.add_argument("--fidelity", type=Path, default=FIDELITY)
    parser.add_argument("--lmz", type=Path, default=LMZ)
    parser.add_argument("--before", help="a sparsestitch source tree to compare (built)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--work", type=Path, default=CACHE / "work")
    parser.add_argument("--json", type=Path, default=BENCH / "results" / "lossless.json")
    args = parser.parse_args(argv)
    available = pairs(args.fidelity)
    names = list(available) if args.pairs == "all" else args.pairs.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    results = [run_pair(name, *available[name], args, args.work) for name in names]
    labels = (["before"] if args.before else []) + ["after"]
    info = machine()
    text = table(rows(results, labels), columns(labels))
    print(f"\n{describe_machine(info)}; {lmz_version(args.lmz)}\n{text}")
    write_json(args.json, {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": info, "lmz_version": lmz_version(args.lmz), "lmz_doctor": lmz_doctor(args.lmz),
        "before_source": args.before, "repeat": args.repeat, "pairs": results, "table": text})


if __name__ == "__main__":
    main()
