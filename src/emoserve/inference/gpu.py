"""Is there a GPU torch can use: the files a driver leaves (torch is imported only when there are some),
and one loud line when a driver is there but CUDA is not usable. `--device auto` asks here."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


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


BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bfloat16 arithmetic (and SDPA kernels for it)


def half_precision(device: str) -> tuple[str, str]:
    """The half precision `--dtype auto` takes on `device` (a GPU), and its compute capability ("8.0"):
    bfloat16 from Ampere on (float32's range: no overflow in the attention's sums), float16 before."""
    import torch

    index = torch.device("cuda" if device == "auto" else device).index
    capability = torch.cuda.get_device_capability(index)
    dtype = "bfloat16" if capability >= BF16_MIN_CAPABILITY else "float16"
    return dtype, f"{capability[0]}.{capability[1]}"
