"""A live stream's session (serving/live.py): back-pressure while its segments wait for the model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf

from emoserve.inference.protocol import StreamOptions
from emoserve.inference.results import ModelTag
from emoserve.serving.live import MAX_PENDING_SEGMENTS, LiveStream
from emoserve.serving.metrics import Metrics
from tests.support.audio import RATE, SPEECH


def pcm(path: Path) -> bytes:
    return bytes(sf.read(path, dtype="int16")[0].tobytes())


async def in_the_caller(function: Callable[..., Any], *args: Any) -> Any:
    """asyncio.to_thread without the thread: the stream's cutting runs in the task that feeds it."""
    return function(*args)


def test_a_fast_sender_is_not_read_while_segments_wait_for_the_model(
    speech: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Back-pressure: with the model held, `feed` does not return once MAX_PENDING_SEGMENTS segments wait,
    so the route stops reading the socket; released, everything comes out, nothing dropped.

    The cutting runs in the feeding task (no thread), so that task yields to the loop only where `feed`
    waits for room: once it yields, it has either parked there or fed everything - no clock decides."""
    monkeypatch.setattr(asyncio, "to_thread", in_the_caller)

    async def scenario() -> tuple[bool, int, int, list[dict[str, Any]]]:
        gate = asyncio.Event()
        waiting = 0  # segments whose scores were asked for and are held by the gate

        async def score(audio: Any, interim: bool) -> Any:
            nonlocal waiting
            waiting += not interim
            await gate.wait()
            waiting -= not interim
            return fake_result(audio)

        tag = ModelTag("m", True, "torch", "float32")
        live = LiveStream(StreamOptions(), score, tag=tag, labels=[], metrics=Metrics(8))

        async def send() -> list[dict[str, Any]]:  # as the route sends: all along
            return [m async for m in live.messages_out()]

        sending = asyncio.ensure_future(send())
        feeding = asyncio.ensure_future(feed_all(live, pcm(speech)))
        for _ in range(1000):  # loop turns, not time: the scores' tasks start one turn after the feeder
            if feeding.done() or waiting >= MAX_PENDING_SEGMENTS:
                break
            await asyncio.sleep(0)
        parked, fed, held = not feeding.done(), live.cutter.samples, waiting
        gate.set()
        await asyncio.wait_for(feeding, 60)
        await live.end()
        return parked, fed, held, await asyncio.wait_for(sending, 60)

    parked, fed, held, messages = asyncio.run(scenario())
    total = len(pcm(speech)) // 2
    assert parked and fed < total  # stopped reading
    assert held == MAX_PENDING_SEGMENTS  # holding only what it may
    assert len([m for m in messages if m["type"] == "segment"]) == 2 * len(SPEECH)


async def feed_all(live: LiveStream, data: bytes) -> None:
    for at in range(0, len(data), 3200):
        await live.feed(data[at : at + 3200])


def fake_result(audio: Any) -> Any:
    from emoserve.inference.results import Result

    return Result(
        *("neutral", "中立", "😐", 1.0, {"neutral": 1.0}, len(audio.samples) / RATE, "utterance"),
        *("m", True, "torch", "float32"),
    )
