"""``sparsestitch merge``: merge full fine-tunes in one pass (thin: parse, call, print)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..localize.keep_options import KeepOptions
from .common import (
    allow_crimes_option,
    echo_json,
    fail_cleanly,
    json_option,
    keep_flags,
    parse_weights,
    quiet_option,
    rule_flags,
    rule_options,
    show_progress,
    threads_option,
)

#: Flags that say what is merged, which a config file says instead: the rule's, and what is
#: kept (:class:`~sparsestitch.localize.keep_options.KeepOptions`, as merge names them).
RECIPE_FLAGS = ("rule", "scale", "density", "drop", "seed", "weights",
                *KeepOptions.names("merge"))


@click.command("merge")
@click.argument("base", required=False, type=click.Path())
@click.argument("finetuned", nargs=-1, type=click.Path())
@click.option("-o", "--out", type=click.Path(), help="Output file or folder.")
@click.option("--config", "config_path", type=click.Path(),
              help="A merge config (YAML): base, models and weights, rule, parameters, keep. "
                   "Checked completely before any tensor is read.")
@rule_flags
@click.option("--weights", help="Comma-separated per-fine-tune weights, e.g. 1,0.5.")
@keep_flags("merge")
@click.option("--max-memory", help="Bound on the data held at once, e.g. 512MiB; default 1GiB.")
@click.option("--save-deltas", type=click.Path(),
              help="Also write the deltas made on the way into this folder (<fine-tune>.delta).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@allow_crimes_option
@threads_option
@json_option
@quiet_option
@fail_cleanly
def merge(base, finetuned, out, config_path, rule, scale, density, drop, seed, weights, keep,
          scope, bits, group, lossless, max_error, include, exclude, dense, max_memory,
          save_deltas, overwrite, allow_crimes, threads, as_json, quiet):
    """Merge FINETUNED full checkpoints of BASE in one pass, writing no intermediate delta.

    The output is bit-identical to compress then stitch with the same options.

    \b
    Examples:
      sparsestitch merge base/ math/ code/ -o merged/ --rule task-arithmetic
      sparsestitch merge base/ math/ code/ -o merged/ --keep 0.01        # Localize-and-Stitch
      sparsestitch merge --config merge.yml -o merged/
    """
    from ..ops.merge import merge as run

    given = {name: value for name, value in locals().items() if name in RECIPE_FLAGS}
    if config_path is not None:
        arguments = _from_config(config_path, base, finetuned, given, rule)
        out = out or arguments.pop("out")
        max_memory = max_memory or arguments.pop("max_memory")
        arguments.pop("max_memory", None)
        arguments.pop("out", None)
    else:
        if base is None or not finetuned:
            raise click.UsageError("give BASE and at least one FINETUNED checkpoint, or --config")
        options = rule_options(rule, {"--scale": scale, "--density": density, "--drop": drop,
                                      "--seed": seed})
        arguments = dict(base=base, finetuned=list(finetuned), rule=rule,
                         weights=parse_weights(weights), keep=keep, scope=scope or "fidelity",
                         bits=None if bits is None else int(bits),
                         group=128 if group is None else group, lossless=lossless,
                         max_error=max_error, include=include, exclude=exclude, dense=dense,
                         **options)
    if out is None:
        raise click.UsageError("give the output with -o/--out (or out: in the config)")
    started = time.perf_counter()
    run(out=out, max_memory=max_memory, save_deltas=save_deltas, overwrite=overwrite,
        threads=threads, progress=show_progress(quiet, as_json), allow_crimes=allow_crimes,
        protect=[config_path] if config_path is not None else [], **arguments)
    seconds = time.perf_counter() - started
    if as_json:
        echo_json({"path": str(out), "seconds": seconds})
    else:
        click.echo(f"{out}: merged in {seconds:.1f} s")
        if arguments.get("rule") == "localize-stitch" and all(
                arguments.get(k) in (None, False) for k in ("keep", "bits", "lossless",
                                                            "max_error", "masks")):
            click.echo("kept of each fine-tune: compress's default (every tensor within "
                       "relative error 0.5, quantized where that is enough); --keep 0.05 "
                       "keeps 5% exactly, the paper's Localize-and-Stitch")


def _from_config(config_path, base, finetuned, given: dict, rule: str) -> dict:
    from ..ops import merge_config

    flags = [name for name, value in given.items()
             if value not in (None, (), False) and not (name == "rule" and value == "localize-stitch")]
    if base is not None or finetuned or flags:
        extra = ["BASE/FINETUNED arguments"] if base is not None else []
        extra += ["--" + name.replace("_", "-") for name in flags]
        raise click.UsageError(f"--config says what is merged; drop {', '.join(extra)} (or "
                               "drop --config)")
    config = merge_config.load(Path(config_path))
    config.check_inputs()
    return {**config.merge_arguments(), "out": config.out}
