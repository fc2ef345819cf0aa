"""The OpenVINO backend: the entry's ONNX graph (the same file the onnx backend runs: no second export) on
Intel's runtime, on the CPU, in float32 or bfloat16, without torch.

OpenVINO reads the graph and compiles it for this CPU; the compiled model is kept in the model cache
beside the entry (OpenVINO's `CACHE_DIR`, one blob per graph, precision and CPU), so a restart loads it
instead of compiling again. bfloat16 is OpenVINO's `INFERENCE_PRECISION_HINT`: the weights and the
matmuls in bf16 on the CPU's native bf16 units (AMX or AVX512-BF16), with its own choice of which nodes
stay in float32; the outputs come back as float32.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from emoserve.model.interface import (
    INPUTS,
    OUTPUTS,
    UTTERANCE_OUTPUTS,
    Outputs,
    bucket_width,
    pad_to_bucket,
)

CACHE_DIR = "openvino-cache"  # inside the entry: the compiled models, one blob per graph, precision, CPU
PRECISION_HINTS = {"float32": "f32", "bfloat16": "bf16"}
# The CPU plugin keeps the primitives it made for each input shape (batch x padded width) in a runtime
# cache of 5000 entries by default: under traffic of many shapes the process grew ~250 MB a minute (the
# soak, docs/benchmarks.md section 17). 64 entries hold it flat at a cost within the noise on random
# shapes (0 entries: 22% slower there); the padded widths keep the shapes a server sees few.
RUNTIME_CACHE_ENTRIES = 64


def compile_config(dtype: str, threads: int, cache_dir: Path | None) -> dict[str, Any]:
    """The CPU plugin's properties: the precision, the threads as the onnx backend sets them (one per
    physical core, one stream: a model call uses them all), latency rather than throughput."""
    if dtype not in PRECISION_HINTS:
        raise ValueError(f"dtype {dtype!r} is not for the openvino backend; choose float32 or bfloat16")
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": PRECISION_HINTS[dtype],
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE_ENTRIES,
    }
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    return config


class OpenVinoBackend:
    """Not interruptible (no `interrupt()`, as torch): OpenVINO 2026.4's `InferRequest.cancel` makes
    `wait()` return while the graph is still running, and the next call on the same compiled model then
    failed ("Convert node ... has different elements number") or aborted the process ("pure virtual method
    called") in our tests. So a live stream's interim reading in progress runs to its end: the engine still
    serves a stream's segment or a person's clip next, after at most one interim call (a window of 10 s by
    default: ~0.5 s of the large model in bfloat16 on 2 cores, docs/benchmarks.md section 16)."""

    name = "openvino"
    device = "cpu"

    def __init__(self, graph: Path, dtype: str, threads: int, *, cache: bool = True) -> None:
        """`cache`: keep the compiled model in the entry's CACHE_DIR (unwritable: compiled every time)."""
        self.graph = graph
        self.dtype = dtype
        self.threads = threads
        self.cache_dir = graph.parent / CACHE_DIR if cache and _writable(graph.parent) else None
        # compile_model from the path: with a cache, a restart skips reading the graph as well
        self.compiled = ov.Core().compile_model(
            str(graph), "CPU", compile_config(dtype, threads, self.cache_dir)
        )
        self._inputs = [_port(self.compiled.inputs, name) for name in INPUTS]
        self._outputs = {name: _port(self.compiled.outputs, name) for name in OUTPUTS}
        self._request = self.compiled.create_infer_request()

    def padded_width(self, samples: int) -> int:
        return bucket_width(samples)

    def run(self, waves: np.ndarray, lengths: np.ndarray, frames: bool) -> Outputs:
        # a bounded set of input widths, as on ONNX Runtime (model/interface.py): the CPU plugin keeps
        # compiled kernels per input shape
        waves = pad_to_bucket(waves)
        got = self._request.infer({self._inputs[0]: waves, self._inputs[1]: lengths})
        names = OUTPUTS if frames else UTTERANCE_OUTPUTS
        return Outputs.named({name: got[self._outputs[name]] for name in names})


def _port(ports: Any, name: str) -> Any:
    """The graph's input or output named `name` (its tensors may carry other names besides)."""
    for port in ports:
        if name in port.get_names():
            return port
    raise ValueError(f"the ONNX graph has no input or output {name!r}")


def _writable(folder: Path) -> bool:
    """Whether the compiled-model cache can live in `folder` (an entry in a read-only image cannot)."""
    try:
        (folder / CACHE_DIR).mkdir(exist_ok=True)
    except OSError:
        return False
    return os.access(folder / CACHE_DIR, os.W_OK)
