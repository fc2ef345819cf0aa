"""The web UI's tests' stand-ins: a Service that offers what the UI needs (webui.protocol.UIService) around a
real engine, and the recordings and clicks those tests share."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from emoserve.audio.decode import Audio
from emoserve.audio.segments import Recording, Span
from emoserve.audio.vad import DEFAULT_VAD, VadSettings
from emoserve.constants import EXAMPLES_DIR, Channels, Granularity
from emoserve.errors import QueueFull
from emoserve.inference.protocol import StreamOptions
from emoserve.inference.results import ModelTag, Result, TimelineSegment, scored
from emoserve.model.labels import PUBLISHED_LABELS, parse_label
from emoserve.serving.engine import Engine, Priority, RequestTiming
from emoserve.serving.live import LiveStream
from emoserve.serving.metrics import Metrics
from emoserve.serving.phase import Phase, unavailable
from emoserve.serving.service import decode_clip
from emoserve.serving.settings import Settings
from emoserve.webui import clip, long_recording
from emoserve.webui.protocol import UIService
from emoserve.webui.saved import UIOutputs

from .reference import wave

EXAMPLE = EXAMPLES_DIR / "en_3s_44k.mp3"
OTHER_EXAMPLE = EXAMPLES_DIR / "zh_3s_16k.wav"
CHROMIUM = Path("/usr/bin/chromium")
PAGE_TIMEOUT_MS = 30_000
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass
class FakeMetrics:
    observed: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def observe_request(
        self, route: str, *, decode_s: float, queue_s: float, inference_s: float, total_s: float
    ) -> None:
        self.observed.append({"decode_s": decode_s, "queue_s": queue_s, "total_s": total_s})

    def count_error(self, kind: str) -> None:
        self.errors.append(kind)


def ui_settings(outputs_dir: Path | None, max_audio_s: float = 60.0) -> Settings:
    """What the UI reads of the settings: its outputs (None: saving off) and the clip limit."""
    saving = {"save_outputs": True, "outputs_dir": outputs_dir} if outputs_dir else {"save_outputs": False}
    return Settings(max_audio_s=max_audio_s, **saving)


@dataclass
class FakeService:
    """What the server's Service offers the UI (webui.protocol.UIService), around a real engine."""

    engine: Engine | None
    settings: Settings
    phase: Phase = "ready"
    reason: str | None = None
    model_name: str | None = "emotion2vec-tiny"
    random_weights: bool | None = True
    max_timeline_s: float = 3600.0
    metrics: FakeMetrics | None = field(default_factory=FakeMetrics)
    timeline_fails_after: int | None = None  # segments scored before timeline() raises QueueFull
    timelines_running: int = 0
    timelines_closed: list[int] = field(default_factory=list)  # segments each timeline() gave, at its end
    streams_open: int = 0
    streams_opened: int = 0

    @property
    def model_tag(self) -> ModelTag | None:
        """As Service.model_tag: the engine's recognizer, under this service's name and weights."""
        if self.engine is None or self.model_name is None:
            return None
        recognizer = self.engine.recognizer
        return ModelTag(self.model_name, bool(self.random_weights), recognizer.backend.name, recognizer.dtype)

    def require_ready(self) -> None:
        """As Service.require_ready: the 503 that fits the phase."""
        if self.phase != "ready" or self.engine is None:
            raise unavailable(self.phase, self.reason, 1.0)

    def decode(self, source: str | os.PathLike[str] | bytes, name: str | None = None) -> Audio:
        """As Service.decode: the server's clip decoding, within settings.max_audio_s."""
        return decode_clip(source, name, self.settings.effective_max_audio_s())

    async def recognize(
        self, audio: Audio, granularity: Granularity = "utterance", embedding: bool = False
    ) -> tuple[Result, RequestTiming]:
        self.require_ready()
        assert self.engine is not None
        return await self.engine.submit_timed(audio, granularity, embedding)

    def open_timeline(
        self,
        source: Any,
        *,
        name: str | None = None,
        channels: Channels = "mix",
        vad: VadSettings = DEFAULT_VAD,
        spans: Sequence[Span] | None = None,
    ) -> Recording:
        return Recording(
            source, name=name, channels=channels, vad=vad, spans=spans, max_seconds=self.max_timeline_s
        )

    async def timeline(self, job: Recording) -> AsyncIterator[TimelineSegment]:
        """As Service.timeline, one segment at a time (the test files are short: decoding on the loop)."""
        self.require_ready()
        assert self.engine is not None
        self.timelines_running += 1
        given = 0
        try:
            for n, segment in enumerate(job.segments()):
                if n == self.timeline_fails_after:
                    raise QueueFull(1.0)
                result = await self.engine.submit(job.clip(segment), priority=Priority.TIMELINE)
                given += 1
                yield scored(segment, result)
        finally:
            self.timelines_running -= 1
            self.timelines_closed.append(given)

    @contextlib.asynccontextmanager
    async def live_stream(self, options: StreamOptions) -> AsyncIterator[LiveStream]:
        """As Service.live_stream: the stream's readings and segments through the engine."""
        self.require_ready()
        engine = self.engine
        assert engine is not None

        async def score(audio: Audio, interim: bool) -> Result:
            priority = Priority.STREAM_INTERIM if interim else Priority.STREAM_SEGMENT
            return await engine.submit(audio, priority=priority)

        labels = [parse_label(token).to_dict() for token in PUBLISHED_LABELS]
        assert self.model_tag is not None
        stream = LiveStream(options, score, tag=self.model_tag, labels=labels, metrics=Metrics(8))
        self.streams_open += 1
        self.streams_opened += 1
        try:
            yield stream
        finally:
            await stream.close()
            self.streams_open -= 1


def make_service(
    engine: Engine | None, outputs_dir: Path | None, *, max_audio_s: float = 60.0, **kwargs: Any
) -> UIService:
    settings = ui_settings(outputs_dir, max_audio_s)
    service: UIService = FakeService(engine, settings, **kwargs)  # mypy checks the protocol here
    return service


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def recognize(
    service: UIService,
    path: str | None,
    granularity: str = "utterance",
    *,
    embedding: bool = False,
    saving: UIOutputs | None = None,
) -> clip.ClipResult:
    """The clip tab's click; `saving`: the UI's outputs (default: made from the service's settings)."""
    ui_outputs = saving or UIOutputs.from_settings(service.settings)
    try:
        return run(clip.recognize(service, ui_outputs, path, granularity, embedding))
    finally:
        ui_outputs.close()


GAP_S = 2.0  # silence between the clips of a test recording: the VAD ends a segment after 0.3 s
RECORDING_CLIPS = ("en_3s_44k.mp3", "zh_3s_16k.wav", "en_7s_16k.flac")


def joined_recording(path: Path, clips: Sequence[str] = RECORDING_CLIPS) -> Path:
    """Fixture clips (16 kHz) one after the other with GAP_S of silence around each."""
    gap = np.zeros(int(GAP_S * 16_000), np.float32)
    parts = [gap]
    for name in clips:
        parts += [wave(name), gap]
    sf.write(str(path), np.concatenate(parts), 16_000)
    return path


def two_sided_call(path: Path) -> Path:
    """A stereo call: one side speaks, then the other."""
    left, right = wave("en_3s_44k.mp3"), wave("zh_3s_16k.wav")
    gap = int(GAP_S * 16_000)
    stereo = np.zeros((len(left) + gap + len(right), 2), np.float32)
    stereo[: len(left), 0] = left
    stereo[len(left) + gap :, 1] = right
    sf.write(str(path), stereo, 16_000)
    return path


def build_timeline(
    service: UIService,
    path: str | None,
    channels: str = "mix",
    segments: str | None = None,
    *,
    max_segment_s: float = 15.0,
    threshold: float = 0.5,
    updates: list[tuple[Any, ...]] | None = None,
    saving: UIOutputs | None = None,
) -> list[tuple[Any, ...]]:
    """Every update the tab's handler yields (also into `updates`, which survives an error part-way)."""
    ui_outputs = saving or UIOutputs.from_settings(service.settings)
    out = [] if updates is None else updates

    async def collect() -> None:
        request = long_recording.timeline_request(service, path, channels, max_segment_s, threshold, segments)
        async for values in long_recording.timeline_updates(service, ui_outputs, request):
            out.append(values)

    try:
        run(collect())
    finally:
        ui_outputs.close()
    return out


def table_rows(table: Any) -> list[list[Any]]:
    return [list(row) for row in table.itertuples(index=False)]


def open_page(browser: Any, url: str) -> Any:
    """A new page of a Playwright browser at `url`, once the banner says the service is ready."""
    page = browser.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(url)
    page.locator('#status-state[data-state="ready"]').wait_for()
    return page
