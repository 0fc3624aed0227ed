"""Golden bytes for the delta file format: an accidental format change fails loudly.

``tests/fixtures/golden/`` holds, for a few tiny cases, the delta file that
``sparsestitch.compress`` wrote when the fixtures were made (``<case>.delta``), and what
it must decode to (``<case>.expected.safetensors``: for each stored tensor the kept
positions, ``positions/<name>``, and the fine-tuned values there, ``values/<name>``).
``inputs.safetensors`` holds the checkpoints the deltas were made from (``base/<name>``,
``a/<name>``, ``b/<name>``); :func:`build_inputs` rebuilds them with integer arithmetic (and
one IEEE float32 addition), so they are the same on every platform and numpy version.

Two promises are tested:

* **today's writer** reproduces every golden delta byte for byte from the same inputs, and
* **today's reader** decodes every golden delta to the expected values, with and without
  the C loops -- so a change that alters the bytes on purpose must bump ``FORMAT_VERSION``
  and keep reading these files.  Files an earlier writer of the same version made stay in
  subfolders (``EARLIER``) and are decoded too.

The header records ``library_version``, which changes with every release; the fixtures are
written, and compared, with it set to :data:`GOLDEN_VERSION`, which is the only field normalised.
Some payload streams are zstd frames; zstd keeps its frames decodable forever but does not
promise the same compressed bytes across its own versions (these were made with libzstd
1.5.7, python-zstandard 0.25.0).  So a writer mismatch with the reader test still passing
can also mean a zstd upgrade or an encoder that now picks other codecs (not format changes:
regenerate); a reader failure always means old files no longer decode.

How the files were made, and how to remake them, from the repo root::

    python -m tests.test_golden

which rebuilds the inputs, compresses them with the version field set to ``GOLDEN_VERSION``,
and writes all the files above (``main`` below); the expected positions are read from the new
deltas, the expected values are taken from the fine-tuned inputs, not from the decoder.  After
an intended format change, first move the current files to a ``v<old version>/`` folder and
keep the reader test running on them: new versions must keep reading old files.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsestitch
from sparsestitch.delta import codecs
from sparsestitch.core.dtypes import dtype
from sparsestitch.delta.format import FORMAT_VERSION, DeltaReader
from sparsestitch.core.sizes import numel

from .conftest import bits

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
GOLDEN_VERSION = "0.0.0+golden"
CHECKPOINTS = ("base", "a", "b", "c")   # inputs.safetensors prefixes; files are named <prefix>.safetensors
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                "F64": torch.float64, "I64": torch.int64}

# -- the inputs -----------------------------------------------------------------------------------


def hashed(count: int, salt: int) -> np.ndarray:
    """``count`` pseudo-random 24-bit integers from integer arithmetic alone (no RNG streams)."""
    i = np.arange(count, dtype=np.uint64) + np.uint64(salt * 7919)
    return ((i * np.uint64(2654435761) + np.uint64(salt)) % np.uint64(1 << 32) >> np.uint64(8)
            ).astype(np.uint64)


def float_bits(dt_name: str, count: int, salt: int) -> np.ndarray:
    """Bits of values with magnitudes between 2**-6 and 1 and random signs."""
    mant = {"BF16": 7, "F16": 10, "F32": 23, "F64": 52}[dt_name]
    bias = {"BF16": 127, "F16": 15, "F32": 127, "F64": 1023}[dt_name]
    h = hashed(count, salt)
    sign = (h & np.uint64(1)) << np.uint64(8 * dtype(dt_name).itemsize - 1)
    exponent = (np.uint64(bias - 6) + (h >> np.uint64(1)) % np.uint64(6)) << np.uint64(mant)
    mantissa = (h >> np.uint64(4)) % np.uint64(1 << min(mant, 20))
    return (sign | exponent | mantissa).astype(dtype(dt_name).bits)


def nudged(values: np.ndarray, salt: int, big_every: int) -> np.ndarray:
    """Move each float a few units in the last place; every ``big_every``-th by a lot more."""
    h = hashed(values.size, salt)
    steps = (h % np.uint64(9)).astype(np.int64) - 4
    steps[::big_every] *= 500
    return (values.astype(np.int64) + steps).astype(values.dtype)


def special_values(dt_name: str) -> list[int]:
    """NaN payloads (quiet, signalling, negative), -0.0, infinities, subnormals, max finite."""
    mant = {"BF16": 7, "F16": 10, "F32": 23, "F64": 52}[dt_name]
    top = 1 << (8 * dtype(dt_name).itemsize - 1)
    inf = (top - 1) & ~((1 << mant) - 1)
    return [inf | (1 << (mant - 1)) | 5, inf | 3, top | inf | 1, top, inf, top | inf, 1,
            top | ((1 << mant) - 1), inf - 1]


def build_inputs() -> dict[str, dict[str, tuple[str, np.ndarray]]]:
    """``{checkpoint: {tensor: (dtype name, bits)}}`` for the base and fine-tunes a, b, c.

    a: small changes everywhere with a few large ones, an unchanged tensor, a changed
    integer tensor and an added tensor.  b: special values written into the base.  c: the
    bf16 matrix changed along two directions (what low-rank records hold best).
    """
    shapes = {"attn.weight": ("BF16", (20, 18)), "bias.long": ("F16", (256,)),
              "mlp.weight": ("F32", (24,)), "norm.weight": ("F16", (16,)), "scale": ("F64", ())}
    base = {}
    for salt, (name, (dt_name, shape)) in enumerate(sorted(shapes.items()), start=1):
        count = numel(shape)
        base[name] = (dt_name, float_bits(dt_name, count, salt).reshape(shape))
    base["pos_ids"] = ("I64", np.arange(6, dtype=np.uint64))

    a = {}
    for salt, (name, (dt_name, values)) in enumerate(sorted(base.items()), start=20):
        if name == "norm.weight":
            a[name] = (dt_name, values.copy())
        elif name == "pos_ids":
            a[name] = (dt_name, values.copy())
            a[name][1][4] = 40
        else:
            a[name] = (dt_name, nudged(values.reshape(-1), salt, 7).reshape(values.shape))
    a["head.weight"] = ("F32", float_bits("F32", 6, 40).reshape(2, 3))

    b = {name: (dt_name, values.copy()) for name, (dt_name, values) in base.items()}
    # one step of 2**-8 everywhere: tau is one repeated number, which beats xor
    b["mlp.weight"] = ("F32", (base["mlp.weight"][1].view(np.float32) + np.float32(2**-8))
                       .view(np.uint32))
    for name in ("attn.weight", "mlp.weight", "scale"):
        dt_name, values = b[name]
        flat = values.reshape(-1)
        specials = special_values(dt_name)[:min(flat.size, 3 if name == "mlp.weight" else 9)]
        flat[:len(specials)] = np.array(specials, dtype=np.uint64).astype(flat.dtype)
    c = {name: (dt_name, values.copy()) for name, (dt_name, values) in base.items()}
    c["attn.weight"] = ("BF16", rank_two_change(base["attn.weight"][1]))
    return {"base": base, "a": a, "b": b, "c": c}


def rank_two_change(bits16: np.ndarray) -> np.ndarray:
    """bf16 bits plus ``u v^T 2**-9`` (small integer ``u``, ``v``: exact in float32), summed in
    one float32 addition and rounded to bf16 to nearest even with integer arithmetic."""
    rows, cols = bits16.shape
    u = (hashed(2 * rows, 50) % np.uint64(15)).astype(np.int64).reshape(rows, 2) - 7
    v = (hashed(2 * cols, 51) % np.uint64(15)).astype(np.int64).reshape(2, cols) - 7
    change = (u @ v).astype(np.float32) * np.float32(2**-9)
    wide = (bits16.astype(np.uint32) << np.uint32(16)).view(np.float32)
    summed = (wide + change).view(np.uint32)
    rounded = (summed + np.uint32(0x7FFF) + ((summed >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def block_mask(shape: tuple[int, ...], rows: list[int], columns: int) -> np.ndarray:
    """The first ``columns`` columns of ``rows``."""
    mask = np.zeros(shape, dtype=bool)
    mask[rows, :columns] = True
    return mask


def run_mask(size: int, start: int, stop: int) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[start:stop] = True
    return mask


#: The low-rank case's max_size: small enough that c's matrix is cheaper as low-rank.
LOWRANK_SIZE = 3000
#: case -> (fine-tune, compress keyword arguments).  Together they use every codec.
CASES = {
    "topk": ("a", {"density": 0.05, "scope": "global"}),
    "fidelity": ("a", {"density": 0.05}),
    "per_tensor": ("a", {"density": 0.5, "scope": "per-tensor", "include": ["mlp.*", "scale"]}),
    "dense": ("b", {"density": 1.0, "include": ["attn.*", "mlp.*", "scale"]}),
    # Lossy (format version 2): expected values are what the decoder gave when the fixtures
    # were made, so any change to quant decoding fails here.
    "quant1": ("a", {"density": 1.0, "bits": 1, "group": 0}),
    "quant4": ("b", {"density": 0.6, "bits": 4, "group": 8}),
    # Low-rank records (format version 4): c's bf16 matrix as quantized factors; expected
    # values are the decoder's when the fixtures were made.
    "lowrank": ("c", {"low_rank": True, "max_size": LOWRANK_SIZE}),
    # Every changed element (format version 3 where the ulp codec wins).
    "lossless": ("a", {"lossless": True}),
    "mask": ("a", {"masks": {"attn.weight": block_mask((20, 18), [7, 10, 13, 16], 14),
                             "bias.long": run_mask(256, 226, 256),
                             "mlp.weight": run_mask(24, 0, 24) ^ (np.arange(24) % 3 == 1)}}),
}


def save_inputs(inputs, folder: Path) -> dict[str, Path]:
    paths = {}
    for checkpoint, tensors in inputs.items():
        paths[checkpoint] = folder / f"{checkpoint}.safetensors"
        save_file({name: as_torch(dt_name, values) for name, (dt_name, values) in tensors.items()},
                  str(paths[checkpoint]))
    return paths


def as_torch(dt_name: str, values: np.ndarray) -> torch.Tensor:
    signed = values.copy(order="C").view(f"<i{values.dtype.itemsize}")  # keeps 0-d shapes
    return torch.from_numpy(signed).view(TORCH_DTYPES[dt_name])


@contextmanager
def golden_version():
    """Write ``GOLDEN_VERSION`` as the header's ``library_version``."""
    with mock.patch.object(importlib.import_module("sparsestitch.ops.delta_outputs"), "__version__",
                           GOLDEN_VERSION):
        yield


def compress_case(case: str, paths: dict[str, Path], out: Path, overwrite: bool = False) -> Path:
    finetune, kwargs = CASES[case]
    with golden_version():
        sparsestitch.compress(paths["base"], paths[finetune], out, overwrite=overwrite, **kwargs)
    return out


def load_bits(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors as raw bits, read with the safetensors library."""
    return {name: bits(tensor) for name, tensor in load_file(str(path)).items()}


# -- the tests ------------------------------------------------------------------------------------

def test_inputs_are_rebuilt_bit_for_bit():
    stored = load_bits(GOLDEN / "inputs.safetensors")
    rebuilt = build_inputs()
    assert sorted(stored) == sorted(f"{c}/{n}" for c in CHECKPOINTS for n in rebuilt[c])
    for checkpoint, tensors in rebuilt.items():
        for name, (dt_name, values) in tensors.items():
            want = stored[f"{checkpoint}/{name}"]
            assert want.shape == values.shape
            assert (want.view(values.dtype) == values).all(), f"{checkpoint}/{name}"


@pytest.mark.parametrize("case", CASES)
def test_todays_writer_reproduces_the_golden_bytes(case, tmp_path):
    paths = save_inputs(build_inputs(), tmp_path)
    written = compress_case(case, paths, tmp_path / f"{case}.delta").read_bytes()
    golden = (GOLDEN / f"{case}.delta").read_bytes()
    assert written == golden, (
        f"{case}.delta changed: the writer no longer writes what format version {FORMAT_VERSION} "
        "wrote. A format change must bump FORMAT_VERSION, keep reading the old files and add "
        "golden files (python -m tests.test_golden); a new zstd or new codec choices only need "
        "regenerating (see this module's docstring); otherwise find the accidental change.")


#: Files an earlier writer made, which today's reader must still decode: ``dense`` from
#: before the tau codec listed every NaN sum as an exception (format.md section 4.3), every
#: case from before records carried fidelity reports (and ties went by position), and the
#: version-1 files of the cases where the ulp codec (version 3) now wins.
EARLIER = {"before-nan-exceptions/dense": "dense",
           **{f"before-fidelity-reports/{case}": case
              for case in ("topk", "per_tensor", "dense", "mask")},
           **{f"before-ulp/{case}": case for case in ("topk", "per_tensor", "mask")},
           # before dense quantized records were encoded as they stream (issue 20): the
           # same values, but unchanged tensors carried no fidelity report
           "before-streamed-quant/quant1": "quant1",
           # before headers said how values were quantized (``quantize``, ``target``): the
           # same records
           **{f"before-header-fields/{case}": case for case in ("quant1", "quant4")},
           # before --low-rank --max-size chose each tensor's record kind (issue 22): a's
           # bf16 matrix as low-rank factors, the rest exactly (a's inputs, as fidelity's)
           "before-kind-choice/lowrank": "fidelity"}


@pytest.mark.parametrize("native_loops", ["1", "0"])
@pytest.mark.parametrize("case", [*CASES, *EARLIER])
def test_todays_reader_decodes_the_golden_files(case, native_loops):
    with mock.patch.dict("os.environ", {"SPARSESTITCH_NATIVE": native_loops}):
        _check_golden_decodes(case, EARLIER.get(case, case))


def _check_golden_decodes(case: str, inputs_case: str) -> None:
    inputs = load_bits(GOLDEN / "inputs.safetensors")
    expected = load_bits(GOLDEN / f"{case}.expected.safetensors")
    finetune = CASES[inputs_case][0]
    stored = set()
    with DeltaReader(GOLDEN / f"{case}.delta") as reader:
        assert reader.header["library_version"] == GOLDEN_VERSION
        codecs_used = {r.values["codec"] for r in reader.records if r.kind != "base"}
        assert reader.header["format_version"] == (4 if "lowrank" in codecs_used else
                                                   3 if "ulp" in codecs_used else
                                                   2 if "quant" in codecs_used else 1)
        assert sorted(r.name for r in reader.records) == sorted(
            name.split("/", 1)[1] for name in inputs if name.startswith(f"{finetune}/"))
        for record in reader.records:
            if record.kind == "base":
                continue
            stored.add(record.name)
            base = inputs.get(f"base/{record.name}")
            base = None if base is None else base.view(record.dt.bits)
            positions, values = reader.decode(record, base)
            np.testing.assert_array_equal(positions, expected[f"positions/{record.name}"])
            np.testing.assert_array_equal(values, expected[f"values/{record.name}"].view(values.dtype))
    assert sorted(expected) == sorted(f"{kind}/{name}" for name in stored
                                      for kind in ("positions", "values"))
    for name, mask in CASES[inputs_case][1].get("masks", {}).items():  # given masks: just those
        np.testing.assert_array_equal(expected[f"positions/{name}"], np.flatnonzero(mask))


def test_golden_files_pin_every_codec_and_record_kind():
    seen = set()
    for case in CASES:
        with DeltaReader(GOLDEN / f"{case}.delta") as reader:
            records = reader.header["tensors"]
        for record in records:
            seen.add(("kind", record["kind"]))
            if record["kind"] != "base":
                seen.add(("positions", record["positions"]["codec"]))
                seen.add(("values", record["values"]["codec"]))
    wanted = ({("kind", kind) for kind in ("sparse", "base", "added")}
              | {("positions", c.codec_id) for c in codecs.POSITION_CODECS}
              | {("values", c.codec_id) for c in codecs.VALUE_CODECS})
    assert wanted <= seen, f"no golden file uses {sorted(wanted - seen)}: add a case"


# -- regenerating the fixtures --------------------------------------------------------------------

def expected_decoding(delta: Path, inputs, finetune: str) -> dict[str, torch.Tensor]:
    """Positions from the delta; values from the fine-tuned input itself, not the decoder --
    except for lossy (quant, lowrank) records, whose values are the decoder's of today."""
    out = {}
    with DeltaReader(delta) as reader:
        for record in reader.records:
            if record.kind == "base":
                continue
            positions = reader.positions(record)
            dt_name, finetuned = inputs[finetune][record.name]
            values = finetuned.reshape(-1)[positions]
            if record.values["codec"] in ("quant", "lowrank"):
                base = inputs["base"][record.name][1].reshape(-1).view(record.dt.bits)
                values = reader.decode(record, base)[1]
            out[f"positions/{record.name}"] = torch.from_numpy(positions.copy())
            out[f"values/{record.name}"] = as_torch(dt_name, values)
    return out


def main() -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    inputs = build_inputs()
    save_file({f"{c}/{n}": as_torch(dt_name, values)
               for c, tensors in inputs.items() for n, (dt_name, values) in tensors.items()},
              str(GOLDEN / "inputs.safetensors"))
    with tempfile.TemporaryDirectory() as folder:
        paths = save_inputs(inputs, Path(folder))
        for case, (finetune, _) in CASES.items():
            delta = compress_case(case, paths, GOLDEN / f"{case}.delta", overwrite=True)
            save_file(expected_decoding(delta, inputs, finetune),
                      str(GOLDEN / f"{case}.expected.safetensors"))
            print(f"{delta} ({delta.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
