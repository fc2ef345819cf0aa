"""The prepared GPU run (docs/benchmarks.md section 10) before a GPU ever runs it: what it needs beyond the
GPU machine's image is carried (the wheels list checked against what `emoserve serve` needs before ready)."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.support.device import IMAGE_LIST, WHEELS_LIST, guarded_serve_start, listed


def test_serve_starts_with_the_gpu_image_and_the_carried_wheels_alone(tmp_path: Path) -> None:
    """Review cuda-2026-12 A1: the GPU run's serve section would have failed at the routes' warm-up (the
    timeline's silero-vad, the stream's websockets), neither in the image nor carried. Here every installed
    distribution outside the image's list and the wheels' list is unimportable, as on the device: the
    start reaches ready, and the distributions it used beyond the image are exactly the carried ones it
    needs (optional imports, such as httpx's brotli, fall back as they would there)."""
    image, wheels = listed(IMAGE_LIST), listed(WHEELS_LIST)
    start = guarded_serve_start(tmp_path, image | wheels)
    assert start.ready and start.returncode == 0, start.log[-3000:]
    carried = start.used - image
    assert {"silero-vad", "websockets", "fastapi", "uvicorn", "soundfile"} <= carried
    assert carried <= wheels
    # what the device machine lacks and this .venv has is never used (gradio, the web UI's, for one)
    print(f"used beyond the image: {sorted(carried)}; blocked: {sorted(start.blocked)}", file=sys.stderr)


def test_a_wheel_missing_from_the_list_fails_the_start(tmp_path: Path) -> None:
    """The check checks: without websockets carried, the start fails at the stream's warm-up, loudly."""
    image, wheels = listed(IMAGE_LIST), listed(WHEELS_LIST)
    start = guarded_serve_start(tmp_path, image | (wheels - {"websockets"}))
    assert not start.ready and start.returncode not in (0, None)
    assert "websockets" in start.blocked and "websockets" in start.log


def test_the_lists_are_lists_of_distributions() -> None:
    image, wheels = listed(IMAGE_LIST), listed(WHEELS_LIST)
    assert {"torch", "numpy", "onnxruntime", "safetensors", "pyyaml", "prometheus-client", "httpx"} <= image
    assert not {"silero-vad", "websockets", "soundfile", "fastapi", "uvicorn"} & image
    assert "sniffio" not in wheels  # anyio 4.16 (the .venv's) requires no sniffio (its METADATA)
