"""Live audio: raw PCM as it arrives, cut as a recording's timeline cuts it, with interim windows.

    PCM (bytes in an encoding, or float32 arrays; channels interleaved) -> To16k (mixed down, soxr's
    streaming resampler, as a file is read) -> SileroVad -> Segmenter, a VAD frame at a time
    -> events: SpeechStart (silero opened an utterance), InterimWindow (the open utterance's last
       window_s, every hop_s of its speech), Segment (an utterance, or a piece of long speech, finished)

`end()` flushes the resampler, the VAD's last frame and the open utterance; `flush()` closes the open
utterance now and the stream goes on. The cut is the timeline's own (`Recording.segments`), so a file
streamed in messages of any size gives the segments /v1/timeline gives for it. Memory holds the open
utterance (at most max_segment_s) and less than a VAD frame of audio.

With `client_turns` (the stream's `vad=off`) no VAD runs: the client decides the turns (a voice agent's
framework has its own VAD). Every sample belongs to the open turn, which opens with the first sample after
the start or a `flush()` and is cut, unpadded, at the next `flush()`: a turn's segment is exactly the audio
sent for it (what /v1/recognize scores for that audio). With `chunk_s` as well, the open turn is read in
pieces while it is spoken: every chunk_s of it a `TurnPiece` (its new audio, and a window that reaches
STREAM_CHUNK_CONTEXT_S further back into the turn), and at the turn's end the last piece before its
`Segment`. A turn no longer than chunk_s has no pieces: it is scored whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from emoserve.audio.decode import check_finite
from emoserve.audio.segments import AudioWindow, Segmenter
from emoserve.audio.stream import To16k
from emoserve.audio.vad import DEFAULT_VAD, FRAME, Segment, SileroVad, Vad, VadSettings
from emoserve.constants import (
    MIN_SAMPLES,
    SAMPLE_RATE,
    STREAM_CHUNK_CONTEXT_S,
    STREAM_ENCODINGS,
    STREAM_HOP_S,
    STREAM_WINDOW_S,
)
from emoserve.errors import AudioError

PCM_DTYPES = (np.dtype("<i2"), np.dtype("<f4"))  # numpy's, of STREAM_ENCODINGS in order
ENCODINGS: dict[str, np.dtype[Any]] = dict(zip(STREAM_ENCODINGS, PCM_DTYPES, strict=True))
S16_SCALE = 32768.0  # what libsndfile divides 16-bit PCM by: a WAV file's samples, exactly
NO_PROBS = np.zeros(0, np.float32)


@dataclass(frozen=True)
class SpeechStart:
    start: int  # 16 kHz samples from the stream's first one: the utterance's padded start


@dataclass(frozen=True)
class InterimWindow:
    start: int
    end: int  # the audio received so far
    samples: np.ndarray


@dataclass(frozen=True)
class TurnPiece:
    """A piece of the open turn (`chunk_s`): the new audio is [start, end); `samples` are the window
    [window_start, end) scored for it, whose frames from `start` on are the piece's."""

    turn_start: int
    window_start: int
    start: int
    end: int
    samples: np.ndarray

    @property
    def context(self) -> int:
        """Samples of the window before the piece's own audio."""
        return self.start - self.window_start


LiveEvent = SpeechStart | InterimWindow | TurnPiece | Segment


class NoVad:
    """No voice activity detection (`client_turns`): no frame probabilities, ever."""

    def probabilities(self, samples: np.ndarray) -> np.ndarray:
        return NO_PROBS

    def flush(self) -> np.ndarray:
        return NO_PROBS


class ClientTurns:
    """The cut when the client decides the turns: the open turn is every sample since the start or the
    last `flush()`; one longer than max_segment_s is cut there (the pieces `split`), as the VAD's cut
    bounds what a stream holds. The segmenter's interface (`Segmenter`), without probabilities."""

    def __init__(self, settings: VadSettings, on_start: Callable[[int], None], chunk_s: float = 0.0) -> None:
        self.on_start = on_start
        self._max = int(settings.max_segment_s * SAMPLE_RATE)
        self._chunk = round(chunk_s * SAMPLE_RATE)  # 0: no pieces
        self._context = round(STREAM_CHUNK_CONTEXT_S * SAMPLE_RATE)
        self._audio = AudioWindow()
        self._start: int | None = None
        self._pieced: int | None = None  # the open turn's audio read in pieces ends here
        self._split = False  # the open turn's earlier part was cut at max_segment_s

    @property
    def samples_seen(self) -> int:
        return self._audio.end

    @property
    def open_start(self) -> int | None:
        return self._start

    def audio(self, start: int, end: int) -> np.ndarray:
        return self._audio.slice(start, end).copy()

    def push(self, samples: np.ndarray, probs: np.ndarray) -> list[Segment | TurnPiece]:
        out: list[Segment | TurnPiece] = []
        while len(samples):
            if self._start is None:
                self._start = self._pieced = self._audio.end
                self.on_start(self._start)
            room = self._start + self._max - self._audio.end
            if self._chunk:  # stop at the next piece's end
                assert self._pieced is not None
                room = min(room, self._pieced + self._chunk - self._audio.end)
            self._audio.append(samples[:room])
            samples = samples[room:]
            if self._audio.end - self._start >= self._max:  # a turn past max_segment_s: cut, and go on
                out += self._close(split=True)
                self._start = self._pieced = self._audio.end
                self._split = True
            elif self._chunk and self._audio.end - (self._pieced or 0) >= self._chunk:
                out.append(self._piece())
        return out

    def finish(self, last_probs: np.ndarray) -> list[Segment | TurnPiece]:
        return self.flush()

    def flush(self) -> list[Segment | TurnPiece]:
        out = self._close(split=self._split)
        self._start, self._split = None, False
        return out

    def _piece(self) -> TurnPiece:
        assert self._start is not None and self._pieced is not None
        start, end = self._pieced, self._audio.end
        window_start = max(self._start, min(start, end - MIN_SAMPLES) - self._context)
        self._pieced = end
        return TurnPiece(self._start, window_start, start, end, self.audio(window_start, end))

    def _close(self, split: bool) -> list[Segment | TurnPiece]:
        start, end = self._start, self._audio.end
        samples = self.audio(start, end) if start is not None else NO_PROBS
        pieces: list[Segment | TurnPiece] = []
        if start is not None and self._pieced is not None and start < self._pieced < end:
            pieces = [self._piece()]  # read in pieces: the rest is the last one
        self._audio.drop_before(end)
        self._pieced = None
        if len(samples) < MIN_SAMPLES:
            return []  # nothing sent since the last flush, or less than the model's shortest input
        assert start is not None
        return [*pieces, Segment(start, end, samples, split)]


class LiveCutter:
    """One live stream's cut. `feed(data)` and `end()` return the events in the order they happened."""

    def __init__(
        self,
        *,
        sample_rate: int = SAMPLE_RATE,
        encoding: str = "pcm_s16le",
        channels: int = 1,
        vad: VadSettings = DEFAULT_VAD,
        hop_s: float = STREAM_HOP_S,
        window_s: float = STREAM_WINDOW_S,
        vad_factory: Callable[[], Vad] = SileroVad,
        client_turns: bool = False,
        chunk_s: float = 0.0,
        name: str = "<stream>",
    ) -> None:
        """`client_turns`: no VAD; the turns are what the caller sends between `flush()`es. `chunk_s`
        (with client_turns): the turn in pieces (`TurnPiece`) instead of interim windows."""
        if chunk_s and not client_turns:
            raise ValueError("chunk_s reads the client's turns in pieces: it needs client_turns")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding is {encoding!r}; choose from {', '.join(ENCODINGS)}")
        if sample_rate < 1 or channels < 1:
            raise ValueError(f"sample_rate {sample_rate} and channels {channels} must be positive")
        if not 0 < hop_s <= window_s:
            raise ValueError(f"hop_s is {hop_s} and window_s {window_s}: 0 < hop_s <= window_s")
        self.name, self.encoding, self.channels = name, encoding, channels
        self._dtype = ENCODINGS[encoding]
        self._to16k = To16k(sample_rate, channels, mix=True)
        self._vad: Vad = NoVad() if client_turns else vad_factory()
        self._segmenter: Segmenter | ClientTurns = (
            ClientTurns(vad, self._started, chunk_s)
            if client_turns
            else Segmenter(vad, on_start=self._started)
        )
        self._hop, self._window = round(hop_s * SAMPLE_RATE), round(window_s * SAMPLE_RATE)
        self._partial = b""  # the bytes of an interleaved frame not complete yet
        self._frame_fill = 0  # samples of the VAD frame in progress already given to the segmenter
        self._start_at: int | None = None
        self._next_interim = 0
        self._pieces = bool(chunk_s)  # the turn's pieces are its readings: no interim windows
        self.ended = False

    @property
    def samples(self) -> int:
        """16 kHz samples cut so far."""
        return self._segmenter.samples_seen

    @property
    def duration_s(self) -> float:
        return self.samples / SAMPLE_RATE

    @property
    def in_speech(self) -> bool:
        return self._segmenter.open_start is not None

    def feed(self, data: bytes | bytearray | memoryview | np.ndarray) -> list[LiveEvent]:
        """More audio: bytes in the stream's encoding (any length that is whole samples: a frame may end
        between channels), or a float32 array (samples,) or (samples, channels)."""
        if self.ended:
            raise RuntimeError("this stream has ended; open a new one")
        block = self._decode(data)
        check_finite(block, self.name)
        return self._cut(self._to16k.push(block)[:, 0])

    def end(self) -> list[LiveEvent]:
        """No more audio: the resampler's tail, the VAD's last frame, and the open utterance."""
        if self.ended:
            return []
        self.ended = True
        events = self._cut(self._to16k.finish()[:, 0])
        self._start_at = None
        events += self._segmenter.finish(self._vad.flush())
        if self._start_at is not None:  # the last frame opened an utterance: it is in what finish gave
            events.insert(len(events) - 1, SpeechStart(self._start_at))
        return events

    def flush(self) -> list[LiveEvent]:
        """Close the open utterance (or turn) now, with the audio received so far: its segment, if there is
        one to score (none when no utterance is open, or with client turns when less than the model's
        shortest input was sent since the last flush). The stream goes on; every sample received counts
        (the resampler's held-back ones are given out first), but none after it."""
        if self.ended:
            raise RuntimeError("this stream has ended; open a new one")
        held = self._cut(self._to16k.release()[:, 0])
        self._start_at = None
        events: list[LiveEvent] = [e for e in held if not isinstance(e, InterimWindow)]
        return events + list(self._segmenter.flush())

    def _decode(self, data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
        if isinstance(data, np.ndarray):
            x = np.asarray(data, np.float32)
            return x.reshape(-1, self.channels) if x.ndim == 1 else x
        width = self._dtype.itemsize
        if len(data) % width:
            raise AudioError(
                f"a message of {len(data)} bytes is not whole {self.encoding} samples ({width} bytes "
                "each): it was left out; send whole samples",
                source=self.name,
                reason="bad_frame",
            )
        raw = self._partial + bytes(data)
        whole = len(raw) // (width * self.channels) * width * self.channels
        self._partial = raw[whole:]
        x = np.frombuffer(raw[:whole], self._dtype).reshape(-1, self.channels).astype(np.float32)
        return x / np.float32(S16_SCALE) if self.encoding == "pcm_s16le" else x

    def _cut(self, samples: np.ndarray) -> list[LiveEvent]:
        """Give the segmenter a VAD frame at a time, so that a start is told in its place among segments;
        then at most one reading, of the audio up to the end of the message (a message of a minute gives
        one reading, not a pile of them)."""
        events: list[LiveEvent] = []
        at = 0
        for p in self._vad.probabilities(samples):
            take = FRAME - self._frame_fill
            events += self._push(samples[at : at + take], np.array([p], np.float32))
            at, self._frame_fill = at + take, 0
        if at < len(samples):
            events += self._push(samples[at:], NO_PROBS)
            self._frame_fill += len(samples) - at
        return events + self._interim()

    def _push(self, samples: np.ndarray, probs: np.ndarray) -> list[LiveEvent]:
        self._start_at = None
        events: list[LiveEvent] = list(self._segmenter.push(samples, probs))
        if self._start_at is not None:  # before what it opened (a turn's pieces), after what it closed
            at = next((i for i, e in enumerate(events) if getattr(e, "start", -1) >= self._start_at), None)
            events.insert(len(events) if at is None else at, SpeechStart(self._start_at))
            self._next_interim = self._start_at + self._hop
        return events

    def _started(self, start: int) -> None:
        self._start_at = start

    def _interim(self) -> list[LiveEvent]:
        start, now = self._segmenter.open_start, self.samples
        if start is None or now < self._next_interim or self._pieces:
            return []
        # the next reading a hop_s of speech after this one, however many hops a large message spanned
        self._next_interim += ((now - self._next_interim) // self._hop + 1) * self._hop
        low = max(start, now - self._window)
        return [InterimWindow(low, now, self._segmenter.audio(low, now))]
