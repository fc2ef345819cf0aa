"""Per-request output folders: what the web UI saves for each recognition, and their retention.

    save -> .tmp_<id>/ (processed_audio.wav, result.json, embedding.npy) -> rename to
    outputs_YYYYMMDD_HHMMSS_<id>/ -> prune (oldest beyond `keep`, older than `max_age_s`)
    save_timeline: the same for a long recording's timeline (timeline.json, timeline.csv; no audio copy)
    UIOutputs: the UI's choice of store (the settings' output store, or temporary downloads when saving
        is off), made once per UI; its `save` warns on the page when a disk fails (`save_once`: a job's
        timeline once, however often a page shows it), and `saved_line` is the "saved to" sentence

A folder appears whole or not at all: it is written under a hidden temporary name inside `root` (the same
file system, so the rename is atomic) and renamed only once every file is complete. Pruning renames a
folder away before deleting it, so a reader never sees one half-deleted either.
"""

from __future__ import annotations

import asyncio
import csv
import html
import io
import json
import logging
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import gradio as gr
import numpy as np
import soundfile as sf

from emoserve.constants import SAMPLE_RATE
from emoserve.inference.formats import segment_csv_fields, segment_csv_row
from emoserve.inference.results import Result

if TYPE_CHECKING:
    from emoserve.inference.results import Timeline
    from emoserve.serving.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "outputs_"
RESULT_JSON = "result.json"
PROCESSED_AUDIO = "processed_audio.wav"
EMBEDDING_NPY = "embedding.npy"
TIMELINE_JSON = "timeline.json"
TIMELINE_CSV = "timeline.csv"
FOLDER_TIME_FORMAT = "%Y%m%d_%H%M%S"
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"  # result.json `timestamp`, as the original app wrote it
ID_HEX_DIGITS = 8  # 32 random bits: a clash needs ~65k folders in one second; a clash is retried anyway
RENAME_ATTEMPTS = 5
# Hidden working names; a crash can leave one behind, so prune removes those older than this.
TMP_PREFIX = ".tmp_"
DELETING_PREFIX = ".deleting_"
STALE_TMP_S = 3600.0
FOLDER_PATTERN = re.compile(rf"^{PREFIX}\d{{8}}_\d{{6}}_[0-9a-f]{{{ID_HEX_DIGITS}}}$")
DOWNLOADS_KEEP = 64  # with saving off, downloads still need files; this many stay in a temp folder
SAVED_KEYS = 1024  # jobs whose saved folder the UI remembers (a folder pruned meanwhile is saved again)
Saved = TypeVar("Saved")


@dataclass(frozen=True)
class SavedOutput:
    folder: Path
    result_json: Path
    processed_audio: Path
    embedding: Path | None  # None unless the result carried an embedding

    @property
    def files(self) -> list[Path]:
        """The files for download, result first."""
        return [self.result_json, self.processed_audio, *([self.embedding] if self.embedding else [])]


@dataclass(frozen=True)
class SavedTimeline:
    folder: Path
    timeline_json: Path
    timeline_csv: Path

    @property
    def files(self) -> list[Path]:
        return [self.timeline_json, self.timeline_csv]


class OutputStore:
    """Saves one folder per recognition under `root`; safe to use from many threads and processes.

    `keep`: at most this many folders are kept (the oldest go first); None keeps any number.
    `max_age_s`: folders older than this are deleted; None keeps them forever.
    """

    def __init__(self, root: Path, keep: int | None = None, max_age_s: float | None = None) -> None:
        if keep is not None and keep < 1:
            raise ValueError(f"keep is {keep}; it must be at least 1 (or None for no limit)")
        if max_age_s is not None and not max_age_s > 0:
            raise ValueError(f"max_age_s is {max_age_s}; it must be positive (or None for no limit)")
        self.root = Path(root)
        self.keep = keep
        self.max_age_s = max_age_s
        self.root.mkdir(parents=True, exist_ok=True)

    def save(
        self, result: Result, samples: np.ndarray, *, extra: Mapping[str, Any] | None = None
    ) -> SavedOutput:
        """Write one recognition: `samples` is the 16 kHz mono audio the model saw; `extra` adds
        top-level fields to result.json (e.g. input details and timings)."""
        now = datetime.now()
        folder = self._save_folder(
            lambda tmp: _write_files(tmp, result, samples, result_fields(result, now, extra)), now
        )
        return _saved(folder, has_embedding=result.embedding is not None)

    def save_timeline(self, timeline: Timeline, *, extra: Mapping[str, Any] | None = None) -> SavedTimeline:
        """Write one long recording's timeline: timeline.json (the API's body, a `timestamp`, `extra`)
        and timeline.csv (a row per segment, a column per score). The audio is not copied: it may be hours."""
        now = datetime.now()
        fields = {**timeline.to_dict(), "timestamp": now.strftime(TIMESTAMP_FORMAT), **(extra or {})}

        def write(folder: Path) -> None:
            text = json.dumps(fields, ensure_ascii=False, indent=2)
            (folder / TIMELINE_JSON).write_text(text + "\n", encoding="utf-8")
            (folder / TIMELINE_CSV).write_text(timeline_csv(timeline), encoding="utf-8")

        folder = self._save_folder(write, now)
        return SavedTimeline(folder, folder / TIMELINE_JSON, folder / TIMELINE_CSV)

    def _save_folder(self, write: Callable[[Path], None], now: datetime) -> Path:
        """`write` fills a hidden folder, which is then renamed into view whole; then prune."""
        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            write(tmp)
            folder = self._publish(tmp, now)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune()
        return folder

    def folders(self) -> list[Path]:
        """Complete output folders, oldest first."""
        found = []
        for path in self.root.iterdir():
            if FOLDER_PATTERN.match(path.name):
                try:
                    found.append((path.stat().st_mtime_ns, path.name, path))
                except FileNotFoundError:
                    continue  # pruned by another thread or process meanwhile
        return [path for _, _, path in sorted(found)]

    def prune(self, now: float | None = None) -> list[Path]:
        """Delete folders beyond `keep` and older than `max_age_s` (`now`: a time.time() value).
        Returns the folders deleted."""
        now = time.time() if now is None else now
        self._remove_stale_tmp(now)
        if self.keep is None and self.max_age_s is None:
            return []
        folders = self.folders()
        doomed = folders[: max(0, len(folders) - self.keep)] if self.keep is not None else []
        if self.max_age_s is not None:
            doomed += [f for f in folders[len(doomed) :] if _age_s(f, now) > self.max_age_s]
        return [folder for folder in doomed if _remove(folder)]

    def _publish(self, tmp: Path, now: datetime) -> Path:
        # rename() onto an existing non-empty folder fails, so a clash of ids cannot merge two results.
        for _ in range(RENAME_ATTEMPTS):
            folder = self.root / f"{PREFIX}{now.strftime(FOLDER_TIME_FORMAT)}_{_short_id()}"
            if folder.exists():
                continue
            try:
                tmp.rename(folder)
            except OSError:
                if folder.exists():
                    continue
                raise
            return folder
        raise FileExistsError(f"no free output folder name in {self.root} after {RENAME_ATTEMPTS} tries")

    def _remove_stale_tmp(self, now: float) -> None:
        for path in self.root.iterdir():
            if path.name.startswith((TMP_PREFIX, DELETING_PREFIX)) and _age_s(path, now) > STALE_TMP_S:
                shutil.rmtree(path, ignore_errors=True)


class UIOutputs:
    """Where the web UI saves each result: `kept`, the output store of the settings, or with saving off a
    temporary folder that keeps the last DOWNLOADS_KEEP (the downloads need files). One per UI."""

    def __init__(self, kept: OutputStore | None) -> None:
        self.kept = kept
        self._temporary: OutputStore | None = None
        self._saved: dict[str, SavedTimeline] = {}  # by key, for save_once

    @classmethod
    def from_settings(cls, settings: Settings) -> UIOutputs:
        """save_outputs, outputs_dir, outputs_max_count and outputs_max_age_h (0: no limit)."""
        if not settings.save_outputs:
            return cls(None)
        keep, max_age_h = settings.outputs_max_count, settings.outputs_max_age_h
        return cls(OutputStore(settings.outputs_dir, keep=keep or None, max_age_s=max_age_h * 3600 or None))

    @property
    def persistent(self) -> bool:
        """Results are kept (False: temporary downloads only)."""
        return self.kept is not None

    def store(self) -> OutputStore:
        if self.kept is not None:
            return self.kept
        if self._temporary is None:  # made on first use: a UI with saving on never makes one
            root = Path(tempfile.mkdtemp(prefix="emoserve-downloads-"))
            self._temporary = OutputStore(root, keep=DOWNLOADS_KEEP)
        return self._temporary

    async def save(self, what: str, write: Callable[[OutputStore], Saved]) -> Saved | None:
        """`write(store)` in a thread. A full or read-only disk costs the downloads, not the result on
        screen: the page is warned (`what` names the result) and None returned."""
        store = self.store()
        try:
            return await asyncio.to_thread(write, store)
        except OSError as error:
            log.warning("could not save the %s under %s: %s", what, store.root, error)
            gr.Warning(html.escape(f"The {what} could not be saved ({error}); there are no downloads."))
            return None

    async def save_once(
        self, key: str, what: str, write: Callable[[OutputStore], SavedTimeline]
    ) -> SavedTimeline | None:
        """As `save`, once per `key` (a job's id) for this UI: a page that shows the same job again (a
        reload, another window) gets the same folder while it is there."""
        saved = self._saved.get(key)
        if saved is not None and saved.timeline_json.exists():
            return saved
        saved = await self.save(what, write)
        if saved is not None:
            self._saved[key] = saved
            while len(self._saved) > SAVED_KEYS:
                self._saved.pop(next(iter(self._saved)))  # the oldest: a dict keeps insertion order
        return saved

    def close(self) -> None:
        """Delete the temporary downloads (the kept outputs stay)."""
        if self._temporary is not None:
            shutil.rmtree(self._temporary.root, ignore_errors=True)


def saved_line(folder: Path | None, persistent: bool) -> str:
    """Where a result went, for the processing log and the timeline card."""
    if folder is None:
        return "not saved: see the warning"
    where = "saved to" if persistent else "saving is off; temporary downloads in"
    return f"{where}: {folder}"


def result_fields(result: Result, now: datetime, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """result.json: the fields people already parse first, then ours."""
    fields = result.to_dict()
    head = {key: fields.pop(key) for key in ("emotion", "confidence", "scores", "granularity")}
    return {**head, "timestamp": now.strftime(TIMESTAMP_FORMAT), **fields, **(extra or {})}


def timeline_csv(timeline: Timeline) -> str:
    """A row per segment, as `predict --segments --format csv` writes them."""
    labels = list(timeline.segments[0].scores) if timeline.segments else []
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=segment_csv_fields(labels), lineterminator="\n")
    writer.writeheader()
    for segment in timeline.segments:
        writer.writerow(segment_csv_row(timeline.file, segment))
    return out.getvalue()


def _write_files(folder: Path, result: Result, samples: np.ndarray, fields: Mapping[str, Any]) -> None:
    sf.write(folder / PROCESSED_AUDIO, samples, SAMPLE_RATE)  # soundfile's WAV default: 16-bit PCM
    if result.embedding is not None:
        np.save(folder / EMBEDDING_NPY, result.embedding)
    text = json.dumps(fields, ensure_ascii=False, indent=2)
    (folder / RESULT_JSON).write_text(text + "\n", encoding="utf-8")


def _saved(folder: Path, *, has_embedding: bool) -> SavedOutput:
    return SavedOutput(
        folder=folder,
        result_json=folder / RESULT_JSON,
        processed_audio=folder / PROCESSED_AUDIO,
        embedding=folder / EMBEDDING_NPY if has_embedding else None,
    )


def _short_id() -> str:
    return uuid.uuid4().hex[:ID_HEX_DIGITS]


def _age_s(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _remove(folder: Path) -> bool:
    """Rename away, then delete: the folder vanishes at once, and of two pruners only one wins."""
    doomed = folder.with_name(f"{DELETING_PREFIX}{folder.name}_{uuid.uuid4().hex[:ID_HEX_DIGITS]}")
    try:
        folder.rename(doomed)
    except FileNotFoundError:
        return False
    shutil.rmtree(doomed, ignore_errors=True)
    log.debug("pruned %s", folder)
    return True
