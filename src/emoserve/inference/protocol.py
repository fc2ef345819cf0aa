"""The live stream's protocol (docs/streaming.md) as types: what a client chooses (`StreamOptions`, with its
own checks: `StreamOptions.from_query`), and one typed message per `type` each way.

    client -> server: binary PCM, and the text messages `End` and `Flush` (`parse_control`)
    server -> client: `ReadyMessage`, `SpeechStartMessage`, `InterimMessage`, `SegmentMessage`,
                      `SummaryMessage`, `ErrorMessage`; each with `type` and `seq` (0, 1, 2, ... per stream)

Every surface speaks it through these names: the route (api/stream.py), the served stream
(serving/live.py), the library's session and its message builders (inference/live.py), the stream client
(`emoserve stream`), the Live tab, the tests. A consumer matches on `message["type"]`, which narrows the
union to one message's fields. The server imports it with its first stream, not at start (numpy comes
with VadSettings).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict, get_args

from emoserve.audio.vad import DEFAULT_VAD, VAD_PARAMETERS, VadSettings
from emoserve.constants import (
    FALSE_WORDS,
    GRANULARITIES,
    SAMPLE_RATE,
    STREAM_CHUNK_S_RANGE,
    STREAM_ENCODINGS,
    STREAM_HOP_S,
    STREAM_HOP_S_RANGE,
    STREAM_MAX_CHANNELS,
    STREAM_MAX_WINDOW_S,
    STREAM_SAMPLE_RATES,
    STREAM_WINDOW_S,
    TRUE_WORDS,
    Granularity,
)

if TYPE_CHECKING:
    from emoserve.audio.live import LiveCutter

# ------------------------------------------------------------------------------------------- options

BYTES_PER_SAMPLE = {"pcm_s16le": 2, "pcm_f32le": 4}  # of STREAM_ENCODINGS
AUTH_PARAMETER = "api_key"  # read by the API key middleware, for clients that cannot set headers
VAD_PARAMETER = "vad"  # on (the server's VAD cuts utterances) or off (the client's `flush` cuts turns)
MAX_TURN_ID_CHARS = 128


@dataclass(frozen=True)
class StreamOptions:
    """What a client chooses for its stream (the query parameters of GET /v1/stream), checked when made
    (ValueError naming the option)."""

    sample_rate: int = SAMPLE_RATE
    encoding: str = "pcm_s16le"
    channels: int = 1
    hop_s: float = STREAM_HOP_S
    window_s: float = STREAM_WINDOW_S
    vad: VadSettings = DEFAULT_VAD
    granularity: Granularity = "utterance"
    embedding: bool = False
    head: str | None = None
    labels: str | None = None  # a label subset (comma-separated or a named set): checked by the scorer
    min_confidence: float | None = None  # under it a reading's top label is `uncertain`
    use_vad: bool = True  # the query's vad=on|off; off: the client's `flush` messages cut the turns
    chunk_s: float = 0.0  # vad=off: a turn scored in pieces of this many seconds as it arrives (0: whole)

    def __post_init__(self) -> None:
        self.check()

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> StreamOptions:
        """The query parameters of GET /v1/stream (strings), each checked: ValueError naming it."""
        known = {
            *(f.name for f in fields(cls) if f.name not in ("vad", "use_vad")),
            *VAD_PARAMETERS,
            VAD_PARAMETER,
            AUTH_PARAMETER,
        }
        if unknown := sorted(set(query) - known):
            raise ValueError(
                f"unknown parameter {unknown[0]!r}; the parameters are {', '.join(sorted(known))}"
            )
        granularity = query.get("granularity", "utterance")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity is {granularity!r}; choose from {', '.join(GRANULARITIES)}")
        return cls(
            sample_rate=_number(query, "sample_rate", SAMPLE_RATE, int),
            encoding=query.get("encoding", "pcm_s16le"),
            channels=_number(query, "channels", 1, int),
            hop_s=_number(query, "hop_s", STREAM_HOP_S, float),
            window_s=_number(query, "window_s", STREAM_WINDOW_S, float),
            vad=VadSettings(
                **{
                    attribute: _number(query, name, getattr(DEFAULT_VAD, attribute), float)
                    for name, attribute in VAD_PARAMETERS.items()
                }
            ),
            granularity=granularity,  # checked above
            embedding=_boolean(query, "embedding"),
            head=query.get("head"),
            labels=query.get("labels") or None,
            min_confidence=_number(query, "min_confidence", None, float),
            use_vad=_boolean(query, VAD_PARAMETER, default=True, words="on or off"),
            chunk_s=_number(query, "chunk_s", 0.0, float),
        )

    def to_query(self) -> dict[str, str]:
        """The options as GET /v1/stream's query parameters (what a client sends): the inverse of
        `from_query`, with every parameter named (but chunk_s at 0, so that a server from before it
        takes the stream)."""
        named = self.to_dict()
        if not self.chunk_s:
            del named["chunk_s"]
        return {name: _word(value) for name, value in named.items() if value is not None}

    def check(self) -> None:
        """ValueError naming the option that is out of range."""
        low, high = STREAM_SAMPLE_RATES
        if not low <= self.sample_rate <= high:
            raise ValueError(f"sample_rate is {self.sample_rate}; it must be {low}-{high}")
        if self.encoding not in STREAM_ENCODINGS:
            raise ValueError(f"encoding is {self.encoding!r}; choose from {', '.join(STREAM_ENCODINGS)}")
        if not 1 <= self.channels <= STREAM_MAX_CHANNELS:
            raise ValueError(f"channels is {self.channels}; it must be 1-{STREAM_MAX_CHANNELS}")
        shortest, longest = STREAM_HOP_S_RANGE
        if not shortest <= self.hop_s <= longest:
            raise ValueError(f"hop_s is {self.hop_s:g}; it must be {shortest:g}-{longest:g}")
        if not self.hop_s <= self.window_s <= STREAM_MAX_WINDOW_S:
            raise ValueError(
                f"window_s is {self.window_s:g}; it must be hop_s ({self.hop_s:g}) to {STREAM_MAX_WINDOW_S:g}"
            )
        if self.min_confidence is not None and not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence is {self.min_confidence:g}; it must be 0-1")
        if self.chunk_s:
            shortest, longest = STREAM_CHUNK_S_RANGE
            if not shortest <= self.chunk_s <= longest:
                raise ValueError(
                    f"chunk_s is {self.chunk_s:g}; it must be 0 (a turn scored whole) or "
                    f"{shortest:g}-{longest:g}"
                )
            if self.use_vad:
                raise ValueError("chunk_s reads the client's turns in pieces: it needs vad=off")
            if self.granularity != "utterance":
                raise ValueError("chunk_s gives a turn's utterance reading: it needs granularity=utterance")

    def cutter(self) -> LiveCutter:
        from emoserve.audio.live import LiveCutter

        return LiveCutter(
            sample_rate=self.sample_rate,
            encoding=self.encoding,
            channels=self.channels,
            vad=self.vad,
            hop_s=self.hop_s,
            window_s=self.window_s,
            client_turns=not self.use_vad,
            chunk_s=self.chunk_s,
        )

    def seconds(self, n_bytes: int) -> float:
        """Seconds of audio in `n_bytes` of the stream's PCM."""
        return n_bytes / (BYTES_PER_SAMPLE[self.encoding] * self.channels * self.sample_rate)

    def to_dict(self) -> dict[str, Any]:
        """The effective parameters (`ready`'s `parameters`): every one, defaults included."""
        return {
            "sample_rate": self.sample_rate,
            "encoding": self.encoding,
            "channels": self.channels,
            "hop_s": self.hop_s,
            "window_s": self.window_s,
            **{name: getattr(self.vad, attribute) for name, attribute in VAD_PARAMETERS.items()},
            "granularity": self.granularity,
            "embedding": self.embedding,
            "head": self.head,
            "labels": self.labels,
            "min_confidence": self.min_confidence,
            VAD_PARAMETER: "on" if self.use_vad else "off",
            "chunk_s": self.chunk_s,
        }


def _number(query: Mapping[str, str], name: str, default: Any, kind: type) -> Any:
    if name not in query:
        return default
    try:
        return kind(query[name])
    except ValueError:
        raise ValueError(f"{name} is {query[name]!r}; it must be a number") from None


def _boolean(
    query: Mapping[str, str], name: str, default: bool = False, words: str = "true or false"
) -> bool:
    if name not in query:
        return default
    word = query[name].strip().lower()
    if word not in TRUE_WORDS | FALSE_WORDS:
        raise ValueError(f"{name} is {query[name]!r}; use {words}")
    return word in TRUE_WORDS


def _word(value: Any) -> str:
    return (
        str(value).lower()
        if isinstance(value, bool)
        else f"{value:g}"
        if isinstance(value, float)
        else str(value)
    )


# ------------------------------------------------------------------------------------------ messages

MessageType = Literal["ready", "speech_start", "interim", "segment", "summary", "error"]
MESSAGE_TYPES: tuple[MessageType, ...] = get_args(MessageType)
END: Literal["end"] = "end"
FLUSH: Literal["flush"] = "flush"
TurnId = str | int  # a client's name for a turn, echoed in the answer to its `flush`


class End(TypedDict):
    """client -> server: no more audio; the open utterance's segment and the summary follow."""

    type: Literal["end"]


class Flush(TypedDict):
    """client -> server: close the open utterance (with vad=off: the turn) now; its `segment` follows,
    with this `turn_id` (or, when there is nothing to score, an `error` with it). The stream goes on."""

    type: Literal["flush"]
    turn_id: NotRequired[TurnId]  # a string or an integer, at most 128 characters: echoed


ControlMessage = End | Flush
CONTROL_MESSAGES: dict[str, type] = {END: End, FLUSH: Flush}  # client -> server text messages


def parse_control(raw: str) -> ControlMessage:
    """A client's text message, checked: ValueError saying what is wrong and what the messages are."""
    try:
        message = json.loads(raw)
    except ValueError:
        raise ValueError(f"a text message that is not JSON: {raw[:80]!r}") from None
    kind = message.get("type") if isinstance(message, dict) else None
    if kind == END:
        return End(type=END)
    if kind != FLUSH:
        raise ValueError(
            f'unknown message type {kind!r}: the messages are {{"type": "{END}"}} and '
            f'{{"type": "{FLUSH}", "turn_id": ...}}'
        )
    if "turn_id" not in message:
        return Flush(type=FLUSH)
    turn_id = message["turn_id"]
    if (
        isinstance(turn_id, bool)
        or not isinstance(turn_id, str | int)
        or len(str(turn_id)) > MAX_TURN_ID_CHARS
    ):
        raise ValueError(
            f"flush's turn_id is {str(turn_id)[:80]!r}: it must be a string or an integer of at most "
            f"{MAX_TURN_ID_CHARS} characters; the flush was left out"
        )
    return Flush(type=FLUSH, turn_id=turn_id)


class ReadyMessage(TypedDict):
    """First, once the stream is accepted."""

    type: Literal["ready"]
    seq: int
    session_id: str  # hex
    model: str  # its name
    random_weights: bool  # true: a test model, its readings are meaningless
    backend: str  # the runtime that scores the stream: onnx, openvino, torch
    dtype: str  # its precision: float32, bfloat16, float16, int8
    labels: list[dict[str, str]]  # [{en, zh, emoji}]: the order of every `scores`
    parameters: dict[str, Any]  # the effective parameters, defaults included (StreamOptions.to_dict)


class SpeechStartMessage(TypedDict):
    """The VAD opened an utterance."""

    type: Literal["speech_start"]
    seq: int
    start_s: float


class InterimMessage(TypedDict):
    """Every `hop_s` of speech while an utterance is open (best effort: skipped when scoring lags)."""

    type: Literal["interim"]
    seq: int
    start_s: float  # the reading's window: the utterance's last window_s
    end_s: float
    emotion: str
    label_zh: str
    emoji: str
    confidence: float
    scores: dict[str, float]  # label -> probability
    head: NotRequired[dict[str, Any]]  # with ?head=
    skipped: int  # interims skipped so far in this stream


class SegmentMessage(TypedDict):
    """An utterance ended (a pause, a cut at max_segment_s, `flush` or `end`): a /v1/timeline segment's
    fields."""

    type: Literal["segment"]
    seq: int
    start_s: float
    end_s: float
    speaker: str | None  # null
    emotion: str
    label_zh: str
    emoji: str
    confidence: float
    scores: dict[str, float]
    split: bool  # true: long speech cut here
    head: dict[str, Any] | None  # null without ?head=; a regression head's `values`
    calibrated: bool  # the scores are a served calibration's
    skipped: int
    frames: NotRequired[list[dict[str, Any]]]  # with granularity=frame
    embedding: NotRequired[list[float]]  # with embedding=true
    turn_id: NotRequired[TurnId]  # the answer to a `flush` that named its turn
    pieces: NotRequired[int]  # with chunk_s: the turn was read in this many pieces, its reading pools them


class SummaryMessage(TypedDict):
    """After `end`, and before a fatal error's close: the timeline's summary line."""

    type: Literal["summary"]
    seq: int
    file: str  # "<stream>"
    duration_s: float  # audio received
    speech_s: float
    model: str
    random_weights: bool
    backend: str
    dtype: str
    channels: str  # "mix"
    vad: dict[str, Any] | None  # the VAD parameters
    summary: dict[str, Any]  # speech_s, segments, distribution, seconds, dominant: as /v1/timeline's


class ErrorMessage(TypedDict):
    """A bad message, a limit, a failure (docs/streaming.md's error table)."""

    type: Literal["error"]
    seq: int
    code: str  # from errors.CODES
    message: str  # what happened and what to do
    fatal: bool  # true: the server closes next
    turn_id: NotRequired[TurnId]  # the answer to a `flush` that named its turn and had nothing to score


StreamMessage = (
    ReadyMessage | SpeechStartMessage | InterimMessage | SegmentMessage | SummaryMessage | ErrorMessage
)
Reading = (
    InterimMessage | SegmentMessage
)  # a reading of the emotion: the open utterance's, or a finished one's
MESSAGES: dict[MessageType, type] = {
    "ready": ReadyMessage,
    "speech_start": SpeechStartMessage,
    "interim": InterimMessage,
    "segment": SegmentMessage,
    "summary": SummaryMessage,
    "error": ErrorMessage,
}


def is_fatal(message: StreamMessage) -> bool:
    """An error after which the server closes the stream."""
    return message["type"] == "error" and message["fatal"]
