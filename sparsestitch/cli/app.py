"""The ``sparsestitch`` command: parse, call the API, print (tables for people, ``--json``)."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import click

from .. import __version__
from ..core import native
from .common import (
    allow_crimes_option,
    echo_json,
    echo_table,
    fail_cleanly,
    json_option,
    keep_flags,
    natural_key,
    parse_weights,
    quiet_option,
    rule_flags,
    rule_options,
    show_progress,
    shown,
    threads_option,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sparsestitch",
                      message=f"%(prog)s %(version)s ({native.describe()})")
def main():
    """Store fine-tuned models as tiny sparse deltas against their base; restore or stitch them.

    \b
    Examples:
      sparsestitch compress base/ math-ft/ code-ft/ -o math.delta -o code.delta --density 0.01
      sparsestitch restore base/ math.delta -o math-restored/
      sparsestitch stitch base/ math.delta code.delta -o merged/
      sparsestitch merge base/ math-ft/ code-ft/ -o merged/ --rule ties  # from full fine-tunes
      sparsestitch info math.delta
      sparsestitch verify math.delta --base base/
      sparsestitch demo
    """


@main.command()
@click.argument("base", type=click.Path())
@click.argument("finetuned", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", "outs", multiple=True, type=click.Path(),
              help="Output delta path, once per fine-tune (default: FINETUNED name + .delta).")
@keep_flags("compress")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--max-memory", help="Bound on what compress holds at once, e.g. 512MiB "
              "(large tensors then one fine-tune at a time); default 1GiB, at least 32MiB. "
              "A tensor stored exactly (--lossless) whose selection (about 13 bytes per bf16 "
              "element) exceeds it is read twice and written through temporary files beside "
              "the output. Targets (the default, --max-error, --max-size) stream their "
              "quantized records.")
@click.option("--calibration", type=click.Path(),
              help="Activation-aware error: a plain text file run through the base (a Hugging "
              "Face causal LM folder or .gguf; needs transformers); each linear layer's change "
              "is ranked and its error measured with every input feature weighted by its root "
              "mean square activation (||(tau - tau_hat) X^T||, the diagonal of X^T X). With "
              "the targets (the default, --max-error, --max-size, --low-rank; best with a "
              "size) or an exact --density.")
@click.option("--calibration-tokens", type=int, default=4096, show_default=True,
              help="With --calibration: tokens of the text to run.")
@allow_crimes_option
@threads_option
@json_option
@quiet_option
@fail_cleanly
def compress(base, finetuned, outs, density, scope, bits, group, lossless, max_error, max_size,
             low_rank, include, exclude, dense, overwrite, max_memory, calibration,
             calibration_tokens, allow_crimes, threads, as_json, quiet):
    """Write one sparse delta per FINETUNED checkpoint of BASE.

    \b
    BASE and FINETUNED are .safetensors files, Hugging Face folders or Hub ids (org/name[@rev],
    from the local cache).
    Without options every localized tensor keeps its change within relative error 0.5
    (--max-error 0.5); --density 0.01 --scope global is the paper's 1%.
    Example: sparsestitch compress base.safetensors ft.safetensors -o ft.delta --density 0.01
    """
    from ..ops.compress import compress as run
    outs = list(outs) or [str(f).rstrip("/") + ".delta" for f in finetuned]
    summaries = run(base, list(finetuned), outs, density=density, scope=scope,
                    bits=None if bits is None else int(bits), group=group, lossless=lossless,
                    max_error=max_error, max_size=max_size, low_rank=bool(low_rank),
                    include=include, exclude=exclude, dense=dense, overwrite=overwrite,
                    threads=threads, max_memory=max_memory, allow_crimes=allow_crimes,
                    calibration=calibration, calibration_tokens=calibration_tokens,
                    progress=show_progress(quiet, as_json))
    if as_json:
        echo_json([{"path": str(s.path), "bytes": s.nbytes, "kept": s.kept,
                    "candidates": s.candidates, "density": s.density,
                    "stored_tensors": s.stored_tensors, "seconds": s.seconds,
                    "fidelity": s.fidelity, "warnings": s.warnings} for s in summaries])
        return
    for s in summaries:
        error = s.fidelity.get("relative_error")
        click.echo(f"{s.path}: {s.nbytes:,} bytes, kept {s.kept:,} of {s.candidates:,} "
                   f"({100 * s.density:.3f}%), {8 * s.nbytes / max(s.kept, 1):.2f} bits/kept, "
                   + ("lossless, " if s.fidelity.get("lossless") else
                      f"relative error {error:.4f}, " if error is not None else "")
                   + f"{s.seconds:.1f} s")


@main.command()
@click.argument("base", type=click.Path())
@click.argument("delta", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="Output file or folder.")
@click.option("--max-memory", help="Bound on the data held at once, e.g. 512MiB; default 1GiB.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@threads_option
@json_option
@quiet_option
@fail_cleanly
def restore(base, delta, out, max_memory, overwrite, threads, as_json, quiet):
    """Rebuild the fine-tuned model from BASE and DELTA.

    Exact where the delta stores exact values (--lossless deltas: the fine-tune bit for
    bit); where it stores quantized values (the default delta), close to the fine-tune
    within the relative error `info` reports.  Every parameter the delta does not store is
    the base's.  The model card of a restored folder says which.

    Example: sparsestitch restore base/ math.delta -o math-restored/
    """
    from ..ops.restore import restore as run
    started = time.perf_counter()
    run(base, delta, out, max_memory=max_memory, overwrite=overwrite, threads=threads,
        progress=show_progress(quiet, as_json))
    _report_output(out, time.perf_counter() - started, as_json)


@main.command()
@click.argument("base", type=click.Path())
@click.argument("deltas", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="Output file or folder.")
@rule_flags
@click.option("--weights", help="Comma-separated per-delta weights, e.g. 1,0.5.")
@click.option("--max-memory", help="Bound on the data held at once (row blocks, read-ahead, "
              "decoded records), e.g. 512MiB; default 1GiB. Below 512MiB one thread.")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda[:N], or auto (CUDA when present): where the merge arithmetic runs.")
@click.option("--keep", type=float,
              help="Localize each delta again before the rule: keep this fraction of its task "
                   "vector, as compress --density would (for default deltas, which are made "
                   "for restoring; e.g. --keep 0.05).")
@click.option("--scope", type=click.Choice(["fidelity", "global", "per-tensor"]),
              default="fidelity", show_default=True, help="How --keep is spread over tensors.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@threads_option
@json_option
@quiet_option
@fail_cleanly
def stitch(base, deltas, out, rule, scale, density, drop, seed, weights, max_memory, device,
           keep, scope, overwrite, threads, as_json, quiet):
    """Merge DELTAS onto BASE, tensor by tensor, with a merge rule.

    \b
    Examples:
      sparsestitch stitch base/ math.delta code.delta -o merged/ --max-memory 512MiB
      sparsestitch stitch base/ math.delta code.delta -o merged/ --keep 0.05
    """
    from ..ops.stitch import stitch as run
    options = rule_options(rule, {"--scale": scale, "--density": density, "--drop": drop,
                                   "--seed": seed})
    started = time.perf_counter()
    run(base, list(deltas), out, rule=rule, weights=parse_weights(weights), max_memory=max_memory,
        device=device, overwrite=overwrite, threads=threads, keep=keep, scope=scope,
        progress=show_progress(quiet, as_json), **options)
    _report_output(out, time.perf_counter() - started, as_json)


@main.command("stitch-add")
@click.argument("base", type=click.Path())
@click.argument("merged", type=click.Path())
@click.argument("new_delta", type=click.Path())
@click.option("--previous", "previous", multiple=True, type=click.Path(),
              help="A delta MERGED was stitched from, once per delta, in the order used.")
@click.option("-o", "--out", type=click.Path(), help="Output (default: replace MERGED).")
@rule_flags
@click.option("--weights", help="Comma-separated weights of the previous deltas and the new one.")
@click.option("--max-memory", help="Bound on the data held at once, e.g. 512MiB; default 1GiB.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@json_option
@quiet_option
@fail_cleanly
def stitch_add(base, merged, new_delta, previous, out, rule, scale, density, drop, seed, weights,
               max_memory, overwrite, as_json, quiet):
    """Add NEW_DELTA to MERGED, a model stitched from BASE and the --previous deltas.

    The result is what stitching all of them from scratch writes, recomputing only what the
    new delta changes (localize-stitch and task-arithmetic merges).

    Example: sparsestitch stitch-add base/ merged/ code.delta --previous math.delta
    """
    from ..ops.stitch import stitch_add as run
    options = rule_options(rule, {"--scale": scale, "--density": density, "--drop": drop,
                                   "--seed": seed})
    started = time.perf_counter()
    result = run(base, list(previous), new_delta, merged, out, rule=rule,
                 weights=parse_weights(weights), max_memory=max_memory, overwrite=overwrite,
                 progress=show_progress(quiet, as_json), **options)
    _report_output(result, time.perf_counter() - started, as_json)


def _report_output(out, seconds: float, as_json: bool) -> None:
    if as_json:
        path = Path(out)
        size = path.stat().st_size if path.is_file() else sum(
            p.stat().st_size for p in path.iterdir() if p.is_file())
        echo_json({"output": str(out), "bytes": size, "seconds": seconds})
    else:
        click.echo(f"wrote {out} in {seconds:.1f} s")


@main.command()
@click.argument("delta", type=click.Path())
@click.option("--all", "show_all", is_flag=True, help="List every tensor, not just stored ones.")
@click.option("--sort", type=click.Choice(["name", "bytes"]), default="name", show_default=True,
              help="Order of the tensor table (names in natural order: layers.2 before 10).")
@json_option
@fail_cleanly
def info(delta, show_all, sort, as_json):
    """Show a delta's header, per-tensor density, encoding, bytes and bits per kept value, and
    totals per layer and per kind of module.

    Example: sparsestitch info math.delta --all --sort bytes
    """
    from ..ops.describe import info as run
    result = run(delta)
    if as_json:
        echo_json(_info_json(result))
        return
    header = result.header
    click.echo(f"{result.path}: {result.file_size:,} bytes, format v{header['format_version']}, "
               f"made by sparsestitch {shown(header.get('library_version'))}")
    click.echo(f"{_how_kept(header)}, "
               f"kept {result.kept:,} of {shown(header.get('candidates'))}, "
               f"{result.bits_per_kept:.2f} bits/kept, "
               f"{result.dense_bytes / max(result.file_size, 1):.1f}x smaller than dense")
    sources = header.get("sources") if isinstance(header.get("sources"), dict) else {}
    click.echo(f"base {shown(sources.get('base'))}, fine-tune {shown(sources.get('finetuned'))}")
    fidelity = result.fidelity
    if fidelity:
        click.echo(_fidelity_line(fidelity) + _calibration_note(header))
    tensors = [t for t in result.tensors if show_all or t.kind != "base"]
    tensors.sort(key=(lambda t: -t.nbytes) if sort == "bytes" else (lambda t: natural_key(t.name)))
    echo_table([[shown(t.name), t.kind, f"{100 * t.density:.3f}%", shown(t.positions_codec or "-"),
                 shown(t.values_codec or "-"), f"{t.nbytes:,}", f"{t.bits_per_kept:.2f}",
                 "-" if t.relative_error is None else f"{t.relative_error:.4f}"]
                for t in tensors],
               ["tensor", "kind", "density", "positions", "values", "bytes", "bits/kept",
                "rel.error"], right={2, 5, 6, 7})
    for title, key in (("layer", _layer), ("module", _module)):
        groups = _totals(result.tensors, key)
        if len(groups) > 1:
            click.echo("")
            echo_table([[shown(name), f"{count:,}", f"{100 * count / max(numel, 1):.3f}%",
                         f"{nbytes:,}", f"{100 * nbytes / max(result.file_size, 1):.1f}%"]
                        for name, (count, numel, nbytes) in sorted(
                            groups.items(), key=lambda kv: natural_key(kv[0]))],
                       [title, "kept", "density", "bytes", "of file"], right={1, 2, 3, 4})


def _how_kept(header: dict) -> str:
    """How the delta chose what it kept, from its header (fields of an untrusted file: shown
    through ``shown``): a target, or the method and density asked, and quantized bits."""
    target = header.get("target")
    if isinstance(target, dict) and target:
        said = ", ".join(f"{shown(k)} {shown(v)}" for k, v in target.items())
        return f"target {said} (density and bits chosen per tensor)"
    how = f"method {shown(header.get('method'))}, density {shown(header.get('density'))}"
    quantize = header.get("quantize")
    if isinstance(quantize, dict):
        how += f", {shown(quantize.get('bits'))}-bit values (groups of {shown(quantize.get('group'))})"
    return how


def _calibration_note(header: dict) -> str:
    """Where the errors are activation-weighted (``calibration`` in the header), a note
    saying so and on what, else nothing (fields of an untrusted file: shown)."""
    calibration = header.get("calibration")
    if not isinstance(calibration, dict):
        return ""
    tokens = calibration.get("tokens")
    on = f"{shown(tokens)} tokens of {shown(calibration.get('source'))}" if tokens is not None \
        else shown(calibration.get("source"))
    return f"; errors activation-weighted in {shown(calibration.get('tensors'))} matrices ({on})"


def _fidelity_line(fidelity: dict) -> str:
    """The header's fidelity summary in one line (fields of an untrusted file: checked)."""
    def number(key, scale=1.0, fmt="{:.4f}"):
        value = fidelity.get(key)
        return fmt.format(value * scale) if type(value) in (int, float) else "?"
    if fidelity.get("lossless") is True:
        kind = "lossless"
    else:
        kind = (f"relative error {number('relative_error')} (worst tensor "
                f"{number('worst_tensor_relative_error')} {shown(fidelity.get('worst_tensor'))}), "
                f"energy kept {number('energy_kept', 100, '{:.2f}')}%")
    return f"fidelity: {kind}, {number('bits_per_parameter', 1, '{:.3f}')} bits/parameter"


def _layer(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``; others -> ``(other)``."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return "(other)"


def _module(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.*.mlp.up_proj.weight``."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def _totals(tensors, key) -> dict[str, tuple[int, int, int]]:
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for t in tensors:
        group = groups[key(t.name)]
        group[0] += t.count if t.kind != "base" else 0
        group[1] += t.numel
        group[2] += t.nbytes
    return {name: tuple(values) for name, values in groups.items()}


def _info_json(result) -> dict:
    return {"path": str(result.path), "file_size": result.file_size, "header": {
        k: v for k, v in result.header.items() if k != "tensors"},
        "kept": result.kept, "bits_per_kept": result.bits_per_kept,
        "dense_bytes": result.dense_bytes,
        "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "kind": t.kind,
                     "count": t.count, "numel": t.numel, "density": t.density,
                     "positions": t.positions_codec, "values": t.values_codec,
                     "bytes": t.nbytes, "bits_per_kept": t.bits_per_kept,
                     "fidelity": t.fidelity}
                    for t in result.tensors]}


@main.command()
@click.argument("delta", type=click.Path())
@click.option("--base", type=click.Path(), help="Also check the delta belongs to this base.")
@click.option("--max-memory", help="Bound on the data held at once, e.g. 512MiB; default 1GiB "
              "(records are decoded in runs, whatever sizes the file declares).")
@json_option
@fail_cleanly
def verify(delta, base, max_memory, as_json):
    """Check every checksum and record of DELTA (and, with --base, its base's identity).

    Example: sparsestitch verify math.delta --base base/
    """
    from ..ops.describe import verify as run
    result = run(delta, base, max_memory=max_memory)
    if as_json:
        echo_json({"ok": True, "path": str(result.path), "tensors": len(result.tensors),
                   "kept": result.kept, "base": None if base is None else str(base)})
        return
    click.echo(f"ok: {result.path} ({len(result.tensors)} tensors, {result.kept:,} kept values"
               f"{', matches ' + str(base) if base else ''})")


@main.command()
@click.option("--workdir", type=click.Path(),
              help="Where the example zoo and its deltas are written (default: "
                   "sparsestitch-demo in the system's temporary folder). An existing folder "
                   "must be empty or made by an earlier demo.")
@click.option("--size-mb", default=100, show_default=True, type=click.IntRange(min=1),
              help="Size of the example base checkpoint.")
@fail_cleanly
def demo(workdir, size_mb):
    """Build a small example zoo (a base + 3 fine-tunes), compress, restore, stitch; print a table.

    Example: sparsestitch demo --size-mb 8 --workdir /tmp/zoo
    """
    from ..ops.demo import run_demo
    run_demo(workdir, size_mb=size_mb, echo=click.echo)


from .merge import merge  # noqa: E402  (thin like the commands above)
from .zoo import zoo  # noqa: E402

main.add_command(merge)
main.add_command(zoo)

if __name__ == "__main__":
    main()
