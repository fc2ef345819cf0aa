"""Writing files and directories so that a reader sees the old one or the new one, never half, and a
killed process leaves nothing behind for good: `atomic_write` (a file), `atomic_dir` (a directory), both
through a hidden work space beside the destination (`work_dir`), and `sha256_file`.

Hidden work directories beside a destination, which a killed process does not leave behind for good.

A conversion or a download writes into `.<dest name>.<random>` beside its destination (one filesystem,
so the final rename is atomic) and removes it when done, whatever happens in Python. A SIGKILL, an OOM
kill or a power cut skips that: the directory stays, perhaps holding gigabytes. So while a process works
in one it holds an exclusive lock on `<directory>.lock` beside it - the kernel drops the lock when the
process dies - and each new work directory first removes the ones whose lock nobody holds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # not POSIX: work directories are still removed on exit, only not swept
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
LOCK_TEXT = b"emoserve work directory\n"  # another program's hidden .lock files are never ours to sweep
HASH_CHUNK_BYTES = 1 << 20


@contextmanager
def work_dir(dest: Path, suffix: str = "") -> Iterator[Path]:
    """A new, empty hidden directory beside `dest`, removed on exit (see the module docstring)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep(dest.parent)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent))
    lock = _hold_lock(work)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if lock is not None:
            Path(f"{work}{LOCK_SUFFIX}").unlink(missing_ok=True)
            os.close(lock)


def sweep(parent: Path) -> list[Path]:
    """Remove the work directories in `parent` whose process has died; the ones removed."""
    removed = []
    if fcntl is None:
        return removed
    for lock_path in parent.glob(f".*{LOCK_SUFFIX}"):
        work = Path(str(lock_path)[: -len(LOCK_SUFFIX)])
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except OSError:  # removed meanwhile by its owner or another sweep
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            ours = os.read(fd, len(LOCK_TEXT) + 1) == LOCK_TEXT
        except OSError:  # held: its process is alive and working
            ours = False
        if not ours:
            os.close(fd)
            continue
        try:
            log.warning("removing %s: left by a process that was killed while working in it", work)
            shutil.rmtree(work, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            removed.append(work)
        finally:
            os.close(fd)
    return removed


def _hold_lock(work: Path) -> int | None:
    """Lock `<work>.lock` for as long as this process lives or until closed. The file is locked under a
    name no sweep looks at, then renamed: a sweep never sees it unlocked."""
    if fcntl is None:
        return None
    fd, staging = tempfile.mkstemp(prefix=f"{work.name}.", suffix=".locking", dir=work.parent)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, LOCK_TEXT)
    os.rename(staging, f"{work}{LOCK_SUFFIX}")
    return fd


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a new, empty directory that replaces `dest` only if the block succeeds."""
    with work_dir(dest) as work:
        new = work / dest.name
        new.mkdir()
        yield new
        replace_dir(new, dest, work)


def replace_dir(new: Path, dest: Path, work: Path) -> None:
    """Put the directory `new` at `dest`. An old `dest` moves into `work` first (and goes with it): a new
    copy replaces, never merges. `new` and `work` are on `dest`'s filesystem, so each step is a rename."""
    if dest.exists():
        dest.rename(work / ".previous")
    new.rename(dest)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        # streamed: model.pt is ~2 GB and must not be read into memory at once
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_write(target: Path, *, binary: bool = False) -> Iterator[IO[Any]]:
    """Write to a temporary file beside `target`; it replaces `target` only when the block succeeds.
    A target that exists and is not a regular file (`-o /dev/null`, a FIFO) is written to as it is: a
    rename would replace the device itself with a file."""
    if target.exists() and not target.is_file():
        with _open_for_writing(os.open(target, os.O_WRONLY), binary) as out:
            yield out
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with _open_for_writing(fd, binary) as out:
            yield out
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open_for_writing(fd: int, binary: bool) -> IO[Any]:
    return os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="")
