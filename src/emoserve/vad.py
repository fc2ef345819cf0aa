"""Voice activity detection for long recordings: silero-vad's ONNX sequence model, run block by block.

    16 kHz samples -> SileroVad (speech probability per 32 ms frame; LSTM state and context carried
    from block to block) -> Segmenter (silero's own rules for turning probabilities into speech regions,
    streamed; regions padded; speech longer than max_segment_s cut at its quietest point) -> Segment

Only the open segment is buffered, so memory does not grow with the recording. The model file ships in
the `silero-vad` wheel; it is located without importing the package, whose import loads torch and sets
torch's thread count for the whole process to 1.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .audio import MIN_SAMPLES
from .constants import SAMPLE_RATE

FRAME = 512  # samples per VAD frame at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous frame that silero prefixes to each frame
STATE_SHAPE = (1, 1, 128)
MAX_FRAMES_PER_CALL = 512  # ~16 s of audio per ONNX call: few Python round trips, small buffers
SEQUENCE_MODEL = "silero_vad_16k_sequence.onnx"
RMS_HOP = 160  # 10 ms: the resolution at which a long segment is cut
RMS_SMOOTH = 5  # hops averaged (50 ms) so that a cut lands in a pause, not between two pitch periods


@dataclass(frozen=True)
class VadSettings:
    """silero-vad's parameters (its defaults for long-form audio) and our cut of long speech."""

    threshold: float = 0.5
    min_speech_ms: float = 250.0
    min_silence_ms: float = 300.0
    pad_ms: float = 100.0
    max_segment_s: float = 15.0

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"vad threshold is {self.threshold}; it must be between 0 and 1")
        for name in ("min_speech_ms", "min_silence_ms", "pad_ms"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} is {getattr(self, name)}; it must be 0 or more")
        if not self.max_segment_s >= 1.0:
            raise ValueError(f"max_segment_s is {self.max_segment_s}; it must be at least 1 s")

    @property
    def neg_threshold(self) -> float:
        """Speech ends when the probability falls below this (silero's hysteresis)."""
        return max(self.threshold - 0.15, 0.01)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_VAD = VadSettings()


@dataclass(frozen=True)
class Segment:
    """A piece of one channel's 16 kHz audio, in samples from the start of the recording."""

    start: int
    end: int
    samples: np.ndarray = field(repr=False)
    split: bool = False  # a piece of speech longer than max_segment_s, cut at a quiet point
    speaker: str | None = None

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.end / SAMPLE_RATE


class Vad(Protocol):
    """A streaming VAD: speech probabilities for each complete 512-sample frame fed so far."""

    def probabilities(self, samples: np.ndarray) -> np.ndarray: ...

    def flush(self) -> np.ndarray:
        """The last, zero-padded frame's probability (empty when no samples are pending)."""
        ...


def silero_model_path() -> Path:
    """The sequence model inside the silero-vad wheel, found without importing the package."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or spec.origin is None:
        raise RuntimeError("the timeline needs silero-vad: pip install silero-vad")
    path = Path(spec.origin).parent / "data" / SEQUENCE_MODEL
    if not path.is_file():
        raise RuntimeError(f"silero-vad is installed but has no {SEQUENCE_MODEL}: pip install -U silero-vad")
    return path


class SileroVad:
    """silero-vad's sequence model on ONNX Runtime (one thread), fed any number of samples at a time.

    The probabilities equal silero's whole-file `SileroVADSequence.audio_forward` on the same samples:
    each frame is prefixed with the last 64 samples of the one before, and the LSTM state goes on."""

    def __init__(self, session: Any | None = None) -> None:
        self._session = session or new_session()
        self._h = np.zeros(STATE_SHAPE, np.float32)
        self._c = np.zeros(STATE_SHAPE, np.float32)
        self._context = np.zeros(CONTEXT, np.float32)
        self._pending = np.zeros(0, np.float32)

    def probabilities(self, samples: np.ndarray) -> np.ndarray:
        data = np.concatenate([self._pending, np.asarray(samples, np.float32)])
        whole = len(data) // FRAME * FRAME
        self._pending = data[whole:]
        return self._run(data[:whole].reshape(-1, FRAME))

    def flush(self) -> np.ndarray:
        if not len(self._pending):
            return np.zeros(0, np.float32)
        frame = np.zeros((1, FRAME), np.float32)
        frame[0, : len(self._pending)] = self._pending
        self._pending = np.zeros(0, np.float32)
        return self._run(frame)

    def _run(self, frames: np.ndarray) -> np.ndarray:
        out = []
        for at in range(0, len(frames), MAX_FRAMES_PER_CALL):
            block = frames[at : at + MAX_FRAMES_PER_CALL]
            contexts = np.empty((len(block), CONTEXT), np.float32)
            contexts[0] = self._context
            contexts[1:] = block[:-1, -CONTEXT:]
            self._context = block[-1, -CONTEXT:].copy()
            probs, self._h, self._c = self._session.run(
                ["speech_probs", "hn", "cn"],
                {"input": np.concatenate([contexts, block], axis=1), "h": self._h, "c": self._c},
            )
            out.append(np.asarray(probs, np.float32).reshape(-1))
        return np.concatenate(out) if out else np.zeros(0, np.float32)


@functools.cache
def new_session() -> Any:
    """One session for the process: its run() is thread-safe, and each SileroVad keeps its own state."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a small LSTM: more threads only add synchronisation
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(silero_model_path()), sess_options=options, providers=["CPUExecutionProvider"]
    )


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

    def __init__(self, settings: VadSettings = DEFAULT_VAD, speaker: str | None = None) -> None:
        self.settings = settings
        self.speaker = speaker
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

    @property
    def samples_seen(self) -> int:
        return self._audio.end

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
        total = self.samples_seen
        if self._open is not None and total - self._open.raw_start > self._min_speech:
            out += self._segment(self._open, total)
        elif self._closed is not None:
            out += self._segment(self._closed, min(total, self._closed.raw_end + self._pad))
        self._open = self._closed = None
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
        start, out = max(0, raw_start - self._pad), []
        closed, self._closed = self._closed, None
        if closed is not None:
            gap = raw_start - closed.raw_end
            if gap < 2 * self._pad:
                start = max(0, raw_start - gap // 2)
                out = self._segment(closed, closed.raw_end + gap // 2)
            else:
                out = self._segment(closed, closed.raw_end + self._pad)
        self._open = _Region(start=start, raw_start=raw_start)
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
