"""Record values decoded on the device (stitch/device_values.py, torch on the CPU device)
against the codecs' own numpy decoders: bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsestitch.delta.codecs import QuantValues, RawValues, TauValues, XorValues
from sparsestitch.core.dtypes import dtype
from sparsestitch.core.torch_bits import as_torch
from sparsestitch.delta.device import values_on_device as decode_values

from .test_device import DEVICES, _base_bits, _bits_like

CODECS = {"tau": TauValues(), "xor": XorValues(), "raw": RawValues()}


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1),
       dt_name=st.sampled_from(["BF16", "F16", "F32", "F64", "I32", "U8", "BOOL", "I64"]),
       codec_id=st.sampled_from(sorted(CODECS)), count=st.integers(0, 400),
       wild=st.sampled_from([0.0, 0.1, 0.5]))
def test_device_decoding_matches_the_codecs(device, seed, dt_name, codec_id, count, wild):
    """Random base and fine-tuned bits (NaN, inf, -0.0, subnormals; exceptions of ``tau``)."""
    dt = dtype(dt_name)
    codec = CODECS[codec_id]
    if not codec.applies(dt):
        codec_id, codec = "xor", CODECS["xor"]
    rng = np.random.default_rng(seed)
    base = _base_bits(rng, dt, count, repeated=0.3) if count else np.empty(0, dt.bits)
    kept = _bits_like(rng, dt, base, wild)
    payload, config = codec.encode(kept, base, dt)
    want = codec.decode(payload, config, base, dt, count)
    assert np.array_equal(want, kept)
    got = decode_values(codec_id, payload, config, as_torch(base).to(device), dt, count)
    assert not got.on_host and got.bits.device.type == device
    assert np.array_equal(got.bits.cpu().numpy().view(dt.bits), want)


def test_quant_values_are_decoded_on_the_host_and_say_so():
    dt = dtype("BF16")
    rng = np.random.default_rng(1)
    base = _base_bits(rng, dt, 256, repeated=0.0)
    base = (torch.randn(256) * 0.02).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    kept = (torch.from_numpy(base.view(np.int16)).view(torch.bfloat16).float()
            + torch.randn(256) * 1e-3).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    codec = QuantValues()
    payload, config = codec.encode(kept, base, dt)
    want = codec.decode(payload, config, base, dt, 256)
    got = decode_values("quant", payload, config, as_torch(base), dt, 256)
    assert got.on_host
    assert np.array_equal(got.bits.numpy().view(dt.bits), want)
