"""emoserve.audio: decoding matches the reference's waves; every input kind and every error."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from emoserve.audio import decode as audio_module
from emoserve.audio.decode import Audio, load_audio, resample, to_mono
from emoserve.constants import MIN_SAMPLES, SAMPLE_RATE
from emoserve.errors import AudioError
from tests.support.audio import encode_with_pyav
from tests.support.paths import AUDIO, WAVES

# Formats the reference decoded with the same libsndfile as ours, so they must match bit for bit.
LOSSLESS_MATCH_CLIPS = sorted(p.name for p in AUDIO.glob("*") if p.suffix in {".wav", ".flac", ".ogg"})
STEREO_44K = "en_3s_44k_stereo.wav"
MONO_1S = "en_1s_16k.wav"


def reference_wave(clip: str) -> np.ndarray:
    with np.load(WAVES / f"{clip}.npz") as npz:
        return npz["wave"]


def assert_same_samples(actual: Audio, expected: np.ndarray, atol: float = 0.0) -> None:
    assert actual.samples.shape == expected.shape
    assert float(np.abs(actual.samples - expected).max()) <= atol


def lag_and_correlation(x: np.ndarray, y: np.ndarray, max_lag: int) -> tuple[int, float]:
    """The shift of x against y (|lag| <= max_lag) with the highest cross-correlation, and their Pearson r."""
    n_fft = 1 << (len(x) + len(y) - 1).bit_length()
    # cross[k] = sum_i x[i + k] * y[i], negative k wrapped to the end.
    cross = np.fft.irfft(np.fft.rfft(x, n_fft) * np.conj(np.fft.rfft(y, n_fft)), n_fft)
    lags = np.r_[0 : max_lag + 1, -max_lag:0]
    lag = int(lags[np.argmax(cross[lags])])
    a, b = (x[lag:], y) if lag >= 0 else (x, y[-lag:])
    n = min(len(a), len(b))
    return lag, float(np.corrcoef(a[:n], b[:n])[0, 1])


def encode_pcm_with_pyav(path: Path, container: str, codec: str, sample_format: str, pcm: np.ndarray) -> None:
    """Write (samples, 2) integer PCM at 44.1 kHz losslessly, in a container libsndfile cannot open."""
    planar = sample_format.endswith("p")
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=44_100, layout="stereo")
        assert isinstance(stream, av.AudioStream)
        data = np.ascontiguousarray(pcm.T) if planar else pcm.reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(data, format=sample_format, layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 44_100, 0, Fraction(1, 44_100)
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)


@contextmanager
def raises_audio_error(reason: str, name: str) -> Iterator[pytest.ExceptionInfo[AudioError]]:
    """An AudioError with this reason whose message and .source name the input."""
    with pytest.raises(AudioError) as info:
        yield info
    assert info.value.reason == reason, str(info.value)
    assert name in str(info.value)
    assert info.value.source == name


# ---------------------------------------------------------------------------------------- reference parity


def test_fixture_clips_are_present() -> None:
    # Guards the parametrised parity test against silently running on nothing.
    assert len(LOSSLESS_MATCH_CLIPS) == 9


@pytest.mark.parametrize("clip", LOSSLESS_MATCH_CLIPS)
def test_path_matches_reference_wave(clip: str) -> None:
    audio = load_audio(AUDIO / clip)
    # Measured: max abs diff 0.0 on every clip (same libsndfile 1.2.2, same soxr, mean before resampling).
    assert_same_samples(audio, reference_wave(clip), atol=1e-6)
    assert audio.samples.dtype == np.float32
    assert audio.samples.flags.c_contiguous
    assert audio.decoder == "soundfile"


def test_mp3_matches_reference_up_to_decoder_delay() -> None:
    # mp3 decoders disagree on encoder delay/padding, so only alignment and shape are promised here.
    # Measured with soundfile 0.14 / libsndfile 1.2.2: identical length (48484), lag 0, max abs diff 0.0.
    audio = load_audio(AUDIO / "en_3s_44k.mp3")
    expected = reference_wave("en_3s_44k.mp3")
    assert abs(len(audio.samples) - len(expected)) <= 1200  # ~2 mp3 frames of 1152 samples at 44.1 kHz
    lag, r = lag_and_correlation(audio.samples, expected, max_lag=1200)
    assert abs(lag) <= 1200
    assert r > 0.99


def test_metadata_of_a_resampled_stereo_clip() -> None:
    audio = load_audio(AUDIO / STEREO_44K)
    assert (audio.original_sample_rate, audio.original_channels) == (44_100, 2)
    assert audio.resampled
    assert audio.container == "WAV"
    assert audio.source == str(AUDIO / STEREO_44K)
    assert audio.original_samples == 132_300
    assert audio.original_duration_s == pytest.approx(3.0)
    assert audio.duration_s == pytest.approx(3.0)


def test_16k_clip_is_not_resampled() -> None:
    audio = load_audio(AUDIO / MONO_1S)
    assert not audio.resampled
    assert (audio.original_sample_rate, audio.original_channels) == (16_000, 1)


# ------------------------------------------------------------------------------------------- input kinds


@pytest.mark.parametrize("clip", [STEREO_44K, "en_7s_16k.flac", "zh_1s_16k.ogg", "en_3s_44k.mp3"])
@pytest.mark.parametrize(
    "wrap", [bytes, bytearray, memoryview, io.BytesIO], ids=["bytes", "bytearray", "memoryview", "BytesIO"]
)
def test_bytes_routes_equal_the_path_route(clip: str, wrap: type) -> None:
    from_path = load_audio(AUDIO / clip)
    from_bytes = load_audio(wrap((AUDIO / clip).read_bytes()))
    np.testing.assert_array_equal(from_bytes.samples, from_path.samples)
    assert from_bytes.decoder == "soundfile"


def test_open_file_object_equals_the_path_route_and_is_named_after_the_file() -> None:
    path = AUDIO / STEREO_44K
    with path.open("rb") as f:
        audio = load_audio(f)
    np.testing.assert_array_equal(audio.samples, load_audio(path).samples)
    assert audio.source == str(path)


def test_bytes_default_name_and_override() -> None:
    data = (AUDIO / MONO_1S).read_bytes()
    assert load_audio(data).source == "<bytes>"
    assert load_audio(data, name="upload.wav").source == "upload.wav"


@pytest.mark.parametrize("dtype", ["float32", "float64", "int16", "int32"])
@pytest.mark.parametrize("layout", ["samples_channels", "channels_samples", "tuple"])
def test_arrays_equal_the_path_route(dtype: str, layout: str) -> None:
    pcm, rate = sf.read(AUDIO / STEREO_44K, dtype=dtype, always_2d=True)  # (samples, 2)
    if layout == "samples_channels":
        audio = load_audio(pcm, sample_rate=rate)
    elif layout == "channels_samples":
        audio = load_audio(pcm.T, sample_rate=rate)  # (2, samples), the torch layout
    else:
        audio = load_audio((pcm, rate))
    # int16 / 32768 and int32 / 2**31 are exact for PCM16 data, so even the integer routes match bit for bit.
    np.testing.assert_array_equal(audio.samples, load_audio(AUDIO / STEREO_44K).samples)
    assert (audio.decoder, audio.container, audio.original_channels) == ("array", None, 2)


def test_uint8_array_is_centred_on_128() -> None:
    pcm = np.array([0, 64, 128, 192, 255] * 100, dtype=np.uint8)
    audio = load_audio(pcm, sample_rate=SAMPLE_RATE)
    np.testing.assert_array_equal(audio.samples[:5], np.array([-1.0, -0.5, 0.0, 0.5, 127 / 128], np.float32))


def test_mono_array_is_copied() -> None:
    wave = reference_wave(MONO_1S).copy()
    audio = load_audio(wave, sample_rate=SAMPLE_RATE)
    np.testing.assert_array_equal(audio.samples, wave)
    wave[:] = 0
    assert np.any(audio.samples != 0)


def test_to_mono_averages_either_layout() -> None:
    stereo = np.stack([np.ones(1000, np.float32), np.zeros(1000, np.float32)], axis=1)  # (samples, 2)
    np.testing.assert_array_equal(to_mono(stereo), np.full(1000, 0.5, np.float32))
    np.testing.assert_array_equal(to_mono(stereo.T), np.full(1000, 0.5, np.float32))
    assert to_mono(stereo).dtype == np.float32
    # A short first axis with an equally short second axis stays (samples, channels).
    np.testing.assert_array_equal(to_mono(np.ones((4, 3), np.float32)), np.ones(4, np.float32))
    pcm16 = np.array([16384, -32768], np.int16)
    np.testing.assert_array_equal(to_mono(pcm16), np.array([0.5, -1.0], np.float32))


@pytest.mark.parametrize(
    ("n", "orig_sr", "n_out"), [(133_632, 44_100, 48_484), (24_000, 8_000, 48_000), (7, 44_100, 3)]
)
def test_resample_length_is_librosas_ceil(n: int, orig_sr: int, n_out: int) -> None:
    rng = np.random.default_rng(0)
    y = resample(rng.standard_normal(n).astype(np.float32), orig_sr)
    assert y.shape == (n_out,)
    assert y.dtype == np.float32


def test_resample_keeps_channels_and_skips_equal_rates() -> None:
    x = np.random.default_rng(0).standard_normal((4410, 2)).astype(np.float32)
    assert resample(x, 44_100).shape == (1600, 2)
    np.testing.assert_array_equal(resample(x, 16_000, 16_000), x)


# ------------------------------------------------------------------------------------------------- PyAV


def test_m4a_aac_decodes_with_pyav(tmp_path: Path) -> None:
    wave = reference_wave(MONO_1S)
    path = tmp_path / "speech.m4a"
    encode_with_pyav(path, "mp4", "aac", wave[:, None], SAMPLE_RATE, SAMPLE_RATE)
    audio = load_audio(path)
    assert audio.decoder == "pyav"
    assert audio.container is not None and "mp4" in audio.container
    # The edit list removes the 1024-sample priming; the tail is padded to whole 1024-sample AAC frames
    # (measured: 16384 samples, lag 0, r = 0.9995).
    assert len(wave) <= len(audio.samples) < len(wave) + 1024
    lag, r = lag_and_correlation(audio.samples, wave, max_lag=2048)
    assert lag == 0
    assert r > 0.99
    np.testing.assert_array_equal(load_audio(path.read_bytes()).samples, audio.samples)


def test_opus_in_webm_decodes_with_pyav(tmp_path: Path) -> None:
    wave = reference_wave(MONO_1S)
    path = tmp_path / "speech.webm"
    encode_with_pyav(path, "webm", "libopus", wave[:, None], SAMPLE_RATE, 48_000)
    audio = load_audio(path)
    assert (audio.decoder, audio.original_sample_rate, audio.resampled) == ("pyav", 48_000, True)
    # Pre-skip and end trimming come from the container (measured: 16000 samples, lag 0, r = 0.9995).
    assert abs(len(audio.samples) - len(wave)) <= 320  # 20 ms, one Opus frame
    lag, r = lag_and_correlation(audio.samples, wave, max_lag=2048)
    assert lag == 0
    assert r > 0.99


@pytest.mark.parametrize(
    ("container", "codec", "sample_format"),
    [("matroska", "pcm_s16le", "s16"), ("nut", "pcm_s16le_planar", "s16p"), ("matroska", "flac", "s16")],
    ids=["packed", "planar", "flac-in-mka"],
)
def test_lossless_pyav_route_matches_reference_exactly(
    tmp_path: Path, container: str, codec: str, sample_format: str
) -> None:
    # Lossless stereo PCM through PyAV: any planar/packed mix-up or wrong int scaling breaks bit equality.
    pcm, _ = sf.read(AUDIO / STEREO_44K, dtype="int16", always_2d=True)
    path = tmp_path / f"speech.{container}"
    encode_pcm_with_pyav(path, container, codec, sample_format, pcm)
    audio = load_audio(path)
    assert (audio.decoder, audio.original_channels, audio.original_samples) == ("pyav", 2, 132_300)
    assert_same_samples(audio, reference_wave(STEREO_44K))


# ------------------------------------------------------------------------------------------------ errors


def test_audio_error_is_a_value_error() -> None:
    assert issubclass(AudioError, ValueError)


def test_empty_bytes() -> None:
    with raises_audio_error("empty", "<bytes>"):
        load_audio(b"")


def test_empty_file_object() -> None:
    with raises_audio_error("empty", "upload.wav"):
        load_audio(io.BytesIO(), name="upload.wav")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    path.touch()
    with raises_audio_error("empty", str(path)):
        load_audio(path)


def test_wav_cut_in_its_samples_is_truncated(tmp_path: Path) -> None:
    whole = (AUDIO / "zh_3s_16k.wav").read_bytes()
    path = tmp_path / "cut.wav"
    path.write_bytes(whole[: len(whole) // 2])
    with raises_audio_error("truncated", str(path)) as err:
        load_audio(path)
    assert f"declares {len(whole)} bytes" in str(err.value)
    with raises_audio_error("truncated", "upload.wav"):
        load_audio(io.BytesIO(whole[:-2]), name="upload.wav")
    assert len(load_audio(whole).samples) == 48_000  # the whole file is fine


def test_empty_array() -> None:
    with raises_audio_error("empty", "<array>"):
        load_audio(np.zeros(0, np.float32), sample_rate=SAMPLE_RATE)


def test_valid_file_with_zero_samples(tmp_path: Path) -> None:
    path = tmp_path / "no_frames.wav"
    sf.write(path, np.zeros(0, np.float32), SAMPLE_RATE)
    with raises_audio_error("empty", str(path)):
        load_audio(path)


def test_undecodable_bytes_give_both_decoders_reasons() -> None:
    with raises_audio_error("undecodable", "clip.xyz") as info:
        load_audio(b"this is not audio " * 100, name="clip.xyz")
    message = str(info.value)
    assert "soundfile: Format not recognised" in message
    assert "pyav: Invalid data found when processing input" in message
    assert "Supported:" in message


def test_undecodable_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.wav"
    path.write_text("not a wav file\n" * 50)
    with raises_audio_error("undecodable", str(path)):
        load_audio(path)


def test_video_without_audio_stream(tmp_path: Path) -> None:
    path = tmp_path / "silent_video.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with raises_audio_error("undecodable", str(path)) as info:
        load_audio(path)
    assert "no audio stream" in str(info.value)


def test_nan_in_array() -> None:
    samples = np.zeros(16_000, np.float32)
    samples[100] = np.nan
    with raises_audio_error("non_finite", "<array>"):
        load_audio(samples, sample_rate=SAMPLE_RATE)


def test_inf_in_float_wav(tmp_path: Path) -> None:
    path = tmp_path / "inf.wav"
    samples = np.zeros(16_000, np.float32)
    samples[5] = np.inf
    sf.write(path, samples, SAMPLE_RATE, subtype="FLOAT")
    with raises_audio_error("non_finite", str(path)):
        load_audio(path)


def test_too_short_message() -> None:
    with pytest.raises(AudioError) as info:
        load_audio(np.zeros(200, np.float32), sample_rate=SAMPLE_RATE, name="blip.wav")
    assert info.value.reason == "too_short"
    assert str(info.value) == (
        "blip.wav is 0.013 s (200 samples at 16 kHz); at least 0.025 s (400 samples) is needed"
    )


def test_too_short_is_judged_after_resampling() -> None:
    # The minimum counts samples at 16 kHz: 150 at 8 kHz become 300 (too few), 200 become exactly 400.
    with raises_audio_error("too_short", "<array>"):
        load_audio(np.zeros(150, np.float32), sample_rate=8_000)
    assert len(load_audio(np.zeros(200, np.float32), sample_rate=8_000).samples) == MIN_SAMPLES
    assert len(load_audio(np.zeros(MIN_SAMPLES, np.float32), sample_rate=SAMPLE_RATE).samples) == MIN_SAMPLES


def test_too_long_wav_message() -> None:
    path = AUDIO / "en_31s_16k.wav"
    with pytest.raises(AudioError) as info:
        load_audio(path, max_seconds=30)
    assert info.value.reason == "too_long"
    assert str(info.value) == f"{path} is 31.0 s; the limit is 30 s (set max_seconds / --max-seconds)"


def test_too_long_file_is_refused_from_its_header(monkeypatch: pytest.MonkeyPatch) -> None:
    # WAV/FLAC/Ogg state their length exactly, so a long file is refused before any sample is decoded.
    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded a file its header already showed to be too long")

    monkeypatch.setattr(sf.SoundFile, "read", no_decoding)
    with raises_audio_error("too_long", str(AUDIO / "en_7s_16k.flac")):
        load_audio(AUDIO / "en_7s_16k.flac", max_seconds=5)


def test_too_long_mp3_stops_at_the_limit() -> None:
    with raises_audio_error("too_long", str(AUDIO / "en_3s_44k.mp3")):
        load_audio(AUDIO / "en_3s_44k.mp3", max_seconds=2)


def test_too_long_array_and_no_limit() -> None:
    samples = np.zeros(3 * SAMPLE_RATE, np.float32)
    with raises_audio_error("too_long", "<array>"):
        load_audio(samples, sample_rate=SAMPLE_RATE, max_seconds=2.5)
    assert load_audio(samples, sample_rate=SAMPLE_RATE, max_seconds=None).duration_s == 3.0


def test_too_long_via_pyav_stops_decoding_at_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "speech.m4a"
    encode_with_pyav(path, "mp4", "aac", reference_wave(MONO_1S)[:, None], SAMPLE_RATE, SAMPLE_RATE)
    converted = audio_module.frame_to_float32
    decoded_frames: list[object] = []

    def counting(frame: av.AudioFrame) -> np.ndarray:
        decoded_frames.append(frame)
        return converted(frame)

    monkeypatch.setattr(audio_module, "frame_to_float32", counting)
    with raises_audio_error("too_long", str(path)):
        load_audio(path, max_seconds=0.25)
    # 0.25 s is 4000 samples: the 4th 1024-sample AAC frame crosses the limit, of 16 in the file.
    assert len(decoded_frames) == 4


def test_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.wav"
    with raises_audio_error("not_found", str(path)):
        load_audio(path)


def test_directory_path(tmp_path: Path) -> None:
    with raises_audio_error("not_found", str(tmp_path)):
        load_audio(tmp_path)


@pytest.mark.parametrize("rate", [0, -16_000, 16_000.5, "16000", True])
def test_bad_sample_rate(rate: object) -> None:
    with raises_audio_error("bad_argument", "<array>"):
        load_audio(np.zeros(1000, np.float32), sample_rate=rate)  # type: ignore[arg-type]


def test_array_without_sample_rate() -> None:
    with raises_audio_error("bad_argument", "<array>"):
        load_audio(np.zeros(1000, np.float32))


def test_tuple_with_bad_rate_or_disagreeing_sample_rate() -> None:
    with raises_audio_error("bad_argument", "<array>"):
        load_audio((np.zeros(1000, np.float32), 0))
    with raises_audio_error("bad_argument", "<array>"):
        load_audio((np.zeros(1000, np.float32), 16_000), sample_rate=8_000)


def test_sample_rate_with_encoded_input() -> None:
    with raises_audio_error("bad_argument", str(AUDIO / MONO_1S)):
        load_audio(AUDIO / MONO_1S, sample_rate=16_000)


def test_bad_max_seconds() -> None:
    with raises_audio_error("bad_argument", "<bytes>"):
        load_audio(b"RIFF", max_seconds=0)


@pytest.mark.parametrize(
    "array",
    [np.zeros((2, 2, 1000), np.float32), np.zeros(1000, np.complex64), np.zeros(1000, np.int64)],
    ids=["3-D", "complex", "int64"],
)
def test_unsupported_arrays(array: np.ndarray) -> None:
    with raises_audio_error("bad_argument", "<array>"):
        load_audio(array, sample_rate=SAMPLE_RATE)


def test_text_mode_file_object(tmp_path: Path) -> None:
    path = tmp_path / "text.wav"
    path.write_text("x")
    with path.open("r") as f, raises_audio_error("bad_argument", str(path)):
        load_audio(f)  # type: ignore[arg-type]


def test_unsupported_input_type() -> None:
    with raises_audio_error("bad_argument", "my list"):
        load_audio([0.0] * 1000, name="my list")  # type: ignore[arg-type]


def wav_with_header(
    fmt: int = 1, channels: int = 1, rate: int = 16000, bits: int = 16, block: int = 2
) -> bytes:
    """A WAV whose fmt chunk says what it is told to, in front of 1 s of valid 16-bit samples."""
    data = (np.sin(np.arange(16000) / 10) * 10000).astype("<i2").tobytes()
    fmt_chunk = struct.pack("<HHIIHH", fmt, channels, rate, (rate * block) & 0xFFFFFFFF, block, bits)
    body = b"WAVEfmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk + b"data"
    body += struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"fmt": 0x1234}, "undecodable"),  # an unknown format code (PyAV failed on it with AttributeError)
        ({"fmt": 3, "bits": 16}, "undecodable"),  # 16-bit float does not exist
        ({"bits": 0, "block": 0}, "undecodable"),
        ({"bits": 64, "block": 8}, "undecodable"),
        ({"channels": 0, "block": 0}, "undecodable"),
        ({"rate": 0}, "undecodable"),
        ({"bits": 3, "block": 1}, "malformed"),  # libsndfile decoded this as 8-bit garbage: a "result"
        ({"block": 7}, "malformed"),
    ],
)
def test_malformed_wav_headers_are_audio_errors_never_a_result(header: dict[str, int], reason: str) -> None:
    with pytest.raises(AudioError) as info:
        load_audio(wav_with_header(**header))
    assert info.value.reason == reason and info.value.status < 500, str(info.value)


def test_audio_whose_format_changes_mid_stream_gets_one_code_whole_or_in_blocks(tmp_path: Path) -> None:
    """Two ADTS AAC streams back to back (16 kHz mono, then 44.1 kHz stereo): load_audio said 415
    unsupported_audio and the streamed reader 400 malformed_audio for the same file."""
    from emoserve.audio.stream import AudioStream

    rng = np.random.default_rng(0)
    parts = []
    for n, (rate, channels) in enumerate([(16_000, 1), (44_100, 2)]):
        part = tmp_path / f"{n}.aac"
        samples = rng.uniform(-0.3, 0.3, (rate * 2, channels)).astype(np.float32)
        encode_with_pyav(part, "adts", "aac", samples, rate, rate)
        parts.append(part.read_bytes())
    path = tmp_path / "changes.aac"
    path.write_bytes(b"".join(parts))
    with pytest.raises(AudioError) as whole:
        load_audio(path)
    with pytest.raises(AudioError) as blocks, AudioStream(path) as stream:
        list(stream.blocks())
    assert (whole.value.code, whole.value.status) == (blocks.value.code, blocks.value.status)
    assert whole.value.code == "malformed_audio" and "mid-stream" in str(whole.value)
    assert str(whole.value) == str(blocks.value)
