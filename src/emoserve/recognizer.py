"""The Python API: a loaded model that turns audio into emotion results, one clip or a batch."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from .audio import DEFAULT_MAX_SECONDS, SAMPLE_RATE, Audio, AudioInput, load_audio
from .labels import Label
from .model import Emotion2vec
from .weights import Hub, ModelInfo, load_entry, resolve

log = logging.getLogger(__name__)

Granularity = Literal["utterance", "frame"]
GRANULARITIES: tuple[Granularity, ...] = ("utterance", "frame")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
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


class Recognizer:
    """One loaded model. Not thread-safe: share it between threads through an engine."""

    def __init__(
        self, model: Emotion2vec, info: ModelInfo, *, max_seconds: float | None = DEFAULT_MAX_SECONDS
    ):
        self.model = model
        self.info = info
        self.max_seconds = max_seconds
        self.labels: tuple[Label, ...] = tuple(label for label in info.labels if not label.masked)
        mask = [not label.masked for label in info.labels]
        self._label_mask = torch.tensor(mask, device=self.device) if not all(mask) else None
        self._kept = torch.tensor([i for i, keep in enumerate(mask) if keep], device=self.device)

    @property
    def device(self) -> torch.device:
        return self.model.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.proj.weight.dtype

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

    def predict_batch(
        self, clips: Sequence[Audio], granularity: Granularity, embedding: bool
    ) -> list[Result]:
        """One padded forward pass over `clips`; each result equals the clip's one-at-a-time result."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity is {granularity!r}; choose 'utterance' or 'frame'")
        if not clips:
            return []
        waves, lengths = pad([c.samples for c in clips], self.device)
        with torch.inference_mode():
            features = self.model(waves, lengths)
            pooled = self.model.pool(features)
            scores = self.model.scores(pooled, self._label_mask)[:, self._kept].cpu().numpy()
            frame_scores = (
                self.model.scores(features.frames, self._label_mask)[..., self._kept].cpu().numpy()
                if granularity == "frame"
                else None
            )
            frames = features.frames.float().cpu().numpy() if embedding and granularity == "frame" else None
            pooled_np = pooled.float().cpu().numpy() if embedding else None
        results = []
        for i, clip in enumerate(clips):
            n = int(features.lengths[i])
            emb = None
            if embedding:
                emb = frames[i, :n] if frames is not None else pooled_np[i]  # type: ignore[index]
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
        hop_s = self.model.config.frame_hop / SAMPLE_RATE
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


def pad(samples: Sequence[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded (batch, samples) float32 tensor and the (batch,) real lengths."""
    lengths = torch.tensor([len(s) for s in samples])
    waves = torch.zeros(len(samples), int(lengths.max()))
    for i, s in enumerate(samples):
        waves[i, : len(s)] = torch.from_numpy(s)
    return waves.to(device), lengths.to(device)


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
    if dtype not in DTYPES:
        raise ValueError(f"dtype is {dtype!r}; choose from {', '.join(DTYPES)}")
    if device.type == "cpu" and dtype != "float32":
        raise ValueError(f"dtype {dtype} is for GPUs; on the CPU use float32")
    return DTYPES[dtype]


def load_model(
    model: str | os.PathLike[str] | None = None,
    *,
    device: str = "auto",
    dtype: str = "float32",
    hub: Hub = "auto",
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    threads: int | None = None,
    progress: bool = True,
) -> Recognizer:
    """Resolve `model` (directory or name; default emotion2vec_plus_large) and load it ready to use."""
    chosen = pick_device(device)
    torch_dtype = pick_dtype(dtype, chosen)
    if chosen.type == "cpu":
        torch.set_num_threads(threads or physical_cores())
    entry = resolve(model, hub_name=hub, progress=progress)
    net, info = load_entry(entry, chosen, torch_dtype)
    if info.random_weights:
        log.warning("%s has RANDOM weights: its predictions are meaningless", info.name)
    return Recognizer(net, info, max_seconds=max_seconds)
