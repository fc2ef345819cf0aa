"""Audio in: decode, mix to mono, resample to 16 kHz, validate.

The pipeline reproduces what the reference fed the model (spec §4 step 1, fixture README): libsndfile
(`soundfile`) decodes to float32, channels are averaged, and non-16 kHz audio is resampled with soxr "HQ"
and then cut or zero-padded to ``ceil(n * 16000 / sr)`` samples (librosa's rule). Formats libsndfile cannot
open (m4a/aac, opus in webm, video containers, ...) are decoded with PyAV, imported only when needed so that
this module stays quick to import.

    load_audio(source) -> decoded (samples, channels) -> length limit -> finite check
                       -> to_mono -> resample -> minimum-length check -> Audio
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NoReturn, TypeAlias, TypeVar

import numpy as np
import soundfile as sf
import soxr

from emoserve.constants import DEFAULT_MAX_SECONDS, MIN_SAMPLES, SAMPLE_RATE
from emoserve.errors import AudioError

if TYPE_CHECKING:
    import av.audio.frame

T = TypeVar("T")
LIBRARY_LIMIT_SETTING = "max_seconds / --max-seconds"  # what a too-long error names, unless told otherwise

# A 2-D array is (samples, channels) unless its first axis has at most ORIENTATION_MAX_CHANNELS entries and
# its second axis more: then it is (channels, samples), the torch/torchaudio layout.
ORIENTATION_MAX_CHANNELS = 8

SUPPORTED = "wav, flac, ogg, mp3, m4a/aac, opus, webm and other ffmpeg formats"

# The one list of what every entry point takes as audio (load_audio, predict, timeline, AudioStream)
ACCEPTED_INPUTS = "a path, bytes, a binary file, an array with sample_rate=, or an (array, sample_rate) tuple"
AudioInput: TypeAlias = (
    str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO | np.ndarray | tuple[np.ndarray, int]
)


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # float32, mono, 16 kHz, C-contiguous, shape (samples,)
    source: str  # display name of the input
    original_sample_rate: int
    original_channels: int
    decoder: str  # "soundfile" | "pyav" | "array"
    container: str | None  # e.g. "WAV", "FLAC", "MP3", "OGG" (libsndfile) or "mov,mp4,m4a,3gp,3g2,mj2" (PyAV)
    resampled: bool
    original_samples: int | None = None  # per channel, at original_sample_rate, before resampling

    @property
    def duration_s(self) -> float:
        return self.samples.shape[0] / SAMPLE_RATE

    @property
    def original_duration_s(self) -> float:
        if self.original_samples is None:
            return self.duration_s
        return self.original_samples / self.original_sample_rate


@dataclass(frozen=True)
class _Decoded:
    samples: np.ndarray  # float32, (samples, channels), at sample_rate
    sample_rate: int
    decoder: str
    container: str | None


class PyAVFailure(Exception):
    """PyAV opened the input but it holds nothing we can use (no audio stream, odd sample format)."""


# ----------------------------------------------------------------------------------------------- public


def load_audio(
    source: AudioInput,
    sample_rate: int | None = None,
    *,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    name: str | None = None,
    limit_setting: str = LIBRARY_LIMIT_SETTING,
) -> Audio:
    """Decode a path, bytes, binary file object or array into 16 kHz mono float32.

    ``sample_rate`` is the rate of an ``np.ndarray`` input (required there); encoded inputs carry their own
    rate and must not pass one. ``max_seconds=None`` disables the length limit; ``limit_setting`` is what a
    too-long error tells the user to change (a server names its own setting). ``name`` replaces the
    display name used in errors (default: the path, "<bytes>", the file object's name, or "<array>").
    """
    display = name if name is not None else display_name(source)
    limit = length_limit(max_seconds, limit_setting, display)
    if isinstance(source, np.ndarray | tuple):
        decoded = from_array(source, sample_rate, display)
    else:
        check_no_rate(sample_rate, display)
        decoded = _decode(source, display, limit)
    return _finish(decoded, display, limit)


def check_no_rate(sample_rate: int | None, display: str) -> None:
    """Encoded audio carries its own rate: a `sample_rate=` beside it is a mistake, not a hint."""
    if sample_rate is not None:
        raise AudioError(
            f"{display}: sample_rate= applies to arrays only; encoded audio carries its own rate "
            "(drop the argument)",
            source=display,
            reason="bad_argument",
        )


def to_mono(x: np.ndarray) -> np.ndarray:
    """Average the channels: (samples,), (samples, channels) or (channels, samples) -> (samples,) float32.

    The 2-D orientation follows the ORIENTATION_MAX_CHANNELS rule; integer PCM is scaled to [-1, 1) first.
    """
    return _mix_down(_as_samples_by_channels(_pcm_to_float32(np.asarray(x), "<array>"), "<array>"))


def resample(samples: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """soxr "HQ", then exactly ``ceil(n * target_sr / orig_sr)`` samples, as librosa.resample does.

    ``samples`` is (samples,) or (samples, channels); the result is float32 of the same layout.
    """
    for label, rate in (("orig_sr", orig_sr), ("target_sr", target_sr)):
        _check_rate(rate, "<array>", label)
    x = np.ascontiguousarray(samples, dtype=np.float32)
    if orig_sr == target_sr:
        return x
    y = soxr.resample(x, orig_sr, target_sr, quality="HQ")
    # librosa's length rule; exact integer ceil (float ceil agrees for any realistic n).
    n_out = -(-x.shape[0] * target_sr // orig_sr)
    return _fix_length(y, n_out)


# ------------------------------------------------------------------------------------------ input kinds


def display_name(source: object) -> str:
    if isinstance(source, str | os.PathLike):
        return os.fsdecode(os.fspath(source))
    if isinstance(source, bytes | bytearray | memoryview):
        return "<bytes>"
    if isinstance(source, np.ndarray | tuple):
        return "<array>"
    file_name = getattr(source, "name", None)
    return file_name if isinstance(file_name, str) else "<file>"


def _decode(source: AudioInput, display: str, limit: Limit | None) -> _Decoded:
    return decode_with_fallback(
        input_opener(source, display),
        display,
        lambda file: _read_soundfile(file, display, limit),
        lambda file: _read_pyav(file, display, limit),
    )


def input_opener(source: object, display: str) -> Callable[[], str | io.BytesIO]:
    """What each decoder opens: the checked path, or a fresh BytesIO of the bytes each time (each
    decoder seeks and reads from the start)."""
    if isinstance(source, str | os.PathLike):
        path = _checked_path(source, display)
        return lambda: path
    data = _read_bytes(source, display)
    return lambda: io.BytesIO(data)


def _checked_path(source: str | os.PathLike[str], display: str) -> str:
    path = Path(os.fsdecode(os.fspath(source)))
    if not path.exists():
        raise AudioError(f"{display}: no such file; check the path", source=display, reason="not_found")
    if not path.is_file():
        raise AudioError(f"{display}: not a file; pass an audio file", source=display, reason="not_found")
    if path.stat().st_size == 0:
        raise AudioError(f"{display} is empty (0 bytes); pass an audio file", source=display, reason="empty")
    return str(path)


def _read_bytes(source: object, display: str) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, bytes | bytearray):
            raise AudioError(
                f"{display}: the file object returned {type(data).__name__}, not bytes; open it in binary "
                "mode ('rb')",
                source=display,
                reason="bad_argument",
            )
        data = bytes(data)
    else:
        raise AudioError(
            f"{display}: unsupported input type {type(source).__name__}; pass {ACCEPTED_INPUTS}",
            source=display,
            reason="bad_argument",
        )
    if not data:
        raise AudioError(f"{display} is empty (0 bytes); send audio data", source=display, reason="empty")
    return data


def from_array(source: np.ndarray | tuple, sample_rate: int | None, display: str) -> _Decoded:
    if isinstance(source, tuple):
        if len(source) != 2 or not isinstance(source[0], np.ndarray):
            raise AudioError(
                f"{display}: a tuple input must be (array, sample_rate)",
                source=display,
                reason="bad_argument",
            )
        array, tuple_rate = source
        if sample_rate is not None and sample_rate != tuple_rate:
            raise AudioError(
                f"{display}: sample_rate={sample_rate} disagrees with the tuple's {tuple_rate}; pass one",
                source=display,
                reason="bad_argument",
            )
        sample_rate = tuple_rate
    else:
        array = source
        if sample_rate is None:
            raise AudioError(
                f"{display}: an array needs its rate; pass sample_rate= or an (array, sample_rate) tuple",
                source=display,
                reason="bad_argument",
            )
    rate = _check_rate(sample_rate, display, "sample_rate")
    # Copy: the Audio result owns its samples even when no conversion was needed.
    samples = _as_samples_by_channels(_pcm_to_float32(array, display), display).copy()
    return _Decoded(samples, rate, "array", None)


# ----------------------------------------------------------------------------------------------- decoders


def decode_with_fallback(
    open_input: Callable[[], str | io.BytesIO],
    display: str,
    soundfile: Callable[[str | io.BytesIO], T],
    pyav: Callable[[str | io.BytesIO], T],
) -> T:
    """libsndfile first (the reference's decoder, bit for bit), PyAV for everything it cannot open;
    `soundfile` and `pyav` read (or open) the input with each."""
    try:
        return soundfile(open_input())
    except (sf.SoundFileError, TypeError) as error:
        # TypeError: libsndfile took the input for headerless RAW, which needs a rate we do not have.
        sf_reason = soundfile_reason(error)
    import av  # ~0.1 s to import; only inputs libsndfile cannot open get here

    try:
        return pyav(open_input())
    except AudioError:
        raise
    except PyAVFailure as error:
        pyav_reason = str(error)
    except av.FFmpegError as error:
        pyav_reason = _pyav_reason(error)
    except Exception as error:  # hostile headers reach corners of PyAV that fail in other ways
        pyav_reason = f"{type(error).__name__}: {error}"
    raise AudioError(
        f"{display}: could not decode audio (soundfile: {sf_reason}; pyav: {pyav_reason}). "
        f"Supported: {SUPPORTED}.",
        source=display,
        reason="undecodable",
    )


def soundfile_reason(error: Exception) -> str:
    # LibsndfileError's str() embeds the repr of the BytesIO; its error_string is the library's own text.
    reason = getattr(error, "error_string", None)
    return str(reason if reason else error).strip().rstrip(".")


def _pyav_reason(error: Exception) -> str:
    strerror = getattr(error, "strerror", None)
    return str(strerror) if strerror else f"{type(error).__name__}: {error}"


def _read_soundfile(file: str | io.BytesIO, display: str, limit: Limit | None) -> _Decoded:
    with sf.SoundFile(file) as f:
        # libsndfile's frame count is exact for PCM, FLAC and Ogg but an estimate for MP3 (the en_3s_44k.mp3
        # fixture reports 133938 and decodes 133632), so the early refusal skips MP3; the bounded read
        # below still stops a long MP3 at the limit.
        if f.format == "WAV":
            check_wav_header(file, display)
        if f.format != "MP3":
            check_not_too_long(f.frames, f.samplerate, limit, display)
        frames = -1 if limit is None else limit.samples(f.samplerate) + 1
        samples = f.read(frames, dtype="float32", always_2d=True)
        if limit is not None and samples.shape[0] >= frames:
            raise_too_long(display, limit, f.frames / f.samplerate)
        return _Decoded(samples, f.samplerate, "soundfile", f.format)


# RIFF sizes that streaming recorders write when the length is not known yet
_RIFF_SIZE_UNKNOWN = (0, 0xFFFFFFFF)


# PCM sample widths that exist (bits); libsndfile decodes others as if they were the next byte width
_PCM_BITS = (8, 16, 24, 32)
_WAV_HEAD_BYTES = 4096  # where the fmt chunk is looked for


def check_wav_header(file: str | io.BytesIO, display: str) -> None:
    """What libsndfile lets through but a correct WAV cannot be: a file cut short (libsndfile quietly
    shortens it; we compare the size its RIFF header declares with the bytes that are there) and a PCM
    format whose bit depth does not exist (libsndfile decodes garbage from it)."""
    if isinstance(file, io.BytesIO):
        head, size = file.getbuffer()[:_WAV_HEAD_BYTES].tobytes(), file.getbuffer().nbytes
    else:
        with open(file, "rb") as raw:
            head, size = raw.read(_WAV_HEAD_BYTES), os.fstat(raw.fileno()).st_size
    if len(head) < 12 or head[:4] != b"RIFF":
        return  # RF64/W64 and friends carry their sizes elsewhere
    _check_pcm_format(head, display)
    declared = int.from_bytes(head[4:8], "little")
    if declared not in _RIFF_SIZE_UNKNOWN and size < declared + 8:
        raise AudioError(
            f"{display} is truncated: its header declares {declared + 8} bytes but only {size} are there; "
            "the file was cut short (an interrupted upload or copy?) - send the whole file",
            source=display,
            reason="truncated",
        )


def _check_pcm_format(head: bytes, display: str) -> None:
    at = 12  # after "RIFF", its size and "WAVE": chunk id, chunk size, chunk data...
    while at + 8 <= len(head):
        chunk, length = head[at : at + 4], int.from_bytes(head[at + 4 : at + 8], "little")
        if chunk == b"fmt " and at + 24 <= len(head):
            tag, channels = (int.from_bytes(head[at + i : at + i + 2], "little") for i in (8, 10))
            block, bits = (int.from_bytes(head[at + i : at + i + 2], "little") for i in (20, 22))
            if tag == 1 and (bits not in _PCM_BITS or block != channels * bits // 8):
                raise AudioError(
                    f"{display} has a malformed WAV header: {bits}-bit PCM with {channels} channels and "
                    f"{block}-byte frames does not exist; re-export the file from its source",
                    source=display,
                    reason="malformed",
                )
            return
        at += 8 + length + (length & 1)  # chunks are padded to an even size


def _read_pyav(file: str | io.BytesIO, display: str, limit: Limit | None) -> _Decoded:
    import av

    with av.open(file, mode="r") as container:
        container_name = container.format.name
        if not container.streams.audio:
            raise PyAVFailure(f"the {container_name} input has no audio stream")
        stream = container.streams.audio[0]  # the first audio stream, as ffmpeg picks by default
        rate, channels = stream.sample_rate, stream.channels  # replaced by the first frame's, if any
        chunks: list[np.ndarray] = []
        n_samples = 0
        for frame in container.decode(stream):
            frame_shape = (frame.sample_rate, frame.layout.nb_channels)
            if not chunks:
                rate, channels = frame_shape
            elif frame_shape != (rate, channels):
                raise format_changed(display, (rate, channels), frame_shape)
            chunks.append(frame_to_float32(frame))
            n_samples += frame.samples
            # Stop decoding at the limit rather than holding a whole long recording in memory.
            if limit is not None and n_samples > limit.samples(rate):
                raise_too_long(display, limit, _container_seconds(container))
    samples = np.concatenate(chunks) if chunks else np.zeros((0, max(channels, 1)), np.float32)
    return _Decoded(samples, rate, "pyav", container_name)


def format_changed(display: str, was: tuple[int, int], now: tuple[int, int]) -> AudioError:
    """Audio whose rate or channel count changes part-way: the same error whole or in blocks."""
    return AudioError(
        f"{display}: the audio changes from {was[0]} Hz x {was[1]} channels to {now[0]} Hz x {now[1]} "
        "channels mid-stream; convert it to one format first",
        source=display,
        reason="malformed",
    )


def frame_to_float32(frame: av.audio.frame.AudioFrame) -> np.ndarray:
    """One decoded frame -> (samples, channels) float32."""
    from av.audio.frame import format_dtypes

    if frame.format.name not in format_dtypes:
        raise PyAVFailure(f"sample format {frame.format.name} is not supported")
    x = frame.to_ndarray()
    if frame.format.is_planar:
        return _pcm_to_float32(x.T, "<frame>")  # (channels, samples) -> (samples, channels)
    # Packed: one plane, (1, samples * channels) interleaved -> (samples, channels).
    return _pcm_to_float32(x.reshape(-1, frame.layout.nb_channels), "<frame>")


def _container_seconds(container: object) -> float | None:
    duration = getattr(container, "duration", None)  # in AV_TIME_BASE units (microseconds)
    return None if duration is None else duration / 1_000_000


# ---------------------------------------------------------------------------------------------- samples


def _pcm_to_float32(x: np.ndarray, display: str) -> np.ndarray:
    """Scale integer PCM to [-1, 1) as libsndfile does; floats become float32 unchanged in value."""
    if x.dtype == np.int16:
        return x.astype(np.float32) / np.float32(32768)
    if x.dtype == np.int32:
        return x.astype(np.float32) / np.float32(2**31)
    if x.dtype == np.uint8:  # 8-bit WAV is unsigned, centred on 128
        return (x.astype(np.float32) - np.float32(128)) / np.float32(128)
    if x.dtype.kind == "f":
        return x.astype(np.float32, copy=False)
    raise AudioError(
        f"{display}: unsupported sample dtype {x.dtype}; pass float32/float64 or int16/int32/uint8 PCM",
        source=display,
        reason="bad_argument",
    )


def _as_samples_by_channels(x: np.ndarray, display: str) -> np.ndarray:
    if x.ndim == 1:
        return x[:, None]
    if x.ndim == 2:
        if x.shape[0] <= ORIENTATION_MAX_CHANNELS < x.shape[1]:
            return x.T  # (channels, samples), the torch layout
        return x
    raise AudioError(
        f"{display}: expected a 1-D (samples,) or 2-D (samples, channels) array, got shape {x.shape}",
        source=display,
        reason="bad_argument",
    )


def _mix_down(x: np.ndarray) -> np.ndarray:
    """(samples, channels) float32 -> (samples,) float32, C-contiguous."""
    if x.shape[1] == 1:
        return np.ascontiguousarray(x[:, 0])
    return np.ascontiguousarray(x.mean(axis=1, dtype=np.float32))


def _fix_length(y: np.ndarray, n_out: int) -> np.ndarray:
    if y.shape[0] >= n_out:
        return np.ascontiguousarray(y[:n_out])
    padding = np.zeros((n_out - y.shape[0], *y.shape[1:]), dtype=y.dtype)
    return np.concatenate([y, padding])


def _finish(decoded: _Decoded, display: str, limit: Limit | None) -> Audio:
    x = decoded.samples  # (samples, channels)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise AudioError(
            f"{display} contains no audio samples; send a non-empty recording", source=display, reason="empty"
        )
    check_not_too_long(x.shape[0], decoded.sample_rate, limit, display)
    check_finite(x, display)
    mono = _mix_down(x)  # averaged before resampling, as the reference did (bit-exact on the stereo fixture)
    samples = resample(mono, decoded.sample_rate, SAMPLE_RATE)
    _check_not_too_short(samples, display)
    return Audio(
        samples=samples,
        source=display,
        original_sample_rate=decoded.sample_rate,
        original_channels=x.shape[1],
        decoder=decoded.decoder,
        container=decoded.container,
        resampled=decoded.sample_rate != SAMPLE_RATE,
        original_samples=x.shape[0],
    )


# ------------------------------------------------------------------------------------------------ checks


def _check_rate(rate: object, display: str, label: str) -> int:
    if isinstance(rate, float) and rate.is_integer():
        rate = int(rate)
    if isinstance(rate, bool) or not isinstance(rate, int | np.integer) or rate <= 0:
        raise AudioError(
            f"{display}: {label} must be a positive integer in Hz, got {rate!r}",
            source=display,
            reason="bad_argument",
        )
    return int(rate)


@dataclass(frozen=True)
class Limit:
    """A length limit, and the setting that raises it: the one named when audio is over it."""

    seconds: float
    setting: str

    def samples(self, sample_rate: int) -> int:
        return int(self.seconds * sample_rate)


def length_limit(max_seconds: float | None, setting: str, display: str) -> Limit | None:
    if max_seconds is None:
        return None
    if not max_seconds > 0:
        raise AudioError(
            f"{display}: max_seconds must be positive or None (no limit), got {max_seconds!r}",
            source=display,
            reason="bad_argument",
        )
    return Limit(max_seconds, setting)


def check_not_too_long(n_samples: int, sample_rate: int, limit: Limit | None, display: str) -> None:
    if limit is not None and n_samples > limit.samples(sample_rate):
        raise_too_long(display, limit, n_samples / sample_rate)


def raise_too_long(display: str, limit: Limit, seconds: float | None) -> NoReturn:
    # seconds is None when decoding stopped at the limit and the container does not state its duration.
    length = f"is over {limit.seconds:g} s" if seconds is None else f"is {seconds:.1f} s"
    raise AudioError(
        f"{display} {length}; the limit is {limit.seconds:g} s (set {limit.setting})",
        source=display,
        reason="too_long",
    )


def check_finite(x: np.ndarray, display: str) -> None:
    finite = np.isfinite(x)
    if not finite.all():
        bad = int(x.size - np.count_nonzero(finite))
        raise AudioError(
            f"{display} contains {bad} NaN/inf samples; audio must be finite (check how it was produced)",
            source=display,
            reason="non_finite",
        )


def _check_not_too_short(samples: np.ndarray, display: str) -> None:
    n = samples.shape[0]
    if n < MIN_SAMPLES:
        raise AudioError(
            f"{display} is {n / SAMPLE_RATE:.3f} s ({n} samples at 16 kHz); at least "
            f"{MIN_SAMPLES / SAMPLE_RATE:.3f} s ({MIN_SAMPLES} samples) is needed",
            source=display,
            reason="too_short",
        )
