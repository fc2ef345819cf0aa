"""The service on a Ray cluster (the `ray` extra): Ray Serve replicas of the same `Service` and routes.

    serve run emoserve.ray_serve:build_app model=DIR replicas=2      (or max_replicas=4: autoscaling)
    serve run deploy/ray/serve.yaml                                  (the API and the web UI)
    emoserve serve --ray --replicas 2 [--address auto]

Two applications, because Serve gives each one route prefix and the API owns the paths under "/":

    "emoserve"     at /    Recognition: N replicas, each one Service (model, engine, warm-up) serving
                           create_app's routes: /v1/recognize, /v1/model, /healthz, /readyz, /metrics
    "emoserve-ui"  at /ui  WebUI: one replica (Gradio's queue keeps per-session state) with no model:
                           its RemoteService decodes clips and cuts long recordings into speech segments,
                           and each clip or segment is recognised through a handle to Recognition

Jobs (/v1/jobs): each replica runs the app's lifespan as `emoserve serve` does, so it opens the job
store its settings name and runs its workers. Replicas sharing jobs need one store: jobs_db (PostgreSQL,
`EMOSERVE_JOBS_DB` where the app is built) and a jobs_dir every node sees; without jobs_db each node keeps
its own SQLite file, and a job is found only by the replicas of the node that accepted it
(`jobs_warning`). Claims take each job once, whichever replica the proxy sent it to.

A replica's constructor loads and warms up its Service, so Serve routes to it only once it is warm;
`check_health` fails when the service has failed (e.g. its model files were damaged), and Serve replaces
it. Torch threads per replica are the CPUs Ray assigned to it (`num_cpus`), not all the machine's cores.
Queue bounds (see `deployment_options`): Serve hands a replica at most max_queue + max_batch_size
requests (`max_ongoing_requests`), holds up to max_queue more at each router (`max_queued_requests`), and
beyond that answers 503 with Retry-After. On scale-down or shutdown Serve stops routing to the replica,
waits up to drain_timeout_s (`graceful_shutdown_timeout_s`) for its requests, then the app's lifespan
drains the engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.config import BackpressureConfig
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from emoserve.api.app import create_app
from emoserve.api.errors import error_json
from emoserve.api.recognize import RECOGNIZE
from emoserve.audio.segments import Recording
from emoserve.constants import FALSE_WORDS, TRUE_WORDS
from emoserve.errors import LOADING_RETRY_AFTER_S, EmoserveError, SettingsError
from emoserve.inference.results import ModelTag
from emoserve.serving.metrics import Metrics
from emoserve.serving.phase import Phase, unavailable
from emoserve.serving.service import Service, decode_clip
from emoserve.serving.settings import Settings, load_settings
from emoserve.serving.timeline import open_recording, scored_in_order
from emoserve.system import PROCESS_STARTED_AT

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from emoserve.audio.decode import Audio
    from emoserve.constants import Granularity
    from emoserve.inference.protocol import StreamOptions
    from emoserve.inference.results import Result, TimelineSegment
    from emoserve.serving.engine import RequestTiming
    from emoserve.serving.live import LiveStream

log = logging.getLogger(__name__)

API_APP, UI_APP = "emoserve", "emoserve-ui"
UI_PREFIX = "/ui"
# Serve's router answers 503 when max_queued_requests are waiting; its Retry-After is fixed, and one
# second is what the engine says at least when its own queue is full (engine.MIN_RETRY_AFTER_S).
BUSY_RETRY_AFTER_S = 1.0
# Serve's default health-check period is 10 s: a killed trivial replica was replaced in ~10 s with it and
# ~4 s with 1 s (Ray 2.60, measured before this module); with 2 s a large-model replica is back in ~13 s,
# most of it its own start (docs/benchmarks.md section 7). A check is one attribute read.
HEALTH_CHECK_PERIOD_S = 2.0
UI_REFRESH_S = 1.0  # how often the UI replica asks the model deployment for its state


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """How the Recognition deployment is scaled: a fixed count, or autoscaling between two counts."""

    replicas: int = 1
    min_replicas: int | None = None  # with max_replicas: autoscaling
    max_replicas: int | None = None
    num_cpus: float = 1.0  # per replica; also its torch threads
    # GPUs per replica, fractional to share one (0.5: two replicas on a GPU). Ray hides the GPUs from an
    # actor that asks for none (CUDA_VISIBLE_DEVICES empty), so without this a replica on a GPU node
    # serves on the CPU.
    num_gpus: float = 0.0
    ui: bool = True  # also deploy the web UI application at /ui

    @classmethod
    def parse(cls, raw: Mapping[str, object]) -> RayOptions:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if raw.get(f.name) is None:
                continue
            value = raw[f.name]
            word = str(value).strip().lower()
            if f.name == "ui":
                if word not in TRUE_WORDS | FALSE_WORDS:
                    raise SettingsError(f"ui: {value!r} is not a boolean (use true or false)")
                values[f.name] = word in TRUE_WORDS
                continue
            try:
                values[f.name] = float(word) if f.name in ("num_cpus", "num_gpus") else int(word)
            except ValueError:
                raise SettingsError(f"{f.name}: {value!r} is not a number") from None
        options = cls(**values)
        options.check()
        return options

    def check(self) -> None:
        if self.replicas < 1:
            raise SettingsError(f"replicas: {self.replicas} is out of range; it must be at least 1")
        if not self.num_cpus > 0:
            raise SettingsError(f"num_cpus: {self.num_cpus} is out of range; it must be positive")
        if not self.num_gpus >= 0:
            raise SettingsError(
                f"num_gpus: {self.num_gpus} is out of range; it must be 0 or more (0.5 shares a GPU)"
            )
        if self.min_replicas is not None and self.max_replicas is None:
            raise SettingsError("min_replicas: autoscaling needs max_replicas too")
        if self.max_replicas is not None and not 0 <= (self.min_replicas or 0) <= self.max_replicas:
            raise SettingsError(
                f"max_replicas: {self.max_replicas} must be at least min_replicas ({self.min_replicas or 0})"
            )


RAY_KEYS = frozenset(f.name for f in dataclasses.fields(RayOptions))


def split_args(args: Mapping[str, object]) -> tuple[Settings, RayOptions]:
    """`serve run ... key=value` arguments: RayOptions keys, the rest Settings names (`EMOSERVE_*`
    variables fill what is not given). An unknown key is an error that names it."""
    names = {f.name for f in dataclasses.fields(Settings)}
    if unknown := sorted(set(args) - names - RAY_KEYS):
        raise SettingsError(
            f"{unknown[0]}: not a setting; use {', '.join(sorted(RAY_KEYS))} or a Settings name (e.g. model)"
        )
    flags = {k: str(v) for k, v in args.items() if k in names}  # YAML gives numbers; flags are text
    try:
        settings = load_settings(flags)
    except SettingsError as error:  # named by its flag (--max-queue): say the key as it was written
        key, _, problem = str(error).partition(": ")
        raise SettingsError(f"{key.removeprefix('--').replace('-', '_')}: {problem}") from None
    options = RayOptions.parse({k: v for k, v in args.items() if k in RAY_KEYS})
    if options.num_gpus and settings.device == "cpu":
        raise SettingsError(
            f"num_gpus: {options.num_gpus:g} GPU per replica, but device is cpu; use auto or cuda"
        )
    return settings, options


def actor_resources(num_cpus: float, num_gpus: float) -> dict[str, float]:
    """What a replica or a Ray Data actor asks Ray for: its CPUs, and its share of a GPU when it has one."""
    return {"num_cpus": num_cpus, **({"num_gpus": num_gpus} if num_gpus else {})}


def deployment_options(settings: Settings, options: RayOptions) -> dict[str, Any]:
    """Serve's queue, shutdown and health settings sized from ours (module docstring)."""
    scaling: dict[str, Any] = {"num_replicas": options.replicas}
    if options.max_replicas is not None:
        scaling = {
            "autoscaling_config": {
                "min_replicas": options.min_replicas or 0,
                "max_replicas": options.max_replicas,
                # a replica with a full batch waiting is busy enough: more would only queue
                "target_ongoing_requests": settings.max_batch_size,
            }
        }
    return {
        **scaling,
        "ray_actor_options": actor_resources(options.num_cpus, options.num_gpus),
        # every request a replica holds fits its engine queue plus the batch in the model
        "max_ongoing_requests": settings.max_queue + settings.max_batch_size,
        "max_queued_requests": settings.max_queue,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=BUSY_RETRY_AFTER_S),
        "graceful_shutdown_timeout_s": settings.drain_timeout_s,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
    }


def jobs_warning(settings: Settings, options: RayOptions) -> str | None:
    """What to tell an operator whose replicas would not share their jobs (module docstring)."""
    if settings.jobs_db or (options.replicas == 1 and not options.max_replicas):
        return None
    return (
        "jobs: without jobs_db each node keeps its own SQLite store, and a job is found only on the node "
        "that accepted it; for replicas on several nodes set jobs_db (EMOSERVE_JOBS_DB=postgresql://...) "
        "and a jobs_dir every node sees"
    )


def replica_settings(settings: Settings) -> Settings:
    """A replica's settings: no UI of its own, and torch threads = the CPUs Ray assigned to it."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    threads = settings.threads or max(1, math.floor(cpus))
    return dataclasses.replace(settings, ui=False, threads=threads)


# --------------------------------------------------------------------------------------- deployments


class RecognitionDeployment:
    """One replica: a warmed-up Service behind the same FastAPI app as `emoserve serve`."""

    def __init__(self, settings: Settings, ui: bool = False) -> None:
        replica = serve.get_replica_context().replica_tag
        settings = replica_settings(settings)
        self.ui = ui
        self.service = Service(settings, Metrics(settings.max_queue, labels={"replica": replica}))
        self.service.start().join()  # load, engine, warm-up: Serve routes here only after this
        if not self.service.ready:
            raise RuntimeError(f"emoserve replica {replica} could not start: {self.service.state}")
        log.info("replica %s ready with %d torch threads", replica, settings.threads)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.service.settings, self.service)
        if self.ui:  # the web UI is its own application; "/" shows it, as it does on one process
            app.add_api_route("/", lambda: RedirectResponse(f"{UI_PREFIX}/"), include_in_schema=False)
        return app

    def check_health(self) -> None:
        """Serve replaces a replica whose check raises: a failed service (damaged model files)."""
        if self.service.phase == "failed":
            raise RuntimeError(f"emoserve service {self.service.state}")

    async def recognize(
        self, audio: Audio, granularity: Granularity, embedding: bool, head: str | None = None
    ) -> tuple[Result, RequestTiming]:
        """For the web UI's handle: the same path as /v1/recognize after decoding."""
        return await self.service.recognize(audio, granularity, embedding, head)

    def status(self) -> ModelStatus:
        """For the web UI's replica, which follows it."""
        s = self.service
        return ModelStatus(s.phase, s.reason, s.model_summary, s.max_audio_s, s.max_timeline_s)


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    """What the UI replica knows of the model deployment (one replica's view), replaced whole."""

    phase: Phase
    reason: str | None
    model_summary: dict[str, Any] | None  # what /v1/model answers; None until loaded
    max_audio_s: float  # the limits depend on the model replicas' device, not the UI replica's
    max_timeline_s: float


class RemoteService:
    """The web UI's service (webui.protocol.UIService) on the UI replica, which has no model: phase,
    model and limits are those of the model deployment, refreshed every UI_REFRESH_S. A clip is decoded
    here and recognised on the Recognition deployment; a long recording is decoded and cut into speech
    segments here, and each segment recognised there the same way."""

    metrics = None  # nothing reported: the UI replica has no /metrics (the model replicas count theirs)

    def __init__(self, settings: Settings, model: DeploymentHandle) -> None:
        self.settings = settings
        self.handle = model
        limits = settings.effective_max_audio_s(), settings.effective_max_timeline_s()  # until it answers
        self.status = ModelStatus("starting", None, None, *limits)
        self._stream_metrics = Metrics(settings.max_queue)
        self._stopping = threading.Event()
        threading.Thread(target=self._follow, name="emoserve-ui-status", daemon=True).start()

    @property
    def phase(self) -> Phase:
        return self.status.phase

    @property
    def reason(self) -> str | None:
        return self.status.reason

    @property
    def model_name(self) -> str | None:
        return None if self.status.model_summary is None else str(self.status.model_summary["name"])

    @property
    def random_weights(self) -> bool | None:
        summary = self.status.model_summary
        return None if summary is None else bool(summary["random_weights"])

    @property
    def model_tag(self) -> ModelTag | None:
        summary = self.status.model_summary
        return None if summary is None else ModelTag.from_summary(summary)

    def _follow(self) -> None:
        while not self._stopping.is_set():
            try:
                self.status = self.handle.status.remote().result(timeout_s=10)
            except Exception as error:  # no replica yet, or all gone: say so, look again
                reason = f"waiting for the model deployment ({type(error).__name__})"
                self.status = dataclasses.replace(self.status, phase="loading", reason=reason)
            self._stopping.wait(UI_REFRESH_S)

    def close(self) -> None:
        """Stop following the model deployment."""
        self._stopping.set()

    def require_ready(self) -> None:
        if self.phase != "ready":
            raise unavailable(self.phase, self.reason, time.monotonic() - PROCESS_STARTED_AT)

    def decode(self, source: str | os.PathLike[str] | bytes, name: str | None = None) -> Audio:
        return decode_clip(source, name, self.status.max_audio_s)

    async def recognize(
        self,
        audio: Audio,
        granularity: Granularity = "utterance",
        embedding: bool = False,
        head: str | None = None,
    ) -> tuple[Result, RequestTiming]:
        try:
            result: tuple[Result, RequestTiming] = await self.handle.recognize.remote(
                audio, granularity, embedding, head
            )
        except RayTaskError as error:
            raise domain_error(error) from None
        return result

    def open_timeline(self, source: Any, *, name: str | None = None, **options: Any) -> Recording:
        """As Service.open_timeline (blocking), within the model deployment's max_timeline_s."""
        return open_recording(source, self.status.max_timeline_s, name=name, **options)

    async def timeline(self, job: Recording, head: str | None = None) -> AsyncIterator[TimelineSegment]:
        """The job's segments, cut on a thread of this replica, each recognised on the model deployment
        as `recognize` sends a clip (with `head`); at most TIMELINE_IN_FLIGHT at once, in the order found."""
        self.require_ready()

        async def score(audio: Audio) -> Result:
            result, _ = await self.recognize(audio, head=head)
            return result

        async with contextlib.aclosing(scored_in_order(job, score)) as segments:
            async for segment in segments:
                yield segment

    @contextlib.asynccontextmanager
    async def live_stream(self, options: StreamOptions) -> AsyncIterator[LiveStream]:
        """The Live tab's stream (the session of /v1/stream), cut on this replica; each reading and segment
        recognised on the model deployment as `recognize` sends a clip. Counted in a registry of its own:
        the UI replica has no /metrics (the model replicas count the requests)."""
        from emoserve.serving.live import LiveStream

        self.require_ready()
        summary = self.status.model_summary
        assert summary is not None  # ready: loaded

        async def score(audio: Audio, interim: bool) -> Result:
            granularity = "utterance" if interim else options.granularity
            result, _ = await self.recognize(
                audio, granularity, options.embedding and not interim, options.head
            )
            return result

        stream = LiveStream(
            options,
            score,
            tag=ModelTag.from_summary(summary),
            labels=list(summary["labels"]),
            metrics=self._stream_metrics,
        )
        try:
            yield stream
        finally:
            await stream.close()


def domain_error(error: RayTaskError) -> Exception:
    """What the replica raised, for the UI: an EmoserveError keeps its code, status and Retry-After (Ray
    cannot re-raise our errors as their own classes: their constructors take other arguments)."""
    cause = error.cause
    if isinstance(cause, EmoserveError):
        status, retry_after_s = cause.status, cause.retry_after_s
        return EmoserveError(str(cause), code=cause.code, status=status, retry_after_s=retry_after_s)
    return error


class WebUI:
    """The Gradio UI alone (one replica: Gradio's queue keeps each session's state in this process)."""

    def __init__(self, settings: Settings, model: DeploymentHandle) -> None:
        self.service = RemoteService(settings, model)

    def __serve_build_asgi_app__(self) -> FastAPI:
        from emoserve.webui.app import mount_ui

        app = FastAPI(title="emoserve web UI")
        return mount_ui(app, self.service, path="/")


# Deployments of the classes above (decorated here rather than on the classes: mypy keeps their types).
# `serve.ingress()` without an app: Serve calls __serve_build_asgi_app__ after the constructor.
RECOGNITION: serve.Deployment = serve.deployment(name="Recognition")(serve.ingress()(RecognitionDeployment))
# Gradio's queue keeps each session's state in one process: one replica; the model's work is elsewhere
WEB_UI: serve.Deployment = serve.deployment(name="WebUI", num_replicas=1, ray_actor_options={"num_cpus": 0})(
    serve.ingress()(WebUI)
)


# ------------------------------------------------------------------------------------------- the proxy

PROXY_CALLBACK = "emoserve.ray_serve:proxy_middlewares"  # RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
LOST_ATTEMPTS = 2  # the first try and one more, on another replica
IDEMPOTENT_POSTS = frozenset({RECOGNIZE})  # a recognition is a pure function of the request


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy calls this at start when RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names it (set
    it wherever Ray starts: `run` does for a local cluster; deploy/ files set it for clusters)."""
    return [Middleware(RetryLostReplica, max_body_bytes=load_settings().max_upload_bytes)]


class RetryLostReplica:
    """A request whose replica died under it is sent once more (Serve routes it to another replica); if
    that one is lost too, 503 + Retry-After in our error format. Serve ends a request whose replica died
    without sending any response (uvicorn then answers a bare 500), which our app never does, so that
    is the sign. Only idempotent requests (GET, HEAD, POST /v1/recognize: a recognition is a pure
    function of the request) with bodies up to max_body_bytes; anything else passes as it is."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        idempotent = scope["type"] == "http" and (
            scope["method"] in ("GET", "HEAD") or scope["path"] in IDEMPOTENT_POSTS
        )
        if not idempotent:
            await self.app(scope, receive, send)
            return
        body, complete = await read_some(receive, self.max_body_bytes)
        if not complete:  # too large to hold for a second try (the replica answers it 413)
            await self.app(scope, Replay(body, receive, more_body=True), send)
            return
        for _ in range(LOST_ATTEMPTS):
            client = Replay(body, receive)
            if await self._answered(scope, client, send) or client.disconnected:
                return
            log.warning("%s %s: its replica was lost; trying again", scope["method"], scope["path"])
        lost = EmoserveError(
            "the replica handling this request stopped, and so did the next one; retry shortly",
            code="replica_lost",
            status=503,
            retry_after_s=LOADING_RETRY_AFTER_S,
        )
        await error_json(lost, None)(scope, receive, send)  # the proxy keeps no metrics

    async def _answered(self, scope: Scope, receive: Receive, send: Send) -> bool:
        started = False

        async def send_and_see(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, receive, send_and_see)
        return started


async def read_some(receive: Receive, limit_bytes: int) -> tuple[bytes, bool]:
    """The request body if it is at most `limit_bytes` (True), else what was read so far (False)."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return bytes(body), True
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return bytes(body), True
        if len(body) > limit_bytes:
            return bytes(body), False


class Replay:
    """A receive that gives `body` first, then what the client sends (the rest, or its disconnect)."""

    def __init__(self, body: bytes, receive: Receive, more_body: bool = False) -> None:
        self.first: Message | None = {"type": "http.request", "body": body, "more_body": more_body}
        self.receive = receive
        self.disconnected = False

    async def __call__(self) -> Message:
        message, self.first = self.first, None
        if message is None:
            message = await self.receive()
            self.disconnected = message["type"] == "http.disconnect"
        return message


# -------------------------------------------------------------------------------------------- building


def build_app(args: dict[str, str]) -> serve.Application:
    """`serve run emoserve.ray_serve:build_app key=value ...`: the API application (see split_args)."""
    settings, options = split_args(args)
    if warning := jobs_warning(settings, options):
        log.warning("%s", warning)
    return RECOGNITION.options(**deployment_options(settings, options)).bind(settings, options.ui)


def build_ui_app(args: dict[str, str]) -> serve.Application:
    """The web UI application; it finds the API application's deployment by name (API_APP)."""
    settings, _ = split_args(args)
    handle = serve.get_deployment_handle(RECOGNITION.name, app_name=API_APP)
    return WEB_UI.bind(settings, handle)


def run(settings: Settings, options: RayOptions, address: str | None = None) -> int:
    """`emoserve serve --ray`: deploy both applications on a Ray cluster (a local one when no address)
    and keep them up until Ctrl-C/SIGTERM, then take them down."""
    import ray

    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)  # a local cluster
    ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    started = time.monotonic()
    ui = options.ui and settings.ui
    if warning := jobs_warning(settings, options):
        log.warning("%s", warning)
    api = RECOGNITION.options(**deployment_options(settings, options)).bind(settings, ui)
    serve.run(api, name=API_APP, route_prefix="/")
    log.warning(
        "emoserve on Ray Serve: %s replica(s) ready in %.1f s at http://%s:%d/",
        options.max_replicas or options.replicas,
        time.monotonic() - started,
        settings.host,
        settings.port,
    )
    if ui:
        handle = serve.get_deployment_handle(RECOGNITION.name, app_name=API_APP)
        serve.run(WEB_UI.bind(settings, handle), name=UI_APP, route_prefix=UI_PREFIX)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.warning("shutting down: Serve drains each replica (up to drain_timeout_s)")
    serve.shutdown()
    return 0
