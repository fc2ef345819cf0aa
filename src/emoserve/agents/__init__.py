"""Emotion for voice agents, framework-free: one reading per user turn (docs/guides/voice-agents.md).

    reader = TurnReader(backend_for("emotion2vec_plus_base"))     # or backend_for(url="ws://HOST:7860")
    reader.feed(pcm, 16000)  ...  reader.speech_started()  ...  turn = reader.speech_stopped()
    reading = await turn.reading()        # EmotionReading, or None; reading.for_llm() for the LLM

The Pipecat and LiveKit Agents integrations (emoserve.integrations) are built on it.
"""

from emoserve.agents.backends import Backend, LocalBackend, RemoteBackend, backend_for
from emoserve.agents.reading import EmotionReading
from emoserve.agents.turns import Turn, TurnReader

__all__ = ["Backend", "EmotionReading", "LocalBackend", "RemoteBackend", "Turn", "TurnReader", "backend_for"]
