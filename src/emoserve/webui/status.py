"""What the page says about the service: the banner by phase (refreshed by a timer), and the UI's one
map from a domain error to the error a page shows (counted under its code, as the API counts it)."""

from __future__ import annotations

import html
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gradio as gr

from emoserve.errors import EmoserveError
from emoserve.webui.protocol import UIService

UPLOAD_FORMATS = "wav, mp3, m4a, flac, ogg"
STATUS_REFRESH_S = 1.0  # while loading/warming: the banner follows start-up closely
READY_REFRESH_S = 10.0  # once ready only draining or a failure can follow; no need to poll fast

_BANNER_STYLES = {  # phase -> (icon, background, text colour)
    "ready": ("✅", "#dcfce7", "#14532d"),
    "failed": ("❌", "#fee2e2", "#7f1d1d"),
    "draining": ("⏸️", "#fef3c7", "#78350f"),
}
_STARTING_STYLE = ("⏳", "#dbeafe", "#1e3a8a")

# What the page says for the errors whose API message is written for programs (by their code)
_UI_MESSAGES = {
    "not_ready": "The model is still starting up; try again in a few seconds.",
    "start_up_failed": "The model could not be loaded; ask the operator to check the service log.",
    "draining": "The service is shutting down; try again once it is back.",
    "queue_full": "The service is busy; try again in {retry} s.",
}


# ------------------------------------------------------------------------------------------ the banner


def refresh_status(demo: gr.Blocks, service: UIService, banner: gr.HTML) -> None:
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


def status(service: UIService) -> tuple[str, gr.Timer]:
    """The banner, and how soon to look again."""
    ready = service.phase == "ready"
    return banner_html(service), gr.Timer(READY_REFRESH_S if ready else STATUS_REFRESH_S)


def banner_html(service: UIService) -> str:
    phase = service.phase
    icon, background, colour = _BANNER_STYLES.get(phase, _STARTING_STYLE)
    text = {
        "ready": f"Ready: {service.model_name or 'model'} is loaded and warmed up.",
        "failed": f"The model could not be loaded ({service.reason}).",
        "draining": "The service is shutting down; recognitions are no longer accepted.",
        "warming": "Warming up the model on real clips; ready in a moment…",
    }.get(phase, f"Loading the model ({_phase_text(service)})…")
    box = f"padding:10px 14px;border-radius:8px;background:{background};color:{colour};font-weight:600"
    state_div = f'<div id="status-state" data-state="{html.escape(phase)}" style="{box}">'
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


def _phase_text(service: UIService) -> str:
    """The phase with its reason, if any: "loading: model files damaged: ...; converting it again"."""
    return f"{service.phase}: {service.reason}" if service.reason else service.phase


# ------------------------------------------------------------------------------------------- errors


@contextmanager
def page_errors(service: UIService) -> Iterator[None]:
    """Inside: a domain error (EmoserveError) becomes the page's error (`ui_error`)."""
    try:
        yield
    except EmoserveError as error:
        raise ui_error(service, error) from None


def check_ready(service: UIService) -> None:
    """The page's error unless the service is ready: before any work on the input."""
    with page_errors(service):
        service.require_ready()


def ui_error(service: UIService, error: EmoserveError) -> gr.Error:
    """The page's error for a domain error; counted under its code, as the API counts it."""
    if service.metrics is not None:
        service.metrics.count_error(error.code)
    retry = math.ceil(error.retry_after_s or 1)
    message = _UI_MESSAGES.get(error.code, "{error}").format(retry=retry, error=error)
    if error.code in ("not_ready", "start_up_failed"):
        message += f" ({_phase_text(service)})"
    if error.status == 503:
        title = "Not available"
    elif error.status < 500:
        title = "Cannot use this audio"
    else:
        title = "No result"
    return gr.Error(html.escape(message), title=title, print_exception=False)


def no_audio(what: str) -> gr.Error:
    """The page's error for a click with nothing uploaded; `what`: "a clip", "a recording"."""
    return gr.Error(f"Upload {what} ({UPLOAD_FORMATS}) or record one first.", title="No audio")


def bad_option(message: str) -> gr.Error:
    return gr.Error(message, title="Bad option")
