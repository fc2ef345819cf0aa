"""HTTP routes over one `Service`: recognition, model info, probes, metrics, the web UI mount.

    POST /v1/recognize  multipart `file` (or a raw audio body); granularity=utterance|frame, embedding=bool
    POST /v1/timeline   a long recording's emotion timeline, JSON or streamed NDJSON (timeline_api.py)
    GET  /v1/model      name, random_weights, labels, config, device, dtype, parameters
    GET  /healthz       200 as soon as the process serves HTTP (liveness), whatever the state
    GET  /readyz        200 once warmed up; otherwise 503 with the state and the timings so far
    GET  /metrics       Prometheus text;  /docs  OpenAPI;  /  the Gradio UI, once Gradio is imported

Every error is `{"error": {"code", "message"}}`; `api_error` is the one place that maps domain errors
(audio, engine, lifecycle) to HTTP statuses. Nothing heavy at import: torch loads behind the running
server, in the lifespan's start-up thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hmac
import html
import logging
import math
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from enum import Enum
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from emoserve import __version__
from emoserve.constants import FALSE_WORDS, GRANULARITIES, TRUE_WORDS
from emoserve.errors import CODES, HTTP_CODES, ApiError, EmoserveError
from emoserve.serving.metrics import Metrics
from emoserve.serving.service import Service
from emoserve.serving.settings import Settings

if TYPE_CHECKING:
    from emoserve.constants import Granularity
    from emoserve.inference.results import Result
    from emoserve.serving.engine import RequestTiming

log = logging.getLogger(__name__)

T = TypeVar("T")
RECOGNIZE = "/v1/recognize"
TIMELINE = "/v1/timeline"  # timeline_api.py
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # never behind the API key
ROUTES = frozenset({RECOGNIZE, TIMELINE, "/v1/model", *OPEN_PATHS, "/docs", "/openapi.json"})  # metric labels
UI_START_TIMEOUT_S = 60.0

# ------------------------------------------------------------------------------------------------ errors


MAX_HEADER_BYTES = 16 * 1024  # beyond this a request gets 431
H11_BUFFER_BYTES = 1 << 20  # uvicorn (h11) answers a bare 400 to a larger request head; below it, our 431

def api_error(error: BaseException) -> EmoserveError | None:
    """A domain error as it is (its fields say its status, `errors.EmoserveError`); None for anything else
    (a bug: 500)."""
    return error if isinstance(error, EmoserveError) else None


def error_json(error: EmoserveError) -> JSONResponse:
    headers = None
    if error.retry_after_s is not None:
        headers = {"Retry-After": str(max(1, math.ceil(error.retry_after_s)))}
    body = {"error": {"code": error.code, "message": str(error)}}
    return JSONResponse(body, status_code=error.status, headers=headers)


def error_response(request: Request, error: EmoserveError) -> JSONResponse:
    get_service(request).metrics.count_error(error.code)
    return error_json(error)


class MappedErrorsRoute(APIRoute):
    """A route whose domain errors become their JSON responses (see `api_error`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as error:
                mapped = api_error(error)
                if mapped is None:
                    raise
                # The traceback's frames (the upload's bytes among their locals) sit in reference cycles
                # through the exception (anyio's worker-thread hand-off): without it they go now, not at
                # the next full garbage collection.
                error.__traceback__ = None
                return error_response(request, mapped)

        return handle


async def validation_error(request: Request, error: Exception) -> JSONResponse:
    """FastAPI's own parameter validation, reshaped into our error format."""
    assert isinstance(error, RequestValidationError)
    problems = [
        f"{'.'.join(str(part) for part in e.get('loc', ()))}: {e.get('msg')} (got {e.get('input')!r})"
        for e in error.errors()
    ]
    return error_response(request, ApiError("invalid_parameter", "; ".join(problems)))


async def http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, StarletteHTTPException)
    svc = get_service(request)
    if error.status_code == 404 and request.url.path == "/" and svc.settings.ui:
        return ui_starting_page(svc)
    code = HTTP_CODES.get(error.status_code, "bad_request" if error.status_code < 500 else "internal_error")
    mapped = EmoserveError(error.detail, code=code, status=error.status_code)
    response = error_response(request, mapped)
    response.headers.update(error.headers or {})
    return response


def ui_starting_page(svc: Service) -> HTMLResponse:
    """What "/" shows until the web UI is mounted; it reloads itself."""
    state = html.escape(svc.ui_error or f"The model is {svc.state}; the web UI starts once it is ready.")
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">'
        f"<title>emoserve: starting</title></head><body><h1>emoserve is starting</h1><p>{state}</p>"
        '<p>The HTTP API is at <a href="/docs">/docs</a>.</p></body></html>'
    )
    return HTMLResponse(page, status_code=503, headers={"Retry-After": "2"})


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    """A bug, not bad input: logged with its traceback (by uvicorn), answered in our format."""
    message = f"internal error ({type(error).__name__}); the server log has the details"
    return error_response(request, ApiError("internal_error", message))


# ---------------------------------------------------------------------------------------------- requests


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


@dataclass(frozen=True)
class Upload:
    data: bytes
    name: str  # the uploaded file's name, for error messages
    fields: dict[str, str]  # the other multipart fields


async def read_upload(request: Request, limit_bytes: int) -> Upload:
    """The audio bytes of a multipart `file` field or of the raw body, at most `limit_bytes`."""
    body = await read_body(request, limit_bytes)
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return await parse_multipart(request.scope, body)
    return Upload(body, "<request body>", {})


async def read_body(request: Request, limit_bytes: int) -> bytes:
    too_large = ApiError("upload_too_large",
        f"the request body is over {limit_bytes / 1e6:g} MB (max_upload_mb, EMOSERVE_MAX_UPLOAD_MB)",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit_bytes:
        raise too_large  # refused before reading it
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit_bytes:
                raise too_large
    except ClientDisconnect:
        raise client_gone() from None
    return bytes(body)


def client_gone() -> ApiError:
    """A client that hung up (mid-upload or before its result): nobody reads this, but it is counted."""
    return ApiError("client_disconnected", "the client closed the connection before the result")


async def parse_multipart(scope: Scope, body: bytes) -> Upload:
    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async with Request(scope, replay).form(max_files=1, max_fields=16) as form:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise ApiError("missing_file",
                "send the audio as the multipart field 'file' (or as the raw request body)",
            )
        data = await file.read()
        fields = {key: value for key, value in form.items() if isinstance(value, str)}
        return Upload(data, file.filename or "<file>", fields)


@dataclass(frozen=True)
class Options:
    granularity: Granularity
    embedding: bool


def recognition_options(granularity: str | None, embedding: bool | None, fields: dict[str, str]) -> Options:
    """Query parameters (validated by FastAPI) win over multipart form fields (validated here)."""
    chosen = granularity if granularity is not None else fields.get("granularity", "utterance")
    if chosen not in GRANULARITIES:
        raise ApiError("invalid_parameter", f"granularity is {chosen!r}; choose 'utterance' or 'frame'")
    if embedding is None:
        embedding = form_bool("embedding", fields.get("embedding", "false"))
    return Options(chosen, embedding)  # checked against GRANULARITIES (a Literal tuple: mypy narrows)


def form_bool(name: str, raw: str) -> bool:
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS or not word:
        return False
    raise ApiError("invalid_parameter", f"{name} is {raw!r}; use true or false")


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`, but cancel it if the client goes away first: that frees its place in the queue."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected(request.receive))
    try:
        done, _ = await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # a no-op once it is done
    if task in done:
        return task.result()
    raise client_gone()


async def disconnected(receive: Receive) -> None:
    """Returns when the client disconnects (the body has been read: nothing else is left to receive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def recognition_body(result: Result, embedding: bool, timing: dict[str, float]) -> dict[str, Any]:
    body = result.to_dict()
    body["embedding"] = result.embedding.tolist() if embedding and result.embedding is not None else None
    body["timing"] = timing
    return body


def stage_timing(decode_s: float, timing: RequestTiming, total_s: float) -> dict[str, float]:
    return {
        "decode_s": round(decode_s, 6),
        "queue_s": round(timing.queue_s, 6),
        "inference_s": round(timing.inference_s, 6),
        "total_s": round(total_s, 6),
    }


# ----------------------------------------------------------------------------------- documented shapes


class FrameOut(BaseModel):
    start_s: float
    end_s: float
    emotion: str
    confidence: float
    scores: dict[str, float]


class TimingOut(BaseModel):
    decode_s: float
    queue_s: float
    inference_s: float
    total_s: float


class RecognitionOut(BaseModel):
    emotion: str
    label_zh: str
    emoji: str
    confidence: float
    scores: dict[str, float]
    duration_s: float
    granularity: Literal["utterance", "frame"]
    model: str
    random_weights: bool
    frames: list[FrameOut] | None
    embedding: list[float] | list[list[float]] | None  # (dim,) utterance, (frames, dim) frame
    timing: TimingOut


ErrorCode = Enum("ErrorCode", {code: code for code in CODES}, type=str)  # type: ignore[misc]


class ErrorBody(BaseModel):
    code: ErrorCode = Field(
        description="stable, for programs: "
        + "; ".join(f"`{code}` ({c.status}) {c.meaning}" for code, c in CODES.items())
    )
    message: str = Field(description="for people: what was wrong and what to do")


class ErrorOut(BaseModel):
    error: ErrorBody


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorOut} for status in statuses}


def audio_request_body(fields: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI request body of a route that takes audio: the multipart `file` with `fields` beside
    it, or the raw body."""
    audio = {"schema": {"type": "string", "format": "binary"}}
    multipart = {
        "type": "object",
        "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary"}, **fields},
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": multipart},
                "application/octet-stream": audio,
                "audio/*": audio,
            },
        }
    }


RECOGNIZE_BODY = audio_request_body(
    {"granularity": {"type": "string", "enum": list(GRANULARITIES)}, "embedding": {"type": "boolean"}}
)

# -------------------------------------------------------------------------------------------------- routes

router = APIRouter(route_class=MappedErrorsRoute)


@router.post(
    RECOGNIZE,
    summary="Recognise the emotion in one clip",
    description="Send the audio as the multipart field `file` or as the raw body (wav, flac, ogg, mp3, "
    "m4a, opus, ...). A request that arrives before the model is ready waits up to ready_wait_s.",
    responses={200: {"model": RecognitionOut}, **error_responses(400, 401, 413, 415, 422, 503)},
    openapi_extra=RECOGNIZE_BODY,
)
async def recognize(
    request: Request,
    service: ServiceDep,
    granularity: Annotated[
        Literal["utterance", "frame"] | None,
        Query(description="utterance (default) or frame (one per 20 ms)"),
    ] = None,
    embedding: Annotated[bool | None, Query(description="also return the embedding (default false)")] = None,
) -> JSONResponse:
    started = time.perf_counter()
    upload = await read_upload(request, service.settings.max_upload_bytes)
    options = recognition_options(granularity, embedding, upload.fields)
    await service.wait_ready(service.settings.ready_wait_s)
    decode_started = time.perf_counter()
    audio = await run_in_threadpool(service.decode, upload.data, upload.name)
    decode_s = time.perf_counter() - decode_started
    result, timing = await until_disconnected(
        request, service.recognize(audio, options.granularity, options.embedding)
    )
    total_s = time.perf_counter() - started
    service.metrics.observe_request(
        RECOGNIZE, decode_s=decode_s, queue_s=timing.queue_s, inference_s=timing.inference_s, total_s=total_s
    )
    return JSONResponse(recognition_body(result, options.embedding, stage_timing(decode_s, timing, total_s)))


@router.get("/v1/model", summary="The loaded model", responses=error_responses(401, 503))
async def model(service: ServiceDep) -> dict[str, Any]:
    if service.model is None:
        raise service.unavailable()
    return service.model


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


# ------------------------------------------------------------------------------------------- middleware


def route_label(path: str) -> str:
    """A bounded set of metric labels: our routes by path, everything else (the UI's) as "other"."""
    return path if path in ROUTES else "other"


class MetricsMiddleware:
    """Counts every HTTP response by route and status, and recognitions in flight."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_label(scope["path"])
        status = 500  # if the app fails before it starts a response

        async def send_and_see(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if route == RECOGNIZE:
                with self.metrics.in_flight_requests.track_inprogress():
                    await self.app(scope, receive, send_and_see)
            else:
                await self.app(scope, receive, send_and_see)
        finally:
            self.metrics.count_response(route, status)


class ApiKeyMiddleware:
    """Requires the API key everywhere except the probes and /metrics. Accepted as `Authorization: Bearer
    KEY`, `X-API-Key: KEY`, or HTTP basic auth with KEY as the password (any user name), which is what a
    browser sends after the login prompt that the UI's 401 asks for."""

    def __init__(self, app: ASGIApp, api_key: str, metrics: Metrics) -> None:
        self.app = app
        self.key = api_key.encode()
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.allowed(Headers(scope=scope)):
            await self.app(scope, receive, send)
            return
        self.metrics.count_error("unauthorized")
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        api = scope["path"].startswith("/v1/")
        error = ApiError("unauthorized",
            "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
        )
        response = error_json(error)
        response.headers["WWW-Authenticate"] = 'Bearer realm="emoserve"' if api else 'Basic realm="emoserve"'
        await response(scope, receive, send)

    def allowed(self, headers: Headers) -> bool:
        candidates = [headers.get("x-api-key")]
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            candidates.append(credentials.strip())
        elif scheme.lower() == "basic":
            candidates.append(basic_password(credentials))
        return any(c is not None and hmac.compare_digest(c.encode(), self.key) for c in candidates)


def basic_password(credentials: str) -> str | None:
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2]


# ------------------------------------------------------------------------------------ lifespan and the UI


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start-up: the model thread, which also mounts the UI before ready. Shutdown: drain."""
    svc: Service = app.state.service
    async with AsyncExitStack() as ui_lifespan:
        if svc.settings.ui:
            svc.before_ready = functools.partial(mount_ui, app, svc, asyncio.get_running_loop(), ui_lifespan)
        svc.start()
        yield
        await asyncio.to_thread(svc.shutdown, svc.settings.drain_timeout_s)


def mount_ui(
    app: FastAPI, svc: Service, loop: asyncio.AbstractEventLoop, ui_lifespan: AsyncExitStack
) -> None:
    """In the start-up thread, after warm-up and before ready: import Gradio, build the UI and mount it
    at "/" on the running app, so that "ready" means the whole product is up.

    Not beside the warm-up: on a small CPU, importing Gradio (seconds of Python) would slow it through
    the GIL; not after ready: it would slow the first requests. Until then "/" answers a page that says
    the UI is starting. A UI that fails to mount leaves the HTTP API serving."""
    if svc.phase == "draining":
        return
    started = time.monotonic()
    try:
        from emoserve.webui.app import mount_ui

        # the long-recording tab takes bigger files than a clip (which max_audio_s still bounds)
        largest = max(svc.settings.max_upload_bytes, svc.settings.max_timeline_upload_bytes)
        mount_ui(app, svc, path="/", max_file_size=largest)
        mount = app.router.routes[-1]
        assert isinstance(mount, Mount), "mount_gradio_app appends its Mount"
        asyncio.run_coroutine_threadsafe(start_gradio(mount.app, ui_lifespan), loop).result(
            UI_START_TIMEOUT_S
        )
    except (ImportError, AttributeError) as error:
        svc.ui_error = f"the web UI is not available: {error}"
        log.warning("%s; the HTTP API works without it", svc.ui_error)
        return
    except Exception as error:
        svc.ui_error = f"the web UI failed to start: {error}"
        log.exception("%s; the HTTP API works without it", svc.ui_error)
        return
    log.info("web UI mounted at / in %.2f s", time.monotonic() - started)


async def start_gradio(gradio_app: Any, ui_lifespan: AsyncExitStack) -> None:
    """What mount_gradio_app's lifespan hook does at start-up, which this app has passed already."""
    await ui_lifespan.enter_async_context(gradio_app.router.lifespan_context(gradio_app))
    blocks = gradio_app.get_blocks()
    blocks.run_startup_events()
    await blocks.run_extra_startup_events()


# ---------------------------------------------------------------------------------------------------- app


class HeaderLimitMiddleware:
    """431 with the JSON error for requests whose headers exceed MAX_HEADER_BYTES."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])  # ": " and CRLF
            if size > MAX_HEADER_BYTES:
                self.metrics.count_error("headers_too_large")
                message = f"the request headers are {size:,} bytes; at most {MAX_HEADER_BYTES:,} are accepted"
                await error_json(ApiError("headers_too_large", message))(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
    app.include_router(router)
    from emoserve.api.timeline import router as timeline_router

    app.include_router(timeline_router)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key, metrics=svc.metrics)
    app.add_middleware(HeaderLimitMiddleware, metrics=svc.metrics)
    app.add_middleware(MetricsMiddleware, metrics=svc.metrics)  # outermost: counts 401s and 431s too
    return app


def serve(settings: Settings) -> int:
    """Run the service until SIGTERM/Ctrl-C (exit status 0) or a failed start-up (1)."""
    service = Service(settings)
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
    service.on_failure = server.request_exit
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

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """uvicorn's, except that the signal is not raised again after the shutdown: a drained service
        exits 0 rather than dying of SIGTERM (143)."""
        self.service.begin_drain()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for requests in flight
        else:
            self.should_exit = True

    def request_exit(self) -> None:
        self.should_exit = True
