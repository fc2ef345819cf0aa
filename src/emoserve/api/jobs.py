"""/v1/jobs: a long recording accepted at once and scored in the background (serving/jobs/).

POST   /v1/jobs                  the upload (multipart `file` or the raw body) with /v1/timeline's
                                 options, `callback_url`, `callback_secret`, `callback_progress`,
                                 `metadata`, and the `Idempotency-Key` header -> 202 + Location, once
                                 the audio is fsync'd and the job committed
GET    /v1/jobs                  the jobs, newest first (`status`, `limit`, `after`: paging)
GET    /v1/jobs/{id}             status, stage, progress (percent, segments, speech seconds, ETA),
                                 attempts, error, expiry, model
GET    /v1/jobs/{id}/result      /v1/timeline's JSON for the same file and options; 409 until done
                                 (`partial=true`: the segments so far); `Accept: application/x-ndjson`
                                 follows a running job (`after=N`: from the N+1-th segment on)
POST   /v1/jobs/{id}/cancel      queued: cancelled at once; running: at its next segment
DELETE /v1/jobs/{id}             the job, its segments and its audio gone (204)
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from emoserve.api.errors import NDJSON, MappedErrorsRoute, ServiceDep, error_line, ndjson_line
from emoserve.api.schemas import audio_request_body, error_responses
from emoserve.api.timeline import TIMELINE_BODY, timeline_options, timeline_query
from emoserve.api.uploads import SpooledUpload, UploadLimit, spool_upload
from emoserve.constants import FALSE_WORDS, MAX_SPANS_BYTES, TRUE_WORDS
from emoserve.errors import ApiError, EmoserveError, ServiceUnavailable
from emoserve.inference.formats import segment_record, summary_record
from emoserve.serving.heads import pick_head
from emoserve.serving.jobs.store import STATUSES, Job, Status
from emoserve.serving.jobs.webhooks import check_callback
from emoserve.serving.jobs.worker import UPLOAD_SETTING, JobOptions, Jobs

JOBS = "/v1/jobs"
MAX_KEY_CHARS = 255
MAX_METADATA_KEYS = 16
MAX_METADATA_CHARS = 512
NOT_DONE_RETRY_S = 5.0
JOB_BODY = audio_request_body(
    {
        **TIMELINE_BODY["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"],
        "callback_url": {"type": "string", "description": "POSTed job.succeeded/failed/cancelled"},
        "callback_secret": {"type": "string", "description": "signs the webhooks (Emoserve-Signature)"},
        "callback_progress": {"type": "boolean", "description": "also POST job.progress, each tenth"},
        "metadata": {"type": "string", "description": 'a JSON object of strings, e.g. {"call": "42"}'},
    }
)

router = APIRouter(route_class=MappedErrorsRoute)


def get_jobs(request: Request) -> Jobs:
    jobs: Jobs | None = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise ServiceUnavailable("not_ready", "jobs start with the server; retry in a moment", 5.0)
    return jobs


JobsDep = Annotated[Jobs, Depends(get_jobs)]


@router.post(
    JOBS,
    status_code=202,
    summary="Submit a long recording as a job",
    description="Answers 202 with the job and `Location` once the audio is on disk and the job committed; "
    "the result, when done, is /v1/timeline's JSON. The same `Idempotency-Key` with the same request gives "
    "the same job. Limits: jobs_max_upload_mb, jobs_max_duration_s, jobs_max_queued (429), "
    "jobs_max_disk_mb (507).",
    responses=error_responses(400, 401, 413, 415, 422, 429, 503, 507),
    openapi_extra=JOB_BODY,
)
async def submit(
    request: Request,
    service: ServiceDep,
    jobs: JobsDep,
    query: Annotated[dict[str, Any], Depends(timeline_query)],
    callback_url: Annotated[str | None, Query(description="webhook URL (or a form field)")] = None,
    callback_secret: Annotated[str | None, Query(description="webhook signing secret")] = None,
    callback_progress: Annotated[
        bool | None, Query(description="also POST job.progress events, one each tenth of the job at most")
    ] = None,
    metadata: Annotated[str | None, Query(description="a JSON object of strings")] = None,
    idempotency_key: Annotated[str | None, Header(description="one job per key and request")] = None,
) -> Response:
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_KEY_CHARS:
        raise ApiError("invalid_parameter", f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} characters")
    limit = UploadLimit(service.settings.jobs_max_upload_bytes, UPLOAD_SETTING)
    upload = await spool_upload(
        request, limit, text_files=("segments",), max_text_bytes=MAX_SPANS_BYTES, dir=jobs.spool_dir()
    )
    try:
        job, created = await _accept(service, jobs, upload, query, callback_url, callback_secret,
                                     callback_progress, metadata, idempotency_key)  # fmt: skip
    except BaseException:
        upload.remove()
        raise
    headers = {"Location": f"{JOBS}/{job.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(job.to_dict(), status_code=202, headers=headers)


async def _accept(
    service: ServiceDep,
    jobs: Jobs,
    upload: SpooledUpload,
    query: dict[str, Any],
    callback_url: str | None,
    callback_secret: str | None,
    callback_progress: bool | None,
    metadata: str | None,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    fields = upload.fields
    options = timeline_options(query, fields)
    await service.wait_ready(service.settings.ready_wait_s)
    pick_head(service.heads, options.head)  # an unknown head: 422 before the job is made
    service.readout(options.labels, options.min_confidence)  # unknown labels: 422 as well
    url = callback_url or fields.get("callback_url") or None
    if url is not None:
        await asyncio.to_thread(check_callback, url, service.settings.allow_private_callbacks)
    progress = _flag("callback_progress", callback_progress, fields.get("callback_progress"))
    if progress and url is None:
        raise ApiError("invalid_parameter", "callback_progress needs a callback_url to send the events to")
    job_options = JobOptions.of(
        options.channels, options.vad, options.spans, options.head, options.labels, options.min_confidence
    )
    return await asyncio.to_thread(
        jobs.accept,
        upload.path,
        upload.name,
        job_options,
        idempotency_key=idempotency_key,
        callback_url=url,
        callback_secret=callback_secret or fields.get("callback_secret") or None,
        callback_progress=progress,
        metadata=_metadata(metadata or fields.get("metadata")),
    )


def _flag(name: str, query: bool | None, field: str | None) -> bool:
    """A boolean given as a query parameter or a form field."""
    if query is not None:
        return query
    if field is None or not field.strip():
        return False
    word = field.strip().lower()
    if word not in TRUE_WORDS | FALSE_WORDS:
        raise ApiError("invalid_parameter", f"{name} must be true or false, not {field!r}")
    return word in TRUE_WORDS


def _metadata(raw: str | None) -> dict[str, str]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not all(
        isinstance(v, str) and len(k) <= MAX_METADATA_CHARS and len(v) <= MAX_METADATA_CHARS
        for k, v in value.items()
    ):
        raise ApiError("invalid_parameter", 'metadata must be a JSON object of strings, e.g. {"call": "42"}')
    if len(value) > MAX_METADATA_KEYS:
        raise ApiError("invalid_parameter", f"metadata has {len(value)} keys; at most {MAX_METADATA_KEYS}")
    return value


@router.get(JOBS, summary="The jobs, newest first", responses=error_responses(401, 422))
async def list_jobs(
    jobs: JobsDep,
    status: Annotated[Status | None, Query(description=f"only jobs in: {', '.join(STATUSES)}")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="jobs per page")] = 50,
    after: Annotated[str | None, Query(description="the page after this job id (`next` of a page)")] = None,
) -> dict[str, Any]:
    page = await asyncio.to_thread(jobs.store.page, status, limit, after)
    return {"jobs": [job.to_dict() for job in page], "next": page[-1].id if len(page) == limit else None}


@router.get(JOBS + "/{job_id}", summary="A job's state and progress", responses=error_responses(401, 404))
async def job_status(jobs: JobsDep, job_id: str) -> dict[str, Any]:
    return (await asyncio.to_thread(jobs.get, job_id)).to_dict()


@router.get(
    JOBS + "/{job_id}/result",
    summary="A job's timeline",
    description="/v1/timeline's JSON for the same file and options, once the job succeeded; 409 before "
    "(`partial=true`: the segments scored so far, `complete: false`). `Accept: application/x-ndjson`: "
    "/v1/timeline's NDJSON lines, following a running job as its segments are scored; `after=N` starts "
    "after the first N segments (a client that lost its connection).",
    responses=error_responses(401, 404, 409),
)
async def job_result(
    request: Request,
    jobs: JobsDep,
    job_id: str,
    partial: Annotated[bool, Query(description="the segments so far, before the job is done")] = False,
    after: Annotated[int, Query(ge=0, description="NDJSON: skip the first N segments")] = 0,
) -> Response:
    job = await asyncio.to_thread(jobs.get, job_id)
    if NDJSON in request.headers.get("accept", ""):
        return StreamingResponse(_follow(jobs, job, after), media_type=NDJSON)
    if job.status == "succeeded":
        return JSONResponse(job.result)
    if partial and job.status in ("queued", "running"):
        return JSONResponse(await asyncio.to_thread(jobs.partial, job))
    raise not_done(job)


def not_done(job: Job) -> ApiError:
    if job.error_code is not None:
        return ApiError("job_not_done", f"job {job.id} {job.status}: {job.error_code}: {job.error_message}")
    if job.status == "cancelled":
        return ApiError("job_not_done", f"job {job.id} was cancelled; it has no result")
    eta = job.progress()["eta_s"]
    retry_s = NOT_DONE_RETRY_S if eta is None else min(60.0, max(1.0, eta))
    return ApiError(
        "job_not_done",
        f"job {job.id} is {job.status} ({job.progress()['percent']:g}%); retry in {math.ceil(retry_s)} s, or "
        "ask for partial=true",
        retry_after_s=retry_s,
    )


async def _follow(jobs: Jobs, job: Job, after: int) -> AsyncIterator[bytes]:
    """The segment lines as they are committed, then the summary (or the job's error) line."""
    from emoserve.inference.results import Timeline, TimelineSegment

    random_weights = bool(jobs.service.random_weights)
    try:
        async for item in jobs.follow(job.id, after - 1):
            if isinstance(item, Job):
                if item.status == "succeeded":
                    assert item.result is not None
                    yield ndjson_line(summary_record(Timeline.from_dict(item.result)))
                else:
                    raise not_done(item)
            else:
                segment = TimelineSegment.from_dict(item[1])
                yield ndjson_line(segment_record(job.file, segment, random_weights))
    except EmoserveError as error:
        yield error_line(job.file, error, jobs.service.metrics)


@router.post(JOBS + "/{job_id}/cancel", summary="Cancel a job", responses=error_responses(401, 404, 409))
async def cancel(jobs: JobsDep, job_id: str) -> dict[str, Any]:
    return (await asyncio.to_thread(jobs.cancel, job_id)).to_dict()


@router.delete(
    JOBS + "/{job_id}",
    status_code=204,
    summary="Delete a job: its row, segments and audio",
    responses=error_responses(401, 404),
)
async def delete(jobs: JobsDep, job_id: str) -> Response:
    await asyncio.to_thread(jobs.delete, job_id)
    return Response(status_code=204)
