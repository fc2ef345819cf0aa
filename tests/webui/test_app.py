"""The web UI: its pieces directly, then the real page in a headless Chromium against a live server."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import errno
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pytest
import soundfile as sf
from fastapi import FastAPI

from emoserve.audio.decode import Audio
from emoserve.audio.segments import Recording, Span
from emoserve.audio.vad import DEFAULT_VAD, VadSettings
from emoserve.constants import EXAMPLES_DIR, Channels, Granularity
from emoserve.errors import AudioError, QueueFull
from emoserve.inference.live import StreamOptions
from emoserve.inference.recognizer import Recognizer
from emoserve.inference.results import FrameResult, Result, TimelineSegment, scored
from emoserve.inference.timeline import score_segments
from emoserve.model.labels import EMOTION_COLOURS, PUBLISHED_LABELS, parse_label
from emoserve.serving.engine import Engine, EngineConfig, Priority, RequestTiming
from emoserve.serving.live import LiveStream
from emoserve.serving.metrics import Metrics
from emoserve.serving.phase import Phase, unavailable
from emoserve.serving.service import Service, decode_clip
from emoserve.serving.settings import Settings
from emoserve.webui import charts, clip, long_recording, status
from emoserve.webui import saved as outputs
from emoserve.webui.app import mount_ui
from emoserve.webui.protocol import UIService
from emoserve.webui.saved import OutputStore, UIOutputs

from .conftest import gradio_loops_closed, skip_or_fail, wave

CHROMIUM = Path("/usr/bin/chromium")
EXAMPLE = EXAMPLES_DIR / "en_3s_44k.mp3"
OTHER_EXAMPLE = EXAMPLES_DIR / "zh_3s_16k.wav"
# Long enough that two windows clicked one after the other share one model call (proof that the UI
# lets them run at once), short enough to keep the test quick.
BATCH_WAIT_MS = 1500.0
PAGE_TIMEOUT_MS = 30_000

# Gradio's queue statistics (gradio/queueing.py) use pandas options and keywords that pandas 3
# deprecated; the warnings come from Gradio's server thread and are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")


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
        model, random = self.model_name or "", bool(self.random_weights)
        stream = LiveStream(
            options, score, model=model, random_weights=random, labels=labels, metrics=Metrics(8)
        )
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


@pytest.fixture(scope="module")
def engine(tiny_recognizer: Recognizer) -> Iterator[Engine]:
    engine = Engine(tiny_recognizer, EngineConfig(max_batch_size=2, max_wait_ms=BATCH_WAIT_MS))
    engine.start()
    yield engine
    engine.stop(timeout_s=10)


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


# ---------------------------------------------------------------------------------------------- pieces


@pytest.fixture
def fast_engine(tiny_recognizer: Recognizer) -> Iterator[Engine]:
    engine = Engine(tiny_recognizer, EngineConfig(max_wait_ms=0))
    engine.start()
    yield engine
    engine.stop(timeout_s=10)


def test_recognize_saves_a_folder_and_renders(fast_engine: Engine, tmp_path: Path) -> None:
    service = make_service(fast_engine, tmp_path)
    recognition = recognize(service, str(EXAMPLE), "frame", embedding=True)
    assert recognition.result == fast_engine.recognizer.predict(EXAMPLE, "frame", True)

    card, scores, timeline, log_text, files = clip.render(recognition)
    assert recognition.result.emotion in card and recognition.result.label_zh in card
    assert ("Random weights" in card) == recognition.result.random_weights
    assert len(scores) == len(recognition.result.scores)
    assert timeline.visible and set(timeline.value["columns"]) == {"time_s", "emotion", "probability"}
    for expected in ("44100 Hz", "1 channel", "resampled 44100 Hz -> 16000 Hz", "inference", "saved to"):
        assert expected in log_text
    assert [Path(f).name for f in files] == ["result.json", "processed_audio.wav", "embedding.npy"]

    (folder,) = tmp_path.iterdir()
    data = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    assert data["input"]["original_sample_rate"] == 44_100 and data["granularity"] == "frame"
    assert sf.info(str(folder / "processed_audio.wav")).samplerate == 16_000
    assert len(service.metrics.observed) == 1  # type: ignore[union-attr]


def test_saving_off_still_offers_downloads(fast_engine: Engine) -> None:
    recognition = recognize(make_service(fast_engine, None), str(OTHER_EXAMPLE))
    assert "saving is off" in clip.processing_log(recognition)
    assert not clip.render(recognition)[2].visible  # no timeline for an utterance result


@pytest.mark.parametrize("fault", ["gone", errno.ENOSPC, errno.EROFS])
def test_a_failed_save_still_shows_the_result(
    fast_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str | int
) -> None:
    """The outputs folder removed, the disk full mid-write, a read-only disk (root ignores file modes,
    so the last two are the writer failing as the kernel would): the result is shown, saving is said
    to have failed, and no half-written folder is left."""
    service = make_service(fast_engine, tmp_path / "outputs")
    saving = UIOutputs.from_settings(service.settings)
    store = saving.store()
    if fault == "gone":
        store.root.rmdir()  # saving now fails with FileNotFoundError
    else:

        def failing_write(*args: Any, **kwargs: Any) -> None:
            raise OSError(fault, os.strerror(int(fault)))

        monkeypatch.setattr(outputs.sf, "write", failing_write)
    with pytest.warns(UserWarning, match="could not be saved"):  # outside a page, gr.Warning warns
        recognition = recognize(service, str(EXAMPLE), saving=saving)
    assert recognition.saved is None and recognition.result.emotion
    assert clip.render(recognition)[4] is None
    assert "not saved" in clip.processing_log(recognition)
    if fault != "gone":
        assert list(store.root.iterdir()) == []


@pytest.mark.parametrize(
    ("phase", "reason", "engine_set", "message", "code"),
    [
        ("loading", None, False, r"still starting up.*\(loading\)", "not_ready"),
        ("warming", None, False, "still starting up", "not_ready"),
        ("failed", "no such model", False, r"could not be loaded.*no such model", "start_up_failed"),
        ("draining", None, True, "shutting down", "draining"),
    ],
)
def test_not_ready_is_a_clear_error(
    fast_engine: Engine, phase: Phase, reason: str | None, engine_set: bool, message: str, code: str
) -> None:
    """Counted under the API's codes for the same failures (one label per failure everywhere)."""
    service = make_service(fast_engine if engine_set else None, None, phase=phase, reason=reason)
    with pytest.raises(gr.Error, match=message):
        recognize(service, str(EXAMPLE))
    assert service.metrics.errors == [code]  # type: ignore[union-attr]


def test_bad_input_is_a_clear_error_and_the_ui_keeps_working(fast_engine: Engine, tmp_path: Path) -> None:
    service = make_service(fast_engine, None, max_audio_s=5.0)
    garbage = tmp_path / "notes.wav"
    garbage.write_bytes(b"this is not audio" * 10)
    with pytest.raises(gr.Error, match=r"notes\.wav: could not decode"):
        recognize(service, str(garbage))
    with pytest.raises(gr.Error, match=r"the limit is 5 s.*max_audio_s: --max-audio-s"):  # as the API says
        recognize(service, str(EXAMPLES_DIR / "en_7s_16k.flac"))
    with pytest.raises(gr.Error, match="Upload a clip"):
        recognize(service, None)
    assert recognize(service, str(EXAMPLE)).result.emotion
    assert service.metrics.errors == ["unsupported_audio", "audio_too_long"]  # type: ignore[union-attr]


def test_the_service_decodes_the_ui_path_as_the_api_bytes_within_its_own_limit() -> None:
    """Service.decode takes what the UI has (a path) and what the API has (bytes) alike; a clip over the
    limit names this server's setting, whichever it was."""
    service = Service(Settings(max_audio_s=5.0))
    from_path = service.decode(str(EXAMPLE), EXAMPLE.name)
    from_bytes = service.decode(EXAMPLE.read_bytes(), EXAMPLE.name)
    np.testing.assert_allclose(from_path.samples, from_bytes.samples, atol=1e-6)
    long = EXAMPLES_DIR / "en_7s_16k.flac"
    for source in (str(long), long.read_bytes()):
        with pytest.raises(AudioError, match=r"en_7s_16k\.flac.*the limit is 5 s.*this server's max_audio_s"):
            service.decode(source, long.name)
    with pytest.raises(AudioError, match="<upload>"):
        service.decode(b"this is not audio")


def test_banner_follows_the_phase() -> None:
    def banner(phase: Phase, random_weights: bool | None, reason: str | None = None) -> str:
        service = make_service(None, None, phase=phase, reason=reason, random_weights=random_weights)
        return status.banner_html(service)

    assert 'data-state="loading"' in banner("loading", None) and "RANDOM" not in banner("loading", None)
    assert "model files damaged" in banner("loading", None, "model files damaged; converting it again")
    assert "Warming up" in banner("warming", None)
    assert "emotion2vec-tiny" in banner("ready", False) and "RANDOM" not in banner("ready", False)
    assert "RANDOM WEIGHTS" in banner("ready", True)
    assert 'data-state="failed"' in banner("failed", False, "no such model")
    assert "no such model" in banner("failed", False, "no such model")
    assert 'data-state="draining"' in banner("draining", False)
    assert "&lt;b&gt;" in banner("failed", False, "<b>")  # reasons are escaped


def test_long_timelines_are_averaged() -> None:
    labels = ("happy", "sad")
    frames = [
        FrameResult(i * 0.02, (i + 1) * 0.02, "happy", 1.0, {"happy": i % 2, "sad": 1 - i % 2})
        for i in range(1000)
    ]
    result = Result(
        "happy", "开心", "😊", 0.5, dict.fromkeys(labels, 0.5), 20.0, "frame", "tiny", False, frames
    )
    table = charts.timeline_frame(result, max_points=100)
    assert table is not None
    assert len(table) == 100 * len(labels)
    np.testing.assert_allclose(table["probability"], 0.5)  # windows of 10 alternating frames
    assert table["time_s"].iloc[-1] == pytest.approx(990 * 0.02)


# ------------------------------------------------------------------------------------- long recordings

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


def test_timeline_streams_segments_then_saves_json_and_csv(
    fast_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(long_recording, "UPDATE_S", 0.0)  # every segment is sent as it comes
    recording = joined_recording(tmp_path / "meeting.wav")
    service = make_service(fast_engine, tmp_path / "outputs")
    updates = build_timeline(service, str(recording))

    expected = list(score_segments(fast_engine.recognizer, Recording(str(recording))))
    assert len(expected) >= len(RECORDING_CLIPS)
    progress, card, distribution, plot, table, files = updates[-1]
    assert 'data-state="done"' in progress and f"{len(expected)} segments" in progress
    assert [row[:4] for row in table_rows(table)] == [
        [round(s.start_s, 2), round(s.end_s, 2), "", f"{s.emoji} {s.emotion} · {s.label_zh}"]
        for s in expected
    ]
    assert [row[4] for row in table_rows(table)] == pytest.approx([s.confidence for s in expected], abs=2e-3)
    assert plot.count('class="tl-segment"') == len(expected)
    for s in expected:
        assert f'data-emotion="{s.emotion}"' in plot and EMOTION_COLOURS[s.emotion] in plot
    assert distribution["share"].sum() == pytest.approx(1.0, abs=1e-4)
    assert "RANDOM WEIGHTS" in card and "meeting.wav" in card

    # Streamed: the table grew one segment at a time, with the progress in seconds of the total.
    running = [u for u in updates[:-1] if isinstance(u[4], type(table))]
    assert [len(u[4]) for u in running] == list(range(len(expected) + 1))
    assert all('data-state="running"' in u[0] and " s of " in u[0] for u in updates[:-1])

    (folder,) = OutputStore(tmp_path / "outputs").folders()
    assert [Path(f) for f in files] == [folder / "timeline.json", folder / "timeline.csv"]
    saved = json.loads((folder / "timeline.json").read_text(encoding="utf-8"))
    assert saved["file"] == "meeting.wav" and saved["random_weights"] is True and saved["timestamp"]
    assert len(saved["segments"]) == len(expected) and saved["summary"]["segments"] == len(expected)
    assert saved["duration_s"] == pytest.approx(len(sf.read(str(recording))[0]) / 16_000)
    with open(folder / "timeline.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["emotion"] for row in rows] == [s.emotion for s in expected]
    assert {f"score_{label}" for label in expected[0].scores} <= set(rows[0])  # a column per score
    assert f"saved to: {folder}" in card
    metrics = service.metrics
    assert isinstance(metrics, FakeMetrics)
    assert service.timelines_closed == [len(expected)] and service.timelines_running == 0  # type: ignore[attr-defined]
    assert metrics.errors == []


def test_timeline_separate_channels_and_a_segments_file(fast_engine: Engine, tmp_path: Path) -> None:
    service = make_service(fast_engine, None)
    *_, (_, _, _, plot, table, files) = build_timeline(
        service, str(two_sided_call(tmp_path / "call.wav")), "separate"
    )
    assert {row[2] for row in table_rows(table)} == {"ch0", "ch1"}
    assert ">ch0</text>" in plot and ">ch1</text>" in plot  # a row per channel
    assert [Path(f).name for f in files] == ["timeline.json", "timeline.csv"]  # saving off: temporary

    spans = tmp_path / "diarization.rttm"
    spans.write_text(
        "SPEAKER meeting 1 2.0 3.0 <NA> <NA> alice <NA> <NA>\n"
        "SPEAKER meeting 1 7.0 3.0 <NA> <NA> bob <NA> <NA>\n",
        encoding="utf-8",
    )
    *_, (_, card, _, plot, table, _) = build_timeline(
        service, str(joined_recording(tmp_path / "meeting.wav")), "mix", str(spans)
    )
    assert [(row[0], row[1], row[2]) for row in table_rows(table)] == [
        (2.0, 5.0, "alice"),
        (7.0, 10.0, "bob"),
    ]
    assert ">alice</text>" in plot and "alice: mostly" in card


def test_timeline_errors_are_clear_and_counted(fast_engine: Engine, tmp_path: Path) -> None:
    service = make_service(fast_engine, None, max_timeline_s=10.0)
    recording = str(joined_recording(tmp_path / "meeting.wav"))  # 19 s
    garbage = tmp_path / "notes.wav"
    garbage.write_bytes(b"this is not audio" * 10)
    bad_segments = tmp_path / "segments.json"
    bad_segments.write_text('[{"start_s": 1}]', encoding="utf-8")
    good_segments = tmp_path / "ok.json"
    good_segments.write_text('[{"start_s": 1, "end_s": 2}]', encoding="utf-8")
    with pytest.raises(gr.Error, match="Upload a recording"):
        build_timeline(service, None)
    with pytest.raises(gr.Error, match=r"notes\.wav: could not decode"):
        build_timeline(service, str(garbage))
    with pytest.raises(gr.Error, match="the limit is 10 s"):
        build_timeline(service, recording)
    with pytest.raises(gr.Error, match=r"segments\.json: segment 0"):
        build_timeline(service, recording, segments=str(bad_segments))
    with pytest.raises(gr.Error, match="use channels=mix"):
        build_timeline(service, recording, "separate", str(good_segments))
    with pytest.raises(gr.Error, match="threshold"):
        build_timeline(service, recording, threshold=1.0)
    assert service.metrics.errors == [  # type: ignore[union-attr]
        "unsupported_audio",
        "audio_too_long",
        "invalid_parameter",
        "invalid_parameter",
        "invalid_parameter",
    ]
    assert service.timelines_closed == []  # type: ignore[attr-defined]  # nothing started

    service = make_service(None, None, phase="loading")
    with pytest.raises(gr.Error, match="still starting up"):
        build_timeline(service, recording)
    assert service.metrics.errors == ["not_ready"]  # type: ignore[union-attr]


def test_timeline_failing_part_way_keeps_what_was_shown(fast_engine: Engine, tmp_path: Path) -> None:
    service = make_service(fast_engine, None, timeline_fails_after=1)
    updates: list[tuple[Any, ...]] = []
    with pytest.raises(gr.Error, match="busy"):
        build_timeline(service, str(joined_recording(tmp_path / "meeting.wav")), updates=updates)
    assert updates and 'data-state="running"' in updates[-1][0]
    metrics = service.metrics
    assert isinstance(metrics, FakeMetrics)
    assert metrics.errors == ["queue_full"]
    assert service.timelines_closed == [1] and service.timelines_running == 0  # type: ignore[attr-defined]


def test_timeline_save_failure_still_shows_the_result(fast_engine: Engine, tmp_path: Path) -> None:
    service = make_service(fast_engine, tmp_path / "outputs")
    saving = UIOutputs.from_settings(service.settings)
    saving.store().root.rmdir()
    with pytest.warns(UserWarning, match="could not be saved"):
        *_, (progress, card, _, plot, table, files) = build_timeline(
            service, str(joined_recording(tmp_path / "meeting.wav", RECORDING_CLIPS[:1])), saving=saving
        )
    assert files is None and "not saved" in card
    assert len(table) == plot.count('class="tl-segment"') >= 1 and 'data-state="done"' in progress


def test_timeline_plot_rows_colours_and_axis() -> None:
    def segment(start: float, end: float, speaker: str | None, emotion: str) -> TimelineSegment:
        return TimelineSegment(start, end, speaker, emotion, "", "", 0.9, {emotion: 0.9}, False)

    segments = [segment(0, 10, "B", "sad"), segment(30, 95, "A", "happy"), segment(100, 110, "B", "sad")]
    svg = charts.timeline_svg(segments, 120.0)
    assert svg.index(">A</text>") < svg.index(">B</text>")  # rows sorted by speaker
    assert svg.count(EMOTION_COLOURS["sad"]) == 3  # two bars and the legend
    assert ">1:00</text>" in svg and ">2:00</text>" in svg  # minutes once past a minute
    assert "tl-segment" not in charts.timeline_svg([], 0.0)


def test_paced_ticks_through_silence_and_closes_early() -> None:
    """The progress moves while no segment comes; leaving early ends the source (its decoding)."""
    closed = asyncio.Event()

    async def slow() -> AsyncIterator[TimelineSegment]:
        try:
            await asyncio.sleep(0.25)
            yield TimelineSegment(0, 1, None, "sad", "", "", 1.0, {}, False)
            await asyncio.sleep(3600)
            yield TimelineSegment(1, 2, None, "sad", "", "", 1.0, {}, False)
        finally:
            closed.set()

    async def main() -> list[Any]:
        seen: list[Any] = []
        paced = long_recording._paced(slow(), 0.1)
        async for item in paced:
            seen.append(item)
            if len(seen) == 6:
                break
        await paced.aclose()
        return seen

    seen = run(main())
    assert seen[0] is None and seen.count(None) == 5  # ticks before and after the one segment
    assert closed.is_set()


# --------------------------------------------------------------------------------------------- browser


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_live_tab_runs_the_streams_session_and_a_refusal_is_said_once(
    engine: Engine, tmp_path: Path, tiny_recognizer: Recognizer
) -> None:
    """The Live tab's window, chunk by chunk as the browser sends them (WAV files of 0.25 s): its
    segments are the timeline's of the same audio, Stop gives the summary and frees the stream; a stream
    the service refuses is one error, and the chunks after it are left alone until Record."""
    from emoserve.errors import ServiceUnavailable
    from emoserve.webui.live import STREAM_EVERY_S, LiveWindow, render

    recording = joined_recording(tmp_path / "talk.wav", RECORDING_CLIPS[:2])
    samples, rate = sf.read(recording, dtype="int16")
    size = int(STREAM_EVERY_S * rate)
    chunks = []
    for n, at in enumerate(range(0, len(samples), size)):
        chunks.append(str(tmp_path / f"chunk{n}.wav"))
        sf.write(chunks[-1], samples[at : at + size], rate, subtype="PCM_16")
    service = FakeService(engine, ui_settings(None))

    async def stream(window: LiveWindow) -> None:
        for chunk in chunks:
            await window.feed(chunk)
        await window.stop()

    window = LiveWindow(service)
    run(stream(window))
    expected = list(score_segments(tiny_recognizer, Recording(str(recording))))
    assert [(s.start_s, s.end_s) for s in window.segments] == [(s.start_s, s.end_s) for s in expected]
    for got, want in zip(window.segments, expected, strict=True):
        np.testing.assert_allclose(list(got.scores.values()), list(want.scores.values()), atol=1e-5)
    card, strip, state = render(window, service)
    assert 'data-state="done"' in state and f"in {len(expected)} utterances" in state
    assert strip.count('class="tl-segment"') == len(expected) and 'id="live-random"' in card
    assert window.current is not None and window.current["type"] == "segment"
    assert service.streams_open == 0

    service.phase = "warming"
    refused = LiveWindow(service)
    with pytest.raises(ServiceUnavailable):
        run(refused.feed(chunks[0]))
    run(refused.close())  # as the tab does on the error
    run(refused.feed(chunks[1]))  # left alone: no second error
    assert refused.live is None and service.streams_open == 0


@pytest.fixture(scope="module")
def live_ui(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FakeService]]:
    """The UI mounted on a FastAPI app, served by uvicorn in a thread."""
    import uvicorn

    service = FakeService(engine, ui_settings(tmp_path_factory.mktemp("outputs")))
    app = FastAPI()
    with gradio_loops_closed():
        mount_ui(app, service, path="/")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the UI server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", service
    server.should_exit = True
    thread.join(10)


BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    """One Playwright per module: its sync API runs one at a time in a thread."""
    if not CHROMIUM.exists():
        skip_or_fail(f"{CHROMIUM} is missing: install Debian's chromium to drive the UI in a real browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="module")
def browser(playwright: Any) -> Iterator[Any]:
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=BROWSER_ARGS)
    yield browser
    browser.close()


def open_page(browser: Any, url: str) -> Any:
    page = browser.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(url)
    page.locator('#status-state[data-state="ready"]').wait_for()
    return page


def upload(page: Any, clip: Path) -> None:
    page.locator("#audio-input input[type=file]").set_input_files(str(clip))
    # the value is set once the upload finished and the player shows the clip
    page.locator("#audio-input audio, #audio-input [data-testid=waveform-controls]").first.wait_for(
        state="attached"
    )


def result_text(page: Any) -> str:
    page.locator("#result-emotion").wait_for()
    return str(page.locator("#result-card").inner_text())


def saved_folder(page: Any) -> str:
    log_text = page.locator("#log textarea").input_value()
    (line,) = [line for line in log_text.splitlines() if line.startswith("saved to: ")]
    return line.removeprefix("saved to: ")


def test_the_gradio_api_names_its_parameters_and_answers_a_client(
    live_ui: tuple[str, FakeService], tmp_path: Path, tiny_recognizer: Recognizer
) -> None:
    """As a user of the Gradio API calls it (gradio_client): both events take named parameters (a handler
    taking *args made /timeline's param_0..param_4), by which they are called, and both answer: the
    model's result, and the warning when the service says its weights are random."""
    from gradio_client import Client, handle_file

    url, _ = live_ui
    client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    names = {
        api: [p["parameter_name"] for p in endpoints[api]["parameters"]]
        for api in ("/recognize", "/timeline")
    }
    assert names == {
        "/recognize": ["audio", "granularity", "embedding"],
        "/timeline": ["audio", "channels", "max_segment_s", "threshold", "segments"],
    }
    card, _, _, log_text, files = client.predict(
        audio=handle_file(str(EXAMPLE)), granularity="utterance", embedding=False, api_name="/recognize"
    )
    expected = tiny_recognizer.predict(EXAMPLE)
    assert expected.emotion in card and f"{expected.confidence:.1%}" in card and len(files) == 2
    assert f"model: {expected.model}" in log_text
    assert ("RANDOM WEIGHTS" in log_text) == ("Random weights" in card) == expected.random_weights
    recording = joined_recording(tmp_path / "meeting.wav", RECORDING_CLIPS[:2])
    progress, summary, *_ = client.predict(
        audio=handle_file(str(recording)),
        channels="mix",
        max_segment_s=15,
        threshold=0.5,
        segments=None,
        api_name="/timeline",
    )
    assert 'data-state="done"' in progress and "RANDOM WEIGHTS" in summary and "meeting.wav" in summary


def test_browser_recognises_the_example_clip(
    browser: Any, live_ui: tuple[str, FakeService], tiny_recognizer: Recognizer
) -> None:
    url, service = live_ui
    page = open_page(browser, url)
    assert "RANDOM WEIGHTS" in page.locator("#random-weights-warning").inner_text()

    upload(page, EXAMPLE)
    page.locator("#start-button").click()
    expected = tiny_recognizer.predict(EXAMPLE)
    text = result_text(page)
    assert expected.emotion in text and expected.label_zh in text
    assert f"{expected.confidence:.1%}" in text
    assert Path(saved_folder(page)).parent == service.settings.outputs_dir
    page.close()


def test_two_windows_recognise_at_once_into_their_own_folders(
    browser: Any, live_ui: tuple[str, FakeService]
) -> None:
    url, service = live_ui
    store = OutputStore(service.settings.outputs_dir)  # the UI's own store saves into the same folder
    before = set(store.folders())
    pages = [open_page(browser, url) for _ in range(2)]
    for page, audio in zip(pages, (EXAMPLE, OTHER_EXAMPLE), strict=True):
        upload(page, audio)
    for page in pages:
        page.locator("#start-button").click()
    for page in pages:
        result_text(page)
    folders = {saved_folder(page) for page in pages}
    assert len(folders) == 2
    assert {str(f) for f in set(store.folders()) - before} == folders
    # Both in one model call: Gradio let the two windows run at once and the engine batched them.
    for page in pages:
        assert "(batch of 2)" in page.locator("#log textarea").input_value()
        page.close()


def test_browser_follows_start_up_reports_bad_input_and_draws_the_timeline(
    browser: Any, live_ui: tuple[str, FakeService], tmp_path: Path
) -> None:
    url, service = live_ui
    service.phase = "warming"
    try:
        page = browser.new_page()
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.goto(url)
        page.locator('#status-state[data-state="warming"]').wait_for()
    finally:
        service.phase = "ready"
    page.locator('#status-state[data-state="ready"]').wait_for()  # the timer refreshed the banner

    garbage = tmp_path / "notes.wav"
    garbage.write_bytes(b"this is not audio" * 50)
    upload(page, garbage)
    page.locator("#start-button").click()
    assert "notes.wav: could not decode audio" in page.get_by_text("could not decode audio").inner_text()

    page.locator("#audio-input").get_by_role("button", name="Clear").first.click()
    upload(page, EXAMPLE)  # the page keeps working after the error
    page.get_by_text("frame: a 20 ms timeline").click()
    page.locator("#embedding input").check()
    page.locator("#start-button").click()
    result_text(page)
    page.locator("#timeline").wait_for()
    downloads = page.locator("#downloads").inner_text().replace("\n", "")  # name and extension are split
    assert all(name in downloads for name in ("result.json", "processed_audio.wav", "embedding.npy"))
    assert "frame, 151 frames" in page.locator("#log textarea").input_value()
    page.close()


def test_browser_builds_the_timeline_of_a_long_recording(
    browser: Any, live_ui: tuple[str, FakeService], tmp_path: Path, tiny_recognizer: Recognizer
) -> None:
    url, service = live_ui
    recording = joined_recording(tmp_path / "meeting.wav")
    expected = list(score_segments(tiny_recognizer, Recording(str(recording))))
    page = open_page(browser, url)
    page.get_by_role("tab", name="Long recording").click()
    page.locator("#tl-audio input[type=file]").set_input_files(str(recording))
    page.locator("#tl-audio audio, #tl-audio [data-testid=waveform-controls]").first.wait_for(
        state="attached"
    )
    page.locator("#tl-start").click()
    page.locator('#tl-progress-state[data-state="done"]').wait_for()

    rows = page.locator("#tl-table [role=row]:has([role=gridcell])")
    assert rows.count() == len(expected)
    for row, segment in zip(rows.all(), expected, strict=True):
        assert f"{segment.emoji} {segment.emotion}" in row.inner_text()
    assert page.locator("#tl-svg rect.tl-segment").count() == len(expected)
    assert "RANDOM WEIGHTS" in page.locator("#tl-summary").inner_text()
    downloads = page.locator("#tl-downloads").inner_text().replace("\n", "")
    assert "timeline.json" in downloads and "timeline.csv" in downloads
    saved = page.locator("#tl-saved").inner_text().removeprefix("saved to: ")
    assert Path(saved).parent == service.settings.outputs_dir
    assert service.timelines_running == 0

    # Stop part-way: the run is cancelled and its timeline closed (which stops the decoding).
    page.locator("#tl-start").click()
    page.locator('#tl-progress-state[data-state="running"]').wait_for()
    page.locator("#tl-stop").click()
    deadline = time.monotonic() + 10
    while service.timelines_running:
        assert time.monotonic() < deadline, "the stopped run was not closed"
        time.sleep(0.05)
    assert service.timelines_closed[-1] < len(expected)
    page.close()


@pytest.fixture(scope="module")
def microphone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What Chromium's fake microphone plays, again and again: two utterances, each with a pause after."""
    return joined_recording(tmp_path_factory.mktemp("microphone") / "speech.wav", RECORDING_CLIPS[:2])


@pytest.fixture
def browser_with_microphone(playwright: Any, microphone: Path) -> Iterator[Any]:
    """Chromium whose microphone is `microphone` (a WAV file, looped), allowed without asking."""
    args = [
        *BROWSER_ARGS,
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}",
    ]
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
    yield browser
    browser.close()


def test_browser_live_tab_reads_the_microphone_while_it_plays(
    browser_with_microphone: Any, live_ui: tuple[str, FakeService]
) -> None:
    """The Live tab in a real browser, its microphone fed from a WAV file: readings appear while the
    audio plays, each utterance joins the strip when its pause comes, Stop gives the summary and frees
    the stream."""
    url, service = live_ui
    opened = service.streams_opened
    page = open_page(browser_with_microphone, url)
    page.get_by_role("tab", name="Live").click()
    page.locator("#live-audio").get_by_role("button", name="Record").click()

    page.locator('#live-emotion[data-state="interim"]').wait_for()  # a reading while the person speaks
    labels = {parse_label(token).en for token in PUBLISHED_LABELS}
    assert page.locator("#live-emotion").get_attribute("data-emotion") in labels
    assert "RANDOM WEIGHTS" in page.locator("#live-random").inner_text()
    page.locator("#live-svg rect.tl-segment").first.wait_for()  # the first utterance's pause came
    assert service.streams_open == 1 and service.streams_opened == opened + 1
    assert "Streaming 48000 Hz" in page.locator("#live-state").inner_text()

    page.locator("#live-audio").get_by_role("button", name="Stop").click()
    page.locator('#live-state[data-state="done"]').wait_for()
    assert "Stream ended" in page.locator("#live-state").inner_text()
    deadline = time.monotonic() + 10
    while service.streams_open:
        assert time.monotonic() < deadline, "the stopped stream was not closed"
        time.sleep(0.05)
    page.close()

