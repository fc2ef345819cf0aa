"""The documented shapes of the API (OpenAPI at /docs): results, errors and the audio request body.

The result models are the HTTP face of `inference.results`' types, field for field (`RESULT_MODELS`; a
test fails when a result type gains a field its model lacks), plus fields only HTTP has (`http_only`).
The routes answer with the result types' own `to_dict()`; these models document it.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, ClassVar

from fastapi import Query
from pydantic import BaseModel, Field

from emoserve.constants import Channels, Granularity, HeadTask
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
    label: str | None = Field(description="a classifier head's top label; null for a regression head")
    confidence: float | None = Field(description="the top label's probability; null for a regression head")
    scores: dict[str, float] = Field(
        description="the head's label -> probability, in its label order; {} for a regression head"
    )
    label_zh: str | None
    emoji: str | None
    kind: HeadTask = Field(description="`classification` (label, scores) or `regression` (values)")
    values: dict[str, float] | None = Field(
        description="a regression head's target -> value (e.g. arousal, valence), in the units of the data "
        "it was trained on; null for a classifier head"
    )
    calibrated: bool = Field(description="the scores are the head's calibration's (train-head --calibrate)")


# The request options that choose how a result reads (inference/confidence.py), the same on /v1/recognize,
# /v1/timeline (query or form field) and /v1/stream (query)
LABELS_HELP = (
    "a label subset: the scores restricted to these labels and renormalised, e.g. angry,happy,neutral,sad, "
    "or a named set (iemocap4, emodb, ravdess); an unknown label is 422 naming the valid ones"
)
MIN_CONFIDENCE_HELP = (
    "0-1: a result whose top score is under it says `uncertain` as its emotion (and a head's label too), "
    "its scores unchanged (default: the min_confidence setting, else none)"
)
LabelsQuery = Annotated[str | None, Query(description=LABELS_HELP)]
MinConfidenceQuery = Annotated[float | None, Query(ge=0.0, le=1.0, description=MIN_CONFIDENCE_HELP)]
READOUT_FIELDS = {
    "labels": {"type": "string", "description": LABELS_HELP},
    "min_confidence": {"type": "number", "minimum": 0, "maximum": 1, "description": MIN_CONFIDENCE_HELP},
}


class TimingOut(BaseModel):
    decode_s: float
    queue_s: float
    inference_s: float
    total_s: float


class RecognitionOut(ResultModel):
    http_only: ClassVar[frozenset[str]] = frozenset({"timing"})

    emotion: str = Field(description="the top label, or `uncertain` when its score is under min_confidence")
    label_zh: str
    emoji: str
    confidence: float
    scores: dict[str, float] = Field(
        description="label -> probability, in the model's label order; with `labels`, those labels' scores "
        "renormalised; calibrated ones when `calibrated`"
    )
    duration_s: float
    granularity: Granularity
    model: str
    random_weights: bool
    backend: str = Field(description="the runtime that scored it: onnx, openvino, torch (as chosen)")
    dtype: str = Field(description="its precision: float32, bfloat16, float16, int8 (as chosen)")
    frames: list[FrameOut] | None
    embedding: list[float] | list[list[float]] | None  # (dim,) utterance, (frames, dim) frame
    head: HeadOut | None = Field(description="with `head=NAME`: your own labels on the clip, else null")
    calibrated: bool = Field(
        description="the scores are a calibration's (the server's --calibration), not the model's softmax"
    )
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
    calibrated: bool = Field(description="the scores are a calibration's (the server's --calibration)")


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
        "`head`: its name, kind and the same figures for its labels (a regression head: `values`, the "
        "time-weighted mean of each target)"
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
