"""The Long-recording tab: click -> open_timeline (thread; the file's errors come here) -> Service.timeline
(speech segments through the engine, streamed to the page with the progress) -> save timeline.json/.csv
(thread) -> summary, timeline plot, distribution, segment table, downloads."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import html
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from emoserve.audio.segments import Recording, Span, read_spans_file
from emoserve.audio.vad import DEFAULT_VAD, VadSettings
from emoserve.constants import CHANNEL_MODES, Channels
from emoserve.errors import EmoserveError
from emoserve.inference.results import Timeline, TimelineSegment, summarise
from emoserve.inference.timeline import build_timeline
from emoserve.webui.charts import (
    TABLE_COLUMNS,
    display_colours,
    distribution_frame,
    segment_table,
    timeline_svg,
)
from emoserve.webui.clip import audio_input, chosen_head, head_input
from emoserve.webui.protocol import UIService
from emoserve.webui.saved import SavedTimeline, UIOutputs, saved_line
from emoserve.webui.status import (
    UPLOAD_FORMATS,
    bad_option,
    check_ready,
    no_audio,
    page_errors,
    random_weights_warning,
    ui_error,
)

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


# ------------------------------------------------------------------------------------------- building


def long_recording_tab(service: UIService, outputs: UIOutputs) -> None:
    gr.Markdown(
        "Upload or record a long recording (a call, a meeting, a podcast). Its speech is cut into "
        "segments (silero-vad, or your own segments file) and each segment gets an emotion."
    )
    with gr.Row():
        with gr.Column(scale=1):
            inputs = _inputs([name for name, _ in service.settings.heads])
        with gr.Column(scale=1):
            views = _summary_views()
    views += _detail_views()

    # Its parameters' names are those of the Gradio API's /timeline (gradio_client's view_api)
    async def build(
        audio: str | None, channels: str, max_segment_s: float, threshold: float, segments: str | None
    ) -> AsyncIterator[tuple[Any, ...]]:
        request = timeline_request(service, audio, channels, max_segment_s, threshold, segments)
        async for values in timeline_updates(service, outputs, request):
            yield values

    # A server with heads (--head NAME=DIR) offers them: /timeline then takes `head` too
    async def build_with_head(
        audio: str | None,
        channels: str,
        max_segment_s: float,
        threshold: float,
        segments: str | None,
        head: str,
    ) -> AsyncIterator[tuple[Any, ...]]:
        request = timeline_request(service, audio, channels, max_segment_s, threshold, segments)
        request = dataclasses.replace(request, head=chosen_head(head))
        async for values in timeline_updates(service, outputs, request):
            yield values

    handler: Any = build_with_head if inputs.head is not None else build
    run = inputs.start.click(
        handler,
        inputs=[inputs.audio, inputs.channels, inputs.max_segment, inputs.threshold, inputs.segments]
        + ([inputs.head] if inputs.head is not None else []),
        outputs=views,
        api_name="timeline",
        concurrency_limit=TIMELINE_CONCURRENCY,
        concurrency_id="timeline",
        show_progress="minimal",
    )
    inputs.stop.click(None, cancels=[run], api_visibility="private")


@dataclass(frozen=True)
class _Inputs:
    audio: gr.Audio
    channels: gr.Radio
    max_segment: gr.Slider
    threshold: gr.Slider
    segments: gr.File
    start: gr.Button
    stop: gr.Button
    head: gr.Dropdown | None  # only when the server serves heads


def _inputs(heads: list[str]) -> _Inputs:
    audio = audio_input(f"Recording ({UPLOAD_FORMATS})", "tl-audio")
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
            0.05, 0.95, value=DEFAULT_VAD.threshold, step=0.05, label="VAD threshold", elem_id="tl-threshold"
        )
    segments = gr.File(
        label="Segments (optional): JSON [{start_s, end_s, speaker}] or RTTM, instead of the VAD",
        file_types=SEGMENTS_FILE_TYPES,
        type="filepath",
        elem_id="tl-segments",
    )
    head = head_input(heads, "Your labels on each segment (a head from emoserve train-head)", "tl-head")
    with gr.Row():
        start = gr.Button("Build timeline", variant="primary", elem_id="tl-start")
        stop = gr.Button("Stop", variant="stop", elem_id="tl-stop")
    return _Inputs(audio, channels, max_segment, threshold, segments, start, stop, head)


def _summary_views() -> list[gr.components.Component]:
    """The progress, the summary card and the distribution chart."""
    return [
        gr.HTML(progress_html(0.0, None, 0, 0.0), elem_id="tl-progress"),
        gr.HTML(_empty_card(), elem_id="tl-summary"),
        gr.BarPlot(
            x="emotion",
            y="share",
            color="emotion",
            color_map=display_colours(),
            sort="-y",
            y_lim=[0, 1],
            label="Distribution over the speech (time-weighted mean score)",
            elem_id="tl-distribution",
        ),
    ]


def _detail_views() -> list[gr.components.Component]:
    """The timeline plot, the segment table and the downloads, under the whole width."""
    return [
        gr.HTML(timeline_svg([], 0.0), elem_id="tl-plot"),
        gr.Dataframe(headers=list(TABLE_COLUMNS), interactive=False, label="Segments", elem_id="tl-table"),
        gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="tl-downloads"),
    ]


# -------------------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class TimelineRequest:
    """The tab's inputs, checked."""

    path: str
    name: str
    channels: Channels
    vad: VadSettings
    spans: list[Span] | None
    head: str | None = None  # a served head's name


def timeline_request(
    service: UIService,
    path: str | None,
    channels: str,
    max_segment_s: float,
    threshold: float,
    segments_path: str | None,
) -> TimelineRequest:
    """Every input checked, with a message that names it, before any work."""
    check_ready(service)
    if not path:
        raise no_audio("a recording")
    mode = next((mode for mode in CHANNEL_MODES if mode == channels), None)
    if mode is None:
        raise bad_option(f"channels is {channels!r}; choose mix or separate")
    try:
        vad = VadSettings(threshold=float(threshold), max_segment_s=float(max_segment_s))
    except (TypeError, ValueError) as error:  # counted as the API counts a bad query parameter
        raise ui_error(service, EmoserveError(str(error), code="invalid_parameter")) from None
    with page_errors(service):
        spans = read_spans_file(segments_path, Path(segments_path).name) if segments_path else None
    return TimelineRequest(path, Path(path).name, mode, vad, spans)


async def timeline_updates(
    service: UIService, outputs: UIOutputs, request: TimelineRequest
) -> AsyncIterator[tuple[Any, ...]]:
    """open (thread) -> segments as they are scored, streamed to the page -> save (thread) -> results.
    Yields values for (progress, summary, distribution, plot, table, downloads)."""
    started = time.perf_counter()
    job = await _open_timeline(service, request)
    segments: list[TimelineSegment] = []
    with page_errors(service):
        yield _running_views(job, segments, started, with_results=True)
        sent_at, sent_count = time.monotonic(), 0
        async with contextlib.aclosing(_paced(scored_segments(service, job, request.head), TICK_S)) as paced:
            async for segment in paced:
                if segment is not None:
                    segments.append(segment)
                fresh = len(segments) > sent_count and time.monotonic() - sent_at >= UPDATE_S
                if fresh or segment is None:  # a tick moves the progress; segments go out every UPDATE_S
                    yield _running_views(job, segments, started, with_results=fresh)
                if fresh:
                    sent_at, sent_count = time.monotonic(), len(segments)
        assert service.model_tag is not None  # scoring: loaded
        timeline = build_timeline(job, segments, service.model_tag)
    saved = await outputs.save("timeline", lambda store: store.save_timeline(timeline))
    yield finished_views(timeline, saved, outputs.persistent, time.perf_counter() - started)


def scored_segments(service: UIService, job: Recording, head: str | None) -> AsyncIterator[TimelineSegment]:
    """The service's segments, with a head's results when one was chosen."""
    return service.timeline(job, head) if head else service.timeline(job)


async def _open_timeline(service: UIService, request: TimelineRequest) -> Recording:
    with page_errors(service):
        return await asyncio.to_thread(
            service.open_timeline,
            request.path,
            name=request.name,
            channels=request.channels,
            vad=request.vad,
            spans=request.spans,
        )


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


# ------------------------------------------------------------------------------------------ rendering


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


def _empty_card() -> str:
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
    where = saved_line(saved.folder if saved else None, persistent)
    lines.append(f'<span id="tl-saved">{html.escape(where)}</span>')
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
