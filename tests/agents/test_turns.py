"""The turn reader (agents/turns.py) on its two backends: one reading per turn, scored as the library scores
the turn's audio; short turns unread; the timeout's interim fallback; the latency from "stopped"."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emoserve.agents import EmotionReading, LocalBackend, RemoteBackend, Turn, TurnReader, backend_for
from tests.support.agents import SlowBackend, clip_pcm, frames, pcm_samples, silence, turn_reading
from tests.support.audio import RATE
from tests.support.server import LIVE, Live, live_server

SCORE_TOL = 1e-5
PATIENT = 30.0  # a timeout no turn of the tiny model reaches: the turn's own reading, always


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_server(dataclasses.replace(LIVE, max_audio_s=60.0), tmp_path_factory.mktemp("home")) as live:
        yield live


async def speak(
    reader: TurnReader,
    pcm: bytes,
    *,
    before_s: float = 0.3,
    rate: int = RATE,
    channels: int = 1,
    pause_s: float = 0.0,
) -> Turn | None:
    """Silence, "started", the speech in 20 ms frames, `pause_s` (the VAD's wait for silence: the turn's
    interim readings come in), "stopped": the turn."""
    for frame in frames(silence(before_s, rate, channels), rate, channels):
        reader.feed(frame, rate, channels)
    reader.speech_started()
    for frame in frames(pcm, rate, channels):
        reader.feed(frame, rate, channels)
        await asyncio.sleep(0)  # the sender runs while the user speaks
    await asyncio.sleep(pause_s)
    return reader.speech_stopped()


def assert_scored_as(reading: EmotionReading, expected: Any) -> None:
    assert reading.emotion == expected.emotion and not reading.interim
    assert list(reading.scores) == list(expected.scores)
    for label, score in expected.scores.items():
        assert reading.scores[label] == pytest.approx(score, abs=SCORE_TOL)


def test_a_turn_read_in_process_is_scored_as_the_library_scores_its_audio(tiny_recognizer: Any) -> None:
    pcm = clip_pcm("zh_3s_16k.wav")

    async def run() -> tuple[EmotionReading | None, EmotionReading | None]:
        reader = TurnReader(LocalBackend(tiny_recognizer), timeout=PATIENT, chunk_s=0, hop_s=0.5)
        turn = await speak(reader, pcm)
        assert turn is not None
        first = await turn.reading()
        again = await speak(reader, pcm)
        assert again is not None
        second = await again.reading()
        await reader.close()
        return first, second

    first, second = asyncio.run(run())
    assert first is not None and second is not None
    expected = tiny_recognizer.predict(pcm_samples(pcm), sample_rate=RATE)  # chunk_s=0: the turn whole
    assert_scored_as(first, expected)
    assert_scored_as(second, expected)
    seconds = len(pcm) / 2 / RATE
    assert (first.start_s, first.end_s) == pytest.approx((0.3, 0.3 + seconds), abs=1e-6)
    assert second.start_s == pytest.approx(first.end_s + 0.3, abs=1e-6) and (first.turn, second.turn) == (
        1,
        2,
    )
    assert first.random_weights is tiny_recognizer.random_weights and first.model == tiny_recognizer.info.name
    assert 0 <= first.latency_s < PATIENT


def test_the_remote_backend_gives_the_in_process_scores(tiny_recognizer: Any, server: Live) -> None:
    pcm = clip_pcm("en_3s_8k.wav", rate=48_000, channels=2)  # a WebRTC track's format: resampled, mixed
    url = str(server.client.base_url).replace("http://", "ws://")

    async def read(backend: Any) -> EmotionReading | None:
        reader = TurnReader(backend, timeout=PATIENT)
        turn = await speak(reader, pcm, rate=48_000, channels=2)
        assert turn is not None
        reading = await turn.reading()
        await reader.close()
        return reading

    remote = asyncio.run(read(RemoteBackend(url)))
    local = asyncio.run(read(LocalBackend(tiny_recognizer)))
    assert remote is not None and local is not None
    assert remote.emotion == local.emotion and not remote.interim
    for label, score in local.scores.items():
        assert remote.scores[label] == pytest.approx(score, abs=SCORE_TOL)
    assert (remote.start_s, remote.end_s) == (local.start_s, local.end_s)


def test_a_turn_shorter_than_min_speech_s_is_not_read_nor_sent(tiny_recognizer: Any) -> None:
    async def run() -> tuple[Any, bool]:
        reader = TurnReader(LocalBackend(tiny_recognizer), min_speech_s=0.8)
        short = await speak(reader, clip_pcm("en_1s_16k.wav")[: int(0.7 * RATE) * 2])
        await asyncio.sleep(0.1)
        opened = reader._session is not None
        await reader.close()
        return short, opened

    short, opened = asyncio.run(run())
    assert short is None and not opened  # nothing went to the backend: a short turn costs nothing


def test_a_late_reading_falls_back_to_the_newest_interim_marked_as_such(tiny_recognizer: Any) -> None:
    pcm = clip_pcm("zh_3s_16k.wav")

    async def run() -> tuple[Any, float]:
        backend = SlowBackend(LocalBackend(tiny_recognizer), delay_s=5.0)
        reader = TurnReader(backend, timeout=0.3, hop_s=0.5)
        reader.speech_started()
        for frame in frames(pcm):
            reader.feed(frame, RATE)
        await wait_until(lambda: reader.latest() is not None)  # an interim reading, before "stopped"
        turn = reader.speech_stopped()
        loop = asyncio.get_running_loop()
        started = loop.time()
        reading = await turn.reading() if turn is not None else None
        waited = loop.time() - started
        await reader.close()
        return reading, waited

    reading, waited = asyncio.run(run())
    assert reading is not None and reading.interim
    assert 0.25 <= waited < 4.0 and reading.latency_s >= 0.3  # the timeout, counted from "stopped"
    assert reading.end_s - reading.start_s == pytest.approx(len(pcm) / 2 / RATE, abs=1e-6)
    assert reading.for_llm().startswith("[emotion ")


async def wait_until(condition: Any, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_with_no_reading_at_all_the_timeout_gives_none(tiny_recognizer: Any) -> None:
    """A turn whose own reading is late and that had no interim yet (chunk_s longer than the turn)."""

    async def run() -> Any:
        reader = TurnReader(SlowBackend(LocalBackend(tiny_recognizer), 2.0), timeout=0.2, chunk_s=10.0)
        turn = await speak(reader, clip_pcm("zh_3s_16k.wav"))
        reading = await turn.reading() if turn is not None else "no turn"
        await reader.close()
        return reading

    assert asyncio.run(run()) is None


def test_a_reset_forgets_the_audio_so_far(tiny_recognizer: Any) -> None:
    """An interruption: the turn being spoken starts again from the reset."""
    first, second = clip_pcm("en_3s_8k.wav"), clip_pcm("zh_3s_16k.wav")

    async def run() -> Any:
        reader = TurnReader(LocalBackend(tiny_recognizer), timeout=PATIENT)
        reader.speech_started()
        for frame in frames(first):
            reader.feed(frame, RATE)
            await asyncio.sleep(0)
        reader.reset()
        for frame in frames(second):
            reader.feed(frame, RATE)
        turn = reader.speech_stopped()
        reading = await turn.reading() if turn is not None else None
        await reader.close()
        return reading

    reading = asyncio.run(run())
    assert reading is not None and reading.start_s == pytest.approx(len(first) / 2 / RATE, abs=1e-6)
    assert_scored_as(reading, turn_reading(tiny_recognizer, second))


def test_started_late_takes_the_audio_before_it(tiny_recognizer: Any) -> None:
    """A VAD tells "started" once it is sure (Pipecat's start_secs): that much audio before is in the turn."""
    pcm = clip_pcm("zh_3s_16k.wav")
    lead = int(0.2 * RATE) * 2

    async def run() -> Any:
        reader = TurnReader(LocalBackend(tiny_recognizer), timeout=PATIENT)
        for frame in frames(silence(0.5) + pcm[:lead]):
            reader.feed(frame, RATE)
        reader.speech_started(ago_s=0.2)
        for frame in frames(pcm[lead:]):
            reader.feed(frame, RATE)
        turn = reader.speech_stopped()
        reading = await turn.reading() if turn is not None else None
        await reader.close()
        return reading

    reading = asyncio.run(run())
    assert reading is not None and reading.start_s == pytest.approx(0.5, abs=1e-6)
    assert_scored_as(reading, turn_reading(tiny_recognizer, pcm))


def test_a_server_that_cannot_be_reached_gives_no_reading_and_no_error(tmp_path: Path) -> None:
    async def run() -> Any:
        reader = TurnReader(RemoteBackend("ws://127.0.0.1:9"), timeout=0.2)
        turn = await speak(reader, clip_pcm("zh_3s_16k.wav"))
        reading = await turn.reading() if turn is not None else "no turn"
        await reader.close()
        return reading

    assert asyncio.run(run()) is None


def test_backend_for_picks_in_process_or_remote(tiny_recognizer: Any) -> None:
    assert isinstance(backend_for(tiny_recognizer), LocalBackend)
    assert isinstance(backend_for(url="ws://127.0.0.1:7860", head="tones"), RemoteBackend)
    with pytest.raises(ValueError, match="not both"):
        backend_for(tiny_recognizer, url="ws://127.0.0.1:7860")
    with pytest.raises(ValueError, match="timeout"):
        TurnReader(LocalBackend(tiny_recognizer), timeout=-1)


def test_a_served_head_is_read_on_the_turn_in_process(tiny_recognizer: Any, tmp_path: Path) -> None:
    """A head of your own labels (`LocalBackend(head=...)`): each reading carries its result on the turn,
    as the library's stream gives it for the same audio (a turn read in pieces: on the pooled embedding)."""
    from emoserve.inference.datasets import read_dataset
    from emoserve.inference.embeddings import EmbeddingCache
    from emoserve.inference.training import TrainOptions, embed_dataset, train_head
    from emoserve.model.head import Head
    from tests.support.labelled import write_labelled_set

    dataset = read_dataset(write_labelled_set(tmp_path / "labelled"))
    labelled = embed_dataset(
        tiny_recognizer, dataset, cache=EmbeddingCache(tmp_path / "cache", tiny_recognizer)
    )
    head = Head.load(train_head(tiny_recognizer, labelled, tmp_path / "tones", TrainOptions()).path)
    pcm = clip_pcm("zh_3s_16k.wav") + clip_pcm("en_3s_8k.wav")

    async def run() -> EmotionReading | None:
        reader = TurnReader(LocalBackend(tiny_recognizer, head=head), timeout=PATIENT)
        turn = await speak(reader, pcm)
        assert turn is not None
        reading = await turn.reading()
        await reader.close()
        return reading

    reading = asyncio.run(run())
    assert reading is not None and reading.head is not None and not reading.interim
    stream = tiny_recognizer.stream(head=head, use_vad=False, chunk_s=2.0)
    expected = (stream.feed(pcm) + stream.flush())[-1]
    assert expected["pieces"] == 3 and expected["head"]["name"] == reading.head["name"] == head.name
    assert reading.head["label"] == expected["head"]["label"]
    assert reading.head["scores"] == pytest.approx(expected["head"]["scores"], abs=SCORE_TOL)
    assert f"{head.name}={reading.head['label']}:" in reading.for_llm()
