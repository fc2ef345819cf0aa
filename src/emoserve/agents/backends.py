"""Where a turn reader's audio is scored: in this process, or on an emoserve server. Both speak the live
stream's protocol (docs/streaming.md) with client-driven turns (`vad=off`, `flush`), so the reader
cannot tell them apart.

    LocalBackend(model)   one model per process, shared by every session in it: the server's own served
                          stream (serving/live.py: the cut on a thread, back-pressure) on one batching
                          engine per model (serving/engine.py: a worker thread, a bounded queue, a turn's
                          segment before other sessions' interim readings)
    RemoteBackend(url)    GET /v1/stream on an emoserve server or a Ray Serve cluster, one WebSocket per
                          session (inference/stream_client.py)
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from emoserve.errors import EmoserveError
from emoserve.inference.protocol import ReadyMessage, StreamMessage, StreamOptions, TurnId
from emoserve.inference.stream_client import StreamClient
from emoserve.serving.engine import Engine, Priority
from emoserve.serving.live import LiveStream, engine_pieces
from emoserve.serving.metrics import Metrics
from emoserve.serving.settings import Settings
from emoserve.serving.startup import start_engine

if TYPE_CHECKING:
    from emoserve.audio.decode import Audio
    from emoserve.inference.recognizer import Recognizer
    from emoserve.inference.results import Result
    from emoserve.model.head import Head


class Session(Protocol):
    """One open stream with client-driven turns."""

    ready: ReadyMessage

    async def send(self, pcm: bytes) -> None: ...

    async def flush(self, turn_id: TurnId) -> None: ...

    def messages(self) -> AsyncIterator[StreamMessage]: ...

    async def close(self) -> None: ...


class Backend(Protocol):
    async def open(self, options: StreamOptions) -> Session: ...


# ------------------------------------------------------------------------------------------ in-process

_ENGINES: dict[int, tuple[Recognizer, Engine, Metrics]] = {}  # id(recognizer) -> its one engine
_ENGINES_LOCK = threading.Lock()


def shared_engine(recognizer: Recognizer) -> tuple[Engine, Metrics]:
    """The one engine (started) and metrics of `recognizer` in this process: every session on it shares
    its worker thread and queue (the server's defaults: serving/settings.py)."""
    with _ENGINES_LOCK:
        if id(recognizer) not in _ENGINES:
            settings = Settings()
            metrics = Metrics(max_queue=settings.max_queue)
            _ENGINES[id(recognizer)] = (recognizer, start_engine(settings, recognizer, metrics), metrics)
        _, engine, metrics = _ENGINES[id(recognizer)]
        return engine, metrics


class LocalBackend:
    """Scoring in this process. `model`: a loaded `Recognizer`, or a name or directory to load (once per
    process and name: the first session loads it, on a thread); `head`: a head of your own labels
    (`Head.load(DIR)`), its result on every reading."""

    def __init__(
        self, model: Recognizer | str | os.PathLike[str] | None = None, *, head: Head | None = None
    ) -> None:
        self.model = model
        self.head = head
        self._recognizer = None if model is None or isinstance(model, str | os.PathLike) else model

    async def recognizer(self) -> Recognizer:
        if self._recognizer is None:
            assert self.model is None or isinstance(self.model, str | os.PathLike)
            self._recognizer = await asyncio.to_thread(_load_once, self.model)
        recognizer = self._recognizer
        if self.head is not None:
            self.head.check_model(recognizer.info)
        return recognizer

    async def open(self, options: StreamOptions) -> Session:
        recognizer = await self.recognizer()
        engine, metrics = shared_engine(recognizer)
        head = self.head
        # the stream's label subset and abstain threshold, as the server reads its results out
        chosen = recognizer.readout(options.labels, options.min_confidence)
        labels = {label.en: label for label in recognizer.labels}

        def read_out(result: Result) -> Result:  # a result with its embedding, read out as the server does
            from emoserve.inference.heads import with_head
            from emoserve.serving.heads import read_out_counted

            if head is not None:
                result = with_head(result, head, keep_embedding=False)
            elif result.embedding is not None:  # a turn read in pieces: its pooled embedding
                result = dataclasses.replace(result, embedding=None)
            return read_out_counted(result, chosen, labels, head, None, None)

        async def score(audio: Audio, interim: bool) -> Result:
            priority = Priority.STREAM_INTERIM if interim else Priority.STREAM_SEGMENT
            return read_out(await engine.submit(audio, "utterance", head is not None, priority=priority))

        live = LiveStream(
            options,
            score,
            tag=recognizer.tag,
            labels=[label.to_dict() for label in recognizer.labels],
            metrics=metrics,
            pieces=engine_pieces(engine, read_out),
        )
        return LocalSession(live)


_LOAD_LOCK = threading.Lock()
_LOADED: dict[str, Recognizer] = {}


def _load_once(model: str | os.PathLike[str] | None) -> Recognizer:
    """`load_model(model)`, once per process for each name or directory."""
    from emoserve.inference.recognizer import load_model

    key = os.fspath(model) if model is not None else ""
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = load_model(model, progress=False)
        return _LOADED[key]


class LocalSession:
    def __init__(self, live: LiveStream) -> None:
        self.live = live
        self.ready = live.ready_message

    async def send(self, pcm: bytes) -> None:
        await self.live.feed(pcm)

    async def flush(self, turn_id: TurnId) -> None:
        await self.live.flush(turn_id)

    def messages(self) -> AsyncIterator[StreamMessage]:
        return self.live.messages_out()

    async def close(self) -> None:
        await self.live.close()


# ---------------------------------------------------------------------------------------------- remote


class RemoteBackend:
    """Scoring on an emoserve server: `url` ws://HOST:PORT (or the server's http:// address); `head` a
    head the server serves (`serve --head NAME=DIR`)."""

    def __init__(self, url: str, *, api_key: str | None = None, head: str | None = None) -> None:
        self.url, self.api_key, self.head = url, api_key, head

    async def open(self, options: StreamOptions) -> Session:
        if self.head is not None:
            options = dataclasses.replace(options, head=self.head)
        client = await StreamClient.connect(self.url, options, api_key=self.api_key)
        messages = aiter(client)
        try:
            first = await anext(messages, None)
        except BaseException:  # cancelled while the server answers: the connection is not left open
            await client.close()
            raise
        if first is None or first["type"] != "ready":
            await client.close()
            said = first["message"] if first is not None and first["type"] == "error" else "nothing"
            raise EmoserveError(
                f"the server at {self.url} refused the stream: {said}", code="invalid_parameter"
            )
        return RemoteSession(client, first, messages)


class RemoteSession:
    def __init__(
        self, client: StreamClient, ready: ReadyMessage, messages: AsyncIterator[StreamMessage]
    ) -> None:
        self.client, self.ready, self._messages = client, ready, messages

    async def send(self, pcm: bytes) -> None:
        await self.client.send(pcm)

    async def flush(self, turn_id: TurnId) -> None:
        await self.client.flush(turn_id)

    def messages(self) -> AsyncIterator[StreamMessage]:
        return self._messages

    async def close(self) -> None:
        await self.client.close()


def backend_for(
    model: Recognizer | str | os.PathLike[str] | None = None,
    *,
    url: str | None = None,
    api_key: str | None = None,
    head: Head | str | None = None,
) -> Backend:
    """In-process for `model` (a loaded Recognizer, a name or a directory; None: the default model), or
    remote for `url` (ws://HOST:PORT). `head`: in-process a `Head` or its directory, remote the name of
    a head the server serves."""
    if url is not None:
        if model is not None:
            raise ValueError("give model= (scored in this process) or url= (an emoserve server), not both")
        if head is not None and not isinstance(head, str):
            raise ValueError(
                "with url=, head= is the name of a head the server serves (serve --head NAME=DIR)"
            )
        return RemoteBackend(url, api_key=api_key, head=head)
    if isinstance(head, str):
        from emoserve.model.head import Head

        head = Head.load(head)
    return LocalBackend(model, head=head)
