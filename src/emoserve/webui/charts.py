"""The UI's charts: emotion colours and names, the data frames its plots draw, and the long recording's
SVG timeline (a row per speaker, its time axis and its legend) and segment table."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from emoserve.inference.results import HeadResult, Result, TimelineSegment
from emoserve.model.labels import EMOJI, EMOTION_COLOURS, OTHER_COLOUR

MAX_TIMELINE_POINTS = 400  # per label: a 10-min clip has 30,000 frames, too many for a browser plot
TABLE_COLUMNS = ("start (s)", "end (s)", "speaker", "emotion", "confidence", "split")
PLOT_WIDTH, PLOT_LEFT, PLOT_RIGHT = 1000, 90, 10  # SVG user units; the plot scales to the page's width
ROW_H, AXIS_H = 30, 26


def emotion_colour(label: str) -> str:
    return EMOTION_COLOURS.get(label, OTHER_COLOUR)


def display(label: str) -> str:
    """How charts name a label: "😊 happy"."""
    return f"{EMOJI.get(label, '')} {label}".strip()


def display_colours() -> dict[str, str]:
    """The colour of each label as `display` names it (for the charts whose categories are those names)."""
    return {display(label): colour for label, colour in EMOTION_COLOURS.items()}


# ---------------------------------------------------------------------------------------------- a clip


def scores_frame(result: Result) -> pd.DataFrame:
    """One row per label: `emotion` (as `display` names it), `probability`."""
    return pd.DataFrame(
        {
            "emotion": [display(label) for label in result.scores],
            "probability": list(result.scores.values()),
        }
    )


def timeline_frame(result: Result, max_points: int = MAX_TIMELINE_POINTS) -> pd.DataFrame | None:
    """Long-format per-label curves (`time_s`, `emotion`, `probability`); None for utterance results.
    More than `max_points` frames are averaged in equal windows, so the plot stays light."""
    if not result.frames:
        return None
    labels = list(result.scores)
    scores = np.array(
        [[frame.scores[label] for label in labels] for frame in result.frames]
    )  # (frames, labels)
    starts = np.array([frame.start_s for frame in result.frames])
    window = math.ceil(len(result.frames) / max_points)
    if window > 1:
        edges = np.arange(0, len(result.frames), window)
        scores = (
            np.add.reduceat(scores, edges, axis=0) / np.diff(np.append(edges, len(result.frames)))[:, None]
        )
        starts = starts[edges]
    return pd.DataFrame(
        {
            "time_s": np.repeat(starts, len(labels)),
            "emotion": labels * len(starts),
            "probability": scores.reshape(-1),
        }
    )


# ------------------------------------------------------------------------------------ a long recording


def segment_table(segments: Sequence[TimelineSegment]) -> pd.DataFrame:
    """A row per segment; with a head's results, a column of them too (named after the head)."""
    table = pd.DataFrame(
        [
            (
                round(s.start_s, 2),
                round(s.end_s, 2),
                s.speaker or "",
                f"{s.emoji} {s.emotion} · {s.label_zh}",
                round(s.confidence, 3),
                "yes" if s.split else "",
            )
            for s in segments
        ],
        columns=list(TABLE_COLUMNS),
    )
    named = [s.head for s in segments if s.head is not None]
    if named and len(named) == len(segments):
        cells = [head_cell(h) for h in named]
        table[f"{named[0].name} (yours)"] = cells
    return table


def head_cell(head: HeadResult) -> str:
    """A head's result in a table cell: its label and confidence, or a regression's values."""
    if head.values is not None:
        return " ".join(f"{t} {v:.2f}" for t, v in head.values.items())
    return f"{head.emoji or ''} {head.label} {head.confidence or 0.0:.2f}".strip()


def distribution_frame(summary: dict[str, Any]) -> pd.DataFrame:
    """The summary's time-weighted distribution: `emotion` as "😊 happy", `share`."""
    # The chart keeps the colour scale of the first value it is sent (Gradio 6.31 updates only the data),
    # so before any speech it gets every published label at 0: never an empty, untyped column.
    distribution: dict[str, float] = summary.get("distribution") or dict.fromkeys(EMOTION_COLOURS, 0.0)
    return pd.DataFrame(
        {
            "emotion": pd.Series([display(label) for label in distribution], dtype=str),
            "share": pd.Series(list(distribution.values()), dtype=float),
        }
    )


def timeline_svg(segments: Sequence[TimelineSegment], duration_s: float, svg_id: str = "tl-svg") -> str:
    """One bar per segment on a row per speaker (channel), coloured by emotion; hover for details."""
    rows = sorted({s.speaker for s in segments}, key=lambda sp: (sp is not None, sp or "")) or [None]
    duration_s = max([duration_s, *(s.end_s for s in segments), 1e-9])
    scale = (PLOT_WIDTH - PLOT_LEFT - PLOT_RIGHT) / duration_s  # user units per second
    height = len(rows) * ROW_H + AXIS_H
    parts = [
        f'<svg id="{svg_id}" viewBox="0 0 {PLOT_WIDTH} {height}" width="100%" '
        'xmlns="http://www.w3.org/2000/svg" style="font:12px sans-serif">',
        *(_row_name(i, speaker) for i, speaker in enumerate(rows)),
        *(_bar(s, rows.index(s.speaker), scale) for s in segments),
        *_axis(duration_s, scale, len(rows) * ROW_H),
        "</svg>",
    ]
    return "".join(parts) + _legend(segments)


def _row_name(row: int, speaker: str | None) -> str:
    name = speaker if speaker is not None else "all"
    y = row * ROW_H + ROW_H / 2 + 4
    return f'<text x="{PLOT_LEFT - 6}" y="{y:.1f}" text-anchor="end">{html.escape(name[:12])}</text>'


def _bar(s: TimelineSegment, row: int, scale: float) -> str:
    x = PLOT_LEFT + s.start_s * scale
    width = max(s.duration_s * scale, 1.0)
    tip = f"{s.start_s:.2f}-{s.end_s:.2f} s · {s.emoji} {s.emotion} {s.confidence:.0%}"
    return (
        f'<rect class="tl-segment" data-emotion="{html.escape(s.emotion)}" x="{x:.1f}" y="{row * ROW_H + 4}" '
        f'width="{width:.1f}" height="{ROW_H - 8}" rx="2" fill="{emotion_colour(s.emotion)}">'
        f"<title>{html.escape(tip)}</title></rect>"
    )


def _axis(duration_s: float, scale: float, top: float) -> list[str]:
    step = _tick_step(duration_s)
    parts = [f'<line x1="{PLOT_LEFT}" x2="{PLOT_WIDTH - PLOT_RIGHT}" y1="{top}" y2="{top}" stroke="#888"/>']
    for n in range(int(duration_s / step) + 1):
        t = n * step
        x = PLOT_LEFT + t * scale
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + 4}" stroke="#888"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + 18}" text-anchor="middle">{_clock(t, step)}</text>')
    return parts


def _tick_step(duration_s: float, ticks: int = 10) -> float:
    """1, 2 or 5 times a power of ten, so that about `ticks` ticks span the recording."""
    raw = max(duration_s / ticks, 1e-3)
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _clock(t: float, step: float) -> str:
    if t < 60:
        return f"{t:g} s" if step < 1 else f"{t:.0f} s"
    minutes, seconds = divmod(round(t), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _legend(segments: Sequence[TimelineSegment]) -> str:
    present = {s.emotion for s in segments}
    labels = [label for label in EMOTION_COLOURS if label in present] + sorted(present - set(EMOTION_COLOURS))
    items = "".join(
        f'<span style="margin-right:12px"><span style="display:inline-block;width:12px;height:12px;'
        f'border-radius:2px;background:{emotion_colour(label)};vertical-align:middle"></span> '
        f"{html.escape(display(label))}</span>"
        for label in labels
    )
    return f'<div id="tl-legend" style="margin-top:4px">{items}</div>'
