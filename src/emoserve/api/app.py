"""The HTTP app over one `Service`: its routes, the probes, the lifespan that loads the model, the server.

    POST /v1/recognize  one clip's emotion (recognize.py)
    POST /v1/timeline   a long recording's emotion timeline, JSON or streamed NDJSON (timeline.py)
    /v1/jobs            long recordings as jobs: accepted durably, scored in the background (jobs.py)
    GET  /v1/model      name, random_weights, labels, config, device, dtype, parameters (model.py)
    GET  /v1/stream     a live stream over a WebSocket (stream.py)
    GET  /healthz       200 as soon as the process serves HTTP (liveness), whatever the state
    GET  /readyz        200 once warmed up; otherwise 503 with the state and the timings so far
    GET  /metrics       Prometheus text;  /docs  OpenAPI;  /  the Gradio UI, once mounted (webui/mount.py)

Every error is `{"error": {"code", "message"}}` (errors.py). Nothing heavy at import: torch loads behind
the running server, in the lifespan's start-up thread, and Gradio when the UI is mounted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from types import FrameType
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response

from emoserve import __version__
from emoserve.api.errors import MappedErrorsRoute, ServiceDep, add_error_handlers
from emoserve.api.jobs import JOBS
from emoserve.api.jobs import router as jobs_router
from emoserve.api.middleware import ApiKeyMiddleware, HeaderLimitMiddleware, MetricsMiddleware
from emoserve.api.model import MODEL
from emoserve.api.model import router as model_router
from emoserve.api.recognize import RECOGNIZE
from emoserve.api.recognize import router as recognize_router
from emoserve.api.stream import router as stream_router
from emoserve.api.timeline import TIMELINE
from emoserve.api.timeline import router as timeline_router
from emoserve.api.warmup import is_warmup_request, loopback_url, warm_routes
from emoserve.serving.jobs.worker import Jobs
from emoserve.serving.service import Hooks, Service
from emoserve.serving.settings import Settings
from emoserve.webui.mount import mount_while_loading

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # never behind the API key
ROUTES = frozenset({RECOGNIZE, TIMELINE, JOBS, MODEL, *OPEN_PATHS, "/docs", "/openapi.json"})  # metric labels
H11_BUFFER_BYTES = 1 << 20  # uvicorn (h11) answers a bare 400 to a larger request head; below it, our 431

router = APIRouter(route_class=MappedErrorsRoute)


@router.get("/healthz", summary="Liveness: the process serves HTTP")
async def healthz(service: ServiceDep) -> dict[str, str]:
    return {"status": "ok", "state": service.state}


@router.get("/readyz", summary="Readiness: 200 once the model is loaded and warmed up, else 503")
async def readyz(service: ServiceDep) -> JSONResponse:
    body: dict[str, Any] = {"ready": service.ready, "state": service.state, "timings": service.timings()}
    if problems := service.model_file_problems():
        body["model_files"] = problems  # serving goes on from memory; a restart would not load
    return JSONResponse(body, status_code=200 if service.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics_text(service: ServiceDep) -> Response:
    content, content_type = service.metrics.render()
    return Response(content, media_type=content_type)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start-up: the jobs' store; the model's thread, and the UI's beside it (ready waits for both; the
    UI's long recordings are jobs); the jobs' workers (they take jobs once the service accepts
    requests). Shutdown: the workers give their jobs back, then drain."""
    svc: Service = app.state.service
    async with AsyncExitStack() as ui_lifespan:
        jobs = app.state.jobs = await asyncio.to_thread(Jobs, svc)
        prepare_ui = None
        if svc.settings.ui:
            loop = asyncio.get_running_loop()
            prepare_ui = functools.partial(mount_while_loading, app, svc, jobs, loop, ui_lifespan)
        svc.start(prepare_ui)
        jobs.start()
        yield
        app.state.jobs = None
        await jobs.stop()
        await asyncio.to_thread(svc.shutdown, svc.settings.drain_timeout_s)


def create_app(settings: Settings, svc: Service | None = None) -> FastAPI:
    """The ASGI app. Its lifespan starts loading the model; serve it with uvicorn (`serve`)."""
    svc = svc or Service(settings)
    app = FastAPI(
        title="emoserve",
        version=__version__,
        description="Speech emotion recognition with emotion2vec+",
        lifespan=lifespan,
    )
    app.state.service = svc
    app.state.jobs = None  # the lifespan opens them
    for routes in (recognize_router, timeline_router, jobs_router, stream_router, model_router, router):
        app.include_router(routes)
    add_error_handlers(app)
    if settings.api_key:
        app.add_middleware(
            ApiKeyMiddleware, api_key=settings.api_key, metrics=svc.metrics, open_paths=OPEN_PATHS
        )
    app.add_middleware(HeaderLimitMiddleware, metrics=svc.metrics)
    # outermost: counts the 401s and 431s too
    app.add_middleware(
        MetricsMiddleware,
        metrics=svc.metrics,
        routes=ROUTES,
        in_flight_route=RECOGNIZE,
        uncounted=lambda scope: not svc.ready and is_warmup_request(scope),
    )
    return app


def serve(settings: Settings) -> int:
    """Run the service until SIGTERM/Ctrl-C (exit status 0) or a failed start-up (1)."""
    server: DrainingServer
    hooks = Hooks(
        warm_routes=functools.partial(warm_routes, base_url=loopback_url(settings.host, settings.port)),
        on_failure=lambda: server.request_exit(),  # the server is made below, before anything starts
    )
    service = Service(settings, hooks=hooks)
    config = uvicorn.Config(
        create_app(settings, service),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
        lifespan="on",
        http="h11",  # our 431 and request-head limit are h11 settings (uvloop/httptools may be installed)
        h11_max_incomplete_event_size=H11_BUFFER_BYTES,
    )
    server = DrainingServer(config, service)
    server.run()
    if service.phase == "failed":
        log.error("exiting: %s", service.state)
        return 1
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that marks the service draining the moment SIGTERM/SIGINT arrives, so that /readyz
    says 503 while uvicorn finishes the requests in flight (the lifespan shutdown comes only after)."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self._ending_streams = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """uvicorn's, except that the signal is not raised again after the shutdown: a drained service
        exits 0 rather than dying of SIGTERM (143); and open live streams end first (their last segment,
        the summary, close 1001), within drain_timeout_s: uvicorn's shutdown would close them at once."""
        self.service.begin_drain()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for requests in flight
        elif self.service.open_streams and not self._ending_streams:
            self._ending_streams = True
            threading.Thread(target=self._exit_after_streams, name="emoserve-drain", daemon=True).start()
        elif not self._ending_streams:
            self.should_exit = True

    def _exit_after_streams(self) -> None:
        deadline = time.monotonic() + self.service.settings.drain_timeout_s
        while self.service.open_streams and time.monotonic() < deadline:
            time.sleep(0.05)
        self.should_exit = True

    def request_exit(self) -> None:
        self.should_exit = True
