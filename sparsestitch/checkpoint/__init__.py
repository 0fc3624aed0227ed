"""Checkpoint I/O: safetensors files and sharded Hugging Face folders, streamed."""

from .reader import INDEX_NAME, Checkpoint
from .writer import CheckpointWriter, OutputTensor, Shard

__all__ = ["Checkpoint", "CheckpointWriter", "INDEX_NAME", "OutputTensor", "Shard"]
