"""A live stream to an emoserve server: PCM to its GET /v1/stream, the protocol's messages back
(docs/streaming.md). `emoserve stream --url` is one user; anything that has audio as it is spoken (a voice
agent, a call) can be another.

    options = StreamOptions(sample_rate=8000)
    async with await StreamClient.connect("ws://HOST:7860", options, api_key=KEY) as client:
        ...                                 # one task sends:
        await client.send(pcm)              #   PCM as the options describe it, any size up to 1 MiB
        await client.flush(turn_id=7)       #   the open utterance's segment now, answered with turn_id 7
        await client.end()                  #   the source has ended: the last segment and the summary follow
        async for message in client: ...    # another receives: ready, speech_start, interim, segment,
                                            # summary, error (inference/protocol.py's types), until the
                                            # server closes the stream

Sending and receiving go side by side: the server answers while the audio still comes. The options are the
protocol's `StreamOptions`, checked here when made and sent as the route's query parameters.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from types import TracebackType
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

from emoserve.constants import STREAM_PATH
from emoserve.inference.protocol import END, FLUSH, End, Flush, StreamMessage, StreamOptions, TurnId

# A server still starting answers the upgrade once it is ready or has given up waiting (its ready_wait_s)
OPEN_TIMEOUT_S = 30.0


class StreamRefused(Exception):
    """The server answered the upgrade with an HTTP error instead of a stream: 401 (the API key), 503 (not
    ready, draining, or at its max_streams; try again later)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status} {body}".strip())
        self.status, self.body = status, body


class StreamClosed(Exception):
    """The server has closed the stream: nothing more can be sent (its last message says why)."""


def stream_url(server: str, options: StreamOptions | None = None) -> str:
    """ws[s]://HOST:PORT[/PREFIX]/v1/stream?OPTIONS for a server's address (http[s] is taken as ws[s];
    the route is added unless it is there)."""
    parts = urlsplit(server)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"the server is {server!r}; give ws://HOST:PORT (or wss://)")
    path = parts.path.rstrip("/")
    path = path if path.endswith(STREAM_PATH) else f"{path}{STREAM_PATH}"
    query = urlencode(options.to_query()) if options is not None else ""
    return urlunsplit((scheme, parts.netloc, path, query, ""))


class StreamClient:
    """One open stream (`connect` opens it)."""

    def __init__(self, connection: ClientConnection) -> None:
        self._connection = connection

    @classmethod
    async def connect(
        cls,
        server: str,
        options: StreamOptions | None = None,
        *,
        api_key: str | None = None,
        open_timeout: float = OPEN_TIMEOUT_S,
    ) -> StreamClient:
        """Open a stream on `server` (ws://HOST:PORT). Raises StreamRefused when the server answers with an
        HTTP error, OSError (ConnectionError, TimeoutError) when it cannot be reached."""
        headers = {"X-API-Key": api_key} if api_key else None
        try:
            connection = await connect(
                stream_url(server, options),
                additional_headers=headers,
                max_size=None,  # the server's messages are small; its limit is on what it receives
                open_timeout=open_timeout,
            )
        except InvalidStatus as err:
            body = err.response.body.decode("utf-8", "replace").strip() if err.response.body else ""
            raise StreamRefused(err.response.status_code, body) from None
        except InvalidURI as err:
            raise ValueError(str(err)) from None
        return cls(connection)

    async def send(self, pcm: bytes) -> None:
        """Audio as the options describe it (whole frames: every channel of the last sample)."""
        await self._send(pcm)

    async def flush(self, turn_id: TurnId | None = None) -> None:
        """Close the open utterance (with vad=off: the turn) now: its `segment` comes back with `turn_id`."""
        message = Flush(type=FLUSH) if turn_id is None else Flush(type=FLUSH, turn_id=turn_id)
        await self._send(json.dumps(message))

    async def end(self) -> None:
        """The source has ended: the server scores what is left, sends the summary and closes."""
        await self._send(json.dumps(End(type=END)))

    async def _send(self, message: bytes | str) -> None:
        try:
            await self._connection.send(message)
        except ConnectionClosed:
            raise StreamClosed(f"the server closed the stream (code {self.close_code})") from None

    async def __aiter__(self) -> AsyncIterator[StreamMessage]:
        """The server's messages as they come, until it closes the stream."""
        with contextlib.suppress(ConnectionClosed):  # a close without its closing handshake ends them too
            async for raw in self._connection:
                yield json.loads(raw)

    @property
    def close_code(self) -> int | None:
        """How the server closed the stream, None while it is open: 1000 a normal end after `end`, else
        the fatal `error` message's close (docs/streaming.md, "Close codes")."""
        return self._connection.close_code

    async def close(self) -> None:
        await self._connection.close()

    async def __aenter__(self) -> StreamClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()
