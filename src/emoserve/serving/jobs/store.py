"""The jobs' rows and the SQL that both stores run (SQLite by default, PostgreSQL for replicas).

    jobs        one row a job: its state, options, lease (owner, attempt, expiry), progress, result, error
    job_plan    the segments its first run found (`Cut`s), written once: a resumed job scores the same ones
    job_scored  each scored segment, committed as it is scored (primary key: job and index, so a segment
                is never stored twice)
    webhooks    the outbox: an event written in the transaction that ends the job (or, when the job asked
                for them, that commits a segment taking it past another tenth), delivered at least once

A worker's writes carry its `Claim` (job, owner, attempt) and are refused (`LeaseLost`) once another
worker has taken the job: a worker that was paused past its lease cannot write over its successor.
Times are Unix seconds from the writer's clock (replicas sharing PostgreSQL keep their clocks in sync).
"""

from __future__ import annotations

import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, Protocol

from emoserve.errors import ApiError, EmoserveError

if TYPE_CHECKING:
    from emoserve.audio.segments import Cut

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATUSES: tuple[Status, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL: tuple[Status, ...] = ("succeeded", "failed", "cancelled")
EVENTS = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}
PROGRESS_EVENT = "job.progress"
PROGRESS_STEPS = 10  # a job that asked for progress events gets one each tenth of its segments, at most

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        stage TEXT NOT NULL,
        file TEXT NOT NULL,
        audio_path TEXT NOT NULL,
        audio_bytes BIGINT NOT NULL,
        options TEXT NOT NULL,
        metadata TEXT NOT NULL,
        idempotency_key TEXT UNIQUE,
        fingerprint TEXT NOT NULL,
        callback_url TEXT,
        callback_secret TEXT,
        callback_progress INTEGER NOT NULL DEFAULT 0,
        model TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        expires_at DOUBLE PRECISION,
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        lease_owner TEXT,
        lease_expires_at DOUBLE PRECISION,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        duration_s DOUBLE PRECISION,
        segments_total INTEGER,
        speech_s_total DOUBLE PRECISION,
        segments_done INTEGER NOT NULL DEFAULT 0,
        speech_s_done DOUBLE PRECISION NOT NULL DEFAULT 0,
        rate DOUBLE PRECISION,
        error_code TEXT,
        error_message TEXT,
        result TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at)",
    """CREATE TABLE IF NOT EXISTS job_plan (
        job_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        start_sample BIGINT NOT NULL,
        end_sample BIGINT NOT NULL,
        split INTEGER NOT NULL,
        speaker TEXT,
        PRIMARY KEY (job_id, idx)
    )""",
    """CREATE TABLE IF NOT EXISTS job_scored (
        job_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        segment TEXT NOT NULL,
        PRIMARY KEY (job_id, idx)
    )""",
    """CREATE TABLE IF NOT EXISTS webhooks (
        event_id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        url TEXT NOT NULL,
        secret TEXT,
        body TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        delivered_at DOUBLE PRECISION,
        outcome TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks (delivered_at, next_attempt_at)",
)
# Columns added since the first schema: a store made before them gets them when it is opened
# (table, column, its type and default, as in SCHEMA).
ADDED_COLUMNS = (("jobs", "callback_progress", "INTEGER NOT NULL DEFAULT 0"),)


@dataclass(frozen=True)
class NewJob:
    """A job as accepted: its audio already on disk."""

    id: str
    file: str  # the uploaded file's name: the result's `file`, as /v1/timeline's
    audio_path: str
    audio_bytes: int
    options: dict[str, Any]  # the timeline's options, as /v1/timeline takes them
    metadata: dict[str, str]
    idempotency_key: str | None
    fingerprint: str  # the audio's and the options' hash: one Idempotency-Key, one request
    callback_url: str | None
    callback_secret: str | None
    max_attempts: int
    created_at: float
    callback_progress: bool = False  # job.progress events too, not only the end's


@dataclass(frozen=True)
class Job:
    """A job's row."""

    id: str
    status: Status
    stage: str  # queued, planning, scoring, done
    file: str
    audio_path: str
    audio_bytes: int
    options: dict[str, Any]
    metadata: dict[str, str]
    idempotency_key: str | None
    fingerprint: str
    callback_url: str | None
    callback_secret: str | None
    callback_progress: bool
    model: str | None  # the model that scored it: a job never mixes two
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    attempts: int
    max_attempts: int
    lease_owner: str | None
    lease_expires_at: float | None
    cancel_requested: bool
    duration_s: float | None
    segments_total: int | None
    speech_s_total: float | None
    segments_done: int
    speech_s_done: float
    rate: float | None  # speech seconds scored per second, measured by its worker
    error_code: str | None
    error_message: str | None
    result: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        values = {f.name: row[f.name] for f in fields(cls)}
        for name in ("options", "metadata", "result"):
            values[name] = None if row[name] is None else json.loads(row[name])
        values["cancel_requested"] = bool(row["cancel_requested"])
        values["callback_progress"] = bool(row["callback_progress"])
        return cls(**values)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def progress(self) -> dict[str, Any]:
        total, speech = self.segments_total, self.speech_s_total
        percent = 100.0 if self.status == "succeeded" else 0.0
        if self.status != "succeeded" and total:
            percent = round(100.0 * self.segments_done / total, 1)
        eta_s = None
        if not self.done and speech is not None and self.rate:
            eta_s = round(max(0.0, speech - self.speech_s_done) / self.rate, 1)
        return {
            "percent": percent,
            "segments_done": self.segments_done,
            "segments_total": total,
            "speech_s_done": round(self.speech_s_done, 3),
            "speech_s_total": None if speech is None else round(speech, 3),
            "eta_s": eta_s,
        }

    def to_dict(self) -> dict[str, Any]:
        """What GET /v1/jobs/{id} answers: never the callback's URL or secret."""
        error = None if self.error_code is None else {"code": self.error_code, "message": self.error_message}
        return {
            "id": self.id,
            "status": self.status,
            "stage": self.stage,
            "file": self.file,
            "progress": self.progress(),
            "attempts": self.attempts,
            "error": error,
            "model": self.model,
            "duration_s": self.duration_s,
            "options": self.options,
            "metadata": self.metadata,
            "callback": self.callback_url is not None,
            "callback_progress": self.callback_progress,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "expires_at": self.expires_at,
        }


@dataclass(frozen=True)
class Claim:
    """A worker's hold on a job: its writes are accepted while the row still names this owner and
    attempt."""

    job: Job
    owner: str
    attempt: int


@dataclass(frozen=True)
class Webhook:
    event_id: str
    job_id: str
    url: str
    secret: str | None
    body: str
    created_at: float
    attempts: int


class LeaseLost(EmoserveError):
    """A worker's write to a job that another worker has taken, or that was deleted."""

    code = "job_lease_lost"


def new_id() -> str:
    return uuid.uuid4().hex


class JobStore(ABC):
    """The jobs' SQL, the same on both databases. A backend gives a transaction (`_transaction`, yielding
    a function that runs one statement with `?` parameters and returns its rows and row count), and the
    claim's lock clause."""

    SKIP_LOCKED = ""  # PostgreSQL: FOR UPDATE SKIP LOCKED

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Run]: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def check(self) -> list[str]:
        """The database's own integrity check: its problems (none: [])."""

    @abstractmethod
    def _columns(self, run: Run, table: str) -> set[str]:
        """The names of a table's columns."""

    def create_schema(self) -> None:
        with self._transaction() as run:
            self._create_schema(run)

    def _create_schema(self, run: Run) -> None:
        """The tables, and the columns added since a store was made (ADDED_COLUMNS)."""
        for statement in SCHEMA:
            run(statement)
        for table, column, kind in ADDED_COLUMNS:
            if column not in self._columns(run, table):
                run(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    # ------------------------------------------------------------------------------------ accepting

    def add(self, job: NewJob, max_queued: int) -> tuple[Job, bool]:
        """The job committed, or the one its Idempotency-Key already made (False): same request, same
        job; another request under the same key: idempotency_key_reused. Refused beyond `max_queued`."""
        with self._transaction() as run:
            if job.idempotency_key is not None:
                existing = self._by_key(run, job.idempotency_key)
                if existing is not None:
                    return _same_request(existing, job), False
            queued = run("SELECT COUNT(*) AS n FROM jobs WHERE status = 'queued'").rows[0]["n"]
            if queued >= max_queued:
                raise ApiError(
                    "too_many_jobs",
                    f"{queued} jobs are waiting, this server's most (jobs_max_queued: --jobs-max-queued / "
                    "EMOSERVE_JOBS_MAX_QUEUED); retry later",
                    retry_after_s=30.0,
                )
            inserted = run(
                "INSERT INTO jobs (id, status, stage, file, audio_path, audio_bytes, options, metadata, "
                "idempotency_key, fingerprint, callback_url, callback_secret, callback_progress, created_at, "
                "max_attempts) VALUES (?, 'queued', 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (idempotency_key) DO NOTHING",
                (
                    job.id, job.file, job.audio_path, job.audio_bytes, json.dumps(job.options),
                    json.dumps(job.metadata), job.idempotency_key, job.fingerprint, job.callback_url,
                    job.callback_secret, int(job.callback_progress), job.created_at, job.max_attempts,
                ),
            ).count  # fmt: skip
            if not inserted:  # another request with the key committed since we looked
                assert job.idempotency_key is not None
                existing = self._by_key(run, job.idempotency_key)
                assert existing is not None
                return _same_request(existing, job), False
            row = self._row(run, job.id)
            assert row is not None
            return row, True

    def _by_key(self, run: Run, key: str) -> Job | None:
        rows = run("SELECT * FROM jobs WHERE idempotency_key = ?", (key,)).rows
        return Job.from_row(rows[0]) if rows else None

    def _row(self, run: Run, job_id: str) -> Job | None:
        rows = run("SELECT * FROM jobs WHERE id = ?", (job_id,)).rows
        return Job.from_row(rows[0]) if rows else None

    # -------------------------------------------------------------------------------------- reading

    def get(self, job_id: str) -> Job | None:
        with self._transaction() as run:
            return self._row(run, job_id)

    def page(self, status: Status | None = None, limit: int = 50, after: str | None = None) -> list[Job]:
        """Newest first; `after`: the last id of the page before (a cursor)."""
        where: list[str] = []
        params: list[Any] = []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        with self._transaction() as run:
            if after is not None:
                cursor = self._row(run, after)
                if cursor is not None:
                    where.append("(created_at < ? OR (created_at = ? AND id < ?))")
                    params += [cursor.created_at, cursor.created_at, cursor.id]
            sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
            rows = run(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", (*params, limit)).rows
        return [Job.from_row(row) for row in rows]

    def plan(self, job_id: str) -> list[Cut] | None:
        from emoserve.audio.segments import Cut  # numpy and the decoders: not on the server's start path

        with self._transaction() as run:
            rows = run(
                "SELECT start_sample, end_sample, split, speaker FROM job_plan WHERE job_id = ? ORDER BY idx",
                (job_id,),
            ).rows
            job = self._row(run, job_id)
        if job is None or job.segments_total is None:
            return None
        return [Cut(r["start_sample"], r["end_sample"], bool(r["split"]), r["speaker"]) for r in rows]

    def scored(self, job_id: str, after: int = -1) -> list[tuple[int, dict[str, Any]]]:
        """The job's scored segments from index `after + 1` on, in plan order."""
        with self._transaction() as run:
            rows = run(
                "SELECT idx, segment FROM job_scored WHERE job_id = ? AND idx > ? ORDER BY idx",
                (job_id, after),
            ).rows
        return [(row["idx"], json.loads(row["segment"])) for row in rows]

    def audio_bytes_pending(self) -> int:
        """The audio the unfinished jobs keep on disk."""
        with self._transaction() as run:
            rows = run(
                "SELECT COALESCE(SUM(audio_bytes), 0) AS n FROM jobs WHERE status IN ('queued', 'running')"
            ).rows
        return int(rows[0]["n"])

    def count_by_status(self) -> dict[str, int]:
        with self._transaction() as run:
            rows = run("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").rows
        return {status: 0 for status in STATUSES} | {row["status"]: int(row["n"]) for row in rows}

    def oldest_queued_at(self) -> float | None:
        """When the oldest queued job was accepted (None: none is queued)."""
        with self._transaction() as run:
            rows = run("SELECT MIN(created_at) AS t FROM jobs WHERE status = 'queued'").rows
        return None if rows[0]["t"] is None else float(rows[0]["t"])

    # ------------------------------------------------------------------------------------- a worker

    def claim(self, owner: str, lease_s: float, ttl_s: float) -> Claim | None:
        """The oldest queued job, or one whose worker went silent past its lease, now held by `owner`
        (its attempt counted). On the way, a silent worker's job that has used its attempts fails
        (worker_lost), and one whose cancel was asked is cancelled."""
        now = time.time()
        with self._transaction() as run:
            stale = run(
                "SELECT * FROM jobs WHERE status = 'running' AND lease_expires_at < ? "
                "AND (attempts >= max_attempts OR cancel_requested = 1) ORDER BY created_at"
                + self.SKIP_LOCKED,
                (now,),
            ).rows
            for job in map(Job.from_row, stale):
                if job.cancel_requested:
                    self._end(run, job, "cancelled", None, None, now, ttl_s)
                else:
                    lost = EmoserveError(
                        f"its worker stopped {job.attempts} times (crashed or killed); it is not tried "
                        "again (jobs_max_attempts)",
                        code="worker_lost",
                    )
                    self._end(run, job, "failed", None, lost, now, ttl_s)
            rows = run(
                "SELECT id FROM jobs WHERE status = 'queued' "
                "OR (status = 'running' AND lease_expires_at < ?) "
                "ORDER BY created_at, id LIMIT 1" + self.SKIP_LOCKED,
                (now,),
            ).rows
            if not rows:
                return None
            job_id = rows[0]["id"]
            run(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_owner = ?, "
                "lease_expires_at = ?, started_at = COALESCE(started_at, ?) WHERE id = ?",
                (owner, now + lease_s, now, job_id),
            )
            claimed = self._row(run, job_id)
        assert claimed is not None
        return Claim(claimed, owner, claimed.attempts)

    def _fenced(self, run: Run, claim: Claim, sets: str, params: Sequence[Any]) -> Job:
        """Update the claimed job's row if the claim still holds, else LeaseLost; the row updated."""
        rows = run(
            f"UPDATE jobs SET {sets} WHERE id = ? AND lease_owner = ? AND attempts = ? "
            "AND status = 'running' RETURNING *",
            (*params, claim.job.id, claim.owner, claim.attempt),
        ).rows
        if not rows:
            raise LeaseLost(f"job {claim.job.id}: attempt {claim.attempt} no longer holds it")
        return Job.from_row(rows[0])

    def renew(self, claim: Claim, lease_s: float, stage: str | None = None) -> bool:
        """The lease extended (and the stage); whether a cancel was asked. LeaseLost if taken."""
        with self._transaction() as run:
            return self._fenced(
                run,
                claim,
                "lease_expires_at = ?, stage = COALESCE(?, stage)",
                (time.time() + lease_s, stage),
            ).cancel_requested

    def save_plan(self, claim: Claim, cuts: Sequence[Cut], duration_s: float, lease_s: float) -> None:
        """The plan, once: the segments a resumed job scores again are these."""
        speech_s = sum(c.end - c.start for c in cuts) / 16_000
        with self._transaction() as run:
            self._fenced(
                run,
                claim,
                "segments_total = ?, speech_s_total = ?, duration_s = ?, lease_expires_at = ?",
                (len(cuts), speech_s, duration_s, time.time() + lease_s),
            )
            run("DELETE FROM job_plan WHERE job_id = ?", (claim.job.id,))
            for idx, cut in enumerate(cuts):
                run(
                    "INSERT INTO job_plan (job_id, idx, start_sample, end_sample, split, speaker) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (claim.job.id, idx, cut.start, cut.end, int(cut.split), cut.speaker),
                )

    def start_scoring(self, claim: Claim, model: str) -> int:
        """Scoring with `model`: a job scored so far by another model starts its scoring again (a job
        never mixes two models); the segments it drops."""
        with self._transaction() as run:
            job = self._row(run, claim.job.id)
            dropped = 0
            if job is not None and job.model is not None and job.model != model:
                dropped = run("DELETE FROM job_scored WHERE job_id = ?", (claim.job.id,)).count
            self._fenced(
                run,
                claim,
                "model = ?, stage = 'scoring', segments_done = (SELECT COUNT(*) FROM job_scored WHERE "
                "job_id = jobs.id), speech_s_done = CASE WHEN model = ? THEN speech_s_done ELSE 0 END",
                (model, model),
            )
        return dropped

    def commit_segment(
        self, claim: Claim, idx: int, segment: dict[str, Any], rate: float | None, lease_s: float
    ) -> bool:
        """One scored segment committed with the job's progress and a renewed lease (and, if the job
        asked for them and this segment takes it past another tenth, a job.progress event); whether a
        cancel was asked. LeaseLost (nothing written) if another worker holds the job now."""
        speech_s = segment["end_s"] - segment["start_s"]
        now = time.time()
        with self._transaction() as run:
            job = self._fenced(
                run,
                claim,
                "segments_done = segments_done + 1, speech_s_done = speech_s_done + ?, rate = ?, "
                "lease_expires_at = ?",
                (speech_s, rate, now + lease_s),
            )
            run(
                "INSERT INTO job_scored (job_id, idx, attempt, segment) VALUES (?, ?, ?, ?)",
                (claim.job.id, idx, claim.attempt, json.dumps(segment)),
            )
            if job.callback_progress and _next_step(job.segments_done, job.segments_total):
                self._event(run, job, PROGRESS_EVENT, now, progress=job.progress())
        return job.cancel_requested

    def finish(
        self,
        claim: Claim,
        status: Status,
        ttl_s: float,
        *,
        result: dict[str, Any] | None = None,
        error: EmoserveError | None = None,
    ) -> None:
        """The job's end, its webhook event in the same transaction (a crash between the two cannot
        lose the event). LeaseLost if another worker holds the job now."""
        with self._transaction() as run:
            self._fenced(run, claim, "lease_owner = lease_owner", ())
            job = self._row(run, claim.job.id)
            assert job is not None
            self._end(run, job, status, result, error, time.time(), ttl_s)

    def release(self, claim: Claim) -> None:
        """A worker that stops (the server shuts down) gives its job back to the queue."""
        with self._transaction() as run, suppress(LeaseLost):
            self._fenced(run, claim, "status = 'queued', lease_owner = NULL, lease_expires_at = NULL", ())

    def _end(
        self,
        run: Run,
        job: Job,
        status: Status,
        result: dict[str, Any] | None,
        error: EmoserveError | None,
        now: float,
        ttl_s: float,
    ) -> None:
        code, message = (None, None) if error is None else (error.code, str(error))
        run(
            "UPDATE jobs SET status = ?, stage = 'done', result = ?, error_code = ?, error_message = ?, "
            "finished_at = ?, expires_at = ?, lease_owner = NULL, lease_expires_at = NULL WHERE id = ?",
            (status, None if result is None else json.dumps(result), code, message, now, now + ttl_s, job.id),
        )
        self._event(run, job, EVENTS[status], now, status=status, error=error)

    def _event(
        self,
        run: Run,
        job: Job,
        event: str,
        now: float,
        *,
        status: Status | None = None,
        error: EmoserveError | None = None,
        progress: dict[str, Any] | None = None,
    ) -> None:
        """A webhook event into the outbox, in the open transaction (none if the job has no callback)."""
        if job.callback_url is None:
            return
        event_id = new_id()
        body: dict[str, Any] = {
            "event_id": event_id,
            "event": event,
            "job_id": job.id,
            "status": status or job.status,
            "created_at": now,
            "error": None if error is None else {"code": error.code, "message": str(error)},
        }
        if progress is not None:
            body["progress"] = progress
        run(
            "INSERT INTO webhooks (event_id, job_id, url, secret, body, created_at, next_attempt_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (event_id, job.id, job.callback_url, job.callback_secret, json.dumps(body), now, now),
        )

    # ---------------------------------------------------------------------------------- the caller

    def cancel(self, job_id: str, ttl_s: float) -> Job | None:
        """A queued job is cancelled at once; a running one when its worker next commits (or, if the
        worker is gone, when its lease runs out). None: no such job."""
        with self._transaction() as run:
            job = self._row(run, job_id)
            if job is None or job.done:
                return job
            if job.status == "queued":
                self._end(run, job, "cancelled", None, None, time.time(), ttl_s)
            else:
                run("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return self._row(run, job_id)

    def delete(self, job_id: str) -> Job | None:
        """The job's rows gone (its worker's next write is refused); the row as it was, to remove its
        audio. None: no such job."""
        with self._transaction() as run:
            job = self._row(run, job_id)
            if job is not None:
                for table in ("job_scored", "job_plan", "webhooks"):
                    run(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
                run("DELETE FROM jobs WHERE id = ?", (job_id,))
            return job

    def expired(self, now: float) -> list[str]:
        with self._transaction() as run:
            rows = run("SELECT id FROM jobs WHERE expires_at < ?", (now,)).rows
        return [row["id"] for row in rows]

    def audio_paths(self) -> set[str]:
        with self._transaction() as run:
            return {row["audio_path"] for row in run("SELECT audio_path FROM jobs").rows}

    # ------------------------------------------------------------------------------------ webhooks

    def due_webhooks(self, hold_s: float, limit: int = 10) -> list[Webhook]:
        """Events due for delivery, held for `hold_s` (another replica does not send them meanwhile)."""
        now = time.time()
        with self._transaction() as run:
            rows = run(
                "SELECT * FROM webhooks WHERE delivered_at IS NULL AND next_attempt_at <= ? "
                "ORDER BY next_attempt_at LIMIT ?" + self.SKIP_LOCKED,
                (now, limit),
            ).rows
            for row in rows:
                run(
                    "UPDATE webhooks SET next_attempt_at = ?, attempts = attempts + 1 WHERE event_id = ?",
                    (now + hold_s, row["event_id"]),
                )
        keys = ("event_id", "job_id", "url", "secret", "body", "created_at")
        return [Webhook(**{k: r[k] for k in keys}, attempts=r["attempts"] + 1) for r in rows]

    def webhook_tried(self, event_id: str, outcome: str, retry_at: float | None) -> None:
        """A delivery's outcome: done (retry_at None) or to be tried again at `retry_at`."""
        with self._transaction() as run:
            if retry_at is None:
                run(
                    "UPDATE webhooks SET delivered_at = ?, outcome = ? WHERE event_id = ?",
                    (time.time(), outcome, event_id),
                )
            else:
                run(
                    "UPDATE webhooks SET next_attempt_at = ?, outcome = ? WHERE event_id = ?",
                    (retry_at, outcome, event_id),
                )

    def webhooks(self, job_id: str) -> list[dict[str, Any]]:
        with self._transaction() as run:
            return run("SELECT * FROM webhooks WHERE job_id = ? ORDER BY created_at", (job_id,)).rows


def _next_step(done: int, total: int | None) -> bool:
    """Whether the `done`-th segment of `total` takes a job past another of its PROGRESS_STEPS (its end
    is not one: job.succeeded says it)."""
    if not total or done >= total:
        return False
    return done * PROGRESS_STEPS // total > (done - 1) * PROGRESS_STEPS // total


def _same_request(existing: Job, job: NewJob) -> Job:
    if existing.fingerprint != job.fingerprint:
        raise ApiError(
            "idempotency_key_reused",
            f"the Idempotency-Key {job.idempotency_key!r} was used for job {existing.id} with another file "
            "or other options; use a new key for a new job",
        )
    return existing


@dataclass(frozen=True)
class Done:
    """What a statement gave: its rows (as dicts) and the number of rows it changed."""

    rows: list[dict[str, Any]]
    count: int


class Run(Protocol):
    """One statement in the open transaction: `run(sql, params)` with `?` parameters."""

    def __call__(self, sql: str, params: Sequence[Any] = ..., /) -> Done: ...
