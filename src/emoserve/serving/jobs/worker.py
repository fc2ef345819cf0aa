"""`Jobs`: a server's side of /v1/jobs. Accepting (the audio fsync'd and renamed into jobs_dir before the
job's row commits), the workers that claim jobs and score them through the shared engine, the webhooks'
delivery and the purge, all started and stopped with the server (api/app.py's lifespan).

    claim (a lease) -> plan (decode + VAD once, the cuts stored) -> scoring: the cuts not yet scored, cut
    again from the audio (`Recording(plan=...)`), through `Service.timeline` at the timeline's priority,
    each segment committed as it comes -> the timeline built from the stored segments -> succeeded (and
    the webhook event, in one transaction)

A server killed at any point loses at most the segments in the engine at that moment: the next worker
(the restarted server, or another replica) takes the job once its lease has run out and goes on at the
next segment that was not committed. A job is scored by one model at one runtime and precision: if the
served model, backend or dtype changed between attempts, the job's segments are scored again from the
first (`JobStore.start_scoring`); the plan is kept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from emoserve.constants import Channels
from emoserve.errors import ApiError, EmoserveError
from emoserve.files import sha256_file
from emoserve.serving.jobs.store import Claim, Job, JobStore, LeaseLost, NewJob, Status, new_id
from emoserve.serving.jobs.webhooks import deliver_due
from emoserve.serving.settings import MB, Settings

if TYPE_CHECKING:
    from emoserve.audio.segments import Cut, Recording, Span
    from emoserve.audio.vad import VadSettings
    from emoserve.inference.results import ModelTag, TimelineSegment
    from emoserve.serving.service import Service

log = logging.getLogger(__name__)

DURATION_SETTING = "this server's jobs_max_duration_s: --jobs-max-duration-s / EMOSERVE_JOBS_MAX_DURATION_S"
DISK_RETRY_AFTER_S = 60.0  # the disk frees as running jobs end (their audio is deleted)
PURGE_EVERY_S = 60.0
COUNT_EVERY_S = 5.0  # the jobs-by-status and oldest-queued gauges
ORPHAN_AGE_S = 3600.0  # audio with no job row (a server killed between the rename and the commit)
WEBHOOK_EVERY_S = 0.5


@dataclass(frozen=True)
class JobOptions:
    """The timeline's options of a job, as /v1/timeline takes them, stored with it as JSON."""

    channels: str = "mix"
    vad: dict[str, float] | None = None  # VadSettings' fields
    spans: list[tuple[float, float, str | None]] | None = None  # the caller's own segments
    head: str | None = None
    labels: str | None = None  # a label subset, as /v1/timeline's `labels`
    min_confidence: float | str | None = None  # the abstain threshold, as /v1/timeline's

    @classmethod
    def of(
        cls,
        channels: str,
        vad: VadSettings,
        spans: Sequence[Span] | None,
        head: str | None,
        labels: str | None = None,
        min_confidence: float | str | None = None,
    ) -> JobOptions:
        """From a timeline request's options (the API's form, the web UI's inputs)."""
        kept = None if spans is None else [(s.start_s, s.end_s, s.speaker) for s in spans]
        return cls(channels, vad.to_dict(), kept, head, labels, min_confidence)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


UPLOAD_SETTING = "this server's jobs_max_upload_mb: --jobs-max-upload-mb / EMOSERVE_JOBS_MAX_UPLOAD_MB"


def jobs_dir(settings: Settings) -> Path:
    if settings.jobs_dir is not None:
        return settings.jobs_dir
    from emoserve.model.cache import home

    return home() / "jobs"


def open_store(settings: Settings) -> JobStore:
    """PostgreSQL when jobs_db names it, else SQLite in jobs_dir."""
    if settings.jobs_db:
        from emoserve.serving.jobs.postgres import PostgresJobStore

        return PostgresJobStore(settings.jobs_db)
    from emoserve.serving.jobs.sqlite import SqliteJobStore

    return SqliteJobStore(jobs_dir(settings) / "jobs.sqlite3")


class _Cancelled(Exception):
    """The job's cancel was asked: its worker stops at the next segment."""


class Jobs:
    def __init__(self, service: Service, store: JobStore | None = None) -> None:
        self.service = service
        self.settings = service.settings
        self.dir = jobs_dir(self.settings)
        self.audio_dir = self.dir / "audio"
        self.audio_dir.mkdir(parents=True, exist_ok=True)
        self.store = store or open_store(self.settings)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{new_id()[:8]}"
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def ttl_s(self) -> float:
        return self.settings.jobs_ttl_h * 3600.0

    # ------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """The workers, the webhooks' sender and the purge, as tasks of the running loop."""
        loops = [self._work() for _ in range(self.settings.jobs_workers)]
        loops += [self._send_webhooks(), self._purge(), self._count()]
        self._tasks = [asyncio.ensure_future(loop) for loop in loops]

    async def stop(self) -> None:
        """The workers give their jobs back to the queue (another replica, or the restart, goes on)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await asyncio.to_thread(self.store.close)

    # ------------------------------------------------------------------------------------- accepting

    def spool_dir(self) -> Path:
        """Where an upload is written as it arrives: beside the jobs' audio (one filesystem: a rename)."""
        return self.audio_dir

    def accept(
        self,
        spooled: str,
        name: str,
        options: JobOptions,
        *,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        callback_secret: str | None = None,
        callback_progress: bool = False,
        metadata: dict[str, str] | None = None,
    ) -> tuple[Job, bool]:
        """Blocking. The upload checked (audio, its length), fsync'd, renamed to the job's name and the
        job committed; the job and whether it is new (an Idempotency-Key seen before: the job it made).
        On an error the upload is left to the caller to remove."""
        self._check_audio(spooled, name, options)
        size = os.path.getsize(spooled)
        with open(spooled, "rb") as f:
            os.fsync(f.fileno())
        limit = self.settings.jobs_max_disk_mb * MB
        if self.store.audio_bytes_pending() + size > limit:
            raise ApiError(
                "jobs_disk_full",
                f"the unfinished jobs' audio and this upload would pass {limit / MB:g} MB (jobs_max_disk_mb: "
                "--jobs-max-disk-mb / EMOSERVE_JOBS_MAX_DISK_MB); retry once running jobs end",
                retry_after_s=DISK_RETRY_AFTER_S,
            )
        job_id = new_id()
        path = self.audio_dir / f"{job_id}.audio"
        os.replace(spooled, path)
        _fsync_dir(self.audio_dir)
        new = NewJob(
            id=job_id,
            file=name,
            audio_path=str(path),
            audio_bytes=size,
            options=options.to_dict(),
            metadata=metadata or {},
            idempotency_key=idempotency_key,
            fingerprint=_fingerprint(path, options, callback_url, callback_progress),
            callback_url=callback_url,
            callback_secret=callback_secret,
            callback_progress=callback_progress,
            max_attempts=self.settings.jobs_max_attempts,
            created_at=time.time(),
        )
        try:
            job, created = self.store.add(new, self.settings.jobs_max_queued)
        except BaseException:
            os.replace(path, spooled)  # the caller removes it
            raise
        if created:
            self.service.metrics.jobs_submitted_total.inc()
        else:
            path.unlink(missing_ok=True)
        return job, created

    def _check_audio(self, path: str, name: str, options: JobOptions) -> None:
        """Not audio, or longer than jobs_max_duration_s by its header: refused before the 202."""
        self._recording(path, name, options).stream.close()

    def _recording(
        self, path: str, name: str, options: JobOptions, plan: list[Cut] | None = None
    ) -> Recording:
        from emoserve.audio.segments import Recording, Span
        from emoserve.audio.vad import VadSettings

        return Recording(
            path,
            name=name,
            channels="separate" if options.channels == "separate" else "mix",
            vad=VadSettings(**(options.vad or {})),
            spans=None if options.spans is None else [Span(*span) for span in options.spans],
            max_seconds=self.settings.jobs_max_duration_s,
            limit_setting=DURATION_SETTING,
            plan=plan,
        )

    # --------------------------------------------------------------------------------- the caller's

    def cancel(self, job_id: str) -> Job:
        job = self.store.cancel(job_id, self.ttl_s)
        if job is None:
            raise not_found(job_id)
        if job.done and job.status != "cancelled":
            raise ApiError("job_finished", f"job {job_id} has ended ({job.status}); nothing to cancel")
        if job.done:
            self._drop_audio(job)
        return job

    def delete(self, job_id: str) -> None:
        job = self.store.delete(job_id)
        if job is None:
            raise not_found(job_id)
        Path(job.audio_path).unlink(missing_ok=True)

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise not_found(job_id)
        return job

    def partial(self, job: Job) -> dict[str, Any]:
        """The timeline of the segments scored so far (a prefix of the final one), `complete: false`."""
        from emoserve.inference.results import TimelineSegment
        from emoserve.inference.timeline import timeline_of

        options = JobOptions(**job.options)
        segments = [TimelineSegment.from_dict(s) for _, s in self.store.scored(job.id)]
        channels: Channels = "separate" if options.channels == "separate" else "mix"
        vad = None if options.spans is not None else _vad_dict(options)
        timeline = timeline_of(job.file, job.duration_s or 0.0, channels, vad, segments, self._tag())
        return {**timeline.to_dict(), "complete": False}

    async def follow(self, job_id: str, after: int) -> AsyncIterator[tuple[int, dict[str, Any]] | Job]:
        """The job's scored segments after index `after` as they are committed, then the job once it
        has ended (or been deleted: not_found)."""
        while True:
            job = await asyncio.to_thread(self.get, job_id)
            for idx, segment in await asyncio.to_thread(self.store.scored, job_id, after):
                after = idx
                yield idx, segment
            if job.done:
                yield job
                return
            await asyncio.sleep(self.settings.jobs_poll_s)

    # ---------------------------------------------------------------------------------- the workers

    async def _work(self) -> None:
        poll_s = self.settings.jobs_poll_s
        while True:
            if not self.service.accepting:
                await asyncio.sleep(poll_s)
                continue
            try:
                claim = await asyncio.to_thread(
                    self.store.claim, self.owner, self.settings.jobs_lease_s, self.ttl_s
                )
            except Exception:
                log.exception("claiming a job failed; trying again")
                claim = None
            if claim is None:
                await asyncio.sleep(poll_s)
                continue
            job = claim.job
            if claim.attempt == 1 and job.started_at is not None:
                self.service.metrics.job_queue_wait_seconds.observe(job.started_at - job.created_at)
            try:
                await self._run(claim)
            except Exception:  # the store was lost as the job ended: its lease runs out, it is taken again
                log.exception(
                    "job %s: its worker could not record its end; it will be taken again", claim.job.id
                )

    async def _run(self, claim: Claim) -> None:
        """The job scored under its lease, renewed every third of it (planning a long file takes a while)
        and with each segment; a cancel asked meanwhile stops it; the server's shutdown gives it back."""
        lease_s = self.settings.jobs_lease_s
        stop = threading.Event()
        scoring = asyncio.ensure_future(self._score(claim, stop))
        try:
            while True:
                done, _ = await asyncio.wait({scoring}, timeout=lease_s / 3)
                if done:
                    break
                if await asyncio.to_thread(self.store.renew, claim, lease_s):
                    scoring.cancel()
                    await asyncio.gather(scoring, return_exceptions=True)
                    await self._end(claim, "cancelled")
                    return
            scoring.result()
        except asyncio.CancelledError:  # the server is stopping
            stop.set()
            scoring.cancel()
            await asyncio.gather(scoring, return_exceptions=True)
            await asyncio.to_thread(self.store.release, claim)
            raise
        except LeaseLost:
            log.warning("job %s: another worker holds it now; this one stops", claim.job.id)
        except _Cancelled:
            await self._end(claim, "cancelled")
        except EmoserveError as error:
            if error.status == 503:  # the server cannot score now, or the store is out of reach
                log.warning("job %s: %s; given back to the queue", claim.job.id, error)
                await asyncio.to_thread(self.store.release, claim)
                return
            await self._end(claim, "failed", error=error)
        except Exception as error:
            log.exception("job %s failed", claim.job.id)
            message = f"internal error ({type(error).__name__}); the server log has the details"
            await self._end(claim, "failed", error=ApiError("internal_error", message))
        finally:
            stop.set()
            if not scoring.done():
                scoring.cancel()
                await asyncio.gather(scoring, return_exceptions=True)

    async def _end(
        self,
        claim: Claim,
        status: Status,
        result: dict[str, Any] | None = None,
        error: EmoserveError | None = None,
    ) -> None:
        try:
            await asyncio.to_thread(self.store.finish, claim, status, self.ttl_s, result=result, error=error)
        except LeaseLost:
            log.warning("job %s: taken by another worker before it ended here", claim.job.id)
            return
        metrics = self.service.metrics
        metrics.jobs_finished_total.labels(status).inc()
        if claim.job.started_at is not None:  # claimed: its first claim's time
            metrics.job_run_seconds.labels(status).observe(time.time() - claim.job.started_at)
        self._drop_audio(claim.job)

    def _drop_audio(self, job: Job) -> None:
        if not self.settings.jobs_keep_audio:
            Path(job.audio_path).unlink(missing_ok=True)

    async def _score(self, claim: Claim, stop: threading.Event) -> None:
        job, lease_s = claim.job, self.settings.jobs_lease_s
        options = JobOptions(**job.options)
        plan = await asyncio.to_thread(self.store.plan, job.id)
        if plan is None:
            await asyncio.to_thread(self.store.renew, claim, lease_s, "planning")
            cuts, duration_s = await asyncio.to_thread(self._plan, job, options, stop)
            await asyncio.to_thread(self.store.save_plan, claim, cuts, duration_s, lease_s)
            plan = cuts
        model = self._scorer()
        dropped = await asyncio.to_thread(self.store.start_scoring, claim, model)
        if dropped:
            log.warning("job %s: the model is now %s; %d segments scored again", job.id, model, dropped)
        done = {idx for idx, _ in await asyncio.to_thread(self.store.scored, job.id)}
        todo = [idx for idx in range(len(plan)) if idx not in done]
        if claim.attempt > 1:
            self.service.metrics.jobs_resumed_total.inc()
            self.service.metrics.job_segments_kept_total.inc(len(done))
        recording = await asyncio.to_thread(
            self._recording, job.audio_path, job.file, options, [plan[idx] for idx in todo]
        )
        started, speech_s = time.monotonic(), 0.0
        segments = cast(
            AsyncGenerator["TimelineSegment", None],
            self.service.timeline(
                recording, options.head, readout=self.service.readout(options.labels, options.min_confidence)
            ),
        )
        try:
            # in the plan's order, as Service.timeline yields them
            for idx in todo:
                segment = await anext(segments)
                speech_s += segment.duration_s
                rate = speech_s / max(1e-6, time.monotonic() - started)
                commit = self.store.commit_segment
                if await asyncio.to_thread(commit, claim, idx, segment.to_dict(), rate, lease_s):
                    raise _Cancelled
            async for _ in segments:  # the end: the recording's duration is counted
                raise AssertionError("more segments than the plan")
        finally:
            await segments.aclose()
        result = await asyncio.to_thread(self._timeline, job, recording)
        await self._end(claim, "succeeded", result=result)

    def _plan(self, job: Job, options: JobOptions, stop: threading.Event) -> tuple[list[Cut], float]:
        """Blocking: the recording's cuts (decode + VAD once), and its duration."""
        from emoserve.audio.segments import Cut

        recording = self._recording(job.audio_path, job.file, options)
        cuts = []
        segments = recording.segments()
        try:
            for segment in segments:
                if stop.is_set():
                    raise asyncio.CancelledError
                cuts.append(Cut.of(segment))
        finally:
            segments.close()
        return cuts, recording.duration_s

    def _timeline(self, job: Job, recording: Recording) -> dict[str, Any]:
        """The result: /v1/timeline's JSON, built from the stored segments."""
        from emoserve.inference.results import TimelineSegment
        from emoserve.inference.timeline import build_timeline

        segments = [TimelineSegment.from_dict(s) for _, s in self.store.scored(job.id)]
        return build_timeline(recording, segments, self._tag()).to_dict()

    def _tag(self) -> ModelTag:
        tag = self.service.model_tag
        assert tag is not None  # scoring: loaded
        return tag

    def _scorer(self) -> str:
        """What a job's segments must all be scored by (the rule of the module's docstring): the model
        and its runtime and precision, whose numbers differ (bfloat16 from float32 by up to 5e-3)."""
        tag = self._tag()
        return f"{tag.model} ({tag.backend} {tag.dtype})"

    # ----------------------------------------------------------------------------- webhooks, purge

    async def _send_webhooks(self) -> None:
        while True:
            try:
                await deliver_due(self.store, self.settings, self.service.metrics)
            except Exception:
                log.exception("delivering webhooks failed; trying again")
            await asyncio.sleep(WEBHOOK_EVERY_S)

    async def _count(self) -> None:
        while True:
            try:
                metrics = self.service.metrics
                for status, n in (await asyncio.to_thread(self.store.count_by_status)).items():
                    metrics.jobs.labels(status).set(n)
                metrics.oldest_queued(await asyncio.to_thread(self.store.oldest_queued_at))
            except Exception:
                log.exception("counting the jobs failed; trying again")
            await asyncio.sleep(COUNT_EVERY_S)

    async def _purge(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.purge)
            except Exception:
                log.exception("purging expired jobs failed; trying again")
            await asyncio.sleep(PURGE_EVERY_S)

    def purge(self, now: float | None = None) -> int:
        """Blocking: expired jobs deleted (rows and audio), and audio that no job names (a server killed
        between writing it and committing its job) once it is an hour old; the jobs deleted."""
        now = time.time() if now is None else now
        expired = self.store.expired(now)
        for job_id in expired:
            job = self.store.delete(job_id)
            if job is not None:
                Path(job.audio_path).unlink(missing_ok=True)
        known = self.store.audio_paths()
        for path in self.audio_dir.iterdir():
            if str(path) not in known and now - path.stat().st_mtime > ORPHAN_AGE_S:
                path.unlink(missing_ok=True)
        return len(expired)


def not_found(job_id: str) -> ApiError:
    return ApiError("job_not_found", f"no job {job_id!r} here (never made, deleted, or expired)")


def _vad_dict(options: JobOptions) -> dict[str, Any]:
    from emoserve.audio.vad import VadSettings

    return VadSettings(**(options.vad or {})).to_dict()


def _fingerprint(path: Path, options: JobOptions, callback_url: str | None, callback_progress: bool) -> str:
    """The request's identity for its Idempotency-Key: the audio's bytes, the options, the callback."""
    what = json.dumps([sha256_file(path), options.to_dict(), callback_url, callback_progress], sort_keys=True)
    return hashlib.sha256(what.encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
