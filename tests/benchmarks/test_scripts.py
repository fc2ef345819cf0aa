"""The benchmarks keep running: each script once, quick, on a tiny model (figures are not checked
here; they live in docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.paths import ROOT

BENCHMARKS = ROOT / "benchmarks"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "figure"),
    [
        ("cold_start.py", "spawn -> first result, onnx / torch backend"),
        ("latency.py", "onnx / torch"),
        ("onnx_options.py", "file-backed"),
        ("batching.py --side-by-side", "side by side / one at a time"),
        ("serve_start.py", "the web UI's recognise (Gradio API), first / steady"),
        ("serve_load.py", "only 200"),
        ("serve_memory.py", "RSS after"),
        ("soak.py", "RSS growth, first to last minute"),
        ("allocator.py", "RSS growth per 100 lengths"),
        ("timeline.py", "pipeline / one-at-a-time"),
        ("jobs.py", "beside jobs / idle"),
        ("stream.py", "streams behind real time"),
        ("agents.py", "stopped -> reading"),
        ("start_path.py --against HEAD", "modules loaded by that import"),
        ("regression_heads.py", "mean CCC / ridge(alpha=1)"),
        # gpu.py: through scripts/gpu-run.sh on a simulated device, test_gpu_run.py
    ],
)
def test_benchmark_runs(script: str, figure: str) -> None:
    name, *extra = script.split()
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), "--quick", "--preset", "tiny", *extra],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BENCHMARKS.parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert figure in done.stdout
