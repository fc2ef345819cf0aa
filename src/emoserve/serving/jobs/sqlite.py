"""The default job store: one SQLite file in jobs_dir, in write-ahead-log mode, nothing to install.

Every commit is synchronous (`synchronous=FULL`): a job answered 202 is on disk, and so is each scored
segment. Writers take the write lock when their transaction begins (`BEGIN IMMEDIATE`), so two processes
on one file (a server and its restart, or two servers) serialise rather than fail part-way; one claim
gives one job to one worker. One connection per store, shared by the threads of one process under a lock.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from emoserve.serving.jobs.store import Done, JobStore, Run

BUSY_TIMEOUT_MS = 30_000  # another process's transaction: wait for it rather than fail


class SqliteJobStore(JobStore):
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self.create_schema()

    @contextmanager
    def _transaction(self) -> Iterator[Run]:
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")

            def run(sql: str, params: Sequence[Any] = ()) -> Done:
                cursor = db.execute(sql, tuple(params))
                rows = [dict(row) for row in cursor.fetchall()]
                return Done(rows, cursor.rowcount)

            try:
                yield run
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _columns(self, run: Run, table: str) -> set[str]:
        return {row["name"] for row in run(f"PRAGMA table_info({table})").rows}

    def check(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("PRAGMA integrity_check").fetchall()
        problems = [str(row[0]) for row in rows]
        return [] if problems == ["ok"] else problems

    def close(self) -> None:
        with self._lock:
            self._db.close()
