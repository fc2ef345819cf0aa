"""A turn reader: a voice agent's user audio in, one emotion reading per user turn out, within the turn's
time budget. The framework's VAD decides the turns, not ours.

    feed(pcm, sample_rate, channels)     as the audio arrives (any rate and channel count, 16-bit PCM)
    speech_started(ago_s)                the framework's VAD heard speech start `ago_s` ago
    turn = speech_stopped()              ... and stop: the turn (None when shorter than min_speech_s)
    reading = await turn.reading()       the turn's reading, or at `timeout` after "stopped" the newest
                                         interim reading (marked `interim`), or None

Under the hood a turn is a live stream's client-driven turn (docs/streaming.md: `vad=off`, `flush`): the
turn's audio goes to the backend while the user speaks (after its first min_speech_s, so a short turn
costs nothing) and is read in pieces of `chunk_s` as it comes (`chunk_s`: each piece's frames, each with
a second of the turn before it as context; an interim reading pooling the pieces so far after each), so
that at "stopped" a `flush` leaves only the last piece to score: the turn's reading pools the frames of
all its pieces, one short model call after "stopped" whatever the turn's length. A turn no longer than
chunk_s is scored whole, as /v1/recognize scores the same audio; `chunk_s=0` scores every turn whole
(exact, one model call on the whole turn after "stopped") with interim readings over the last `window_s`
every `hop_s`. Sending and receiving run on tasks of their own, so `feed` and the VAD calls return at
once and never hold up the framework's pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from emoserve.agents.backends import Backend, Session
from emoserve.agents.reading import EmotionReading
from emoserve.inference.protocol import InterimMessage, Reading, ReadyMessage, StreamOptions

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 0.3  # after "stopped": the 250-500 ms to the final transcript (issue 25)
DEFAULT_MIN_SPEECH_S = 0.8  # shorter turns get no reading (Pipecat's Voice Reader's minimum)
DEFAULT_CHUNK_S = 2.0  # a turn read in pieces of this many seconds: at "stopped" at most this much is left
DEFAULT_HOP_S = 0.5  # chunk_s=0: an interim reading every this much of a turn (the fallback's age)
DEFAULT_WINDOW_S = 8.0  # chunk_s=0: an interim reading covers the turn's last this many seconds
MAX_PREROLL_S = 1.0  # audio kept from before "started", for a VAD that tells the start late
MAX_MESSAGE_BYTES = 1 << 19  # audio sent at once: under the stream's 1 MiB
RETRY_S = 1.0  # after a backend that could not be reached, the next try waits this long


@dataclass
class Turn:
    """One user turn, from "started" to "stopped"; `await reading()` for its emotion."""

    number: int
    start_s: float
    end_s: float
    stopped_at: float  # time.monotonic() at "stopped"
    timeout: float
    interim: InterimMessage | Reading | None = None  # the newest interim reading of the turn
    ready: ReadyMessage | None = None  # of the session that reads it
    _final: asyncio.Future[tuple[Reading | None, float]] = field(default_factory=asyncio.Future)
    _read: asyncio.Task[EmotionReading | None] | None = None

    @property
    def turn_id(self) -> str:
        return f"turn-{self.number}"

    async def reading(self) -> EmotionReading | None:
        """The turn's own reading when it comes within `timeout` of "stopped"; else the newest interim
        reading (`interim=True`) or None. The same answer for every caller; a caller cancelled while it
        waits (an interruption) leaves it to the others."""
        if self._read is None:
            self._read = asyncio.ensure_future(self._wait())
        return await asyncio.shield(self._read)

    async def _wait(self) -> EmotionReading | None:
        remaining = self.stopped_at + self.timeout - time.monotonic()
        final, arrived = None, 0.0
        with contextlib.suppress(TimeoutError):
            final, arrived = await asyncio.wait_for(asyncio.shield(self._final), max(remaining, 0.0))
        return self._made(final, arrived)

    def _made(self, final: Reading | None, arrived: float) -> EmotionReading | None:
        message, interim = (final, False) if final is not None else (self.interim, True)
        if message is None or self.ready is None:
            return None
        return EmotionReading.from_message(
            message,
            start_s=self.start_s,
            end_s=self.end_s,
            latency_s=(arrived if final is not None else time.monotonic()) - self.stopped_at,
            interim=interim,
            random_weights=self.ready["random_weights"],
            model=self.ready["model"],
            turn=self.number,
        )

    def _answer(self, message: Reading | None) -> None:
        if not self._final.done():
            self._final.set_result((message, time.monotonic()))


@dataclass
class _Open:
    """The turn being spoken: its start, and its audio until it has min_speech_s (then it is sent)."""

    start_s: float
    held: list[bytes] = field(default_factory=list)
    sent: bool = False


Command = (
    tuple[Literal["audio"], bytes] | tuple[Literal["flush"], Turn] | tuple[Literal["discard", "format"], None]
)


class TurnReader:
    """One conversation's user audio (one track): one reading per user turn. Make it inside the running
    event loop; `close()` when the conversation ends."""

    def __init__(
        self,
        backend: Backend,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        min_speech_s: float = DEFAULT_MIN_SPEECH_S,
        chunk_s: float = DEFAULT_CHUNK_S,
        hop_s: float = DEFAULT_HOP_S,
        window_s: float = DEFAULT_WINDOW_S,
    ) -> None:
        if not timeout >= 0 or not min_speech_s >= 0:
            raise ValueError(f"timeout ({timeout}) and min_speech_s ({min_speech_s}) must be 0 or more")
        self.backend = backend
        self.timeout, self.min_speech_s = timeout, min_speech_s
        self._base = StreamOptions(hop_s=hop_s, window_s=window_s, use_vad=False, chunk_s=chunk_s)
        self._options: StreamOptions | None = None  # the format of the audio being fed
        self.clock_s = 0.0  # seconds of audio fed
        self._preroll: deque[bytes] = deque()
        self._open: _Open | None = None
        self._turns = 0
        self._commands: asyncio.Queue[Command] = asyncio.Queue()
        self._sender: asyncio.Task[None] | None = None
        # the receiving side, on the sender's session
        self._session: Session | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._answers: deque[Turn | None] = deque()  # flushes sent, in order (None: a discarded turn)
        self._open_interim: Reading | None = None  # the newest interim reading of the turn being sent
        self._retry_at = 0.0
        self.closed = False

    # ------------------------------------------------------------------------------ what the VAD says

    def feed(self, pcm: bytes, sample_rate: int, channels: int = 1) -> None:
        """16-bit PCM as it arrives (interleaved channels). A change of rate or channels ends the turn
        being spoken (it gets no reading) and opens a new stream for the new format."""
        options = self._format(sample_rate, channels)
        self.clock_s += options.seconds(len(pcm))
        if self._open is None:
            self._preroll.append(pcm)
            while len(self._preroll) > 1 and options.seconds(sum(map(len, self._preroll))) > MAX_PREROLL_S:
                self._preroll.popleft()
        elif self._open.sent:
            self._send(pcm)
        else:
            self._open.held.append(pcm)
            self._send_when_long_enough()

    def speech_started(self, ago_s: float = 0.0) -> None:
        """The user started speaking `ago_s` seconds ago (a VAD tells it once it is sure: Pipecat's
        `start_secs`); that much of the audio before is taken into the turn (at most MAX_PREROLL_S)."""
        if self._open is not None:
            return
        taken: list[bytes] = []
        if self._options is not None:
            while self._preroll and self._options.seconds(sum(map(len, taken))) < min(ago_s, MAX_PREROLL_S):
                taken.insert(0, self._preroll.pop())
        self._preroll.clear()
        seconds = self._options.seconds(sum(map(len, taken))) if self._options is not None else 0.0
        self._open = _Open(start_s=self.clock_s - seconds, held=taken)
        self._send_when_long_enough()

    def speech_stopped(self) -> Turn | None:
        """The user stopped: the turn, whose `reading()` comes within `timeout` from now; None for a turn
        shorter than min_speech_s (or no turn started)."""
        opened, self._open = self._open, None
        if opened is None or not opened.sent:
            return None
        self._turns += 1
        turn = Turn(self._turns, opened.start_s, self.clock_s, time.monotonic(), self.timeout)
        self._command(("flush", turn))
        return turn

    def reset(self) -> None:
        """Forget the turn being spoken (an interruption); while the user still speaks, a new turn starts
        now."""
        if self._open is None:
            return
        if self._open.sent:
            self._command(("discard", None))
        self._open = _Open(start_s=self.clock_s)

    def latest(self) -> EmotionReading | None:
        """The newest interim reading of the turn being spoken (for a UI), None before the first."""
        if self._open is None or self._open_interim is None or self._session is None:
            return None
        return _interim_reading(self._open_interim, self._open.start_s, self.clock_s, self._session.ready)

    async def close(self) -> None:
        self.closed = True
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        await self._drop_session()  # the session, and its receiver (whose end would forget the session)

    # ------------------------------------------------------------------------------------ the sending

    def _format(self, sample_rate: int, channels: int) -> StreamOptions:
        if self._options is None or (sample_rate, channels) != (
            self._options.sample_rate,
            self._options.channels,
        ):
            if self._options is not None:
                self._open = None
                self._preroll.clear()
                self._command(("format", None))
            self._options = dataclasses.replace(self._base, sample_rate=sample_rate, channels=channels)
        return self._options

    def _send_when_long_enough(self) -> None:
        opened = self._open
        if opened is None or opened.sent or self.clock_s - opened.start_s < self.min_speech_s:
            return
        opened.sent = True
        for pcm in opened.held:
            self._send(pcm)
        opened.held = []

    def _send(self, pcm: bytes) -> None:
        for at in range(0, len(pcm), MAX_MESSAGE_BYTES):
            self._command(("audio", pcm[at : at + MAX_MESSAGE_BYTES]))

    def _command(self, command: Command) -> None:
        if self.closed:
            raise RuntimeError("this TurnReader is closed")
        self._commands.put_nowait(command)
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_loop())

    async def _send_loop(self) -> None:
        while True:
            command = await self._commands.get()
            try:
                await self._run(command)
            except Exception as error:  # the backend failed: its turns fall back, the next opens anew
                log.warning("emotion reading: the backend failed (%s); the next turn tries again", error)
                await self._drop_session()

    async def _run(self, command: Command) -> None:
        kind, item = command
        if kind == "format":
            await self._drop_session()
            return
        session = await self._session_now()
        if kind == "audio":
            assert isinstance(item, bytes)
            if session is not None:
                await session.send(item)
        elif kind == "flush":
            assert isinstance(item, Turn)
            if session is None:
                item._answer(None)
                return
            item.ready, item.interim, self._open_interim = session.ready, self._open_interim, None
            self._answers.append(item)
            await session.flush(item.turn_id)
        elif session is not None:  # discard: flushed, and its answer left unread
            self._open_interim = None
            self._answers.append(None)
            await session.flush("discarded")

    async def _session_now(self) -> Session | None:
        if self._session is None and time.monotonic() >= self._retry_at:
            assert self._options is not None
            try:
                self._session = await self.backend.open(self._options)
            except Exception as error:
                self._retry_at = time.monotonic() + RETRY_S
                log.warning("emotion reading: the backend could not open a stream (%s)", error)
                return None
            self._receiver = asyncio.get_running_loop().create_task(self._receive(self._session))
        return self._session

    async def _drop_session(self) -> None:
        session, self._session = self._session, None
        receiver, self._receiver = self._receiver, None
        if receiver is not None and receiver is not asyncio.current_task():
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
        for turn in self._answers:
            if turn is not None:
                turn._answer(None)
        self._answers.clear()
        self._open_interim = None
        if session is not None:
            with contextlib.suppress(Exception):
                await session.close()

    # ---------------------------------------------------------------------------------- the receiving

    async def _receive(self, session: Session) -> None:
        """The session's messages: interim readings kept for the turn they read, each flush's answer given
        to its turn. A session that ends (the server went away, a fatal error) fails its turns' waits."""
        try:
            async for message in session.messages():
                if message["type"] == "interim":
                    self._interim(message)
                elif message["type"] == "segment" and "turn_id" not in message:
                    self._interim(message)  # a piece of a turn past max_segment_s: the turn's newest reading
                elif message["type"] == "segment":
                    self._answered(message)
                elif message["type"] == "error" and "turn_id" in message:
                    self._answered(None)  # the flush had nothing to score
                elif message["type"] == "error":
                    log.warning("emotion reading: %s (%s)", message["message"], message["code"])
        except Exception as error:
            log.warning("emotion reading: the stream failed (%s)", error)
        finally:
            for turn in self._answers:
                if turn is not None:
                    turn._answer(None)
            self._answers.clear()
            if self._session is session:
                self._session = None

    def _answered(self, message: Reading | None) -> None:
        turn = self._answers.popleft() if self._answers else None
        if turn is not None:
            turn._answer(message)

    def _interim(self, message: Reading) -> None:
        if self._answers:
            head = self._answers[0]
            if head is not None:
                head.interim = message
            return
        self._open_interim = message


def _interim_reading(message: Reading, start_s: float, end_s: float, ready: ReadyMessage) -> EmotionReading:
    return EmotionReading.from_message(
        message,
        start_s=start_s,
        end_s=end_s,
        latency_s=0.0,
        interim=True,
        random_weights=ready["random_weights"],
        model=ready["model"],
        turn=0,
    )
