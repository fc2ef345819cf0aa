"""The Gradio web UI, mounted at "/" by the server and sharing its batching engine. Two tabs:

    Clip: click -> decode (thread) -> engine.submit_timed (batched with other windows' requests)
        -> save the output folder (thread) -> result card, score chart, timeline, log, downloads
    Long recording: click -> open_timeline (thread; the file's errors come here) -> Service.timeline
        (speech segments through the engine, streamed to the page with the progress) -> save
        timeline.json/.csv (thread) -> summary, timeline plot, distribution, segment table, downloads

The UI reads the service through `UIService` only, so that it runs on any object with those attributes
(the server's Service, or a small fake in the tests). Nothing here touches the model directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import gradio as gr
import numpy as np
import pandas as pd

from emoserve.audio.decode import Audio, load_audio
from emoserve.audio.segments import Recording, Span, read_spans_file
from emoserve.audio.stream import CHANNEL_MODES, Channels
from emoserve.audio.vad import DEFAULT_VAD, VadSettings
from emoserve.constants import EXAMPLES_DIR, GRANULARITIES, SAMPLE_RATE, Granularity
from emoserve.errors import EmoserveError
from emoserve.inference.results import Result, Timeline, TimelineSegment, summarise
from emoserve.inference.timeline import build_timeline
from emoserve.model.labels import EMOJI
from emoserve.webui.saved import OutputStore, SavedOutput, SavedTimeline

if TYPE_CHECKING:
    from fastapi import FastAPI

    from emoserve.serving.engine import RequestTiming

log = logging.getLogger(__name__)

EXAMPLES = (  # (file, label shown under the example list)
    ("en_3s_44k.mp3", "English · 3 s · 44.1 kHz MP3"),
    ("zh_3s_16k.wav", "Chinese · 3 s · 16 kHz WAV"),
    ("en_7s_16k.flac", "English · 7 s · 16 kHz FLAC"),
)
UPLOAD_FORMATS = "wav, mp3, m4a, flac, ogg"
# Recognitions from all browser windows in flight at once. They meet in the engine, which batches them
# and pushes back (QueueFull) beyond its own bound; Gradio's default of 1 would serialise the windows.
DEFAULT_CONCURRENCY = 16
QUEUE_MAX = 256  # Gradio's own queue in front of that: beyond it a window is told the queue is full
STATUS_REFRESH_S = 1.0  # while loading/warming: the banner follows start-up closely
READY_REFRESH_S = 10.0  # once ready only draining or a failure can follow; no need to poll fast
MAX_TIMELINE_POINTS = 400  # per label: a 10-min clip has 30,000 frames, too many for a browser plot
DOWNLOADS_KEEP = 64  # with saving off, downloads still need files; this many stay in a temp folder
# Gradio's cache holds uploads and copies of downloads: sweep hourly, drop files older than a day.
CACHE_SWEEP = (3600, 86_400)
# One colour per label wherever a chart colours emotions (the clip timeline, the long-recording plot and
# its distribution): Tableau 10 (matplotlib's default cycle), with neutral grey and happy a warmer orange.
EMOTION_COLOURS = {
    "angry": "#d62728",
    "disgusted": "#8c564b",
    "fearful": "#9467bd",
    "happy": "#ff9f1c",
    "neutral": "#9ca3af",
    "other": "#17becf",
    "sad": "#1f77b4",
    "surprised": "#e377c2",
    "unknown": "#4b5563",
}
OTHER_COLOUR = "#6b7280"  # a label outside the 9 published ones (a custom tokens.txt)


class UIMetrics(Protocol):
    """What the UI reports to metrics.py (its Metrics class has these members)."""

    def observe_request(
        self, route: str, *, decode_s: float, queue_s: float, inference_s: float, total_s: float
    ) -> None: ...

    def count_error(self, kind: str) -> None: ...


class UIService(Protocol):
    """Everything the UI reads from the service; all of it may change while the UI runs.

    state: "loading" | "warming" | "ready" | "failed: <reason>" | "draining" ("starting" and a bare
        "failed" are understood too); recognitions are accepted only when "ready".
    recognize: the service's recognition (decoded audio -> the shared batching engine), as the API's;
        it raises ServiceUnavailable when not ready.
    require_ready: raises ServiceUnavailable (an EmoserveError) unless the service is ready.
    model_name: shown in the banner; None until the model is loaded.
    random_weights: the model's predictions are meaningless: the UI warns loudly. None until loaded.
    outputs: where each recognition is saved; None when saving is off (downloads then use a temporary
        folder that keeps only the last DOWNLOADS_KEEP).
    max_audio_s: longer uploads are refused with a message.
    open_timeline: opens a long recording (blocking; the UI runs it in a thread); the file's errors and
        max_timeline_s are raised here, as EmoserveErrors.
    timeline: the job's scored segments as they come, through the shared engine; leaving the iteration
        early stops the decoding.
    metrics: UI recognitions are observed under route "ui" (timelines by Service.timeline itself); None:
        not reported.
    """

    @property
    def state(self) -> str: ...
    async def recognize(
        self, audio: Audio, granularity: Granularity = "utterance", embedding: bool = False
    ) -> tuple[Result, RequestTiming]: ...

    def require_ready(self) -> None: ...
    @property
    def model_name(self) -> str | None: ...
    @property
    def random_weights(self) -> bool | None: ...
    @property
    def outputs(self) -> OutputStore | None: ...
    @property
    def max_audio_s(self) -> float: ...
    def open_timeline(
        self,
        source: Any,
        *,
        name: str | None = ...,
        channels: Channels = ...,
        vad: VadSettings = ...,
        spans: Sequence[Span] | None = ...,
    ) -> Recording: ...

    def timeline(self, job: Recording) -> AsyncIterator[TimelineSegment]: ...
    @property
    def metrics(self) -> UIMetrics | None: ...


@dataclass(frozen=True)
class Recognition:
    """One finished recognition: everything the outputs are drawn from."""

    file_name: str
    file_bytes: int
    audio: Audio
    result: Result
    timing: RequestTiming
    decode_s: float
    total_s: float
    saved: SavedOutput | None  # None: saving failed
    persistent: bool  # saved in the service's output store (False: temporary downloads only)


# ------------------------------------------------------------------------------------------- building


def build_ui(service: UIService, *, concurrency_limit: int | None = DEFAULT_CONCURRENCY) -> gr.Blocks:
    """The whole UI; mount it with `mount_ui` (or gr.mount_gradio_app with the same allowed paths)."""
    downloads = _TemporaryDownloads()
    with gr.Blocks(
        title="emoserve · speech emotion recognition", analytics_enabled=False, delete_cache=CACHE_SWEEP
    ) as demo:
        banner = gr.HTML(banner_html(service), elem_id="status-banner")
        gr.Markdown("# Speech emotion recognition")
        with gr.Tabs():
            with gr.Tab("Clip", id="clip", elem_id="tab-clip"):
                _clip_tab(service, downloads, concurrency_limit)
            with gr.Tab("Long recording", id="long", elem_id="tab-long"):
                _long_recording_tab(service, downloads)
        _refresh_status(demo, service, banner)
    demo.queue(max_size=QUEUE_MAX)
    weakref.finalize(demo, downloads.close)
    return demo


def _clip_tab(service: UIService, downloads: _TemporaryDownloads, concurrency_limit: int | None) -> None:
    gr.Markdown("Upload or record a clip, then press **Recognise**.")
    with gr.Row():
        with gr.Column(scale=1):
            inputs = _inputs()
        with gr.Column(scale=1):
            outputs = _result_views()
    with gr.Row():
        outputs += _details()

    async def on_start(path: str | None, chosen: str, with_embedding: bool) -> tuple[Any, ...]:
        return render(await recognize(service, downloads, path, chosen, with_embedding))

    inputs.start.click(
        on_start,
        inputs=[inputs.audio, inputs.granularity, inputs.embedding],
        outputs=outputs,
        api_name="recognize",
        concurrency_limit=concurrency_limit,
    )


@dataclass(frozen=True)
class _Inputs:
    audio: gr.Audio
    granularity: gr.Radio
    embedding: gr.Checkbox
    start: gr.Button


def _inputs() -> _Inputs:
    audio = gr.Audio(
        sources=["upload", "microphone"],
        type="filepath",  # the file as uploaded: the log reports its own rate and channels
        label=f"Audio ({UPLOAD_FORMATS}; click, drop or record)",
        elem_id="audio-input",
    )
    granularity = gr.Radio(
        [("utterance: one label for the clip", "utterance"), ("frame: a 20 ms timeline", "frame")],
        value="utterance",
        label="Granularity",
        elem_id="granularity",
    )
    embedding = gr.Checkbox(False, label="Extract embedding (embedding.npy)", elem_id="embedding")
    start = gr.Button("Recognise", variant="primary", elem_id="start-button")
    gr.Examples(
        [[str(EXAMPLES_DIR / name)] for name, _ in EXAMPLES],
        inputs=[audio],
        example_labels=[label for _, label in EXAMPLES],
        label="Example clips",
    )
    return _Inputs(audio, granularity, embedding, start)


def _result_views() -> list[gr.components.Component]:
    """The result card, the score chart and the timeline (shown for frame results only)."""
    card = gr.HTML(_empty_card(), elem_id="result-card")
    scores = gr.BarPlot(
        x="emotion", y="probability", sort="-y", y_lim=[0, 1], label="All scores", elem_id="scores"
    )
    timeline = gr.LinePlot(
        x="time_s",
        y="probability",
        color="emotion",
        y_lim=[0, 1],
        x_title="time (s)",
        color_map=EMOTION_COLOURS,
        label="Emotion timeline",
        visible=False,
        elem_id="timeline",
    )
    return [card, scores, timeline]


def _details() -> list[gr.components.Component]:
    """The processing log and the downloads."""
    log_box = gr.Textbox(label="Processing log", lines=9, interactive=False, elem_id="log")
    files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
    return [log_box, files]


def _refresh_status(demo: gr.Blocks, service: UIService, banner: gr.HTML) -> None:
    """The banner on page load and then periodically, so a page opened while loading turns ready."""
    timer = gr.Timer(STATUS_REFRESH_S)
    event: dict[str, Any] = {
        "fn": lambda: status(service),
        "outputs": [banner, timer],
        "show_progress": "hidden",
        "queue": False,  # a trivial read: it must not wait behind recognitions in Gradio's queue
        "api_visibility": "private",
    }
    timer.tick(**event)
    demo.load(**event)


def mount_ui(app: FastAPI, service: UIService, path: str = "/", **mount_kwargs: Any) -> FastAPI:
    """Mount the UI on `app` (register the app's own routes first: "/" catches everything else).
    `mount_kwargs` go to gr.mount_gradio_app, e.g. auth_dependency= or max_file_size=."""
    allowed = [str(EXAMPLES_DIR)]
    if service.outputs is not None:
        allowed.append(str(service.outputs.root.resolve()))
    options: dict[str, Any] = {
        "allowed_paths": allowed,
        "ssr_mode": False,  # server-side rendering needs Node.js; the client renders fine alone
        "run_history": False,  # recordings of users' audio stay out of browser storage
        "footer_links": ["api", "settings"],
    }
    return gr.mount_gradio_app(app, build_ui(service), path=path, **{**options, **mount_kwargs})


# ---------------------------------------------------------------------------------------- recognising


async def recognize(
    service: UIService, downloads: _TemporaryDownloads, path: str | None, chosen: str, with_embedding: bool
) -> Recognition:
    """decode -> engine -> save; every failure becomes a gr.Error that the page shows."""
    started = time.perf_counter()
    granularity = _granularity(chosen)
    try:
        service.require_ready()
    except EmoserveError as error:
        raise _failed(service, error) from None
    if not path:
        raise gr.Error(f"Upload a clip ({UPLOAD_FORMATS}) or record one first.", title="No audio")
    file_name = Path(path).name
    try:
        audio = await asyncio.to_thread(load_audio, path, max_seconds=service.max_audio_s, name=file_name)
        decode_s = time.perf_counter() - started
        result, timing = await service.recognize(audio, granularity, with_embedding)
    except EmoserveError as error:
        raise _failed(service, error) from None
    store, persistent = (service.outputs, True) if service.outputs is not None else (downloads.store(), False)
    saved = await _save(store, result, audio, file_name)
    recognition = Recognition(
        file_name=file_name,
        file_bytes=_size(path),
        audio=audio,
        result=result,
        timing=timing,
        decode_s=decode_s,
        total_s=time.perf_counter() - started,
        saved=saved,
        persistent=persistent,
    )
    _observe(service, recognition)
    return recognition


async def _save(store: OutputStore, result: Result, audio: Audio, file_name: str) -> SavedOutput | None:
    """The output folder; a full or read-only disk costs the downloads, not the result on screen."""
    try:
        return await asyncio.to_thread(
            store.save, result, audio.samples, extra=_saved_fields(file_name, audio)
        )
    except OSError as error:
        log.warning("could not save the output folder under %s: %s", store.root, error)
        gr.Warning(html.escape(f"The result could not be saved ({error}); there are no downloads."))
        return None


def _granularity(chosen: str) -> Granularity:
    for granularity in GRANULARITIES:
        if chosen == granularity:
            return granularity
    raise gr.Error(f"granularity is {chosen!r}; choose utterance or frame", title="Bad option")


# What the page says for the errors whose API message is written for programs (by their code)
_UI_MESSAGES = {
    "not_ready": "The model is still starting up; try again in a few seconds.",
    "start_up_failed": "The model could not be loaded; ask the operator to check the service log.",
    "draining": "The service is shutting down; try again once it is back.",
    "queue_full": "The service is busy; try again in {retry} s.",
}


def _failed(service: UIService, error: EmoserveError) -> gr.Error:
    """The page's error for a domain error; counted under its code, as the API counts it."""
    if service.metrics is not None:
        service.metrics.count_error(error.code)
    retry = math.ceil(error.retry_after_s or 1)
    message = _UI_MESSAGES.get(error.code, "{error}").format(retry=retry, error=error)
    if error.code in ("not_ready", "start_up_failed"):
        message += f" ({service.state})"
    if error.status == 503:
        title = "Not available"
    elif error.status < 500:
        title = "Cannot use this audio"
    else:
        title = "No result"
    return gr.Error(html.escape(message), title=title, print_exception=False)


def _observe(service: UIService, recognition: Recognition) -> None:
    if service.metrics is not None:
        service.metrics.observe_request(
            "ui",
            decode_s=recognition.decode_s,
            queue_s=recognition.timing.queue_s,
            inference_s=recognition.timing.inference_s,
            total_s=recognition.total_s,
        )


def _saved_fields(file_name: str, audio: Audio) -> dict[str, Any]:
    """Extra result.json fields: where the audio came from and how it was converted."""
    return {
        "input": {
            "file_name": file_name,
            "original_sample_rate": audio.original_sample_rate,
            "original_channels": audio.original_channels,
            "original_duration_s": round(audio.original_duration_s, 6),
            "container": audio.container,
            "decoder": audio.decoder,
            "resampled": audio.resampled,
        }
    }


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class _TemporaryDownloads:
    """With saving off, download files still have to live somewhere until the browser fetches them."""

    def __init__(self) -> None:
        self._store: OutputStore | None = None

    def store(self) -> OutputStore:
        if self._store is None:  # created on first use: a UI with saving on never makes one
            root = Path(tempfile.mkdtemp(prefix="emoserve-downloads-"))
            self._store = OutputStore(root, keep=DOWNLOADS_KEEP)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            shutil.rmtree(self._store.root, ignore_errors=True)


# ------------------------------------------------------------------------------------------- rendering


def render(recognition: Recognition) -> tuple[Any, ...]:
    """Values for (result card, score chart, timeline, log, downloads)."""
    result = recognition.result
    frames = timeline_frame(result)
    return (
        result_card(result),
        scores_frame(result),
        gr.LinePlot(value=frames, visible=frames is not None),
        processing_log(recognition),
        [str(path) for path in recognition.saved.files] if recognition.saved else None,
    )


def result_card(result: Result) -> str:
    warning = (
        '<div style="margin-top:8px;color:#b91c1c;font-weight:600">'
        "⚠️ Random weights: this result is meaningless (test model).</div>"
        if result.random_weights
        else ""
    )
    return (
        '<div style="text-align:center;padding:12px">'
        f'<div style="font-size:64px;line-height:1.1">{html.escape(result.emoji)}</div>'
        f'<div id="result-emotion" style="font-size:28px;font-weight:700">{html.escape(result.emotion)}'
        f" · {html.escape(result.label_zh)}</div>"
        f'<div id="result-confidence" style="font-size:18px">confidence {result.confidence:.1%}</div>'
        f"{warning}</div>"
    )


def _empty_card() -> str:
    return '<div style="text-align:center;padding:12px;opacity:0.6">The result appears here.</div>'


def emotion_colour(label: str) -> str:
    return EMOTION_COLOURS.get(label, OTHER_COLOUR)


def _display(label: str) -> str:
    """How charts name a label: "😊 happy"."""
    return f"{EMOJI.get(label, '')} {label}".strip()


def _display_colours() -> dict[str, str]:
    return {_display(label): colour for label, colour in EMOTION_COLOURS.items()}


def scores_frame(result: Result) -> pd.DataFrame:
    """One row per label: `emotion` (as `_display` names it), `probability`."""
    return pd.DataFrame(
        {
            "emotion": [_display(label) for label in result.scores],
            "probability": list(result.scores.values()),
        }
    )


def timeline_frame(result: Result, max_points: int = MAX_TIMELINE_POINTS) -> pd.DataFrame | None:
    """Long-format per-label curves (`time_s`, `emotion`, `probability`); None for utterance results.
    More than `max_points` frames are averaged in equal windows, so the plot stays light."""
    if not result.frames:
        return None
    labels = list(result.scores)
    scores = np.array(
        [[frame.scores[label] for label in labels] for frame in result.frames]
    )  # (frames, labels)
    starts = np.array([frame.start_s for frame in result.frames])
    window = math.ceil(len(result.frames) / max_points)
    if window > 1:
        edges = np.arange(0, len(result.frames), window)
        scores = (
            np.add.reduceat(scores, edges, axis=0) / np.diff(np.append(edges, len(result.frames)))[:, None]
        )
        starts = starts[edges]
    return pd.DataFrame(
        {
            "time_s": np.repeat(starts, len(labels)),
            "emotion": labels * len(starts),
            "probability": scores.reshape(-1),
        }
    )


def processing_log(recognition: Recognition) -> str:
    audio, result, timing = recognition.audio, recognition.result, recognition.timing
    where = "saved to" if recognition.persistent else "saving is off; temporary downloads in"
    lines = [
        f"file: {recognition.file_name} ({_human_bytes(recognition.file_bytes)}, "
        f"{audio.container or 'unknown container'}, decoded by {audio.decoder})",
        f"audio: {audio.original_duration_s:.2f} s at {audio.original_sample_rate} Hz, "
        f"{audio.original_channels} channel{'s' if audio.original_channels != 1 else ''}",
        f"conversion: {conversion(audio)}",
        f"model input: {audio.duration_s:.2f} s, {len(audio.samples)} samples at {SAMPLE_RATE} Hz",
        f"timings: decode {recognition.decode_s:.3f} s, queue {timing.queue_s:.3f} s, "
        f"inference {timing.inference_s:.3f} s (batch of {timing.batch_size}), "
        f"total {recognition.total_s:.3f} s",
        f"result: {result.emotion} ({result.label_zh}) {result.confidence:.3f}, {result.granularity}"
        + (f", {len(result.frames)} frames" if result.frames else ""),
        f"model: {result.model}"
        + (" (RANDOM WEIGHTS: meaningless predictions)" if result.random_weights else ""),
        f"{where}: {recognition.saved.folder}" if recognition.saved else "not saved: see the warning",
    ]
    return "\n".join(lines)


def conversion(audio: Audio) -> str:
    steps = []
    if audio.original_channels > 1:
        steps.append(f"mixed {audio.original_channels} channels to mono")
    if audio.resampled:
        steps.append(f"resampled {audio.original_sample_rate} Hz -> {SAMPLE_RATE} Hz (soxr HQ)")
    return "; ".join(steps) if steps else f"none (already mono {SAMPLE_RATE} Hz)"


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB"):
        if size < 1000 or unit == "MB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------- long recordings

CHANNEL_CHOICES = [
    ("mix: one timeline for the recording", "mix"),
    ("separate: one row per channel (e.g. a call's two sides)", "separate"),
]
MAX_SEGMENT_S_RANGE = (1.0, 60.0)  # VadSettings needs >= 1 s; emotion2vec was trained on a few seconds
SEGMENTS_FILE_TYPES = [".json", ".rttm", ".txt"]
# Each run holds a decoding thread and a VAD; the engine bounds the segments it queues. Beyond this many
# at once a window waits in Gradio's queue, so long recordings cannot take every core from the clip tab.
TIMELINE_CONCURRENCY = 4
UPDATE_S = 1.0  # the table and the plot grow with the recording: they are sent again at most this often
TICK_S = 0.5  # the progress moves this often even while no segment comes (a long silence)
PLOT_WIDTH, PLOT_LEFT, PLOT_RIGHT = 1000, 90, 10  # SVG user units; the plot scales to the page's width
ROW_H, AXIS_H = 30, 26


def _long_recording_tab(service: UIService, downloads: _TemporaryDownloads) -> None:
    gr.Markdown(
        "Upload or record a long recording (a call, a meeting, a podcast). Its speech is cut into "
        "segments (silero-vad, or your own segments file) and each segment gets an emotion."
    )
    with gr.Row():
        with gr.Column(scale=1):
            audio = gr.Audio(
                sources=["upload", "microphone"],
                type="filepath",  # the path goes to open_timeline, which streams the file
                label=f"Recording ({UPLOAD_FORMATS})",
                elem_id="tl-audio",
            )
            channels = gr.Radio(CHANNEL_CHOICES, value="mix", label="Channels", elem_id="tl-channels")
            with gr.Row():
                max_segment = gr.Slider(
                    *MAX_SEGMENT_S_RANGE,
                    value=DEFAULT_VAD.max_segment_s,
                    step=1,
                    label="Longest segment (s); longer speech is cut at a pause",
                    elem_id="tl-max-segment",
                )
                threshold = gr.Slider(
                    0.05,
                    0.95,
                    value=DEFAULT_VAD.threshold,
                    step=0.05,
                    label="VAD threshold",
                    elem_id="tl-threshold",
                )
            segments_file = gr.File(
                label="Segments (optional): JSON [{start_s, end_s, speaker}] or RTTM, instead of the VAD",
                file_types=SEGMENTS_FILE_TYPES,
                type="filepath",
                elem_id="tl-segments",
            )
            with gr.Row():
                start = gr.Button("Build timeline", variant="primary", elem_id="tl-start")
                stop = gr.Button("Stop", variant="stop", elem_id="tl-stop")
        with gr.Column(scale=1):
            views = [
                gr.HTML(progress_html(0.0, None, 0, 0.0), elem_id="tl-progress"),
                gr.HTML(_empty_timeline_card(), elem_id="tl-summary"),
                gr.BarPlot(
                    x="emotion",
                    y="share",
                    color="emotion",
                    color_map=_display_colours(),
                    sort="-y",
                    y_lim=[0, 1],
                    label="Distribution over the speech (time-weighted mean score)",
                    elem_id="tl-distribution",
                ),
            ]
    views.append(gr.HTML(timeline_svg([], 0.0), elem_id="tl-plot"))
    views.append(
        gr.Dataframe(headers=list(TABLE_COLUMNS), interactive=False, label="Segments", elem_id="tl-table")
    )
    views.append(gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="tl-downloads"))

    async def on_start(*args: Any) -> AsyncIterator[tuple[Any, ...]]:
        async for values in timeline_updates(service, downloads, *args):
            yield values

    run = start.click(
        on_start,
        inputs=[audio, channels, max_segment, threshold, segments_file],
        outputs=views,
        api_name="timeline",
        concurrency_limit=TIMELINE_CONCURRENCY,
        concurrency_id="timeline",
        show_progress="minimal",
    )
    stop.click(None, cancels=[run], api_visibility="private")


@dataclass(frozen=True)
class TimelineRequest:
    """The tab's inputs, checked."""

    path: str
    name: str
    channels: Channels
    vad: VadSettings
    spans: list[Span] | None


def timeline_request(
    service: UIService,
    path: str | None,
    channels: str,
    max_segment_s: float,
    threshold: float,
    segments_path: str | None,
) -> TimelineRequest:
    """Every input checked, with a message that names it, before any work."""
    try:
        service.require_ready()
    except EmoserveError as error:
        raise _failed(service, error) from None
    if not path:
        raise gr.Error(f"Upload a recording ({UPLOAD_FORMATS}) or record one first.", title="No audio")
    mode = next((mode for mode in CHANNEL_MODES if mode == channels), None)
    if mode is None:
        raise gr.Error(f"channels is {channels!r}; choose mix or separate", title="Bad option")
    try:
        vad = VadSettings(threshold=float(threshold), max_segment_s=float(max_segment_s))
    except (TypeError, ValueError) as error:  # counted as the API counts a bad query parameter
        raise _failed(service, EmoserveError(str(error), code="invalid_parameter")) from None
    try:
        spans = read_spans_file(segments_path, Path(segments_path).name) if segments_path else None
    except EmoserveError as error:
        raise _failed(service, error) from None
    return TimelineRequest(path, Path(path).name, mode, vad, spans)


async def timeline_updates(
    service: UIService,
    downloads: _TemporaryDownloads,
    path: str | None,
    channels: str,
    max_segment_s: float,
    threshold: float,
    segments_path: str | None,
) -> AsyncIterator[tuple[Any, ...]]:
    """open (thread) -> segments as they are scored, streamed to the page -> save (thread) -> results.
    Yields values for (progress, summary, distribution, plot, table, downloads)."""
    started = time.perf_counter()
    request = timeline_request(service, path, channels, max_segment_s, threshold, segments_path)
    job = await _open_timeline(service, request)
    segments: list[TimelineSegment] = []
    try:
        yield _running_views(job, segments, started, with_results=True)
        sent_at, sent_count = time.monotonic(), 0
        async with contextlib.aclosing(_paced(service.timeline(job), TICK_S)) as paced:
            async for segment in paced:
                if segment is not None:
                    segments.append(segment)
                fresh = len(segments) > sent_count and time.monotonic() - sent_at >= UPDATE_S
                if fresh or segment is None:  # a tick moves the progress; segments go out every UPDATE_S
                    yield _running_views(job, segments, started, with_results=fresh)
                if fresh:
                    sent_at, sent_count = time.monotonic(), len(segments)
        timeline = build_timeline(job, segments, service.model_name or "", bool(service.random_weights))
    except EmoserveError as error:
        raise _failed(service, error) from None
    store, persistent = (service.outputs, True) if service.outputs is not None else (downloads.store(), False)
    saved = await _save_timeline(store, timeline)
    yield finished_views(timeline, saved, persistent, time.perf_counter() - started)


async def _open_timeline(service: UIService, request: TimelineRequest) -> Recording:
    try:
        return await asyncio.to_thread(
            service.open_timeline,
            request.path,
            name=request.name,
            channels=request.channels,
            vad=request.vad,
            spans=request.spans,
        )
    except EmoserveError as error:
        raise _failed(service, error) from None


async def _paced(
    segments: AsyncIterator[TimelineSegment], tick_s: float
) -> AsyncGenerator[TimelineSegment | None, None]:
    """The segments, and a None every `tick_s` while the next one is not there yet. The pending step is
    never cancelled by a tick (that would end the iteration); leaving early closes the iteration."""

    async def step() -> TimelineSegment:
        return await anext(segments)

    pending = asyncio.ensure_future(step())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=tick_s)
            if not done:
                yield None
                continue
            try:
                segment = pending.result()
            except StopAsyncIteration:
                return
            yield segment
            pending = asyncio.ensure_future(step())
    finally:
        if not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        closing = getattr(segments, "aclose", None)
        if closing is not None:
            await closing()


async def _save_timeline(store: OutputStore, timeline: Timeline) -> SavedTimeline | None:
    """As `_save`: a full or read-only disk costs the downloads, not the result on screen."""
    try:
        return await asyncio.to_thread(store.save_timeline, timeline)
    except OSError as error:
        log.warning("could not save the timeline folder under %s: %s", store.root, error)
        gr.Warning(html.escape(f"The timeline could not be saved ({error}); there are no downloads."))
        return None


def _running_views(
    job: Recording, segments: list[TimelineSegment], started: float, *, with_results: bool
) -> tuple[Any, ...]:
    """While scoring: the progress always; the plot, distribution and table only `with_results` (they
    grow with the recording, so they are not sent with every tick)."""
    total_s = job.stream.info.duration_s
    progress = progress_html(job.duration_s, total_s, len(segments), time.perf_counter() - started)
    if not with_results:
        return (progress, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
    return (
        progress,
        _running_card(),
        distribution_frame(summarise(segments)),
        timeline_svg(segments, max(total_s or 0.0, job.duration_s)),
        segment_table(segments),
        None,
    )


def finished_views(
    timeline: Timeline, saved: SavedTimeline | None, persistent: bool, elapsed_s: float
) -> tuple[Any, ...]:
    return (
        progress_html(timeline.duration_s, timeline.duration_s, len(timeline.segments), elapsed_s, True),
        timeline_card(timeline, saved, persistent),
        distribution_frame(timeline.summary),
        timeline_svg(timeline.segments, timeline.duration_s),
        segment_table(timeline.segments),
        [str(path) for path in saved.files] if saved else None,
    )


# ------------------------------------------------------------------------ long recordings: rendering

TABLE_COLUMNS = ("start (s)", "end (s)", "speaker", "emotion", "confidence", "split")


def segment_table(segments: Sequence[TimelineSegment]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            (
                round(s.start_s, 2),
                round(s.end_s, 2),
                s.speaker or "",
                f"{s.emoji} {s.emotion} · {s.label_zh}",
                round(s.confidence, 3),
                "yes" if s.split else "",
            )
            for s in segments
        ],
        columns=list(TABLE_COLUMNS),
    )


def distribution_frame(summary: dict[str, Any]) -> pd.DataFrame:
    """The summary's time-weighted distribution: `emotion` as "😊 happy", `share`."""
    # The chart keeps the colour scale of the first value it is sent (Gradio 6.31 updates only the data),
    # so before any speech it gets every published label at 0: never an empty, untyped column.
    distribution: dict[str, float] = summary.get("distribution") or dict.fromkeys(EMOTION_COLOURS, 0.0)
    return pd.DataFrame(
        {
            "emotion": pd.Series([_display(label) for label in distribution], dtype=str),
            "share": pd.Series(list(distribution.values()), dtype=float),
        }
    )


def progress_html(
    done_s: float, total_s: float | None, segments: int, elapsed_s: float, finished: bool = False
) -> str:
    """A bar of audio seconds read out of the total (the header's; unknown for some streams)."""
    known = total_s is not None and total_s > 0
    if finished:
        text = f"Done: {done_s:.1f} s of audio, {segments} segments in {elapsed_s:.1f} s."
    elif known:
        text = f"{done_s:.1f} s of {total_s:.1f} s read · {segments} segments scored · {elapsed_s:.0f} s"
    else:
        text = f"{done_s:.1f} s read · {segments} segments scored · {elapsed_s:.0f} s"
    if finished or known:
        top = max(total_s or done_s, done_s, 1e-9)
        bar = f'<progress value="{min(done_s, top):.3f}" max="{top:.3f}" style="width:100%"></progress>'
    else:
        bar = '<progress style="width:100%"></progress>'  # indeterminate
    state = "done" if finished else "running"
    return f'<div id="tl-progress-state" data-state="{state}">{bar}<div>{html.escape(text)}</div></div>'


def _empty_timeline_card() -> str:
    return '<div style="padding:12px;opacity:0.6">The timeline appears here.</div>'


def _running_card() -> str:
    return '<div style="padding:12px;opacity:0.8">Scoring the speech segments as they are found…</div>'


def timeline_card(timeline: Timeline, saved: SavedTimeline | None, persistent: bool) -> str:
    """The dominant emotion, how much speech, per speaker; where it was saved; the random-weights warning."""
    summary = timeline.summary
    lines = [
        f"{html.escape(timeline.file)}: {timeline.duration_s:.1f} s, {timeline.speech_s:.1f} s of speech "
        f"in {len(timeline.segments)} segments"
    ]
    for speaker, part in (summary.get("speakers") or {}).items():
        lines.append(
            f"{html.escape(speaker)}: mostly {_dominant(part, timeline)} over {part['speech_s']:.1f} s"
        )
    where = "saved to" if persistent else "saving is off; temporary downloads in"
    saved_line = f"{where}: {saved.folder}" if saved else "not saved: see the warning"
    lines.append(f'<span id="tl-saved">{html.escape(saved_line)}</span>')
    top = _dominant(summary, timeline) if summary.get("dominant") else "no speech found"
    body = "".join(f"<div>{line}</div>" for line in lines)
    return (
        '<div style="padding:12px">'
        f'<div id="tl-dominant" style="font-size:24px;font-weight:700">{top}</div>'
        f'<div style="margin-top:6px">{body}</div>'
        f"{random_weights_warning() if timeline.random_weights else ''}</div>"
    )


def _dominant(summary: dict[str, Any], timeline: Timeline) -> str:
    """'😊 happy · 开心 (62% of the speech)' for a summary's dominant emotion."""
    label = summary["dominant"]
    if label is None:
        return "no speech"
    names = next(
        (f"{s.emoji} {s.emotion} · {s.label_zh}" for s in timeline.segments if s.emotion == label), label
    )
    share = summary["seconds"][label] / summary["speech_s"] if summary["speech_s"] else 0.0
    return html.escape(f"{names} ({share:.0%} of the speech)")


def timeline_svg(segments: Sequence[TimelineSegment], duration_s: float) -> str:
    """One bar per segment on a row per speaker (channel), coloured by emotion; hover for details."""
    rows = sorted({s.speaker for s in segments}, key=lambda sp: (sp is not None, sp or ""))
    rows = rows or [None]
    duration_s = max([duration_s, *(s.end_s for s in segments), 1e-9])
    scale = (PLOT_WIDTH - PLOT_LEFT - PLOT_RIGHT) / duration_s  # user units per second
    height = len(rows) * ROW_H + AXIS_H
    parts = [
        f'<svg id="tl-svg" viewBox="0 0 {PLOT_WIDTH} {height}" width="100%" '
        'xmlns="http://www.w3.org/2000/svg" style="font:12px sans-serif">'
    ]
    for i, speaker in enumerate(rows):
        name = speaker if speaker is not None else "all"
        y = i * ROW_H + ROW_H / 2 + 4
        parts.append(
            f'<text x="{PLOT_LEFT - 6}" y="{y:.1f}" text-anchor="end">{html.escape(name[:12])}</text>'
        )
    for s in segments:
        x = PLOT_LEFT + s.start_s * scale
        width = max(s.duration_s * scale, 1.0)
        y = rows.index(s.speaker) * ROW_H + 4
        tip = f"{s.start_s:.2f}-{s.end_s:.2f} s · {s.emoji} {s.emotion} {s.confidence:.0%}"
        parts.append(
            f'<rect class="tl-segment" data-emotion="{html.escape(s.emotion)}" x="{x:.1f}" y="{y}" '
            f'width="{width:.1f}" height="{ROW_H - 8}" rx="2" fill="{emotion_colour(s.emotion)}">'
            f"<title>{html.escape(tip)}</title></rect>"
        )
    parts += _axis(duration_s, scale, len(rows) * ROW_H)
    parts.append("</svg>")
    return "".join(parts) + _legend(segments)


def _axis(duration_s: float, scale: float, top: float) -> list[str]:
    step = _tick_step(duration_s)
    parts = [f'<line x1="{PLOT_LEFT}" x2="{PLOT_WIDTH - PLOT_RIGHT}" y1="{top}" y2="{top}" stroke="#888"/>']
    for n in range(int(duration_s / step) + 1):
        t = n * step
        x = PLOT_LEFT + t * scale
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + 4}" stroke="#888"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + 18}" text-anchor="middle">{_clock(t, step)}</text>')
    return parts


def _tick_step(duration_s: float, ticks: int = 10) -> float:
    """1, 2 or 5 times a power of ten, so that about `ticks` ticks span the recording."""
    raw = max(duration_s / ticks, 1e-3)
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _clock(t: float, step: float) -> str:
    if t < 60:
        return f"{t:g} s" if step < 1 else f"{t:.0f} s"
    minutes, seconds = divmod(round(t), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _legend(segments: Sequence[TimelineSegment]) -> str:
    present = {s.emotion for s in segments}
    labels = [label for label in EMOTION_COLOURS if label in present] + sorted(present - set(EMOTION_COLOURS))
    items = "".join(
        f'<span style="margin-right:12px"><span style="display:inline-block;width:12px;height:12px;'
        f'border-radius:2px;background:{emotion_colour(label)};vertical-align:middle"></span> '
        f"{html.escape(_display(label))}</span>"
        for label in labels
    )
    return f'<div id="tl-legend" style="margin-top:4px">{items}</div>'


# ----------------------------------------------------------------------------------------------- status


def status(service: UIService) -> tuple[str, gr.Timer]:
    """The banner, and how soon to look again."""
    ready = service.state == "ready"
    return banner_html(service), gr.Timer(READY_REFRESH_S if ready else STATUS_REFRESH_S)


_BANNER_STYLES = {  # state -> (icon, background, text colour)
    "ready": ("✅", "#dcfce7", "#14532d"),
    "failed": ("❌", "#fee2e2", "#7f1d1d"),
    "draining": ("⏸️", "#fef3c7", "#78350f"),
}
_STARTING_STYLE = ("⏳", "#dbeafe", "#1e3a8a")


def banner_html(service: UIService) -> str:
    state = service.state
    kind = state.split(":", 1)[0]
    icon, background, colour = _BANNER_STYLES.get(kind, _STARTING_STYLE)
    text = {
        "ready": f"Ready: {service.model_name or 'model'} is loaded and warmed up.",
        "failed": f"The model could not be loaded ({state}).",
        "draining": "The service is shutting down; recognitions are no longer accepted.",
        "warming": "Warming up the model on real clips; ready in a moment…",
    }.get(kind, f"Loading the model ({state})…")
    box = f"padding:10px 14px;border-radius:8px;background:{background};color:{colour};font-weight:600"
    state_div = f'<div id="status-state" data-state="{html.escape(kind)}" style="{box}">'
    parts = [f"{state_div}{icon} {html.escape(text)}</div>"]
    if service.random_weights:
        parts.append(random_weights_warning())
    return "\n".join(parts)


def random_weights_warning() -> str:
    return (
        '<div id="random-weights-warning" style="margin-top:8px;padding:14px;border-radius:8px;'
        'background:#b91c1c;color:white;font-size:18px;font-weight:700">'
        "⚠️ RANDOM WEIGHTS: this model was not trained, so its emotions are meaningless. "
        "Use it to try the service, not to judge audio.</div>"
    )
