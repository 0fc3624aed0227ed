"""The order among equal magnitudes: a fixed hash of tensor name and position.

Top-k selection (compress's localization, TIES trimming, trained masks' final cut)
often meets many elements of exactly equal magnitude at the threshold: a bf16 task
vector takes few distinct values, and one tie group held 17% of a tensor in a real
fine-tune.  Taking the lowest positions first would keep the first rows of a tensor
and drop the rest, a spatial bias no one asked for.  Instead ties go, in order, to the
elements with the largest :func:`tie_order`: a splitmix64 hash of the position mixed
with the tensor's name, deterministic (files stay reproducible byte for byte) and
uncorrelated with where an element sits.  Where two tied elements also share the hash's
32 bits (about one pair in 2^32), the lower position goes first.
"""

from __future__ import annotations

import zlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def name_seed(name: str) -> int:
    """The per-tensor seed of :func:`tie_order`: CRC-32 of the UTF-8 name, in both halves."""
    crc = zlib.crc32(name.encode("utf-8", "surrogatepass"))
    return (crc << 32) | crc


def tie_order(name: str, positions: np.ndarray) -> np.ndarray:
    """uint32 tie-break keys of flat ``positions`` of tensor ``name`` (larger goes first).

    >>> tie_order("w", np.array([0, 1, 2])).dtype
    dtype('uint32')
    >>> bool((tie_order("w", np.arange(4)) == tie_order("w", np.arange(4))).all())
    True
    """
    z = np.asarray(positions, dtype=np.int64).astype(np.uint64)
    z += np.uint64(name_seed(name))
    z *= _GOLDEN
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(32)).astype(np.uint32)


def ranked(keys: np.ndarray, name: str, positions: np.ndarray) -> np.ndarray:
    """uint64 keys ordering by ``keys`` (uint32, larger first), then by :func:`tie_order`.

    >>> int(ranked(np.array([1, 2], np.uint32), "w", np.array([0, 1]))[1] >> 32)
    2
    """
    return (np.asarray(keys, np.uint64) << np.uint64(32)) | tie_order(name, positions)
