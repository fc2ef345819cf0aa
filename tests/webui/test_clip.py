"""The clip tab (webui/clip.py): recognise, save, and say what went wrong."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pytest
import soundfile as sf

from emoserve.constants import EXAMPLES_DIR
from emoserve.errors import AudioError
from emoserve.serving.engine import Engine
from emoserve.serving.phase import Phase
from emoserve.serving.service import Service
from emoserve.serving.settings import Settings
from emoserve.webui import clip
from emoserve.webui import saved as outputs
from emoserve.webui.saved import UIOutputs
from tests.support.webui import (
    EXAMPLE,
    OTHER_EXAMPLE,
    make_service,
    recognize,
)

# Gradio's queue statistics (gradio/queueing.py) use pandas options and keywords that pandas 3
# deprecated; the warnings come from Gradio's server thread and are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")


def test_recognize_saves_a_folder_and_renders(fast_engine: Engine, tmp_path: Path) -> None:
    service = make_service(fast_engine, tmp_path)
    recognition = recognize(service, str(EXAMPLE), "frame", embedding=True)
    assert recognition.result == fast_engine.recognizer.predict(EXAMPLE, "frame", True)

    card, scores, timeline, log_text, files = clip.render(recognition)
    assert recognition.result.emotion in card and recognition.result.label_zh in card
    assert ("Random weights" in card) == recognition.result.random_weights
    assert len(scores) == len(recognition.result.scores)
    assert timeline.visible and set(timeline.value["columns"]) == {"time_s", "emotion", "probability"}
    for expected in ("44100 Hz", "1 channel", "resampled 44100 Hz -> 16000 Hz", "inference", "saved to"):
        assert expected in log_text
    assert [Path(f).name for f in files] == ["result.json", "processed_audio.wav", "embedding.npy"]

    (folder,) = tmp_path.iterdir()
    data = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    assert data["input"]["original_sample_rate"] == 44_100 and data["granularity"] == "frame"
    assert sf.info(str(folder / "processed_audio.wav")).samplerate == 16_000
    assert len(service.metrics.observed) == 1  # type: ignore[union-attr]


def test_saving_off_still_offers_downloads(fast_engine: Engine) -> None:
    recognition = recognize(make_service(fast_engine, None), str(OTHER_EXAMPLE))
    assert "saving is off" in clip.processing_log(recognition)
    assert not clip.render(recognition)[2].visible  # no timeline for an utterance result


@pytest.mark.parametrize("fault", ["gone", errno.ENOSPC, errno.EROFS])
def test_a_failed_save_still_shows_the_result(
    fast_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str | int
) -> None:
    """The outputs folder removed, the disk full mid-write, a read-only disk (root ignores file modes,
    so the last two are the writer failing as the kernel would): the result is shown, saving is said
    to have failed, and no half-written folder is left."""
    service = make_service(fast_engine, tmp_path / "outputs")
    saving = UIOutputs.from_settings(service.settings)
    store = saving.store()
    if fault == "gone":
        store.root.rmdir()  # saving now fails with FileNotFoundError
    else:

        def failing_write(*args: Any, **kwargs: Any) -> None:
            raise OSError(fault, os.strerror(int(fault)))

        monkeypatch.setattr(outputs.sf, "write", failing_write)
    with pytest.warns(UserWarning, match="could not be saved"):  # outside a page, gr.Warning warns
        recognition = recognize(service, str(EXAMPLE), saving=saving)
    assert recognition.saved is None and recognition.result.emotion
    assert clip.render(recognition)[4] is None
    assert "not saved" in clip.processing_log(recognition)
    if fault != "gone":
        assert list(store.root.iterdir()) == []


@pytest.mark.parametrize(
    ("phase", "reason", "engine_set", "message", "code"),
    [
        ("loading", None, False, r"still starting up.*\(loading\)", "not_ready"),
        ("warming", None, False, "still starting up", "not_ready"),
        ("failed", "no such model", False, r"could not be loaded.*no such model", "start_up_failed"),
        ("draining", None, True, "shutting down", "draining"),
    ],
)
def test_not_ready_is_a_clear_error(
    fast_engine: Engine, phase: Phase, reason: str | None, engine_set: bool, message: str, code: str
) -> None:
    """Counted under the API's codes for the same failures (one label per failure everywhere)."""
    service = make_service(fast_engine if engine_set else None, None, phase=phase, reason=reason)
    with pytest.raises(gr.Error, match=message):
        recognize(service, str(EXAMPLE))
    assert service.metrics.errors == [code]  # type: ignore[union-attr]


def test_bad_input_is_a_clear_error_and_the_ui_keeps_working(fast_engine: Engine, tmp_path: Path) -> None:
    service = make_service(fast_engine, None, max_audio_s=5.0)
    garbage = tmp_path / "notes.wav"
    garbage.write_bytes(b"this is not audio" * 10)
    with pytest.raises(gr.Error, match=r"notes\.wav: could not decode"):
        recognize(service, str(garbage))
    with pytest.raises(gr.Error, match=r"the limit is 5 s.*max_audio_s: --max-audio-s"):  # as the API says
        recognize(service, str(EXAMPLES_DIR / "en_7s_16k.flac"))
    with pytest.raises(gr.Error, match="Upload a clip"):
        recognize(service, None)
    assert recognize(service, str(EXAMPLE)).result.emotion
    assert service.metrics.errors == ["unsupported_audio", "audio_too_long"]  # type: ignore[union-attr]


def test_the_service_decodes_the_ui_path_as_the_api_bytes_within_its_own_limit() -> None:
    """Service.decode takes what the UI has (a path) and what the API has (bytes) alike; a clip over the
    limit names this server's setting, whichever it was."""
    service = Service(Settings(max_audio_s=5.0))
    from_path = service.decode(str(EXAMPLE), EXAMPLE.name)
    from_bytes = service.decode(EXAMPLE.read_bytes(), EXAMPLE.name)
    np.testing.assert_allclose(from_path.samples, from_bytes.samples, atol=1e-6)
    long = EXAMPLES_DIR / "en_7s_16k.flac"
    for source in (str(long), long.read_bytes()):
        with pytest.raises(AudioError, match=r"en_7s_16k\.flac.*the limit is 5 s.*this server's max_audio_s"):
            service.decode(source, long.name)
    with pytest.raises(AudioError, match="<upload>"):
        service.decode(b"this is not audio")
