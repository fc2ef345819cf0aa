"""A long recording's timeline served: its segments cut on a thread of their own, scored through the
shared engine after everything else, at most TIMELINE_IN_FLIGHT at a time, yielded in the order they were
found. `Service.timeline` and Ray Serve's UI replica (`RemoteService`) score with it.

    open_recording (blocking: a recording's errors come before any work) -> scored_in_order(job, score):
    SegmentFeed (the cut, on a thread) -> score(segment) (at most `depth` in flight) -> TimelineSegment
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from emoserve.errors import QueueFull

if TYPE_CHECKING:
    from emoserve.audio.decode import Audio
    from emoserve.audio.segments import Recording
    from emoserve.audio.vad import Segment
    from emoserve.inference.results import Result, TimelineSegment
    from emoserve.serving.engine import Engine

TIMELINE_QUEUE_WAIT_S = 120.0  # a timeline's segment waits this long for room in a full queue, then 503
# At most this many segments of one recording wait in the engine (queued or running), so that one long
# file cannot fill the queue that the other users share.
TIMELINE_IN_FLIGHT = 8
# what a too-long error tells the user to change: this server's own setting, not the library's max_seconds
TIMELINE_LIMIT_SETTING = "this server's max_timeline_s: --max-timeline-s / EMOSERVE_MAX_TIMELINE_S"


def open_recording(
    source: Any, max_timeline_s: float, *, name: str | None = None, **options: Any
) -> Recording:
    """A recording for `scored_in_order`, within `max_timeline_s` (blocking: run it in a thread); a
    too-long error names this server's setting."""
    from emoserve.audio.segments import Recording

    return Recording(
        source, name=name, max_seconds=max_timeline_s, limit_setting=TIMELINE_LIMIT_SETTING, **options
    )


async def scored_in_order(
    job: Recording, score: Callable[[Audio], Awaitable[Result]], depth: int = TIMELINE_IN_FLIGHT
) -> AsyncGenerator[TimelineSegment, None]:
    """The job's segments, cut on a thread of their own (`SegmentFeed`), each scored by `score` with at
    most `depth` in flight, yielded in the order they were found. Leaving early (a client that went away)
    stops the cutting and cancels what is in flight. The engine's and Ray Serve's UI replica's timelines."""
    from emoserve.inference.results import scored

    feed = SegmentFeed(job, depth=depth)
    sent: deque[tuple[Segment, asyncio.Task[Result]]] = deque()
    try:
        while (segment := await feed.get()) is not None:
            sent.append((segment, asyncio.ensure_future(score(job.clip(segment)))))
            if len(sent) == depth:
                segment, task = sent.popleft()
                yield scored(segment, await task)
        while sent:
            segment, task = sent.popleft()
            yield scored(segment, await task)
    finally:
        feed.stop()
        for _, task in sent:
            task.cancel()
        await asyncio.gather(*(task for _, task in sent), return_exceptions=True)


async def submit_segment(engine: Engine, audio: Audio, embedding: bool = False) -> Result:
    """One segment at the timeline's priority (after everything else), waiting out a full queue."""
    from emoserve.serving.engine import Priority

    return await submit_waiting(lambda: engine.submit(audio, embedding=embedding, priority=Priority.TIMELINE))


async def submit_waiting(submit: Callable[[], Awaitable[Any]]) -> Any:
    """`submit()`'s result; a full queue (other users' traffic) is waited out for up to
    TIMELINE_QUEUE_WAIT_S rather than failing a recording or a stream part-way. `submit` gives a Result,
    or (Result, timing), whose Result is returned."""
    deadline = time.monotonic() + TIMELINE_QUEUE_WAIT_S
    while True:
        try:
            got = await submit()
            return got[0] if isinstance(got, tuple) else got
        except QueueFull as error:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(min(1.0, error.retry_after_s or 1.0))


class SegmentFeed:
    """`job.segments()` on a thread of its own (decoding and the VAD block the event loop otherwise),
    handed to a coroutine through at most `depth` waiting segments; `stop()` ends the thread at its next
    segment and closes the file, whatever it was doing."""

    _END = object()

    def __init__(self, job: Recording, depth: int = TIMELINE_IN_FLIGHT) -> None:
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue[Any] = asyncio.Queue()
        self._slots = threading.Semaphore(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(job,), name="emoserve-timeline", daemon=True)
        self._thread.start()

    async def get(self) -> Segment | None:
        """The next segment, None at the end; the job's error (a damaged file) is raised here."""
        item = await self._items.get()
        self._slots.release()
        if item is self._END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        self._stop.set()

    def _run(self, job: Recording) -> None:
        segments = job.segments()
        try:
            for segment in segments:
                if not self._put(segment):
                    return
            self._put(self._END)
        except Exception as error:
            self._put(error)
        finally:
            segments.close()

    def _put(self, item: object) -> bool:
        while not self._slots.acquire(timeout=0.1):
            if self._stop.is_set():
                return False
        if self._stop.is_set():
            return False
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            return False
        return True
