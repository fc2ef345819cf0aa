#!/usr/bin/env bash
# The wheels that benchmarks/gpu.py needs on the GPU machine beyond what it has (torch, numpy, safetensors,
# pyyaml, onnxruntime, prometheus-client, h11, anyio's peers): the decoders and the server's libraries, for
# CPython 3.12 on x86-64 Linux, at the versions this project's .venv runs (so the GPU runs the same code
# paths). Into .whl/ (git-ignored), which the device tool carries; docs/benchmarks.md has the command.
#   scripts/device-wheels.sh            # needs .venv (./test.sh makes it)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
    soundfile cffi pycparser soxr platformdirs                      # decoding (libsndfile inside soundfile)
    fastapi starlette pydantic pydantic_core annotated-types typing-inspection typing_extensions
    annotated-doc opentelemetry-api uvicorn python-multipart anyio   # the HTTP server
)
mkdir -p .whl
for name in "${packages[@]}"; do
    version="$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        --platform any -d .whl "${name}==${version}"
done
du -sh .whl
