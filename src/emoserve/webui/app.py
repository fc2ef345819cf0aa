"""The Gradio web UI, mounted at "/" by the server and sharing its batching engine. Three tabs:

    Clip (clip.py): one clip, recognised as the API recognises it, with its result card and log
    Long recording (long_recording.py): a recording cut into speech segments, each one recognised,
        streamed to the page as a timeline; on a server with jobs, a job (the page's URL names it)
    Live (live.py): the microphone as a live stream: the emotion while the person speaks, each
        utterance's segment when they pause

The UI reads the service through `UIService` only (protocol.py), so that it runs on any object with those
members (the server's Service, the Ray UI replica's RemoteService, or a small fake in the tests), and the
server's jobs through `UIJobs` (none on Ray's UI replica). It saves each result in its own output store,
made once per UI from the service's settings (saved.py).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import gradio as gr

from emoserve.constants import EXAMPLES_DIR
from emoserve.webui.clip import clip_tab
from emoserve.webui.live import live_tab
from emoserve.webui.long_recording import TAB_ID as LONG_RECORDING_TAB
from emoserve.webui.long_recording import long_recording_tab
from emoserve.webui.protocol import UIJobs, UIService
from emoserve.webui.saved import UIOutputs
from emoserve.webui.status import banner_html, refresh_status

if TYPE_CHECKING:
    from fastapi import FastAPI

# Recognitions from all browser windows in flight at once. They meet in the engine, which batches them
# and pushes back (QueueFull) beyond its own bound; Gradio's default of 1 would serialise the windows.
DEFAULT_CONCURRENCY = 16
QUEUE_MAX = 256  # Gradio's own queue in front of that: beyond it a window is told the queue is full
# Gradio's cache holds uploads and copies of downloads: sweep hourly, drop files older than a day.
CACHE_SWEEP = (3600, 86_400)


def build_ui(
    service: UIService,
    *,
    outputs: UIOutputs | None = None,
    jobs: UIJobs | None = None,
    concurrency_limit: int | None = DEFAULT_CONCURRENCY,
) -> gr.Blocks:
    """The whole UI; mount it with `mount_ui` (or gr.mount_gradio_app with the same allowed paths).
    `outputs`: where it saves results (default: made from service.settings). `jobs`: the server's jobs;
    the Long-recording tab's runs are jobs then (without: they run in the request)."""
    outputs = outputs or UIOutputs.from_settings(service.settings)
    with gr.Blocks(
        title="emoserve · speech emotion recognition", analytics_enabled=False, delete_cache=CACHE_SWEEP
    ) as demo:
        banner = gr.HTML(banner_html(service), elem_id="status-banner")
        gr.Markdown("# Speech emotion recognition")
        with gr.Tabs():
            with gr.Tab("Clip", id="clip", elem_id="tab-clip"):
                clip_tab(service, outputs, concurrency_limit)
            with gr.Tab("Long recording", id=LONG_RECORDING_TAB, elem_id="tab-long"):
                long_recording_tab(service, outputs, jobs, demo)
            with gr.Tab("Live", id="live", elem_id="tab-live"):
                live = live_tab(service, service.settings.max_streams)
        demo.unload(live.unload)
        refresh_status(demo, service, banner)
    demo.queue(max_size=QUEUE_MAX)
    weakref.finalize(demo, outputs.close)
    return demo


def mount_ui(
    app: FastAPI, service: UIService, path: str = "/", jobs: UIJobs | None = None, **mount_kwargs: Any
) -> FastAPI:
    """Mount the UI on `app` (register the app's own routes first: "/" catches everything else).
    `jobs`: the server's (build_ui). `mount_kwargs` go to gr.mount_gradio_app, e.g. auth_dependency= or
    max_file_size= (default: the largest of the settings' upload limits that apply, as the
    long-recording tab takes bigger files than a clip)."""
    outputs = UIOutputs.from_settings(service.settings)
    allowed = [str(EXAMPLES_DIR)]
    if outputs.kept is not None:
        allowed.append(str(outputs.kept.root.resolve()))
    settings = service.settings
    options: dict[str, Any] = {
        "allowed_paths": allowed,
        "max_file_size": max(
            settings.max_upload_bytes,
            settings.jobs_max_upload_bytes if jobs is not None else settings.max_timeline_upload_bytes,
        ),
        "ssr_mode": False,  # server-side rendering needs Node.js; the client renders fine alone
        "run_history": False,  # recordings of users' audio stay out of browser storage
        "footer_links": ["api", "settings"],
    }
    demo = build_ui(service, outputs=outputs, jobs=jobs)
    return gr.mount_gradio_app(app, demo, path=path, **{**options, **mount_kwargs})
