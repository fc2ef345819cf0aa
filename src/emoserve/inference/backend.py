"""The backend protocol (a network that runs a padded batch) and the choice between torch and ONNX Runtime."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from emoserve.model.entry import ModelInfo, read_entry
from emoserve.model.interface import Outputs

log = logging.getLogger(__name__)


class Backend(Protocol):
    """Runs the network on a zero-padded batch: waves (batch, samples) float32, lengths (batch,) int64."""

    @property
    def name(self) -> str: ...  # "torch" | "onnx"
    @property
    def device(self) -> str: ...  # "cpu", "cuda:0", ...
    @property
    def dtype(self) -> str: ...  # "float32", "float16", "bfloat16", "int8"

    def run(self, waves: np.ndarray, lengths: np.ndarray, frames: bool) -> Outputs: ...

    # optional: `interrupt() -> bool` stops the call in progress from another thread (OnnxBackend)
    # optional: `padded_width(samples) -> int`, the width `run` pads a batch of `samples` to (both backends)


def choose_backend(backend: str, device: str, dtype: str, info: ModelInfo) -> str:
    """ "torch" or "onnx" for these options, or a ValueError saying which options do not go together."""
    if backend == "onnx" or dtype == "int8":
        if backend == "torch":
            raise ValueError("dtype int8 runs on the onnx backend; use --backend onnx (or auto)")
        if device not in ("auto", "cpu"):
            raise ValueError(f"the onnx backend runs on the CPU, not {device!r}; use --backend torch")
        if not onnxruntime_installed():
            raise ValueError("the onnx backend needs onnxruntime: pip install onnxruntime")
        return "onnx"
    if (
        backend == "torch"
        or device not in ("auto", "cpu")
        or dtype != "float32"
        or (device == "auto" and gpu_present())
    ):
        return "torch"
    if not onnxruntime_installed():
        log.warning("onnxruntime is not installed: using the torch backend (pip install onnxruntime: faster)")
        return "torch"
    if info.onnx_graph("float32") is None:
        why = info.onnx.get("float32", {}).get("error") or "converted without one, or by an older emoserve"
        log.warning(
            "%s has no ONNX graph (%s): using the torch backend; `emoserve convert %s` adds it",
            info.name,
            why,
            info.path,
        )
        return "torch"
    return "onnx"


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


# Files a GPU driver leaves: NVIDIA's (/proc/driver/nvidia/version, /dev/nvidiactl), AMD's ROCm (/dev/kfd),
# and WSL2's, where Windows' driver reaches Linux through /dev/dxg (with libcuda in /usr/lib/wsl/lib) and
# there is no /dev/nvidiactl.
GPU_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def gpu_driver_files() -> list[str]:
    return [p for p in GPU_DRIVER_FILES if Path(p).exists()]


def gpu_present() -> bool:
    """Whether torch sees a GPU; torch is imported only when the machine has a GPU driver at all. A driver
    without a usable CUDA (too old for torch's CUDA build; a container without the compute capability)
    is said loudly: `auto` then serves on the CPU."""
    if not gpu_driver_files():
        log.info("no GPU driver found (%s): device auto is the CPU", ", ".join(GPU_DRIVER_FILES))
        return False
    import torch

    if torch.cuda.is_available():
        return True
    warn_if_cuda_unusable()
    return False


_warned: list[str] = []


def warn_if_cuda_unusable() -> None:
    """Once per process: a GPU driver is here, but torch cannot use CUDA."""
    if _warned or not (found := gpu_driver_files()):
        return
    import torch

    _warned.append("cuda")
    log.warning(
        "a GPU driver is present (%s) but torch %s cannot use CUDA (its build: CUDA %s): running on the CPU. "
        "Check that the driver is new enough for that CUDA (docs/guides/gpu.md), and in a container that "
        "NVIDIA_DRIVER_CAPABILITIES includes compute (the cuda image sets compute,utility)",
        ", ".join(found),
        torch.__version__,
        torch.version.cuda or "none: a CPU build",
    )
