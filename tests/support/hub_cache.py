"""A hand-built Hugging Face cache: real files laid out as huggingface_hub downloads them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_model(cache: Path, repo_id: str, source: Path, commit: str, refs=("main",)) -> Path:
    """Put the files of the checkpoint folder ``source`` into ``cache`` as the Hub client
    would have downloaded them at ``commit``; returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot
