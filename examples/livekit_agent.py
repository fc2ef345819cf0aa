"""A LiveKit Agents voice agent whose LLM hears how the user sounds: emoserve's EmotionAgentMixin
(docs/guides/voice-agents.md).

    pip install 'emoserve[livekit]' 'livekit-agents[silero]'
    emoserve serve --model emotion2vec_plus_base            # in another terminal (or set EMOSERVE_MODEL)
    LIVEKIT_URL=... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=... python examples/livekit_agent.py dev

The keys are LiveKit's own (its room, and its inference gateway for the STT, LLM and TTS); emoserve needs
none. EMOSERVE_URL (default ws://127.0.0.1:7860) picks the server; EMOSERVE_MODEL=NAME scores in this
process instead.
"""

from __future__ import annotations

import logging
import os

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, cli, inference
from livekit.plugins import silero

from emoserve.integrations.livekit import AgentEmotion, EmotionAgentMixin

log = logging.getLogger("emotion-agent")

INSTRUCTIONS = (
    "You are a helpful voice assistant; keep answers short and spoken, no formatting. A user message may "
    "start with [emotion label=score ...]: how the user's voice sounded, read by a speech emotion model. "
    "Treat it as a cue, not a verdict: adapt your tone, never name it back."
)


class Assistant(EmotionAgentMixin, Agent):
    def __init__(self) -> None:
        super().__init__(instructions=INSTRUCTIONS)
        if model := os.environ.get("EMOSERVE_MODEL"):
            self.emotion = AgentEmotion(model=model)
        else:
            self.emotion = AgentEmotion(url=os.environ.get("EMOSERVE_URL", "ws://127.0.0.1:7860"))

    async def on_user_turn_completed(self, turn_ctx, new_message) -> None:
        await super().on_user_turn_completed(turn_ctx, new_message)
        if (reading := new_message.extra.get("emoserve")) is not None:
            log.info("turn %s: %s after %.0f ms", reading["turn"], reading["emotion"], 1000 * reading["latency_s"])


server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    session = AgentSession(
        stt=inference.STT("deepgram/nova-3"),
        llm=inference.LLM("openai/gpt-4.1-mini"),
        tts=inference.TTS("cartesia/sonic-3", voice="9626c31c-bec5-4cca-baa8-f8ba9e84c8bc"),
        vad=silero.VAD.load(),  # its user_state_changed events decide the turns the emotion reads
    )
    await session.start(agent=Assistant(), room=ctx.room)


if __name__ == "__main__":
    cli.run_app(server)
