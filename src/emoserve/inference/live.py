"""Live streams scored: the messages of the stream protocol (docs/streaming.md), and the library's session.

    LiveCutter events (audio/live.py) -> scored -> messages: ready, speech_start, interim, segment,
    summary, error; each with `type` and `seq` (0, 1, 2, ... per stream), times in seconds of stream audio

The message builders here are the one home of their shapes: the server's stream (serving/live.py, scored
through the engine), the WebSocket route and `Recognizer.stream` (scored in the caller's thread) use them.
A `segment` has the fields of a timeline segment (`TimelineSegment.to_dict`), the `summary` those of a
timeline's summary line (`formats.summary_record`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from emoserve.audio.live import ENCODINGS, InterimWindow, LiveCutter, LiveEvent, SpeechStart
from emoserve.audio.segments import clip_audio
from emoserve.audio.vad import DEFAULT_VAD, VAD_PARAMETERS, Segment, VadSettings
from emoserve.constants import SAMPLE_RATE, STREAM_HOP_S, STREAM_WINDOW_S, Granularity
from emoserve.inference.formats import summary_record
from emoserve.inference.results import Result, Timeline, TimelineSegment, scored, summarise

if TYPE_CHECKING:
    from emoserve.audio.decode import Audio

STREAM_NAME = "<stream>"  # the `file` of a stream's summary


@dataclass(frozen=True)
class StreamOptions:
    """What a client chooses for its stream (the query parameters of GET /v1/stream)."""

    sample_rate: int = SAMPLE_RATE
    encoding: str = "pcm_s16le"
    channels: int = 1
    hop_s: float = STREAM_HOP_S
    window_s: float = STREAM_WINDOW_S
    vad: VadSettings = DEFAULT_VAD
    granularity: Granularity = "utterance"
    embedding: bool = False
    head: str | None = None

    def cutter(self) -> LiveCutter:
        return LiveCutter(
            sample_rate=self.sample_rate,
            encoding=self.encoding,
            channels=self.channels,
            vad=self.vad,
            hop_s=self.hop_s,
            window_s=self.window_s,
        )

    def seconds(self, n_bytes: int) -> float:
        """Seconds of audio in `n_bytes` of the stream's PCM."""
        return n_bytes / (ENCODINGS[self.encoding].itemsize * self.channels * self.sample_rate)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sample_rate": self.sample_rate,
            "encoding": self.encoding,
            "channels": self.channels,
            "hop_s": self.hop_s,
            "window_s": self.window_s,
            **{name: getattr(self.vad, field) for name, field in VAD_PARAMETERS.items()},
            "granularity": self.granularity,
            "embedding": self.embedding,
            "head": self.head,
        }


@dataclass
class Messages:
    """A stream's outgoing messages: numbered, and the running state they report (interims skipped, the
    scored segments for the summary)."""

    options: StreamOptions
    model: str
    random_weights: bool
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    skipped: int = 0
    segments: list[TimelineSegment] = field(default_factory=list)
    _seq: int = 0

    def _next(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        message = {"type": kind, "seq": self._seq, **body}
        self._seq += 1
        return message

    def ready(self, labels: Sequence[dict[str, str]]) -> dict[str, Any]:
        return self._next(
            "ready",
            {
                "session_id": self.session_id,
                "model": self.model,
                "random_weights": self.random_weights,
                "labels": list(labels),
                "parameters": self.options.to_dict(),
            },
        )

    def speech_start(self, event: SpeechStart) -> dict[str, Any]:
        return self._next("speech_start", {"start_s": round(event.start / SAMPLE_RATE, 6)})

    def interim(self, window: InterimWindow, result: Result) -> dict[str, Any]:
        body = {
            "start_s": round(window.start / SAMPLE_RATE, 6),
            "end_s": round(window.end / SAMPLE_RATE, 6),
            **_reading(result),
            "skipped": self.skipped,
        }
        return self._next("interim", body)

    def segment(self, segment: Segment, result: Result) -> dict[str, Any]:
        timed = scored(segment, result)
        self.segments.append(timed)
        body = timed.to_dict()
        if result.frames is not None:
            body["frames"] = [asdict(frame) for frame in result.frames]
        if self.options.embedding and result.embedding is not None:
            body["embedding"] = result.embedding.tolist()
        return self._next("segment", {**body, "skipped": self.skipped})

    def summary(self, duration_s: float) -> dict[str, Any]:
        segments = sorted(self.segments, key=lambda s: s.start_s)
        timeline = Timeline(
            file=STREAM_NAME,
            duration_s=round(duration_s, 6),
            speech_s=round(sum(s.duration_s for s in segments), 6),
            model=self.model,
            random_weights=self.random_weights,
            channels="mix",
            vad=self.options.vad.to_dict(),
            segments=segments,
            summary=summarise(segments),
        )
        record = summary_record(timeline)
        record.pop("type")
        return self._next("summary", record)

    def error(self, code: str, message: str, fatal: bool) -> dict[str, Any]:
        return self._next("error", {"code": code, "message": message, "fatal": fatal})


def _reading(result: Result) -> dict[str, Any]:
    body = {
        "emotion": result.emotion,
        "label_zh": result.label_zh,
        "emoji": result.emoji,
        "confidence": result.confidence,
        "scores": result.scores,
    }
    if result.head is not None:
        body["head"] = asdict(result.head)
    return body


class LiveSession:
    """The library's live stream: `feed(pcm)` and `end()` return the stream's messages, each scored in the
    caller's thread by `score(audio, interim)` (a Recognizer's predict). Nothing is skipped here: the
    caller decides the pace. `Recognizer.stream(...)` makes one."""

    def __init__(
        self,
        score: Callable[[Audio, bool], Result],
        options: StreamOptions,
        *,
        model: str,
        random_weights: bool,
        labels: Sequence[dict[str, str]],
    ) -> None:
        self.options = options
        self.cutter = options.cutter()
        self.messages = Messages(options, model, random_weights)
        self._score = score
        self.first = self.messages.ready(labels)

    def feed(self, data: Any) -> list[dict[str, Any]]:
        return self._scored(self.cutter.feed(data))

    def end(self) -> list[dict[str, Any]]:
        out = self._scored(self.cutter.end())
        return [*out, self.messages.summary(self.cutter.duration_s)]

    def _scored(self, events: list[LiveEvent]) -> list[dict[str, Any]]:
        out = []
        for event in events:
            if isinstance(event, SpeechStart):
                out.append(self.messages.speech_start(event))
            elif isinstance(event, InterimWindow):
                out.append(self.messages.interim(event, self._score(window_audio(event), True)))
            else:
                out.append(self.messages.segment(event, self._score(segment_audio(event), False)))
        return out


def segment_audio(segment: Segment) -> Audio:
    """A segment as the model's input: what /v1/timeline scores for it (`Recording.clip`)."""
    return clip_audio(segment.samples, f"{STREAM_NAME}@{segment.start_s:.2f}s")


def window_audio(window: InterimWindow) -> Audio:
    return clip_audio(window.samples, f"{STREAM_NAME}@{window.start / SAMPLE_RATE:.2f}s (interim)")
