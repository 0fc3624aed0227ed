"""End-to-end smoke test: compress -> restore -> stitch on small real safetensors files."""

from safetensors.torch import load_file

import sparsestitch

from .conftest import bits


def test_density_one_restores_bit_identical(zoo, tmp_path):
    delta = tmp_path / "ft1.delta"
    sparsestitch.compress(zoo["base"], zoo["ft1"], delta, density=1.0)
    out = sparsestitch.restore(zoo["base"], delta, tmp_path / "restored.safetensors")
    want, got = load_file(zoo["ft1"]), load_file(out)
    assert want.keys() == got.keys()
    for name in want:
        assert (bits(want[name]) == bits(got[name])).all(), name
