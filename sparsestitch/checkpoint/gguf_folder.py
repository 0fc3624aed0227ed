"""Outputs of a GGUF base: a folder transformers loads, with the config and the tokenizer
transformers derives from the GGUF file's metadata.

A GGUF base is read dequantized to float32 under transformers' tensor names; its outputs are
safetensors.  A bare ``model.safetensors`` is useless to ``from_pretrained`` without a
``config.json`` and a tokenizer, which live in the GGUF file's metadata: for an output named
as a folder, :func:`model_files` asks transformers (``gguf_file=``) for them.  An output named
``.gguf`` is refused: sparsestitch does not write GGUF.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from ..core.errors import OutputError

log = logging.getLogger("sparsestitch")


def check_output_name(out: str | Path) -> None:
    """Refuse an output named ``.gguf`` (whatever the base): the output would be safetensors
    under a GGUF name."""
    if Path(out).suffix.lower() == ".gguf":
        raise OutputError("sparsestitch writes safetensors, not GGUF: name a folder (with a GGUF "
                          "base it gets config.json and the tokenizer from the GGUF's "
                          "metadata, so transformers loads it) or a .safetensors file",
                          path=out)


def writes_folder(base, out: str | Path) -> bool:
    """Whether the output of ``base`` at ``out`` is a folder: a folder base's always is; a
    GGUF base's is unless ``out`` names a ``.safetensors`` file."""
    if base.is_folder:
        return True
    return getattr(base, "is_gguf", False) and Path(out).suffix.lower() != ".safetensors"


def model_files(gguf: Path) -> dict[str, str]:
    """``{file name: text}``: ``config.json`` and the tokenizer's files (``tokenizer.json``,
    ``tokenizer_config.json``, a chat template) as transformers makes them from the GGUF
    file's metadata.  What it cannot make is left out with a logged warning (the weights are
    written regardless); nothing is downloaded."""
    try:
        from transformers import AutoConfig, AutoTokenizer
    except ImportError:
        log.warning("%s: transformers is not installed, so the output folder gets no "
                    "config.json or tokenizer (pip install transformers gguf)", gguf)
        return {}
    texts: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for what, auto in (("config.json", AutoConfig), ("tokenizer", AutoTokenizer)):
            try:
                made = auto.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                            local_files_only=True)
                made.save_pretrained(tmp)
            except Exception as exc:  # noqa: BLE001 - any failure: that file is not made
                log.warning("%s: no %s in the output folder: transformers cannot make it from "
                            "this GGUF's metadata (%s)", gguf.name, what,
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        for path in sorted(Path(tmp).iterdir()):
            try:
                texts[path.name] = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                log.warning("%s: %s is not text; left out of the output folder", gguf.name,
                            path.name)
    return texts
