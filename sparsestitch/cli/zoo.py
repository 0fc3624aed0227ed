"""``sparsestitch zoo ...``: the zoo commands (parse, call :mod:`sparsestitch.zoo`, print).

Registered on the main command with ``main.add_command(zoo)``.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from .common import echo_table, fail_cleanly, parse_weights, rule_flags, rule_options, shown


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def zoo():
    """A model zoo: one folder with a base reference and many fine-tunes as sparse deltas.

    \b
    Examples:
      sparsestitch zoo init my-zoo --base meta-llama/Llama-3.1-8B
      sparsestitch zoo add my-zoo runs/math runs/code --density 0.01
      sparsestitch zoo add my-zoo code=org/code-ft@v2 --ray
      sparsestitch zoo ls my-zoo
      sparsestitch zoo get my-zoo math -o math-restored/
      sparsestitch zoo merge my-zoo math code -o merged/ --rule ties --density 0.2
      sparsestitch zoo verify my-zoo
      sparsestitch zoo rm my-zoo code

    Checkpoints are paths or Hugging Face Hub ids (org/name[@revision]) already in the local
    Hugging Face cache.  The manifest format is specified in docs/zoo.md.
    """


@zoo.command("init")
@click.argument("zoo_dir", metavar="ZOO", type=click.Path())
@click.option("--base", required=True, help="The base checkpoint: a path or Hub id org/name[@rev].")
@fail_cleanly
def init_command(zoo_dir, base):
    """Create the zoo folder ZOO for BASE (reads the base once, to record its identity)."""
    from ..zoo import init
    manifest = init(zoo_dir, base)
    click.echo(f"created zoo {zoo_dir}: base {shown(base)} "
               f"({_size(manifest['base']['bytes'])}, identity {manifest['base']['identity']})")


def _parse_sources(specs) -> dict | list:
    """``NAME=CHECKPOINT`` pairs (a dict) or plain checkpoints (a list), not mixed."""
    from pathlib import Path
    named = [s.split("=", 1) for s in specs if "=" in s and not Path(s).exists()]
    if not named:
        return list(specs)
    if len(named) != len(specs):
        raise click.UsageError("name every checkpoint (NAME=CHECKPOINT) or none")
    return dict(named)


def _parse_compress_options(pairs) -> dict:
    """``-O KEY=VALUE``: VALUE as JSON where it parses (numbers, lists), else as text."""
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise click.UsageError(f"-O takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(text)
        except ValueError:
            options[key] = text
    return options


def _ray_target(value):
    if value is None:
        return False
    if value == "default":
        return True
    if value in ("auto", "local") or ":" in value:
        return value
    raise click.UsageError(f"--ray takes a cluster address (auto, local, HOST:PORT, "
                           f"ray://HOST:PORT), got {value!r}; write --ray=ADDRESS, or --ray "
                           "alone after the checkpoints")


@zoo.command("add")
@click.argument("zoo_dir", metavar="ZOO", type=click.Path())
@click.argument("finetuned", metavar="FT...", nargs=-1, required=True)
@click.option("--density", type=float, help="Fraction of the parameters to keep (compress).")
@click.option("--scope", type=click.Choice(["fidelity", "global", "per-tensor"]),
              help="compress --scope.")
@click.option("--include", multiple=True, help="Only localize tensors matching this pattern.")
@click.option("--exclude", multiple=True, help="Leave tensors matching this pattern at the base.")
@click.option("--dense", multiple=True, help="Store tensors matching this pattern exactly.")
@click.option("-O", "--compress-option", "extra", multiple=True, metavar="KEY=VALUE",
              help="Any other compress option (VALUE as JSON where it parses).")
@click.option("--workers", type=int, help="Local processes at a time (default: one per CPU; "
              "0: in this process).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="default", default=None,
              metavar="[ADDRESS]", help="Run one Ray task per fine-tune: on the cluster at "
              "ADDRESS, or (alone) on RAY_ADDRESS's cluster or a local Ray instance.")
@click.option("--retries", default=2, show_default=True, type=int,
              help="Extra attempts for a worker that dies or hits an I/O error.")
@click.option("--scratch", type=click.Path(), help="A folder on each worker's local disk for "
              "temporary files (default: inside the zoo; use one when the zoo is on shared "
              "storage).")
@click.option("--base", help="Where the zoo's base is now, if it moved.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@fail_cleanly
def add_command(zoo_dir, finetuned, density, scope, include, exclude, dense, extra, workers,
                ray_address, retries, scratch, base, as_json):
    """Add fine-tunes FT... (paths, Hub ids, or NAME=CHECKPOINT) to ZOO as deltas.

    Members already present from the same checkpoint with the same options, whose delta
    verifies, are skipped: rerun an interrupted add to finish it.

    Example: sparsestitch zoo add my-zoo math=runs/math code=org/code-ft@v2 --density 0.01
    """
    from ..zoo import add
    options = {k: v for k, v in (("density", density), ("scope", scope)) if v is not None}
    options.update({k: list(v) for k, v in (("include", include), ("exclude", exclude),
                                             ("dense", dense)) if v})
    options.update(_parse_compress_options(extra))
    results = add(zoo_dir, _parse_sources(finetuned), workers=workers,
                  ray=_ray_target(ray_address), retries=retries, check=False, base=base,
                  scratch=scratch, **options)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(r) for r in results], indent=1, sort_keys=True))
    else:
        rows = [[r.name, r.status, _size(r.entry["size"]) if r.entry else "-",
                 f"{r.seconds:.1f}", shown(r.error or "")] for r in results]
        echo_table(rows, ["name", "status", "size", "s", "error"], right={2, 3})
    if any(r.status == "failed" for r in results):
        sys.exit(2)


@zoo.command("ls")
@click.argument("zoo_dir", metavar="ZOO", type=click.Path())
@click.option("--json", "as_json", is_flag=True,
              help="Print the listing as JSON (the manifest itself is ZOO/zoo.json).")
@fail_cleanly
def ls_command(zoo_dir, as_json):
    """List ZOO's members: size, how many times smaller than the fine-tune, what they keep."""
    from ..zoo.manifest import read
    manifest = read(zoo_dir)
    base = manifest["base"]
    members = [{"name": m["name"], "size": m["size"], "x_smaller": m["dense_bytes"] / max(m["size"], 1),
                "density": m["density"], "lossless": bool((m["fidelity"] or {}).get("lossless")),
                "relative_error": (m["fidelity"] or {}).get("relative_error"),
                "options": m["options"], "source": m["source"]["spec"]}
               for m in manifest["members"]]
    if as_json:
        click.echo(json.dumps({"base": {"source": base["source"]["spec"], "bytes": base["bytes"],
                                        "identity": base["identity"]}, "members": members},
                              indent=1, sort_keys=True))
        return
    click.echo(f"base {shown(base['source']['spec'])} ({_size(base['bytes'])}, identity "
               f"{base['identity']}), {len(manifest['members'])} member(s)")
    rows = [[shown(m["name"]), _size(m["size"]), f"{m['x_smaller']:.1f}x",
             f"{100 * m['density']:.3g}%", _kept(m), shown(m["source"])] for m in members]
    echo_table(rows, ["name", "size", "x smaller", "density", "fidelity", "source"], right={1, 2, 3})


def _kept(member: dict) -> str:
    """What a member keeps of its fine-tune, in a few words."""
    if member["lossless"]:
        return "lossless"
    error = member["relative_error"]
    return "-" if not isinstance(error, (int, float)) else f"rel. error {error:.3f}"


@zoo.command("get")
@click.argument("zoo_dir", metavar="ZOO", type=click.Path())
@click.argument("name")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output file or folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--base", help="Where the zoo's base is now, if it moved.")
@fail_cleanly
def get_command(zoo_dir, name, out, overwrite, base):
    """Restore member NAME of ZOO to OUT (a folder gets a model card, README.md)."""
    from ..zoo import get
    click.echo(f"wrote {get(zoo_dir, name, out, overwrite=overwrite, base=base)}")


@zoo.command("merge")
@click.argument("zoo_dir", metavar="ZOO", type=click.Path())
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(), help="Output file or folder.")
@rule_flags
@click.option("--weights", help="Comma-separated per-member weights, e.g. 1,0.5.")
@click.option("--keep", type=float,
              help="Localize each member's delta again before the rule: keep this fraction of "
                   "its task vector (as stitch --keep; default deltas merge better so).")
@click.option("--scope", type=click.Choice(["fidelity", "global", "per-tensor"]),
              help="How --keep is spread over tensors (default fidelity).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--base", help="Where the zoo's base is now, if it moved.")
@fail_cleanly
def merge_command(zoo_dir, names, out, rule, scale, density, drop, seed, weights, keep, scope,
                  overwrite, base):
    """Stitch members NAME... of ZOO onto its base into OUT (a folder gets a model card)."""
    from ..zoo import merge
    options = rule_options(rule, {"--scale": scale, "--density": density, "--drop": drop,
                                  "--seed": seed})
    if keep is not None:
        options.update(keep=keep, scope=scope or "fidelity")
    elif scope is not None:
        raise click.UsageError("--scope spreads --keep over tensors: give --keep too")
    path = merge(zoo_dir, list(names), out, rule=rule, weights=parse_weights(weights),
                 overwrite=overwrite, base=base, **options)
    click.echo(f"wrote {path}")


@zoo.command("verify")
@click.argument("zoo_dir", metavar="ZOO", type=click.Path())
@click.argument("names", metavar="[NAME...]", nargs=-1)
@click.option("--no-base", is_flag=True, help="Skip checking deltas against the base (faster).")
@click.option("--base", help="Where the zoo's base is now, if it moved.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@fail_cleanly
def verify_command(zoo_dir, names, no_base, base, as_json):
    """Check ZOO's manifest and every member's delta (checksums, decoding, base identity)."""
    from ..zoo import verify
    report = verify(zoo_dir, list(names) or None, against_base=not no_base, base=base)
    if as_json:
        click.echo(json.dumps({**report.__dict__, "ok": report.ok}, indent=1, sort_keys=True))
    else:
        for name, problem in report.problems.items():
            click.echo(f"{'ok  ' if problem is None else 'FAIL'} {name}"
                       + (f": {shown(problem)}" if problem else ""))
        for name in report.unlisted:
            click.echo(f"note: deltas/{shown(name)} is not listed in the manifest (an "
                       "interrupted add or rm; a later add of that name replaces it)")
        for name in report.leftovers:
            click.echo(f"note: deltas/.incoming/{shown(name)}: work folder of an add running "
                       "now, or of one killed on another host")
        bad = sum(problem is not None for problem in report.problems.values())
        checked = f"{len(report.problems)} member(s) checked" + (
            "" if report.checked_base else " (not against the base)")
        click.echo(f"ok: {checked}" if report.ok else f"FAILED: {bad} of {checked}")
    if not report.ok:
        sys.exit(2)


@zoo.command("rm")
@click.argument("zoo_dir", metavar="ZOO", type=click.Path())
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@fail_cleanly
def rm_command(zoo_dir, names):
    """Remove members NAME... from ZOO (their entries and delta files; all or none)."""
    from ..zoo import rm
    for name in rm(zoo_dir, list(names)):
        click.echo(f"removed {name}")
