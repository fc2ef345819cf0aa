"""The PyTorch backend: the network of `model/network.py` with weights memory-mapped from a cache entry.

Runs on CPUs and GPUs (float16/bfloat16 on GPUs only); on a CPU the onnx backend is usually faster.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from emoserve.model.convert import load_entry
from emoserve.model.interface import Outputs
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
    if device.type == "cpu" and dtype != "float32":
        raise ValueError(f"dtype {dtype} is for GPUs; on the CPU use float32")
    return TORCH_DTYPES[dtype]
