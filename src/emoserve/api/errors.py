"""Errors as HTTP answers. Every failure is an `EmoserveError`, whose code and status say what it is; here
it becomes `{"error": {"code", "message"}}` (`error_json`) or, once a stream has begun, its last line
(`error_line`), and each of the two counts it in `emoserve_errors_total`: nothing else does.

Also: the routes' class that answers domain errors (`MappedErrorsRoute`), the handlers of FastAPI's and
Starlette's own errors and of bugs, the page "/" shows until the web UI is mounted, and the request's
`Service` (`get_service`, `ServiceDep`), which they count into.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from emoserve.errors import HTTP_CODES, ApiError, EmoserveError
from emoserve.inference.formats import error_record, json_line
from emoserve.serving.metrics import Metrics
from emoserve.serving.service import Service

NDJSON = "application/x-ndjson"


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def error_json(error: EmoserveError, metrics: Metrics | None) -> JSONResponse:
    """The error's JSON response (with Retry-After for a 503 that has one), counted in `metrics` (None
    only where nothing is counted: Ray Serve's proxy, which has no metrics of its own)."""
    if metrics is not None:
        metrics.count_error(error.code)
    headers = None
    if error.retry_after_s is not None:
        headers = {"Retry-After": str(max(1, math.ceil(error.retry_after_s)))}
    body = {"error": {"code": error.code, "message": str(error)}}
    return JSONResponse(body, status_code=error.status, headers=headers)


def ndjson_line(record: dict[str, Any]) -> bytes:
    """One line of an NDJSON stream; `inference.formats` builds the records, as for the CLI's jsonl."""
    return (json_line(record) + "\n").encode()


def error_line(file: str, error: EmoserveError, metrics: Metrics) -> bytes:
    """A stream's error, as its last line (the status went out with the first line), counted."""
    metrics.count_error(error.code)
    return ndjson_line(error_record(file, error))


class MappedErrorsRoute(APIRoute):
    """A route whose domain errors (EmoserveError) become their JSON responses; anything else is a bug,
    answered by `internal_error`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except EmoserveError as error:
                # The traceback's frames (the upload's bytes among their locals) sit in reference cycles
                # through the exception (anyio's worker-thread hand-off): without it they go now, not at
                # the next full garbage collection.
                error.__traceback__ = None
                return error_json(error, get_service(request).metrics)

        return handle


def add_error_handlers(app: FastAPI) -> None:
    """Errors raised outside our routes' code (parameter validation, unknown routes, bugs), in our shape."""
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


async def validation_error(request: Request, error: Exception) -> JSONResponse:
    """FastAPI's own parameter validation, reshaped into our error format."""
    assert isinstance(error, RequestValidationError)
    problems = [
        f"{'.'.join(str(part) for part in e.get('loc', ()))}: {e.get('msg')} (got {e.get('input')!r})"
        for e in error.errors()
    ]
    return error_json(ApiError("invalid_parameter", "; ".join(problems)), get_service(request).metrics)


async def http_error(request: Request, error: Exception) -> Response:
    """Starlette's own errors (no such route, wrong method, a malformed multipart body), in our shape."""
    assert isinstance(error, StarletteHTTPException)
    svc = get_service(request)
    if error.status_code == 404 and request.url.path == "/" and svc.settings.ui:
        return ui_starting_page(svc)
    code = HTTP_CODES.get(error.status_code, "bad_request" if error.status_code < 500 else "internal_error")
    response = error_json(EmoserveError(error.detail, code=code, status=error.status_code), svc.metrics)
    response.headers.update(error.headers or {})
    return response


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    """A bug, not bad input: logged with its traceback (by uvicorn), answered in our format."""
    message = f"internal error ({type(error).__name__}); the server log has the details"
    return error_json(ApiError("internal_error", message), get_service(request).metrics)


def ui_starting_page(svc: Service) -> HTMLResponse:
    """What "/" shows until the web UI is mounted; it reloads itself."""
    state = html.escape(svc.ui_error or f"The model is {svc.state}; the web UI starts once it is ready.")
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">'
        f"<title>emoserve: starting</title></head><body><h1>emoserve is starting</h1><p>{state}</p>"
        '<p>The HTTP API is at <a href="/docs">/docs</a>.</p></body></html>'
    )
    return HTMLResponse(page, status_code=503, headers={"Retry-After": "2"})
