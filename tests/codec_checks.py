"""Shared checks and hypothesis strategies for codec tests (in the spirit of numcodecs' checks).

``check_position_roundtrip`` and ``check_value_roundtrip`` hold the whole codec contract of
:mod:`sparsestitch.delta.codecs.base` for one input: the payload is bytes, the config is exactly
JSON-representable and leaves the ``codec`` key to the registry, encoding is deterministic,
and decoding the JSON-reloaded config gives back the input exactly.  The strategies reach
every shape class (0-d, empty, 1-d, very wide, very tall, 3-d+), every density from none to
all, random and clustered layouts, and every bit pattern of every dtype.
"""

from __future__ import annotations

import json
import tempfile

import numpy as np
from hypothesis import strategies as st

from sparsestitch.delta.codecs.bitmap import gather_marked, put_marked
from sparsestitch.delta.codecs.streams import BytesPayload, FilePayload, Part
from sparsestitch.delta.codecs.ulp import exponent_counts

from sparsestitch.core.dtypes import SAFETENSORS_DTYPES, DType, dtype, from_wide
from sparsestitch.core.sizes import numel

FLOAT_DTYPES = tuple(dtype(n) for n in ("F32", "F16", "BF16", "F64"))
ALL_DTYPES = tuple(dtype(n) for n in SAFETENSORS_DTYPES)

#: Shapes that hypothesis would rarely build by itself: 0-d, empty along each axis,
#: very wide and very tall matrices, 3-d and 4-d.
SPECIAL_SHAPES = ((), (0,), (1,), (0, 7), (5, 0), (2, 0, 3), (1, 1, 1), (1, 4099), (3, 1501),
                  (4099, 1), (1501, 3), (64, 64), (4, 5, 6), (2, 3, 4, 5))

#: How kept positions are laid out; "explicit" lets hypothesis pick (and shrink) every one.
LAYOUTS = ("none", "one", "all", "percent", "half", "runs", "rows", "explicit")


def shapes() -> st.SearchStrategy[tuple[int, ...]]:
    return st.one_of(st.sampled_from(SPECIAL_SHAPES),
                     st.lists(st.integers(0, 9), max_size=4).map(tuple))


@st.composite
def position_sets(draw, shape_strategy=None) -> tuple[np.ndarray, tuple[int, ...]]:
    """``(sorted unique int64 positions, shape)`` over all layouts and densities."""
    shape = draw(shape_strategy if shape_strategy is not None else shapes())
    n = numel(shape)
    layout = draw(st.sampled_from(LAYOUTS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mask = np.zeros(n, dtype=bool)
    if n == 0 or layout == "none":
        pass
    elif layout == "one":
        mask[draw(st.integers(0, n - 1))] = True
    elif layout == "all":
        mask[:] = True
    elif layout == "percent":
        mask = rng.random(n) < 0.01
    elif layout == "half":
        mask = rng.random(n) < 0.5
    elif layout == "runs":
        for _ in range(draw(st.integers(1, 4))):
            start = int(rng.integers(0, n))
            mask[start:start + int(rng.integers(1, max(2, n // 4)))] = True
    elif layout == "rows":
        rows = shape[0] if shape else 1
        chosen = rng.random(rows) < draw(st.sampled_from((0.05, 0.3, 0.9)))
        mask = np.repeat(chosen, n // rows)
    else:
        mask[sorted(draw(st.sets(st.integers(0, n - 1), max_size=30)))] = True
        mask[0] |= draw(st.booleans())
        mask[-1] |= draw(st.booleans())
    return np.flatnonzero(mask).astype(np.int64), shape


def check_config(config: dict) -> dict:
    """Assert ``config`` is exactly JSON-representable and free of the registry's key; reload it."""
    assert isinstance(config, dict)
    assert "codec" not in config, "the registry owns the 'codec' key"
    reloaded = json.loads(json.dumps(config, allow_nan=False))
    assert reloaded == config
    return reloaded


def check_position_roundtrip(codec, positions: np.ndarray, shape: tuple[int, ...]) -> bytes:
    """Encode, reload the config through JSON, decode: the positions must come back exactly."""
    payload, config = codec.encode(positions, shape)
    assert isinstance(payload, bytes)
    assert codec.encode(positions, shape) == (payload, config), "encoding is not deterministic"
    decoded = codec.decode(payload, check_config(config), shape, int(positions.size))
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, positions)
    for run, part in cursor_parts(payload, int(positions.size)):
        cursor = codec.cursor(part, config, shape, int(positions.size))
        runs = []
        while (found := cursor.next(run)).size:
            assert found.size <= run + 7  # a bitmap window may end mid-byte
            runs.append(found)
        cursor.close()
        np.testing.assert_array_equal(np.concatenate(runs) if runs else
                                      np.empty(0, np.int64), positions)
        if hasattr(cursor, "marks"):
            check_marks(codec, part, config, shape, positions, run)
    return payload


def check_marks(codec, part, config: dict, shape: tuple[int, ...], positions: np.ndarray,
                run: int) -> None:
    """Windows of bits (a bitmap's cursor) of blocks of ``run`` elements: gathering an
    index array through them gives the positions, scattering puts values back there."""
    elements = numel(shape)
    cursor = codec.cursor(part, config, shape, int(positions.size))
    index = np.arange(elements, dtype=np.int64)
    scattered = np.zeros(elements, np.int64)
    gathered = []
    for lo in range(0, elements, run):
        hi = min(elements, lo + run)
        window, first, count = cursor.marks(lo, hi)
        kept = gather_marked(window, first, index[lo:hi], count)
        assert kept.size == count
        gathered.append(kept)
        put_marked(window, first, scattered[lo:hi], kept + 1)
    cursor.marks(elements, elements)  # the end: nothing left
    cursor.close()
    np.testing.assert_array_equal(np.concatenate(gathered) if gathered else
                                  np.empty(0, np.int64), positions)
    expected = np.zeros(elements, np.int64)
    expected[positions] = positions + 1
    np.testing.assert_array_equal(scattered, expected)


def cursor_parts(payload: bytes, count: int):
    """``(run length, Part)`` pairs that decode ``payload`` in runs: whole, and in runs of a
    third with nothing in memory, from memory and from a file (mapped and spooled streams)."""
    yield max(count, 1), Part(BytesPayload(payload), 0, len(payload), 1 << 30)
    run = max(1, count // 3)
    yield run, Part(BytesPayload(payload), 0, len(payload), 0)
    handle = tempfile.TemporaryFile()
    handle.write(b"head" + payload)
    handle.flush()
    try:
        yield run, Part(FilePayload(handle.fileno(), 4, len(payload)), 0, len(payload), 0)
    finally:
        handle.close()


def check_value_cursor(codec, payload: bytes, config: dict, base: np.ndarray | None, dt: DType,
                       expected: np.ndarray) -> None:
    """Decoding in runs (from memory, mapped or spooled) gives ``expected`` exactly."""
    count = int(expected.size)
    for run, part in cursor_parts(payload, count):
        extra = () if codec.elementwise else (exponent_counts(base, dt),)
        cursor = codec.cursor(part, config, dt, count, *extra)
        values = [cursor.take(None if base is None else base[at:at + run], min(run, count - at))
                  for at in range(0, count, run)]
        cursor.close()
        np.testing.assert_array_equal(np.concatenate(values) if values else
                                      np.empty(0, dt.bits), expected)


def check_value_roundtrip(codec, kept: np.ndarray, base: np.ndarray | None, dt: DType) -> bytes:
    """Encode, reload the config through JSON, decode: the bits must come back exactly.

    A codec that does not need the base gets None on both sides, proving it never reads it.
    """
    base = base if codec.needs_base else None
    payload, config = codec.encode(kept, base, dt)
    assert isinstance(payload, bytes)
    assert codec.encode(kept, base, dt) == (payload, config), "encoding is not deterministic"
    decoded = codec.decode(payload, check_config(config), base, dt, int(kept.size))
    assert decoded.dtype == dt.bits
    np.testing.assert_array_equal(decoded, kept)
    check_value_cursor(codec, payload, config, base, dt, kept)
    return payload


def special_bits(dt: DType) -> list[int]:
    """Bit patterns at the edges of ``dt``: zeros, infinities, NaN payloads, subnormals, extremes."""
    width = 8 * dt.itemsize
    top = 1 << (width - 1)
    edges = [0, top, (1 << width) - 1, top - 1, 1, top + 1]
    if not dt.is_float:
        return edges
    mant = {"F64": 52, "F32": 23, "F16": 10, "BF16": 7}[dt.name]
    inf = ((1 << (width - 1 - mant)) - 1) << mant
    quiet = 1 << (mant - 1)
    one = (inf >> 1) & ~((1 << mant) - 1)
    patterns = [
        inf, inf - 1,                                  # infinity, largest finite
        1 << mant, (1 << mant) - 1,                    # smallest normal, largest subnormal
        one, one | 1, one - 1,                         # 1.0 and its neighbours
        inf | quiet, inf | quiet | 1,                  # quiet NaNs, with and without payload
        inf | 1, inf | (quiet >> 1),                   # signalling NaNs
    ]
    return edges + patterns + [p | top for p in patterns]  # and each with the sign set


def bit_patterns(dt: DType) -> st.SearchStrategy[int]:
    """Any bit pattern of ``dt`` (every one reachable), biased towards the special ones."""
    return st.one_of(st.integers(0, (1 << (8 * dt.itemsize)) - 1), st.sampled_from(special_bits(dt)))


@st.composite
def value_pairs(draw, dt: DType, max_size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """``(fine-tuned bits, base bits)``: each pair equal, close, sign-flipped or unrelated."""
    width = 8 * dt.itemsize
    wrap = (1 << width) - 1
    base, kept = [], []
    for b in draw(st.lists(bit_patterns(dt), max_size=max_size)):
        relation = draw(st.sampled_from(("equal", "near", "sign", "any")))
        if relation == "equal":
            k = b
        elif relation == "near":
            k = (b + draw(st.integers(-300, 300))) & wrap
        elif relation == "sign":
            k = b ^ (1 << (width - 1))
        else:
            k = draw(bit_patterns(dt))
        base.append(b)
        kept.append(k)
    return np.array(kept, dtype=dt.bits), np.array(base, dtype=dt.bits)


def random_value_pair(dt: DType, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A large ``(fine-tuned, base)`` pair like a real record: small changes, 2% special bits."""
    rng = np.random.default_rng(seed)
    if dt.is_float:
        base_wide = rng.standard_normal(size).astype(dt.wide)
        base = from_wide(base_wide, dt)
        kept = from_wide(base_wide + rng.laplace(0, 0.02, size).astype(dt.wide), dt)
    else:
        base = rng.integers(0, 1 << (8 * dt.itemsize), size, dtype=np.uint64).astype(dt.bits)
        kept = base ^ (rng.random(size) < 0.1).astype(dt.bits)
    wild = rng.choice(size, size // 50, replace=False)
    kept[wild] = rng.choice(np.array(special_bits(dt), dtype=np.uint64), wild.size).astype(dt.bits)
    return kept, base


@st.composite
def tunes_of_one_base(draw, dt: DType, most: int = 3, max_size: int = 50
                      ) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(base bits, [fine-tuned bits, ...])``: 1 to ``most`` fine-tunes of one base, each
    element of each related to the base as in :func:`value_pairs`."""
    tunes, base = [], None
    for _ in range(draw(st.integers(1, most))):
        kept, pair_base = draw(value_pairs(dt, max_size=max_size))
        base = pair_base if base is None else base
        size = min(base.size, kept.size)
        base, tunes = base[:size], [t[:size] for t in tunes] + [kept[:size]]
    return base, tunes
