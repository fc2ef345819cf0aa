"""A live stream to an emoserve server: PCM to its GET /v1/stream, the protocol's messages back
(docs/streaming.md). `emoserve stream --url` is one user; anything that has audio as it is spoken (a voice
agent, a call) can be another.

    async with await StreamClient.connect("ws://HOST:7860", {"sample_rate": 8000}, api_key=KEY) as client:
        ...                                 # one task sends:
        await client.send(pcm)              #   PCM as the options describe it, any size up to 1 MiB
        await client.end()                  #   the source has ended: the last segment and the summary follow
        async for message in client: ...    # another receives: ready, speech_start, interim, segment,
                                            # summary, error (dicts), until the server closes the stream

Sending and receiving go side by side: the server answers while the audio still comes. The options are the
route's query parameters (sample_rate, encoding, channels, hop_s, window_s, the VAD's, head...), checked by
the server: a bad one is an `error` message, then the close.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

STREAM_PATH = "/v1/stream"  # the route (api/stream.py's STREAM: the library does not import the HTTP layer)
# A server still starting answers the upgrade once it is ready or has given up waiting (its ready_wait_s)
OPEN_TIMEOUT_S = 30.0

Option = str | int | float | bool


class StreamRefused(Exception):
    """The server answered the upgrade with an HTTP error instead of a stream: 401 (the API key), 503 (not
    ready, draining, or at its max_streams; try again later)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status} {body}".strip())
        self.status, self.body = status, body


class StreamClosed(Exception):
    """The server has closed the stream: nothing more can be sent (its last message says why)."""


def stream_url(server: str, options: Mapping[str, Option] | None = None) -> str:
    """ws[s]://HOST:PORT[/PREFIX]/v1/stream?OPTIONS for a server's address (http[s] is taken as ws[s];
    the route is added unless it is there)."""
    parts = urlsplit(server)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"the server is {server!r}; give ws://HOST:PORT (or wss://)")
    path = parts.path.rstrip("/")
    path = path if path.endswith(STREAM_PATH) else f"{path}{STREAM_PATH}"
    query = urlencode({name: _query_value(value) for name, value in (options or {}).items()})
    return urlunsplit((scheme, parts.netloc, path, query, ""))


def _query_value(value: Option) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


class StreamClient:
    """One open stream (`connect` opens it)."""

    def __init__(self, connection: ClientConnection) -> None:
        self._connection = connection

    @classmethod
    async def connect(
        cls,
        server: str,
        options: Mapping[str, Option] | None = None,
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

    async def end(self) -> None:
        """The source has ended: the server scores what is left, sends the summary and closes."""
        await self._send(json.dumps({"type": "end"}))

    async def _send(self, message: bytes | str) -> None:
        try:
            await self._connection.send(message)
        except ConnectionClosed:
            raise StreamClosed(f"the server closed the stream (code {self.close_code})") from None

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
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
