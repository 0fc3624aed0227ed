"""Positions decoded on the device (stitch/device_positions.py) against the codecs' decoders,
and the same refusals of damaged records."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparsestitch.delta.codecs import Bitmap, Gaps
from sparsestitch.delta.codecs.base import pack_stream, to_planes
from sparsestitch.core.errors import DeltaFormatError
from sparsestitch.core.torch_bits import as_torch
from sparsestitch.delta.device import positions_on_device as decode_positions

from .test_device import DEVICES

CODECS = {"gaps": Gaps(), "bitmap": Bitmap()}


def _send(device):
    return lambda array: as_torch(array).to(device)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), numel=st.integers(1, 5000),
       density=st.sampled_from([0.0, 0.01, 0.3, 1.0]), codec_id=st.sampled_from(sorted(CODECS)))
def test_device_positions_match_the_codecs(device, seed, numel, density, codec_id):
    rng = np.random.default_rng(seed)
    positions = np.flatnonzero(rng.random(numel) < density).astype(np.int64)
    shape = (numel,) if seed % 2 else (1, numel)
    codec = CODECS[codec_id]
    payload, config = codec.encode(positions, shape)
    want = codec.decode(payload, config, shape, positions.size)
    got = decode_positions(codec_id, payload, config, shape, positions.size, _send(device))
    assert got.device.type == device and got.dtype.is_floating_point is False
    assert np.array_equal(got.cpu().numpy(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_rice_and_csr_are_left_to_the_host(device):
    assert decode_positions("rice", b"", {}, (4,), 0, _send(device)) is None
    assert decode_positions("csr", b"", {}, (2, 2), 0, _send(device)) is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gaps, width", [([0, 10], 4), ([2**32 - 1], 4), ([5, 4], 4),
                                         ([2**63 + 1], 8)])
def test_gaps_past_the_end_are_refused_like_the_codec(device, gaps, width):
    """A tensor of 10 elements: a gap past it, a huge unsigned gap, positions summing past it,
    a gap that is negative as int64."""
    stream, config = pack_stream(to_planes(np.array(gaps, np.uint64).astype(f"<u{width}")))
    config = {"width": width, **config}
    with pytest.raises(DeltaFormatError):
        Gaps().decode(stream, config, (10,), len(gaps))
    with pytest.raises(DeltaFormatError):
        decode_positions("gaps", stream, config, (10,), len(gaps), _send(device))


@pytest.mark.parametrize("device", DEVICES)
def test_bitmaps_with_wrong_counts_or_stray_bits_are_refused(device):
    stream, config = pack_stream(np.array([0b10000011], np.uint8))  # bit 7: past 6 elements
    for shape, count in (((6,), 3), ((8,), 2)):
        with pytest.raises(DeltaFormatError):
            Bitmap().decode(stream, config, shape, count)
        with pytest.raises(DeltaFormatError):
            decode_positions("bitmap", stream, config, shape, count, _send(device))
