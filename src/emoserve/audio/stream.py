"""Audio in, a block at a time: for recordings too long to hold (the timeline).

    AudioStream(source) -> blocks of the file (libsndfile `blocks`, or PyAV frames) -> finite check
        -> mix down (or keep channels) -> soxr.ResampleStream to 16 kHz -> (samples, channels) float32

The same decoders, channel averaging and resampler as `load_audio`, so the samples equal the whole-file
path's (soxr's stream gives the very samples its one-shot call gives; the last block is cut or padded to
librosa's length as `resample` does). Memory is one block, whatever the length of the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from emoserve.audio.decode import (
    LIBRARY_LIMIT_SETTING,
    PyAVFailure,
    check_finite,
    check_no_rate,
    check_not_too_long,
    check_wav_header,
    decode_with_fallback,
    display_name,
    format_changed,
    frame_to_float32,
    from_array,
    input_opener,
    length_limit,
    raise_too_long,
    soundfile_reason,
)
from emoserve.constants import CHANNEL_MODES, SAMPLE_RATE, Channels
from emoserve.errors import AudioError

BLOCK_S = 10.0  # decoded seconds per block
HOLD_BACK = 256  # output samples kept back until the end, so the total can be cut to librosa's length


@dataclass(frozen=True)
class StreamInfo:
    source: str
    sample_rate: int  # of the file
    channels: int  # of the file
    decoder: str  # "soundfile" | "pyav" | "array"
    container: str | None
    duration_s: float | None  # as the header states it (an estimate for some formats), for progress


class AudioStream:
    """An open recording, read in blocks of 16 kHz float32 (samples, k): k = 1 for `channels="mix"`, the
    file's channel count for "separate". Use as a context manager; `blocks()` may be iterated once."""

    def __init__(
        self,
        source: str | os.PathLike[str] | bytes | Any,
        *,
        channels: Channels = "mix",
        max_seconds: float | None = None,
        name: str | None = None,
        block_s: float = BLOCK_S,
        limit_setting: str = LIBRARY_LIMIT_SETTING,
        sample_rate: int | None = None,
    ) -> None:
        """`source`: any of `decode.ACCEPTED_INPUTS` (`sample_rate` is an array's, as for `load_audio`)."""
        if channels not in CHANNEL_MODES:
            raise AudioError(
                f"channels is {channels!r}; choose 'mix' or 'separate'",
                source="<args>",
                reason="bad_argument",
            )
        self.display = name if name is not None else display_name(source)
        self.limit = length_limit(max_seconds, limit_setting, self.display)
        self.channels, self._block_s = channels, block_s
        self._reader = _open(source, self.display, sample_rate)
        self.info = self._reader.info
        if (
            self.info.duration_s is not None
            and self.info.decoder in ("soundfile", "array")
            and self.info.container != "MP3"
        ):
            n = round(self.info.duration_s * self.info.sample_rate)
            check_not_too_long(n, self.info.sample_rate, self.limit, self.display)

    def __enter__(self) -> AudioStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()

    @property
    def out_channels(self) -> int:
        return 1 if self.channels == "mix" else self.info.channels

    def blocks(self) -> Iterator[np.ndarray]:
        rate, display = self.info.sample_rate, self.display
        to16k = To16k(rate, self.out_channels, mix=self.channels == "mix")
        limit = None if self.limit is None else self.limit.samples(rate)
        for block in self._reader.blocks(max(1, int(self._block_s * rate))):
            if limit is not None and to16k.samples_in + len(block) > limit:
                assert self.limit is not None
                raise_too_long(display, self.limit, self.info.duration_s)
            check_finite(block, display)
            if len(out := to16k.push(block)):
                yield out
        if to16k.samples_in == 0:
            raise AudioError(
                f"{display} contains no audio samples; send a non-empty recording",
                source=display,
                reason="empty",
            )
        if len(tail := to16k.finish()):
            yield tail


class To16k:
    """Blocks of (frames, channels) float32 at `rate` in, 16 kHz blocks out: mixed down to one channel
    (`mix`, the mean as `load_audio` takes it) and resampled by soxr's streaming resampler (HQ, librosa's
    soxr_hq); `finish()` gives the rest, cut or padded to the length librosa gives the whole signal. Block
    sizes change nothing: a file read in blocks and PCM pushed as it arrives give the same samples."""

    def __init__(self, rate: int, channels: int, *, mix: bool) -> None:
        self.rate, self.mix = rate, mix
        self.channels = 1 if mix else channels
        self.samples_in = 0  # frames pushed, at `rate`
        self.samples_out = 0  # 16 kHz samples given out
        self._resampler = None
        if rate != SAMPLE_RATE:
            self._resampler = soxr.ResampleStream(
                rate, SAMPLE_RATE, self.channels, dtype="float32", quality="HQ"
            )
        self._held = np.zeros((0, self.channels), np.float32)

    def push(self, block: np.ndarray) -> np.ndarray:
        """The 16 kHz samples (samples, channels) now final (possibly none)."""
        self.samples_in += len(block)
        x = block.mean(axis=1, dtype=np.float32, keepdims=True) if self.mix else block
        if self._resampler is not None:
            x = self._resampler.resample_chunk(np.ascontiguousarray(x, np.float32))
        held = np.concatenate([self._held, x])
        if len(held) <= HOLD_BACK:
            self._held = held
            return np.zeros((0, self.channels), np.float32)
        out, self._held = held[:-HOLD_BACK], held[-HOLD_BACK:]
        self.samples_out += len(out)
        return out

    def release(self) -> np.ndarray:
        """The samples held back, given out now (a live stream's flush: the turn ends with its last
        sample); the cut to librosa's length at `finish` then has fewer to cut."""
        out, self._held = self._held, np.zeros((0, self.channels), np.float32)
        self.samples_out += len(out)
        return out

    def finish(self) -> np.ndarray:
        held = self._held
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(np.zeros((0, self.channels), np.float32), last=True)
            held = np.concatenate([held, tail])
        want = -(-self.samples_in * SAMPLE_RATE // self.rate) - self.samples_out  # librosa's length
        if len(held) < want:
            held = np.concatenate([held, np.zeros((want - len(held), self.channels), np.float32)])
        self._held = np.zeros((0, self.channels), np.float32)
        out = np.ascontiguousarray(held[: max(want, 0)])
        self.samples_out += len(out)
        return out


# --------------------------------------------------------------------------------------------- readers


class _Reader:
    info: StreamInfo

    def blocks(self, frames: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _open(source: Any, display: str, sample_rate: int | None) -> _Reader:
    """libsndfile first (the reference's decoder), PyAV for what it cannot open, as `load_audio` does;
    an array (or tuple) is read as `load_audio` reads it, then handed out in blocks."""
    if isinstance(source, np.ndarray | tuple):
        return _ArrayReader(source, display, sample_rate)
    check_no_rate(sample_rate, display)
    return decode_with_fallback(
        input_opener(source, display),
        display,
        lambda file: _SoundfileReader(file, display),
        lambda file: _PyAVReader(file, display),
    )


class _ArrayReader(_Reader):
    def __init__(self, source: np.ndarray | tuple, display: str, sample_rate: int | None) -> None:
        decoded = from_array(source, sample_rate, display)
        self._samples = decoded.samples  # (samples, channels) float32 at the array's own rate
        n, channels = self._samples.shape
        self.info = StreamInfo(display, decoded.sample_rate, channels, "array", None, n / decoded.sample_rate)

    def blocks(self, frames: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self._samples), frames):
            yield self._samples[start : start + frames]

    def close(self) -> None:
        pass


class _SoundfileReader(_Reader):
    def __init__(self, file: Any, display: str) -> None:
        self._file = sf.SoundFile(file)
        self.display = display
        if self._file.format == "WAV":
            try:
                check_wav_header(file, display)
            except AudioError:
                self._file.close()
                raise
        f = self._file
        self.info = StreamInfo(
            display, f.samplerate, f.channels, "soundfile", f.format, f.frames / f.samplerate
        )

    def blocks(self, frames: int) -> Iterator[np.ndarray]:
        try:
            yield from self._file.blocks(blocksize=frames, dtype="float32", always_2d=True)
        except sf.SoundFileError as error:
            raise AudioError(
                f"{self.display}: decoding failed part-way ({soundfile_reason(error)}); the file is damaged",
                source=self.display,
                reason="truncated",
            ) from None

    def close(self) -> None:
        self._file.close()


class _PyAVReader(_Reader):
    def __init__(self, file: Any, display: str) -> None:
        import av

        self.display = display
        self._container = av.open(file, mode="r")
        try:
            if not self._container.streams.audio:
                raise PyAVFailure(f"the {self._container.format.name} input has no audio stream")
            self._stream = self._container.streams.audio[0]
            self._frames = self._container.decode(self._stream)
            first = next(self._frames, None)  # the first frame's rate and layout are the stream's
        except BaseException:
            self._container.close()
            raise
        self._first = None if first is None else frame_to_float32(first)
        rate = first.sample_rate if first is not None else self._stream.sample_rate
        channels = first.layout.nb_channels if first is not None else max(self._stream.channels, 1)
        duration = self._container.duration
        self.info = StreamInfo(
            display,
            rate,
            channels,
            "pyav",
            self._container.format.name,
            None if duration is None else duration / 1_000_000,
        )

    def blocks(self, frames: int) -> Iterator[np.ndarray]:
        import av

        if self._first is None:
            return
        chunks, n = [self._first], len(self._first)
        try:
            for frame in self._frames:
                shape = (frame.sample_rate, frame.layout.nb_channels)
                if shape != (self.info.sample_rate, self.info.channels):
                    raise format_changed(self.display, (self.info.sample_rate, self.info.channels), shape)
                chunks.append(frame_to_float32(frame))
                n += len(chunks[-1])
                if n >= frames:
                    yield np.concatenate(chunks)
                    chunks, n = [], 0
        except (av.FFmpegError, PyAVFailure) as error:
            raise AudioError(
                f"{self.display}: decoding failed part-way ({error}); the file is damaged",
                source=self.display,
                reason="truncated",
            ) from None
        if chunks:
            yield np.concatenate(chunks)

    def close(self) -> None:
        self._container.close()
