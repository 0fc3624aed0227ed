#!/usr/bin/env bash
# The GPU check of issue 15, in at most 5 minutes on one GPU (docs/results-stitch.md):
#   1. the device tests with CUDA (torch on the GPU against numpy, bit for bit: every rule and
#      float dtype, value decoding, stitch_into, the engine, hot-swap on CUDA tensors);
#   2. bench/gpu.py: a 7B-parameter bf16 base and 8 deltas at 1% made on this machine,
#      the floors, stitch vs the I/O floor, hot swap, stitch into the resident model.
# Installs nothing from the network: it needs a Python with torch (CUDA build), numpy,
# safetensors, zstandard, xxhash, click, pyyaml, tqdm, pytest and hypothesis (PYTHON=...,
# default python3).  Wheels of the missing ones, downloaded beforehand on a machine with a
# network and carried along in $WHEELS (default bench/.cache/wheels), are installed from
# that folder into /tmp/gpu-check-deps (see docs/results-stitch.md).
#
#   bash bench/gpu_check.sh                                  # on the GPU machine
#   SIZE_GB=0.05 DEVICE=cpu bash bench/gpu_check.sh          # rehearsal without a GPU
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SIZE_GB=${SIZE_GB:-14}          # bf16 bytes: 14 GB is 7B parameters
DEVICE=${DEVICE:-cuda}
TOTAL_S=${TOTAL_S:-290}         # everything, under the check's 5 minutes
TESTS_S=${TESTS_S:-100}
RESULTS=bench/results
mkdir -p "$RESULTS"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
log="$RESULTS/gpu-check-$stamp.log"
started=$SECONDS

{
  echo "# gpu_check $stamp: SIZE_GB=$SIZE_GB DEVICE=$DEVICE commit $(git rev-parse --short HEAD 2>/dev/null)"
  $PYTHON -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
  if [ "$DEVICE" = cuda ] && ! $PYTHON -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "torch sees no CUDA device: run with DEVICE=cpu for the rehearsal"; exit 2
  fi
  WHEELS=${WHEELS:-bench/.cache/wheels}
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    $PYTHON -m pip install -q --no-index --no-deps --target /tmp/gpu-check-deps "$WHEELS"/*.whl
    export PYTHONPATH=$PWD:/tmp/gpu-check-deps${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ! $PYTHON -c "import numpy, torch, safetensors, zstandard, xxhash, click, yaml, tqdm, pytest, hypothesis"; then
    echo "a dependency is missing (above): carry its wheel in \$WHEELS"; exit 2
  fi
  # The C loops are optional (numpy gives the same bits); build them when a compiler is there.
  $PYTHON setup.py build_ext --inplace -q >/dev/null 2>&1 || echo "C extension not built: numpy fallback"

  echo "## device tests (${TESTS_S}s at most)"
  timeout "$TESTS_S" $PYTHON -m pytest -q -p no:cacheprovider -o addopts="" -rs \
      tests/test_device.py tests/test_device_values.py tests/test_device_positions.py \
      tests/test_resident.py \
      tests/test_live.py::test_cuda_tensors_are_patched_on_the_device \
      tests/test_prepared.py -k "cuda or not test_prepared" 2>&1 | tail -n 25
  tests_rc=${PIPESTATUS[0]}
  echo "device tests exit status: $tests_rc"

  left=$(( TOTAL_S - (SECONDS - started) ))
  echo "## bench/gpu.py (${left}s left)"
  timeout "$left" $PYTHON bench/gpu.py --size-gb "$SIZE_GB" --device "$DEVICE" \
      --budget-s $(( left * 6 / 10 ))
  bench_rc=$?
  echo "bench exit status: $bench_rc; total $(( SECONDS - started )) s"
  exit $(( tests_rc != 0 || bench_rc != 0 ))
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
