"""The Clip tab: click -> decode (Service.decode, in a thread) -> Service.recognize (batched with other
windows' requests) -> save the output folder (thread) -> result card, score chart, timeline, log, downloads.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from emoserve.constants import EXAMPLES_DIR, GRANULARITIES, SAMPLE_RATE, Granularity
from emoserve.inference.formats import head_text
from emoserve.model.labels import EMOTION_COLOURS
from emoserve.serving.metrics import ROUTE_UI
from emoserve.webui.charts import scores_frame, timeline_frame
from emoserve.webui.protocol import UIService
from emoserve.webui.saved import SavedOutput, UIOutputs, saved_line
from emoserve.webui.status import UPLOAD_FORMATS, bad_option, check_ready, no_audio, page_errors

if TYPE_CHECKING:
    from emoserve.audio.decode import Audio
    from emoserve.inference.results import Result
    from emoserve.serving.engine import RequestTiming

EXAMPLES = (  # (file, label shown under the example list)
    ("en_3s_44k.mp3", "English · 3 s · 44.1 kHz MP3"),
    ("zh_3s_16k.wav", "Chinese · 3 s · 16 kHz WAV"),
    ("en_7s_16k.flac", "English · 7 s · 16 kHz FLAC"),
)


@dataclass(frozen=True)
class ClipResult:
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


def clip_tab(service: UIService, outputs: UIOutputs, concurrency_limit: int | None) -> None:
    gr.Markdown("Upload or record a clip, then press **Recognise**.")
    with gr.Row():
        with gr.Column(scale=1):
            inputs = _inputs([name for name, _ in service.settings.heads])
        with gr.Column(scale=1):
            views = _result_views()
    with gr.Row():
        views += _details()
    ranges = regression_ranges(service.settings.heads)

    # Its parameters' names are those of the Gradio API's /recognize (gradio_client's view_api)
    async def recognise(audio: str | None, granularity: str, embedding: bool) -> tuple[Any, ...]:
        return render(await recognize(service, outputs, audio, granularity, embedding))

    # A server with heads (--head NAME=DIR) offers them: /recognize then takes `head` too
    async def recognise_with_head(
        audio: str | None, granularity: str, embedding: bool, head: str
    ) -> tuple[Any, ...]:
        chosen = chosen_head(head)
        return render(await recognize(service, outputs, audio, granularity, embedding, chosen), ranges)

    handler: Any = recognise_with_head if inputs.head is not None else recognise
    inputs.start.click(
        handler,
        inputs=[inputs.audio, inputs.granularity, inputs.embedding, *([inputs.head] if inputs.head else [])],
        outputs=views,
        api_name="recognize",
        concurrency_limit=concurrency_limit,
    )


@dataclass(frozen=True)
class _Inputs:
    audio: gr.Audio
    granularity: gr.Radio
    embedding: gr.Checkbox
    start: gr.Button
    head: gr.Dropdown | None  # only when the server serves heads


NO_HEAD = "none: the nine emotions only"


def head_input(heads: list[str], label: str, elem_id: str) -> gr.Dropdown | None:
    """The served heads to pick from (the first by default, or none), on a server that has any."""
    if not heads:
        return None
    return gr.Dropdown([NO_HEAD, *heads], value=heads[0], label=label, elem_id=elem_id)


def chosen_head(picked: str) -> str | None:
    """The head the dropdown names, None for the nine emotions only."""
    return None if picked == NO_HEAD else picked


def audio_input(label: str, elem_id: str) -> gr.Audio:
    """An upload or a recording, as its file's path: a clip's log reports the file's own rate and
    channels; a long recording's path goes to open_timeline, which streams the file."""
    return gr.Audio(sources=["upload", "microphone"], type="filepath", label=label, elem_id=elem_id)


def _inputs(heads: list[str]) -> _Inputs:
    audio = audio_input(f"Audio ({UPLOAD_FORMATS}; click, drop or record)", "audio-input")
    granularity = gr.Radio(
        [("utterance: one label for the clip", "utterance"), ("frame: a 20 ms timeline", "frame")],
        value="utterance",
        label="Granularity",
        elem_id="granularity",
    )
    embedding = gr.Checkbox(False, label="Extract embedding (embedding.npy)", elem_id="embedding")
    head = head_input(heads, "Your labels (a head from emoserve train-head)", "head")
    start = gr.Button("Recognise", variant="primary", elem_id="start-button")
    gr.Examples(
        [[str(EXAMPLES_DIR / name)] for name, _ in EXAMPLES],
        inputs=[audio],
        example_labels=[label for _, label in EXAMPLES],
        label="Example clips",
    )
    return _Inputs(audio, granularity, embedding, start, head)


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


# ---------------------------------------------------------------------------------------- recognising


async def recognize(
    service: UIService,
    outputs: UIOutputs,
    path: str | None,
    chosen: str,
    with_embedding: bool,
    head: str | None = None,
) -> ClipResult:
    """decode -> engine -> save; every failure becomes a gr.Error that the page shows."""
    started = time.perf_counter()
    granularity = _granularity(chosen)
    check_ready(service)
    if not path:
        raise no_audio("a clip")
    file_name = Path(path).name
    with page_errors(service):
        audio = await asyncio.to_thread(service.decode, path, file_name)
        decode_s = time.perf_counter() - started
        if head is None:  # a service without heads (and a fake one) takes three arguments
            result, timing = await service.recognize(audio, granularity, with_embedding)
        else:
            result, timing = await service.recognize(audio, granularity, with_embedding, head)
    extra = _saved_fields(file_name, audio)
    saved = await outputs.save("result", lambda store: store.save(result, audio.samples, extra=extra))
    clip = ClipResult(
        file_name=file_name,
        file_bytes=_size(path),
        audio=audio,
        result=result,
        timing=timing,
        decode_s=decode_s,
        total_s=time.perf_counter() - started,
        saved=saved,
        persistent=outputs.persistent,
    )
    _observe(service, clip)
    return clip


def _granularity(chosen: str) -> Granularity:
    for granularity in GRANULARITIES:
        if chosen == granularity:
            return granularity
    raise bad_option(f"granularity is {chosen!r}; choose utterance or frame")


def _observe(service: UIService, clip: ClipResult) -> None:
    if service.metrics is not None:
        service.metrics.observe_request(
            ROUTE_UI,
            decode_s=clip.decode_s,
            queue_s=clip.timing.queue_s,
            inference_s=clip.timing.inference_s,
            total_s=clip.total_s,
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


# ------------------------------------------------------------------------------------------- rendering


def render(clip: ClipResult, ranges: Ranges | None = None) -> tuple[Any, ...]:
    """Values for (result card, score chart, timeline, log, downloads). `ranges`: the served regression
    heads' training ranges (`regression_ranges`), the scale their values are drawn on."""
    result = clip.result
    frames = timeline_frame(result)
    return (
        result_card(result, ranges),
        scores_frame(result),
        gr.LinePlot(value=frames, visible=frames is not None),
        processing_log(clip),
        [str(path) for path in clip.saved.files] if clip.saved else None,
    )


def result_card(result: Result, ranges: Ranges | None = None) -> str:
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
        f"{head_card(result, ranges)}{warning}</div>"
    )


def head_card(result: Result, ranges: Ranges | None = None) -> str:
    """The head's result under the nine emotions' (when one was chosen): a regression head's values, each
    a bar on its training range, and arousal against valence as a point when it has both."""
    head = result.head
    if head is None:
        return ""
    if head.values is not None:  # a regression head: each target's value
        values = " · ".join(f"{html.escape(t)} <b>{v:.3f}</b>" for t, v in head.values.items())
        style = "margin-top:10px;font-size:20px"
        scale = (ranges or {}).get(head.name, {})
        drawn = value_bars(head.values, scale) + arousal_valence_point(head.values, scale)
        return f'<div id="result-head" style="{style}">{html.escape(head.name)}: {values}{drawn}</div>'
    names = " · ".join(html.escape(x) for x in (head.emoji, head.label, head.label_zh) if x)
    return (
        '<div id="result-head" style="margin-top:10px;font-size:20px">'
        f"{html.escape(head.name)}: <b>{names}</b> {head.confidence or 0.0:.1%}</div>"
    )


Ranges = dict[str, dict[str, dict[str, float]]]  # head -> target -> {min, max, mean, std}
BAR_PX, PLANE_PX = 160, 120


def regression_ranges(heads: Sequence[tuple[str, str]]) -> Ranges:
    """Each served regression head's training range per target, from its head.json (what `train-head`
    recorded: the values' units)."""
    found: Ranges = {}
    for name, folder in heads:
        try:
            meta = json.loads((Path(folder) / "head.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # the service refused it at start-up with its reason
        if isinstance(meta, dict) and meta.get("task") == "regression":
            found[name] = meta.get("training", {}).get("targets", {})
    return found


def _share(value: float, scale: dict[str, float]) -> float | None:
    """Where `value` sits on its target's training range, 0..1 (None: no range known)."""
    low, high = scale.get("min"), scale.get("max")
    if low is None or high is None or high <= low:
        return None
    return min(1.0, max(0.0, (value - low) / (high - low)))


def value_bars(values: dict[str, float], scale: dict[str, dict[str, float]]) -> str:
    """A bar per target, filled to where its value sits between its training minimum and maximum."""
    rows = []
    for target, value in values.items():
        share = _share(value, scale.get(target, {}))
        if share is None:
            continue
        low, high = scale[target]["min"], scale[target]["max"]
        rows.append(
            f'<div class="head-bar" style="font-size:13px;margin-top:4px">{html.escape(target)} '
            f'<span style="display:inline-block;width:{BAR_PX}px;height:10px;background:#e5e7eb;'
            f'vertical-align:middle"><span style="display:block;width:{share * BAR_PX:.0f}px;height:10px;'
            f'background:#2563eb"></span></span> {low:g}..{high:g}</div>'
        )
    return "".join(rows)


def arousal_valence_point(values: dict[str, float], scale: dict[str, dict[str, float]]) -> str:
    """Valence (x) against arousal (y) as a point on the plane of their training ranges."""
    if "valence" not in values or "arousal" not in values:
        return ""
    x = _share(values["valence"], scale.get("valence", {}))
    y = _share(values["arousal"], scale.get("arousal", {}))
    if x is None or y is None:
        return ""
    size = PLANE_PX
    return (
        f'<svg class="av-plane" width="{size}" height="{size}" '
        'style="margin-top:6px;border:1px solid #9ca3af">'
        f'<line x1="{size / 2}" y1="0" x2="{size / 2}" y2="{size}" stroke="#d1d5db"/>'
        f'<line x1="0" y1="{size / 2}" x2="{size}" y2="{size / 2}" stroke="#d1d5db"/>'
        f'<text x="4" y="12" font-size="10">arousal</text>'
        f'<text x="{size - 44}" y="{size - 4}" font-size="10">valence</text>'
        f'<circle cx="{x * size:.1f}" cy="{(1 - y) * size:.1f}" r="5" fill="#dc2626"/></svg>'
    )


def _empty_card() -> str:
    return '<div style="text-align:center;padding:12px;opacity:0.6">The result appears here.</div>'


def processing_log(clip: ClipResult) -> str:
    audio, result, timing = clip.audio, clip.result, clip.timing
    lines = [
        f"file: {clip.file_name} ({_human_bytes(clip.file_bytes)}, "
        f"{audio.container or 'unknown container'}, decoded by {audio.decoder})",
        f"audio: {audio.original_duration_s:.2f} s at {audio.original_sample_rate} Hz, "
        f"{audio.original_channels} channel{'s' if audio.original_channels != 1 else ''}",
        f"conversion: {conversion(audio)}",
        f"model input: {audio.duration_s:.2f} s, {len(audio.samples)} samples at {SAMPLE_RATE} Hz",
        f"timings: decode {clip.decode_s:.3f} s, queue {timing.queue_s:.3f} s, "
        f"inference {timing.inference_s:.3f} s (batch of {timing.batch_size}), "
        f"total {clip.total_s:.3f} s",
        f"result: {result.emotion} ({result.label_zh}) {result.confidence:.3f}, {result.granularity}"
        + (f", {len(result.frames)} frames" if result.frames else ""),
        *([f"head {head_text(h).strip()}"] if (h := result.head) else []),
        f"model: {result.model}"
        + (" (RANDOM WEIGHTS: meaningless predictions)" if result.random_weights else ""),
        saved_line(clip.saved.folder if clip.saved else None, clip.persistent),
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
