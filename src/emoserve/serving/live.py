"""A live stream served: its cut on a worker thread, its scoring through the shared engine, its messages
in order, and back-pressure instead of drops.

    feed(pcm) -> LiveCutter (a thread) -> speech_start: a message at once
                                       -> interim window: scored at Priority.STREAM_INTERIM, at most one
                                          in flight (a reading due meanwhile is skipped, and counted)
                                       -> segment: scored at Priority.STREAM_SEGMENT, never skipped
    messages() yields them in the order they happened, each scored one when its score is in; flush(turn_id)
    closes the open utterance now (its segment carries the turn_id); end() flushes and the summary comes
    last.

With vad=off and chunk_s, a turn is read in pieces as it arrives (`Pieces`): each piece's frame features
at Priority.STREAM_PIECE (never skipped nor stopped), an interim reading pooling the pieces so far (no
model call of its own), and at the turn's end only its last piece is left to score, at
Priority.STREAM_SEGMENT: the reading is ready a short model call after `flush`, whatever the turn's
length.

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

import numpy as np

from emoserve.audio.live import NO_PROBS, InterimWindow, LiveEvent, SpeechStart, TurnPiece
from emoserve.audio.vad import Segment
from emoserve.inference.live import (
    StreamMessages,
    TurnPool,
    ends_its_turn,
    piece_audio,
    segment_audio,
    window_audio,
)
from emoserve.inference.protocol import ErrorMessage, ReadyMessage, StreamMessage, StreamOptions, TurnId
from emoserve.serving.metrics import Metrics

if TYPE_CHECKING:
    from emoserve.audio.decode import Audio
    from emoserve.inference.results import ModelTag, Result
    from emoserve.serving.engine import Engine

MAX_PENDING_SEGMENTS = 2  # segments cut and waiting for their scores; beyond, the stream is not read
MAX_PENDING_PIECES = 4  # pieces of turns (chunk_s) waiting for their frames; beyond, likewise


@dataclass(frozen=True)
class Pieces:
    """How a turn read in pieces (StreamOptions.chunk_s) is scored: `frames(audio, last)` a piece's frame
    features (a result whose `embedding` is (T, D); `last`: the turn's last piece, someone waits for it),
    `pooled(embedding, duration_s)` the turn's reading from its pooled embedding, read out as the stream's
    other results are; `frame_hop` the model's samples per frame."""

    frames: Callable[[Audio, bool], Awaitable[Result]]
    pooled: Callable[[np.ndarray, float], Result]
    frame_hop: int


def engine_pieces(engine: Engine, read_out: Callable[[Result], Result]) -> Pieces:
    """Pieces scored on `engine` (a full queue waited out, as a recording's segments), the turn's reading
    made by its recognizer's classifier and given to `read_out` (a head, the request's label subset and
    threshold) with its pooled embedding."""
    from emoserve.serving.engine import Priority
    from emoserve.serving.timeline import submit_waiting

    async def frames(audio: Audio, last: bool) -> Result:
        priority = Priority.STREAM_SEGMENT if last else Priority.STREAM_PIECE
        return await submit_waiting(lambda: engine.submit(audio, "frame", True, priority=priority))

    def pooled(embedding: np.ndarray, duration_s: float) -> Result:
        return read_out(engine.recognizer.pooled_result(embedding, duration_s, embedding=True))

    return Pieces(frames, pooled, engine.recognizer.info.config.frame_hop)


@dataclass
class _Item:
    kind: Literal["now", "interim", "segment", "end"]  # now: a message built when its turn comes (`build`)
    event: LiveEvent | None = None
    build: Callable[[], StreamMessage] | None = None
    score: asyncio.Task[Result] | None = None
    arrived: float = 0.0  # when the audio that produced the event arrived (segment latency)
    fatal: bool = False  # an error that ends the stream: told after the summary
    turn_id: TurnId | None = None  # a segment that answers a flush
    pieces: int = 0  # a segment whose reading pools this many pieces (chunk_s)


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
        pieces: Pieces | None = None,
    ) -> None:
        """`pieces`: how turns are read in pieces; needed for a stream with chunk_s (ValueError)."""
        if options.chunk_s and pieces is None:
            raise ValueError("chunk_s: this server does not read turns in pieces; use chunk_s=0")
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
        self._pieces = pieces
        self._turn: list[tuple[TurnPiece, asyncio.Task[Result]]] = []  # the open turn's pieces so far
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
        while len(waiting := [task for _, task in self._turn if not task.done()]) >= MAX_PENDING_PIECES:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)

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
            message = self.messages.segment(item.event, result, item.turn_id, item.pieces)
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
        for at, event in enumerate(events):
            if isinstance(event, SpeechStart):
                self._out.put_nowait(_Item("now", build=functools.partial(self.messages.speech_start, event)))
            elif isinstance(event, InterimWindow):
                if self._interim is not None and not self._interim.done():
                    self._skip()  # the last reading is still being scored: readings never pile up
                    continue
                self._interim = self._task(self._score(window_audio(event), True))
                self._out.put_nowait(_Item("interim", event, score=self._interim))
            elif isinstance(event, TurnPiece):
                assert self._pieces is not None
                last = ends_its_turn(events, at)
                self._turn.append((event, self._task(self._pieces.frames(piece_audio(event), last))))
                if not last:  # a reading of the turn so far; the last piece's is the segment
                    reading = InterimWindow(event.turn_start, event.end, NO_PROBS)
                    self._out.put_nowait(
                        _Item("interim", reading, score=self._task(self._pool(list(self._turn))))
                    )
            else:
                if self._interim is not None and not self._interim.done():
                    self._interim.cancel()  # its utterance is over: the segment says more, sooner
                self._pending += 1
                if self._pending >= MAX_PENDING_SEGMENTS:
                    self._room.clear()
                turn, self._turn = self._turn, []
                score = self._task(self._pool(turn) if turn else self._score(segment_audio(event), False))
                answer = turn_id if event is events[-1] else None
                self._out.put_nowait(
                    _Item("segment", event, score=score, arrived=arrived, turn_id=answer, pieces=len(turn))
                )

    async def _pool(self, turn: list[tuple[TurnPiece, asyncio.Task[Result]]]) -> Result:
        """The reading of a turn's pieces (those given: a copy is taken), once their frames are in."""
        assert self._pieces is not None
        pool = TurnPool(self._pieces.frame_hop)
        for piece, task in list(turn):
            frames = (await task).embedding
            assert frames is not None and frames.ndim == 2, "a piece is scored with its frame features"
            pool.add(piece, frames)
        return self._pieces.pooled(pool.pooled(), pool.duration_s)

    def _task(self, score: Awaitable[Result]) -> asyncio.Task[Result]:
        task = asyncio.ensure_future(score)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _skip(self) -> None:
        self.messages.skipped += 1
        self._metrics.stream_interims_total.labels("skipped").inc()
