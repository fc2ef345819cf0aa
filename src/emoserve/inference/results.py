"""What recognition returns: a clip's `Result` (with its `FrameResult`s), a recording's `Timeline` of
`TimelineSegment`s and its time-weighted summary. Plain data, the one schema every surface renders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from emoserve.constants import Channels, Granularity, HeadTask

if TYPE_CHECKING:  # numpy is imported where the summary is computed: not on the server's start path
    import numpy as np

    from emoserve.audio.vad import Segment


@dataclass(frozen=True)
class FrameResult:
    start_s: float
    end_s: float
    emotion: str
    confidence: float
    scores: dict[str, float]


@dataclass(frozen=True)
class HeadResult:
    """A head of your own (`emoserve train-head`) on the utterance embedding, beside the nine: a classifier
    of your labels (label, confidence, scores) or a regression of your targets (`values`; label and
    confidence None, scores empty)."""

    name: str  # the head's name (its directory's, or the NAME of --head NAME=DIR)
    label: str | None  # None for a regression head
    confidence: float | None  # None for a regression head
    scores: dict[str, float]  # the head's label -> probability, in its label order; {} for regression
    label_zh: str | None = None
    emoji: str | None = None
    kind: HeadTask = "classification"
    values: dict[str, float] | None = None  # regression: target -> value, in the training data's units
    calibrated: bool = False  # a classifier head's scores are its calibration's (train-head --calibrate)


@dataclass(frozen=True)
class ModelTag:
    """What scored a result, as every result names it: the model, whether its weights are random (its
    readings then mean nothing), and the runtime and precision it ran on (`--backend`, `--dtype` as chosen,
    never "auto")."""

    model: str
    random_weights: bool
    backend: str  # "onnx" | "openvino" | "torch"
    dtype: str  # "float32" | "bfloat16" | "float16" | "int8"

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> ModelTag:
        """From what GET /v1/model answers (`Service.model_summary`)."""
        name, random_weights = str(summary["name"]), bool(summary["random_weights"])
        return cls(name, random_weights, str(summary["backend"]), str(summary["dtype"]))


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
    backend: str  # the runtime and precision that scored it (ModelTag)
    dtype: str
    frames: list[FrameResult] | None = None  # granularity "frame": one per 20 ms frame
    # utterance (dim,) or frame (frames, dim): upstream's `feats`
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)
    head: HeadResult | None = None  # asked for with a head: its labels on this clip
    calibrated: bool = False  # the scores are a calibration's (`--calibration`), not the model's softmax

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the embedding is left out: it is written as .npy by callers)."""
        out = asdict(self)
        out.pop("embedding")
        return out


# ------------------------------------------------------------------------------------------ summary


def summarise(segments: Sequence[TimelineSegment]) -> dict[str, Any]:
    """Over the speech: the time-weighted mean of the scores, the seconds each emotion was on top, the
    dominant emotion (most seconds on top); the same per speaker when segments carry speakers."""
    out = _summary(segments)
    speakers = sorted({s.speaker for s in segments if s.speaker is not None})
    if speakers:
        out["speakers"] = {sp: _summary([s for s in segments if s.speaker == sp]) for sp in speakers}
    return out


def _summary(segments: Sequence[TimelineSegment]) -> dict[str, Any]:
    speech = sum(s.duration_s for s in segments)
    if not segments or speech <= 0:
        return {"speech_s": 0.0, "segments": 0, "distribution": {}, "seconds": {}, "dominant": None}
    labels = list(segments[0].scores)
    import numpy as np

    weights = np.array([s.duration_s for s in segments])
    scores = np.array([[s.scores[label] for label in labels] for s in segments])
    distribution = weights @ scores / speech
    seconds = {label: 0.0 for label in labels}
    for s in segments:  # an `uncertain` segment (under min_confidence) counts as such
        seconds[s.emotion] = seconds.get(s.emotion, 0.0) + s.duration_s
    out: dict[str, Any] = {
        "speech_s": round(speech, 6),
        "segments": len(segments),
        "distribution": {label: round(float(p), 6) for label, p in zip(labels, distribution, strict=True)},
        "seconds": {label: round(v, 6) for label, v in seconds.items()},
        "dominant": max(seconds, key=lambda label: seconds[label]),
    }
    if all(s.head is not None for s in segments):
        out["head"] = _head_summary(segments, weights, speech)
    return out


def _head_summary(segments: Sequence[TimelineSegment], weights: np.ndarray, speech: float) -> dict[str, Any]:
    """The same figures for the head's labels: time-weighted distribution, seconds on top, dominant; for
    a regression head the time-weighted mean of each target."""
    heads = [s.head for s in segments if s.head is not None]
    if heads[0].values is not None:
        targets = list(heads[0].values)
        means = weights @ [[(h.values or {})[t] for t in targets] for h in heads] / speech
        return {
            "name": heads[0].name,
            "kind": "regression",
            "values": {t: round(float(v), 6) for t, v in zip(targets, means, strict=True)},
        }
    labels = list(heads[0].scores)
    distribution = weights @ [[h.scores[label] for label in labels] for h in heads] / speech
    seconds = {label: 0.0 for label in labels}
    for s, h in zip(segments, heads, strict=True):
        seconds[str(h.label)] = seconds.get(str(h.label), 0.0) + s.duration_s
    return {
        "name": heads[0].name,
        "kind": "classification",
        "distribution": {label: round(float(p), 6) for label, p in zip(labels, distribution, strict=True)},
        "seconds": {label: round(v, 6) for label, v in seconds.items()},
        "dominant": max(seconds, key=lambda label: seconds[label]),
    }


def scored(segment: Segment, result: Result) -> TimelineSegment:
    return TimelineSegment(
        start_s=round(segment.start_s, 6),
        end_s=round(segment.end_s, 6),
        speaker=segment.speaker,
        emotion=result.emotion,
        label_zh=result.label_zh,
        emoji=result.emoji,
        confidence=result.confidence,
        scores=result.scores,
        split=segment.split,
        head=result.head,
        calibrated=result.calibrated,
    )


@dataclass(frozen=True)
class TimelineSegment:
    start_s: float
    end_s: float
    speaker: str | None
    emotion: str
    label_zh: str
    emoji: str
    confidence: float
    scores: dict[str, float]
    split: bool  # a piece of speech longer than max_segment_s
    head: HeadResult | None = None  # asked for with a head: its labels on this segment
    calibrated: bool = False  # the scores are a calibration's (`--calibration`)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TimelineSegment:
        """Back from `to_dict` (a stored segment of a job)."""
        head = data.get("head")
        return cls(**{**data, "head": None if head is None else HeadResult(**head)})


@dataclass(frozen=True)
class Timeline:
    file: str
    duration_s: float
    speech_s: float
    model: str
    random_weights: bool
    backend: str  # the runtime and precision that scored it (ModelTag)
    dtype: str
    channels: Channels
    vad: dict[str, Any] | None  # the VAD settings; None when the caller gave the segments
    segments: list[TimelineSegment]
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Timeline:
        """Back from `to_dict` (a job's stored result)."""
        return cls(**{**data, "segments": [TimelineSegment.from_dict(s) for s in data["segments"]]})
