"""The Pipecat integration (integrations/pipecat.py) in a real Pipecat pipeline, driven by Pipecat's own
test utilities with the fixtures' audio in 20 ms frames, VAD frames and transcriptions."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pipecat", reason="the pipecat extra is not installed (pip install 'emoserve[pipecat]')")

from pipecat.frames.frames import (
    InputAudioRawFrame,
    InterruptionFrame,
    LLMMessagesAppendFrame,
    TranscriptionFrame,
    UserAudioRawFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.tests.utils import SleepFrame, run_test

from emoserve.agents import LocalBackend
from emoserve.integrations.pipecat import EmotionFrame, EmotionProcessor
from tests.support.agents import SlowBackend, clip_pcm, frames, turn_reading
from tests.support.audio import RATE
from tests.support.paths import MODEL
from tests.support.server import first_answer, first_answer_with, serve_process

SCORE_TOL = 1e-5
PATIENT = 30.0  # a timeout the tiny model never reaches: the turn's own reading


def audio(pcm: bytes, **kwargs: Any) -> list[InputAudioRawFrame]:
    return [InputAudioRawFrame(audio=f, sample_rate=RATE, num_channels=1, **kwargs) for f in frames(pcm)]


def turn(pcm: bytes, text: str = "I want a refund", pause_s: float = 0.6) -> list[Any]:
    """A user turn as a transport, its VAD and an STT deliver it: the VAD's start, the audio, a pause in
    which the turn's interim readings come in, the VAD's stop, the final transcription."""
    return [
        VADUserStartedSpeakingFrame(),
        *audio(pcm),
        SleepFrame(sleep=pause_s),
        VADUserStoppedSpeakingFrame(),
        TranscriptionFrame(text=text, user_id="caller", timestamp="now", finalized=True),
    ]


def run(processor: EmotionProcessor, frames_to_send: list[Any]) -> list[Any]:
    down, _ = asyncio.run(run_test(processor, frames_to_send=frames_to_send))
    return list(down)


def of(kind: type, frames_out: list[Any]) -> list[Any]:
    return [f for f in frames_out if isinstance(f, kind)]


def assert_scored_as(reading: dict[str, Any], expected: Any) -> None:
    assert reading["emotion"] == expected.emotion
    for label, score in expected.scores.items():
        assert reading["scores"][label] == pytest.approx(score, abs=SCORE_TOL)


def test_the_transcription_comes_after_the_reading_and_carries_it(tiny_recognizer: Any) -> None:
    pcm = clip_pcm("zh_3s_16k.wav")
    processor = EmotionProcessor(model=tiny_recognizer, timeout=PATIENT)
    told: list[Any] = []

    @processor.event_handler("on_emotion")
    async def on_emotion(_: Any, reading: Any) -> None:
        told.append(reading)

    out = run(processor, turn(pcm))
    kinds = [type(f) for f in out if not isinstance(f, InputAudioRawFrame)]
    assert kinds == [
        VADUserStartedSpeakingFrame,
        VADUserStoppedSpeakingFrame,
        EmotionFrame,
        TranscriptionFrame,
    ]
    assert len(of(InputAudioRawFrame, out)) == len(frames(pcm))  # every frame passes on
    (emotion,) = of(EmotionFrame, out)
    (transcription,) = of(TranscriptionFrame, out)
    reading = emotion.reading
    assert transcription.text == f"{reading.for_llm()} I want a refund"
    assert transcription.metadata["emoserve"] == reading.to_dict()
    assert_scored_as(reading.to_dict(), turn_reading(tiny_recognizer, pcm))
    assert not reading.interim and reading.random_weights is tiny_recognizer.random_weights
    assert ("random-test-weights" in transcription.text) is reading.random_weights
    assert reading.end_s - reading.start_s == pytest.approx(len(pcm) / 2 / RATE, abs=1e-6)
    assert told == [reading]


def test_context_mode_puts_a_system_message_before_the_words(tiny_recognizer: Any) -> None:
    processor = EmotionProcessor(model=tiny_recognizer, timeout=PATIENT, inject="context")
    out = run(processor, turn(clip_pcm("zh_3s_16k.wav")))
    kinds = [type(f) for f in out if not isinstance(f, InputAudioRawFrame | VADUserStartedSpeakingFrame)]
    assert kinds[-3:] == [EmotionFrame, LLMMessagesAppendFrame, TranscriptionFrame]
    (append,) = of(LLMMessagesAppendFrame, out)
    (transcription,) = of(TranscriptionFrame, out)
    (emotion,) = of(EmotionFrame, out)
    assert transcription.text == "I want a refund" and append.run_llm is False
    assert (
        append.messages[0]["role"] == "system" and emotion.reading.for_llm() in append.messages[0]["content"]
    )
    assert transcription.metadata["emoserve"]["emotion"] == emotion.reading.emotion


def test_a_slow_backend_lets_the_transcription_through_at_the_timeout_with_the_interim(
    tiny_recognizer: Any,
) -> None:
    processor = EmotionProcessor(backend=SlowBackend(LocalBackend(tiny_recognizer), 3.0), timeout=0.3)
    started = time.monotonic()
    out = run(processor, turn(clip_pcm("zh_3s_16k.wav")))
    (transcription,) = of(TranscriptionFrame, out)
    reading = transcription.metadata["emoserve"]
    assert reading["interim"] is True and reading["latency_s"] >= 0.3
    assert transcription.text.startswith("[emotion ") and transcription.text.endswith("I want a refund")
    assert time.monotonic() - started < 3.0  # it did not wait for the late reading


def test_a_short_turn_is_not_read(tiny_recognizer: Any) -> None:
    processor = EmotionProcessor(model=tiny_recognizer, timeout=PATIENT, min_speech_s=0.8)
    out = run(processor, turn(clip_pcm("en_1s_16k.wav")[: int(0.6 * RATE) * 2], pause_s=0.2))
    assert of(EmotionFrame, out) == []
    (transcription,) = of(TranscriptionFrame, out)
    assert transcription.text == "I want a refund" and "emoserve" not in transcription.metadata


def test_an_interruption_starts_the_turn_again(tiny_recognizer: Any) -> None:
    before, after = clip_pcm("en_3s_8k.wav"), clip_pcm("zh_3s_16k.wav")
    processor = EmotionProcessor(model=tiny_recognizer, timeout=PATIENT)
    out = run(
        processor,
        [
            VADUserStartedSpeakingFrame(),
            *audio(before),
            InterruptionFrame(),
            *turn(after)[1:],
        ],
    )
    (emotion,) = of(EmotionFrame, out)
    assert emotion.reading.start_s == pytest.approx(len(before) / 2 / RATE, abs=1e-6)
    assert_scored_as(emotion.reading.to_dict(), turn_reading(tiny_recognizer, after))
    assert of(InterruptionFrame, out)  # passed on


def test_audio_of_other_tracks_is_left_out(tiny_recognizer: Any) -> None:
    caller, other = clip_pcm("zh_3s_16k.wav"), clip_pcm("en_3s_8k.wav")[: len(clip_pcm("zh_3s_16k.wav"))]
    mixed: list[Any] = []
    for mine, theirs in zip(frames(caller), frames(other), strict=False):
        mixed.append(UserAudioRawFrame(audio=mine, sample_rate=RATE, num_channels=1, user_id="caller"))
        mixed.append(UserAudioRawFrame(audio=theirs, sample_rate=RATE, num_channels=1, user_id="other"))
    processor = EmotionProcessor(model=tiny_recognizer, timeout=PATIENT, user_id="caller")
    out = run(processor, [VADUserStartedSpeakingFrame(), *mixed, *turn(b"")[1:]])
    (emotion,) = of(EmotionFrame, out)
    assert_scored_as(emotion.reading.to_dict(), turn_reading(tiny_recognizer, caller))
    assert len(of(UserAudioRawFrame, out)) == len(mixed)  # all passed on, the other's too


@pytest.mark.slow
def test_the_remote_backend_on_emoserve_serve_gives_the_in_process_scores(
    tiny_recognizer: Any, tmp_path: Path
) -> None:
    pcm = clip_pcm("zh_3s_16k.wav")
    local = of(EmotionFrame, run(EmotionProcessor(model=tiny_recognizer, timeout=PATIENT), turn(pcm)))
    started = time.monotonic()
    with serve_process(tmp_path, "--model", str(MODEL)) as (_, url):
        first_answer(f"{url}/healthz", started, timeout_s=120)
        first_answer_with(f"{url}/readyz", 200, timeout_s=120)
        remote = of(EmotionFrame, run(EmotionProcessor(url=url, timeout=PATIENT), turn(pcm)))
    assert len(local) == len(remote) == 1
    assert remote[0].reading.emotion == local[0].reading.emotion and not remote[0].reading.interim
    for label, score in local[0].reading.scores.items():
        assert remote[0].reading.scores[label] == pytest.approx(score, abs=SCORE_TOL)


def test_without_a_vad_the_user_turn_frames_decide_the_turn(tiny_recognizer: Any) -> None:
    pcm = clip_pcm("zh_3s_16k.wav")
    frames_to_send = [
        UserStartedSpeakingFrame(),
        *audio(pcm),
        SleepFrame(sleep=0.6),
        UserStoppedSpeakingFrame(),
        TranscriptionFrame(text="I want a refund", user_id="caller", timestamp="now", finalized=True),
    ]
    out = run(EmotionProcessor(model=tiny_recognizer, timeout=PATIENT), frames_to_send)
    (emotion,) = of(EmotionFrame, out)
    (transcription,) = of(TranscriptionFrame, out)
    assert transcription.text == f"{emotion.reading.for_llm()} I want a refund"
    assert_scored_as(emotion.reading.to_dict(), turn_reading(tiny_recognizer, pcm))


def test_a_bad_inject_option_is_refused(tiny_recognizer: Any) -> None:
    with pytest.raises(ValueError, match="inject is 'suffix'"):
        EmotionProcessor(model=tiny_recognizer, inject="suffix")  # type: ignore[arg-type]
