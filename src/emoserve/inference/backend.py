"""The backend protocol (a network that runs a padded batch), the choice between torch, ONNX Runtime and
OpenVINO (the fastest runtime installed for the precision, from measurement: `FASTEST`), and opening one."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from emoserve.inference.gpu import gpu_present
from emoserve.model.entry import ModelInfo, read_entry
from emoserve.model.interface import Outputs

log = logging.getLogger(__name__)


class Backend(Protocol):
    """Runs the network on a zero-padded batch: waves (batch, samples) float32, lengths (batch,) int64."""

    @property
    def name(self) -> str: ...  # "torch" | "onnx" | "openvino"
    @property
    def device(self) -> str: ...  # "cpu", "cuda:0", ...
    @property
    def dtype(self) -> str: ...  # "float32", "float16", "bfloat16", "int8"

    def run(self, waves: np.ndarray, lengths: np.ndarray, frames: bool) -> Outputs: ...

    # optional: `interrupt() -> bool` stops the call in progress from another thread (OnnxBackend; not
    # OpenVinoBackend, whose cancel is not safe in 2026.4: openvino_backend.py)
    # optional: `padded_width(samples) -> int`, the width `run` pads a batch of `samples` to


# The CPU runtimes for each precision, fastest first, as measured (large model, one 5 s clip, 2 threads,
# each row's runtimes side by side in one run): issue 23 on an Intel Xeon with AMX (float32: OpenVINO 0.48 s,
# ONNX Runtime 0.51 s, torch 0.61 s; bfloat16: OpenVINO 0.20 s, torch 0.31 s) and docs/benchmarks.md
# section 16 on an AMD EPYC with AVX512-BF16 (the same order). `--backend auto` takes the first one
# installed that can run the entry. int8 is ONNX Runtime's quantized graph only.
# float32 keeps ONNX Runtime first although OpenVINO ran a 5 s clip in 0.84x its time: OpenVINO's start
# (its compile, or its cache's load) and its memory are not measured yet, and start is what this project
# promises first (issue 23 stays open for that measurement).
FASTEST: dict[str, tuple[str, ...]] = {
    "float32": ("onnx", "openvino", "torch"),
    "bfloat16": ("openvino", "torch"),
    "int8": ("onnx",),
}
GRAPH_BACKENDS = ("onnx", "openvino")  # the runtimes that read the entry's ONNX graph


def choose_backend(backend: str, device: str, dtype: str, info: ModelInfo) -> str:
    """The backend for these options (`dtype` already chosen: never "auto"), or a ValueError saying which
    options do not go together."""
    if dtype == "int8":
        if backend not in ("auto", "onnx"):
            raise ValueError("dtype int8 runs on the onnx backend; use --backend onnx (or auto)")
        backend = "onnx"  # its quantized graph, exported on demand
    if backend in GRAPH_BACKENDS:
        if device not in ("auto", "cpu"):
            raise ValueError(f"the {backend} backend runs on the CPU, not {device!r}; use --backend torch")
        if dtype not in FASTEST or backend not in FASTEST[dtype]:
            runs = [name for name, backends in FASTEST.items() if backend in backends]
            raise ValueError(f"the {backend} backend runs {' or '.join(runs)}, not {dtype}")
        if not runtime_installed(backend):
            raise ValueError(
                f"the {backend} backend needs {RUNTIMES[backend]}: pip install {RUNTIMES[backend]}"
            )
        return backend
    if backend == "torch" or device not in ("auto", "cpu") or (device == "auto" and gpu_present()):
        return "torch"
    return fastest_backend(dtype, info)


RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino"}  # backend -> its Python package


def fastest_backend(dtype: str, info: ModelInfo) -> str:
    """`--backend auto` on a CPU: the first of FASTEST[dtype] installed that can run the entry (a graph
    runtime needs the entry's float32 ONNX graph); torch when none can, and the log says why."""
    if dtype not in FASTEST:
        return "torch"  # float16: refused on a CPU by the dtype's own check
    missing = [RUNTIMES[name] for name in FASTEST[dtype] if name in RUNTIMES and not runtime_installed(name)]
    installed = [name for name in FASTEST[dtype] if name not in RUNTIMES or runtime_installed(name)]
    graph_runtimes = [name for name in installed if name in GRAPH_BACKENDS]
    if graph_runtimes and info.onnx_graph("float32") is not None:
        return graph_runtimes[0]
    if not graph_runtimes:
        log.warning(
            "%s not installed: using the torch backend (pip install %s: faster)",
            " and ".join(missing) + (" are" if len(missing) > 1 else " is"),
            " ".join(missing),
        )
    else:
        why = info.onnx.get("float32", {}).get("error") or "converted without one, or by an older emoserve"
        log.warning(
            "%s has no ONNX graph (%s): using the torch backend; `emoserve convert %s` adds it",
            info.name,
            why,
            info.path,
        )
    return "torch"


def open_backend(name: str, dtype: str, info: ModelInfo, device: str, threads: int) -> Backend:
    """The chosen backend, loaded: `name` and `dtype` as `choose_backend` and the precision chose them."""
    if name == "onnx":
        from emoserve.inference.onnx_backend import OnnxBackend

        return OnnxBackend(onnx_graph(info, dtype), dtype, threads)
    if name == "openvino":
        from emoserve.inference.openvino_backend import OpenVinoBackend

        return OpenVinoBackend(onnx_graph(info, "float32"), dtype, threads)
    from emoserve.inference.torch_backend import TorchBackend

    return TorchBackend.load(info.path, device=device, dtype=dtype, threads=threads)


def onnx_graph(info: ModelInfo, dtype: str) -> Path:
    """The entry's ONNX graph for `dtype`, exported (with torch, once) when the entry lacks it."""
    graph = info.onnx_graph(dtype)
    if graph is None:
        from emoserve.model.convert import add_onnx

        log.info("%s has no %s ONNX graph yet: exporting it once (this needs torch)", info.name, dtype)
        graph = add_onnx(info.path, dtype).onnx_graph(dtype)
    if graph is None:
        record = read_entry(info.path).onnx.get(dtype, {})
        raise ValueError(
            f"{info.name}: no usable {dtype} ONNX graph ({record.get('error', 'export failed')})"
        )
    return graph


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def runtime_installed(backend: str) -> bool:
    return onnxruntime_installed() if backend == "onnx" else openvino_installed()
