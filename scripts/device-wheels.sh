#!/usr/bin/env bash
# The wheels that benchmarks/gpu.py needs on the GPU machine beyond what its image holds
# (scripts/device-image.txt): the distributions of scripts/device-wheels.txt, for CPython 3.12 on x86-64
# Linux, at the versions this project's .venv runs (so the GPU runs the same code paths). Into .whl/
# (git-ignored), which the device tool carries; scripts/gpu-run.sh installs them there.
#   scripts/device-wheels.sh            # needs .venv (./test.sh makes it)
# The simulated device (tests/benchmarks/test_gpu_run.py) fetches the same list for the Python it runs:
#   WHEELS_DIR=... VERSIONS_PYTHON=... DEVICE_PYTHON_VERSION=3.11 scripts/device-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

dest="${WHEELS_DIR:-.whl}"
versions_python="${VERSIONS_PYTHON:-.venv/bin/python}"
python_version="${DEVICE_PYTHON_VERSION:-3.12}"
abi="cp${python_version/./}"
mapfile -t packages < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' scripts/device-wheels.txt)
mkdir -p "$dest"
for name in "${packages[@]}"; do
    version="$("$versions_python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$python_version" --implementation cp --abi "$abi" --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        --platform any -d "$dest" "${name}==${version}"
done
du -sh "$dest"
