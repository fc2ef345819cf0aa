"""Cutting a recording into the segments that are scored: a recording opened for streaming (`Recording`),
silero's segment rules applied frame by frame (`Segmenter`), the cut of long speech at its quietest point,
and segments supplied by the caller (`Span`, read from JSON or RTTM, cut out by `SpanCutter`).

Memory holds one decoded block, the open segment and the segments waiting for the model: it does not grow
with the length of the file.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from emoserve.audio.decode import LIBRARY_LIMIT_SETTING, Audio
from emoserve.audio.stream import AudioStream
from emoserve.audio.vad import DEFAULT_VAD, FRAME, RMS_HOP, RMS_SMOOTH, Segment, SileroVad, Vad, VadSettings
from emoserve.constants import MAX_SPANS_BYTES, MIN_SAMPLES, SAMPLE_RATE, Channels
from emoserve.errors import AudioError


class AudioWindow:
    """The samples of a stream from `start` on: appended as they arrive, dropped once nothing needs them
    (so a segmenter holds its open segment, not the recording)."""

    def __init__(self) -> None:
        self.samples = np.zeros(0, np.float32)
        self.start = 0

    @property
    def end(self) -> int:
        return self.start + len(self.samples)

    def append(self, samples: np.ndarray) -> None:
        self.samples = np.concatenate([self.samples, np.asarray(samples, np.float32)])

    def slice(self, start: int, end: int) -> np.ndarray:
        return self.samples[start - self.start : end - self.start]

    def drop_before(self, at: int) -> None:
        if at > self.start:
            self.samples = self.samples[at - self.start :]
            self.start = at


@dataclass
class _Region:
    """Speech being tracked. `start` is where its next segment starts (padded, or a cut); `raw_start` and
    `raw_end` are silero's bounds before padding."""

    start: int
    raw_start: int
    split: bool = False
    raw_end: int = 0


class Segmenter:
    """Speech regions of one channel from its samples and VAD probabilities, streamed.

    The rules are silero's `get_speech_timestamps_from_probs` (hysteresis, minimum speech and silence,
    padding that shares a short gap between neighbours), applied frame by frame as the audio arrives, so
    a recording fed in blocks gives the segments the whole file gives. Speech longer than `max_segment_s`
    is cut in the second half of its window at the quietest 50 ms, inside a pause silero heard when there
    is one; the pieces are marked `split`."""

    def __init__(
        self,
        settings: VadSettings = DEFAULT_VAD,
        speaker: str | None = None,
        on_start: Callable[[int], None] | None = None,
    ) -> None:
        """`on_start(sample)`: called when silero opens a region (its padded start), for live streams."""
        self.settings = settings
        self.speaker = speaker
        self.on_start = on_start
        per_ms = SAMPLE_RATE / 1000
        self._min_speech = settings.min_speech_ms * per_ms
        self._min_silence = settings.min_silence_ms * per_ms
        self._pad = int(settings.pad_ms * per_ms)
        self._max = int(settings.max_segment_s * SAMPLE_RATE)
        self._frames = 0  # frames seen
        self._audio = AudioWindow()
        self._probs = np.zeros(0, np.float32)  # the probabilities of the frames from _probs_at on
        self._probs_at = 0
        self._open: _Region | None = None  # silero is in speech
        self._closed: _Region | None = None  # silero ended it; its padded end waits for what follows
        self._temp_end = 0
        self._floor = 0  # no segment starts before this sample (the last flush)

    @property
    def samples_seen(self) -> int:
        return self._audio.end

    @property
    def open_start(self) -> int | None:
        """Where the open region's next segment starts (after a cut: the cut), None outside speech."""
        return None if self._open is None else self._open.start

    def audio(self, start: int, end: int) -> np.ndarray:
        """Samples [start, end) of what is held: from `open_start` on, while a region is open."""
        return self._audio.slice(start, end).copy()

    def push(self, samples: np.ndarray, probs: np.ndarray) -> list[Segment]:
        """Add samples and the probabilities of the frames they completed; the segments now finished."""
        self._audio.append(samples)
        self._probs = np.concatenate([self._probs, np.asarray(probs, np.float32)])
        out = [segment for p in probs for segment in self._frame(float(p))]
        self._trim()
        return out

    def finish(self, last_probs: np.ndarray) -> list[Segment]:
        """The recording ended: the last (zero-padded) frame's probabilities, then what is still open."""
        self._probs = np.concatenate([self._probs, np.asarray(last_probs, np.float32)])
        out = [segment for p in last_probs for segment in self._frame(float(p))]
        return out + self.flush()

    def flush(self) -> list[Segment]:
        """Close what is open now (a live stream's `flush`, or the recording's end): the open region up to
        the audio received (unless shorter than min_speech_ms), or the closed one waiting for its padded
        end. Speech that goes on opens a new region, which starts no earlier than here."""
        total = self.samples_seen
        out: list[Segment] = []
        if self._open is not None and total - self._open.raw_start > self._min_speech:
            out = self._segment(self._open, total)
        elif self._closed is not None:
            out = self._segment(self._closed, min(total, self._closed.raw_end + self._pad))
        self._open = self._closed = None
        self._temp_end, self._floor = 0, total
        return out

    def _frame(self, p: float) -> list[Segment]:
        """silero's state machine for one frame (with no maximum length: long speech is cut below)."""
        threshold, cur = self.settings.threshold, self._frames * FRAME
        self._frames += 1
        out = []
        closed = self._closed
        if closed is not None and cur - closed.raw_end >= 2 * self._pad:
            out += self._segment(closed, closed.raw_end + self._pad)  # no start can come within 2 pads now
            self._closed = None
        if p >= threshold and self._temp_end:
            self._temp_end = 0
        if self._open is None:
            if p >= threshold:
                out += self._start(cur)
            return out
        if p < self.settings.neg_threshold:
            if not self._temp_end:
                self._temp_end = cur
            if cur - self._temp_end >= self._min_silence:
                region, self._open = self._open, None
                region.raw_end, self._temp_end = self._temp_end, 0
                if region.raw_end - region.raw_start > self._min_speech:
                    self._closed = region
                return out
        if self._open is not None and cur + FRAME + self._pad - self._open.start > self._max:
            out += self._cut(self._open, cur + FRAME)
        return out

    def _start(self, raw_start: int) -> list[Segment]:
        """A start is padded by `pad`, or, when the gap to the speech before is under two pads, both
        sides take half of it."""
        start, out = max(self._floor, raw_start - self._pad), []
        closed, self._closed = self._closed, None
        if closed is not None:
            gap = raw_start - closed.raw_end
            if gap < 2 * self._pad:
                start = max(self._floor, raw_start - gap // 2)
                out = self._segment(closed, closed.raw_end + gap // 2)
            else:
                out = self._segment(closed, closed.raw_end + self._pad)
        self._open = _Region(start=start, raw_start=raw_start)
        if self.on_start is not None:
            self.on_start(start)
        return out

    def _cut(self, region: _Region, reached: int) -> list[Segment]:
        """Cut the open region between half and all of max_segment_s, at its quietest point."""
        lo, hi = region.start + self._max // 2, min(reached, region.start + self._max)
        at = quietest(self._slice(lo, hi), self._frame_probs(lo, hi), lo, self.settings.threshold)
        out = self._segment(region, at, split=True)
        region.start, region.split = at, True
        return out

    def _segment(self, region: _Region, end: int, split: bool = False) -> list[Segment]:
        if region.split and end - region.start < max(self._min_speech, MIN_SAMPLES):
            return []  # the tail after a cut that landed in the closing pause: nothing left to score
        samples = self._slice(region.start, end).copy()
        return [Segment(region.start, end, samples, split or region.split, self.speaker)]

    def _slice(self, start: int, end: int) -> np.ndarray:
        return self._audio.slice(start, end)

    def _frame_probs(self, start: int, end: int) -> np.ndarray:
        """The probability of the frame each 10 ms hop of [start, end) lies in."""
        hops = np.arange(start, end - RMS_HOP + 1, RMS_HOP) + RMS_HOP // 2
        frames = np.minimum(hops // FRAME - self._probs_at, len(self._probs) - 1)
        return self._probs[frames]

    def _trim(self) -> None:
        """Drop the audio no segment can need: before the open or closed region, and more than a pad
        back from the next frame (where the earliest possible next start is)."""
        keep = self._frames * FRAME - self._pad
        for region in (self._open, self._closed):
            if region is not None:
                keep = min(keep, region.start)
        keep = max(keep, self._audio.start)
        self._audio.drop_before(keep)
        keep_frame = keep // FRAME
        self._probs = self._probs[keep_frame - self._probs_at :]
        self._probs_at = keep_frame


def quietest(samples: np.ndarray, probs: np.ndarray | None, offset: int, threshold: float) -> int:
    """Where to cut `samples` (which start at `offset`): the middle of the 10 ms hop whose 50 ms
    smoothed RMS is lowest, among the hops silero called non-speech when there are any."""
    hops = len(samples) // RMS_HOP
    if hops < 1:
        return offset + len(samples)
    energy = np.square(samples[: hops * RMS_HOP].astype(np.float64)).reshape(hops, RMS_HOP).mean(axis=1)
    kernel = np.ones(RMS_SMOOTH) / RMS_SMOOTH
    rms = np.sqrt(np.convolve(energy, kernel, mode="same"))
    if probs is not None and len(probs) == hops and (probs < threshold).any():
        rms = np.where(probs < threshold, rms, np.inf)
    return offset + int(rms.argmin()) * RMS_HOP + RMS_HOP // 2


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


def read_spans(text: str, source: str = "<segments>") -> list[Span]:
    """Segments from JSON (a list of {start_s, end_s[, speaker]}, or {"segments": [...]}) or RTTM."""
    stripped = text.strip()
    read = _json_spans if stripped.startswith(("[", "{")) else _rttm_spans
    spans = read(stripped, source)
    _check_spans(spans, source)
    return spans


def _bad_spans(source: str, why: str) -> AudioError:
    return AudioError(
        f"{source}: {why}. Give a JSON list of {{start_s, end_s[, speaker]}} or RTTM lines",
        source=source,
        reason="bad_argument",
    )


def _json_spans(text: str, source: str) -> list[Span]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise _bad_spans(source, f"not valid JSON ({error})") from None
    items = data.get("segments") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise _bad_spans(source, "no list of segments")
    spans = []
    for n, item in enumerate(items):
        try:
            speaker = item.get("speaker")
            speaker = None if speaker is None else str(speaker)
            spans.append(Span(float(item["start_s"]), float(item["end_s"]), speaker))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise _bad_spans(source, f"segment {n} is {item!r}, not {{start_s, end_s[, speaker]}}") from None
    return spans


def _rttm_spans(text: str, source: str) -> list[Span]:
    """RTTM's SPEAKER lines: onset (field 4) and duration (field 5) in seconds, the speaker in field 8."""
    spans = []
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if fields[0] != "SPEAKER" or len(fields) < 8:
            raise _bad_spans(source, f"line {n} is not an RTTM SPEAKER line")
        try:
            onset, duration = float(fields[3]), float(fields[4])
        except ValueError:
            raise _bad_spans(source, f"line {n}: onset and duration must be numbers") from None
        spans.append(Span(onset, onset + duration, fields[7]))
    return spans


def _check_spans(spans: list[Span], source: str) -> None:
    shortest_s = MIN_SAMPLES / SAMPLE_RATE
    for n, span in enumerate(spans):
        if not (math.isfinite(span.start_s) and math.isfinite(span.end_s)) or span.start_s < 0:
            raise _bad_spans(
                source, f"segment {n} starts at {span.start_s}: times must be finite and not negative"
            )
        if span.end_s - span.start_s < shortest_s:
            raise _bad_spans(
                source,
                f"segment {n} ({span.start_s:g}-{span.end_s:g} s) is shorter than {shortest_s:g} s, "
                "the model's shortest input",
            )


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


_NO_PROBS = np.zeros(0, np.float32)
Progress = Callable[[float, float | None], None]  # (audio seconds done, total if known)


# ------------------------------------------------------------------------------------------ the job


class Recording:
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
        limit_setting: str = LIBRARY_LIMIT_SETTING,
        sample_rate: int | None = None,
        plan: Sequence[Cut] | None = None,
    ) -> None:
        """`plan`: the cuts an earlier pass found (`Cut.of` each segment), cut again from the audio
        without the VAD: a resumed job's segments, equal to the first run's."""
        if spans is not None and channels != "mix":
            raise AudioError(
                "caller-supplied segments apply to the mixed-down audio; use channels=mix with them",
                source="<args>",
                reason="bad_argument",
            )
        self.vad, self.spans, self.channels, self.plan = vad, spans, channels, plan
        self._vad_factory, self._progress = vad_factory, progress
        self.stream = AudioStream(
            source, channels=channels, max_seconds=max_seconds, name=name, limit_setting=limit_setting,
            sample_rate=sample_rate,
        )  # fmt: skip
        self.file = self.stream.display
        self.samples = 0  # per channel, at 16 kHz, decoded so far

    @property
    def duration_s(self) -> float:
        return self.samples / SAMPLE_RATE

    def segments(self) -> Generator[Segment, None, None]:
        if self.plan is not None:
            yield from self._planned(self.plan)
            return
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

    def _planned(self, plan: Sequence[Cut]) -> Generator[Segment, None, None]:
        """The plan's cuts in its order, each cut out of its channel once the audio reaches its end; a
        channel's audio is held from its next cut's start on, so memory stays one segment and a block."""
        todo = deque(plan)
        with self.stream:
            windows = [AudioWindow() for _ in range(self.stream.out_channels)]
            for block in self.stream.blocks():
                for i, window in enumerate(windows):
                    window.append(block[:, i])
                self.samples += len(block)
                while todo and todo[0].end <= self.samples:
                    yield self._cut(windows, todo.popleft())
                for i, window in enumerate(windows):  # never past what arrived: the window is contiguous
                    starts = (c.start for c in todo if self._channel(c) == i)
                    window.drop_before(min([self.samples, *starts]))
            while todo:  # a plan that reaches past the audio: never one made from this file
                yield self._cut(windows, todo.popleft())

    def _channel(self, cut: Cut) -> int:
        return int(cut.speaker[2:]) if self.channels == "separate" and cut.speaker else 0

    def _cut(self, windows: list[AudioWindow], cut: Cut) -> Segment:
        samples = windows[self._channel(cut)].slice(cut.start, cut.end).copy()
        return Segment(cut.start, cut.end, samples, cut.split, cut.speaker)

    def clip(self, segment: Segment) -> Audio:
        """A segment as the model's input: what `predict()` gets for that slice of the audio."""
        return clip_audio(segment.samples, f"{self.file}@{segment.start_s:.2f}s")


def clip_audio(samples: np.ndarray, source: str) -> Audio:
    """16 kHz mono samples cut from a longer stream, as the model's input."""
    return Audio(
        samples=samples,
        source=source,
        original_sample_rate=SAMPLE_RATE,
        original_channels=1,
        decoder="array",
        container=None,
        resampled=False,
    )


@dataclass(frozen=True)
class Cut:
    """Where a segment lies, without its samples: what a job's plan stores, so that a resumed job scores
    the very segments its first run found (`Recording(plan=...)`)."""

    start: int  # samples at 16 kHz from the start of the recording
    end: int
    split: bool = False
    speaker: str | None = None

    @classmethod
    def of(cls, segment: Segment) -> Cut:
        return cls(segment.start, segment.end, segment.split, segment.speaker)


@dataclass(frozen=True)
class Span:
    """A caller-supplied segment (from diarization, a transcript, ...): seconds from the start."""

    start_s: float
    end_s: float
    speaker: str | None = None
