from __future__ import annotations

import json
import os
import re
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from emoserve.inference.results import FrameResult, Result
from emoserve.serving.settings import Settings
from emoserve.webui import saved as outputs
from emoserve.webui.saved import OutputStore, UIOutputs, saved_line

SCORES = {"angry": 0.1, "happy": 0.7, "neutral": 0.2}
SAMPLES = np.linspace(-0.5, 0.5, 16_000, dtype=np.float32)  # 1 s at 16 kHz


def make_result(embedding: np.ndarray | None = None, granularity: str = "utterance") -> Result:
    frames = [FrameResult(0.0, 0.02, "happy", 0.7, SCORES)] if granularity == "frame" else None
    return Result(
        emotion="happy",
        label_zh="开心",
        emoji="😊",
        confidence=0.7,
        scores=SCORES,
        duration_s=1.0,
        granularity=granularity,  # type: ignore[arg-type]
        model="tiny",
        random_weights=True,
        backend="torch",
        dtype="float32",
        frames=frames,
        embedding=embedding,
    )


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_folder_name_and_contents(tmp_path: Path) -> None:
    store = OutputStore(tmp_path)
    before = datetime.now().replace(microsecond=0)
    saved = store.save(make_result(), SAMPLES, extra={"timing": {"decode_s": 0.01}})

    assert re.fullmatch(r"outputs_\d{8}_\d{6}_[0-9a-f]{8}", saved.folder.name)
    assert entries(tmp_path) == [saved.folder.name]  # no temporary folder left behind
    assert sorted(p.name for p in saved.folder.iterdir()) == ["processed_audio.wav", "result.json"]
    assert saved.embedding is None
    assert saved.files == [saved.result_json, saved.processed_audio]

    data = json.loads(saved.result_json.read_text(encoding="utf-8"))
    assert list(data)[:5] == ["emotion", "confidence", "scores", "granularity", "timestamp"]
    assert (data["emotion"], data["confidence"], data["scores"]) == ("happy", 0.7, SCORES)
    assert data["label_zh"] == "开心" and data["random_weights"] is True
    assert data["timing"] == {"decode_s": 0.01}
    stamp = datetime.strptime(data["timestamp"], "%Y-%m-%d %H:%M:%S")
    assert before <= stamp <= datetime.now()
    assert saved.folder.name.startswith(f"outputs_{stamp:%Y%m%d_%H%M%S}_")

    audio, rate = sf.read(saved.processed_audio, dtype="float32")
    assert rate == 16_000
    np.testing.assert_allclose(audio, SAMPLES, atol=1 / 32768)


def test_embedding_and_frames_are_saved(tmp_path: Path) -> None:
    embedding = np.arange(12, dtype=np.float32).reshape(3, 4)
    saved = OutputStore(tmp_path).save(make_result(embedding, "frame"), SAMPLES)
    assert saved.embedding == saved.folder / "embedding.npy"
    np.testing.assert_array_equal(np.load(saved.embedding), embedding)
    data = json.loads(saved.result_json.read_text(encoding="utf-8"))
    assert data["granularity"] == "frame" and data["frames"][0]["emotion"] == "happy"


def test_names_are_unique_across_threads(tmp_path: Path) -> None:
    store = OutputStore(tmp_path)
    folders: list[Path] = []
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()  # all in the same second
        for _ in range(5):
            folders.append(store.save(make_result(), SAMPLES[:800]).folder)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({f.name for f in folders}) == 40
    assert entries(tmp_path) == sorted(f.name for f in folders)


def test_id_clash_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = iter(["aaaaaaaa", "aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(outputs, "_short_id", lambda: next(ids))
    store = OutputStore(tmp_path)
    first = store.save(make_result(), SAMPLES).folder
    second = store.save(make_result(), SAMPLES).folder
    assert first.name.endswith("_aaaaaaaa") and second.name.endswith("_bbbbbbbb")


def test_retention_by_count_keeps_the_newest(tmp_path: Path) -> None:
    store = OutputStore(tmp_path, keep=3)
    saved = []
    # The store orders folders by mtime: each saved one gets its own, increasing, in the past - set,
    # not waited for (a filesystem's mtime may be coarse) - so each new folder is the newest.
    past_ns = time.time_ns() - 3600 * 10**9
    for n in range(5):
        saved.append(store.save(make_result(), SAMPLES[:800]).folder)
        os.utime(saved[-1], ns=(past_ns + n * 10**9, past_ns + n * 10**9))
    assert store.folders() == saved[2:]
    assert entries(tmp_path) == sorted(f.name for f in saved[2:])


def test_retention_by_age(tmp_path: Path) -> None:
    store = OutputStore(tmp_path, max_age_s=60)
    old, new = (store.save(make_result(), SAMPLES[:800]).folder for _ in range(2))
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    assert store.prune() == [old]
    assert store.folders() == [new]
    assert store.prune(now=time.time() + 120) == [new]
    assert entries(tmp_path) == []


def test_no_retention_keeps_everything(tmp_path: Path) -> None:
    store = OutputStore(tmp_path)
    for _ in range(3):
        store.save(make_result(), SAMPLES[:800])
    assert store.prune(now=time.time() + 10**6) == []
    assert len(store.folders()) == 3


def test_failure_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = OutputStore(tmp_path)

    def broken_save(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        store.save(make_result(np.zeros(4, dtype=np.float32)), SAMPLES)
    assert entries(tmp_path) == []


def test_stale_temporary_folders_are_removed(tmp_path: Path) -> None:
    store = OutputStore(tmp_path)
    stale, fresh = tmp_path / ".tmp_stale", tmp_path / ".tmp_fresh"
    stale.mkdir()
    fresh.mkdir()
    day_ago = time.time() - 86_400
    os.utime(stale, (day_ago, day_ago))
    store.prune()
    assert entries(tmp_path) == [".tmp_fresh"]
    assert store.folders() == []  # temporary folders are never listed as outputs


@pytest.mark.parametrize(("keep", "max_age_s"), [(0, None), (None, 0.0), (None, -1.0)])
def test_bad_limits_are_named(tmp_path: Path, keep: int | None, max_age_s: float | None) -> None:
    with pytest.raises(ValueError, match=r"keep is 0|max_age_s is"):
        OutputStore(tmp_path, keep=keep, max_age_s=max_age_s)


def test_the_ui_saves_where_the_settings_say(tmp_path: Path) -> None:
    """The UI's store comes from the settings (0: no limit); with saving off, a temporary folder for the
    downloads only, deleted when the UI closes."""
    settings = Settings(outputs_dir=tmp_path / "kept", outputs_max_count=3, outputs_max_age_h=2)
    kept = UIOutputs.from_settings(settings)
    store = kept.store()
    assert kept.persistent and store is kept.kept and store is kept.store()
    assert (store.root, store.keep, store.max_age_s) == (tmp_path / "kept", 3, 7200)
    unlimited = Settings(outputs_dir=tmp_path / "all", outputs_max_count=0, outputs_max_age_h=0)
    no_limits = UIOutputs.from_settings(unlimited).store()
    assert (no_limits.keep, no_limits.max_age_s) == (None, None)

    off = UIOutputs.from_settings(Settings(save_outputs=False, outputs_dir=tmp_path / "never"))
    temporary = off.store()
    assert not off.persistent and off.store() is temporary and temporary.keep == outputs.DOWNLOADS_KEEP
    assert not (tmp_path / "never").exists()
    saved = temporary.save(make_result(), SAMPLES)
    assert saved_line(saved.folder, False) == f"saving is off; temporary downloads in: {saved.folder}"
    assert saved_line(saved.folder, True) == f"saved to: {saved.folder}"
    assert saved_line(None, True) == "not saved: see the warning"
    off.close()
    kept.close()
    assert not temporary.root.exists() and store.root.exists()
