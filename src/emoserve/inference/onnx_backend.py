"""The ONNX Runtime backend: the same network as an ONNX graph, on the CPU, without torch.

The graph was exported from our own model when the entry was converted (`model/export.py`), optimised
then for ONNX Runtime's CPU provider and checked against the torch path, so a session loads it with
graph optimisation off and its weights memory-mapped from the entry: import and session together take
a small fraction of a second, and nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emoserve.model.interface import OUTPUTS, UTTERANCE_OUTPUTS, Outputs, open_session, session_options

# ONNX Runtime keeps a memory plan for each input shape it has run, for the session's life (~10 KB
# each, docs/benchmarks.md section 6): traffic of arbitrary lengths would grow that without bound. So a
# batch is padded up to one of 32 widths per octave (at most 1/32 more samples, 1.6% on average).
WIDTHS_PER_OCTAVE_LOG2 = 5
MIN_WIDTH_STEP = 320  # one 20 ms frame at 16 kHz


def bucket_width(samples: int) -> int:
    """The padded width of a batch whose longest clip has `samples`: >= samples, < samples * 33/32."""
    step = max(MIN_WIDTH_STEP, 1 << max(0, samples.bit_length() - 1 - WIDTHS_PER_OCTAVE_LOG2))
    return -(-samples // step) * step


class OnnxBackend:
    name = "onnx"
    device = "cpu"

    def __init__(self, graph: Path, dtype: str, threads: int, **options: bool) -> None:
        """`options`: `prepack`, `arena` of `session_options`, for measuring them."""
        self.graph = graph
        self.dtype = dtype
        self.threads = threads
        self.session = open_session(graph, threads, options=session_options(threads, **options))

    def run(self, waves: np.ndarray, lengths: np.ndarray, frames: bool) -> Outputs:
        names = OUTPUTS if frames else UTTERANCE_OUTPUTS
        if (width := bucket_width(waves.shape[1])) > waves.shape[1]:  # `lengths` keep the real ones
            waves = np.pad(waves, ((0, 0), (0, width - waves.shape[1])))
        got = dict(
            zip(names, self.session.run(list(names), {"waves": waves, "lengths": lengths}), strict=True)
        )
        return Outputs(
            got["logits"], got["pooled"], got.get("frame_logits"), got.get("frames"), got["frame_lengths"]
        )
