"""Long recordings: an emotion timeline (calls, meetings, podcasts).

    TimelineJob(source) -> AudioStream blocks -> per channel: SileroVad + Segmenter (or the caller's
    segments) -> Segment ... -> scored a few at a time (`score_segments` with predict_many here, the
    engine in the server) -> TimelineSegment ... -> Timeline (segments + time-weighted summary)

emotion2vec gives one label per input and was trained on utterances of a few seconds, so a recording is
scored as its speech segments, each exactly as `predict()` scores that slice of the 16 kHz audio. Memory
holds one decoded block, the open segment and the segments waiting for the model: it does not grow with
the length of the file.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from .audio import MIN_SAMPLES, Audio, AudioError
from .constants import SAMPLE_RATE
from .stream import AudioStream, Channels
from .vad import DEFAULT_VAD, AudioWindow, Segment, Segmenter, SileroVad, Vad, VadSettings, quietest

if TYPE_CHECKING:
    from .recognizer import Recognizer, Result

Progress = Callable[[float, float | None], None]  # (audio seconds done, total if known)
# Segments scored together by the library (predict_many groups them by length); in the server each goes
# to the engine, and at most this many of one recording wait there, so one long file cannot fill its queue.
SEGMENTS_IN_FLIGHT = 8


@dataclass(frozen=True)
class Span:
    """A caller-supplied segment (from diarization, a transcript, ...): seconds from the start."""

    start_s: float
    end_s: float
    speaker: str | None = None


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

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Timeline:
    file: str
    duration_s: float
    speech_s: float
    model: str
    random_weights: bool
    channels: Channels
    vad: dict[str, Any] | None  # the VAD settings; None when the caller gave the segments
    segments: list[TimelineSegment]
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ the job


class TimelineJob:
    """One recording on its way to a timeline: open (errors about the file come here, before any work),
    then `segments()` streams its speech segments; `duration_s` is known once they are all out."""

    def __init__(
        self,
        source: str | os.PathLike[str] | bytes | Any,
        *,
        channels: Channels = "mix",
        vad: VadSettings = DEFAULT_VAD,
        spans: Sequence[Span] | None = None,
        max_seconds: float | None = None,
        name: str | None = None,
        vad_factory: Callable[[], Vad] = SileroVad,
        progress: Progress | None = None,
    ) -> None:
        if spans is not None and channels != "mix":
            raise AudioError(
                "caller-supplied segments apply to the mixed-down audio; use channels=mix with them",
                source="<args>",
                reason="bad_argument",
            )
        self.vad, self.spans, self.channels = vad, spans, channels
        self._vad_factory, self._progress = vad_factory, progress
        self.stream = AudioStream(source, channels=channels, max_seconds=max_seconds, name=name)
        self.file = self.stream.display
        self.samples = 0  # per channel, at 16 kHz, decoded so far

    @property
    def duration_s(self) -> float:
        return self.samples / SAMPLE_RATE

    def segments(self) -> Generator[Segment, None, None]:
        with self.stream:
            k = self.stream.out_channels
            if self.spans is not None:
                cutters: list[Segmenter | SpanCutter] = [SpanCutter(self.spans, self.vad.max_segment_s)]
                vads: list[Vad] = []
            else:
                speakers = [f"ch{i}" for i in range(k)] if self.channels == "separate" else [None]
                cutters = [Segmenter(self.vad, speaker) for speaker in speakers]
                vads = [self._vad_factory() for _ in speakers]
            for block in self.stream.blocks():
                for i, cutter in enumerate(cutters):
                    x = block[:, i]
                    yield from cutter.push(x, vads[i].probabilities(x) if vads else _NO_PROBS)
                self.samples += len(block)
                if self._progress is not None:
                    self._progress(self.duration_s, self.stream.info.duration_s)
            for i, cutter in enumerate(cutters):
                yield from cutter.finish(vads[i].flush() if vads else _NO_PROBS)

    def clip(self, segment: Segment) -> Audio:
        """A segment as the model's input: what `predict()` gets for that slice of the audio."""
        return Audio(
            samples=segment.samples,
            source=f"{self.file}@{segment.start_s:.2f}s",
            original_sample_rate=SAMPLE_RATE,
            original_channels=1,
            decoder="array",
            container=None,
            resampled=False,
        )

    def timeline(self, scored: Iterable[TimelineSegment], model: str, random_weights: bool) -> Timeline:
        segments = sorted(scored, key=lambda s: (s.start_s, s.speaker or ""))
        return Timeline(
            file=self.file,
            duration_s=round(self.duration_s, 6),
            speech_s=round(sum(s.duration_s for s in segments), 6),
            model=model,
            random_weights=random_weights,
            channels=self.channels,
            vad=None if self.spans is not None else self.vad.to_dict(),
            segments=segments,
            summary=summarise(segments),
        )


_NO_PROBS = np.zeros(0, np.float32)


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
    )


def score_segments(
    recognizer: Recognizer, job: TimelineJob, *, batch_size: int = SEGMENTS_IN_FLIGHT
) -> Iterator[TimelineSegment]:
    """The library's scoring: segments in groups of `batch_size` through `predict_many` (batched by
    length), yielded in the order they were found."""
    pending: list[Segment] = []
    for segment in job.segments():
        pending.append(segment)
        if len(pending) >= batch_size:
            yield from _score(recognizer, job, pending)
            pending = []
    yield from _score(recognizer, job, pending)


def _score(recognizer: Recognizer, job: TimelineJob, segments: list[Segment]) -> Iterator[TimelineSegment]:
    results = recognizer.predict_many([job.clip(s) for s in segments], batch_size=len(segments) or 1)
    for segment, result in zip(segments, results, strict=True):
        yield scored(segment, result)


class SegmentFeed:
    """`job.segments()` on a thread of its own (decoding and the VAD block the event loop otherwise),
    handed to a coroutine through at most `depth` waiting segments; `stop()` ends the thread at its next
    segment and closes the file, whatever it was doing."""

    _END = object()

    def __init__(self, job: TimelineJob, depth: int = SEGMENTS_IN_FLIGHT) -> None:
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue[Any] = asyncio.Queue()
        self._slots = threading.Semaphore(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(job,), name="emoserve-timeline", daemon=True)
        self._thread.start()

    async def get(self) -> Segment | None:
        """The next segment, None at the end; the job's error (a damaged file) is raised here."""
        item = await self._items.get()
        self._slots.release()
        if item is self._END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        self._stop.set()

    def _run(self, job: TimelineJob) -> None:
        segments = job.segments()
        try:
            for segment in segments:
                if not self._put(segment):
                    return
            self._put(self._END)
        except Exception as error:
            self._put(error)
        finally:
            segments.close()

    def _put(self, item: object) -> bool:
        while not self._slots.acquire(timeout=0.1):
            if self._stop.is_set():
                return False
        if self._stop.is_set():
            return False
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            return False
        return True


# -------------------------------------------------------------------------------- rows for a table

CSV_FIELDS = ["file", "start_s", "end_s", "speaker", "emotion", "label_zh", "emoji", "confidence", "split"]


def csv_fields(labels: Sequence[str]) -> list[str]:
    """timeline.csv's columns: a segment's fields, then a score column per label."""
    return [*CSV_FIELDS, *(f"score_{label}" for label in labels)]


def csv_row(file: str, segment: TimelineSegment) -> dict[str, Any]:
    row = {key: value for key, value in segment.to_dict().items() if key in CSV_FIELDS}
    row["file"] = file
    row.update({f"score_{label}": round(p, 6) for label, p in segment.scores.items()})
    return row


def table_line(file: str, segment: TimelineSegment, random_weights: bool) -> str:
    speaker = f"  [{segment.speaker}]" if segment.speaker else ""
    split = "  (split)" if segment.split else ""
    random = "  (RANDOM WEIGHTS)" if random_weights else ""
    head = f"{segment.emoji} {segment.emotion} ({segment.label_zh}) {segment.confidence:.3f}"
    return f"{file}  {segment.start_s:8.2f}-{segment.end_s:8.2f} s{speaker}  {head}{split}{random}"


def summary_line(timeline: Timeline) -> str:
    s = timeline.summary
    dominant = s["dominant"] or "none (no speech)"
    return (
        f"{timeline.file}  summary: {timeline.speech_s:.1f} s of speech in {s['segments']} segments "
        f"of {timeline.duration_s:.1f} s; dominant {dominant}"
    )


class TimelineWriter:
    """`predict --segments` output: jsonl (a `segment` line per segment with its file, then a `summary`
    line per file; an `error` line for a file that failed), csv (a row per segment) or a table."""

    def __init__(self, out: IO[str], fmt: str, labels: Sequence[str]) -> None:
        self.out, self.fmt = out, fmt
        if fmt == "csv":
            self.csv = csv.DictWriter(out, fieldnames=[*csv_fields(labels), "random_weights", "error"])
            self.csv.writeheader()

    def segment(self, file: str, segment: TimelineSegment, random_weights: bool) -> None:
        if self.fmt == "jsonl":
            line = {"type": "segment", "file": file, **segment.to_dict(), "random_weights": random_weights}
            self._line(json.dumps(line, ensure_ascii=False))
        elif self.fmt == "csv":
            self.csv.writerow({**csv_row(file, segment), "random_weights": random_weights})
        else:
            self._line(table_line(file, segment, random_weights))
        self.out.flush()

    def summary(self, timeline: Timeline) -> None:
        if self.fmt == "jsonl":
            body = timeline.to_dict()
            body.pop("segments")
            self._line(json.dumps({"type": "summary", **body}, ensure_ascii=False))
        elif self.fmt == "table":
            self._line(summary_line(timeline))
        self.out.flush()

    def error(self, file: str, message: str) -> None:
        if self.fmt == "jsonl":
            self._line(json.dumps({"type": "error", "file": file, "error": message}, ensure_ascii=False))
        elif self.fmt == "csv":
            self.csv.writerow({"file": file, "error": message})
        else:
            self._line(f"{file}  ERROR  {message}")
        self.out.flush()

    def _line(self, text: str) -> None:
        self.out.write(text + "\n")


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
    weights = np.array([s.duration_s for s in segments])
    scores = np.array([[s.scores[label] for label in labels] for s in segments])
    distribution = weights @ scores / speech
    seconds = {label: 0.0 for label in labels}
    for s in segments:
        seconds[s.emotion] += s.duration_s
    return {
        "speech_s": round(speech, 6),
        "segments": len(segments),
        "distribution": {label: round(float(p), 6) for label, p in zip(labels, distribution, strict=True)},
        "seconds": {label: round(v, 6) for label, v in seconds.items()},
        "dominant": max(seconds, key=lambda label: seconds[label]),
    }


# ------------------------------------------------------------------------------ caller's segments


class SpanCutter:
    """Cuts the caller's spans out of the stream as the audio arrives (they may overlap: speakers talk
    over each other); spans longer than `max_segment_s` are cut at their quietest points."""

    def __init__(self, spans: Sequence[Span], max_segment_s: float) -> None:
        self._todo = sorted(
            ((round(s.start_s * SAMPLE_RATE), round(s.end_s * SAMPLE_RATE), s.speaker) for s in spans),
            key=lambda t: (t[0], t[1]),
        )
        self._max = int(max_segment_s * SAMPLE_RATE)
        self._audio = AudioWindow()

    def push(self, samples: np.ndarray, probs: np.ndarray) -> list[Segment]:
        self._audio.append(samples)
        return self._take(self._audio.end)

    def finish(self, probs: np.ndarray) -> list[Segment]:
        end = self._audio.end
        self._todo = [(s, min(e, end), sp) for s, e, sp in self._todo if e > s and s < end]
        out = [seg for seg in self._take(end) if len(seg.samples) >= MIN_SAMPLES]
        self._todo = []
        return out

    def _take(self, available: int) -> list[Segment]:
        out = []
        for span in [t for t in self._todo if t[1] <= available]:
            self._todo.remove(span)
            out += self._pieces(*span)
        keep = min([s for s, _, _ in self._todo], default=available)
        self._audio.drop_before(keep)
        return out

    def _pieces(self, start: int, end: int, speaker: str | None) -> list[Segment]:
        pieces, split = [], end - start > self._max
        while end - start > self._max:
            lo = start + self._max // 2
            cut = quietest(self._slice(lo, start + self._max), None, lo, 0.0)
            pieces.append(Segment(start, cut, self._slice(start, cut).copy(), True, speaker))
            start = cut
        pieces.append(Segment(start, end, self._slice(start, end).copy(), split, speaker))
        return pieces

    def _slice(self, start: int, end: int) -> np.ndarray:
        return self._audio.slice(start, end)


MAX_SPANS_BYTES = 1 << 20  # a segments file (JSON or RTTM): ~20k RTTM lines


def read_spans(text: str, source: str = "<segments>") -> list[Span]:
    """Segments from JSON (a list of {start_s, end_s[, speaker]}, or {"segments": [...]}) or RTTM."""

    def bad(why: str) -> AudioError:
        return AudioError(
            f"{source}: {why}. Give a JSON list of {{start_s, end_s[, speaker]}} or RTTM lines",
            source=source,
            reason="bad_argument",
        )

    stripped = text.strip()
    spans: list[Span] = []
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as error:
            raise bad(f"not valid JSON ({error})") from None
        items = data.get("segments") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise bad("no list of segments")
        for n, item in enumerate(items):
            try:
                speaker = item.get("speaker")
                spans.append(
                    Span(
                        float(item["start_s"]),
                        float(item["end_s"]),
                        None if speaker is None else str(speaker),
                    )
                )
            except (KeyError, TypeError, ValueError, AttributeError):
                raise bad(f"segment {n} is {item!r}, not {{start_s, end_s[, speaker]}}") from None
    else:
        for n, line in enumerate(stripped.splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if fields[0] != "SPEAKER" or len(fields) < 8:
                raise bad(f"line {n} is not an RTTM SPEAKER line")
            try:
                onset, duration = float(fields[3]), float(fields[4])
            except ValueError:
                raise bad(f"line {n}: onset and duration must be numbers") from None
            spans.append(Span(onset, onset + duration, fields[7]))
    for n, span in enumerate(spans):
        if not (math.isfinite(span.start_s) and math.isfinite(span.end_s)) or span.start_s < 0:
            raise bad(f"segment {n} starts at {span.start_s}: times must be finite and not negative")
        if span.end_s - span.start_s < MIN_SAMPLES / SAMPLE_RATE:
            raise bad(
                f"segment {n} ({span.start_s:g}-{span.end_s:g} s) is shorter than "
                f"{MIN_SAMPLES / SAMPLE_RATE:g} s, the model's shortest input"
            )
    return spans


def read_spans_file(path: str | os.PathLike[str], name: str | None = None) -> list[Span]:
    """A segments file (JSON or RTTM, at most MAX_SPANS_BYTES), named `name` (default: its path) in errors."""
    name = name or str(path)

    def bad(why: str) -> AudioError:
        return AudioError(f"{name}: {why}", source=name, reason="bad_argument")

    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPANS_BYTES + 1)
        if len(data) > MAX_SPANS_BYTES:
            raise bad(f"over {MAX_SPANS_BYTES >> 20} MB; a segments file is JSON or RTTM text")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise bad(f"cannot read the segments ({error})") from None
    return read_spans(text, name)
