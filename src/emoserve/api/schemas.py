"""The documented shapes of the API (OpenAPI at /docs): results, errors and the audio request body.

The result models are the HTTP face of `inference.results`' types, field for field (`RESULT_MODELS`; a
test fails when a result type gains a field its model lacks), plus fields only HTTP has (`http_only`).
The routes answer with the result types' own `to_dict()`; these models document it.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from emoserve.constants import Channels, Granularity
from emoserve.errors import CODES
from emoserve.inference.results import FrameResult, HeadResult, Result, Timeline, TimelineSegment


class ResultModel(BaseModel):
    http_only: ClassVar[frozenset[str]] = frozenset()  # fields that the result type does not have


class FrameOut(ResultModel):
    start_s: float
    end_s: float
    emotion: str
    confidence: float
    scores: dict[str, float]


class HeadOut(ResultModel):
    name: str = Field(description="the head asked for (`head=NAME`); /v1/model lists the served ones")
    label: str
    confidence: float
    scores: dict[str, float] = Field(description="the head's label -> probability, in its label order")
    label_zh: str | None
    emoji: str | None


class TimingOut(BaseModel):
    decode_s: float
    queue_s: float
    inference_s: float
    total_s: float


class RecognitionOut(ResultModel):
    http_only: ClassVar[frozenset[str]] = frozenset({"timing"})

    emotion: str
    label_zh: str
    emoji: str
    confidence: float
    scores: dict[str, float]
    duration_s: float
    granularity: Granularity
    model: str
    random_weights: bool
    backend: str = Field(description="the runtime that scored it: onnx, openvino, torch (as chosen)")
    dtype: str = Field(description="its precision: float32, bfloat16, float16, int8 (as chosen)")
    frames: list[FrameOut] | None
    embedding: list[float] | list[list[float]] | None  # (dim,) utterance, (frames, dim) frame
    head: HeadOut | None = Field(description="with `head=NAME`: your own labels on the clip, else null")
    timing: TimingOut


class TimelineSegmentOut(ResultModel):
    start_s: float
    end_s: float
    speaker: str | None
    emotion: str
    label_zh: str
    emoji: str
    confidence: float
    scores: dict[str, float]
    split: bool = Field(description="a piece of speech longer than max_segment_s")
    head: HeadOut | None = Field(description="with `head=NAME`: your own labels on the segment, else null")


class TimelineOut(ResultModel):
    file: str
    duration_s: float
    speech_s: float
    model: str
    random_weights: bool
    backend: str = Field(description="the runtime that scored it: onnx, openvino, torch (as chosen)")
    dtype: str = Field(description="its precision: float32, bfloat16, float16, int8 (as chosen)")
    channels: Channels
    vad: dict[str, Any] | None = Field(description="the VAD settings; null when you gave the segments")
    segments: list[TimelineSegmentOut]
    summary: dict[str, Any] = Field(
        description="over the speech: speech_s, segments, distribution (time-weighted mean scores), "
        "seconds (on top, per emotion), dominant; the same per speaker under `speakers`; with `head=NAME`, "
        "`head`: its name and the same figures for its labels"
    )


RESULT_MODELS: dict[type, type[ResultModel]] = {
    Result: RecognitionOut,
    FrameResult: FrameOut,
    TimelineSegment: TimelineSegmentOut,
    HeadResult: HeadOut,
    Timeline: TimelineOut,
}

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
