"""A turn read in pieces (StreamOptions.chunk_s) by the library's stream: its reading is the frames of its
pieces pooled and scored by the classifier, as docs/streaming.md defines it; a turn no longer than chunk_s
is scored whole."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from emoserve.audio.live import TurnPiece
from emoserve.constants import MIN_SAMPLES
from emoserve.inference.live import TurnPool
from tests.support.audio import RATE, clip

SCORE_TOL = 1e-5


def pcm(x: np.ndarray) -> bytes:
    return np.clip(np.round(x * 32768), -32768, 32767).astype("<i2").tobytes()


def samples(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<i2").astype(np.float32) / np.float32(32768)


def test_a_pool_takes_the_frames_whose_centre_is_in_the_pieces_own_audio() -> None:
    frames = np.arange(200, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    pool = TurnPool(320)
    first = TurnPiece(0, 0, 0, 2 * RATE, np.zeros(0, np.float32))
    pool.add(first, frames[:99])  # no context: every frame is the piece's
    later = TurnPiece(0, RATE, 2 * RATE, 4 * RATE, np.zeros(0, np.float32))
    pool.add(later, frames[:149])  # 1 s of context: frame k's centre k*320 + 200 >= 16000 from k = 50
    assert math.ceil((RATE - MIN_SAMPLES // 2) / 320) == 50
    assert (pool.frames, pool.pieces, pool.start, pool.end) == (99 + 99, 2, 0, 4 * RATE)
    expected = (frames[:99].sum(0) + frames[50:149].sum(0)) / 198
    np.testing.assert_allclose(pool.pooled(), expected, rtol=1e-6)


def test_a_turn_read_in_pieces_pools_its_pieces_frames(tiny_recognizer: Any) -> None:
    audio = pcm(np.concatenate([clip("zh_3s_16k.wav"), clip("en_3s_8k.wav")]))
    stream = tiny_recognizer.stream(use_vad=False, chunk_s=2.0)
    messages = [m for at in range(0, len(audio), 4000) for m in stream.feed(audio[at : at + 4000])]
    messages += stream.flush("t")
    kinds = [m["type"] for m in messages]
    n = len(audio) // 2 - 256  # the resampler's held-back samples come with the flush
    pieces = math.ceil(n / (2 * RATE))
    assert kinds[0] == "speech_start" and kinds[-1] == "segment"
    interims = [m for m in messages if m["type"] == "interim"]
    assert [(m["start_s"], m["end_s"]) for m in interims] == [(0.0, 2.0 * (i + 1)) for i in range(pieces - 1)]
    segment = messages[-1]
    assert segment["pieces"] == pieces and segment["turn_id"] == "t"
    assert (segment["start_s"], segment["end_s"]) == (0.0, len(audio) / 2 / RATE)

    # the definition, computed here from the model's frame features on each piece's window
    x, total, count = samples(audio), None, 0
    for k in range(pieces):
        start, end = 2 * RATE * k, min(2 * RATE * (k + 1), len(x))
        window = max(0, start - RATE)
        frames = tiny_recognizer.predict(x[window:end], "frame", embedding=True, sample_rate=RATE).embedding
        own = frames[math.ceil((start - window - MIN_SAMPLES // 2) / 320) if start > window else 0 :]
        total = own.sum(0) if total is None else total + own.sum(0)
        count += len(own)
    expected = tiny_recognizer.pooled_result(total / count, len(x) / RATE)
    assert segment["emotion"] == expected.emotion
    for label, score in expected.scores.items():
        assert segment["scores"][label] == pytest.approx(score, abs=SCORE_TOL)


def test_a_turn_no_longer_than_chunk_s_is_scored_whole(tiny_recognizer: Any) -> None:
    audio = pcm(clip("zh_3s_16k.wav"))
    stream = tiny_recognizer.stream(use_vad=False, chunk_s=5.0)
    messages = stream.feed(audio) + stream.flush()
    assert [m["type"] for m in messages] == ["speech_start", "segment"]
    assert "pieces" not in messages[-1]
    whole = tiny_recognizer.predict(samples(audio), sample_rate=RATE)
    for label, score in whole.scores.items():
        assert messages[-1]["scores"][label] == pytest.approx(score, abs=SCORE_TOL)


def test_a_pooled_reading_is_read_out_as_the_stream_asks(tiny_recognizer: Any) -> None:
    """Label subsets and the abstain threshold apply to a turn read in pieces as to any reading."""
    audio = pcm(np.concatenate([clip("zh_3s_16k.wav"), clip("en_3s_8k.wav")]))
    stream = tiny_recognizer.stream(use_vad=False, chunk_s=2.0, labels="angry,happy,neutral,sad")
    segment = (stream.feed(audio) + stream.flush())[-1]
    assert set(segment["scores"]) == {"angry", "happy", "neutral", "sad"}
    assert sum(segment["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    unsure = tiny_recognizer.stream(use_vad=False, chunk_s=2.0, min_confidence=0.99)
    assert (unsure.feed(audio) + unsure.flush())[-1]["emotion"] == "uncertain"
