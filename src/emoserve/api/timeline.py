"""POST /v1/timeline: the emotion timeline of a long recording, whole or streamed as NDJSON.

    upload (multipart `file` or raw body) -> a temporary file, never memory (max_timeline_upload_mb)
    -> Service.open_timeline (errors about the file: 4xx before any work; max_timeline_s)
    -> Service.timeline: segments through the engine as background requests, a few at a time
    -> JSON {file, duration_s, ..., segments, summary}, or with `Accept: application/x-ndjson` one line
       per segment as soon as it is scored, then a `summary` line (an error part-way: an `error` line)

A client that goes away stops its decoding and drops its queued segments.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.types import Message

from emoserve.api.app import (
    TIMELINE,
    MappedErrorsRoute,
    ServiceDep,
    audio_request_body,
    client_gone,
    error_responses,
    until_disconnected,
)
from emoserve.audio.segments import MAX_SPANS_BYTES, Recording, Span, read_spans
from emoserve.audio.stream import CHANNEL_MODES, Channels
from emoserve.audio.vad import VadSettings
from emoserve.errors import ApiError, EmoserveError
from emoserve.inference.results import TimelineSegment
from emoserve.inference.timeline import build_timeline
from emoserve.serving.service import Service

NDJSON = "application/x-ndjson"
COPY_CHUNK = 1 << 20

router = APIRouter(route_class=MappedErrorsRoute)


@dataclass
class SpooledUpload:
    path: str  # a temporary file holding the audio
    name: str
    fields: dict[str, str] = field(default_factory=dict)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


async def spool_upload(request: Request, limit_bytes: int) -> SpooledUpload:
    """The audio of a multipart `file` field or of the raw body, written to a temporary file as it
    arrives (at most `limit_bytes`); the other form fields as text."""
    too_large = ApiError("upload_too_large",
        f"the upload is over {limit_bytes / 1e6:g} MB "
        "(max_timeline_upload_mb, EMOSERVE_MAX_TIMELINE_UPLOAD_MB)",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit_bytes:
        raise too_large
    received = 0

    async def limited() -> Message:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit_bytes:
            raise too_large
        return message

    fd, path = tempfile.mkstemp(prefix="emoserve-timeline-", suffix=".upload")
    upload = SpooledUpload(path, "<request body>")
    try:
        with os.fdopen(fd, "wb") as out:
            if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
                async with Request(request.scope, limited).form(
                    max_files=2, max_fields=16, max_part_size=MAX_SPANS_BYTES
                ) as form:
                    file = form.get("file")
                    if not isinstance(file, UploadFile):
                        raise ApiError("missing_file",
                            "send the recording as the multipart field 'file' (or the raw body)",
                        )
                    upload.name = file.filename or "<file>"
                    while chunk := await file.read(COPY_CHUNK):
                        await asyncio.to_thread(out.write, chunk)
                    for key, value in form.multi_items():
                        if isinstance(value, str):
                            upload.fields[key] = value
                        elif key == "segments":  # a segments file (JSON or RTTM) beside the audio
                            data = await value.read(MAX_SPANS_BYTES + 1)
                            if len(data) > MAX_SPANS_BYTES:
                                raise ApiError("upload_too_large",
                                    f"the segments file is over {MAX_SPANS_BYTES >> 20} MB of JSON or RTTM",
                                )
                            upload.fields[key] = data.decode("utf-8", "replace")
            else:
                async for chunk in Request(request.scope, limited).stream():
                    await asyncio.to_thread(out.write, chunk)
    except ClientDisconnect:
        upload.remove()
        raise client_gone() from None
    except BaseException:
        upload.remove()
        raise
    return upload


@dataclass(frozen=True)
class TimelineOptions:
    channels: Channels
    vad: VadSettings
    spans: list[Span] | None


def timeline_options(query: dict[str, Any], fields: dict[str, str]) -> TimelineOptions:
    """Query parameters win over form fields; every value is checked here with a message that names it."""

    def pick(name: str) -> Any:
        return query[name] if query.get(name) is not None else fields.get(name)

    channels = pick("channels") or "mix"
    if channels not in CHANNEL_MODES:
        raise ApiError("invalid_parameter", f"channels is {channels!r}; choose 'mix' or 'separate'")
    vad_args: dict[str, float] = {}
    for name, key in (
        ("max_segment_s", "max_segment_s"),
        ("vad_threshold", "threshold"),
        ("min_speech_ms", "min_speech_ms"),
        ("min_silence_ms", "min_silence_ms"),
        ("pad_ms", "pad_ms"),
    ):
        raw = pick(name)
        if raw is None or raw == "":
            continue
        try:
            vad_args[key] = float(raw)
        except ValueError:
            raise ApiError("invalid_parameter", f"{name} is {raw!r}; it must be a number") from None
    try:
        vad = VadSettings(**vad_args)
    except ValueError as error:
        raise ApiError("invalid_parameter", str(error)) from None
    spans = read_spans(fields["segments"], "segments") if fields.get("segments") else None
    return TimelineOptions(cast(Channels, channels), vad, spans)


def segment_line(segment: TimelineSegment) -> bytes:
    return (json.dumps({"type": "segment", **segment.to_dict()}, ensure_ascii=False) + "\n").encode()


def timeline_body(service: Service, job: Recording, segments: list[TimelineSegment]) -> dict[str, Any]:
    return build_timeline(job, segments, service.model_name or "", bool(service.random_weights)).to_dict()


TIMELINE_BODY = audio_request_body(
    {
        "segments": {
            "type": "string",
            "description": "your own segments instead of the VAD: a JSON list of "
            "{start_s, end_s[, speaker]}, or RTTM (text or a file)",
        }
    }
)


@router.post(
    TIMELINE,
    summary="The emotion timeline of a long recording",
    description="Speech segments (silero-vad, or your `segments`) each scored as /v1/recognize would score "
    "it, and a time-weighted summary. `Accept: application/x-ndjson` streams one line per segment as it "
    "is scored, then a `summary` line. Limits: max_timeline_s, max_timeline_upload_mb.",
    responses={200: {"description": "the timeline"}, **error_responses(400, 401, 413, 415, 422, 503)},
    openapi_extra=TIMELINE_BODY,
)
async def timeline(
    request: Request,
    service: ServiceDep,
    channels: Annotated[
        Literal["mix", "separate"] | None,
        Query(description="mix (default) or separate: a timeline per channel"),
    ] = None,
    max_segment_s: Annotated[
        float | None, Query(description="longest segment; longer speech is cut (15)")
    ] = None,
    vad_threshold: Annotated[float | None, Query(description="speech probability threshold (0.5)")] = None,
    min_speech_ms: Annotated[float | None, Query(description="shortest speech kept (250)")] = None,
    min_silence_ms: Annotated[float | None, Query(description="pause that ends a segment (300)")] = None,
    pad_ms: Annotated[float | None, Query(description="padding around each segment (100)")] = None,
) -> Response:
    query = {
        "channels": channels,
        "max_segment_s": max_segment_s,
        "vad_threshold": vad_threshold,
        "min_speech_ms": min_speech_ms,
        "min_silence_ms": min_silence_ms,
        "pad_ms": pad_ms,
    }
    upload = await spool_upload(request, service.settings.max_timeline_upload_bytes)
    try:
        options = timeline_options(query, upload.fields)
        await service.wait_ready(service.settings.ready_wait_s)
        job = await asyncio.to_thread(open_job, service, upload, options)
    except BaseException:
        upload.remove()
        raise
    run = TimelineRun(service, job, upload)
    if NDJSON in request.headers.get("accept", ""):
        return StreamingResponse(run.ndjson(), media_type=NDJSON, background=BackgroundTask(run.close))
    try:
        segments = await until_disconnected(request, run.collect())
        return JSONResponse(timeline_body(service, job, segments))
    finally:
        await run.close()


def open_job(service: Service, upload: SpooledUpload, options: TimelineOptions) -> Recording:
    return service.open_timeline(
        upload.path, name=upload.name, channels=options.channels, vad=options.vad, spans=options.spans
    )


class TimelineRun:
    """One request's timeline: scoring, and the temporary file's removal however it ends."""

    def __init__(self, service: Service, job: Recording, upload: SpooledUpload) -> None:
        self.service, self.job, self.upload = service, job, upload
        self._closed = False
        self._iterator: AsyncIterator[TimelineSegment] | None = None

    def _scored(self) -> AsyncIterator[TimelineSegment]:
        self._iterator = self.service.timeline(self.job)
        return self._iterator

    async def collect(self) -> list[TimelineSegment]:
        return [segment async for segment in self._scored()]

    async def ndjson(self) -> AsyncIterator[bytes]:
        segments: list[TimelineSegment] = []
        try:
            async for segment in self._scored():
                segments.append(segment)
                yield segment_line(segment)
            body = timeline_body(self.service, self.job, segments)
            body.pop("segments")
            yield (json.dumps({"type": "summary", **body}, ensure_ascii=False) + "\n").encode()
        except EmoserveError as error:  # the status went out with the first line: the error is a line too
            self.service.metrics.count_error(error.code)
            line = {"type": "error", "error": {"code": error.code, "message": str(error)}}
            yield (json.dumps(line, ensure_ascii=False) + "\n").encode()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._iterator is not None and hasattr(self._iterator, "aclose"):
            await self._iterator.aclose()
        self.upload.remove()
