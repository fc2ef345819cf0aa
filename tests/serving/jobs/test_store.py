"""The job stores, SQLite and a real PostgreSQL server, through one suite: accepting with idempotency
keys and the queue limit, claims under leases (never one job to two workers, a stale worker's writes
refused, attempts that run out), the plan and the scored segments, cancel, delete, the webhook outbox."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from emoserve.audio.segments import Cut
from emoserve.errors import ApiError, EmoserveError
from emoserve.serving.jobs.store import JobStore, LeaseLost, NewJob
from tests.support.jobs import new_database
from tests.support.server import wait_for

TTL_S = 3600.0
SEGMENT = {"start_s": 1.0, "end_s": 2.5, "emotion": "neutral"}


@pytest.fixture(params=["sqlite", "postgres"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], JobStore]]:
    """Each call: another connection to the same database (as another process would have)."""
    if request.param == "sqlite":
        from emoserve.serving.jobs.sqlite import SqliteJobStore

        path = tmp_path / "jobs.sqlite3"

        def factory() -> JobStore:
            return SqliteJobStore(path)
    else:
        from emoserve.serving.jobs.postgres import PostgresJobStore

        url = new_database(request.getfixturevalue("postgres_admin"), f"jobs_{uuid.uuid4().hex[:12]}")

        def factory() -> JobStore:
            return PostgresJobStore(url)

    made: list[JobStore] = []

    def make() -> JobStore:
        made.append(factory())
        return made[-1]

    yield make
    for store in made:
        store.close()


@pytest.fixture
def store(make_store: Callable[[], JobStore]) -> JobStore:
    return make_store()


def new_job(
    n: int = 0,
    key: str | None = None,
    fingerprint: str = "f",
    callback: str | None = None,
    attempts: int = 3,
    progress: bool = False,
) -> NewJob:
    return NewJob(
        id=uuid.uuid4().hex,
        file=f"call{n}.wav",
        audio_path=f"/nowhere/{n}.audio",
        audio_bytes=1000,
        options={"channels": "mix", "vad": None, "spans": None, "head": None},
        metadata={"n": str(n)},
        idempotency_key=key,
        fingerprint=fingerprint,
        callback_url=callback,
        callback_secret="s3cret" if callback else None,
        max_attempts=attempts,
        created_at=time.time() + n * 1e-3,
        callback_progress=progress,
    )


def lease_over(store: JobStore, job_id: str) -> bool:
    job = store.get(job_id)
    return job is not None and time.time() > (job.lease_expires_at or 0)


def test_a_job_is_kept_and_listed_newest_first_in_pages(store: JobStore) -> None:
    ids = [store.add(new_job(n), 100)[0].id for n in range(5)]
    job = store.get(ids[0])
    assert job is not None and job.status == "queued" and job.file == "call0.wav" and job.attempts == 0
    assert job.metadata == {"n": "0"} and job.to_dict()["progress"]["percent"] == 0.0
    first = store.page(limit=3)
    assert [j.id for j in first] == ids[::-1][:3]
    rest = store.page(limit=3, after=first[-1].id)
    assert [j.id for j in rest] == ids[::-1][3:]
    claim = store.claim("w", 60, TTL_S)
    assert claim is not None and claim.job.id == ids[0]  # the oldest first
    assert [j.id for j in store.page("running")] == [ids[0]]
    assert store.count_by_status()["queued"] == 4
    assert store.check() == []


def test_one_key_one_request_one_job_and_another_request_under_it_is_refused(store: JobStore) -> None:
    job, created = store.add(new_job(0, key="k1", fingerprint="a"), 100)
    again, created_again = store.add(new_job(1, key="k1", fingerprint="a"), 100)
    assert created and not created_again and again.id == job.id
    with pytest.raises(ApiError) as reused:
        store.add(new_job(2, key="k1", fingerprint="b"), 100)
    assert reused.value.code == "idempotency_key_reused" and job.id in str(reused.value)
    assert len(store.page()) == 1


def test_ten_concurrent_submissions_with_one_key_give_one_job(make_store: Callable[[], JobStore]) -> None:
    stores = [make_store() for _ in range(10)]
    start = threading.Barrier(10)

    def submit(n: int) -> str:
        start.wait()
        return stores[n].add(new_job(n, key="same", fingerprint="x"), 100)[0].id

    with ThreadPoolExecutor(10) as pool:
        ids = set(pool.map(submit, range(10)))
    assert len(ids) == 1
    assert len(stores[0].page()) == 1


def test_a_full_queue_refuses_with_retry_after(store: JobStore) -> None:
    for n in range(2):
        store.add(new_job(n), 2)
    with pytest.raises(ApiError) as full:
        store.add(new_job(3), 2)
    assert full.value.code == "too_many_jobs" and full.value.status == 429
    assert full.value.retry_after_s and "jobs_max_queued" in str(full.value)


def test_a_stale_worker_is_fenced_off_once_another_takes_its_job(make_store: Callable[[], JobStore]) -> None:
    """A worker paused past its lease (SIGSTOP, a long GC) comes back: its writes are refused, and the
    job holds only its successor's segments."""
    first, second = make_store(), make_store()
    job, _ = first.add(new_job(0), 100)
    stale = first.claim("worker-a", 0.2, TTL_S)
    assert stale is not None and stale.attempt == 1
    first.save_plan(stale, [Cut(0, 16000), Cut(32000, 48000)], 3.0, 0.2)
    assert second.claim("worker-b", 60, TTL_S) is None  # the lease holds
    wait_for(lambda: lease_over(first, job.id), 5, "the lease to run out")
    taken = second.claim("worker-b", 60, TTL_S)
    assert taken is not None and taken.job.id == job.id and taken.attempt == 2
    with pytest.raises(LeaseLost):
        first.commit_segment(stale, 0, SEGMENT, None, 60)
    with pytest.raises(LeaseLost):
        first.finish(stale, "succeeded", TTL_S, result={"from": "a"})
    second.commit_segment(taken, 0, SEGMENT, 1.0, 60)
    assert [(idx, seg) for idx, seg in second.scored(job.id)] == [(0, SEGMENT)]
    second.finish(taken, "succeeded", TTL_S, result={"from": "b"})
    done = second.get(job.id)
    assert done is not None and done.status == "succeeded" and done.result == {"from": "b"}
    assert done.attempts == 2 and done.expires_at is not None


def test_a_job_whose_workers_keep_dying_fails_with_its_reason(store: JobStore) -> None:
    job, _ = store.add(new_job(0, attempts=2), 100)
    for attempt in (1, 2):
        claim = store.claim(f"w{attempt}", 0.05, TTL_S)
        assert claim is not None and claim.attempt == attempt
        wait_for(lambda: lease_over(store, job.id), 5, "the lease to run out")
    assert store.claim("w3", 60, TTL_S) is None
    failed = store.get(job.id)
    assert failed is not None and failed.status == "failed" and failed.error_code == "worker_lost"
    assert "2 times" in (failed.error_message or "")


def test_two_workers_never_claim_the_same_job(make_store: Callable[[], JobStore]) -> None:
    seed = make_store()
    ids = {seed.add(new_job(n), 100)[0].id for n in range(24)}
    workers = [make_store() for _ in range(4)]
    start = threading.Barrier(4)

    def drain(n: int) -> list[str]:
        start.wait()
        got = []
        while (claim := workers[n].claim(f"w{n}", 60, TTL_S)) is not None:
            got.append(claim.job.id)
        return got

    with ThreadPoolExecutor(4) as pool:
        claimed = [job_id for got in pool.map(drain, range(4)) for job_id in got]
    assert sorted(claimed) == sorted(ids)  # each job once, none left


def test_the_plan_is_stored_once_and_the_scored_segments_resume(store: JobStore) -> None:
    job, _ = store.add(new_job(0), 100)
    claim = store.claim("w", 60, TTL_S)
    assert claim is not None and store.plan(job.id) is None
    cuts = [Cut(0, 16000, False, None), Cut(20000, 52000, True, "ch1")]
    store.save_plan(claim, cuts, 4.0, 60)
    assert store.plan(job.id) == cuts
    assert store.start_scoring(claim, "tiny") == 0
    store.commit_segment(claim, 0, SEGMENT, 2.0, 60)
    progress = store.get(job.id).progress()  # type: ignore[union-attr]
    assert progress["segments_done"] == 1 and progress["segments_total"] == 2 and progress["percent"] == 50.0
    assert progress["speech_s_total"] == 3.0 and progress["eta_s"] == 0.8  # 1.5 s left at 2 s/s: 0.75
    assert store.start_scoring(claim, "tiny") == 0  # the same model: kept
    assert store.scored(job.id) == [(0, SEGMENT)]
    assert store.start_scoring(claim, "another") == 1  # never two models in one timeline
    assert store.scored(job.id) == [] and store.get(job.id).segments_done == 0  # type: ignore[union-attr]


def test_a_queued_job_is_cancelled_at_once_a_running_one_at_its_next_write(store: JobStore) -> None:
    queued, _ = store.add(new_job(0, callback="https://example.com/hook"), 100)
    running, _ = store.add(new_job(1), 100)
    claim = store.claim("w", 60, TTL_S)
    assert claim is not None and claim.job.id == queued.id
    store.release(claim)  # given back: queued again
    cancelled = store.cancel(queued.id, TTL_S)
    assert cancelled is not None and cancelled.status == "cancelled"
    claim = store.claim("w", 60, TTL_S)
    assert claim is not None and claim.job.id == running.id
    asked = store.cancel(running.id, TTL_S)
    assert asked is not None and asked.status == "running" and asked.cancel_requested
    assert store.commit_segment(claim, 0, SEGMENT, None, 60) is True
    [event] = store.webhooks(queued.id)
    assert '"event": "job.cancelled"' in event["body"] and event["delivered_at"] is None


def test_the_end_and_its_webhook_event_commit_together(store: JobStore) -> None:
    job, _ = store.add(new_job(0, callback="https://example.com/hook"), 100)
    claim = store.claim("w", 60, TTL_S)
    assert claim is not None
    store.finish(claim, "failed", TTL_S, error=EmoserveError("damaged", code="malformed_audio"))
    [due] = store.due_webhooks(hold_s=30)
    assert due.job_id == job.id and due.secret == "s3cret" and due.attempts == 1
    assert store.due_webhooks(hold_s=30) == []  # held while it is being sent
    store.webhook_tried(due.event_id, "http_500", time.time() - 1)
    [again] = store.due_webhooks(hold_s=30)
    assert again.event_id == due.event_id and again.attempts == 2  # the same event id on a retry
    store.webhook_tried(due.event_id, "delivered", None)
    store.webhook_tried(due.event_id, "delivered", None)
    assert store.due_webhooks(hold_s=0) == []


def test_progress_events_come_each_tenth_in_the_commits_transaction_when_asked(store: JobStore) -> None:
    """25 segments: job.progress as the 3rd, 5th, 8th, ... segment passes 10%, 20%, 30%, ... (9 events;
    100% is job.succeeded's), each with the progress its commit wrote; a job that did not ask gets none."""
    asked, _ = store.add(new_job(0, callback="https://example.com/hook", progress=True), 100)
    quiet, _ = store.add(new_job(1, callback="https://example.com/hook"), 100)
    for job in (asked, quiet):
        claim = store.claim("w", 60, TTL_S)
        assert claim is not None and claim.job.id == job.id and claim.job.callback_progress is (job is asked)
        store.save_plan(claim, [Cut(i * 16000, (i + 1) * 16000) for i in range(25)], 25.0, 60)
        store.start_scoring(claim, "tiny")
        for idx in range(25):
            store.commit_segment(claim, idx, SEGMENT, None, 60)
        store.finish(claim, "succeeded", TTL_S, result={})
    events = [json.loads(row["body"]) for row in store.webhooks(asked.id)]
    assert [e["event"] for e in events] == ["job.progress"] * 9 + ["job.succeeded"]
    done = [e["progress"]["segments_done"] for e in events[:-1]]
    assert done == [3, 5, 8, 10, 13, 15, 18, 20, 23]  # the first segment at or past each tenth
    assert [e["progress"]["percent"] for e in events[:-1]] == [100.0 * n / 25 for n in done]
    assert all(e["status"] == "running" and e["job_id"] == asked.id for e in events[:-1])
    assert len({e["event_id"] for e in events}) == 10
    assert [json.loads(row["body"])["event"] for row in store.webhooks(quiet.id)] == ["job.succeeded"]


def test_a_store_made_before_a_column_was_added_gets_it_when_opened(
    make_store: Callable[[], JobStore],
) -> None:
    """callback_progress came after the first schema: a database made without it is given it."""
    store = make_store()
    with store._transaction() as run:  # as the first schema made it
        run("ALTER TABLE jobs DROP COLUMN callback_progress")
        assert "callback_progress" not in store._columns(run, "jobs")
    store.close()
    again = make_store()
    job, _ = again.add(new_job(0, callback="https://example.com/hook", progress=True), 100)
    assert again.get(job.id).callback_progress is True  # type: ignore[union-attr]


def test_delete_leaves_no_row_and_refuses_the_worker(store: JobStore) -> None:
    job, _ = store.add(new_job(0, callback="https://example.com/hook"), 100)
    claim = store.claim("w", 60, TTL_S)
    assert claim is not None
    store.save_plan(claim, [Cut(0, 16000)], 1.0, 60)
    store.commit_segment(claim, 0, SEGMENT, None, 60)
    gone = store.delete(job.id)
    assert gone is not None and gone.audio_path == "/nowhere/0.audio"
    assert store.get(job.id) is None and store.scored(job.id) == [] and store.plan(job.id) is None
    with pytest.raises(LeaseLost):
        store.commit_segment(claim, 1, SEGMENT, None, 60)
    assert store.delete(job.id) is None and store.audio_paths() == set()


def test_expired_jobs_are_found_for_the_purge(store: JobStore) -> None:
    job, _ = store.add(new_job(0), 100)
    assert store.cancel(job.id, ttl_s=0.0) is not None
    assert store.expired(time.time() + 1) == [job.id]
    assert store.expired(time.time() - 10) == []


def test_a_postgres_store_connects_again_after_losing_its_connection(postgres_admin: str) -> None:
    """The server ends the store's session (a restart, a failover): the call that meets the loss fails,
    the next one connects again, and nothing committed is lost."""
    import psycopg

    from emoserve.serving.jobs.postgres import PostgresJobStore

    url = new_database(postgres_admin, f"jobs_{uuid.uuid4().hex[:12]}")
    store = PostgresJobStore(url)
    try:
        job, _ = store.add(new_job(0), 100)
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        with pytest.raises(EmoserveError) as lost:
            store.get(job.id)
        assert lost.value.code == "jobs_store_unavailable" and lost.value.status == 503
        assert lost.value.retry_after_s
        again = store.get(job.id)
        assert again is not None and again.id == job.id
    finally:
        store.close()


def test_a_postgres_session_frozen_inside_a_transaction_lets_go_of_its_row(postgres_admin: str) -> None:
    """A worker frozen while it holds a job's row lock (SIGSTOP inside a transaction): the server ends
    its session after the idle-in-transaction timeout, so another store's write to the row goes through
    rather than wait for the frozen one; the frozen one, when it wakes, meets a lost connection (503)."""
    from emoserve.serving.jobs.postgres import PostgresJobStore

    url = new_database(postgres_admin, f"jobs_{uuid.uuid4().hex[:12]}")
    frozen, other = PostgresJobStore(url, idle_in_transaction_s=1.0), PostgresJobStore(url)
    try:
        job, _ = frozen.add(new_job(0), 100)
        locked = threading.Event()
        woke: list[BaseException] = []

        def freeze() -> None:
            try:
                with frozen._transaction() as run:
                    run("SELECT id FROM jobs WHERE id = ? FOR UPDATE", (job.id,))
                    locked.set()
                    time.sleep(4.0)  # frozen, the row locked
            except BaseException as error:
                woke.append(error)

        thread = threading.Thread(target=freeze)
        thread.start()
        assert locked.wait(10)
        started = time.monotonic()
        cancelled = other.cancel(job.id, TTL_S)  # waits for the row's lock
        waited = time.monotonic() - started
        thread.join(10)
        assert cancelled is not None and cancelled.status == "cancelled"
        assert 0.5 < waited < 3.0  # let go at the 1 s timeout, not after the 4 s freeze
        [error] = woke
        assert isinstance(error, EmoserveError) and error.code == "jobs_store_unavailable"
        assert frozen.get(job.id).status == "cancelled"  # type: ignore[union-attr]  # connected again
    finally:
        frozen.close()
        other.close()
