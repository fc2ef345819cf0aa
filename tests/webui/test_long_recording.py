"""The long-recording tab (webui/long_recording.py): a timeline streamed segment by segment, saved, and its
errors."""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
import soundfile as sf

from emoserve.audio.segments import Recording
from emoserve.inference.results import TimelineSegment
from emoserve.inference.timeline import score_segments
from emoserve.model.labels import EMOTION_COLOURS
from emoserve.serving.engine import Engine
from emoserve.webui import long_recording
from emoserve.webui.saved import OutputStore, UIOutputs
from tests.support.webui import (
    RECORDING_CLIPS,
    FakeMetrics,
    build_timeline,
    joined_recording,
    make_service,
    run,
    table_rows,
    two_sided_call,
)

# Gradio's queue statistics (gradio/queueing.py) use pandas options and keywords that pandas 3
# deprecated; the warnings come from Gradio's server thread and are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")


def test_timeline_streams_segments_then_saves_json_and_csv(
    fast_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(long_recording, "UPDATE_S", 0.0)  # every segment is sent as it comes
    recording = joined_recording(tmp_path / "meeting.wav")
    service = make_service(fast_engine, tmp_path / "outputs")
    updates = build_timeline(service, str(recording))

    expected = list(score_segments(fast_engine.recognizer, Recording(str(recording))))
    assert len(expected) >= len(RECORDING_CLIPS)
    progress, card, distribution, plot, table, files = updates[-1]
    assert 'data-state="done"' in progress and f"{len(expected)} segments" in progress
    assert [row[:4] for row in table_rows(table)] == [
        [round(s.start_s, 2), round(s.end_s, 2), "", f"{s.emoji} {s.emotion} · {s.label_zh}"]
        for s in expected
    ]
    assert [row[4] for row in table_rows(table)] == pytest.approx([s.confidence for s in expected], abs=2e-3)
    assert plot.count('class="tl-segment"') == len(expected)
    for s in expected:
        assert f'data-emotion="{s.emotion}"' in plot and EMOTION_COLOURS[s.emotion] in plot
    assert distribution["share"].sum() == pytest.approx(1.0, abs=1e-4)
    assert "RANDOM WEIGHTS" in card and "meeting.wav" in card

    # Streamed: the table grew one segment at a time, with the progress in seconds of the total.
    running = [u for u in updates[:-1] if isinstance(u[4], type(table))]
    assert [len(u[4]) for u in running] == list(range(len(expected) + 1))
    assert all('data-state="running"' in u[0] and " s of " in u[0] for u in updates[:-1])

    (folder,) = OutputStore(tmp_path / "outputs").folders()
    assert [Path(f) for f in files] == [folder / "timeline.json", folder / "timeline.csv"]
    saved = json.loads((folder / "timeline.json").read_text(encoding="utf-8"))
    assert saved["file"] == "meeting.wav" and saved["random_weights"] is True and saved["timestamp"]
    assert len(saved["segments"]) == len(expected) and saved["summary"]["segments"] == len(expected)
    assert saved["duration_s"] == pytest.approx(len(sf.read(str(recording))[0]) / 16_000)
    with open(folder / "timeline.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["emotion"] for row in rows] == [s.emotion for s in expected]
    assert {f"score_{label}" for label in expected[0].scores} <= set(rows[0])  # a column per score
    assert f"saved to: {folder}" in card
    metrics = service.metrics
    assert isinstance(metrics, FakeMetrics)
    assert service.timelines_closed == [len(expected)] and service.timelines_running == 0  # type: ignore[attr-defined]
    assert metrics.errors == []


def test_timeline_separate_channels_and_a_segments_file(fast_engine: Engine, tmp_path: Path) -> None:
    service = make_service(fast_engine, None)
    *_, (_, _, _, plot, table, files) = build_timeline(
        service, str(two_sided_call(tmp_path / "call.wav")), "separate"
    )
    assert {row[2] for row in table_rows(table)} == {"ch0", "ch1"}
    assert ">ch0</text>" in plot and ">ch1</text>" in plot  # a row per channel
    assert [Path(f).name for f in files] == ["timeline.json", "timeline.csv"]  # saving off: temporary

    spans = tmp_path / "diarization.rttm"
    spans.write_text(
        "SPEAKER meeting 1 2.0 3.0 <NA> <NA> alice <NA> <NA>\n"
        "SPEAKER meeting 1 7.0 3.0 <NA> <NA> bob <NA> <NA>\n",
        encoding="utf-8",
    )
    *_, (_, card, _, plot, table, _) = build_timeline(
        service, str(joined_recording(tmp_path / "meeting.wav")), "mix", str(spans)
    )
    assert [(row[0], row[1], row[2]) for row in table_rows(table)] == [
        (2.0, 5.0, "alice"),
        (7.0, 10.0, "bob"),
    ]
    assert ">alice</text>" in plot and "alice: mostly" in card


def test_timeline_errors_are_clear_and_counted(fast_engine: Engine, tmp_path: Path) -> None:
    service = make_service(fast_engine, None, max_timeline_s=10.0)
    recording = str(joined_recording(tmp_path / "meeting.wav"))  # 19 s
    garbage = tmp_path / "notes.wav"
    garbage.write_bytes(b"this is not audio" * 10)
    bad_segments = tmp_path / "segments.json"
    bad_segments.write_text('[{"start_s": 1}]', encoding="utf-8")
    good_segments = tmp_path / "ok.json"
    good_segments.write_text('[{"start_s": 1, "end_s": 2}]', encoding="utf-8")
    with pytest.raises(gr.Error, match="Upload a recording"):
        build_timeline(service, None)
    with pytest.raises(gr.Error, match=r"notes\.wav: could not decode"):
        build_timeline(service, str(garbage))
    with pytest.raises(gr.Error, match="the limit is 10 s"):
        build_timeline(service, recording)
    with pytest.raises(gr.Error, match=r"segments\.json: segment 0"):
        build_timeline(service, recording, segments=str(bad_segments))
    with pytest.raises(gr.Error, match="use channels=mix"):
        build_timeline(service, recording, "separate", str(good_segments))
    with pytest.raises(gr.Error, match="threshold"):
        build_timeline(service, recording, threshold=1.0)
    assert service.metrics.errors == [  # type: ignore[union-attr]
        "unsupported_audio",
        "audio_too_long",
        "invalid_parameter",
        "invalid_parameter",
        "invalid_parameter",
    ]
    assert service.timelines_closed == []  # type: ignore[attr-defined]  # nothing started

    service = make_service(None, None, phase="loading")
    with pytest.raises(gr.Error, match="still starting up"):
        build_timeline(service, recording)
    assert service.metrics.errors == ["not_ready"]  # type: ignore[union-attr]


def test_timeline_failing_part_way_keeps_what_was_shown(fast_engine: Engine, tmp_path: Path) -> None:
    service = make_service(fast_engine, None, timeline_fails_after=1)
    updates: list[tuple[Any, ...]] = []
    with pytest.raises(gr.Error, match="busy"):
        build_timeline(service, str(joined_recording(tmp_path / "meeting.wav")), updates=updates)
    assert updates and 'data-state="running"' in updates[-1][0]
    metrics = service.metrics
    assert isinstance(metrics, FakeMetrics)
    assert metrics.errors == ["queue_full"]
    assert service.timelines_closed == [1] and service.timelines_running == 0  # type: ignore[attr-defined]


def test_timeline_save_failure_still_shows_the_result(fast_engine: Engine, tmp_path: Path) -> None:
    service = make_service(fast_engine, tmp_path / "outputs")
    saving = UIOutputs.from_settings(service.settings)
    saving.store().root.rmdir()
    with pytest.warns(UserWarning, match="could not be saved"):
        *_, (progress, card, _, plot, table, files) = build_timeline(
            service, str(joined_recording(tmp_path / "meeting.wav", RECORDING_CLIPS[:1])), saving=saving
        )
    assert files is None and "not saved" in card
    assert len(table) == plot.count('class="tl-segment"') >= 1 and 'data-state="done"' in progress


def test_paced_ticks_through_silence_and_closes_early() -> None:
    """The progress moves while no segment comes; leaving early ends the source (its decoding)."""
    closed = asyncio.Event()

    async def slow() -> AsyncIterator[TimelineSegment]:
        try:
            await asyncio.sleep(0.25)
            yield TimelineSegment(0, 1, None, "sad", "", "", 1.0, {}, False)
            await asyncio.sleep(3600)
            yield TimelineSegment(1, 2, None, "sad", "", "", 1.0, {}, False)
        finally:
            closed.set()

    async def main() -> list[Any]:
        seen: list[Any] = []
        paced = long_recording._paced(slow(), 0.1)
        async for item in paced:
            seen.append(item)
            if len(seen) == 6:
                break
        await paced.aclose()
        return seen

    seen = run(main())
    assert seen[0] is None and seen.count(None) == 5  # ticks before and after the one segment
    assert closed.is_set()
