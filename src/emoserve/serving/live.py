"""A live stream served: its cut on a worker thread, its scoring through the shared engine, its messages
in order, and back-pressure instead of drops.

    feed(pcm) -> LiveCutter (a thread) -> speech_start: a message at once
                                       -> interim window: scored at Priority.STREAM_INTERIM, at most one
                                          in flight (a reading due meanwhile is skipped, and counted)
                                       -> segment: scored at Priority.STREAM_SEGMENT, never skipped
    messages() yields them in the order they happened, each scored one when its score is in; flush(turn_id)
    closes the open utterance now (its segment carries the turn_id); end() flushes and the summary comes
    last.

Back-pressure: `feed` returns only once fewer than MAX_PENDING_SEGMENTS segments wait for their scores,
so a client that sends faster than the model keeps up stops being read (TCP holds its audio) instead of
the server queueing it: a stream holds at most that many segments (max_segment_s of audio each) and
the open utterance. A reading whose utterance has ended before its turn is dropped as skipped.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from emoserve.audio.live import InterimWindow, LiveEvent, SpeechStart
from emoserve.audio.vad import Segment
from emoserve.inference.live import StreamMessages, segment_audio, window_audio
from emoserve.inference.protocol import ErrorMessage, ReadyMessage, StreamMessage, StreamOptions, TurnId
from emoserve.serving.metrics import Metrics

if TYPE_CHECKING:
    from emoserve.audio.decode import Audio
    from emoserve.inference.results import ModelTag, Result

MAX_PENDING_SEGMENTS = 2  # segments cut and waiting for their scores; beyond, the stream is not read


@dataclass
class _Item:
    kind: Literal["now", "interim", "segment", "end"]  # now: a message built when its turn comes (`build`)
    event: LiveEvent | None = None
    build: Callable[[], StreamMessage] | None = None
    score: asyncio.Task[Result] | None = None
    arrived: float = 0.0  # when the audio that produced the event arrived (segment latency)
    fatal: bool = False  # an error that ends the stream: told after the summary
    turn_id: TurnId | None = None  # a segment that answers a flush


class LiveStream:
    """One client's stream on a Service (`Service.live_stream`). Feed and end from one task; read
    `messages()` from another; `close()` always (it cancels what is in flight)."""

    def __init__(
        self,
        options: StreamOptions,
        score: Callable[[Audio, bool], Awaitable[Result]],
        *,
        tag: ModelTag,
        labels: list[dict[str, str]],
        metrics: Metrics,
    ) -> None:
        self.options = options
        self.cutter = options.cutter()
        self.messages = StreamMessages(options, tag)
        self.ready_message: ReadyMessage = self.messages.ready(labels)
        self._score = score
        self._metrics = metrics
        self._out: asyncio.Queue[_Item] = asyncio.Queue()
        self._pending = 0  # segments in _out not sent yet
        self._room = asyncio.Event()
        self._room.set()
        self._interim: asyncio.Task[Result] | None = None
        self._tasks: set[asyncio.Task[Result]] = set()
        self.ended = False

    @property
    def duration_s(self) -> float:
        return self.cutter.duration_s

    async def feed(self, data: bytes) -> None:
        """Cut `data` (AudioError for a message that is not whole samples: the stream goes on); returns
        once the stream has room for more (back-pressure)."""
        arrived = time.monotonic()
        events = await asyncio.to_thread(self.cutter.feed, data)
        self._metrics.stream_audio_seconds_total.inc(self.options.seconds(len(data)))
        self._dispatch(events, arrived)
        await self._room.wait()

    async def flush(self, turn_id: TurnId | None = None) -> None:
        """Close the open utterance now (with vad=off: the turn): its segment, scored as a segment, carries
        `turn_id`; with nothing to score, an `invalid_message` error carries it."""
        events = await asyncio.to_thread(self.cutter.flush)
        if any(isinstance(event, Segment) for event in events):
            self._dispatch(events, time.monotonic(), turn_id)
        else:
            self._dispatch(events, time.monotonic())
            self._metrics.count_error("invalid_message")
            build = functools.partial(self.messages.nothing_to_flush, turn_id)
            self._out.put_nowait(_Item("now", build=build))
        await self._room.wait()

    async def end(self) -> None:
        """No more audio: the open utterance's segment, then the summary."""
        if self.ended:
            return
        self.ended = True
        self._dispatch(await asyncio.to_thread(self.cutter.end), time.monotonic())
        self._out.put_nowait(_Item("end"))

    async def messages_out(self) -> AsyncIterator[StreamMessage]:
        """The stream's messages after `ready`, in order, until the summary."""
        while True:
            item = await self._out.get()
            if item.kind == "end":
                # errors queued meanwhile: the stream's own before its summary, a fatal one after it
                after = [self._out.get_nowait() for _ in range(self._out.qsize())]
                for build in [i.build for i in after if i.build is not None and not i.fatal]:
                    yield build()
                yield self.messages.summary(self.duration_s)
                for build in [i.build for i in after if i.build is not None and i.fatal]:
                    yield build()
                return
            if item.kind == "now":
                assert item.build is not None
                yield item.build()
                continue
            assert item.score is not None
            if item.kind == "interim":
                assert isinstance(item.event, InterimWindow)
                await asyncio.wait([item.score])
                if item.score.cancelled() or item.score.exception() is not None:
                    self._skip()  # overtaken by its segment, or no room in the engine: best effort
                    continue
                self._metrics.stream_interims_total.labels("sent").inc()
                yield self.messages.interim(item.event, item.score.result())
                continue
            assert isinstance(item.event, Segment)
            try:
                result = await item.score
            finally:
                self._pending -= 1
                if self._pending < MAX_PENDING_SEGMENTS:
                    self._room.set()
            message = self.messages.segment(item.event, result, item.turn_id)
            self._metrics.stream_segment_latency_seconds.observe(time.monotonic() - item.arrived)
            yield message

    def error(self, code: str, message: str, fatal: bool) -> None:
        """An `error` message, in its place among the others (after what is already on its way), counted
        in the error metrics by its code."""
        self._metrics.count_error(code)
        build: Callable[[], ErrorMessage] = functools.partial(self.messages.error, code, message, fatal)
        self._out.put_nowait(_Item("now", build=build, fatal=fatal))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._room.set()

    def _dispatch(self, events: list[LiveEvent], arrived: float, turn_id: TurnId | None = None) -> None:
        """`turn_id`: the last event is the segment that answers a flush."""
        for event in events:
            if isinstance(event, SpeechStart):
                self._out.put_nowait(_Item("now", build=functools.partial(self.messages.speech_start, event)))
            elif isinstance(event, InterimWindow):
                if self._interim is not None and not self._interim.done():
                    self._skip()  # the last reading is still being scored: readings never pile up
                    continue
                self._interim = self._task(self._score(window_audio(event), True))
                self._out.put_nowait(_Item("interim", event, score=self._interim))
            else:
                if self._interim is not None and not self._interim.done():
                    self._interim.cancel()  # its utterance is over: the segment says more, sooner
                self._pending += 1
                if self._pending >= MAX_PENDING_SEGMENTS:
                    self._room.clear()
                score = self._task(self._score(segment_audio(event), False))
                answer = turn_id if event is events[-1] else None
                self._out.put_nowait(_Item("segment", event, score=score, arrived=arrived, turn_id=answer))

    def _task(self, score: Awaitable[Result]) -> asyncio.Task[Result]:
        task = asyncio.ensure_future(score)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _skip(self) -> None:
        self.messages.skipped += 1
        self._metrics.stream_interims_total.labels("skipped").inc()
