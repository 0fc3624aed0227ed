"""What every ``sparsestitch`` command shares: clean failures, tables, JSON, progress, threads."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import traceback
from dataclasses import fields

import click

from .._version import __version__
from ..combine.rules import RULES
from ..core.errors import OptionError, SparsestitchError
from ..localize.keep_options import KeepOptions


def fail_cleanly(function):
    """The tool's own errors (bad input, options, files) and the system's (a full disk, a
    permission) become one line on stderr and exit code 2; a closed pipe (``sparsestitch
    info x.delta | head -1``) ends the command quietly.  Anything else is a bug: its
    traceback is shown with a request to report it, exit code 1 -- not hidden behind a
    one-line message that looks like the user's mistake."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except BrokenPipeError:
            # Further writes to the closed pipe (flushing at exit) would raise again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except (SparsestitchError, OSError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except click.ClickException:
            raise
        except Exception:  # noqa: BLE001 - a bug: shown whole, then reported
            traceback.print_exc()
            click.echo(f"\nThis is a bug in sparsestitch {__version__}, not a problem with your "
                       "input: please report it with the command and the traceback above.",
                       err=True)
            sys.exit(1)
    return wrapper


def shown(value) -> str:
    """A field of an untrusted file, safe to print on one line: integers grouped, odd text
    escaped, anything else as compact JSON."""
    if type(value) is int:
        return f"{value:,}"
    if isinstance(value, str):
        return value if value.isprintable() else repr(value)
    text = json.dumps(value, sort_keys=True, ensure_ascii=True)
    return text


def echo_table(rows: list[list[str]], headers: list[str], right: set[int] = frozenset()) -> None:
    """Rows of cells as a text table; columns in ``right`` are right-aligned."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    click.echo(line(headers))
    click.echo(line(["-" * w for w in widths]))
    for row in rows:
        click.echo(line(row))


def echo_json(payload) -> None:
    """``payload`` as indented JSON on stdout (for programs: ``--json``)."""
    click.echo(json.dumps(payload, indent=2, sort_keys=True, default=str))


def show_progress(quiet: bool | None, as_json: bool = False) -> bool:
    """Progress for a person watching: a bar when standard error is a terminal, unless
    ``--quiet`` (``quiet`` True) or ``--json``; with ``--progress`` (``quiet`` False) also
    when it is a file or pipe, as plain lines (:mod:`sparsestitch.core.progress`)."""
    if quiet is None:
        return not as_json and sys.stderr.isatty()
    return not quiet


def natural_key(name: str) -> list:
    """Sort key putting ``layers.2`` before ``layers.10``.

    >>> sorted(["l.10.w", "l.2.w", "l.1.w"], key=natural_key)
    ['l.1.w', 'l.2.w', 'l.10.w']
    """
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


threads_option = click.option(
    "--threads", type=click.IntRange(min=1), default=None,
    help="Threads doing the work (default: the cores this process may use, up to 2 for "
         "compress and 4 for the others; 1: one thread).")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print a JSON summary instead of text (no progress bars).")
allow_crimes_option = click.option(
    "--allow-crimes", is_flag=True,
    help="Go on when the base's and a fine-tune's config.json name different architectures "
         "(refused by default, as mergekit's --allow-crimes).")
quiet_option = click.option("--quiet/--progress", "quiet", default=None,
                            help="--quiet: no progress. --progress: progress even when stderr "
                                 "is not a terminal (a line every 10 s, for logs). Default: a "
                                 "bar on a terminal, nothing otherwise.")


#: The stitch commands' rule flags and the rule option each sets; the rules taking one are
#: those whose defaults name its option.
RULE_FLAGS = {"--scale": "scale", "--density": "density", "--drop": "drop", "--seed": "seed"}


def rules_taking(option: str) -> list[str]:
    return [name for name, rule in RULES.items() if option in rule.defaults]


def _rule_help() -> str:
    lines = []
    for name, rule in RULES.items():
        flags = [flag for flag, option in RULE_FLAGS.items() if option in rule.defaults]
        lines.append(f"{name}" + (f" ({', '.join(flags)})" if flags else ""))
    return "Merge rule: " + "; ".join(lines) + "."


def rule_options(rule: str, given: dict) -> dict:
    """The rule options from the flags given, refusing a flag the rule does not take (named
    as the user typed it)."""
    options = {}
    for flag, value in given.items():
        if value is None:
            continue
        option = RULE_FLAGS[flag]
        rules = rules_taking(option)
        if rule not in rules:
            shown_flag = "--trim/--density" if flag == "--density" else flag
            raise OptionError(f"{shown_flag} applies to --rule {', '.join(rules)}, not --rule "
                             f"{rule}")
        options[option] = value
    return options


def rule_flags(function):
    for flag, help_text in (("--seed", "the random seed of the drops"),
                            ("--drop", "the probability of dropping each stored entry"),
                            ("--density", "the fraction of each tensor kept by magnitude"),
                            ("--scale", "the factor (lambda) of the merged update")):
        option = RULE_FLAGS[flag]
        defaults = ", ".join(f"{name} {RULES[name].defaults[option]:g}"
                             for name in rules_taking(option))
        help_text = f"{', '.join(rules_taking(option))}: {help_text} (default: {defaults})."
        kind = int if flag == "--seed" else float
        if flag == "--density":
            # one vocabulary: --keep is the kept fraction (compress's --density) wherever
            # deltas are merged; TIES's own fraction is --trim (--density still accepted)
            help_text = help_text.replace("the fraction of each tensor kept by magnitude",
                                          "--trim (or --density, mergekit's name): the fraction "
                                          "of each tensor kept (by magnitude for TIES and "
                                          "breadcrumbs, at random for DARE) before the merge; "
                                          "not --keep")
            function = click.option("--trim", "--density", "density", type=kind,
                                    help=help_text)(function)
            continue
        function = click.option(flag, type=kind, help=help_text)(function)
    return click.option("--rule", type=click.Choice(list(RULES)), default="localize-stitch",
                        show_default=True, help=_rule_help())(function)


def parse_weights(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise OptionError(f"--weights takes numbers separated by commas, like 1,0.5; got {text!r}") \
            from None


def keep_flags(command: str):
    """The flags of what is kept, as ``command`` (``compress`` or ``merge``) takes them,
    generated from :class:`~sparsestitch.localize.keep_options.KeepOptions`' fields (names,
    help, choices): merge calls the density ``--keep`` and leaves every default unset (a
    config's values or the rule's decide), compress shows its defaults."""
    def decorate(function):
        for option in reversed(fields(KeepOptions)):  # click stacks decorators bottom-up
            meta = option.metadata["click"]
            if command == "merge" and meta.get("compress_only"):
                continue
            name = "keep" if option.name == "density" and command == "merge" else option.name
            settings = {"help": option.metadata["help" if command == "compress" else
                                                "merge_help"]}
            if "type" in meta:
                settings["type"] = meta["type"]
            if "choices" in meta:
                settings["type"] = click.Choice(list(meta["choices"]))
            if meta.get("multiple"):
                settings["multiple"] = True
            if meta.get("flag"):
                settings.update(is_flag=True, default=False if command == "compress" else None)
            elif command == "compress" and option.default not in (None, ()):
                settings.update(default=option.default, show_default=True)
            function = click.option("--" + name.replace("_", "-"), **settings)(function)
        return function
    return decorate
