"""Hostile bytes: random mutations and truncations of valid WAV, FLAC, MP3, OGG and M4A files decode to a
result or fail with an AudioError (a 4xx in the API) - nothing else, in bounded time."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emoserve.audio.decode import Audio, load_audio
from emoserve.errors import AudioError
from tests.support.audio import encode_with_pyav
from tests.support.paths import FIXTURE

SECONDS_PER_DECODE = 10.0  # a generous bound on a loaded 2-core runner; valid clips take milliseconds
EXAMPLES = 100  # per format in ./test.sh (a few seconds)


def valid_files(tmp: Path) -> dict[str, bytes]:
    audio = FIXTURE / "audio"
    files = {
        "wav": (audio / "en_1s_16k.wav").read_bytes(),
        "flac": (audio / "en_7s_16k.flac").read_bytes(),
        "mp3": (audio / "en_3s_44k.mp3").read_bytes(),
        "ogg": (audio / "zh_1s_16k.ogg").read_bytes(),
    }
    wave = np.sin(np.arange(16000) / 10).astype(np.float32) * 0.3
    encode_with_pyav(tmp / "clip.m4a", "mp4", "aac", wave[:, None], 16000, 16000)
    files["m4a"] = (tmp / "clip.m4a").read_bytes()
    return files


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return valid_files(tmp_path_factory.mktemp("fuzz"))


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    """Overwrite bytes (position as a fraction of the length, biased to the header) and maybe truncate."""
    out = bytearray(data)
    for position, value in edits:
        out[position % min(len(out), 4096 if position % 2 else len(out))] = value
    return bytes(out[: cut % len(out)] if cut is not None else out)


@pytest.mark.parametrize("kind", ["wav", "flac", "mp3", "ogg", "m4a"])
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples in every run: a failure here reproduces
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), max_size=8),
    cut=st.none() | st.integers(0, 10**9),
)
def test_mutated_audio_is_a_result_or_an_audio_error(
    originals: dict[str, bytes], kind: str, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = mutate(originals[kind], edits, cut)
    started = time.monotonic()
    try:
        audio = load_audio(data, max_seconds=60.0)
    except AudioError as error:
        assert error.status < 500 and str(error)
    else:
        assert isinstance(audio, Audio) and audio.samples.dtype == np.float32
        assert np.isfinite(audio.samples).all() and len(audio.samples) >= 400
    assert time.monotonic() - started < SECONDS_PER_DECODE
