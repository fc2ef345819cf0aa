"""Voice-agent tests' audio and backends: a clip as the 16-bit PCM frames a framework delivers, the reading
the library gives the same turn, and a real backend made slow."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from emoserve.agents.backends import Backend, Session
from emoserve.agents.turns import DEFAULT_CHUNK_S
from emoserve.inference.protocol import ReadyMessage, StreamMessage, StreamOptions, TurnId

from .audio import RATE, clip

if TYPE_CHECKING:
    from emoserve.inference.recognizer import Recognizer

FRAME_S = 0.02  # what Pipecat's and LiveKit's inputs deliver: 20 ms frames


def clip_pcm(name: str, rate: int = RATE, channels: int = 1) -> bytes:
    """A fixture clip (16 kHz mono) as interleaved 16-bit PCM, the same samples in every channel; at other
    rates by repeating samples (the content does not matter, only that it is speech-like and known)."""
    x = clip(name)
    x = np.repeat(x, rate // RATE) if rate != RATE else x
    pcm = np.clip(np.round(x * 32768), -32768, 32767).astype("<i2")
    return np.repeat(pcm, channels).tobytes()


def pcm_samples(pcm: bytes) -> np.ndarray:
    """16-bit mono PCM as the float32 samples a file of it decodes to (libsndfile's scale)."""
    return np.frombuffer(pcm, "<i2").astype(np.float32) / np.float32(32768)


def turn_reading(recognizer: Recognizer, pcm: bytes, chunk_s: float = DEFAULT_CHUNK_S) -> SimpleNamespace:
    """What a turn reader's backend gives a turn of `pcm` (16-bit mono at 16 kHz): the library's own stream
    with the reader's turns (vad=off, read in pieces of chunk_s), the turn's segment (`emotion`, `scores`)."""
    session = recognizer.stream(use_vad=False, chunk_s=chunk_s)
    segment = (session.feed(pcm) + session.flush())[-1]
    assert segment["type"] == "segment", segment
    return SimpleNamespace(emotion=segment["emotion"], scores=segment["scores"])


def frames(pcm: bytes, rate: int = RATE, channels: int = 1) -> list[bytes]:
    size = int(FRAME_S * rate) * 2 * channels
    return [pcm[at : at + size] for at in range(0, len(pcm), size)]


def silence(seconds: float, rate: int = RATE, channels: int = 1) -> bytes:
    return b"\x00\x00" * int(seconds * rate) * channels


class SlowBackend:
    """A real backend whose answers to `flush` come `delay_s` late (a loaded server, a slow model): the
    session's messages pass through a task that holds each turn's answer back."""

    def __init__(self, backend: Backend, delay_s: float) -> None:
        self.backend, self.delay_s = backend, delay_s

    async def open(self, options: StreamOptions) -> Session:
        return SlowSession(await self.backend.open(options), self.delay_s)


class SlowSession:
    def __init__(self, session: Session, delay_s: float) -> None:
        self.session, self.delay_s = session, delay_s
        self.ready: ReadyMessage = session.ready

    async def send(self, pcm: bytes) -> None:
        await self.session.send(pcm)

    async def flush(self, turn_id: TurnId) -> None:
        await self.session.flush(turn_id)

    async def messages(self) -> AsyncIterator[StreamMessage]:
        async for message in self.session.messages():
            if "turn_id" in message:
                await asyncio.sleep(self.delay_s)
            yield message

    async def close(self) -> None:
        await self.session.close()
