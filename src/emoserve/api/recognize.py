"""POST /v1/recognize: the emotion of one clip.

    upload (multipart `file` or raw body, in memory; max_upload_mb) -> options (query over form fields)
    -> wait for ready (ready_wait_s) -> Service.decode (max_audio_s) -> Service.recognize (the engine)
    -> JSON: the result's fields + `embedding` (when asked) + `timing`

A client that goes away frees its place in the engine's queue.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from emoserve.api.errors import MappedErrorsRoute, ServiceDep
from emoserve.api.schemas import (
    READOUT_FIELDS,
    LabelsQuery,
    MinConfidenceQuery,
    RecognitionOut,
    audio_request_body,
    error_responses,
)
from emoserve.api.uploads import UploadLimit, form_bool, read_upload, until_disconnected
from emoserve.constants import GRANULARITIES, Granularity
from emoserve.errors import ApiError

if TYPE_CHECKING:
    from emoserve.inference.results import Result
    from emoserve.serving.engine import RequestTiming

RECOGNIZE = "/v1/recognize"
UPLOAD_SETTING = "this server's max_upload_mb: --max-upload-mb / EMOSERVE_MAX_UPLOAD_MB"
RECOGNIZE_BODY = audio_request_body(
    {
        "granularity": {"type": "string", "enum": list(GRANULARITIES)},
        "embedding": {"type": "boolean"},
        "head": {"type": "string", "description": "a served head's name (GET /v1/model lists them)"},
        **READOUT_FIELDS,
    }
)

router = APIRouter(route_class=MappedErrorsRoute)


@router.post(
    RECOGNIZE,
    summary="Recognise the emotion in one clip",
    description="Send the audio as the multipart field `file` or as the raw body (wav, flac, ogg, mp3, "
    "m4a, opus, ...). A request that arrives before the model is ready waits up to ready_wait_s.",
    responses={200: {"model": RecognitionOut}, **error_responses(400, 401, 413, 415, 422, 503)},
    openapi_extra=RECOGNIZE_BODY,
)
async def recognize(
    request: Request,
    service: ServiceDep,
    granularity: Annotated[
        Granularity | None,
        Query(description="utterance (default) or frame (one per 20 ms)"),
    ] = None,
    embedding: Annotated[bool | None, Query(description="also return the embedding (default false)")] = None,
    head: Annotated[
        str | None,
        Query(description="also a head of your own labels, by name (GET /v1/model lists them)"),
    ] = None,
    labels: LabelsQuery = None,
    min_confidence: MinConfidenceQuery = None,
) -> JSONResponse:
    started = time.perf_counter()
    upload = await read_upload(request, UploadLimit(service.settings.max_upload_bytes, UPLOAD_SETTING))
    options = recognition_options(granularity, embedding, upload.fields, head)
    await service.wait_ready(service.settings.ready_wait_s)
    readout = service.readout(
        pick(labels, upload.fields, "labels"), pick(min_confidence, upload.fields, "min_confidence")
    )
    decode_started = time.perf_counter()
    audio = await run_in_threadpool(service.decode, upload.data, upload.name)
    decode_s = time.perf_counter() - decode_started
    scored = service.recognize(audio, options.granularity, options.embedding, options.head, readout=readout)
    result, timing = await until_disconnected(request, scored)
    total_s = time.perf_counter() - started
    service.metrics.observe_request(
        RECOGNIZE, decode_s=decode_s, queue_s=timing.queue_s, inference_s=timing.inference_s, total_s=total_s
    )
    return JSONResponse(recognition_body(result, options.embedding, stage_timing(decode_s, timing, total_s)))


@dataclass(frozen=True)
class Options:
    granularity: Granularity
    embedding: bool
    head: str | None = None


def pick(query: Any, fields: dict[str, str], name: str) -> Any:
    """A query parameter, else the multipart form field of the same name (None: neither)."""
    return query if query is not None else fields.get(name) or None


def recognition_options(
    granularity: str | None, embedding: bool | None, fields: dict[str, str], head: str | None = None
) -> Options:
    """Query parameters (validated by FastAPI) win over multipart form fields (validated here)."""
    chosen = granularity if granularity is not None else fields.get("granularity", "utterance")
    if chosen not in GRANULARITIES:
        raise ApiError("invalid_parameter", f"granularity is {chosen!r}; choose 'utterance' or 'frame'")
    if embedding is None:
        embedding = form_bool("embedding", fields.get("embedding", "false"))
    head = head if head is not None else fields.get("head") or None
    return Options(chosen, embedding, head)  # checked against GRANULARITIES (a Literal tuple: mypy narrows)


def recognition_body(result: Result, embedding: bool, timing: dict[str, float]) -> dict[str, Any]:
    """RecognitionOut: the result's fields, the embedding when asked for, the timing."""
    body = result.to_dict()
    body["embedding"] = result.embedding.tolist() if embedding and result.embedding is not None else None
    body["timing"] = timing
    return body


def stage_timing(decode_s: float, timing: RequestTiming, total_s: float) -> dict[str, float]:
    return {
        "decode_s": round(decode_s, 6),
        "queue_s": round(timing.queue_s, 6),
        "inference_s": round(timing.inference_s, 6),
        "total_s": round(total_s, 6),
    }
