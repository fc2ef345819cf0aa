"""The Long-recording tab. On a server with jobs (serving/jobs/), a run is a job:

    click -> the inputs checked -> the upload copied into jobs_dir and accepted (`Jobs.accept`: fsync'd,
    committed) -> the job's id in the page's URL (`?job=<id>`) -> the job followed: its progress, its
    segments as its worker commits them -> its result (/v1/timeline's JSON) -> save timeline.json/.csv
    (thread) -> summary, timeline plot, distribution, segment table, downloads
    a page opened with ?job=<id> (a reload, another window, after a restart): the same, from the job
    Cancel: the job stops at its next segment; its scored segments stay on the page

Without jobs (Ray Serve's UI replica, a UI built on its own) the run happens inside the request, as
before jobs: open_timeline (thread; the file's errors come here) -> Service.timeline (speech segments
through the engine, streamed to the page with the progress) -> the same save and views; Stop ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import html
import os
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import gradio as gr

from emoserve.audio.segments import Recording, Span, read_spans_file
from emoserve.audio.vad import DEFAULT_VAD, VadSettings
from emoserve.constants import CHANNEL_MODES, Channels
from emoserve.errors import ApiError, EmoserveError
from emoserve.inference.results import Timeline, TimelineSegment, summarise
from emoserve.inference.timeline import build_timeline
from emoserve.serving.jobs.store import Job
from emoserve.serving.jobs.worker import UPLOAD_SETTING, JobOptions
from emoserve.webui.charts import (
    TABLE_COLUMNS,
    display_colours,
    distribution_frame,
    segment_table,
    timeline_svg,
)
from emoserve.webui.clip import audio_input, chosen_head, head_input
from emoserve.webui.protocol import UIJobs, UIService
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

if TYPE_CHECKING:
    from emoserve.serving.settings import Settings

TAB_ID = "long"  # the tab's id in app.py's Tabs: a page opened with ?job=<id> selects it
CHANNEL_CHOICES = [
    ("mix: one timeline for the recording", "mix"),
    ("separate: one row per channel (e.g. a call's two sides)", "separate"),
]
MAX_SEGMENT_S_RANGE = (1.0, 60.0)  # VadSettings needs >= 1 s; emotion2vec was trained on a few seconds
SEGMENTS_FILE_TYPES = [".json", ".rttm", ".txt"]
# Each run holds a decoding thread and a VAD; the engine bounds the segments it queues. Beyond this many
# at once a window waits in Gradio's queue, so long recordings cannot take every core from the clip tab.
TIMELINE_CONCURRENCY = 4
# A window following a job only reads the job's rows (every jobs_poll_s and UPDATE_S); the scoring is
# the jobs' workers', bounded by jobs_workers. Beyond this many windows at once one waits in the queue.
FOLLOW_CONCURRENCY = 32
UPDATE_S = 1.0  # the table and the plot grow with the recording: they are sent again at most this often
TICK_S = 0.5  # the progress moves this often even while no segment comes (a long silence)
VIEWS = 6  # the values a run yields: progress, summary, distribution, plot, table, downloads
JOB_PARAMETER = "job"  # the page's query parameter that names the job it shows: /?job=<id>
UI_METADATA = {"source": "web-ui"}  # a job's metadata when the tab submitted it (GET /v1/jobs shows it)
# Runs in the browser when the job's id changes: the URL names the job, so that a reload finds it again
# (replaceState: no new history entry, nothing reloaded).
SET_JOB_IN_URL = f"""(job) => {{
    const url = new URL(window.location.href);
    if (job) {{ url.searchParams.set("{JOB_PARAMETER}", job); }}
    else {{ url.searchParams.delete("{JOB_PARAMETER}"); }}
    window.history.replaceState(window.history.state, "", url);
}}"""
# Runs in the browser as the page loads, before the server is asked for the URL's job: its tab selected
# at once, by the button Gradio gives each tab (data-tab-id: the tab's id). Selected by the load's own
# first update instead (gr.Tabs(selected=...)), the page sometimes kept that update's views and dropped
# the later ones the server sent (2 runs in 6 on a loaded machine, Gradio 6.31).
SELECT_TAB_FOR_JOB = f"""() => {{
    if (new URLSearchParams(window.location.search).has("{JOB_PARAMETER}")) {{
        document.querySelector('[role="tab"][data-tab-id="{TAB_ID}"]')?.click();
    }}
    return [];
}}"""
Item = TypeVar("Item")


# ------------------------------------------------------------------------------------------- building


def long_recording_tab(service: UIService, outputs: UIOutputs, jobs: UIJobs | None, page: gr.Blocks) -> None:
    """The tab (its id in the page's Tabs: TAB_ID); with `jobs`, its runs are jobs, and `page`'s load
    selects it and shows the job the page's URL names."""
    gr.Markdown(
        "Upload or record a long recording (a call, a meeting, a podcast). Its speech is cut into "
        "segments (silero-vad, or your own segments file) and each segment gets an emotion."
        + (
            " The run is a **job** on the server: it goes on if you close or reload this page, or the "
            "server restarts; this page's address names it, so opening it again shows the job."
            if jobs is not None
            else ""
        )
    )
    with gr.Row():
        with gr.Column(scale=1):
            inputs = _inputs([name for name, _ in service.settings.heads], jobs is not None)
        with gr.Column(scale=1):
            views = _summary_views()
    views += _detail_views()
    if jobs is None:
        _runs_in_the_request(service, outputs, inputs, views)
    else:
        _runs_as_jobs(service, outputs, jobs, inputs, views, page)


def _runs_in_the_request(
    service: UIService, outputs: UIOutputs, inputs: _Inputs, views: list[gr.components.Component]
) -> None:
    """Build: the recording scored inside the click's event; Stop: that event cancelled."""
    run = inputs.start.click(
        _handler(service, inputs, lambda request: timeline_updates(service, outputs, request)),
        **_click(inputs, views),
        concurrency_limit=TIMELINE_CONCURRENCY,
        concurrency_id="timeline",
    )
    inputs.stop.click(None, cancels=[run], api_visibility="private")


def _runs_as_jobs(
    service: UIService,
    outputs: UIOutputs,
    jobs: UIJobs,
    inputs: _Inputs,
    views: list[gr.components.Component],
    page: gr.Blocks,
) -> None:
    """Build: a job accepted, then followed; its id into the job box, and from there (in the browser)
    into the URL. Page load: the URL's job followed. Cancel: the shown job's cancel asked."""
    assert inputs.job is not None  # made with jobs
    following: dict[str, Any] = {"concurrency_limit": FOLLOW_CONCURRENCY, "concurrency_id": "job-follow"}

    # Gradio passes the request to a parameter typed gr.Request (a lambda would get none)
    async def reopen(request: gr.Request) -> AsyncIterator[tuple[Any, ...]]:
        async for values in reopened_job(service, outputs, jobs, request):
            yield values

    opened = page.load(
        reopen,
        outputs=[*views, inputs.job],
        js=SELECT_TAB_FOR_JOB,
        api_visibility="private",
        show_progress="minimal",
        **following,
    )
    inputs.start.click(
        _handler(service, inputs, lambda request: job_run(service, outputs, jobs, request)),
        **_click(inputs, [*views, inputs.job]),
        cancels=[opened],  # the job the page opened with stops being shown (it goes on)
        **following,
    )
    inputs.stop.click(
        lambda job_id: cancel_job(service, jobs, job_id),
        inputs=[inputs.job],
        api_visibility="private",
        concurrency_limit=None,  # a row's update, never held back by the runs and followers
    )
    inputs.job.change(None, inputs=[inputs.job], js=SET_JOB_IN_URL, api_visibility="private")


def _click(inputs: _Inputs, outputs: list[gr.components.Component]) -> dict[str, Any]:
    """What both runs' click event has: the Gradio API's /timeline and its inputs."""
    return {
        "inputs": [inputs.audio, inputs.channels, inputs.max_segment, inputs.threshold, inputs.segments]
        + ([inputs.head] if inputs.head is not None else []),
        "outputs": outputs,
        "api_name": "timeline",
        "show_progress": "minimal",
    }


def _handler(
    service: UIService, inputs: _Inputs, updates: Callable[[TimelineRequest], AsyncIterator[tuple[Any, ...]]]
) -> Any:
    """The click's handler: the inputs checked into a TimelineRequest, then `updates(request)`."""

    # Its parameters' names are those of the Gradio API's /timeline (gradio_client's view_api)
    async def build(
        audio: str | None, channels: str, max_segment_s: float, threshold: float, segments: str | None
    ) -> AsyncIterator[tuple[Any, ...]]:
        request = timeline_request(service, audio, channels, max_segment_s, threshold, segments)
        async for values in updates(request):
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
        async for values in updates(dataclasses.replace(request, head=chosen_head(head))):
            yield values

    return build_with_head if inputs.head is not None else build


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
    job: gr.Textbox | None  # the job shown (its id), only on a server with jobs


def _inputs(heads: list[str], with_jobs: bool) -> _Inputs:
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
        stop = gr.Button("Cancel job" if with_jobs else "Stop", variant="stop", elem_id="tl-stop")
    job = None
    if with_jobs:
        job = gr.Textbox(
            label="Job (also GET /v1/jobs/<id> and `emoserve jobs status <id>`)",
            interactive=False,
            elem_id="tl-job",
        )
    return _Inputs(audio, channels, max_segment, threshold, segments, start, stop, head, job)


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


# ------------------------------------------------------------------------------------ the tab's inputs


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


# ------------------------------------------------------------------------------ a run in the request


async def timeline_updates(
    service: UIService, outputs: UIOutputs, request: TimelineRequest
) -> AsyncIterator[tuple[Any, ...]]:
    """open (thread) -> segments as they are scored, streamed to the page -> save (thread) -> results.
    Yields values for (progress, summary, distribution, plot, table, downloads)."""
    started = time.perf_counter()
    job = await _open_timeline(service, request)
    segments: list[TimelineSegment] = []

    def running(with_results: bool) -> tuple[Any, ...]:
        total_s = job.stream.info.duration_s
        progress = progress_html(job.duration_s, total_s, len(segments), time.perf_counter() - started)
        return running_views(progress, segments, max(total_s or 0.0, job.duration_s), with_results)

    with page_errors(service):
        yield running(with_results=True)
        sent_at, sent_count = time.monotonic(), 0
        async with contextlib.aclosing(_paced(scored_segments(service, job, request.head), TICK_S)) as paced:
            async for segment in paced:
                if segment is not None:
                    segments.append(segment)
                fresh = len(segments) > sent_count and time.monotonic() - sent_at >= UPDATE_S
                if fresh or segment is None:  # a tick moves the progress; segments go out every UPDATE_S
                    yield running(with_results=fresh)
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


async def _paced(items: AsyncIterator[Item], tick_s: float) -> AsyncGenerator[Item | None, None]:
    """The items, and a None every `tick_s` while the next one is not there yet. The pending step is
    never cancelled by a tick (that would end the iteration); leaving early closes the iteration."""

    async def step() -> Item:
        return await anext(items)

    pending = asyncio.ensure_future(step())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=tick_s)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(step())
    finally:
        if not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        closing = getattr(items, "aclose", None)
        if closing is not None:
            await closing()


# ------------------------------------------------------------------------------------ a run as a job


async def job_run(
    service: UIService, outputs: UIOutputs, jobs: UIJobs, request: TimelineRequest
) -> AsyncIterator[tuple[Any, ...]]:
    """The upload accepted as a job, then followed (`job_updates`). Yields values for (progress, summary,
    distribution, plot, table, downloads, job)."""
    submitting = _message_views("submitting", f"Uploading {request.name}…", "Submitting it as a job…")
    yield (*submitting, "")  # the job shown before, if any, leaves the URL
    try:
        with page_errors(service):
            job = await asyncio.to_thread(submit_job, service.settings, jobs, request)
    except gr.Error:
        yield (*_message_views("refused", "Not submitted.", "Not submitted: see the error."), "")
        raise
    async for values in job_updates(service, outputs, jobs, job):
        yield values


def submit_job(settings: Settings, jobs: UIJobs, request: TimelineRequest) -> Job:
    """Blocking: the upload (a file in Gradio's cache) copied into jobs_dir (the job's audio must be on
    the jobs' file system, and Gradio's copy stays the page's) and accepted as a job with the tab's
    options; the copy is gone if it was refused."""
    size = os.path.getsize(request.path)
    if size > settings.jobs_max_upload_bytes:
        raise ApiError(
            "upload_too_large",
            f"{request.name} is {size / 1e6:.1f} MB; the limit is {settings.jobs_max_upload_mb:g} MB "
            f"({UPLOAD_SETTING})",
        )
    options = JobOptions.of(request.channels, request.vad, request.spans, request.head)
    fd, spooled = tempfile.mkstemp(prefix="emoserve-upload-", suffix=".audio", dir=jobs.spool_dir())
    try:
        with os.fdopen(fd, "wb") as out, open(request.path, "rb") as upload:
            shutil.copyfileobj(upload, out)
        job, _ = jobs.accept(spooled, request.name, options, metadata=UI_METADATA)
    finally:
        Path(spooled).unlink(missing_ok=True)  # accepted: already renamed to the job's audio
    return job


async def reopened_job(
    service: UIService, outputs: UIOutputs, jobs: UIJobs, request: gr.Request
) -> AsyncIterator[tuple[Any, ...]]:
    """On page load: the job the page's URL names (?job=<id>), followed if it still runs; nothing without
    one. Yields values for (progress, ..., downloads, job)."""
    job_id = (dict(request.query_params).get(JOB_PARAMETER) or "").strip()
    if not job_id:
        yield (gr.skip(),) * (VIEWS + 1)
        return
    try:
        job = await asyncio.to_thread(jobs.get, job_id)
    except EmoserveError as error:
        yield (*missing_views(service, error), gr.skip())
        return
    async for values in job_updates(service, outputs, jobs, job):
        yield values


async def job_updates(
    service: UIService, outputs: UIOutputs, jobs: UIJobs, job: Job
) -> AsyncIterator[tuple[Any, ...]]:
    """The job followed until it ends: its progress every UPDATE_S, its segments as they are committed,
    then its result (saved once per job, for the downloads), its error, or what was scored before it
    was cancelled. Yields values for (progress, ..., downloads, job): the job's id in each (the Gradio
    API's answer ends with it)."""
    segments: list[TimelineSegment] = []
    if not job.done:  # (an ended job: its views and id in one update, below)
        yield (*job_views(job, segments, with_results=True), job.id)  # the id into the URL at once
    sent_at, sent_count = time.monotonic(), len(segments)
    try:
        async with contextlib.aclosing(_paced(jobs.follow(job.id, -1), TICK_S)) as paced:
            async for item in paced:
                if isinstance(item, Job):
                    job = item
                    break
                if item is not None:
                    segments.append(TimelineSegment.from_dict(item[1]))
                if time.monotonic() - sent_at >= UPDATE_S:
                    job = await asyncio.to_thread(jobs.get, job.id)
                    fresh = len(segments) > sent_count
                    yield (*job_views(job, segments, with_results=fresh), job.id)
                    sent_at, sent_count = time.monotonic(), len(segments)
    except EmoserveError as error:  # deleted or expired while it was shown, or its store out of reach
        yield (*missing_views(service, error), job.id)
        return
    if job.status != "succeeded":
        yield (*ended_views(job, segments), job.id)
        return
    assert job.result is not None  # succeeded
    timeline = Timeline.from_dict(job.result)
    saved = await outputs.save_once(
        job.id, "timeline", lambda store: store.save_timeline(timeline, extra={"job_id": job.id})
    )
    elapsed_s = (job.finished_at or time.time()) - job.created_at
    yield (*finished_views(timeline, saved, outputs.persistent, elapsed_s), job.id)


def cancel_job(service: UIService, jobs: UIJobs, job_id: str) -> None:
    """Blocking: the shown job's cancel asked (a queued job ends at once, a running one at its next
    segment; the page following it shows the end). A job that has ended is said so."""
    if not job_id:
        gr.Info("There is no job to cancel yet.")
        return
    try:
        jobs.cancel(job_id)
    except EmoserveError as error:
        if error.code != "job_finished":
            raise ui_error(service, error) from None
        gr.Info("The job has already ended; there is nothing to cancel.")
        return
    gr.Info("Cancelling the job: it stops at its next segment.")


# ------------------------------------------------------------------------------------------ rendering


def running_views(
    progress: str, segments: list[TimelineSegment], total_s: float, with_results: bool
) -> tuple[Any, ...]:
    """While scoring: the progress always; the plot, distribution and table only `with_results` (they
    grow with the recording, so they are not sent with every tick)."""
    if not with_results:
        return (progress, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
    return (
        progress,
        _running_card(),
        distribution_frame(summarise(segments)),
        timeline_svg(segments, total_s),
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


def job_views(job: Job, segments: list[TimelineSegment], with_results: bool) -> tuple[Any, ...]:
    """A job not ended yet: its state and progress, and the segments committed so far."""
    total_s = max([job.duration_s or 0.0, *(s.end_s for s in segments)])
    return running_views(job_progress_html(job), segments, total_s, with_results)


def ended_views(job: Job, segments: list[TimelineSegment]) -> tuple[Any, ...]:
    """A job that failed or was cancelled: why, and the segments it had scored."""
    if job.status == "cancelled":
        total = "?" if job.segments_total is None else job.segments_total
        text = f"Cancelled after {len(segments)} of {total} segments."
        card = "The job was cancelled; the segments it scored before are below."
    else:
        text = f"Failed: {job.error_code}."
        card = f"The job failed: {job.error_message} ({job.error_code})."
    total_s = max([job.duration_s or 0.0, *(s.end_s for s in segments)])
    return _message_views(job.status, text, card, segments, total_s)


def missing_views(service: UIService, error: EmoserveError) -> tuple[Any, ...]:
    """The URL's job is not here (never made, deleted, expired) or cannot be read now: say so (counted
    under its code, as the API counts it)."""
    if service.metrics is not None:
        service.metrics.count_error(error.code)
    return _message_views("missing", "No job to show.", f"{error}.")


def _message_views(
    state: str, text: str, card: str, segments: list[TimelineSegment] | None = None, total_s: float = 0.0
) -> tuple[Any, ...]:
    """A state without a result (submitting, opening, failed, cancelled, missing), and the segments
    there are."""
    segments = segments or []
    return (
        _progress(state, text, None),
        _message_card(card, state),
        distribution_frame(summarise(segments)),
        timeline_svg(segments, total_s),
        segment_table(segments),
        None,
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
    bar = None  # indeterminate
    if finished or known:
        top = max(total_s or done_s, done_s, 1e-9)
        bar = (min(done_s, top), top)
    return _progress("done" if finished else "running", text, bar)


def job_progress_html(job: Job) -> str:
    """A job's state: queued, finding the speech, or its segments scored of its plan's, with an ETA."""
    waited_s = time.time() - job.created_at
    progress = job.progress()
    resumed = f" · attempt {job.attempts} (resumed)" if job.attempts > 1 else ""
    if job.status == "queued":
        return _progress("queued", f"Queued: waiting for a worker · {waited_s:.0f} s", None)
    if job.segments_total is None:
        return _progress("running", f"Finding the speech (decoding, VAD) · {waited_s:.0f} s{resumed}", None)
    eta_s = progress["eta_s"]
    text = (
        f"{job.segments_done} of {job.segments_total} segments scored · {progress['percent']:g}%"
        + (f" · about {eta_s:.0f} s left" if eta_s is not None else "")
        + f" · {waited_s:.0f} s{resumed}"
    )
    return _progress("running", text, (float(job.segments_done), float(max(job.segments_total, 1))))


def _progress(state: str, text: str, bar: tuple[float, float] | None) -> str:
    """The progress view: `bar` (value, max), or an indeterminate bar; `state` for the tests and CSS."""
    if bar is None:
        meter = '<progress style="width:100%"></progress>'
    else:
        value, top = bar
        meter = f'<progress value="{value:.3f}" max="{max(top, 1e-9):.3f}" style="width:100%"></progress>'
    escaped = html.escape(text)
    return f'<div id="tl-progress-state" data-state="{state}">{meter}<div>{escaped}</div></div>'


def _empty_card() -> str:
    return '<div style="padding:12px;opacity:0.6">The timeline appears here.</div>'


def _running_card() -> str:
    return '<div style="padding:12px;opacity:0.8">Scoring the speech segments as they are found…</div>'


def _message_card(text: str, state: str) -> str:
    return f'<div id="tl-message" data-state="{state}" style="padding:12px">{html.escape(text)}</div>'


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
