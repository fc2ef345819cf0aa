"""The Live tab: emotion while the person is still speaking, from the browser's microphone.

    the microphone (Gradio's streaming audio: a WAV file every STREAM_EVERY_S, read as its 16-bit samples
    at the browser's rate, not resampled chunk by chunk)
    -> the window's live stream (Service.live_stream: the /v1/stream route's session, scored through the
       shared engine) -> its messages, read as they come -> the current emotion, big; a strip of the
       utterances' segments over time; the stream's status
    Stop: the open utterance's segment and the summary, then the stream closes

One stream per browser window, opened with the window's first chunk (its sample rate and channels), kept
here by the window's session (Gradio's session hash) so that closing the window (`unload`) or going
silent for the server's stream_idle_s frees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import gradio as gr
import numpy as np

from emoserve.constants import STREAM_HOP_S, STREAM_WINDOW_S
from emoserve.errors import EmoserveError
from emoserve.webui.charts import emotion_colour, timeline_svg
from emoserve.webui.protocol import UIService
from emoserve.webui.status import ui_error

if TYPE_CHECKING:
    from emoserve.inference.protocol import Reading, SummaryMessage
    from emoserve.inference.results import TimelineSegment
    from emoserve.serving.live import LiveStream

STREAM_EVERY_S = 0.25  # how often the browser sends what the microphone heard
END_WAIT_S = 30.0  # after Stop, the last segment and the summary come within this (else: closed)
IDLE_CHECK_S = 1.0


# ------------------------------------------------------------------------------------------- building


def live_tab(service: UIService, concurrency_limit: int | None) -> LiveWindows:
    """The tab; its windows' streams, which the page's `unload` closes (`LiveWindows.unload`)."""
    gr.Markdown(
        f"Press **Record** and speak: the emotion is read every {STREAM_HOP_S:g} s of speech over the "
        f"utterance's last {STREAM_WINDOW_S:g} s, and each utterance gets its final result when you pause. "
        "**Stop** ends the stream (its last utterance and a summary)."
    )
    windows = LiveWindows(service)
    with gr.Row():
        with gr.Column(scale=1):
            microphone = gr.Audio(
                sources=["microphone"],
                streaming=True,
                type="filepath",
                label="Microphone",
                elem_id="live-audio",
            )
            status = gr.HTML(status_html(None), elem_id="live-status")
        with gr.Column(scale=1):
            card = gr.HTML(card_html(None, service.random_weights), elem_id="live-card")
    strip = gr.HTML("", elem_id="live-strip")
    views = [card, strip, status]

    async def heard(chunk: str | None, request: gr.Request) -> tuple[str, str, str]:
        window = windows.get(request.session_hash or "")
        if chunk is not None:
            try:
                await window.feed(chunk)
            except EmoserveError as error:  # not ready, too many streams: said once, until Record again
                await window.close()
                raise ui_error(service, error) from None
        return render(window, service)

    async def started(request: gr.Request) -> tuple[str, str, str]:
        await windows.close(request.session_hash or "")
        return render(windows.new(request.session_hash or ""), service)

    async def stopped(request: gr.Request) -> tuple[str, str, str]:
        window = windows.get(request.session_hash or "")
        await window.stop()
        return render(window, service)

    microphone.start_recording(started, outputs=views, api_visibility="undocumented")
    microphone.stream(
        heard,
        inputs=[microphone],
        outputs=views,
        stream_every=STREAM_EVERY_S,
        time_limit=int(service.settings.max_stream_s),
        concurrency_limit=concurrency_limit,
        api_visibility="undocumented",
        show_progress="hidden",
    )
    microphone.stop_recording(stopped, outputs=views, api_visibility="undocumented")
    # not on `clear`: the streaming microphone clears itself on Stop, before `stop_recording`
    return windows


# ------------------------------------------------------------------------------------- the streams


class LiveWindows:
    """The open streams, one per browser window (by Gradio's session hash)."""

    def __init__(self, service: UIService) -> None:
        self.service = service
        self._windows: dict[str, LiveWindow] = {}

    def new(self, session: str) -> LiveWindow:
        self._windows[session] = LiveWindow(self.service)
        return self._windows[session]

    def get(self, session: str) -> LiveWindow:
        """The window's stream; without Record having been seen (a late start event), a new one."""
        window = self._windows.get(session)
        return window if window is not None else self.new(session)

    async def close(self, session: str) -> None:
        if (window := self._windows.pop(session, None)) is not None:
            await window.close()

    async def unload(self, request: gr.Request) -> None:
        """The page's `unload` (the window closed or reloaded): its stream is closed."""
        await self.close(request.session_hash or "")


@dataclass
class LiveWindow:
    """One window's stream and what the tab shows of it, from its messages."""

    service: UIService
    live: LiveStream | None = None
    error: str | None = None
    current: Reading | None = None  # the last interim or segment
    speaking: bool = False
    summary: SummaryMessage | None = None
    stopped: bool = False
    sample_rate: int = 0
    _stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _fed_at: float = 0.0
    _turn: asyncio.Lock = field(default_factory=asyncio.Lock)  # a chunk, or Stop: one at a time

    @property
    def segments(self) -> list[TimelineSegment]:
        return [] if self.live is None else self.live.messages.segments

    @property
    def duration_s(self) -> float:
        return 0.0 if self.live is None else self.live.duration_s

    async def feed(self, chunk: str) -> None:
        """A chunk's WAV file (its path): its samples into the stream, opened with the first."""
        rate, samples = await asyncio.to_thread(read_chunk, chunk)
        async with self._turn:
            if self.stopped:
                return  # a chunk that left the browser after Stop
            self._fed_at = time.monotonic()
            if self.live is None:
                await self._open(rate, 1 if samples.ndim == 1 else samples.shape[1])
            assert self.live is not None
            await self.live.feed(samples.tobytes())

    async def stop(self) -> None:
        """Stop: the open utterance's segment and the summary (within END_WAIT_S), then closed."""
        async with self._turn:
            self.stopped = True
            if self.live is not None and not self.live.ended:
                await self.live.end()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._tasks[0]), END_WAIT_S)
        await self.close()

    async def close(self) -> None:
        self.stopped = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stack.aclose()

    async def _open(self, sample_rate: int, channels: int) -> None:
        from emoserve.inference.protocol import StreamOptions

        options = StreamOptions(sample_rate=sample_rate, encoding="pcm_s16le", channels=channels)
        self.live = await self._stack.enter_async_context(self.service.live_stream(options))
        self.sample_rate = sample_rate
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch_idle())]

    async def _read(self) -> None:
        assert self.live is not None
        async for message in self.live.messages_out():
            match message["type"]:
                case "speech_start":
                    self.speaking = True
                case "interim":
                    self.current, self.speaking = message, True
                case "segment":
                    self.current, self.speaking = message, False
                case "summary":
                    self.summary = message
                case "error":
                    self.error = message["message"]

    async def _watch_idle(self) -> None:
        """A window that stops sending without Stop (its connection lost) frees its stream."""
        idle_s = self.service.settings.stream_idle_s
        while time.monotonic() - self._fed_at < idle_s:
            await asyncio.sleep(IDLE_CHECK_S)
        self.error = f"nothing heard for {idle_s:g} s: the stream was closed; press Record again"
        self.stopped = True
        self._tasks[0].cancel()  # the reader: nothing more comes
        await self._stack.aclose()


def read_chunk(path: str) -> tuple[int, np.ndarray]:
    """The browser's chunk (a WAV file): its rate and its samples as 16-bit little-endian, as recorded."""
    import soundfile as sf

    samples, rate = sf.read(path, dtype="int16", always_2d=False)
    return int(rate), samples.astype("<i2", copy=False)


# ------------------------------------------------------------------------------------------ drawing


def render(window: LiveWindow | None, service: UIService) -> tuple[str, str, str]:
    if window is None:
        return card_html(None, service.random_weights), "", status_html(None)
    strip = timeline_svg(window.segments, window.duration_s, svg_id="live-svg") if window.segments else ""
    return card_html(window, service.random_weights), strip, status_html(window)


def card_html(window: LiveWindow | None, random_weights: bool | None) -> str:
    warning = RANDOM_NOTE if random_weights else ""
    reading = None if window is None else window.current
    if reading is None:
        listening = "listening…" if window is not None and window.live is not None else "press Record"
        return f'<div id="live-emotion" data-state="waiting" style="{CARD}">{listening}</div>{warning}'
    kind = "interim" if reading["type"] == "interim" else "segment"
    what = (
        f"now · the last {reading['end_s'] - reading['start_s']:.1f} s"
        if kind == "interim"
        else f"utterance {reading['start_s']:.1f}-{reading['end_s']:.1f} s"
    )
    colour = emotion_colour(reading["emotion"])
    return (
        f'<div id="live-emotion" data-state="{kind}" data-emotion="{html.escape(reading["emotion"])}" '
        f'style="{CARD};border-left:10px solid {colour}">'
        f'<div style="font-size:64px;line-height:1.1">{reading["emoji"]}</div>'
        f'<div style="font-size:34px;font-weight:700">{html.escape(reading["emotion"])} '
        f"{html.escape(reading['label_zh'])}</div>"
        f'<div style="font-size:22px">{reading["confidence"]:.1%}</div>'
        f'<div style="opacity:0.7">{html.escape(what)}</div></div>{warning}'
    )


def status_html(window: LiveWindow | None) -> str:
    if window is None or window.live is None:
        state, text = "idle", "Not streaming."
    elif window.summary is not None:
        s = window.summary
        dominant = s["summary"]["dominant"] or "none (no speech)"
        state = "done"
        text = (
            f"Stream ended: {s['speech_s']:.1f} s of speech in {s['summary']['segments']} utterances over "
            f"{s['duration_s']:.1f} s; dominant {dominant}."
        )
    else:
        state = "speaking" if window.speaking else "streaming"
        text = (
            f"Streaming {window.sample_rate} Hz · {window.duration_s:.1f} s · {len(window.segments)} "
            f"utterances · {window.live.messages.skipped} readings skipped"
            + (" · speaking" if window.speaking else "")
        )
    if window is not None and window.error:
        text += f" {window.error}"
    return f'<div id="live-state" data-state="{state}">{html.escape(text)}</div>'


CARD = "padding:18px;border-radius:10px;background:var(--block-background-fill);text-align:center"
RANDOM_NOTE = (  # beside every reading: the banner above says it too, but a reading must not be read alone
    '<div id="live-random" style="margin-top:8px;padding:8px;border-radius:8px;background:#b91c1c;'
    'color:white;font-weight:700">⚠️ RANDOM WEIGHTS: these readings are meaningless</div>'
)
