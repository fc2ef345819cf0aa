"""The Python API: a loaded model that turns audio into emotion results, one clip or a batch.

Torch-free: the network runs in a backend (`torch_backend.py`, or `onnx_backend.py` on ONNX Runtime),
which returns the same float32 outputs; everything from there to a `Result` (label mask, softmax, frames,
embeddings) is done here once for both.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from .audio import DEFAULT_MAX_SECONDS, SAMPLE_RATE, Audio, AudioInput, load_audio
from .constants import GRANULARITIES, Granularity
from .entry import Hub, ModelInfo, ensure_intact, read_entry, resolve
from .errors import EmoserveError
from .labels import Label

if TYPE_CHECKING:
    from .timeline import Timeline, TimelineSegment

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
DTYPES = ("float32", "float16", "bfloat16", "int8")  # half precision on GPUs (torch), int8 on CPUs (onnx)
# Padded batch cost bound for predict_many: 8 clips of 15 s. Attention memory grows with
# batch x tokens^2, so long clips are batched fewer at a time.
MAX_BATCH_SAMPLES = 8 * 15 * SAMPLE_RATE
# On a CPU a batch saves little beyond per-call overhead (~6% for 4 equal 5 s clips of large on
# 2 cores, benchmarks/batching.py), while padded samples cost real work, quadratically in attention:
# clips join a batch only while padding stays under this fraction of the real samples. With 0.25,
# 8 mixed 1-15 s clips ran 11% slower batched than one at a time.
MAX_PADDING = 0.05


@dataclass(frozen=True)
class FrameResult:
    start_s: float
    end_s: float
    emotion: str
    confidence: float
    scores: dict[str, float]


@dataclass(frozen=True)
class Result:
    emotion: str  # English key, e.g. "happy"
    label_zh: str
    emoji: str
    confidence: float
    scores: dict[str, float]  # English key -> probability, in model label order
    duration_s: float
    granularity: Granularity
    model: str
    random_weights: bool
    frames: list[FrameResult] | None = None  # granularity "frame": one per 20 ms frame
    # utterance (dim,) or frame (frames, dim): upstream's `feats`
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the embedding is left out: it is written as .npy by callers)."""
        out = asdict(self)
        out.pop("embedding")
        return out


class ModelOutputError(EmoserveError, RuntimeError):
    """The model gave non-finite numbers (NaN or inf): never passed on as a result."""

    code = "invalid_model_output"

    def __init__(self, sources: Sequence[str]) -> None:
        super().__init__(
            f"the model gave non-finite outputs (NaN/inf) for {', '.join(sources)}: its weights are damaged "
            "or the dtype overflowed; check the model with `emoserve verify`"
        )
        self.sources = list(sources)


class Outputs(NamedTuple):
    """A backend's answer for one padded batch, all numpy float32 but the lengths."""

    logits: np.ndarray  # (batch, labels)
    pooled: np.ndarray  # (batch, dim): utterance embeddings
    frame_logits: np.ndarray | None  # (batch, frames, labels), when frames were asked for
    frames: np.ndarray | None  # (batch, frames, dim), when frames were asked for
    frame_lengths: np.ndarray  # (batch,) real frames per item


class Backend(Protocol):
    """Runs the network on a zero-padded batch: waves (batch, samples) float32, lengths (batch,) int64."""

    @property
    def name(self) -> str: ...  # "torch" | "onnx"
    @property
    def device(self) -> str: ...  # "cpu", "cuda:0", ...
    @property
    def dtype(self) -> str: ...  # "float32", "float16", "bfloat16", "int8"

    def run(self, waves: np.ndarray, lengths: np.ndarray, frames: bool) -> Outputs: ...


class Recognizer:
    """One loaded model. Not thread-safe: share it between threads through an engine."""

    def __init__(self, backend: Backend, info: ModelInfo, *, max_seconds: float | None = DEFAULT_MAX_SECONDS):
        self.backend = backend
        self.info = info
        self.max_seconds = max_seconds
        self.labels: tuple[Label, ...] = tuple(label for label in info.labels if not label.masked)
        # labels named `unuse_*` get -inf logits: the same as a softmax over the others alone
        self._kept = np.array([i for i, label in enumerate(info.labels) if not label.masked])

    @property
    def device(self) -> str:
        return self.backend.device

    @property
    def device_type(self) -> str:
        return self.backend.device.partition(":")[0]

    @property
    def dtype(self) -> str:
        return self.backend.dtype

    @property
    def random_weights(self) -> bool:
        return self.info.random_weights

    def load(self, audio: AudioInput | Audio, sample_rate: int | None = None) -> Audio:
        if isinstance(audio, Audio):
            return audio
        return load_audio(audio, sample_rate, max_seconds=self.max_seconds)

    def predict(
        self,
        audio: AudioInput | Audio,
        granularity: Granularity = "utterance",
        embedding: bool = False,
        *,
        sample_rate: int | None = None,
    ) -> Result:
        return self.predict_batch([self.load(audio, sample_rate)], granularity, embedding)[0]

    def predict_many(
        self,
        audios: Sequence[AudioInput | Audio],
        granularity: Granularity = "utterance",
        embedding: bool = False,
        *,
        batch_size: int = 8,
        max_batch_samples: int = MAX_BATCH_SAMPLES,
        max_padding: float | None = MAX_PADDING,
    ) -> list[Result]:
        """Results in input order; clips are batched by similar length to limit padding."""
        clips = [self.load(a) for a in audios]
        results: list[Result | None] = [None] * len(clips)
        lengths = [len(c.samples) for c in clips]
        for batch in length_batches(lengths, batch_size, max_batch_samples, max_padding):
            for i, result in zip(
                batch, self.predict_batch([clips[i] for i in batch], granularity, embedding), strict=True
            ):
                results[i] = result
        return [r for r in results if r is not None]

    def timeline(self, source: Any, **options: Any) -> Timeline:
        """The emotion timeline of a recording of any length: its speech segments (silero-vad, or the
        caller's `spans`), each scored as `predict()` scores that slice, and a time-weighted summary.
        Options are `TimelineJob`'s: channels ("mix" | "separate"), vad (VadSettings), spans,
        max_seconds (None: no limit), name, progress (called with audio seconds done, total)."""
        from .timeline import TimelineJob, score_segments

        job = TimelineJob(source, **options)
        return job.timeline(score_segments(self, job), self.info.name, self.random_weights)

    def iter_timeline(self, source: Any, **options: Any) -> Iterator[TimelineSegment]:
        """`timeline()`'s segments, each yielded as soon as it is scored."""
        from .timeline import TimelineJob, score_segments

        yield from score_segments(self, TimelineJob(source, **options))

    def predict_batch(
        self, clips: Sequence[Audio], granularity: Granularity, embedding: bool
    ) -> list[Result]:
        """One padded forward pass over `clips`; each result equals the clip's one-at-a-time result."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity is {granularity!r}; choose 'utterance' or 'frame'")
        if not clips:
            return []
        waves, lengths = pad([c.samples for c in clips])
        out = self.backend.run(waves, lengths, frames=granularity == "frame")
        if bad := [clip.source for i, clip in enumerate(clips) if not finite(out, i)]:
            raise ModelOutputError(bad)
        scores = softmax(out.logits[:, self._kept])
        frame_scores = softmax(out.frame_logits[..., self._kept]) if out.frame_logits is not None else None
        results = []
        for i, clip in enumerate(clips):
            n = int(out.frame_lengths[i])
            emb = None
            if embedding:
                emb = out.frames[i, :n] if out.frames is not None else out.pooled[i]
            results.append(
                self._result(
                    clip,
                    granularity,
                    scores[i],
                    frame_scores[i, :n] if frame_scores is not None else None,
                    emb,
                )
            )
        return results

    def _result(
        self,
        clip: Audio,
        granularity: Granularity,
        scores: np.ndarray,
        frame_scores: np.ndarray | None,
        emb: np.ndarray | None,
    ) -> Result:
        best = int(scores.argmax())
        label = self.labels[best]
        return Result(
            emotion=label.en,
            label_zh=label.zh,
            emoji=label.emoji,
            confidence=float(scores[best]),
            scores=self._named(scores),
            duration_s=round(clip.duration_s, 6),
            granularity=granularity,
            model=self.info.name,
            random_weights=self.random_weights,
            frames=self._frames(frame_scores) if frame_scores is not None else None,
            embedding=np.ascontiguousarray(emb) if emb is not None else None,
        )

    def _named(self, scores: np.ndarray) -> dict[str, float]:
        return {label.en: float(p) for label, p in zip(self.labels, scores, strict=True)}

    def _frames(self, frame_scores: np.ndarray) -> list[FrameResult]:
        hop_s = self.info.config.frame_hop / SAMPLE_RATE
        out = []
        for i, row in enumerate(frame_scores):
            best = int(row.argmax())
            out.append(
                FrameResult(
                    round(i * hop_s, 6),
                    round((i + 1) * hop_s, 6),
                    self.labels[best].en,
                    float(row[best]),
                    self._named(row),
                )
            )
        return out


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


def length_batches(
    lengths: Sequence[int], batch_size: int, max_batch_samples: int, max_padding: float | None = MAX_PADDING
) -> list[list[int]]:
    """Indices grouped into batches of similar length: at most `batch_size` items, at most
    `max_batch_samples` padded samples once a batch holds more than one item, and padding at most
    `max_padding` x the real samples (None: no bound)."""
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; it must be at least 1")
    batches: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        current = batches[-1] if batches else None
        # sorted ascending, so lengths[i] is the longest so far: it sets the padded size
        padded = (len(current) + 1) * lengths[i] if current else 0
        if (
            current
            and len(current) < batch_size
            and padded <= max_batch_samples
            and (max_padding is None or padded <= (1 + max_padding) * (real + lengths[i]))
        ):
            current.append(i)
            real += lengths[i]
        else:
            batches.append([i])
            real = lengths[i]
    return batches


@functools.cache
def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads slow matrix work down, not up)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores: set[tuple[str, str]] = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            physical = ""
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    physical = value.strip()
                elif key.strip() == "core id":
                    cores.add((physical, value.strip()))
    except OSError:
        pass
    return max(1, min(logical, len(cores) or logical))


def load_model(
    model: str | os.PathLike[str] | None = None,
    *,
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "float32",
    hub: Hub = "auto",
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    threads: int | None = None,
    progress: bool = True,
) -> Recognizer:
    """Resolve `model` (directory or name; default emotion2vec_plus_large) and load it ready to use.

    `backend`: "onnx" (ONNX Runtime, CPU, no torch imported), "torch", or "auto": onnx on a CPU when
    onnxruntime is installed and the entry has its graph, else torch (always torch on a GPU).
    `dtype` "int8" (dynamically quantized matmuls) is onnx-only; float16/bfloat16 are torch on a GPU."""
    if backend not in BACKENDS:
        raise ValueError(f"backend is {backend!r}; choose from {', '.join(BACKENDS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype is {dtype!r}; choose from {', '.join(DTYPES)}")
    entry = ensure_intact(resolve(model, hub_name=hub, progress=progress))
    info = read_entry(entry)
    chosen = choose_backend(backend, device, dtype, info)
    runner: Backend
    if chosen == "onnx":
        from .onnx_backend import OnnxBackend

        runner = OnnxBackend(onnx_graph(info, dtype), dtype, threads or physical_cores())
    else:
        from .torch_backend import TorchBackend

        runner = TorchBackend.load(entry, device=device, dtype=dtype, threads=threads or physical_cores())
    log.info("%s runs on the %s backend (%s, %s)", info.name, runner.name, runner.device, runner.dtype)
    if info.random_weights:
        log.warning("%s has RANDOM weights: its predictions are meaningless", info.name)
    return Recognizer(runner, info, max_seconds=max_seconds)


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
        from .onnx_export import add_onnx

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


def gpu_present() -> bool:
    """Whether torch sees a GPU; torch is imported only when the machine has a GPU driver at all."""
    if not any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")):
        return False
    import torch

    return bool(torch.cuda.is_available())
