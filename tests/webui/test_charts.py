"""The charts (webui/charts.py): a long timeline averaged, the timeline's plot."""

from __future__ import annotations

import numpy as np
import pytest

from emoserve.inference.results import FrameResult, Result, TimelineSegment
from emoserve.model.labels import EMOTION_COLOURS
from emoserve.webui import charts

# Gradio's queue statistics (gradio/queueing.py) use pandas options and keywords that pandas 3
# deprecated; the warnings come from Gradio's server thread and are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")


def test_long_timelines_are_averaged() -> None:
    labels = ("happy", "sad")
    frames = [
        FrameResult(i * 0.02, (i + 1) * 0.02, "happy", 1.0, {"happy": i % 2, "sad": 1 - i % 2})
        for i in range(1000)
    ]
    result = Result(
        *("happy", "开心", "😊", 0.5, dict.fromkeys(labels, 0.5), 20.0, "frame"),
        *("tiny", False, "torch", "float32"),
        frames,
    )
    table = charts.timeline_frame(result, max_points=100)
    assert table is not None
    assert len(table) == 100 * len(labels)
    np.testing.assert_allclose(table["probability"], 0.5)  # windows of 10 alternating frames
    assert table["time_s"].iloc[-1] == pytest.approx(990 * 0.02)


def test_timeline_plot_rows_colours_and_axis() -> None:
    def segment(start: float, end: float, speaker: str | None, emotion: str) -> TimelineSegment:
        return TimelineSegment(start, end, speaker, emotion, "", "", 0.9, {emotion: 0.9}, False)

    segments = [segment(0, 10, "B", "sad"), segment(30, 95, "A", "happy"), segment(100, 110, "B", "sad")]
    svg = charts.timeline_svg(segments, 120.0)
    assert svg.index(">A</text>") < svg.index(">B</text>")  # rows sorted by speaker
    assert svg.count(EMOTION_COLOURS["sad"]) == 3  # two bars and the legend
    assert ">1:00</text>" in svg and ">2:00</text>" in svg  # minutes once past a minute
    assert "tl-segment" not in charts.timeline_svg([], 0.0)
