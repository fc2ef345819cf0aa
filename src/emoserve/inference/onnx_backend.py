"""The ONNX Runtime backend: the same network as an ONNX graph, on the CPU, without torch.

The graph was exported from our own model when the entry was converted (`model/export.py`), optimised
then for ONNX Runtime's CPU provider and checked against the torch path, so a session loads it with
graph optimisation off and its weights memory-mapped from the entry: import and session together take
a small fraction of a second, and nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from emoserve.model.interface import (
    OUTPUTS,
    UTTERANCE_OUTPUTS,
    Outputs,
    bucket_width,
    open_session,
    pad_to_bucket,
    session_options,
)


class OnnxBackend:
    """`interrupt()` (from another thread) stops the call in progress within a few milliseconds: ONNX
    Runtime checks its run's terminate flag between nodes; the call raises, the session stays usable."""

    name = "onnx"
    device = "cpu"

    def __init__(self, graph: Path, dtype: str, threads: int, **options: bool) -> None:
        """`options`: `prepack`, `arena` of `session_options`, for measuring them."""
        self.graph = graph
        self.dtype = dtype
        self.threads = threads
        self.session = open_session(graph, threads, options=session_options(threads, **options))
        self._running: ort.RunOptions | None = None  # the call in progress, for `interrupt`

    def padded_width(self, samples: int) -> int:
        return bucket_width(samples)

    def run(self, waves: np.ndarray, lengths: np.ndarray, frames: bool) -> Outputs:
        names = OUTPUTS if frames else UTTERANCE_OUTPUTS
        # ONNX Runtime keeps state per input shape (~10 KB each, docs/benchmarks.md section 6)
        waves = pad_to_bucket(waves)
        self._running = running = ort.RunOptions()
        try:
            outputs = self.session.run(list(names), {"waves": waves, "lengths": lengths}, running)
        finally:
            self._running = None
        return Outputs.named(dict(zip(names, outputs, strict=True)))

    def interrupt(self) -> bool:
        """Stop the model call in progress, if any (it raises); True: one was asked to stop."""
        running = self._running
        if running is None:
            return False
        running.terminate = True
        return True
