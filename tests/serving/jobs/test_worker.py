"""Jobs through `emoserve serve` as real processes, so that SIGKILL is real: a job killed part-way resumes
at its next segment after the restart and gives /v1/timeline's result; a server killed between a job's
end and its webhook still sends it after the restart, with the same event id and a valid signature;
two servers on one PostgreSQL database score each job once. Also: the purge."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from emoserve.serving.jobs.sqlite import SqliteJobStore
from emoserve.serving.jobs.store import NewJob
from emoserve.serving.jobs.worker import Jobs
from emoserve.serving.service import Service
from emoserve.serving.settings import Settings
from tests.support.jobs import TERMINAL, Receiver, long_recording, new_database, wait_job
from tests.support.paths import MODEL
from tests.support.server import (
    assert_same_segments,
    first_answer,
    first_answer_with,
    free_port,
    serve_process,
    wait_for,
)

SERVE_ARGS = (
    "--model", str(MODEL),
    "--jobs-lease-s", "2",  # the restarted server takes the killed one's job 2 s after its last write
    "--jobs-poll-s", "0.05",
    "--max-timeline-s", "900",
    "--max-timeline-upload-mb", "100",
    "--jobs-max-upload-mb", "100",
    "--ready-wait-s", "60",
)  # fmt: skip
SEGMENT_KEYS = ("start_s", "end_s", "emotion", "speaker", "split")


@contextlib.contextmanager
def server(tmp_path: Path, *args: str, prelude: str | None = None) -> Iterator[tuple[Any, httpx.Client]]:
    with serve_process(tmp_path, *SERVE_ARGS, *args, prelude=prelude) as (process, url):
        first_answer(f"{url}/healthz", time.monotonic(), 60)
        first_answer_with(f"{url}/readyz", 200, 120)
        with httpx.Client(base_url=url, timeout=120) as client:
            yield process, client


def scored_attempts(db: Path, job_id: str) -> list[int]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT attempt FROM job_scored WHERE job_id = ? ORDER BY idx", (job_id,))
        return [row[0] for row in rows]


@pytest.mark.slow
def test_a_job_killed_part_way_resumes_at_its_next_segment(tmp_path: Path) -> None:
    """SIGKILL at about 30% of a 10-minute recording; after the restart the job succeeds on its second
    attempt, the segments committed before the kill are kept (not scored again), and the result equals
    /v1/timeline's for the same file, segment for segment."""
    recording = long_recording(tmp_path / "call.wav", 600.0)
    with server(tmp_path) as (process, client):
        job = client.post("/v1/jobs", content=recording.read_bytes()).json()
        deadline = time.monotonic() + 300
        while (progress := client.get(f"/v1/jobs/{job['id']}").json()["progress"])["percent"] < 30:
            assert time.monotonic() < deadline, progress
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    assert progress["percent"] < 100, "the job ended before the kill: nothing was resumed"
    committed = progress["segments_done"]
    with server(tmp_path) as (_, client):
        done = wait_job(client, job["id"], timeout_s=600)
        assert done["status"] == "succeeded" and done["attempts"] == 2, done
        result = client.get(f"/v1/jobs/{job['id']}/result").json()
        metrics = client.get("/metrics").text
        timeline = client.post("/v1/timeline", content=recording.read_bytes())
        assert timeline.status_code == 200, timeline.text
    attempts = scored_attempts(tmp_path / "home" / "jobs" / "jobs.sqlite3", job["id"])
    assert len(attempts) == done["progress"]["segments_total"] == len(result["segments"])
    assert attempts.count(1) >= committed > 0  # what was committed before the kill was kept
    assert attempts.count(2) < len(attempts)  # and the rest only was scored after the restart
    assert attempts == sorted(attempts)  # the second attempt went on where the first stopped
    assert "emoserve_jobs_resumed_total 1.0" in metrics
    assert f"emoserve_job_segments_kept_total {attempts.count(1)}.0" in metrics
    want = timeline.json()
    for key in ("file", "duration_s", "speech_s", "model", "channels", "vad"):
        assert result[key] == want[key], key
    assert_same_segments(result["segments"], want["segments"], SEGMENT_KEYS)
    assert result["summary"]["dominant"] == want["summary"]["dominant"]


@pytest.mark.slow
def test_a_server_killed_while_accepting_made_no_job_and_the_retry_makes_one(tmp_path: Path) -> None:
    """SIGKILL while the upload arrives (before the job's commit): after the restart there is no job;
    the client's retry with the same Idempotency-Key makes one, and a second retry gets its id."""
    clip = long_recording(tmp_path / "clip.wav", 20.0).read_bytes()
    key = {"Idempotency-Key": "call-7"}
    with server(tmp_path) as (process, client):
        url = httpx.URL(str(client.base_url))
        with socket.create_connection((url.host, url.port)) as raw:
            head = (
                f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nIdempotency-Key: call-7\r\n"
                f"Content-Type: audio/wav\r\nContent-Length: {len(clip)}\r\n\r\n"
            ).encode()
            raw.sendall(head + clip[: len(clip) // 2])
            audio = tmp_path / "home" / "jobs" / "audio"
            wait_for(lambda: any(audio.iterdir()), 10, "the upload to be spooled")
            process.send_signal(signal.SIGKILL)
            process.wait(30)
    with server(tmp_path) as (_, client):
        assert client.get("/v1/jobs").json()["jobs"] == []  # accepted means committed: nothing was
        first = client.post("/v1/jobs", content=clip, headers=key)
        again = client.post("/v1/jobs", content=clip, headers=key)
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"] and again.headers["idempotent-replayed"] == "true"
        assert [job["id"] for job in client.get("/v1/jobs").json()["jobs"]] == [first.json()["id"]]
        assert wait_job(client, first.json()["id"])["status"] == "succeeded"


# The server's process, once a job is committed, writes its id to MARKER and holds the answer: the 202
# never leaves before the kill.
HOLD_AFTER_COMMIT = """
import pathlib, time
from emoserve.serving.jobs.store import JobStore
_add = JobStore.add
def _held(self, job, max_queued):
    made = _add(self, job, max_queued)
    pathlib.Path({marker!r}).write_text(made[0].id)
    time.sleep(600)
    return made
JobStore.add = _held
"""


@pytest.mark.slow
def test_a_server_killed_after_the_commit_before_the_202_has_the_job_and_the_retry_gets_its_id(
    tmp_path: Path,
) -> None:
    """SIGKILL once the job is committed but before its 202 is sent (the server holds the answer there):
    the client gets no answer; after the restart its retry with the same Idempotency-Key gets the job
    that was committed (202, Idempotent-Replayed), no second one, and the job succeeds."""
    clip = long_recording(tmp_path / "clip.wav", 20.0).read_bytes()
    key = {"Idempotency-Key": "call-8"}
    marker = tmp_path / "committed"
    answers: list[httpx.Response | Exception] = []
    with server(tmp_path, prelude=HOLD_AFTER_COMMIT.format(marker=str(marker))) as (process, client):

        def post() -> None:
            try:
                answers.append(client.post("/v1/jobs", content=clip, headers=key))
            except httpx.TransportError as error:
                answers.append(error)

        sender = threading.Thread(target=post)
        sender.start()
        wait_for(marker.exists, 30, "the job to be committed")
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        sender.join(30)
    [lost] = answers
    assert isinstance(lost, httpx.TransportError), lost  # the 202 never reached the client
    committed = marker.read_text()
    with server(tmp_path) as (_, client):
        retry = client.post("/v1/jobs", content=clip, headers=key)
        assert retry.status_code == 202, retry.text
        assert retry.json()["id"] == committed and retry.headers["idempotent-replayed"] == "true"
        assert [job["id"] for job in client.get("/v1/jobs").json()["jobs"]] == [committed]
        assert wait_job(client, committed)["status"] == "succeeded"


def backlog(client: httpx.Client, ids: list[str]) -> tuple[int, bool]:
    """(the segments the jobs have committed, whether they have all ended)."""
    jobs = [client.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
    return sum(j["progress"]["segments_done"] for j in jobs), all(j["status"] in TERMINAL for j in jobs)


@pytest.mark.slow
def test_a_kill_loop_over_a_backlog_leaves_every_accepted_job_ended(tmp_path: Path) -> None:
    """Five jobs accepted, the server killed (SIGKILL) three times at moments of its work and started
    again: every job ends (succeeded, or failed with worker_lost once its attempts are used), each
    succeeded job holds every segment of its plan once, and the database's integrity check passes."""
    clips = [long_recording(tmp_path / f"c{n}.wav", 30.0, seed=n) for n in range(5)]
    ids: list[str] = []
    for round_ in range(4):
        with server(tmp_path, "--jobs-max-attempts", "3") as (process, client):
            if not ids:
                ids = [client.post("/v1/jobs", content=c.read_bytes()).json()["id"] for c in clips]
            if round_ == 3:
                done = [wait_job(client, job_id, timeout_s=300) for job_id in ids]
                break
            deadline = time.monotonic() + 60
            scored, ended = backlog(client, ids)
            while time.monotonic() < deadline and not ended:  # kill once this round committed some
                now, ended = backlog(client, ids)
                if now >= scored + 3 + round_:
                    break
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
            process.wait(30)
    assert {job["status"] for job in done} <= {"succeeded", "failed"}
    assert all(job["error"]["code"] == "worker_lost" for job in done if job["status"] == "failed")
    db = tmp_path / "home" / "jobs" / "jobs.sqlite3"
    store = SqliteJobStore(db)
    try:
        assert store.check() == []
        for job in done:
            if job["status"] == "succeeded":
                plan = store.plan(job["id"])
                assert plan is not None and [i for i, _ in store.scored(job["id"])] == list(range(len(plan)))
    finally:
        store.close()


@pytest.mark.slow
def test_a_server_killed_between_done_and_notify_still_notifies(tmp_path: Path) -> None:
    """The receiver is down when the job ends (the event stays in the outbox), the server is killed;
    after the restart, with the receiver up, the event arrives once, signed, with the event id the
    store wrote in the job's last transaction."""
    port = free_port()
    clip = long_recording(tmp_path / "clip.wav", 12.0)
    db = tmp_path / "home" / "jobs" / "jobs.sqlite3"
    with server(tmp_path, "--allow-private-callbacks") as (process, client):
        form = {"callback_url": f"http://127.0.0.1:{port}/hook", "callback_secret": "s3cret"}
        files = {"file": ("clip.wav", clip.read_bytes(), "audio/wav")}
        job = client.post("/v1/jobs", files=files, data=form).json()
        wait_job(client, job["id"])
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        [(event_id, delivered)] = conn.execute("SELECT event_id, delivered_at FROM webhooks").fetchall()
    assert delivered is None
    receiver = Receiver([204], port)
    try:
        with server(tmp_path, "--allow-private-callbacks"):
            deadline = time.monotonic() + 60
            while not receiver.got and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        receiver.close()
    [(headers, body)] = receiver.got
    event = json.loads(body)
    assert (
        event["event_id"] == event_id and event["event"] == "job.succeeded" and event["job_id"] == job["id"]
    )
    t, v1 = (part.split("=", 1)[1] for part in headers["Emoserve-Signature"].split(","))
    assert hmac.compare_digest(v1, hmac.new(b"s3cret", f"{t}.".encode() + body, hashlib.sha256).hexdigest())


@pytest.mark.slow
def test_two_servers_on_one_postgres_database_score_each_job_once(
    tmp_path: Path, postgres_admin: str
) -> None:
    url = new_database(postgres_admin, f"jobs_{uuid.uuid4().hex[:12]}")
    shared = tmp_path / "shared-jobs"  # the audio on a path both replicas see
    clips = [long_recording(tmp_path / f"c{n}.wav", 8.0, seed=n) for n in range(6)]
    args = ("--jobs-db", url, "--jobs-dir", str(shared))
    with server(tmp_path / "a", *args) as (_, first), server(tmp_path / "b", *args) as (_, second):
        ids = [
            (first if n % 2 else second).post("/v1/jobs", content=clip.read_bytes()).json()["id"]
            for n, clip in enumerate(clips)
        ]
        done = [wait_job(first, job_id) for job_id in ids]
        assert [job["status"] for job in done] == ["succeeded"] * len(ids)
        assert [job["attempts"] for job in done] == [1] * len(ids)  # each claimed once, by one server
        assert second.get(f"/v1/jobs/{ids[0]}/result").json() == first.get(f"/v1/jobs/{ids[0]}/result").json()
    import psycopg

    with psycopg.connect(url) as db:
        owners = db.execute("SELECT COUNT(DISTINCT attempt), COUNT(*) FROM job_scored").fetchone()
    assert owners is not None and owners[0] == 1


def test_the_purge_deletes_expired_jobs_and_orphaned_audio(tmp_path: Path) -> None:
    settings = Settings(jobs_dir=tmp_path / "jobs", ui=False)
    jobs = Jobs(Service(settings), SqliteJobStore(tmp_path / "jobs" / "jobs.sqlite3"))
    audio = jobs.audio_dir / "kept.audio"
    audio.write_bytes(b"x")
    orphan = jobs.audio_dir / "orphan.audio"
    orphan.write_bytes(b"y")
    job, _ = jobs.store.add(
        NewJob(
            id="j1", file="a.wav", audio_path=str(audio), audio_bytes=1, options={}, metadata={},
            idempotency_key=None, fingerprint="f", callback_url=None, callback_secret=None, max_attempts=3,
            created_at=time.time(),
        ),
        10,
    )  # fmt: skip
    jobs.store.cancel(job.id, ttl_s=60.0)
    assert jobs.purge(now=time.time()) == 0 and orphan.exists()  # young: maybe a job being accepted
    assert jobs.purge(now=time.time() + 7200) == 1
    assert jobs.store.get(job.id) is None and not audio.exists() and not orphan.exists()
    jobs.store.close()


def stderr_so_far(process: Any) -> str:
    """What a running server has written to stderr until now (without waiting for more)."""
    fd = process.stderr.fileno()
    os.set_blocking(fd, False)
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_a_paused_worker_is_taken_over_and_its_late_writes_are_refused(
    tmp_path: Path, postgres_admin: str
) -> None:
    """Two servers on one PostgreSQL database. The one scoring a job is paused (SIGSTOP) part-way; once
    its lease has run out (or, if it froze inside a transaction, once PostgreSQL ended its session) the
    other takes the job and goes on from the next segment. The paused one, woken (SIGCONT), writes
    nothing more: its next write is refused (it says so and stops). Each segment of the plan is stored
    once, and the result equals /v1/timeline's."""
    import psycopg

    url = new_database(postgres_admin, f"jobs_{uuid.uuid4().hex[:12]}")
    shared = tmp_path / "shared-jobs"
    recording = long_recording(tmp_path / "call.wav", 120.0)
    args = ("--jobs-db", url, "--jobs-dir", str(shared))

    def attempts_stored(job_id: str) -> list[int]:
        with psycopg.connect(url) as db:
            rows = db.execute("SELECT attempt FROM job_scored WHERE job_id = %s ORDER BY idx", (job_id,))
            return [row[0] for row in rows]

    with server(tmp_path / "a", *args) as (a, first), server(tmp_path / "b", *args) as (b, second):
        job = first.post("/v1/jobs", content=recording.read_bytes()).json()
        wait_for(lambda: len(attempts_stored(job["id"])) >= 3, 120, "a few segments")
        with psycopg.connect(url) as db:
            row = db.execute("SELECT lease_owner FROM jobs WHERE id = %s", (job["id"],)).fetchone()
        assert row is not None and row[0] is not None
        paused, watcher = (a, second) if f":{a.pid}:" in row[0] else (b, first)
        assert f":{paused.pid}:" in row[0]
        paused.send_signal(signal.SIGSTOP)
        try:
            time.sleep(0.5)  # a commit that was on its way has landed (or it froze inside it)
            before = attempts_stored(job["id"])
            wait_for(lambda: attempts_stored(job["id"]).count(2) >= 3, 120, "the other server to go on")
        finally:
            paused.send_signal(signal.SIGCONT)
        done = wait_job(watcher, job["id"], timeout_s=300)
        assert done["status"] == "succeeded" and done["attempts"] == 2, done
        said: list[str] = []

        def stopped() -> bool:  # a late write refused (LeaseLost), or its frozen session ended
            said.append(stderr_so_far(paused))
            return any(words in "".join(said) for words in ("another worker holds it now", "given back"))

        wait_for(stopped, 30, "the woken server to give the job up")
        result = watcher.get(f"/v1/jobs/{job['id']}/result").json()
        metrics = watcher.get("/metrics").text
        timeline = watcher.post("/v1/timeline", content=recording.read_bytes())
        assert timeline.status_code == 200, timeline.text
        assert first.get("/healthz").status_code == 200  # the woken server serves on
    stored = attempts_stored(job["id"])
    assert len(stored) == done["progress"]["segments_total"] == len(result["segments"])
    assert stored.count(1) == before.count(1) > 0  # nothing the paused worker scored after its pause
    assert stored == sorted(stored)  # the second attempt went on where the first stopped
    assert "emoserve_jobs_resumed_total 1.0" in metrics
    want = timeline.json()
    assert_same_segments(result["segments"], want["segments"], SEGMENT_KEYS)
    assert result["summary"]["dominant"] == want["summary"]["dominant"]
