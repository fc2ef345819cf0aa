"""The network's interface, torch-free: what goes into the model (a zero-padded batch) and what comes out,
shared by the torch network, its ONNX export and both backends. The ONNX graph's input and output names are
`INPUTS` and `OUTPUTS`, in this order; `Emotion2vec.outputs()` returns its tensors in `OUTPUTS` order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from emoserve.constants import SAMPLE_RATE


class Outputs(NamedTuple):
    """A backend's answer for one padded batch, all numpy float32 but the lengths."""

    logits: np.ndarray  # (batch, labels)
    pooled: np.ndarray  # (batch, dim): utterance embeddings
    frame_logits: np.ndarray | None  # (batch, frames, labels), when frames were asked for
    frames: np.ndarray | None  # (batch, frames, dim), when frames were asked for
    frame_lengths: np.ndarray  # (batch,) real frames per item

    @classmethod
    def named(cls, got: dict[str, np.ndarray]) -> Outputs:
        """From a graph runtime's outputs by name (OUTPUTS, or UTTERANCE_OUTPUTS without the frames)."""
        return cls(
            got["logits"],
            got["pooled"],
            got.get("frame_logits"),
            got.get("frames"),
            got["frame_lengths"].astype(np.int64, copy=False),
        )


INPUTS = ("waves", "lengths")  # (batch, samples) float32 zero-padded, (batch,) int64
OUTPUTS = Outputs._fields  # logits, pooled, frame_logits, frames, frame_lengths
UTTERANCE_OUTPUTS = ("logits", "pooled", "frame_lengths")


def finite(out: Outputs, i: int) -> bool:
    """Whether every output of item `i` (its real frames only) is a finite number."""
    n = int(out.frame_lengths[i])
    parts = [out.logits[i], out.pooled[i]]
    parts += [a[i, :n] for a in (out.frame_logits, out.frames) if a is not None]
    return all(bool(np.isfinite(part).all()) for part in parts)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, computed in float64, returned as float32."""
    x = logits.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def pad(samples: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-padded (batch, samples) float32 array and the (batch,) int64 real lengths."""
    lengths = np.array([len(s) for s in samples], dtype=np.int64)
    waves = np.zeros((len(samples), int(lengths.max())), dtype=np.float32)
    for i, s in enumerate(samples):
        waves[i, : len(s)] = s
    return waves, lengths


# A runtime that keeps state per input shape (ONNX Runtime's kernels and plans; torch's CUDA caching
# allocator, whose blocks of a thousand different sizes fragment its pool) would grow with traffic of
# arbitrary lengths. So a batch is padded up to one of 32 widths per octave (at most 1/32 more samples,
# 1.6% on average); padding is masked, so the results are those of the unpadded batch.
WIDTHS_PER_OCTAVE_LOG2 = 5
MIN_WIDTH_STEP = 320  # one 20 ms frame at 16 kHz
# On CUDA every new width costs cuDNN execution plans for each convolution (CPU time and host memory that
# stay, pytorch/pytorch#104701) and new GEMM kernels: 32 widths per octave are ~380 shapes up to 120 s, more
# than a warm-up can run. 4 per octave are ~40 (`bucket_widths`), which the CUDA warm-up runs one by one
# (serving/warmup.py), so the first request of any length costs what the next does. The price is padding:
# at most 1/4 more samples, about 12% on average, which a GPU spends mostly on idle lanes at short widths.
CUDA_WIDTHS_PER_OCTAVE_LOG2 = 2


def bucket_width(samples: int, per_octave_log2: int = WIDTHS_PER_OCTAVE_LOG2) -> int:
    """The padded width of a batch whose longest clip has `samples`: >= samples, and below
    samples * (1 + 2**-per_octave_log2) (32 widths per octave by default: < samples * 33/32)."""
    step = max(MIN_WIDTH_STEP, 1 << max(0, samples.bit_length() - 1 - per_octave_log2))
    return -(-samples // step) * step


def bucket_widths(max_samples: int, per_octave_log2: int = WIDTHS_PER_OCTAVE_LOG2) -> list[int]:
    """Every width `bucket_width` gives for a batch of 1 to `max_samples` samples, ascending. Octave by
    octave, as `bucket_width` computes its step (the 320-sample floor makes the last width of a low octave,
    e.g. 2240 for 1921-2047, larger than the next octave's first, 2048)."""
    widths: set[int] = set()
    for bits in range(1, max_samples.bit_length() + 1):
        low, high = 1 << (bits - 1), min(max_samples, (1 << bits) - 1)
        step = max(MIN_WIDTH_STEP, 1 << max(0, bits - 1 - per_octave_log2))
        widths.update(range(-(-low // step) * step, -(-high // step) * step + 1, step))
    return sorted(widths)


def pad_to_bucket(waves: np.ndarray, per_octave_log2: int = WIDTHS_PER_OCTAVE_LOG2) -> np.ndarray:
    """`waves` (batch, samples) zero-padded to `bucket_width` (the lengths keep the real ones)."""
    width = bucket_width(waves.shape[1], per_octave_log2)
    return np.pad(waves, ((0, 0), (0, width - waves.shape[1]))) if width > waves.shape[1] else waves


def session_options(
    threads: int, *, optimise: bool = False, prepack: bool = False, arena: bool = False
) -> Any:
    """Options chosen by measurement (benchmarks/onnx_options.py, soak.py, docs/benchmarks.md):
    - prepacking off: packed copies of the MatMul weights would be private memory on top of the
      memory-mapped weights (which processes share through the page cache);
    - the CPU memory arena off: under concurrent load (batches of 8 clips) it kept ~1.4 GB more than
      the torch backend's peak for good; without it memory goes back after each batch;
    - the memory pattern off: with it, the first run of each input width plans that width's
      allocations (a 5 s clip after warm-up took 1.06-1.12x the next ones, docs/benchmarks.md section
      13) and keeps the plan for good; without it every width costs the same from its first run, and
      with the arena off the pattern saves nothing later;
    - one intra-op thread per physical core, and no inter-op parallelism (the graph is one chain)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.enable_mem_pattern = False
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise
    options.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        if optimise
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return options


def open_session(graph: Path, threads: int, *, optimise: bool = False, options: Any = None) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(
        str(graph), options or session_options(threads, optimise=optimise), providers=["CPUExecutionProvider"]
    )


def speech_like(rng: np.random.Generator, n: int) -> np.ndarray:
    """A voiced, syllable-paced test signal with a little noise (no real speech is needed: only the
    two paths' agreement on it)."""
    t = np.arange(n) / SAMPLE_RATE
    pitch = 2 * np.pi * np.cumsum(140 + 40 * np.sin(2 * np.pi * 0.7 * t)) / SAMPLE_RATE
    voiced = sum(np.sin(k * pitch) / k for k in range(1, 6)) * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t))
    return (0.2 * voiced + 0.01 * rng.standard_normal(n)).astype(np.float32)
