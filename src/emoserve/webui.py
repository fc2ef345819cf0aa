"""The Gradio web UI, mounted at "/" by the server and sharing its batching engine.

    click -> decode (thread) -> engine.submit_timed (batched with other windows' requests)
    -> save the output folder (thread) -> result card, score chart, timeline, log, downloads

The UI reads the service through `UIService` only, so that it runs on any object with those attributes
(the server's Service, or a small fake in the tests). Nothing here touches the model directly.
"""

from __future__ import annotations

import asyncio
import html
import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import gradio as gr
import numpy as np
import pandas as pd

from .audio import SAMPLE_RATE, Audio, load_audio
from .constants import EXAMPLES_DIR
from .errors import EmoserveError
from .labels import EMOJI
from .outputs import OutputStore, SavedOutput
from .recognizer import GRANULARITIES, Granularity, Result

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .engine import RequestTiming

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


class UIMetrics(Protocol):
    """What the UI reports to metrics.py (its Metrics class has these methods)."""

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
    metrics: UI recognitions are observed under route "ui"; None: not reported.
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
        gr.Markdown("# Speech emotion recognition\nUpload or record a clip, then press **Recognise**.")
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
        _refresh_status(demo, service, banner)
    demo.queue(max_size=QUEUE_MAX)
    weakref.finalize(demo, downloads.close)
    return demo


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


def scores_frame(result: Result) -> pd.DataFrame:
    """One row per label: `emotion` as "😊 happy", `probability`."""
    return pd.DataFrame(
        {
            "emotion": [f"{EMOJI.get(label, '')} {label}".strip() for label in result.scores],
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
