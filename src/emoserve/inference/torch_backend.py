"""The PyTorch backend: the network of `model/network.py` with weights memory-mapped from a cache entry.

Runs on CPUs and GPUs: float16 on GPUs, bfloat16 on GPUs and on CPUs with native bf16 (the weights cast
to bf16 at load; `inference/precision.py` checks the CPU); on a CPU openvino or onnx is usually faster.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from emoserve.model.convert import load_entry
from emoserve.model.interface import Outputs, pad_to_bucket
from emoserve.model.network import Emotion2vec

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchBackend:
    name = "torch"

    def __init__(self, model: Emotion2vec) -> None:
        self.model = model

    @classmethod
    def load(cls, entry: Path, *, device: str, dtype: str, threads: int) -> TorchBackend:
        chosen = pick_device(device)
        torch_dtype = pick_dtype(dtype, chosen)
        if chosen.type == "cpu":
            torch.set_num_threads(threads)
        else:
            use_expandable_segments()
        model, _ = load_entry(entry, chosen, torch_dtype)
        return cls(model)

    @property
    def device(self) -> str:
        return str(self.model.proj.weight.device)

    @property
    def dtype(self) -> str:
        return str(self.model.proj.weight.dtype).removeprefix("torch.")

    def run(self, waves: np.ndarray, lengths: np.ndarray, frames: bool) -> Outputs:
        device = self.model.proj.weight.device
        if device.type == "cuda":
            waves = pad_to_bucket(waves)  # the caching allocator's blocks: a few sizes, not one per length
        with torch.inference_mode():
            logits, pooled, frame_logits, frame_embeddings, frame_lengths = self.model.outputs(
                torch.from_numpy(waves).to(device), torch.from_numpy(lengths).to(device)
            )
            return Outputs(
                logits.cpu().numpy(),
                pooled.cpu().numpy(),
                frame_logits.cpu().numpy() if frames else None,
                frame_embeddings.cpu().numpy() if frames else None,
                frame_lengths.cpu().numpy(),
            )


def use_expandable_segments() -> None:
    """The CUDA caching allocator with expandable segments (unless PYTORCH_CUDA_ALLOC_CONF says
    otherwise): batches of many different sizes grow one segment instead of leaving reserved blocks that
    fit no later request. Effective only before the process's first CUDA allocation."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or torch.cuda.is_initialized():
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device is {device!r}; use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {device!r} but no CUDA GPU is available; use --device cpu")
    return chosen


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in TORCH_DTYPES:
        choices = ", ".join(TORCH_DTYPES)
        raise ValueError(f"dtype {dtype!r} is not for the torch backend; choose from {choices}")
    if device.type == "cpu" and dtype == "float16":
        raise ValueError("dtype float16 is for GPUs; on the CPU use float32 (or bfloat16 where it is native)")
    return TORCH_DTYPES[dtype]
