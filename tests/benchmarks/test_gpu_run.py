"""The prepared GPU run (docs/benchmarks.md section 10) before a GPU ever runs it: what it needs beyond the
GPU machine's image is carried (the wheels list checked against what `emoserve serve` needs before ready)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.device import (
    IMAGE_LIST,
    WHEELS_LIST,
    SimulatedDevice,
    guarded_serve_start,
    listed,
    simulated_device,
)
from tests.support.paths import ROOT

GPU_RUN = ROOT / "scripts" / "gpu-run.sh"
SECTIONS = ("seed", "device", "parity", "latency", "memory", "auto")  # benchmarks/gpu.py's, in order


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


# --------------------------------------------------------------------------------- the simulated device


def run_prepared_command(device: SimulatedDevice, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`scripts/gpu-run.sh ARGS` as the device tool runs it: its `python3` the device's, no PYTHONPATH or
    virtual environment of ours, $OUT a fresh folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env |= {
        "PATH": f"{device.python.parent}{os.pathsep}{env.get('PATH', '')}",
        "OUT": str(out),
        "WHEELS_DIR": str(device.wheels),
        "DEVICE_SITE": str(out.parent / "site"),
    }
    return subprocess.run(
        ["bash", str(GPU_RUN), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def device(request: pytest.FixtureRequest) -> SimulatedDevice:
    device = simulated_device(request.config.cache.mkdir("simulated-device"))

    # it holds the device's packages only: not the web UI's (gradio), not the project's own resolution
    def imports(modules: str) -> bool:
        return subprocess.run([str(device.python), "-c", f"import {modules}"], env={}).returncode == 0

    assert (
        imports("torch, onnxruntime, yaml, numpy, httpx")
        and not imports("gradio")
        and not imports("emoserve")
    )
    return device


@pytest.mark.slow
def test_the_prepared_command_runs_every_section_on_a_simulated_device(
    device: SimulatedDevice, tmp_path: Path
) -> None:
    """The command the GPU machine will run, exactly (scripts/gpu-run.sh, cited by docs/benchmarks.md section
    10), on a CPU: `--device cpu --quick`, serving included. A package the device lacks fails its import
    check or a section; a section that raises fails the command (pipefail through `tee`)."""
    out = tmp_path / "out"
    done = run_prepared_command(device, out, "--device", "cpu", "--quick", "--preset", "tiny")
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    markdown = (out / "gpu.md").read_text()
    for section in SECTIONS:
        assert f"<!-- section {section} done -->" in markdown
    assert "32 clients / 1 client" in markdown and "3 users' concurrent first requests" in markdown
    figures = json.loads((out / "gpu.json").read_text())
    assert set(SECTIONS) <= set(figures)
    assert (
        figures["device"]["torch"].startswith("2.")
        and "expandable_segments:True" in figures["device"]["allocator variables"]
    )
    assert figures["auto"]["dtype"] in ("float32", "bfloat16") and figures["auto"]["reason"]  # on the CPU


@pytest.mark.slow
def test_a_failing_section_fails_the_prepared_command(device: SimulatedDevice, tmp_path: Path) -> None:
    """Before pipefail, `gpu.py ... | tee` returned tee's 0 whatever gpu.py did (review A1)."""
    out = tmp_path / "out"
    done = run_prepared_command(
        device, out, "--device", "cpu", "--quick", "--preset", "tiny", "--serve-dtype", "int4"
    )
    assert done.returncode != 0
    assert "<!-- section seed done -->" not in (out / "gpu.md").read_text()


def test_the_docs_cite_the_prepared_command() -> None:
    """One source for the command: the docs run scripts/gpu-run.sh, they do not spell out its pipeline."""
    section = (ROOT / "docs" / "benchmarks.md").read_text().split("## 10.", 1)[1].split("\n## 11.", 1)[0]
    assert 'command="scripts/gpu-run.sh"' in section
    assert "| tee" not in section
    assert "set -euo pipefail" in GPU_RUN.read_text() and "| tee" in GPU_RUN.read_text()
