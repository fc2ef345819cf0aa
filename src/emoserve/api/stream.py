"""GET /v1/stream: emotion while the person is still speaking, over a WebSocket (docs/streaming.md).

    handshake: query parameters checked (a bad one: an `error`, then close 1008), the API key (headers,
    or ?api_key= for browsers), the service accepting and under max_streams (else the handshake gets the
    503 JSON with Retry-After)
    -> `ready` -> binary messages of PCM -> Service.live_stream (serving/live.py): speech_start, interim,
       segment; {"type": "flush", "turn_id": ...} -> the open utterance's segment now (with vad=off: the
       turn's, the audio since the last flush); {"type": "end"} -> the last segment and the summary, close
       1000

The receive loop reads the next message only once the stream has room (back-pressure: a fast sender is
slowed, never dropped). Fatal: a message over 1 MiB, audio past max_stream_s, nothing for stream_idle_s,
the server draining (close 1001 after the summary); each is an `error` with `fatal: true` after the
stream's segments and summary, then the close.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from emoserve.api.errors import error_json
from emoserve.api.warmup import is_warmup_request
from emoserve.constants import STREAM_PATH
from emoserve.errors import AudioError, EmoserveError
from emoserve.serving.service import Service

if TYPE_CHECKING:  # numpy and the audio path load with the first stream, not with the server
    from emoserve.inference.protocol import ErrorMessage
    from emoserve.serving.live import LiveStream

MAX_MESSAGE_BYTES = 1 << 20
POLL_S = 0.25  # how often a waiting receive looks at the drain and the idle clock
CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TOO_BIG = 1000, 1001, 1008, 1009
CLOSE_ERROR, CLOSE_TRY_LATER = 1011, 1013

router = APIRouter()


class Refused(Exception):
    """A fatal problem: the stream gets its segments and summary, then this error, then the close."""

    def __init__(self, code: str, message: str, close: int) -> None:
        super().__init__(message)
        self.code, self.close = code, close


@router.websocket(STREAM_PATH)
async def stream(websocket: WebSocket) -> None:
    from emoserve.inference.protocol import StreamOptions

    service: Service = websocket.app.state.service
    try:
        options = StreamOptions.from_query(websocket.query_params)
    except ValueError as error:
        service.metrics.count_error("invalid_parameter")
        await refuse(websocket, "invalid_parameter", str(error), CLOSE_POLICY)
        return
    accepted = False
    try:
        async with service.live_stream(options, counted=not is_warmup_request(websocket.scope)) as live:
            await websocket.accept()
            accepted = True
            await websocket.send_json(live.ready_message)
            await serve_stream(websocket, service, live)
    except EmoserveError as error:
        if accepted:
            raise
        if error.status != 503:  # a parameter the service refuses (an unknown head): as a bad parameter
            service.metrics.count_error(error.code)
            await refuse(websocket, error.code, str(error), CLOSE_POLICY)
            return
        # not now (not ready, draining, max_streams): the 503 with Retry-After as the handshake's answer
        response = error_json(error, service.metrics)
        if "websocket.http.response" in websocket.scope.get("extensions", {}):
            await websocket.send_denial_response(response)
        else:
            await refuse(websocket, error.code, str(error), CLOSE_TRY_LATER)


async def refuse(websocket: WebSocket, code: str, message: str, close: int) -> None:
    """A stream that does not open: accepted only to say why (`error`, fatal), then closed with `close`."""
    first: ErrorMessage = {"type": "error", "seq": 0, "code": code, "message": message, "fatal": True}
    await websocket.accept()
    await websocket.send_json(first)
    await websocket.close(close)


async def serve_stream(websocket: WebSocket, service: Service, live: LiveStream) -> None:
    sender = asyncio.create_task(send_messages(websocket, live))
    close = CLOSE_NORMAL
    try:
        try:
            await receive_audio(websocket, service, live)
        except Refused as refused:
            await live.end()
            live.error(refused.code, str(refused), fatal=True)
            close = refused.close
        late = asyncio.create_task(after_end(websocket, live))
        try:
            await sender
        except EmoserveError as error:  # a segment could not be scored (the model failed, or no room)
            service.metrics.count_error(error.code)
            await websocket.send_json(live.messages.error(error.code, str(error), fatal=True))
            close = CLOSE_ERROR
        finally:
            late.cancel()
            await asyncio.gather(late, return_exceptions=True)
        await websocket.close(close)
    except WebSocketDisconnect:
        pass  # the client went away: live_stream's exit cancels what it held
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


async def after_end(websocket: WebSocket, live: LiveStream) -> None:
    """After `end`, until the summary is out: what the client still sends is left out, each message with
    its `error` (not fatal), told before the summary."""
    while (message := await websocket.receive())["type"] != "websocket.disconnect":
        what = "audio" if message.get("bytes") is not None else "a message"
        live.error("invalid_message", f'{what} after {{"type": "end"}} was left out', fatal=False)


async def send_messages(websocket: WebSocket, live: LiveStream) -> None:
    async for message in live.messages_out():
        await websocket.send_json(message)


async def receive_audio(websocket: WebSocket, service: Service, live: LiveStream) -> None:
    """Until `end` (then the stream is ended) or a Refused; WebSocketDisconnect when the client leaves."""
    loop = asyncio.get_running_loop()
    idle_since = loop.time()
    receiving: asyncio.Task[Any] | None = None
    try:
        while True:
            if receiving is None:
                receiving = asyncio.ensure_future(websocket.receive())
            done, _ = await asyncio.wait([receiving], timeout=POLL_S)
            if service.phase == "draining":
                raise Refused(
                    code="draining",
                    message="the server is shutting down: the stream ends",
                    close=CLOSE_GOING_AWAY,
                )
            if not done:
                if loop.time() - idle_since > service.settings.stream_idle_s:
                    raise Refused(
                        code="stream_idle",
                        message=f"nothing received for {service.settings.stream_idle_s:g} s (stream_idle_s): "
                        'send audio, or {"type": "end"} when done',
                        close=CLOSE_POLICY,
                    )
                continue
            message, receiving, idle_since = receiving.result(), None, loop.time()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            if (data := message.get("bytes")) is not None:
                await feed(live, service, data)
            elif await control(live, message.get("text") or ""):
                await live.end()
                return
    finally:
        if receiving is not None and not receiving.done():
            receiving.cancel()


async def feed(live: LiveStream, service: Service, data: bytes) -> None:
    if len(data) > MAX_MESSAGE_BYTES:
        raise Refused(
            code="frame_too_large",
            message=f"a message of {len(data)} bytes: at most {MAX_MESSAGE_BYTES} (1 MiB); send smaller ones",
            close=CLOSE_TOO_BIG,
        )
    try:
        await live.feed(data)
    except AudioError as error:  # a message that is not whole samples, NaN in f32: that message only
        live.error(error.code, str(error), fatal=False)
    if live.duration_s > service.settings.max_stream_s:
        raise Refused(
            code="stream_too_long",
            message=f"the stream passed {service.settings.max_stream_s:g} s of audio, this server's "
            "max_stream_s (--max-stream-s / EMOSERVE_MAX_STREAM_S); open a new stream to go on",
            close=CLOSE_TOO_BIG,
        )


async def control(live: LiveStream, raw: str) -> bool:
    """A text message: True for `end`; a `flush` closes the open utterance (its segment follows); anything
    else is an `error` that does not end the stream."""
    from emoserve.inference.protocol import parse_control

    try:
        message = parse_control(raw)
    except ValueError as error:
        live.error(code="invalid_message", message=str(error), fatal=False)
        return False
    if message["type"] == "end":
        return True
    await live.flush(message.get("turn_id"))
    return False
