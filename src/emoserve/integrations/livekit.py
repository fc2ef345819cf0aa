"""Emotion in a LiveKit Agents agent (`pip install 'emoserve[livekit]'`; docs/guides/voice-agents.md): one
reading per user turn, on the user's message.

    class Assistant(EmotionAgentMixin, Agent):
        def __init__(self) -> None:
            super().__init__(instructions="...")
            self.emotion = AgentEmotion(model="emotion2vec_plus_base")    # or url="ws://HOST:7860"

The mixin tees the user's `rtc.AudioFrame`s on their way into `stt_node` (the STT sees them unchanged)
into a `TurnReader`; the session's VAD (`user_state_changed`: speaking, then listening) decides the turns;
in `on_user_turn_completed` it waits for the turn's reading, at most `timeout` after the user stopped,
and adds it to the user's message: as a prefix of its text (`inject="prefix"`) or as a system item just
before it (`inject="system"`); `new_message.extra["emoserve"]` holds the structured reading for tools and
escalation logic either way. Without VAD events (no session, a realtime model's own turn detection) a
turn is the audio since the last completed one, closed when the turn completes.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from livekit import rtc
from livekit.agents import llm
from livekit.agents.voice.events import UserStateChangedEvent

from emoserve.agents import Backend, EmotionReading, Turn, TurnReader, backend_for
from emoserve.agents.reading import LLM_FLOOR, LLM_TOP_K
from emoserve.agents.turns import DEFAULT_CHUNK_S, DEFAULT_MIN_SPEECH_S, DEFAULT_TIMEOUT_S

if TYPE_CHECKING:
    from livekit.agents import AgentSession

    from emoserve.inference.recognizer import Recognizer
    from emoserve.model.head import Head

Inject = Literal["prefix", "system"]
EXTRA_KEY = "emoserve"  # new_message.extra[...]: the structured reading


class AgentEmotion:
    """The emotion of a LiveKit agent's user, one reading per turn. `model`: a name, a directory or a
    loaded `Recognizer` (scored in this process), or `url`: an emoserve server (ws://HOST:PORT, with
    `api_key`); `head`: a head of your own labels; `backend`: any `emoserve.agents.Backend` instead."""

    def __init__(
        self,
        *,
        model: Recognizer | str | os.PathLike[str] | None = None,
        url: str | None = None,
        api_key: str | None = None,
        head: Head | str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        min_speech_s: float = DEFAULT_MIN_SPEECH_S,
        chunk_s: float = DEFAULT_CHUNK_S,
        inject: Inject = "prefix",
        top_k: int = LLM_TOP_K,
        floor: float = LLM_FLOOR,
        backend: Backend | None = None,
    ) -> None:
        if inject not in ("prefix", "system"):
            raise ValueError(f"inject is {inject!r}; choose prefix or system")
        self.backend = backend or backend_for(model, url=url, api_key=api_key, head=head)
        self.timeout, self.min_speech_s, self.chunk_s = timeout, min_speech_s, chunk_s
        self.inject, self.top_k, self.floor = inject, top_k, floor
        self.last: EmotionReading | None = None  # the newest reading (also on its message)
        self._reader: TurnReader | None = None
        self._turn: Turn | None = None  # the last turn stopped, until its message takes its reading
        self._vad_seen = False  # the session tells speech starts and stops

    @property
    def reader(self) -> TurnReader:
        """Made on first use, in the agent's event loop."""
        if self._reader is None:
            self._reader = TurnReader(
                self.backend, timeout=self.timeout, min_speech_s=self.min_speech_s, chunk_s=self.chunk_s
            )
        return self._reader

    def attach(self, session: AgentSession[Any]) -> None:
        """Follow the session's VAD: `user_state_changed` speaking -> the turn starts, -> listening: stops."""
        session.on("user_state_changed", self.on_user_state)

    def on_user_state(self, event: UserStateChangedEvent) -> None:
        self._vad_seen = True
        if event.new_state == "speaking":
            self.reader.speech_started()
        elif event.old_state == "speaking" and (turn := self.reader.speech_stopped()) is not None:
            self._turn = turn

    async def tee(self, audio: AsyncIterable[rtc.AudioFrame]) -> AsyncIterator[rtc.AudioFrame]:
        """The frames, unchanged, each fed to the reader on its way."""
        async for frame in audio:
            if not self._vad_seen:
                self.reader.speech_started()  # no VAD events: the turn is everything since the last one
            self.reader.feed(bytes(frame.data), frame.sample_rate, frame.num_channels)
            yield frame

    async def add_to(self, turn_ctx: llm.ChatContext, new_message: llm.ChatMessage) -> EmotionReading | None:
        """The turn's reading (within `timeout` of the user's stop) on `new_message`: prefixed to its text or
        as a system item in `turn_ctx`, and as `new_message.extra["emoserve"]`."""
        turn, self._turn = self._turn, None
        if turn is None and not self._vad_seen:
            turn = self.reader.speech_stopped()
        reading = await turn.reading() if turn is not None else None
        if reading is None:
            return None
        self.last = reading
        line = reading.for_llm(self.top_k, self.floor)
        new_message.extra[EXTRA_KEY] = reading.to_dict()
        if self.inject == "system":
            turn_ctx.add_message(
                role="system",
                content=f"The user's voice in the turn that follows: {line}",
                extra={EXTRA_KEY: reading.to_dict()},
            )
        else:
            texts = [i for i, part in enumerate(new_message.content) if isinstance(part, str)]
            if texts:
                new_message.content[texts[0]] = f"{line} {new_message.content[texts[0]]}"
            else:
                new_message.content.insert(0, line)
        return reading

    async def aclose(self) -> None:
        if self._reader is not None:
            await self._reader.close()


class EmotionAgentMixin:
    """Put before `Agent` in the bases, and set `self.emotion` (an `AgentEmotion`) in `__init__`."""

    emotion: AgentEmotion

    async def on_enter(self) -> None:
        self.emotion.attach(self.session)  # type: ignore[attr-defined]
        await super().on_enter()  # type: ignore[misc]

    async def on_exit(self) -> None:
        await self.emotion.aclose()
        await super().on_exit()  # type: ignore[misc]

    def stt_node(self, audio: AsyncIterable[rtc.AudioFrame], model_settings: Any) -> Any:
        return super().stt_node(self.emotion.tee(audio), model_settings)  # type: ignore[misc]

    async def on_user_turn_completed(self, turn_ctx: llm.ChatContext, new_message: llm.ChatMessage) -> None:
        await self.emotion.add_to(turn_ctx, new_message)
        await super().on_user_turn_completed(turn_ctx, new_message)  # type: ignore[misc]
