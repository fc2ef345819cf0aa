"""Jobs in tests: a real PostgreSQL server (Debian's package, started in a temporary directory as an
unprivileged user), the two stores, a long recording, and a client's view of a job."""

from __future__ import annotations

import contextlib
import glob
import http.server
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf

from .audio import SPEECH, joined
from .server import free_port

TERMINAL = ("succeeded", "failed", "cancelled")


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server of its own on a Unix socket, for the time of the block: its admin URL. Run as
    `nobody` when we are root (PostgreSQL refuses to run as root). Skips when it is not installed."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (the postgres extra)")
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (scripts/setup-system.sh installs Debian's postgresql)")
    root = Path(tempfile.mkdtemp(prefix="emoserve-pg-"))
    data, sockets, log = root / "data", root / "run", root / "log"
    sockets.mkdir()
    as_user: list[str] = []
    if os.getuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for path in (root, sockets):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    port = free_port()

    def run(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120, cwd=root)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    try:
        run(
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "emoserve",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        options = f"-k {sockets} -p {port} -c listen_addresses='' -c fsync=off"
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start")
        yield f"postgresql://emoserve@/postgres?host={sockets}&port={port}"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
                timeout=60,
                cwd=root,
            )
        shutil.rmtree(root, ignore_errors=True)


def new_database(admin_url: str, name: str) -> str:
    """A fresh database on the server: its URL."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as db:
        db.execute(f'DROP DATABASE IF EXISTS "{name}"')
        db.execute(f'CREATE DATABASE "{name}"')
    return admin_url.replace("/postgres?", f"/{name}?")


def long_recording(path: Path, seconds: float, seed: int = 0) -> Path:
    """The fixture's speech clips joined with pauses, repeated to about `seconds`: many segments."""
    x, _ = joined(SPEECH, seed=seed)
    repeats = max(1, int(np.ceil(seconds * 16_000 / len(x))))
    sf.write(path, np.tile(x, repeats)[: int(seconds * 16_000)], 16_000, subtype="PCM_16")
    return path


def wait_job(
    client: httpx.Client, job_id: str, timeout_s: float = 120, until: Any = TERMINAL
) -> dict[str, Any]:
    """The job once its status is one of `until`."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job.get("status") in until:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} is still {job.get('status')} after {timeout_s} s: {job}")
        time.sleep(0.05)


class Receiver:
    """A webhook receiver on loopback: records each delivery (its headers, case-insensitive, and body) and
    answers the statuses it is given in turn, the last one from then on."""

    def __init__(self, statuses: list[int], port: int = 0) -> None:
        self.statuses = list(statuses)
        self.got: list[tuple[Any, bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.got.append((self.headers, body))
                status = outer.statuses.pop(0) if len(outer.statuses) > 1 else outer.statuses[0]
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
