"""Emotion in a Pipecat pipeline (`pip install 'emoserve[pipecat]'`; docs/guides/voice-agents.md): one
reading per user turn, where the LLM sees it.

    pipeline = Pipeline([transport.input(), stt, EmotionProcessor(model="emotion2vec_plus_base"),
                         user_aggregator, llm, tts, transport.output(), assistant_aggregator])

Between the STT and the user context aggregator. The VAD's frames decide the turns, whichever way they
come (from the transport downstream, or upstream from a user aggregator that runs the VAD); without a VAD,
the user-turn frames (`UserStartedSpeakingFrame`, `UserStoppedSpeakingFrame`) do. Every frame passes on.
The user's audio (`InputAudioRawFrame`, `UserAudioRawFrame`: the options `user_id` and `audio_source` keep
only one track) goes into a `TurnReader`; when the turn stops it is read, and the first
`TranscriptionFrame` after that is held until its reading or `timeout` after "stopped", then sent on with
the reading where the LLM sees it: prefixed to the text (`inject="prefix"`) or as a system message just
before it (`inject="context"`, an `LLMMessagesAppendFrame` that does not run the LLM);
`frame.metadata["emoserve"]` has the structured reading either way. An `EmotionFrame` (a system frame)
carries the reading downstream for observers and UIs, and the event `on_emotion(processor, reading)`
fires, once per read turn. An `InterruptionFrame` starts the turn being spoken again (Pipecat drops the
held transcription with the other data frames it cancels).

Pipecat 1.14, the version the package index serves, has no perception field on `TranscriptionFrame`;
the reading goes into the text or the context as above.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    LLMMessagesAppendFrame,
    StartFrame,
    SystemFrame,
    TranscriptionFrame,
    UserAudioRawFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from emoserve.agents import Backend, EmotionReading, Turn, TurnReader, backend_for
from emoserve.agents.reading import LLM_FLOOR, LLM_TOP_K
from emoserve.agents.turns import DEFAULT_CHUNK_S, DEFAULT_MIN_SPEECH_S, DEFAULT_TIMEOUT_S

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionSystemMessageParam  # pipecat's LLM messages are these

    from emoserve.inference.recognizer import Recognizer
    from emoserve.model.head import Head

Inject = Literal["prefix", "context"]
METADATA_KEY = "emoserve"  # frame.metadata[...]: the structured reading on the transcription


@dataclass
class EmotionFrame(SystemFrame):
    """The emotion of the user's last turn (`reading.to_dict()` for JSON), for observers and UIs."""

    reading: EmotionReading


class EmotionProcessor(FrameProcessor):
    """One emotion reading per user turn (see the module's docstring). `model`: a name, a directory or a
    loaded `Recognizer` (scored in this process), or `url`: an emoserve server's ws://HOST:PORT (with
    `api_key`); `head`: a head of your own labels (in process: a `Head` or its directory; remote: the
    name the server serves it by); `backend`: any `emoserve.agents.Backend` instead."""

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
        user_id: str | None = None,
        audio_source: str | None = None,
        backend: Backend | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if inject not in ("prefix", "context"):
            raise ValueError(f"inject is {inject!r}; choose prefix or context")
        self.backend = backend or backend_for(model, url=url, api_key=api_key, head=head)
        self.timeout, self.min_speech_s, self.chunk_s = timeout, min_speech_s, chunk_s
        self.inject, self.top_k, self.floor = inject, top_k, floor
        self.user_id, self.audio_source = user_id, audio_source
        self.reader: TurnReader | None = None
        self._turn: Turn | None = None  # the last turn read, until a transcription carries its reading
        self._announced: dict[int, asyncio.Task[EmotionReading | None]] = {}
        self._vad_seen = False  # VAD frames decide the turns; without them, the user-turn frames do
        self._register_event_handler("on_emotion")

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            self.reader = TurnReader(
                self.backend, timeout=self.timeout, min_speech_s=self.min_speech_s, chunk_s=self.chunk_s
            )
        elif self.reader is not None:
            await self._observe(frame, self.reader)
        await self.push_frame(frame, direction)

    async def _observe(self, frame: Frame, reader: TurnReader) -> None:
        if isinstance(frame, InputAudioRawFrame):
            if self._is_users(frame):
                reader.feed(frame.audio, frame.sample_rate, frame.num_channels)
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            self._vad_seen = True
            reader.speech_started(ago_s=frame.start_secs)
        elif isinstance(frame, UserStartedSpeakingFrame) and not self._vad_seen:
            reader.speech_started()
        elif isinstance(frame, VADUserStoppedSpeakingFrame) or (
            isinstance(frame, UserStoppedSpeakingFrame) and not self._vad_seen
        ):
            if (turn := reader.speech_stopped()) is not None:
                self._turn = turn
                self._announced[turn.number] = self.create_task(
                    self._announce(turn), f"emotion-{turn.number}"
                )
        elif isinstance(frame, InterruptionFrame):
            reader.reset()
        elif isinstance(frame, TranscriptionFrame) and self._turn is not None:
            turn, self._turn = self._turn, None
            # held here (the data frames behind it wait too) until the reading, or the timeout
            reading = await asyncio.shield(self._announced.pop(turn.number))
            if reading is not None:
                await self._carry(frame, reading)
        elif isinstance(frame, EndFrame | CancelFrame):
            await reader.close()

    def _is_users(self, frame: InputAudioRawFrame) -> bool:
        if self.audio_source is not None and frame.transport_source != self.audio_source:
            return False
        return self.user_id is None or (
            isinstance(frame, UserAudioRawFrame) and frame.user_id == self.user_id
        )

    async def _announce(self, turn: Turn) -> EmotionReading | None:
        """The turn's reading, pushed as an EmotionFrame and told to `on_emotion` as soon as it is in."""
        reading = await turn.reading()
        if reading is not None:
            await self.push_frame(EmotionFrame(reading=reading))
            await self._call_event_handler("on_emotion", reading)
        return reading

    async def _carry(self, frame: TranscriptionFrame, reading: EmotionReading) -> None:
        line = reading.for_llm(self.top_k, self.floor)
        frame.metadata[METADATA_KEY] = reading.to_dict()
        if self.inject == "prefix":
            frame.text = f"{line} {frame.text}"
        else:
            content = f"The user's voice in the turn that follows: {line}"
            message: ChatCompletionSystemMessageParam = {"role": "system", "content": content}
            await self.push_frame(LLMMessagesAppendFrame(messages=[message], run_llm=False))

    async def cleanup(self) -> None:
        await super().cleanup()
        if self.reader is not None:
            await self.reader.close()
