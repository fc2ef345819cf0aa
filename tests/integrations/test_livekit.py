"""The LiveKit Agents integration (integrations/livekit.py): the hooks driven directly with rtc.AudioFrames
and a ChatContext, on real LiveKit classes (no room, no server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip(
    "livekit.agents", reason="the livekit extra is not installed (pip install 'emoserve[livekit]')"
)

from livekit import rtc
from livekit.agents import Agent, llm
from livekit.agents.voice.events import UserStateChangedEvent

from emoserve.integrations.livekit import AgentEmotion, EmotionAgentMixin
from tests.support.agents import clip_pcm, frames, turn_reading
from tests.support.audio import RATE

SCORE_TOL = 1e-5
PATIENT = 30.0
RATE_48K = 48_000  # what a LiveKit room's tracks carry


async def audio_frames(pcm: bytes, rate: int = RATE) -> AsyncIterator[rtc.AudioFrame]:
    for chunk in frames(pcm, rate):
        yield rtc.AudioFrame(chunk, rate, 1, len(chunk) // 2)
        await asyncio.sleep(0)


def user_message(text: str = "I want a refund") -> llm.ChatMessage:
    return llm.ChatMessage(role="user", content=[text])


def state(old: str, new: str) -> UserStateChangedEvent:
    return UserStateChangedEvent(old_state=old, new_state=new)  # type: ignore[arg-type]


async def spoken(emotion: AgentEmotion, pcm: bytes, rate: int = RATE) -> int:
    """The session's VAD says speaking, the frames go through the tee, then listening: frames seen."""
    emotion.on_user_state(state("listening", "speaking"))
    seen = [frame async for frame in emotion.tee(audio_frames(pcm, rate))]
    emotion.on_user_state(state("speaking", "listening"))
    return len(seen)


def assert_scored_as(reading: dict[str, Any], expected: Any) -> None:
    assert reading["emotion"] == expected.emotion and reading["interim"] is False
    for label, score in expected.scores.items():
        assert reading["scores"][label] == pytest.approx(score, abs=SCORE_TOL)


def test_prefix_mode_puts_the_reading_before_the_users_words(tiny_recognizer: Any) -> None:
    pcm = clip_pcm("zh_3s_16k.wav")

    async def run() -> tuple[llm.ChatContext, llm.ChatMessage, int]:
        emotion = AgentEmotion(model=tiny_recognizer, timeout=PATIENT)
        seen = await spoken(emotion, pcm)
        turn_ctx, message = llm.ChatContext(), user_message()
        await emotion.add_to(turn_ctx, message)
        await emotion.aclose()
        return turn_ctx, message, seen

    turn_ctx, message, seen = asyncio.run(run())
    assert seen == len(frames(pcm))  # the STT sees every frame
    reading = message.extra["emoserve"]
    assert_scored_as(reading, turn_reading(tiny_recognizer, pcm))
    assert message.text_content is not None and message.text_content.startswith("[emotion ")
    assert message.text_content.endswith(" I want a refund")
    assert ("random-test-weights" in message.text_content) is tiny_recognizer.random_weights
    assert turn_ctx.items == []


def test_system_mode_adds_an_item_and_leaves_the_words(tiny_recognizer: Any) -> None:
    pcm = clip_pcm("en_3s_8k.wav", rate=RATE_48K)

    async def run() -> tuple[llm.ChatContext, llm.ChatMessage]:
        emotion = AgentEmotion(model=tiny_recognizer, timeout=PATIENT, inject="system")
        await spoken(emotion, pcm, RATE_48K)
        turn_ctx, message = llm.ChatContext(), user_message()
        await emotion.add_to(turn_ctx, message)
        await emotion.aclose()
        return turn_ctx, message

    turn_ctx, message = asyncio.run(run())
    assert message.text_content == "I want a refund"
    (item,) = turn_ctx.items
    assert isinstance(item, llm.ChatMessage) and item.role == "system"
    assert item.text_content is not None and "[emotion " in item.text_content
    assert message.extra["emoserve"] == item.extra["emoserve"]


def test_a_short_turn_leaves_the_message_as_it_was(tiny_recognizer: Any) -> None:
    async def run() -> tuple[Any, llm.ChatMessage]:
        emotion = AgentEmotion(model=tiny_recognizer, timeout=PATIENT)
        await spoken(emotion, clip_pcm("en_1s_16k.wav")[: int(0.5 * RATE) * 2])
        message = user_message()
        reading = await emotion.add_to(llm.ChatContext(), message)
        await emotion.aclose()
        return reading, message

    reading, message = asyncio.run(run())
    assert reading is None and message.text_content == "I want a refund" and "emoserve" not in message.extra


class ListeningAgent(Agent):
    """An agent whose STT node only listens (counts the frames): the mixin's tee in front of it."""

    def __init__(self) -> None:
        super().__init__(instructions="You are a test.")
        self.frames_heard = 0

    async def stt_node(self, audio: Any, model_settings: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        async for _ in audio:
            self.frames_heard += 1
        return
        yield


class EmotionalAgent(EmotionAgentMixin, ListeningAgent):
    def __init__(self, recognizer: Any) -> None:
        super().__init__()
        self.emotion = AgentEmotion(model=recognizer, timeout=PATIENT)


def test_the_mixin_tees_stt_node_and_reads_the_turn_at_its_completion(tiny_recognizer: Any) -> None:
    """No session, so no VAD events: the turn is the audio since the last completed one."""
    pcm = clip_pcm("zh_3s_16k.wav")

    async def run() -> tuple[EmotionalAgent, llm.ChatMessage]:
        agent = EmotionalAgent(tiny_recognizer)
        async for _ in agent.stt_node(audio_frames(pcm), None):
            pass
        message = user_message()
        await agent.on_user_turn_completed(llm.ChatContext(), message)
        await agent.emotion.aclose()
        return agent, message

    agent, message = asyncio.run(run())
    assert agent.frames_heard == len(frames(pcm))
    assert_scored_as(message.extra["emoserve"], turn_reading(tiny_recognizer, pcm))
    assert agent.emotion.last is not None and agent.emotion.last.to_dict() == message.extra["emoserve"]
