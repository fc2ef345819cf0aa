"""The Live tab's window (webui/live.py), chunk by chunk as the browser sends them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from emoserve.audio.segments import Recording
from emoserve.inference.recognizer import Recognizer
from emoserve.inference.timeline import score_segments
from emoserve.serving.engine import Engine
from tests.support.webui import (
    RECORDING_CLIPS,
    FakeService,
    joined_recording,
    run,
    ui_settings,
)

# Gradio's queue statistics (gradio/queueing.py) use pandas options and keywords that pandas 3
# deprecated; the warnings come from Gradio's server thread and are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")


def test_the_live_tab_runs_the_streams_session_and_a_refusal_is_said_once(
    engine: Engine, tmp_path: Path, tiny_recognizer: Recognizer
) -> None:
    """The Live tab's window, chunk by chunk as the browser sends them (WAV files of 0.25 s): its
    segments are the timeline's of the same audio, Stop gives the summary and frees the stream; a stream
    the service refuses is one error, and the chunks after it are left alone until Record."""
    from emoserve.errors import ServiceUnavailable
    from emoserve.webui.live import STREAM_EVERY_S, LiveWindow, render

    recording = joined_recording(tmp_path / "talk.wav", RECORDING_CLIPS[:2])
    samples, rate = sf.read(recording, dtype="int16")
    size = int(STREAM_EVERY_S * rate)
    chunks = []
    for n, at in enumerate(range(0, len(samples), size)):
        chunks.append(str(tmp_path / f"chunk{n}.wav"))
        sf.write(chunks[-1], samples[at : at + size], rate, subtype="PCM_16")
    service = FakeService(engine, ui_settings(None))

    async def stream(window: LiveWindow) -> None:
        for chunk in chunks:
            await window.feed(chunk)
        await window.stop()

    window = LiveWindow(service)
    run(stream(window))
    expected = list(score_segments(tiny_recognizer, Recording(str(recording))))
    assert [(s.start_s, s.end_s) for s in window.segments] == [(s.start_s, s.end_s) for s in expected]
    for got, want in zip(window.segments, expected, strict=True):
        np.testing.assert_allclose(list(got.scores.values()), list(want.scores.values()), atol=1e-5)
    card, strip, state = render(window, service)
    assert 'data-state="done"' in state and f"in {len(expected)} utterances" in state
    assert strip.count('class="tl-segment"') == len(expected) and 'id="live-random"' in card
    assert window.current is not None and window.current["type"] == "segment"
    assert service.streams_open == 0

    service.phase = "warming"
    refused = LiveWindow(service)
    with pytest.raises(ServiceUnavailable):
        run(refused.feed(chunks[0]))
    run(refused.close())  # as the tab does on the error
    run(refused.feed(chunks[1]))  # left alone: no second error
    assert refused.live is None and service.streams_open == 0
