"""The job store of several replicas: PostgreSQL (`--jobs-db postgresql://...`), through psycopg 3.

The SQL is the SQLite store's (serving/jobs/store.py); a claim locks the row it takes with
`FOR UPDATE SKIP LOCKED`, so two workers asking at once get two different jobs, never one job twice, and
neither waits for the other. The replicas' jobs_dir must be one shared path (the audio lives there).
One connection per store, shared by the threads of one process under a lock.

A transaction here lasts milliseconds. A worker frozen inside one (SIGSTOP, a VM paused, a debugger)
would hold its job's row lock for as long as it is frozen, and another worker could not take the job
once its lease ran out (the claim skips locked rows): the server ends such a session after
IDLE_IN_TRANSACTION_S (`idle_in_transaction_session_timeout`), rolling its transaction back; the frozen
worker, when it wakes, meets a lost connection and gives the job up.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from emoserve.errors import EmoserveError
from emoserve.serving.jobs.store import Done, JobStore, Run

SCHEMA_LOCK = 0x656D6F  # any number the replicas agree on: "emo"
STORE_RETRY_AFTER_S = 5.0
IDLE_IN_TRANSACTION_S = 10.0  # far above a transaction's milliseconds, below the 60 s lease


class PostgresJobStore(JobStore):
    SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, idle_in_transaction_s: float = IDLE_IN_TRANSACTION_S) -> None:
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise EmoserveError(
                "jobs_db names PostgreSQL, but psycopg is not installed: pip install 'emoserve[postgres]'",
                code="invalid_setting",
            ) from None
        self._lock = threading.Lock()
        idle_ms = max(1, round(idle_in_transaction_s * 1000))

        def connect() -> Any:
            db = psycopg.connect(url, autocommit=True, row_factory=dict_row)
            db.execute(f"SET idle_in_transaction_session_timeout = {idle_ms}")
            return db

        self._connect = connect
        # a connection lost, or ended by the server after a transaction's freeze (an InternalError)
        self._lost = (psycopg.OperationalError, psycopg.errors.IdleInTransactionSessionTimeout)
        self._db = self._connect()
        self.create_schema()

    def create_schema(self) -> None:
        """Under a lock of the database's: replicas starting at once would race on CREATE TABLE."""
        with self._transaction() as run:
            run("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,))
            self._create_schema(run)

    def _columns(self, run: Run, table: str) -> set[str]:
        rows = run(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ?",
            (table,),
        ).rows
        return {row["column_name"] for row in rows}

    @contextmanager
    def _transaction(self) -> Iterator[Run]:
        """A transaction; a connection lost (the server restarted, a failover) fails the call that meets
        it with jobs_store_unavailable (503), and the next call connects again."""
        with self._lock:
            try:
                if self._db.closed:
                    self._db = self._connect()
                with self._transaction_on(self._db) as run:
                    yield run
            except self._lost as error:
                raise EmoserveError(
                    f"the jobs' database cannot be reached ({type(error).__name__}); retry shortly",
                    code="jobs_store_unavailable",
                    retry_after_s=STORE_RETRY_AFTER_S,
                ) from None

    @contextmanager
    def _transaction_on(self, db: Any) -> Iterator[Run]:
        def run(sql: str, params: Sequence[Any] = ()) -> Done:
            cursor = db.execute(sql.replace("?", "%s"), tuple(params))
            rows = [dict(row) for row in cursor.fetchall()] if cursor.description else []
            return Done(rows, cursor.rowcount)

        with db.transaction():
            yield run

    def check(self) -> list[str]:
        """PostgreSQL checks its pages itself; what is checked here is the jobs' own invariants."""
        with self._transaction() as run:
            rows = run(
                "SELECT id FROM jobs WHERE status = 'running' AND lease_owner IS NULL "
                "UNION SELECT job_id FROM job_scored s WHERE NOT EXISTS "
                "(SELECT 1 FROM jobs j WHERE j.id = s.job_id)"
            ).rows
        return [f"job {row['id']}: inconsistent" for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
