"""The batching engine: few model calls for a burst, one-at-a-time results, back-pressure, cancellation,
failure isolation, draining, observer hooks and warm-up."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import pytest
import torch

from emoserve.audio.decode import Audio
from emoserve.constants import SAMPLE_RATE, Granularity
from emoserve.errors import EngineStopped, Preempted, QueueFull, WarmupError
from emoserve.inference.recognizer import Recognizer
from emoserve.inference.results import Result
from emoserve.serving.engine import (
    BATCHING_PAYS,
    Engine,
    EngineConfig,
    EngineObserver,
    Priority,
    choose_batching,
)
from emoserve.serving.warmup import warm_up
from tests.support.reference import wave

T = TypeVar("T")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """The tiny model's ops take microseconds: on a shared 2-core runner a second intra-op thread
    mostly waits for a core, which made these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def audio(samples: np.ndarray, source: str) -> Audio:
    return Audio(
        np.ascontiguousarray(samples, dtype=np.float32), source, SAMPLE_RATE, 1, "array", None, False
    )


def window(i: int, source: str | None = None) -> Audio:
    """Speech from the 31 s fixture clip: 1.0 s + 20 ms x i, so any few of them batch together."""
    start = i * SAMPLE_RATE
    return audio(wave("en_31s_16k.wav")[start : start + SAMPLE_RATE + 320 * i], source or f"window{i}")


def silence(seconds: float, source: str) -> Audio:
    return audio(np.zeros(int(seconds * SAMPLE_RATE)), source)


def assert_same(result: Result, reference: Result) -> None:
    assert (result.emotion, result.granularity) == (reference.emotion, reference.granularity)
    np.testing.assert_allclose(
        list(result.scores.values()), list(reference.scores.values()), atol=1e-6, rtol=0
    )
    if reference.embedding is None:
        assert result.embedding is None
    else:
        assert result.embedding is not None and result.embedding.shape == reference.embedding.shape
        np.testing.assert_allclose(result.embedding, reference.embedding, atol=1e-5, rtol=0)
    if reference.frames is None:
        assert result.frames is None
    else:
        assert result.frames is not None and len(result.frames) == len(reference.frames)
        for frame, ref in zip(result.frames, reference.frames, strict=True):
            np.testing.assert_allclose(list(frame.scores.values()), list(ref.scores.values()), atol=1e-6)


class FakeRecognizer:
    """predict_batch without a model: records each call's sources, can hold every call until `gate` is
    set, and fails any call that holds the clip named `bad`. A result's emotion is its clip's source."""

    labels = ()
    dtype = torch.float32

    def __init__(self, gate: threading.Event | None = None, bad: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.gate = gate
        self.bad = bad

    def predict_batch(
        self, clips: Sequence[Audio], granularity: Granularity, embedding: bool
    ) -> list[Result]:
        sources = [clip.source for clip in clips]
        self.calls.append(sources)
        if self.gate is not None and not self.gate.wait(10):
            raise TimeoutError("the test never opened the gate")
        if self.bad in sources:
            raise ValueError(f"cannot take {self.bad}")
        tag = ("fake", True, "torch", "float32")
        return [Result(c.source, "", "", 1.0, {}, c.duration_s, granularity, *tag) for c in clips]


class Wrapped:
    """The tiny model with `predict_batch` replaced; everything else passes through."""

    def __init__(self, inner: Recognizer, predict_batch: Callable[..., list[Result]]) -> None:
        self.inner = inner
        self.predict_batch = predict_batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextmanager
def running(recognizer: Any, observer: EngineObserver | None = None, **config: Any) -> Iterator[Engine]:
    engine = Engine(recognizer, EngineConfig(**config), observer)
    engine.start()
    try:
        yield engine
    finally:
        gate = getattr(recognizer, "gate", None)
        if gate is not None:
            gate.set()
        engine.stop(timeout_s=10)


def run(job: Coroutine[Any, Any, T]) -> T:
    """asyncio.run with a deadline, so that a request the engine loses fails the test, not hangs it."""
    return asyncio.run(asyncio.wait_for(job, 30))


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the engine"
        await asyncio.sleep(0.002)


# ----------------------------------------------------------------------------------------------- batching


def test_burst_takes_few_model_calls_and_matches_one_at_a_time(tiny_recognizer: Recognizer) -> None:
    clips = [window(i) for i in range(8)]
    references = [tiny_recognizer.predict(c, "utterance", embedding=True) for c in clips]

    async def burst(engine: Engine) -> list[Any]:
        return await asyncio.gather(*(engine.submit_timed(c, "utterance", embedding=True) for c in clips))

    # a long max_wait_ms: the calls start because batches are full, not because the wait ran out
    with running(tiny_recognizer, max_batch_size=4, max_wait_ms=5000) as engine:
        outcomes = run(burst(engine))
        assert engine.model_calls <= 2
    for (result, timing), reference in zip(outcomes, references, strict=True):
        assert_same(result, reference)
        assert timing.batch_size == 4
        assert timing.queue_s >= 0 and timing.inference_s > 0


def test_mixed_granularities_in_one_burst_match_one_at_a_time(tiny_recognizer: Recognizer) -> None:
    flags: list[tuple[Granularity, bool]] = [
        ("utterance", True), ("frame", False), ("utterance", False),
        ("frame", True), ("utterance", False), ("frame", False),
    ]  # fmt: skip
    clips = [window(i) for i in range(len(flags))]
    references = [tiny_recognizer.predict(c, g, embedding=e) for c, (g, e) in zip(clips, flags, strict=True)]

    async def burst(engine: Engine) -> list[Result]:
        return await asyncio.gather(*(engine.submit(c, g, e) for c, (g, e) in zip(clips, flags, strict=True)))

    with running(tiny_recognizer, max_batch_size=8, max_wait_ms=200) as engine:
        results = run(burst(engine))
        assert engine.model_calls <= len(set(flags))
    for result, reference in zip(results, references, strict=True):
        assert_same(result, reference)


def test_a_lone_request_waits_max_wait_ms_not_for_a_full_batch() -> None:
    """It waits its max_wait_ms for company (never less: a timer does not fire early; 5 ms for the clock's
    grain), then goes alone; a longer max_wait_ms makes it wait longer - a relation, not a wall clock."""
    waited = {}
    for max_wait_ms in (50, 300):
        with running(FakeRecognizer(), max_batch_size=8, max_wait_ms=max_wait_ms) as engine:
            result, timing = run(engine.submit_timed(silence(1, "alone")))
        assert result.emotion == "alone" and timing.batch_size == 1
        assert timing.queue_s >= max_wait_ms / 1000 - 0.005, (max_wait_ms, timing)
        waited[max_wait_ms] = timing.queue_s
    assert waited[50] < waited[300], waited


def test_requests_arriving_within_max_wait_ms_share_one_call() -> None:
    """Each arrives once the one before is known to wait in the queue (no sleeps between them); the
    window is wide enough that no loaded machine closes it first, and the third fills the batch."""
    fake = FakeRecognizer()

    async def staggered(engine: Engine) -> list[Result]:
        tasks = []
        for n, name in enumerate(["a", "b", "c"], 1):
            tasks.append(asyncio.create_task(engine.submit(silence(1, name))))
            if n < 3:
                await wait_until(lambda n=n: engine.queue_depth == n)  # waiting for company, not sent
        return await asyncio.gather(*tasks)

    with running(fake, max_batch_size=3, max_wait_ms=10_000) as engine:
        results = run(staggered(engine))
        assert engine.model_calls == 1
    assert [r.emotion for r in results] == ["a", "b", "c"]
    assert fake.calls == [["a", "b", "c"]]


def test_batches_are_cut_by_length_and_by_padded_seconds() -> None:
    fake = FakeRecognizer()
    clips = [silence(1, f"short{i}") for i in range(4)] + [silence(10, "long")]

    async def burst(engine: Engine) -> list[Result]:
        return await asyncio.gather(*(engine.submit(c) for c in clips))

    # 2.5 padded seconds: two 1 s clips per call; the 10 s clip is far too long to pad the others to
    with running(fake, max_batch_size=5, max_wait_ms=200, max_batch_seconds=2.5) as engine:
        results = run(burst(engine))
    assert [r.emotion for r in results] == [c.source for c in clips]
    assert sorted(fake.calls) == [["long"], ["short0", "short1"], ["short2", "short3"]]


def test_requests_go_by_priority_then_first_come_first_served() -> None:
    """A person's clip, then a live stream's segment, then its interim, then a long recording's segments
    (which among themselves go first come first served); each priority batches only with itself, and
    below a person's clip a call holds at most max_background_batch_seconds of padded audio."""
    fake = FakeRecognizer(threading.Event())

    async def scenario(engine: Engine) -> None:
        def submit(name: str, priority: Priority) -> asyncio.Task[Result]:
            return asyncio.create_task(engine.submit(silence(1, name), priority=priority))

        first = submit("seg0", Priority.TIMELINE)
        await wait_until(lambda: engine.in_flight == 1)
        later = [submit(f"seg{i}", Priority.TIMELINE) for i in (1, 2, 3)]
        later += [submit("interim", Priority.STREAM_INTERIM), submit("stream", Priority.STREAM_SEGMENT)]
        await wait_until(lambda: engine.queue_depth == 5)
        person = submit("person", Priority.CLIP)  # alone, though seg1-3 fit in its call
        await wait_until(lambda: engine.queue_depth == 6)
        assert fake.gate is not None
        fake.gate.set()
        await asyncio.gather(first, person, *later)

    with running(fake, max_batch_size=4, max_wait_ms=0, max_background_batch_seconds=2.0) as engine:
        run(scenario(engine))
    assert fake.calls == [["seg0"], ["person"], ["stream"], ["interim"], ["seg1", "seg2"], ["seg3"]]


class Interruptible(FakeRecognizer):
    """As ONNX Runtime's terminate flag does: `interrupt()` makes the call in progress raise."""

    def __init__(self) -> None:
        super().__init__(threading.Event())
        self.interrupted: list[list[str]] = []
        self._stop = False

    def interrupt(self) -> bool:
        self.interrupted.append(self.calls[-1])
        self._stop = True
        assert self.gate is not None
        self.gate.set()
        return True

    def predict_batch(
        self, clips: Sequence[Audio], granularity: Granularity, embedding: bool
    ) -> list[Result]:
        results = super().predict_batch(clips, granularity, embedding)
        if self._stop:
            self._stop = False
            assert self.gate is not None
            self.gate.clear()
            raise RuntimeError("Exiting due to terminate flag being set to true")
        return results


def test_an_interim_reading_in_progress_is_stopped_for_more_urgent_work() -> None:
    """A live stream's interim reading is best effort: a stream's segment or a person's clip arriving
    while it runs stops its model call (Preempted: skipped, not retried); nothing else is stopped, and
    what is stopped for is served next."""
    fake = Interruptible()

    async def scenario(engine: Engine) -> list[Any]:
        def submit(name: str, priority: Priority) -> asyncio.Task[Result]:
            return asyncio.create_task(engine.submit(silence(1, name), priority=priority))

        outcomes: list[Any] = []
        for urgent in (Priority.STREAM_SEGMENT, Priority.CLIP):
            interim = submit("interim", Priority.STREAM_INTERIM)
            await wait_until(lambda: engine.in_flight == 1)
            served = submit(urgent.name, urgent)
            outcomes += await asyncio.gather(interim, return_exceptions=True)
            assert fake.gate is not None
            fake.gate.set()
            outcomes.append((await served).emotion)
            fake.gate.clear()
        for busy, later in (
            (Priority.TIMELINE, Priority.CLIP),
            (Priority.STREAM_INTERIM, Priority.TIMELINE),
        ):
            first = submit(busy.name, busy)
            await wait_until(lambda: engine.in_flight == 1)
            second = submit(later.name, later)
            await wait_until(lambda: engine.queue_depth == 1)
            assert fake.gate is not None
            fake.gate.set()
            outcomes += [(await first).emotion, (await second).emotion]
            fake.gate.clear()
        return outcomes

    with running(fake, max_batch_size=4, max_wait_ms=0) as engine:
        outcomes = run(scenario(engine))
        assert engine.preempted == 2
    assert isinstance(outcomes[0], Preempted) and outcomes[1] == "STREAM_SEGMENT"
    assert isinstance(outcomes[2], Preempted) and outcomes[3] == "CLIP"
    assert outcomes[4:] == ["TIMELINE", "CLIP", "STREAM_INTERIM", "TIMELINE"]
    assert fake.interrupted == [["interim"], ["interim"]]  # a long recording's call is never stopped


def test_the_onnx_backend_stops_a_call_in_progress_and_stays_usable(tiny_onnx: Recognizer) -> None:
    backend = tiny_onnx.backend
    waves = np.random.default_rng(0).standard_normal((4, 120 * SAMPLE_RATE)).astype(np.float32) * 0.1
    lengths = np.full(4, waves.shape[1], np.int64)
    assert backend.interrupt() is False  # nothing in progress
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            backend.run(waves, lengths, frames=False)
            outcome.append(None)
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=call)
    started = time.monotonic()
    thread.start()
    while not backend.interrupt():  # until the call is under way
        assert thread.is_alive(), "the call ended before it could be stopped: give it more audio"
        time.sleep(0.001)
    thread.join(30)
    assert time.monotonic() - started < 5
    (error,) = outcome
    assert error is not None and "terminate" in str(error)
    clip = silence(1, "after")
    assert tiny_onnx.predict_batch([clip], "utterance", False)[0].scores  # the session still answers


# ------------------------------------------------------------------------------------------ back-pressure


def test_full_queue_raises_queue_full_and_the_engine_keeps_serving() -> None:
    gate = threading.Event()

    async def scenario(engine: Engine) -> None:
        first = asyncio.create_task(engine.submit(silence(1, "a")))
        await wait_until(lambda: engine.in_flight == 1)
        queued = [asyncio.create_task(engine.submit(silence(1, name))) for name in ["b", "c"]]
        await wait_until(lambda: engine.queue_depth == 2)
        with pytest.raises(QueueFull) as full:
            await engine.submit(silence(1, "d"))
        assert full.value.retry_after_s >= 1
        gate.set()
        assert [r.emotion for r in await asyncio.gather(first, *queued)] == ["a", "b", "c"]
        assert (await engine.submit(silence(1, "e"))).emotion == "e"

    with running(FakeRecognizer(gate), max_batch_size=1, max_queue=2, max_wait_ms=0) as engine:
        run(scenario(engine))


def test_cancelling_a_queued_request_frees_its_place() -> None:
    fake = FakeRecognizer(threading.Event())

    async def scenario(engine: Engine) -> None:
        first = asyncio.create_task(engine.submit(silence(1, "a")))
        await wait_until(lambda: engine.in_flight == 1)
        b, c, d = (asyncio.create_task(engine.submit(silence(1, name))) for name in "bcd")
        await wait_until(lambda: engine.queue_depth == 3)
        c.cancel()
        await wait_until(lambda: engine.queue_depth == 2)
        e = asyncio.create_task(engine.submit(silence(1, "e")))  # QueueFull if c still held its place
        await wait_until(lambda: engine.queue_depth == 3)
        first.cancel()  # already in a model call: it completes and its result is dropped
        assert fake.gate is not None
        fake.gate.set()
        assert [r.emotion for r in await asyncio.gather(b, d, e)] == ["b", "d", "e"]
        assert c.cancelled() and first.cancelled()
        # the worker hands out the results first and then clears its in-flight count: wait for it
        await wait_until(lambda: engine.queue_depth == 0 and engine.in_flight == 0)

    with running(fake, max_batch_size=1, max_queue=3, max_wait_ms=0) as engine:
        run(scenario(engine))
    assert fake.calls == [["a"], ["b"], ["d"], ["e"]]


def test_submit_blocking_serves_threads() -> None:
    with running(FakeRecognizer(), max_batch_size=4, max_wait_ms=5) as engine:
        assert engine.submit_blocking(silence(1, "x"), timeout_s=5).emotion == "x"


def test_batching_auto_batches_only_where_it_was_measured_to_pay(tiny_recognizer: Recognizer) -> None:
    onnx_cpu = choose_batching("auto", 8, "onnx", "cpu")
    assert onnx_cpu.max_batch_size == 1
    assert "section 13" in onnx_cpu.reason and "--batching on" in onnx_cpu.reason
    openvino_cpu = choose_batching("auto", 8, "openvino", "cpu")
    assert openvino_cpu.max_batch_size == 1 and "section 17" in openvino_cpu.reason
    assert choose_batching("auto", 8, "torch", "cuda").max_batch_size == 8
    assert choose_batching("on", 8, "onnx", "cpu").max_batch_size == 8
    assert choose_batching("off", 8, "torch", "cuda").max_batch_size == 1
    with pytest.raises(ValueError, match="batching is 'sometimes'; choose from auto, on, off"):
        choose_batching("sometimes", 8, "onnx", "cpu")
    # the engine runs what the choice says: a burst of requests, one clip per model call
    engine = Engine(tiny_recognizer, EngineConfig(max_batch_size=8, batching="auto", max_wait_ms=50))
    pays, _ = BATCHING_PAYS[(tiny_recognizer.backend.name, tiny_recognizer.device_type)]
    assert engine.config.max_batch_size == (8 if pays else 1) == engine.batching.max_batch_size
    engine.start()
    try:
        requests = engine._enqueue([window(i) for i in range(4)], "utterance", embedding=False)
        sizes = {request.future.result(30)[1].batch_size for request in requests}
    finally:
        engine.stop(5)
    assert sizes == ({4} if pays else {1})


# ---------------------------------------------------------------------------------------------- failures


def test_one_bad_request_fails_alone(tiny_recognizer: Recognizer) -> None:
    clips = [window(0), window(1), window(2, source="bad"), window(3)]
    references = [tiny_recognizer.predict(c, "frame", embedding=True) for c in clips]

    def predict_batch(batch: Sequence[Audio], granularity: Granularity, embedding: bool) -> list[Result]:
        if any(c.source == "bad" for c in batch):
            raise ValueError("the model cannot take 'bad'")
        return tiny_recognizer.predict_batch(batch, granularity, embedding)

    async def burst(engine: Engine) -> list[Any]:
        jobs = (engine.submit(c, "frame", embedding=True) for c in clips)
        return await asyncio.gather(*jobs, return_exceptions=True)

    with running(Wrapped(tiny_recognizer, predict_batch), max_batch_size=4, max_wait_ms=5000) as engine:
        outcomes = run(burst(engine))
        assert engine.model_calls == 1 + len(clips)  # the failed batch, then each alone
        clips[2] = window(2)  # the same audio under a name the model takes: the engine still serves
        again = run(burst(engine))
        assert engine.model_calls == 2 + len(clips)
    assert isinstance(outcomes[2], ValueError) and "bad" in str(outcomes[2])
    for i in [0, 1, 3]:
        assert_same(outcomes[i], references[i])
    for result, reference in zip(again, references, strict=True):
        assert_same(result, reference)


class RecordingObserver(EngineObserver):
    def __init__(self) -> None:
        self.batches: list[tuple[int, float, float]] = []
        self.depths: list[int] = []

    def batch_done(self, size: int, audio_seconds: float, padded_seconds: float, seconds: float) -> None:
        self.batches.append((size, audio_seconds, padded_seconds))

    def queue_changed(self, depth: int) -> None:
        self.depths.append(depth)


class Broken(EngineObserver):
    def batch_done(self, size: int, audio_seconds: float, padded_seconds: float, seconds: float) -> None:
        raise RuntimeError("broken metrics")


@pytest.mark.parametrize("observer", [RecordingObserver(), Broken()], ids=["recording", "broken"])
def test_observer_sees_batches_and_a_broken_one_harms_nothing(observer: EngineObserver) -> None:
    clips = [silence(1, "a"), silence(1.02, "b"), silence(1.01, "c")]

    async def burst(engine: Engine) -> list[Result]:
        return await asyncio.gather(*(engine.submit(c) for c in clips))

    for _ in range(2):  # the second burst shows the worker survived the first
        with running(FakeRecognizer(), observer, max_batch_size=3, max_wait_ms=1000) as engine:
            assert [r.emotion for r in run(burst(engine))] == ["a", "b", "c"]
    if isinstance(observer, RecordingObserver):
        assert observer.batches == [(3, pytest.approx(3.03), pytest.approx(3.06))] * 2
        assert observer.depths[-1] == 0


# ---------------------------------------------------------------------------------------------- stopping


def test_stop_drains_queued_requests_then_refuses_new_ones() -> None:
    gate = threading.Event()
    fake: Any = FakeRecognizer(gate)
    engine = Engine(fake, EngineConfig(max_batch_size=1, max_wait_ms=0))
    with pytest.raises(EngineStopped):
        engine.submit_blocking(silence(1, "early"))
    engine.start()

    async def scenario() -> None:
        tasks = [asyncio.create_task(engine.submit(silence(1, name))) for name in "abc"]
        await wait_until(lambda: engine.in_flight == 1 and engine.queue_depth == 2)
        stopper = threading.Thread(target=engine.stop, args=(10,))
        stopper.start()
        await wait_until(lambda: not engine.accepting)
        with pytest.raises(EngineStopped):
            await engine.submit(silence(1, "late"))
        gate.set()
        assert [r.emotion for r in await asyncio.gather(*tasks)] == ["a", "b", "c"]
        stopper.join(10)
        assert not stopper.is_alive()

    run(scenario())
    engine.stop()  # idempotent
    with pytest.raises(EngineStopped):
        engine.submit_blocking(silence(1, "after"))


def test_stop_timeout_fails_what_is_still_queued() -> None:
    gate = threading.Event()
    fake: Any = FakeRecognizer(gate)
    engine = Engine(fake, EngineConfig(max_batch_size=1, max_wait_ms=0))
    engine.start()

    async def scenario() -> None:
        tasks = [asyncio.create_task(engine.submit(silence(1, name))) for name in "ab"]
        await wait_until(lambda: engine.in_flight == 1 and engine.queue_depth == 1)
        engine.stop(timeout_s=0.05)
        gate.set()
        first, second = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(first, Result) and isinstance(second, EngineStopped)

    run(scenario())
    engine.stop(timeout_s=10)


# ----------------------------------------------------------------------------------------------- warm-up


def test_warm_up_passes_on_the_tiny_model(tiny_recognizer: Recognizer) -> None:
    # warm_up queues each batch at once, so the worker needs no wait to see all of it
    with running(tiny_recognizer, max_batch_size=2, max_wait_ms=0) as engine:
        report = warm_up(engine, [window(0), window(1)], [1, 2])
    assert report.calls == 4  # two batch sizes x two granularities, one call each
    assert {batch for batch, _ in report.shapes} == {1, 2}
    assert report.seconds > 0


def test_warm_up_in_one_granularity_runs_once_per_batch(tiny_recognizer: Recognizer) -> None:
    with running(tiny_recognizer, max_batch_size=2, max_wait_ms=0) as engine:
        report = warm_up(engine, [window(0)], [1], granularities=("frame",))
        assert report.calls == 1
    engine_calls: list[str] = []

    def predict_batch(batch: Sequence[Audio], granularity: Granularity, embedding: bool) -> list[Result]:
        engine_calls.append(granularity)
        return [with_nan_scores(r) for r in tiny_recognizer.predict_batch(batch, granularity, embedding)]

    with (
        running(Wrapped(tiny_recognizer, predict_batch), max_batch_size=2) as engine,
        pytest.raises(WarmupError, match="non-finite scores"),
    ):
        warm_up(engine, [window(0)], [1], granularities=("frame",))
    assert engine_calls == ["frame"]


def with_nan_scores(result: Result) -> Result:
    return dataclasses.replace(result, scores=dict.fromkeys(result.scores, float("nan")))


def with_shifted_utterance_embedding(result: Result) -> Result:
    if result.granularity == "frame" or result.embedding is None:
        return result
    return dataclasses.replace(result, embedding=result.embedding + 1e-2)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [(with_nan_scores, "non-finite scores"), (with_shifted_utterance_embedding, "mean of the frame")],
)
def test_warm_up_fails_on_a_broken_model(
    tiny_recognizer: Recognizer, corrupt: Callable[[Result], Result], message: str
) -> None:
    def predict_batch(batch: Sequence[Audio], granularity: Granularity, embedding: bool) -> list[Result]:
        return [corrupt(r) for r in tiny_recognizer.predict_batch(batch, granularity, embedding)]

    with (
        running(Wrapped(tiny_recognizer, predict_batch), max_batch_size=2) as engine,
        pytest.raises(WarmupError, match=message),
    ):
        warm_up(engine, [window(0)], [1])


def test_padded_seconds_count_the_backends_own_padding(tiny_recognizer: Recognizer) -> None:
    """emoserve_padded_audio_seconds: the width the backend pads a batch to (on CUDA 4 widths per octave,
    model/interface.py), not only the longest clip (review cuda-2026-12 B6)."""
    from emoserve.model.interface import CUDA_WIDTHS_PER_OCTAVE_LOG2, bucket_width

    class PadsAsOnCuda:
        name, device, dtype = "torch", "cuda:0", "float32"

        def padded_width(self, samples: int) -> int:
            return bucket_width(samples, CUDA_WIDTHS_PER_OCTAVE_LOG2)

        def run(self, waves: np.ndarray, lengths: np.ndarray, frames: bool) -> Any:
            return tiny_recognizer.backend.run(waves, lengths, frames)

    observer = RecordingObserver()
    clip = window(0)  # 16,000 samples: padded to 16,384 on CUDA
    with running(Recognizer(PadsAsOnCuda(), tiny_recognizer.info), observer, max_batch_size=1) as engine:  # type: ignore[arg-type]
        run(engine.submit(clip))
    assert observer.batches == [(1, pytest.approx(1.0), pytest.approx(16_384 / SAMPLE_RATE))]
    assert tiny_recognizer.padded_width(16_000) == 16_000  # the CPU's torch backend pads nothing
