"""Model-card contents (for :func:`sparsestitch.checkpoint.hub.write_model_card`) of restored and
merged zoo members: what they are, how they were made, and how to make them again."""

from __future__ import annotations

import json

from .._version import __version__
from ..ops.describe import Exactness


def _base_model(manifest: dict) -> str:
    """The base as the Hub's ``base_model:`` wants it: its Hub id, else its absolute path (a
    relative spec means nothing once the card leaves the folder it was typed in)."""
    source = manifest["base"]["source"]
    return source["repo_id"] if source["kind"] == "hub" else (source.get("path")
                                                              or source["spec"])


def _given_options(options: dict) -> str:
    """The compress options a member was made with, as the command line spells them: those
    that differ from compress's defaults."""
    from .members import compress_defaults, option_words
    defaults = compress_defaults()
    given = [option_words(k, v) for k, v in sorted(options.items())
             if k in defaults and v != defaults[k] and v is not None]
    return " ".join(given) if given else "compress's defaults"


def _origin(source: dict) -> str:
    if source["kind"] == "hub":
        return f"`{source['repo_id']}` at commit `{source['commit']}`"
    return f"`{source['spec']}`"


def _member_line(entry: dict) -> str:
    return (f"- `{entry['name']}`: from {_origin(entry['source'])}; kept "
            f"{entry['kept']:,} of {entry['candidates']:,} parameters "
            f"({100 * entry['density']:.3g}%), delta {entry['size']:,} bytes, "
            f"sha256 `{entry['checksums']['sha256']}`")


def restored_card(manifest: dict, entry: dict, held: Exactness, zoo: str, out: str) -> dict:
    """Keyword arguments of ``write_model_card`` for member ``entry`` of ``zoo`` restored to
    ``out``; ``held`` says what its delta stores exactly
    (:func:`sparsestitch.ops.describe.exactness`)."""
    base = _base_model(manifest)
    how = "\n".join([
        f"# {entry['name']}", "",
        f"Fine-tune of `{base}`, rebuilt by sparsestitch {__version__} "
        "from a sparse delta stored in a model zoo:", "",
        _member_line(entry), "",
        held.sentence()[0].upper() + held.sentence()[1:]
        + ("." if held.lossless else
           ", so this approximates the original fine-tune (Localize-and-Stitch, He et al., "
           "TMLR 2024)."), "",
        "Made with:", "", "```bash",
        f"sparsestitch zoo get {zoo} {entry['name']} -o {out}", "```", "",
        f"Compress options: {_given_options(entry['options'])}.",
    ])
    return {"base": base, "how": how, "tags": ["restored"], "relation": "finetune"}


def merged_card(manifest: dict, entries: list[dict], rule: str, weights, options: dict,
                zoo: str, out: str) -> dict:
    """Keyword arguments of ``write_model_card`` for a merge of ``entries`` of ``zoo`` into
    ``out``."""
    base = _base_model(manifest)
    names = " ".join(e["name"] for e in entries)
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in sorted(options.items()))
    how = "\n".join([
        f"# Merge of {', '.join(e['name'] for e in entries)}", "",
        f"`{base}` with the sparse deltas of {len(entries)} fine-tune(s) stitched onto it by "
        f"sparsestitch {__version__}, rule `{rule}`"
        + (f", weights {list(weights)}" if weights else "")
        + (f", options `{json.dumps(options, sort_keys=True)}`" if options else "") + ":", "",
        *[_member_line(e) for e in entries], "",
        "Made with:", "", "```bash",
        f"sparsestitch zoo merge {zoo} {names} -o {out} --rule {rule}"
        + (f" --weights {','.join(str(w) for w in weights)}" if weights else "") + flags,
        "```",
    ])
    return {"base": base, "how": how, "tags": ["merge", rule], "relation": "merge"}
