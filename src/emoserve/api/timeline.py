"""POST /v1/timeline: the emotion timeline of a long recording, whole or streamed as NDJSON.

    upload (multipart `file` or raw body) -> a temporary file, never memory (max_timeline_upload_mb)
    -> Service.open_timeline (errors about the file: 4xx before any work; max_timeline_s)
    -> Service.timeline: segments through the engine as background requests, a few at a time
    -> JSON {file, duration_s, ..., segments, summary}, or with `Accept: application/x-ndjson` the lines
       of `emoserve predict --segments --format jsonl` (`inference.formats`): a `segment` line per segment
       as soon as it is scored, then a `summary` line (an error part-way: an `error` line)

A client that goes away stops its decoding and drops its queued segments.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, cast

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from emoserve.api.errors import NDJSON, MappedErrorsRoute, ServiceDep, error_line, ndjson_line
from emoserve.api.schemas import (
    READOUT_FIELDS,
    LabelsQuery,
    MinConfidenceQuery,
    TimelineOut,
    audio_request_body,
    error_responses,
)
from emoserve.api.uploads import SpooledUpload, UploadLimit, spool_upload, until_disconnected
from emoserve.constants import CHANNEL_MODES, MAX_SPANS_BYTES, Channels
from emoserve.errors import ApiError, EmoserveError
from emoserve.inference.formats import segment_record, summary_record
from emoserve.serving.heads import pick_head
from emoserve.serving.service import Service

if TYPE_CHECKING:
    from emoserve.audio.segments import Recording, Span
    from emoserve.audio.vad import VadSettings
    from emoserve.inference.confidence import Readout
    from emoserve.inference.results import Timeline, TimelineSegment

TIMELINE = "/v1/timeline"
UPLOAD_SETTING = (
    "this server's max_timeline_upload_mb: --max-timeline-upload-mb / EMOSERVE_MAX_TIMELINE_UPLOAD_MB"
)
TIMELINE_BODY = audio_request_body(
    {
        "segments": {
            "type": "string",
            "description": "your own segments instead of the VAD: a JSON list of "
            "{start_s, end_s[, speaker]}, or RTTM (text or a file)",
        },
        "head": {"type": "string", "description": "a served head's name (GET /v1/model lists them)"},
        **READOUT_FIELDS,
    }
)

router = APIRouter(route_class=MappedErrorsRoute)


def timeline_query(
    channels: Annotated[
        Channels | None,
        Query(description="mix (default) or separate: a timeline per channel"),
    ] = None,
    max_segment_s: Annotated[
        float | None, Query(description="longest segment; longer speech is cut (15)")
    ] = None,
    vad_threshold: Annotated[float | None, Query(description="speech probability threshold (0.5)")] = None,
    min_speech_ms: Annotated[float | None, Query(description="shortest speech kept (250)")] = None,
    min_silence_ms: Annotated[float | None, Query(description="pause that ends a segment (300)")] = None,
    pad_ms: Annotated[float | None, Query(description="padding around each segment (100)")] = None,
    head: Annotated[
        str | None,
        Query(description="also a head of your own labels on each segment, by name; 422 if unknown"),
    ] = None,
    labels: LabelsQuery = None,
    min_confidence: MinConfidenceQuery = None,
) -> dict[str, Any]:
    """The timeline's query parameters (form fields may give them too: `timeline_options`); /v1/jobs
    takes the same."""
    return {
        "channels": channels,
        "max_segment_s": max_segment_s,
        "vad_threshold": vad_threshold,
        "min_speech_ms": min_speech_ms,
        "min_silence_ms": min_silence_ms,
        "pad_ms": pad_ms,
        "head": head,
        "labels": labels,
        "min_confidence": min_confidence,
    }


@router.post(
    TIMELINE,
    summary="The emotion timeline of a long recording",
    description="Speech segments (silero-vad, or your `segments`) each scored as /v1/recognize would score "
    "it, and a time-weighted summary. `Accept: application/x-ndjson` streams the lines of `emoserve predict "
    "--segments --format jsonl`: a `segment` line per segment as it is scored, then a `summary` line (or "
    "an `error` line). Limits: max_timeline_s, max_timeline_upload_mb.",
    responses={200: {"model": TimelineOut}, **error_responses(400, 401, 413, 415, 422, 503)},
    openapi_extra=TIMELINE_BODY,
)
async def timeline(
    request: Request, service: ServiceDep, query: Annotated[dict[str, Any], Depends(timeline_query)]
) -> Response:
    limit = UploadLimit(service.settings.max_timeline_upload_bytes, UPLOAD_SETTING)
    upload = await spool_upload(request, limit, text_files=("segments",), max_text_bytes=MAX_SPANS_BYTES)
    try:
        options = timeline_options(query, upload.fields)
        await service.wait_ready(service.settings.ready_wait_s)
        pick_head(service.heads, options.head)  # an unknown head: 422 before any work
        readout = service.readout(options.labels, options.min_confidence)  # unknown labels: 422 as well
        job = await asyncio.to_thread(open_job, service, upload, options)
    except BaseException:
        upload.remove()
        raise
    run = TimelineRun(service, job, upload, options.head, readout)
    if NDJSON in request.headers.get("accept", ""):
        return StreamingResponse(run.ndjson(), media_type=NDJSON, background=BackgroundTask(run.close))
    try:
        segments = await until_disconnected(request, run.collect())
        return JSONResponse(run.timeline(segments).to_dict())
    finally:
        await run.close()


@dataclass(frozen=True)
class TimelineOptions:
    channels: Channels
    vad: VadSettings
    spans: list[Span] | None
    head: str | None = None
    labels: str | None = None
    min_confidence: str | float | None = None


def timeline_options(query: dict[str, Any], fields: dict[str, str]) -> TimelineOptions:
    """Query parameters win over form fields; every value is checked here with a message that names it."""
    from emoserve.audio.segments import read_spans
    from emoserve.audio.vad import VAD_PARAMETERS, VadSettings

    def pick(name: str) -> Any:
        return query[name] if query.get(name) is not None else fields.get(name)

    channels = pick("channels") or "mix"
    if channels not in CHANNEL_MODES:
        raise ApiError("invalid_parameter", f"channels is {channels!r}; choose 'mix' or 'separate'")
    vad_args: dict[str, float] = {}
    for name, key in VAD_PARAMETERS.items():
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
    return TimelineOptions(
        cast(Channels, channels),
        vad,
        spans,
        pick("head") or None,
        pick("labels") or None,
        pick("min_confidence"),
    )


def open_job(service: Service, upload: SpooledUpload, options: TimelineOptions) -> Recording:
    return service.open_timeline(
        upload.path, name=upload.name, channels=options.channels, vad=options.vad, spans=options.spans
    )


class TimelineRun:
    """One request's timeline: scoring, and the temporary file's removal however it ends."""

    def __init__(
        self,
        service: Service,
        job: Recording,
        upload: SpooledUpload,
        head: str | None = None,
        readout: Readout | None = None,
    ) -> None:
        self.service, self.job, self.upload, self.head = service, job, upload, head
        self.readout = readout
        self._closed = False
        self._iterator: AsyncIterator[TimelineSegment] | None = None

    def _scored(self) -> AsyncIterator[TimelineSegment]:
        self._iterator = self.service.timeline(self.job, self.head, readout=self.readout)
        return self._iterator

    def timeline(self, segments: list[TimelineSegment]) -> Timeline:
        from emoserve.inference.timeline import build_timeline

        assert self.service.model_tag is not None  # scoring: loaded
        return build_timeline(self.job, segments, self.service.model_tag)

    async def collect(self) -> list[TimelineSegment]:
        return [segment async for segment in self._scored()]

    async def ndjson(self) -> AsyncIterator[bytes]:
        file, random_weights = self.job.file, bool(self.service.random_weights)
        segments: list[TimelineSegment] = []
        try:
            async for segment in self._scored():
                segments.append(segment)
                yield ndjson_line(segment_record(file, segment, random_weights))
            yield ndjson_line(summary_record(self.timeline(segments)))
        except EmoserveError as error:
            yield error_line(file, error, self.service.metrics)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._iterator is not None and hasattr(self._iterator, "aclose"):
            await self._iterator.aclose()
        self.upload.remove()
