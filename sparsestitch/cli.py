"""The ``sparsestitch`` command: parse, call the API, print."""

from __future__ import annotations

import sys
import time

import click

from . import __version__, native
from .errors import SparsestitchError


def _shown(value) -> str:
    """A field of an untrusted file, safe to print: integers grouped, odd text escaped."""
    if type(value) is int:
        return f"{value:,}"
    return value if isinstance(value, str) and value.isprintable() else repr(value)


def _fail_cleanly(function):
    """Turn library errors into one clear line on stderr and exit code 2."""
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except SparsestitchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except (ValueError, OSError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
    wrapper.__name__ = function.__name__
    wrapper.__doc__ = function.__doc__
    return wrapper


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
      sparsestitch info math.delta
      sparsestitch verify math.delta --base base/
      sparsestitch demo
    """


@main.command()
@click.argument("base", type=click.Path())
@click.argument("finetuned", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", "outs", multiple=True, type=click.Path(),
              help="Output delta path, once per fine-tune (default: FINETUNED name + .delta).")
@click.option("--density", default=0.01, show_default=True, type=float,
              help="Fraction of the included float parameters to keep.")
@click.option("--scope", type=click.Choice(["global", "per-tensor"]), default="global",
              show_default=True, help="Rank |tau| over the whole model or within each tensor.")
@click.option("--include", multiple=True, help="Only localize tensors matching this pattern.")
@click.option("--exclude", multiple=True, help="Leave tensors matching this pattern at the base.")
@click.option("--dense", multiple=True, help="Store tensors matching this pattern exactly.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_fail_cleanly
def compress(base, finetuned, outs, density, scope, include, exclude, dense, overwrite, quiet):
    """Write one sparse delta per FINETUNED checkpoint of BASE.

    \b
    BASE and FINETUNED are .safetensors files or Hugging Face folders.
    Example: sparsestitch compress base.safetensors ft.safetensors -o ft.delta --density 0.01
    """
    from .compress import compress as run
    outs = list(outs) or [str(f).rstrip("/") + ".delta" for f in finetuned]
    summaries = run(base, list(finetuned), outs, density=density, scope=scope, include=include,
                    exclude=exclude, dense=dense, overwrite=overwrite, progress=not quiet)
    for s in summaries:
        click.echo(f"{s.path}: {s.nbytes:,} bytes, kept {s.kept:,} of {s.candidates:,} "
                   f"({100 * s.density:.3f}%), {8 * s.nbytes / max(s.kept, 1):.2f} bits/kept, "
                   f"{s.seconds:.1f} s")


@main.command()
@click.argument("base", type=click.Path())
@click.argument("delta", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="Output file or folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_fail_cleanly
def restore(base, delta, out, overwrite, quiet):
    """Rebuild the fine-tuned model from BASE and DELTA (bit-exact at stored positions).

    Example: sparsestitch restore base/ math.delta -o math-restored/
    """
    from .restore import restore as run
    started = time.perf_counter()
    run(base, delta, out, overwrite=overwrite, progress=not quiet)
    click.echo(f"wrote {out} in {time.perf_counter() - started:.1f} s")


@main.command()
@click.argument("base", type=click.Path())
@click.argument("deltas", nargs=-1, type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="Output file or folder.")
@click.option("--rule", type=click.Choice(["localize-stitch", "task-arithmetic", "ties", "dare"]),
              default="localize-stitch", show_default=True)
@click.option("--weights", help="Comma-separated per-delta weights, e.g. 1,0.5.")
@click.option("--scale", type=float, help="Task arithmetic / TIES / DARE scale (lambda).")
@click.option("--trim", type=float, help="TIES: fraction of each tensor kept by magnitude.")
@click.option("--drop", type=float, help="DARE: drop probability.")
@click.option("--seed", type=int, help="DARE: random seed.")
@click.option("--max-memory", help="Bound on the data held at once (row blocks, read-ahead, "
              "decoded records), e.g. 512MiB; default 1GiB. Below 512MiB one thread.")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda[:N], or auto (CUDA when present): where the merge arithmetic runs.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_fail_cleanly
def stitch(base, deltas, out, rule, weights, scale, trim, drop, seed, max_memory, device,
           overwrite, quiet):
    """Merge DELTAS onto BASE, tensor by tensor, with a merge rule.

    Example: sparsestitch stitch base/ math.delta code.delta -o merged/ --max-memory 512MiB
    """
    from .stitch import stitch as run
    options = {k: v for k, v in (("scale", scale), ("density", trim), ("drop", drop),
                                 ("seed", seed)) if v is not None}
    weight_list = [float(w) for w in weights.split(",")] if weights else None
    started = time.perf_counter()
    run(base, list(deltas), out, rule=rule, weights=weight_list, max_memory=max_memory,
        device=device, overwrite=overwrite, progress=not quiet, **options)
    click.echo(f"wrote {out} in {time.perf_counter() - started:.1f} s")


@main.command()
@click.argument("delta", type=click.Path())
@click.option("--all", "show_all", is_flag=True, help="List every tensor, not just stored ones.")
@_fail_cleanly
def info(delta, show_all):
    """Show a delta's header and per-tensor density, encoding, bytes and bits per kept value.

    Example: sparsestitch info math.delta --all
    """
    from .describe import info as run
    result = run(delta)
    header = result.header
    click.echo(f"{result.path}: {result.file_size:,} bytes, format v{header['format_version']}, "
               f"made by sparsestitch {_shown(header.get('library_version'))}")
    click.echo(f"method {_shown(header.get('method'))}, density {_shown(header.get('density'))}, "
               f"kept {result.kept:,} of {_shown(header.get('candidates'))}, "
               f"{result.bits_per_kept:.2f} bits/kept, "
               f"{result.dense_bytes / max(result.file_size, 1):.1f}x smaller than dense")
    click.echo(f"sources: {_shown(header.get('sources'))}")
    click.echo(f"{'tensor':<48} {'kind':<7} {'density':>9} {'positions':>9} {'values':>6} "
               f"{'bytes':>12} {'bits/kept':>9}")
    for t in result.tensors:
        if t.kind == "base" and not show_all:
            continue
        click.echo(f"{_shown(t.name)[:48]:<48} {t.kind:<7} {100 * t.density:>8.3f}% "
                   f"{_shown(t.positions_codec or '-'):>9} {_shown(t.values_codec or '-'):>6} "
                   f"{t.nbytes:>12,} "
                   f"{t.bits_per_kept:>9.2f}")


@main.command()
@click.argument("delta", type=click.Path())
@click.option("--base", type=click.Path(), help="Also check the delta belongs to this base.")
@_fail_cleanly
def verify(delta, base):
    """Check every checksum and record of DELTA (and, with --base, its base's identity).

    Example: sparsestitch verify math.delta --base base/
    """
    from .describe import verify as run
    result = run(delta, base)
    click.echo(f"ok: {result.path} ({len(result.tensors)} tensors, {result.kept:,} kept values"
               f"{', matches ' + str(base) if base else ''})")


@main.command()
@click.option("--workdir", type=click.Path(),
              help="Where the example zoo and its deltas are written (default: "
                   "sparsestitch-demo in the system's temporary folder). An existing folder "
                   "must be empty or made by an earlier demo.")
@click.option("--size-mb", default=100, show_default=True, type=int,
              help="Size of the example base checkpoint.")
@_fail_cleanly
def demo(workdir, size_mb):
    """Build a small example zoo (a base + 3 fine-tunes), compress, restore, stitch; print a table.

    Example: sparsestitch demo --size-mb 8 --workdir /tmp/zoo
    """
    from .demo import run_demo
    run_demo(workdir, size_mb=size_mb, echo=click.echo)


from .cli_zoo import zoo  # noqa: E402  (the zoo group: thin like the commands above)

main.add_command(zoo)

if __name__ == "__main__":
    main()
