"""Model cards for restored and stitched folders: what the model is and how to make it again.

The Hub expects a README.md with ``base_model:`` in its front matter
(:func:`sparsestitch.checkpoint.hub.model_card`); the base's own card, copied with its other
non-weight files, would describe the base instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .._version import __version__
from ..checkpoint import Checkpoint
from ..checkpoint.hub import model_card
from .describe import exactness


def _library(base: Checkpoint) -> str | None:
    return "transformers" if any(p.name == "config.json" for p in base.extra_files) else None


def restore_card(delta: str | os.PathLike) -> Callable[[Checkpoint], str]:
    """The card of ``restore(base, delta, out)``: what the restored model holds exactly, from
    the delta's own records."""
    name = Path(delta).name

    def card(base: Checkpoint) -> str:
        held = exactness(delta).sentence()  # here: the run has checked the delta by now
        how = "\n".join([
            f"# Fine-tune of {base.display_name}, restored", "",
            f"Rebuilt by sparsestitch {__version__} from the delta `{name}`: {held} "
            "(`sparsestitch info` says what the delta kept).", "",
            "Made with:", "", "```bash",
            f"sparsestitch restore {base.display_name} {name} -o OUT", "```"])
        return model_card(base=base.display_name, how=how, tags=["restored"],
                          relation="finetune", library_name=_library(base))
    return card


def stitch_card(deltas: Sequence[str | os.PathLike], rule: str, weights: Sequence[float],
                options: dict) -> Callable[[Checkpoint], str]:
    """The card of ``stitch(base, deltas, out, rule=rule, weights=weights, **options)``."""
    names = [Path(d).name for d in deltas]

    def card(base: Checkpoint) -> str:
        flags = "".join(f" --{key.replace('_', '-')} {value}" for key, value in sorted(options.items()))
        weight_flag = f" --weights {','.join(f'{w:g}' for w in weights)}" if any(
            w != 1.0 for w in weights) else ""
        how = "\n".join([
            f"# Merge of {len(names)} fine-tune(s) of {base.display_name}", "",
            f"Stitched by sparsestitch {__version__} with the rule `{rule}`"
            + (f", options `{json.dumps(options, sort_keys=True)}`" if options else "")
            + f", weights {list(weights)}, from the deltas:", "",
            *[f"- `{n}`" for n in names], "",
            "Made with:", "", "```bash",
            f"sparsestitch stitch {base.display_name} {' '.join(names)} -o OUT --rule {rule}"
            f"{weight_flag}{flags}", "```"])
        return model_card(base=base.display_name, how=how, tags=["merge", rule],
                          relation="merge", library_name=_library(base))
    return card


def merge_card(finetuned: Sequence[str], rule: str, weights: Sequence[float], options: dict
               ) -> Callable[[Checkpoint], str]:
    """The card of ``merge(base, finetuned, out, rule=rule, weights=weights, **options)``."""
    def card(base: Checkpoint) -> str:
        how = "\n".join([
            f"# Merge of {len(finetuned)} fine-tune(s) of {base.display_name}", "",
            f"Merged by sparsestitch {__version__} with the rule `{rule}`"
            + (f", options `{json.dumps(options, sort_keys=True)}`" if options else "")
            + f", weights {list(weights)}, from the fine-tunes:", "",
            *[f"- `{n}`" for n in finetuned], "",
            "How it was made is recorded in the safetensors metadata (`sparsestitch.merge`)."])
        return model_card(base=base.display_name, how=how, tags=["merge", rule],
                          relation="merge", library_name=_library(base))
    return card

