"""Live streams scored: the builders of the stream protocol's messages (their types: inference/protocol.py),
and the library's session.

    LiveCutter events (audio/live.py) -> scored -> messages: ready, speech_start, interim, segment,
    summary, error; each with `type` and `seq` (0, 1, 2, ... per stream), times in seconds of stream audio

The builders here are the one place messages are made: the server's stream (serving/live.py, scored
through the engine), the WebSocket route and `Recognizer.stream` (scored in the caller's thread) use them.
A `segment` has the fields of a timeline segment (`TimelineSegment.to_dict`), the `summary` those of a
timeline's summary line (`formats.summary_record`).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from emoserve.audio.live import NO_PROBS, InterimWindow, LiveEvent, SpeechStart, TurnPiece
from emoserve.audio.segments import clip_audio
from emoserve.audio.vad import Segment
from emoserve.constants import MIN_SAMPLES, SAMPLE_RATE
from emoserve.inference.formats import summary_record
from emoserve.inference.protocol import (
    ErrorMessage,
    InterimMessage,
    ReadyMessage,
    SegmentMessage,
    SpeechStartMessage,
    StreamMessage,
    StreamOptions,
    SummaryMessage,
    TurnId,
)
from emoserve.inference.results import ModelTag, Result, TimelineSegment, scored

if TYPE_CHECKING:
    from emoserve.audio.decode import Audio

STREAM_NAME = "<stream>"  # the `file` of a stream's summary


@dataclass
class StreamMessages:
    """A stream's outgoing messages, built: numbered, and the running state they report (interims skipped,
    the scored segments for the summary)."""

    options: StreamOptions
    tag: ModelTag
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    skipped: int = 0
    segments: list[TimelineSegment] = field(default_factory=list)
    _seq: int = 0

    def _seq_next(self) -> int:
        self._seq += 1
        return self._seq - 1

    def ready(self, labels: Sequence[dict[str, str]]) -> ReadyMessage:
        return ReadyMessage(
            type="ready",
            seq=self._seq_next(),
            session_id=self.session_id,
            model=self.tag.model,
            random_weights=self.tag.random_weights,
            backend=self.tag.backend,
            dtype=self.tag.dtype,
            labels=list(labels),
            parameters=self.options.to_dict(),
        )

    def speech_start(self, event: SpeechStart) -> SpeechStartMessage:
        return SpeechStartMessage(
            type="speech_start", seq=self._seq_next(), start_s=round(event.start / SAMPLE_RATE, 6)
        )

    def interim(self, window: InterimWindow, result: Result) -> InterimMessage:
        message = InterimMessage(
            type="interim",
            seq=self._seq_next(),
            start_s=round(window.start / SAMPLE_RATE, 6),
            end_s=round(window.end / SAMPLE_RATE, 6),
            emotion=result.emotion,
            label_zh=result.label_zh,
            emoji=result.emoji,
            confidence=result.confidence,
            scores=result.scores,
            skipped=self.skipped,
        )
        if result.head is not None:
            message["head"] = asdict(result.head)
        return message

    def segment(
        self, segment: Segment, result: Result, turn_id: TurnId | None = None, pieces: int = 0
    ) -> SegmentMessage:
        """`pieces`: the turn was read in that many pieces (chunk_s), its reading pools them."""
        timed = scored(segment, result)
        self.segments.append(timed)
        message: SegmentMessage = {"type": "segment", "seq": self._seq_next(), **timed.to_dict()}  # type: ignore[typeddict-item]
        message["skipped"] = self.skipped
        if result.frames is not None:
            message["frames"] = [asdict(frame) for frame in result.frames]
        if self.options.embedding and result.embedding is not None:
            message["embedding"] = result.embedding.tolist()
        if turn_id is not None:
            message["turn_id"] = turn_id
        if pieces:
            message["pieces"] = pieces
        return message

    def summary(self, duration_s: float) -> SummaryMessage:
        from emoserve.inference.timeline import timeline_of

        vad = self.options.vad.to_dict() if self.options.use_vad else None
        timeline = timeline_of(STREAM_NAME, duration_s, "mix", vad, self.segments, self.tag)
        record = summary_record(timeline)
        return {**record, "type": "summary", "seq": self._seq_next()}  # type: ignore[typeddict-item]

    def error(self, code: str, message: str, fatal: bool, turn_id: TurnId | None = None) -> ErrorMessage:
        error = ErrorMessage(type="error", seq=self._seq_next(), code=code, message=message, fatal=fatal)
        if turn_id is not None:
            error["turn_id"] = turn_id
        return error

    def nothing_to_flush(self, turn_id: TurnId | None) -> ErrorMessage:
        """The answer to a `flush` that closed no segment."""
        what = "no utterance is open" if self.options.use_vad else "no audio since the last flush"
        return self.error(
            "invalid_message",
            f"flush: nothing to score ({what}, or less than the model's shortest input); send audio first",
            fatal=False,
            turn_id=turn_id,
        )


class LiveSession:
    """The library's live stream: `feed(pcm)` and `end()` return the stream's messages, each scored in the
    caller's thread by `score(audio, interim)` (a Recognizer's predict). Nothing is skipped here: the
    caller decides the pace. `Recognizer.stream(...)` makes one."""

    def __init__(
        self,
        score: Callable[[Audio, bool], Result],
        options: StreamOptions,
        *,
        tag: ModelTag,
        labels: Sequence[dict[str, str]],
        pieces: tuple[Callable[[Audio], Result], Callable[[np.ndarray, float], Result], int] | None = None,
    ) -> None:
        """`pieces` (for chunk_s): a piece's frame features, a pooled embedding's reading, the model's
        samples per frame."""
        self.options = options
        self.cutter = options.cutter()
        self.messages = StreamMessages(options, tag)
        self._score = score
        self._pieces = pieces
        self._turn: TurnPool | None = None
        self.first = self.messages.ready(labels)

    def feed(self, data: Any) -> list[StreamMessage]:
        return self._scored(self.cutter.feed(data))

    def end(self) -> list[StreamMessage]:
        out = self._scored(self.cutter.end())
        return [*out, self.messages.summary(self.cutter.duration_s)]

    def flush(self, turn_id: TurnId | None = None) -> list[StreamMessage]:
        """Close the open utterance (the turn, with vad=off) now: its segment, carrying `turn_id`; an
        `invalid_message` error with it when there was nothing to score. The stream goes on."""
        events = self.cutter.flush()
        if not any(isinstance(event, Segment) for event in events):
            return [*self._scored(events), self.messages.nothing_to_flush(turn_id)]
        return self._scored(events, turn_id)

    def _scored(self, events: list[LiveEvent], turn_id: TurnId | None = None) -> list[StreamMessage]:
        out: list[StreamMessage] = []
        for at, event in enumerate(events):
            if isinstance(event, SpeechStart):
                out.append(self.messages.speech_start(event))
            elif isinstance(event, InterimWindow):
                out.append(self.messages.interim(event, self._score(window_audio(event), True)))
            elif isinstance(event, TurnPiece):
                assert self._pieces is not None, "chunk_s needs a scorer of pieces"
                frames, _, hop = self._pieces
                self._turn = self._turn or TurnPool(hop)
                embedding = frames(piece_audio(event)).embedding
                assert embedding is not None
                self._turn.add(event, embedding)
                if not ends_its_turn(events, at):
                    reading = InterimWindow(event.turn_start, event.end, NO_PROBS)
                    out.append(self.messages.interim(reading, self._pooled()))
            else:
                last = event is events[-1]  # a flush's segment is its last event
                turn, pieces = self._turn, self._turn.pieces if self._turn else 0
                result = self._pooled() if turn else self._score(segment_audio(event), False)
                self._turn = None
                out.append(self.messages.segment(event, result, turn_id if last else None, pieces))
        return out

    def _pooled(self) -> Result:
        assert self._turn is not None and self._pieces is not None
        return self._pieces[1](self._turn.pooled(), self._turn.duration_s)


def segment_audio(segment: Segment) -> Audio:
    """A segment as the model's input: what /v1/timeline scores for it (`Recording.clip`)."""
    return clip_audio(segment.samples, f"{STREAM_NAME}@{segment.start_s:.2f}s")


def window_audio(window: InterimWindow) -> Audio:
    return clip_audio(window.samples, f"{STREAM_NAME}@{window.start / SAMPLE_RATE:.2f}s (interim)")


def ends_its_turn(events: Sequence[LiveEvent], at: int) -> bool:
    """Whether the piece `events[at]` is its turn's last one (its segment comes next): the segment gives
    that reading, so no interim reading is due for it, and someone waits for it."""
    return at + 1 < len(events) and isinstance(events[at + 1], Segment)


def piece_audio(piece: TurnPiece) -> Audio:
    return clip_audio(piece.samples, f"{STREAM_NAME}@{piece.start / SAMPLE_RATE:.2f}s (piece)")


class TurnPool:
    """A turn read in pieces (`chunk_s`): the sum of its pieces' own frame features (each piece's frames
    from where its new audio starts, its window's context left out), and their count. Their mean is the
    turn's pooled embedding, scored as a clip's (`Recognizer.pooled_result`): the frames one pass over
    the whole turn would average, each computed with at least STREAM_CHUNK_CONTEXT_S of the turn before
    it instead of all of it. `frame_hop`: samples per frame (the model config's)."""

    def __init__(self, frame_hop: int) -> None:
        self.frame_hop = frame_hop
        self.total: np.ndarray | None = None
        self.frames = 0
        self.pieces = 0
        self.start = self.end = 0  # 16 kHz samples of the stream: the turn, as far as it is pooled

    def add(self, piece: TurnPiece, frames: np.ndarray) -> None:
        """`frames`: the piece window's frame features (T, D). A frame is the piece's when its centre is
        in the piece's own audio (frame k spans samples [k*hop, k*hop + MIN_SAMPLES)); at least one is."""
        first = min(max(0, math.ceil((piece.context - MIN_SAMPLES // 2) / self.frame_hop)), len(frames) - 1)
        own = frames[first:].sum(axis=0, dtype=np.float64)
        self.total = own if self.total is None else self.total + own
        self.frames += len(frames) - first
        self.pieces += 1
        self.start, self.end = piece.turn_start, piece.end

    @property
    def duration_s(self) -> float:
        """Of the turn as far as it is pooled."""
        return (self.end - self.start) / SAMPLE_RATE

    def pooled(self) -> np.ndarray:
        assert self.total is not None, "no piece pooled yet"
        return (self.total / self.frames).astype(np.float32)
