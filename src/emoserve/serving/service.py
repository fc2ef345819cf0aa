"""The service's life: starting -> loading -> warming -> ready | failed: <reason>; draining on shutdown.

    api.app.serve(settings): uvicorn starts at once (so /healthz answers within 2 s of process start), and
    the FastAPI lifespan calls Service.start(prepare_ui), whose thread runs the start-up steps
    (serving/startup.py: load the model, start the engine; serving/warmup.py: the real path, decode the
    bundled clips -> engine -> model, at the batch sizes traffic uses, outputs checked) while the web UI
    mounts beside it; then, accepting requests but not yet ready, the server sends its own to every route
    over loopback (`Hooks.warm_routes`, given by api.app.serve: api/warmup.py), so that the first outside
    request costs what the next ones do; then /readyz says 200.
    SIGTERM/Ctrl-C: state draining (/readyz 503, new requests 503), uvicorn finishes the requests in
    flight, the lifespan stops the engine, exit 0.

Requests go through here to the engine: clips (`recognize`), recordings (`timeline`: serving/timeline.py)
and live streams (`live_stream`: serving/live.py). Nothing heavy is imported at module level: numpy, the
decoders, the backend and the engine load in the start-up thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emoserve.errors import ServiceUnavailable
from emoserve.inference.results import ModelTag
from emoserve.serving.metrics import Metrics
from emoserve.serving.phase import SETTLED, Phase, unavailable
from emoserve.serving.settings import Settings
from emoserve.serving.startup import example_clips, failure_reason
from emoserve.serving.timeline import open_recording, scored_in_order, submit_segment, submit_waiting
from emoserve.system import PROCESS_STARTED_AT

if TYPE_CHECKING:
    from emoserve.audio.decode import Audio
    from emoserve.audio.segments import Recording
    from emoserve.constants import Granularity
    from emoserve.inference.confidence import Readout
    from emoserve.inference.protocol import StreamOptions
    from emoserve.inference.results import Result, TimelineSegment
    from emoserve.model.head import Head
    from emoserve.model.labels import Label
    from emoserve.serving.engine import Engine, Priority, RequestTiming
    from emoserve.serving.live import LiveStream

log = logging.getLogger(__name__)

READY_POLL_S = 0.05  # how often a request waiting for ready looks again
# what a too-long error tells the user to change: this server's own settings, not the library's max_seconds
CLIP_LIMIT_SETTING = "this server's max_audio_s: --max-audio-s / EMOSERVE_MAX_AUDIO_S"
STREAM_RETRY_AFTER_S = 5.0  # a refused live stream: streams last minutes, but some end every few seconds
UTTERANCE: Granularity = "utterance"


def decode_clip(source: str | os.PathLike[str] | bytes, name: str | None, max_audio_s: float) -> Audio:
    """A clip for recognition, decoded within `max_audio_s`: a too-long error names this server's setting."""
    from emoserve.audio.decode import load_audio

    if name is None and isinstance(source, bytes):
        name = "<upload>"
    return load_audio(source, max_seconds=max_audio_s, name=name, limit_setting=CLIP_LIMIT_SETTING)


@dataclass(frozen=True)
class Hooks:
    """What the layer above gives the service when it builds it (api.app.serve)."""

    # Run after the engine's warm-up, before "ready", with requests accepted: the server sends its own
    # requests over loopback to every route a user hits first (api/warmup.py). Its arguments: the
    # service, and a function that waits for the UI (Service.start's prepare_ui) and says whether it is
    # mounted.
    warm_routes: Callable[[Service, Callable[[], bool]], None] | None = None
    # What to do when start-up fails (unless settings.stay_up): the server exits.
    on_failure: Callable[[], None] | None = None


class Service:
    """One model served to the HTTP API and the web UI; both use this object, never the model directly.

    Start-up (`start`, in a thread): load, warm up through the real audio path, verify the files, ready.
    Requests: `decode` a clip (blocking), `await recognize(audio, granularity, embedding)` through the
    shared batching engine (ServiceUnavailable or QueueFull when it cannot), `open_timeline` (blocking:
    a recording's errors come before any work) and `timeline(job)`, the recording's segments through the
    engine as background requests, `live_stream(options)` (a live stream on the engine). `await
    wait_ready(timeout_s)`; `begin_drain()`, then `shutdown()`. The phase is `phase` (serving/phase.py)
    and `reason`; `state` is both in one string, for people.
    """

    def __init__(
        self, settings: Settings, metrics: Metrics | None = None, hooks: Hooks | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(max_queue=settings.max_queue)
        self.hooks = hooks or Hooks()
        self.engine: Engine | None = None  # set once ready (warm-up done); None before and after a failure
        # what GET /v1/model answers (name, random_weights, labels, config, device, dtype, backend,
        # parameters, max_audio_s), set once the model is loaded
        self.model_summary: dict[str, Any] | None = None
        self.random_weights: bool | None = None  # the predictions are meaningless: warn; None until loaded
        self.heads: dict[str, Head] = {}  # --head NAME=DIR, loaded with the model (serving/heads.py)
        self.labels: dict[str, Label] = {}  # the model's, by English key: what a label subset may name
        # the longest clip and recording accepted: the settings, or the defaults for the device
        self.max_audio_s = settings.effective_max_audio_s("cpu")  # until the device is known
        self.max_timeline_s = settings.effective_max_timeline_s("cpu")
        self.examples = example_clips()  # the bundled clips: the warm-up's, the UI's example
        self.ui_error: str | None = None  # why the web UI could not be mounted, if it could not
        self._phase: tuple[Phase, str | None] = ("starting", None)  # replaced whole: readable from any thread
        self._timings: dict[str, float] = {}
        self._last_used = time.monotonic()
        self._stopping = threading.Event()
        self._settled = threading.Event()  # start-up is over: ready, failed or draining
        self._keep_warm_clip: Audio | None = None
        self._model_path: Path | None = None
        self._files_warned = False
        self._rebuilt = False  # the model files were converted again while serving
        self._start_thread: threading.Thread | None = None
        self._streams = 0  # live streams open
        self.metrics.set_state("starting")

    # ------------------------------------------------------------------------------------------ state

    @property
    def state(self) -> str:
        phase, reason = self._phase
        return f"{phase}: {reason}" if reason else phase

    @property
    def phase(self) -> Phase:
        return self._phase[0]

    @property
    def reason(self) -> str | None:
        return self._phase[1]

    @property
    def ready(self) -> bool:
        return self.phase == "ready"

    @property
    def model_name(self) -> str | None:
        return None if self.model_summary is None else str(self.model_summary["name"])

    @property
    def model_tag(self) -> ModelTag | None:
        """What scores this service's results (None until loaded)."""
        return None if self.model_summary is None else ModelTag.from_summary(self.model_summary)

    def timings(self) -> dict[str, float]:
        return {"since_start_s": round(time.monotonic() - PROCESS_STARTED_AT, 3), **self._timings}

    def _set_state(self, state: Phase, reason: str | None = None) -> bool:
        """Move to `state`, unless draining already (nothing leaves draining). False if refused."""
        if self.phase == "draining":
            return False
        self._phase = (state, reason)
        self.metrics.set_state(state)
        return True

    def _time(self, name: str, seconds: float) -> None:
        self._timings[name] = round(seconds, 3)

    # ------------------------------------------------------------------------------------- start-up

    def start(self, prepare_ui: Callable[[], None] | None = None) -> threading.Thread:
        """Load, warm up and become ready in a background thread (called by the server's lifespan).
        `prepare_ui` runs on a thread of its own beside the model's load and warm-up, and "ready" waits
        for it (the server mounts the web UI there, so that readiness costs the slower of the two, not
        their sum). Once only: a second call returns the same thread (a Ray Serve replica starts it
        before the lifespan)."""
        if self._start_thread is None:
            thread = threading.Thread(
                target=self._start_up, args=(prepare_ui,), name="emoserve-start-up", daemon=True
            )
            self._start_thread = thread
            thread.start()
        return self._start_thread

    def _start_up(self, prepare_ui: Callable[[], None] | None) -> None:
        engine: Engine | None = None
        ui = None
        if prepare_ui is not None:
            ui = threading.Thread(target=prepare_ui, name="emoserve-ui", daemon=True)
            ui.start()
        try:
            engine = self._load_and_warm_up()
            self._answer_own_requests(engine, ui)
            if ui is not None:
                ui.join()
        except Exception as error:
            self.engine = None
            if engine is not None:
                engine.stop(timeout_s=0)
            self._set_state("failed", failure_reason(error))
            self._settled.set()
            if self.hooks.on_failure is not None and not self.settings.stay_up:
                self.hooks.on_failure()
            return
        self._become_ready(engine)
        self._settled.set()

    def _load_and_warm_up(self, reason: str | None = None) -> Engine:
        """serving/startup.py's steps, their figures kept: the model (`loading`), the engine, the
        warm-up (`warming`). The engine returned is warm; on an error nothing is left running."""
        from emoserve.audio.decode import load_audio
        from emoserve.serving.startup import load, start_engine
        from emoserve.serving.warmup import warm_up_engine

        self._set_state("loading", reason)
        loaded = load(self.settings, self.metrics)
        self._time("model_load_s", loaded.seconds)
        self.max_audio_s, self.max_timeline_s = loaded.max_audio_s, loaded.max_timeline_s
        self.random_weights = loaded.recognizer.random_weights
        self._model_path = loaded.recognizer.info.path
        self.model_summary, self.heads = loaded.summary, loaded.heads
        self.labels = {label.en: label for label in loaded.recognizer.labels}
        engine = start_engine(self.settings, loaded.recognizer, self.metrics)
        self.model_summary["batching"] = engine.batching.to_dict()
        try:
            self._set_state("warming")
            started = time.monotonic()
            if not self.examples:
                raise RuntimeError("no example clips to warm up with; reinstall emoserve")
            clips = [load_audio(path, max_seconds=None) for path in self.examples]
            self._keep_warm_clip = warm_up_engine(engine, self.settings, clips)
        except BaseException:
            engine.stop(timeout_s=0)
            raise
        seconds = time.monotonic() - started
        self._time("warmup_s", seconds)
        self.metrics.warmup_seconds.set(seconds)
        return engine

    def _answer_own_requests(self, engine: Engine, ui: threading.Thread | None) -> None:
        """Accept requests (still "warming") and run `hooks.warm_routes`, which sends the server's own."""
        self.engine = engine
        warm_routes = self.hooks.warm_routes
        if warm_routes is None or not self._set_state("warming", "answering its own requests"):
            return

        def ui_mounted() -> bool:
            if ui is None:
                return False
            ui.join()
            return self.ui_error is None

        started = time.monotonic()
        warm_routes(self, ui_mounted)
        self._time("routes_warmup_s", time.monotonic() - started)

    def _become_ready(self, engine: Engine) -> None:
        self.engine = engine
        if not self._set_state("ready"):  # SIGTERM came while loading: nothing to serve
            self.engine = None
            engine.stop(timeout_s=0)
            return
        seconds = time.monotonic() - PROCESS_STARTED_AT
        self._time("start_to_ready_s", seconds)
        self.metrics.start_to_ready_seconds.set(seconds)
        self._last_used = time.monotonic()
        log.info("ready %.2f s after process start", seconds)
        if self._rebuilt:
            return  # the threads below run already, and a rebuilt entry was hashed as it was written
        if self.settings.keep_warm_s > 0:
            threading.Thread(target=self._keep_warm, name="emoserve-keep-warm", daemon=True).start()
        if self.settings.verify_model and self._model_path is not None:
            threading.Thread(target=self._verify_model, name="emoserve-verify", daemon=True).start()

    def _verify_model(self) -> None:
        """Hash the model files beside the first requests. A file that has changed since its conversion
        cannot be trusted: the service stops serving it at once, converts the entry again from its source
        and serves again, or, with no source left, turns failed."""
        from emoserve.serving.startup import verify_files

        path = self._model_path
        assert path is not None
        started = time.monotonic()
        problems = verify_files(path)
        self._time("verify_s", time.monotonic() - started)
        if problems is None:
            log.warning("%s has no content hashes (converted by an older emoserve): not verified", path)
        elif problems:
            self._rebuild(path, f"model files damaged: {problems[0]} ({path})")
        else:
            log.info("model files verified in %.1f s", time.monotonic() - started)

    def _rebuild(self, path: Path, what: str) -> None:
        from emoserve.model.cache import rebuild

        if not self._set_state("loading", f"{what}; converting it again"):
            return  # draining: shutdown() stops the engine
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.stop(timeout_s=0)  # queued requests: 503; none more gets these numbers
        try:
            if not rebuild(path, what):
                log.error("%s; convert or download the model again", what)
                self._set_state("failed", what)
                return
            self._rebuilt = True
            engine = self._load_and_warm_up(f"{what}; converted again, loading it")
        except Exception as error:
            self._set_state("failed", failure_reason(error))
            return
        self._become_ready(engine)

    def _keep_warm(self) -> None:
        """After keep_warm_s without a recognition, one tiny inference, so that caches, the allocator and
        the thread pool stay warm for the next real request."""
        idle_limit_s = self.settings.keep_warm_s
        while not self._stopping.wait(max(0.05, self._last_used + idle_limit_s - time.monotonic())):
            engine, clip = self.engine, self._keep_warm_clip
            if time.monotonic() - self._last_used < idle_limit_s or engine is None or clip is None:
                continue
            self._last_used = time.monotonic()
            try:
                engine.submit_blocking(clip, UTTERANCE, timeout_s=idle_limit_s)
                self.metrics.keep_warm_total.inc()
            except Exception as error:  # busy or stopping: the next idle period tries again
                log.debug("keep-warm inference skipped: %s", error)

    # ------------------------------------------------------------------------------------- shutdown

    def begin_drain(self) -> None:
        """Stop accepting: /readyz 503, new recognitions 503. Safe to call from a signal handler."""
        if self.phase not in SETTLED:
            self._phase = ("draining", None)
            self._settled.set()
            self.metrics.set_state("draining")
            log.info("draining: finishing requests in flight, accepting no new ones")

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Blocking: let queued and running recognitions finish (up to `timeout_s`), stop the engine."""
        self.begin_drain()
        self._stopping.set()
        if self.engine is not None:
            self.engine.stop(timeout_s)

    # -------------------------------------------------------------------------------------- requests

    def unavailable(self) -> ServiceUnavailable:
        """The 503 that fits the current phase."""
        return unavailable(self.phase, self.reason, self.timings()["since_start_s"])

    @property
    def open_streams(self) -> int:
        """Live streams open now (GET /v1/stream)."""
        return self._streams

    @property
    def accepting(self) -> bool:
        """Requests are served: ready, or warmed up and answering the routes' own warm-up requests (an
        outside request that comes then is served too, rather than kept waiting for "ready")."""
        return self.engine is not None and self.phase in ("warming", "ready")

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` until requests are accepted; else the 503 that fits the phase."""
        deadline = time.monotonic() + timeout_s
        while not self.accepting:
            if self.phase in SETTLED or time.monotonic() >= deadline:
                raise self.unavailable()
            await asyncio.sleep(READY_POLL_S)

    def decode(self, source: str | os.PathLike[str] | bytes, name: str | None = None) -> Audio:
        """Blocking decode of a clip (a path, or an upload's bytes), within max_audio_s; `name` names it
        in errors (default: the path, or "<upload>")."""
        return decode_clip(source, name, self.max_audio_s)

    def model_file_problems(self) -> list[str]:
        """The cheap check of the loaded model's files (sizes, header), for /readyz: a model deleted or
        replaced under a running server keeps serving from its memory map, but would not load again."""
        from emoserve.model.entry import check_entry

        if self._model_path is None:
            return []
        problems = check_entry(self._model_path)
        if problems and not self._files_warned:
            self._files_warned = True
            log.warning("the model files changed under the running server: %s", "; ".join(problems))
        return problems

    def require_ready(self) -> None:
        """Raise the 503 that fits the state unless requests are accepted (`accepting`)."""
        if not self.accepting:
            raise self.unavailable()

    def _engine(self) -> Engine:
        engine = self.engine
        if engine is None or not self.accepting:
            raise self.unavailable()
        self._last_used = time.monotonic()
        return engine

    async def recognize(
        self,
        audio: Audio,
        granularity: Granularity = "utterance",
        embedding: bool = False,
        head: str | None = None,
        priority: Priority | None = None,
        *,
        readout: Readout | None = None,
    ) -> tuple[Result, RequestTiming]:
        """`head`: a served head's name (422 if unknown); its result comes as `result.head`. `priority`:
        the engine's (a person's clip by default). `readout`: the request's label subset and threshold
        (`Service.readout`; the min_confidence setting when it sets none)."""
        from emoserve.serving.engine import Priority

        priority = Priority.CLIP if priority is None else priority
        return await self._recognize_on(
            self._engine(), audio, granularity, embedding, head, priority, readout
        )

    def readout(self, labels: str | None = None, min_confidence: float | str | None = None) -> Readout:
        """A request's `labels` and `min_confidence`, checked against the model's labels (OptionError,
        a 422, naming the valid ones)."""
        from emoserve.inference.confidence import readout

        self.require_ready()
        return readout(labels, min_confidence, list(self.labels))

    async def _recognize_on(
        self,
        engine: Engine,
        audio: Audio,
        granularity: Granularity,
        embedding: bool,
        head: str | None,
        priority: Priority,
        readout: Readout | None = None,
    ) -> tuple[Result, RequestTiming]:
        from emoserve.serving.heads import apply_head, pick_head

        if (chosen := pick_head(self.heads, head)) is None:
            result, timing = await engine.submit_timed(audio, granularity, embedding, priority=priority)
            return self._read_out(result, readout, None), timing
        result, timing = await engine.submit_timed(audio, granularity, True, priority=priority)
        return self._read_out(apply_head(result, chosen, embedding, self.metrics), readout, chosen), timing

    def _read_out(self, result: Result, chosen: Readout | None, head: Head | None) -> Result:
        from emoserve.serving.heads import read_out_counted

        return read_out_counted(result, chosen, self.labels, head, self.settings.min_confidence, self.metrics)

    @contextlib.asynccontextmanager
    async def live_stream(self, options: StreamOptions, counted: bool = True) -> AsyncIterator[LiveStream]:
        """A live stream on the shared engine (serving/live.py), closed on leaving. Refused with the 503
        that fits when requests are not accepted, or with too_many_streams beyond max_streams.
        `counted=False` (the routes' warm-up): the stream's figures go to a registry of their own."""
        from emoserve.serving.engine import Priority
        from emoserve.serving.heads import apply_head, pick_head
        from emoserve.serving.live import LiveStream, engine_pieces

        if not self.accepting:
            error = self.unavailable()
            self.metrics.streams_total.labels(f"refused_{error.code}").inc()
            raise error
        if self._streams >= self.settings.max_streams:
            self.metrics.streams_total.labels("refused_full").inc()
            raise ServiceUnavailable(
                "too_many_streams",
                f"{self._streams} live streams are open, this server's most (max_streams: --max-streams / "
                "EMOSERVE_MAX_STREAMS); retry later or use another instance",
                STREAM_RETRY_AFTER_S,
            )
        pick_head(self.heads, options.head)  # an unknown head: 422 before the stream opens
        asked = self.readout(options.labels, options.min_confidence)  # unknown labels: 422 as well
        # the engine of the stream's start: a stream open when draining begins still gets its segments
        engine = self._engine()

        async def score(audio: Audio, interim: bool) -> Result:
            self._last_used = time.monotonic()
            if interim:  # best effort: a full queue skips the reading
                interim_on = self._recognize_on(
                    engine, audio, UTTERANCE, False, options.head, Priority.STREAM_INTERIM, asked
                )
                return (await interim_on)[0]
            return await submit_waiting(
                lambda: self._recognize_on(
                    engine,
                    audio,
                    options.granularity,
                    options.embedding,
                    options.head,
                    Priority.STREAM_SEGMENT,
                    asked,
                )
            )

        def read_out(result: Result) -> Result:  # a turn read in pieces, as `_recognize_on` reads out
            if (chosen := pick_head(self.heads, options.head)) is None:
                kept = result if options.embedding else dataclasses.replace(result, embedding=None)
                return self._read_out(kept, asked, None)
            return self._read_out(apply_head(result, chosen, options.embedding, self.metrics), asked, chosen)

        assert self.model_summary is not None  # accepting: loaded
        metrics = self.metrics if counted else Metrics(self.settings.max_queue)
        stream = LiveStream(
            options,
            score,
            tag=ModelTag.from_summary(self.model_summary),
            labels=list(self.model_summary["labels"]),
            metrics=metrics,
            pieces=engine_pieces(engine, read_out),
        )
        self._streams += 1
        metrics.streams_total.labels("opened").inc()
        metrics.streams_active.inc()
        try:
            yield stream
        finally:
            await stream.close()
            self._streams -= 1
            metrics.streams_active.dec()

    def open_timeline(self, source: Any, *, name: str | None = None, **options: Any) -> Recording:
        """Open a recording for `timeline` (blocking: run it in a thread), within max_timeline_s."""
        return open_recording(source, self.max_timeline_s, name=name, **options)

    async def timeline(
        self, job: Recording, head: str | None = None, *, readout: Readout | None = None
    ) -> AsyncIterator[TimelineSegment]:
        """The job's scored segments in the order they were found (see the class docstring); with a served
        `head`'s result each, read out as `readout` asks."""
        from emoserve.serving.heads import apply_head, pick_head

        engine, chosen = self._engine(), pick_head(self.heads, head)

        async def score(audio: Audio) -> Result:
            if chosen is None:
                return self._read_out(await submit_segment(engine, audio), readout, None)
            headed = apply_head(await submit_segment(engine, audio, True), chosen, False, self.metrics)
            return self._read_out(headed, readout, chosen)

        started, scored_n = time.perf_counter(), 0
        self.metrics.timelines_in_progress.inc()
        try:
            async with contextlib.aclosing(scored_in_order(job, score)) as segments:
                async for segment in segments:
                    self._last_used = time.monotonic()
                    scored_n += 1
                    yield segment
        finally:
            self.metrics.timelines_in_progress.dec()  # however it ended: what it did still counts
            self.metrics.observe_timeline(job.duration_s, scored_n, time.perf_counter() - started)
