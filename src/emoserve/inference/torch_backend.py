"""The PyTorch backend: the network of `model/network.py` with weights memory-mapped from a cache entry.

Runs on CPUs and GPUs: float16 on GPUs, bfloat16 on GPUs and on CPUs with native bf16 (the weights cast
to bf16 at load; `inference/precision.py` checks the CPU); on a CPU openvino or onnx is usually faster.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from emoserve.inference.gpu import BF16_MIN_CAPABILITY, warn_if_cuda_unusable
from emoserve.model.convert import load_entry
from emoserve.model.interface import CUDA_WIDTHS_PER_OCTAVE_LOG2, Outputs, bucket_width, pad_to_bucket
from emoserve.model.network import Emotion2vec

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchBackend:
    name = "torch"

    def __init__(self, model: Emotion2vec) -> None:
        self.model = model

    @classmethod
    def load(cls, entry: Path, *, device: str, dtype: str, threads: int) -> TorchBackend:
        chosen = pick_device(device)
        if chosen.type == "cpu":
            torch.set_num_threads(threads)
        else:
            use_expandable_segments()  # before pick_dtype: reading the capability initialises CUDA
            set_float32_math()
        torch_dtype = pick_dtype(dtype, chosen)
        model, _ = load_entry(entry, chosen, torch_dtype)
        return cls(model)

    @property
    def device(self) -> str:
        return str(self.model.proj.weight.device)

    @property
    def dtype(self) -> str:
        return str(self.model.proj.weight.dtype).removeprefix("torch.")

    def padded_width(self, samples: int) -> int:
        on_cuda = self.model.proj.weight.device.type == "cuda"
        return bucket_width(samples, CUDA_WIDTHS_PER_OCTAVE_LOG2) if on_cuda else samples

    def run(self, waves: np.ndarray, lengths: np.ndarray, frames: bool) -> Outputs:
        device = self.model.proj.weight.device
        if device.type == "cuda":
            waves = pad_to_bucket(waves, CUDA_WIDTHS_PER_OCTAVE_LOG2)  # a few shapes: warm-up covers them
        with torch.inference_mode():
            inputs = torch.from_numpy(waves).to(device), torch.from_numpy(lengths).to(device)
            if not frames:
                logits, pooled, frame_lengths = self.model.utterance_outputs(*inputs)
                return Outputs(
                    logits.cpu().numpy(), pooled.cpu().numpy(), None, None, frame_lengths.cpu().numpy()
                )
            logits, pooled, frame_logits, frame_embeddings, frame_lengths = self.model.outputs(*inputs)
            return Outputs(
                logits.cpu().numpy(),
                pooled.cpu().numpy(),
                frame_logits.cpu().numpy(),
                frame_embeddings.cpu().numpy(),
                frame_lengths.cpu().numpy(),
            )


ALLOCATOR_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # the new name, the old (2.9+)
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def use_expandable_segments() -> bool:
    """The CUDA caching allocator with expandable segments, unless either allocator variable says
    otherwise: batches of many different sizes grow one segment instead of leaving reserved blocks that
    fit no later request. torch reads the variable when CUDA initialises (its first allocation, or
    `get_device_properties`), so this must run before anything touches the device; after that it is too
    late, and a warning says so. Both names are set: torch 2.9.1 reads only the old one for expandable
    segments (pytorch/pytorch#183387), later versions prefer the new one. Returns whether it was set."""
    if any(name in os.environ for name in ALLOCATOR_VARIABLES):
        return False
    if torch.cuda.is_initialized():
        log.warning(
            "CUDA was initialised before emoserve loaded the model: expandable segments stay off "
            "(export PYTORCH_ALLOC_CONF=%s before starting Python to turn them on)",
            EXPANDABLE_SEGMENTS,
        )
        return False
    for name in ALLOCATOR_VARIABLES:
        os.environ[name] = EXPANDABLE_SEGMENTS
    return True


def set_float32_math() -> dict[str, str]:
    """float32 on a GPU means IEEE float32, for matmuls and convolutions alike. torch's defaults mix them:
    cuDNN convolutions in TF32 (a 10-bit mantissa) and matmuls in IEEE float32, so a "float32" figure
    was neither. We choose IEEE for both: float32 is the reference the half dtypes are checked against
    (warm-up, benchmarks/gpu.py parity), and the fast path on a GPU is float16/bfloat16, which use tensor
    cores anyway. The `fp32_precision` switches are torch 2.9+'s (the `allow_tf32` flags warn there).
    Returns the settings in effect, for the log and the benchmark's header."""
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    # conv and rnn alike, so that the cuDNN flags agree (pytorch/pytorch#179445). Once these are set, torch
    # 2.13 raises on a read of the legacy `cudnn.allow_tf32` ("a mix of the legacy and new APIs"): nothing
    # in emoserve reads the legacy flags
    torch.backends.cudnn.conv.fp32_precision = "ieee"  # type: ignore[attr-defined]  # not in torch's stubs
    torch.backends.cudnn.rnn.fp32_precision = "ieee"  # type: ignore[attr-defined]
    settings = float32_math()
    log.info("CUDA float32 math: matmul %(matmul)s, convolution %(conv)s (TF32 off)", settings)
    return settings


def float32_math() -> dict[str, str]:
    return {
        "matmul": str(torch.backends.cuda.matmul.fp32_precision),
        "conv": str(torch.backends.cudnn.conv.fp32_precision),  # type: ignore[attr-defined]
    }


def pick_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        warn_if_cuda_unusable()
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device is {device!r}; use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        warn_if_cuda_unusable()
        raise ValueError(f"device is {device!r} but no CUDA GPU is available; use --device cpu")
    if (
        chosen.type == "cuda"
        and chosen.index is not None
        and chosen.index >= (count := torch.cuda.device_count())
    ):
        raise ValueError(
            f"device is {device!r} but this machine has {count} CUDA GPU{'s' if count != 1 else ''} "
            f"(cuda:0 to cuda:{count - 1}); use one of those"
        )
    return chosen


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in TORCH_DTYPES:
        choices = ", ".join(TORCH_DTYPES)
        raise ValueError(f"dtype {dtype!r} is not for the torch backend; choose from {choices}")
    if device.type == "cpu" and dtype == "float16":
        raise ValueError("dtype float16 is for GPUs; on the CPU use float32 (or bfloat16 where it is native)")
    if device.type == "cuda" and dtype == "bfloat16":
        capability = torch.cuda.get_device_capability(device)
        if tuple(capability) < BF16_MIN_CAPABILITY:
            raise ValueError(
                f"dtype bfloat16 needs a GPU of compute capability 8.0 or newer, and {device} is "
                f"{capability[0]}.{capability[1]}; use --dtype float16"
            )
    return TORCH_DTYPES[dtype]
