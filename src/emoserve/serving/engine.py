"""Dynamic batching: one worker thread owns the Recognizer and serves requests from any thread or loop.

    submit -> bounded queue -> collect (max_batch_size | max_wait_ms) -> the oldest request's
    (granularity, embedding) group -> length_batches (max_padding, max_batch_seconds)
    -> predict_batch -> each request's future

Torch inference blocks, and a Recognizer is not thread-safe, so exactly one thread touches the model.
No HTTP and no Gradio here (docs/architecture.md): QueueFull and EngineStopped carry their 503 themselves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from emoserve.audio.decode import Audio
from emoserve.constants import (
    BATCHING_CHOICES,
    GRANULARITIES,
    MAX_BATCH_SECONDS,
    MAX_BATCH_SIZE,
    MAX_QUEUE,
    MAX_WAIT_MS,
    SAMPLE_RATE,
    Granularity,
)
from emoserve.errors import EngineStopped, Preempted, QueueFull
from emoserve.inference.recognizer import MAX_PADDING, Recognizer, length_batches
from emoserve.inference.results import Result

log = logging.getLogger(__name__)

RECENT_BATCHES = 16  # model-call durations kept for the Retry-After estimate
MIN_RETRY_AFTER_S = 1.0  # Retry-After is whole seconds on the wire; never tell a client "now"
SCORE_SUM_TOL = 1e-3  # a float32 softmax over a few labels sums to 1 within ~1e-6; 1e-3 is real trouble
FRAME_MEAN_TOL = 1e-4  # the fixture README's float32 embedding tolerance


# Whether one model call of several clips costs less than the same clips one at a time, measured per
# (backend, device type) with benchmarks/batching.py. Where it does not, batching "auto" runs one clip per
# call: a batch would only make each of its clips slower, and a request no longer waits max_wait_ms for
# company.
BATCHING_PAYS: dict[tuple[str, str], tuple[bool, str]] = {
    ("onnx", "cpu"): (
        False,
        "a batch of clips on the onnx backend on a CPU costs as much as the same clips one at a time or "
        "more (1.00-1.04x on a 2-core AMD EPYC, 1.33-1.38x on another CPU: docs/benchmarks.md section 13)",
    ),
    ("openvino", "cpu"): (
        False,
        "a batch of mixed clips on the openvino backend (bfloat16) on a CPU costs 1.09x the same clips one "
        "at a time (4 equal clips: 0.93x) on a 2-core AMD EPYC, and every batch size is one more shape "
        "for its per-shape cache: docs/benchmarks.md section 17",
    ),
    ("torch", "cpu"): (
        True,
        "a batch of equal clips on the torch backend on a CPU costs 0.74-0.94x the same clips one at a "
        "time (docs/benchmarks.md section 3)",
    ),
    ("torch", "cuda"): (True, "a GPU runs a batch of clips in about the time of one"),
}


@dataclass(frozen=True)
class Batching:
    """The batch size the engine runs, and why (the log and GET /v1/model say it)."""

    max_batch_size: int
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {"max_batch_size": self.max_batch_size, "reason": self.reason}


def choose_batching(setting: str, max_batch_size: int, backend: str, device_type: str) -> Batching:
    """`setting` "on": up to max_batch_size; "off": 1; "auto": where BATCHING_PAYS says it pays."""
    if setting not in BATCHING_CHOICES:
        raise ValueError(f"batching is {setting!r}; choose from {', '.join(BATCHING_CHOICES)}")
    if setting != "auto" or max_batch_size == 1:
        size = 1 if setting == "off" else max_batch_size
        return Batching(size, f"batching {setting}, max_batch_size {max_batch_size}")
    pays, evidence = BATCHING_PAYS.get((backend, device_type), (True, "not measured on this hardware"))
    if pays:
        return Batching(max_batch_size, f"batching: up to {max_batch_size} clips per model call: {evidence}")
    return Batching(1, f"batching off: one clip per model call: {evidence}; --batching on to batch anyway")


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = MAX_BATCH_SIZE
    # "on": batches of up to max_batch_size; "off": one clip per call; "auto": batch only where it pays
    # on the model's backend and device (`choose_batching`)
    batching: str = "on"
    max_wait_ms: float = MAX_WAIT_MS
    max_batch_seconds: float = MAX_BATCH_SECONDS
    max_queue: int = MAX_QUEUE
    max_padding: float = MAX_PADDING  # join a batch only while padding is at most this x real samples
    # padded seconds of a model call of requests below Priority.CLIP (None: max_batch_seconds). On a CPU
    # a batch gains little and an interactive request that arrives waits for the whole call.
    max_background_batch_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size is {self.max_batch_size}; it must be at least 1")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms is {self.max_wait_ms}; it must be 0 or more")
        if not self.max_batch_seconds > 0:
            raise ValueError(f"max_batch_seconds is {self.max_batch_seconds}; it must be positive")
        if self.max_queue < 1:
            raise ValueError(f"max_queue is {self.max_queue}; it must be at least 1")
        if not self.max_padding >= 0:
            raise ValueError(f"max_padding is {self.max_padding}; it must be 0 or more")


@dataclass(frozen=True)
class RequestTiming:
    queue_s: float  # submitted -> its model call started
    inference_s: float  # its model call started -> result ready (a solo retry after a failed batch included)
    batch_size: int  # clips in the model call that produced the result


class EngineObserver(Protocol):
    """Hooks for metrics. Called on the worker thread, one call at a time; an exception in a hook is
    logged and ignored. Subclass it to implement only some hooks: the others stay no-ops."""

    def batch_done(self, size: int, audio_seconds: float, padded_seconds: float, seconds: float) -> None:
        """After each model call that returned results."""
        return None  # a no-op, not abstract: implementations may leave it out

    def queue_changed(self, depth: int) -> None:
        """The number of waiting requests, whenever the worker sees it changed (not during a model call)."""
        return None


class Priority(enum.IntEnum):
    """Who waits on a request, highest first: a person's clip, a live stream's segment, a piece of a turn
    read in pieces (chunk_s: its turn's reading needs it, so it is never skipped nor stopped), a live
    stream's interim reading, a long recording's segment. The worker takes the oldest request of the highest
    priority queued; requests batch only with their own priority (a lower one riding along would make the
    higher one wait for it)."""

    CLIP = 0
    STREAM_SEGMENT = 1
    STREAM_PIECE = 2
    STREAM_INTERIM = 3
    TIMELINE = 4


# Work whose model call is stopped part-way (where the backend can) when more urgent work arrives: a live
# reading is best effort, and a new one comes a hop_s later; its requests fail with Preempted.
PREEMPTIBLE = frozenset({Priority.STREAM_INTERIM})


@dataclass(eq=False)  # identity equality: the queue removes this very request
class _Request:
    audio: Audio
    granularity: Granularity
    embedding: bool
    submitted_at: float  # time.monotonic()
    priority: Priority = Priority.CLIP
    future: concurrent.futures.Future[tuple[Result, RequestTiming]] = field(
        default_factory=concurrent.futures.Future
    )
    padded_samples: int = 0  # set by the worker: the padded length of the call that produced the result

    @property
    def key(self) -> tuple[Granularity, bool]:
        return self.granularity, self.embedding

    @property
    def n_samples(self) -> int:
        return len(self.audio.samples)


class Engine:
    """Batches requests from any number of threads and event loops onto one model-owning thread."""

    def __init__(
        self,
        recognizer: Recognizer,
        config: EngineConfig = EngineConfig(),
        observer: EngineObserver | None = None,
    ) -> None:
        self.recognizer = recognizer  # read-only use outside the worker: labels, info, device, dtype
        self.batching = (
            choose_batching("auto", config.max_batch_size, recognizer.backend.name, recognizer.device_type)
            if config.batching == "auto"
            else choose_batching(config.batching, config.max_batch_size, "", "")
        )
        self.config = dataclasses.replace(config, max_batch_size=self.batching.max_batch_size)
        self._observer = observer
        self._max_batch_samples = max(1, int(config.max_batch_seconds * SAMPLE_RATE))
        background_s = config.max_background_batch_seconds or config.max_batch_seconds
        self._max_background_samples = max(1, int(min(background_s, config.max_batch_seconds) * SAMPLE_RATE))
        self._cond = threading.Condition()  # guards everything below that the worker shares
        self._queue: deque[_Request] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._in_flight = 0
        self._model_calls = 0
        self._running_priority: Priority | None = None  # of the model call in progress
        self._preempting = False  # that call was asked to stop (PREEMPTIBLE)
        self.preempted = 0  # requests whose call was stopped for more urgent work
        self._recent_call_s: deque[float] = deque(maxlen=RECENT_BATCHES)
        self._reported_depth: int | None = None  # worker only
        self._failed_hooks: set[str] = set()  # worker only

    # ------------------------------------------------------------------------------------------ public

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a model call."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Requests in the model call running now."""
        return self._in_flight

    @property
    def model_calls(self) -> int:
        """Calls of `recognizer.predict_batch` so far, solo retries after a failed batch included."""
        return self._model_calls

    @property
    def accepting(self) -> bool:
        """Started and not stopping: submit would not raise EngineStopped."""
        return self._thread is not None and not self._stopping

    def start(self) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("this Engine was stopped and cannot restart; create a new one")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._work, name="emoserve-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop accepting, let queued and in-flight requests finish, join the worker. Requests still
        queued when `timeout_s` runs out fail with EngineStopped; the running model call completes."""
        with self._cond:
            if not self._stopping:
                log.info("engine stopping: %d queued, %d in flight", len(self._queue), self._in_flight)
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join(timeout_s)
        if thread.is_alive():
            self._abandon_queue(timeout_s)

    async def submit_timed(
        self,
        audio: Audio,
        granularity: Granularity = "utterance",
        embedding: bool = False,
        *,
        priority: Priority = Priority.CLIP,
    ) -> tuple[Result, RequestTiming]:
        """Awaitable from any event loop. Cancelling the awaiting task drops a request that is still
        queued; one already in a model call completes and its result is discarded. A request waits while
        requests of a higher `priority` are queued."""
        (request,) = self._enqueue([audio], granularity, embedding, priority=priority)
        return await asyncio.wrap_future(request.future)

    async def submit(
        self,
        audio: Audio,
        granularity: Granularity = "utterance",
        embedding: bool = False,
        *,
        priority: Priority = Priority.CLIP,
    ) -> Result:
        return (await self.submit_timed(audio, granularity, embedding, priority=priority))[0]

    def submit_blocking(
        self,
        audio: Audio,
        granularity: Granularity = "utterance",
        embedding: bool = False,
        timeout_s: float | None = None,
    ) -> Result:
        """For threads (Gradio handlers). On timeout the request is dropped if still queued."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("submit_blocking from the engine's own thread would wait for itself")
        (request,) = self._enqueue([audio], granularity, embedding)
        try:
            return request.future.result(timeout_s)[0]
        except concurrent.futures.TimeoutError:
            request.future.cancel()
            raise

    # ----------------------------------------------------------------------------------------- queueing

    def _enqueue(
        self,
        audios: Sequence[Audio],
        granularity: Granularity,
        embedding: bool,
        *,
        priority: Priority = Priority.CLIP,
    ) -> list[_Request]:
        """Queue all of `audios` at once (so that warm-up can hand the worker a whole batch)."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity is {granularity!r}; choose 'utterance' or 'frame'")
        for audio in audios:
            if not isinstance(audio, Audio):
                raise TypeError(
                    "the engine takes an Audio (from load_audio or recognizer.load), "
                    f"got {type(audio).__name__}"
                )
        now = time.monotonic()
        requests = [_Request(audio, granularity, embedding, now, priority) for audio in audios]
        with self._cond:
            self._check_accepting()
            if len(self._queue) + len(requests) > self.config.max_queue:
                raise QueueFull(self._retry_after_s())
            self._queue.extend(requests)
            self._cond.notify_all()
            running = self._running_priority
            if running in PREEMPTIBLE and priority < running and not self._preempting:
                # under the lock: the worker cannot start another call before this one is stopped
                self._preempting = bool(getattr(self.recognizer, "interrupt", lambda: False)())
        for request in requests:  # the callback must not hold the request: that would make a cycle
            request.future.add_done_callback(self._forget_if_cancelled)  # (request -> future -> request)
        return requests

    def _check_accepting(self) -> None:
        if self._thread is None and not self._stopping:
            raise EngineStopped("the engine is not started yet; it accepts requests once the model is loaded")
        if self._stopping:
            raise EngineStopped("the engine is shutting down and accepts no new requests")

    def _retry_after_s(self) -> float:
        """Time to work through the requests now waiting, from recent model calls (lock held)."""
        per_call_s = sum(self._recent_call_s) / len(self._recent_call_s) if self._recent_call_s else 0.0
        calls_ahead = math.ceil(len(self._queue) / self.config.max_batch_size) + (1 if self._in_flight else 0)
        return max(MIN_RETRY_AFTER_S, calls_ahead * per_call_s)

    def _forget_if_cancelled(self, future: concurrent.futures.Future[tuple[Result, RequestTiming]]) -> None:
        # Runs in the cancelling thread: the place in the queue is free before cancel() returns.
        if not future.cancelled():
            return
        with self._cond:
            queued = next((r for r in self._queue if r.future is future), None)
            if queued is None:
                return  # the worker took it out already and will skip it
            self._queue.remove(queued)
            self._cond.notify_all()  # the worker reports the new depth

    def _abandon_queue(self, timeout_s: float | None) -> None:
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
        for request in left:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(
                    EngineStopped(f"the engine stopped (timeout {timeout_s} s) before this request ran")
                )
        log.warning("engine did not drain within %s s; %d queued requests failed", timeout_s, len(left))

    # ------------------------------------------------------------------------------------------- worker

    def _work(self) -> None:
        log.info("engine worker started: %s; %s", self.config, self.batching.reason)
        while (batch := self._next_batch()) is not None:
            try:
                self._run(batch)
            except Exception as error:  # a bug here must not leave callers waiting forever
                log.exception("engine failed a batch of %d", len(batch))
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(error)
            self._report_depth(len(self._queue))
        log.info("engine worker stopped after %d model calls", self._model_calls)

    def _next_batch(self) -> list[_Request] | None:
        """Block until a batch is due and take it out of the queue; None once stopping and drained."""
        while True:
            batch: list[_Request] = []
            with self._cond:
                if not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait()
                elif (wait_s := self._company_wait_s()) > 0:
                    self._cond.wait(wait_s)
                else:
                    batch = self._take_batch()
                    self._in_flight = len(batch)
                    self._running_priority = batch[0].priority if batch else None
                depth = len(self._queue)
            self._report_depth(depth)  # outside the lock: a slow observer must not block submit
            if batch:
                return batch

    def _company_wait_s(self) -> float:
        """How much longer the oldest request waits for others to fill its batch (lock held)."""
        if self._stopping or len(self._queue) >= self.config.max_batch_size:
            return 0.0
        deadline = self._queue[0].submitted_at + self.config.max_wait_ms / 1000
        return deadline - time.monotonic()

    def _take_batch(self) -> list[_Request]:
        """The oldest request and those that may share its model call (lock held). Only requests with
        the same (granularity, embedding) share a call, so each result equals its one-at-a-time result;
        the oldest is always served, so nothing starves - except that a request waits while one of a
        higher priority is queued (`Priority`), and batches only with its own priority."""
        top = min(r.priority for r in self._queue)
        oldest = next(r for r in self._queue if r.priority == top)
        candidates = [r for r in self._queue if r.key == oldest.key and r.priority == top]
        groups = length_batches(
            [r.n_samples for r in candidates],
            self.config.max_batch_size,
            self._max_batch_samples if top == Priority.CLIP else self._max_background_samples,
            self.config.max_padding,
        )
        first = candidates.index(oldest)
        chosen = next(group for group in groups if first in group)
        batch = [candidates[i] for i in sorted(chosen)]  # submission order
        for request in batch:
            self._queue.remove(request)
        # False: cancelled between cancel() and its callback removing it; skip it
        return [r for r in batch if r.future.set_running_or_notify_cancel()]

    def _run(self, batch: list[_Request]) -> None:
        try:
            self._predict(batch, time.monotonic())
        finally:
            with self._cond:
                self._in_flight = 0
                self._running_priority, self._preempting = None, False

    def _predict(self, batch: list[_Request], started: float) -> None:
        """One model call for `batch`; if it raises, each request alone, so only the culprit fails."""
        try:
            results = self._call_model(batch)
        except Exception as error:
            with self._cond:
                preempted = self._preempting
            if preempted:  # stopped for more urgent work: best effort, not retried
                self.preempted += len(batch)
                for request in batch:
                    request.future.set_exception(Preempted())
                return
            if len(batch) == 1:
                log.warning("request %r failed: %s", batch[0].audio.source, error, exc_info=True)
                batch[0].future.set_exception(error)
                return
            log.warning("a batch of %d failed (%r); running each request alone", len(batch), error)
            for request in batch:
                self._predict([request], started)
            return
        finished = time.monotonic()
        for request, result in zip(batch, results, strict=True):
            timing = RequestTiming(started - request.submitted_at, finished - started, len(batch))
            request.future.set_result((result, timing))

    def _padded_width(self, samples: int) -> int:
        padded_width = getattr(self.recognizer, "padded_width", None)  # tests' stand-ins may lack it
        return int(padded_width(samples)) if padded_width is not None else samples

    def _call_model(self, batch: list[_Request]) -> list[Result]:
        lengths = [r.n_samples for r in batch]
        padded = self._padded_width(max(lengths))
        self._model_calls += 1
        t0 = time.monotonic()
        results = self.recognizer.predict_batch(
            [r.audio for r in batch], batch[0].granularity, batch[0].embedding
        )
        seconds = time.monotonic() - t0
        if len(results) != len(batch):
            raise RuntimeError(f"predict_batch returned {len(results)} results for {len(batch)} clips")
        with self._cond:
            self._recent_call_s.append(seconds)
        for request in batch:
            request.padded_samples = padded
        self._notify(
            "batch_done", len(batch), sum(lengths) / SAMPLE_RATE, padded * len(batch) / SAMPLE_RATE, seconds
        )
        return results

    def _report_depth(self, depth: int) -> None:
        if depth != self._reported_depth:
            self._reported_depth = depth
            self._notify("queue_changed", depth)

    def _notify(self, hook: str, *args: float) -> None:
        method = getattr(self._observer, hook, None)
        if method is None:
            return
        try:
            method(*args)
        except Exception:
            # Metrics must never take the model down. The first failure of a hook shows its traceback;
            # later ones go to debug so that a broken hook cannot flood the log once per request.
            if hook in self._failed_hooks:
                log.debug("engine observer %s failed again", hook, exc_info=True)
            else:
                self._failed_hooks.add(hook)
                log.exception("engine observer %s failed (later failures are logged at debug level)", hook)
