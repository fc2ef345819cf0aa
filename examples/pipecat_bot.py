"""A Pipecat voice bot whose LLM hears how the user sounds: emoserve's EmotionProcessor between the STT
and the user context aggregator (docs/guides/voice-agents.md).

    pip install 'emoserve[pipecat]' 'pipecat-ai[deepgram,openai,cartesia,local,silero]'
    emoserve serve --model emotion2vec_plus_base            # in another terminal (or drop URL below)
    DEEPGRAM_API_KEY=... OPENAI_API_KEY=... CARTESIA_API_KEY=... python examples/pipecat_bot.py

The keys are the framework's own STT, LLM and TTS; emoserve needs none. EMOSERVE_URL (default
ws://127.0.0.1:7860) picks the server; EMOSERVE_MODEL=NAME scores in this process instead.
"""

from __future__ import annotations

import asyncio
import os

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import LLMRunFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.services.cartesia.tts import CartesiaTTSService
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.transports.local.audio import LocalAudioTransport, LocalAudioTransportParams
from pipecat.workers.runner import WorkerRunner

from emoserve.integrations.pipecat import EmotionProcessor

INSTRUCTIONS = (
    "You are a helpful assistant in a voice conversation; your answers are spoken, so no formatting. "
    "A user message may start with [emotion label=score ...]: how the user's voice sounded, read by a "
    "speech emotion model. Treat it as a cue, not a verdict: adapt your tone, never name it back."
)


async def main() -> None:
    transport = LocalAudioTransport(LocalAudioTransportParams(audio_in_enabled=True, audio_out_enabled=True))
    stt = DeepgramSTTService(api_key=os.environ["DEEPGRAM_API_KEY"])
    if model := os.environ.get("EMOSERVE_MODEL"):
        emotion = EmotionProcessor(model=model)
    else:
        emotion = EmotionProcessor(url=os.environ.get("EMOSERVE_URL", "ws://127.0.0.1:7860"))

    @emotion.event_handler("on_emotion")
    async def on_emotion(_processor, reading):
        print(f"turn {reading.turn}: {reading.for_llm()} ({reading.latency_s * 1000:.0f} ms after stop)")

    llm = OpenAILLMService(
        api_key=os.environ["OPENAI_API_KEY"],
        settings=OpenAILLMService.Settings(system_instruction=INSTRUCTIONS),
    )
    tts = CartesiaTTSService(
        api_key=os.environ["CARTESIA_API_KEY"],
        settings=CartesiaTTSService.Settings(voice="71a7ad14-091c-4e8e-a314-022ece01c121"),
    )
    context = LLMContext()
    user_aggregator, assistant_aggregator = LLMContextAggregatorPair(
        context, user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer())
    )
    pipeline = Pipeline(
        [
            transport.input(),
            stt,
            emotion,  # between the STT and the user aggregator
            user_aggregator,
            llm,
            tts,
            transport.output(),
            assistant_aggregator,
        ]
    )
    worker = PipelineWorker(pipeline)
    runner = WorkerRunner()
    await runner.add_workers(worker)
    context.add_message({"role": "developer", "content": "Please introduce yourself to the user."})
    await worker.queue_frames([LLMRunFrame()])
    await runner.run()


if __name__ == "__main__":
    asyncio.run(main())
