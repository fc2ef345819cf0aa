#!/usr/bin/env bash
# The prepared GPU run: the one command docs/benchmarks.md section 10 documents, that the device tool runs
# and that the simulated device (tests/benchmarks/test_gpu_run.py) runs on a CPU. From the repository root:
#   run(carry=[".whl"], timeout_s=600, command="scripts/gpu-run.sh")          # the GPU machine
#   scripts/gpu-run.sh --device cpu --quick --preset tiny                      # anywhere, a smoke run
# It installs the carried wheels (scripts/device-wheels.sh made them) beside the image's packages, checks the
# server's imports in a second, then runs benchmarks/gpu.py with any arguments given here. The tables go to
# $OUT/gpu.md and every figure to $OUT/gpu.json; with pipefail, a failing section fails the command.
set -euo pipefail
cd "$(dirname "$0")/.."

wheels="${WHEELS_DIR:-.whl}"
site="${DEVICE_SITE:-/tmp/site}"
out="${OUT:-.bench/gpu-run}"
mkdir -p "$out"
python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$site" "$wheels"/*.whl
export PYTHONPATH="$site:$PWD/src" PYTHONUNBUFFERED=1
# what `emoserve serve` needs before ready (the routes' warm-up: review A1), before minutes of work
python3 -c "import importlib.util, emoserve.api.app, uvicorn, soundfile, websockets.sync.client
assert importlib.util.find_spec('silero_vad'), 'silero-vad is missing (scripts/device-wheels.txt)'"
python3 benchmarks/gpu.py --out "$out" "$@" 2>&1 | tee "$out/gpu.md"
