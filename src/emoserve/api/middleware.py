"""The three ASGI middlewares around the app, outermost first: MetricsMiddleware (every response by route
and status), HeaderLimitMiddleware (431 for oversized request headers) and ApiKeyMiddleware (401 without
the key). The two that refuse answer in the API's error format through `error_json`, which counts."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable

from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from emoserve.api.errors import error_json
from emoserve.errors import ApiError
from emoserve.serving.metrics import Metrics

MAX_HEADER_BYTES = 16 * 1024  # beyond this a request gets 431


class MetricsMiddleware:
    """Counts every HTTP response by route and status, and the requests to `in_flight_route` in flight.
    `routes` are the metric labels (a bounded set): any other path (the UI's) is counted as "other"."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        routes: frozenset[str],
        in_flight_route: str,
        uncounted: Callable[[Scope], bool] = lambda scope: False,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.in_flight_route = in_flight_route
        self.uncounted = uncounted  # requests left out (the server's own warm-up requests)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.uncounted(scope):
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500  # if the app fails before it starts a response

        async def send_and_see(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if route == self.in_flight_route:
                with self.metrics.in_flight_requests.track_inprogress():
                    await self.app(scope, receive, send_and_see)
            else:
                await self.app(scope, receive, send_and_see)
        finally:
            self.metrics.count_response(route, status)


class HeaderLimitMiddleware:
    """431 with the JSON error for requests whose headers exceed MAX_HEADER_BYTES."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])  # ": " and CRLF
            if size > MAX_HEADER_BYTES:
                message = f"the request headers are {size:,} bytes; at most {MAX_HEADER_BYTES:,} are accepted"
                await error_json(ApiError("headers_too_large", message), self.metrics)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ApiKeyMiddleware:
    """Requires the API key everywhere except `open_paths` (the probes and /metrics). Accepted as
    `Authorization: Bearer KEY`, `X-API-Key: KEY`, or HTTP basic auth with KEY as the password (any user
    name), which is what a browser sends after the login prompt that the UI's 401 asks for."""

    def __init__(self, app: ASGIApp, api_key: str, metrics: Metrics, open_paths: frozenset[str]) -> None:
        self.app = app
        self.key = api_key.encode()
        self.metrics = metrics
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        # a browser cannot set headers on a WebSocket: there the key may come as ?api_key=KEY
        websocket = scope["type"] == "websocket"
        query_key = QueryParams(scope["query_string"]).get("api_key") if websocket else None
        if self.allowed(Headers(scope=scope), query_key):
            await self.app(scope, receive, send)
            return
        error = ApiError(
            "unauthorized", "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
        )
        if scope["type"] == "websocket":
            if "websocket.http.response" not in scope.get("extensions", {}):
                self.metrics.count_error(error.code)  # a closed socket: no response to render
                await send({"type": "websocket.close", "code": 1008})  # policy violation
                return
            # the handshake answered with the 401 itself (the WebSocket denial response: Starlette's
            # Response sends it as such on a websocket scope)
            await error_json(error, self.metrics)(scope, receive, send)
            return
        api = scope["path"].startswith("/v1/")
        response = error_json(error, self.metrics)
        response.headers["WWW-Authenticate"] = 'Bearer realm="emoserve"' if api else 'Basic realm="emoserve"'
        await response(scope, receive, send)

    def allowed(self, headers: Headers, query_key: str | None = None) -> bool:
        candidates = [headers.get("x-api-key"), query_key]
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
