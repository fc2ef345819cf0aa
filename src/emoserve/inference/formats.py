"""Output lines for clips, timelines and live streams: JSON lines, CSV rows and the terminal table, one
builder for each line shape, used by the CLI and the HTTP API's NDJSON stream alike.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol

from emoserve.constants import Granularity
from emoserve.errors import EmoserveError
from emoserve.inference.results import HeadResult, Result, Timeline, TimelineSegment

if TYPE_CHECKING:
    from emoserve.inference.protocol import Reading, StreamMessage
    from emoserve.model.head import Head


class Outcome(Protocol):
    """What a line is written from: `corpus.Outcome` (named here, not imported: corpus -> recognizer -> ...
    -> formats would be a circle)."""

    @property
    def file(self) -> str: ...
    @property
    def result(self) -> Result | None: ...
    @property
    def error(self) -> str | None: ...
    def to_dict(self) -> dict[str, object]: ...


Format = Literal["jsonl", "csv", "table"]

# ------------------------------------------------------------------------------------- a clip's lines

CLIP_CSV_FIELDS = [
    "file",
    "emotion",
    "label_zh",
    "emoji",
    "confidence",
    "duration_s",
    "granularity",
    "model",
    "random_weights",
    "backend",
    "dtype",
    "embedding",
    "error",
]


def score_column(label: str) -> str:
    """The CSV column of one label's score, for clips and segments alike."""
    return f"score_{label}"


def head_columns(head: Head | None) -> list[str]:
    """The CSV columns of a head's result: its name, label, confidence and a score per label; a
    regression head's name and a value per target."""
    if head is None:
        return []
    if head.task == "regression":
        return ["head", *(f"head_value_{target}" for target in head.label_names)]
    return ["head", "head_label", "head_confidence", *(f"head_score_{label}" for label in head.label_names)]


def head_values(head: HeadResult | None) -> dict[str, object]:
    if head is None:
        return {}
    row: dict[str, object] = {"head": head.name}
    if head.values is not None:
        row.update({f"head_value_{target}": round(v, 6) for target, v in head.values.items()})
        return row
    row["head_label"] = head.label
    row["head_confidence"] = round(head.confidence or 0.0, 6)
    row.update({f"head_score_{label}": round(p, 6) for label, p in head.scores.items()})
    return row


def head_text(head: HeadResult | None) -> str:
    if head is None:
        return ""
    if head.values is not None:
        return f"  {head.name}: " + " ".join(f"{t} {v:.3f}" for t, v in head.values.items())
    emoji = f"{head.emoji} " if head.emoji else ""
    return f"  {head.name}: {emoji}{head.label} {head.confidence or 0.0:.3f}"


RANDOM_WARNING = "WARNING: this model has RANDOM weights (a test model): its predictions are meaningless."
RANDOM_MARK = "  (RANDOM WEIGHTS)"  # the end of each line scored by such a model


class OutcomeWriter:
    """Streams outcomes as jsonl (one object per input), csv (one row, a column per score) or a table."""

    def __init__(
        self,
        out: IO[str],
        fmt: Format,
        labels: Sequence[str],
        granularity: Granularity,
        head: Head | None = None,
    ) -> None:
        self.out, self.fmt = out, fmt
        self.score_fields = [score_column(label) for label in labels]
        if fmt == "csv":
            extra = ["frames"] if granularity == "frame" else []
            fields = CLIP_CSV_FIELDS + self.score_fields + head_columns(head) + extra
            self.csv = csv.DictWriter(out, fieldnames=fields)
            self.csv.writeheader()

    def write(self, outcome: Outcome) -> None:
        if self.fmt == "jsonl":
            self.out.write(json_line(outcome.to_dict()) + "\n")
        elif self.fmt == "csv":
            self.csv.writerow(clip_csv_row(outcome))
        else:
            self.out.write(clip_table_line(outcome) + "\n")
        self.out.flush()


def clip_csv_row(outcome: Outcome) -> dict[str, object]:
    row = {k: v for k, v in outcome.to_dict().items() if k in CLIP_CSV_FIELDS}
    if outcome.result:
        row.update({score_column(k): round(v, 6) for k, v in outcome.result.scores.items()})
        if outcome.result.frames is not None:  # the per-frame emotions, in order
            row["frames"] = " ".join(f.emotion for f in outcome.result.frames)
        row.update(head_values(outcome.result.head))
    return row


def clip_table_line(outcome: Outcome) -> str:
    if outcome.result is None:
        return f"{outcome.file}  ERROR  {outcome.error}"
    r = outcome.result
    runners_up = sorted(r.scores.items(), key=lambda kv: -kv[1])[1:3]
    others = ", ".join(f"{k} {v:.2f}" for k, v in runners_up)
    head = f"{r.emoji} {r.emotion} ({r.label_zh}) {r.confidence:.3f}"
    random = RANDOM_MARK if r.random_weights else ""
    return f"{outcome.file}  {head}  {r.duration_s:.2f} s  [{others}]{head_text(r.head)}{random}"


# ------------------------------------------------------------------------------ a recording's lines

SEGMENT_CSV_FIELDS = [
    "file", "start_s", "end_s", "speaker", "emotion", "label_zh", "emoji", "confidence", "split"
]  # fmt: skip


def segment_csv_fields(labels: Sequence[str]) -> list[str]:
    """timeline.csv's columns: a segment's fields, then a score column per label."""
    return [*SEGMENT_CSV_FIELDS, *(score_column(label) for label in labels)]


def segment_csv_row(file: str, segment: TimelineSegment) -> dict[str, Any]:
    row = {key: value for key, value in segment.to_dict().items() if key in SEGMENT_CSV_FIELDS}
    row["file"] = file
    row.update({score_column(label): round(p, 6) for label, p in segment.scores.items()})
    row.update(head_values(segment.head))
    return row


def segment_table_line(file: str, segment: TimelineSegment, random_weights: bool) -> str:
    speaker = f"  [{segment.speaker}]" if segment.speaker else ""
    split = "  (split)" if segment.split else ""
    random = RANDOM_MARK if random_weights else ""
    head = f"{segment.emoji} {segment.emotion} ({segment.label_zh}) {segment.confidence:.3f}"
    own = head_text(segment.head)
    return f"{file}  {segment.start_s:8.2f}-{segment.end_s:8.2f} s{speaker}  {head}{own}{split}{random}"


def summary_line(timeline: Timeline) -> str:
    return f"{timeline.file}  {summary_text(timeline.summary, timeline.speech_s, timeline.duration_s)}"


def summary_text(summary: dict[str, Any], speech_s: float, duration_s: float) -> str:
    """A recording's or a live stream's summary in words."""
    dominant = summary["dominant"] or "none (no speech)"
    return (
        f"summary: {speech_s:.1f} s of speech in {summary['segments']} segments of {duration_s:.1f} s; "
        f"dominant {dominant}"
    )


# The JSON lines of a timeline, the same for `emoserve predict --segments` (jsonl) and the API's NDJSON
# stream: a `segment` line per segment as it is scored, a `summary` line at the end of a recording, an
# `error` line for a recording that fails (before or part-way).


def segment_record(file: str, segment: TimelineSegment, random_weights: bool) -> dict[str, Any]:
    return {"type": "segment", "file": file, **segment.to_dict(), "random_weights": random_weights}


def summary_record(timeline: Timeline) -> dict[str, Any]:
    """The timeline without its segments (they went before, one line each)."""
    body = timeline.to_dict()
    body.pop("segments")
    return {"type": "summary", **body}


def error_record(file: str, error: EmoserveError) -> dict[str, Any]:
    return {"type": "error", "file": file, "error": {"code": error.code, "message": str(error)}}


def json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False)


class TimelineWriter:
    """`predict --segments` output: jsonl (a `segment` line per segment with its file, then a `summary`
    line per file; an `error` line for a file that failed), csv (a row per segment) or a table."""

    def __init__(self, out: IO[str], fmt: str, labels: Sequence[str], head: Head | None = None) -> None:
        self.out, self.fmt = out, fmt
        if fmt == "csv":
            fields = [*segment_csv_fields(labels), *head_columns(head), "random_weights", "error"]
            self.csv = csv.DictWriter(out, fieldnames=fields)
            self.csv.writeheader()

    def segment(self, file: str, segment: TimelineSegment, random_weights: bool) -> None:
        if self.fmt == "jsonl":
            self._line(json_line(segment_record(file, segment, random_weights)))
        elif self.fmt == "csv":
            self.csv.writerow({**segment_csv_row(file, segment), "random_weights": random_weights})
        else:
            self._line(segment_table_line(file, segment, random_weights))
        self.out.flush()

    def summary(self, timeline: Timeline) -> None:
        if self.fmt == "jsonl":
            self._line(json_line(summary_record(timeline)))
        elif self.fmt == "table":
            self._line(summary_line(timeline))
        self.out.flush()

    def error(self, file: str, error: EmoserveError) -> None:
        if self.fmt == "jsonl":
            self._line(json_line(error_record(file, error)))
        elif self.fmt == "csv":
            self.csv.writerow({"file": file, "error": str(error)})
        else:
            self._line(f"{file}  ERROR  {error}")
        self.out.flush()

    def _line(self, text: str) -> None:
        self.out.write(text + "\n")


# ------------------------------------------------------------------------------ a live stream's lines


def stream_line(message: StreamMessage) -> str:
    """A live stream's protocol message (docs/streaming.md) as one line for a person."""
    match message["type"]:
        case "ready":
            p = message["parameters"]
            random = RANDOM_MARK if message["random_weights"] else ""
            return (
                f"streaming to {message['model']}{random}: {p['sample_rate']} Hz {p['encoding']}, "
                f"{p['channels']} channel(s), a reading every {p['hop_s']:g} s of speech"
            )
        case "speech_start":
            return f"{message['start_s']:8.2f} s           speech starts"
        case "interim":
            return f"{reading_when(message)}  ... {reading_text(message)}"
        case "segment":
            split = "  (split)" if message["split"] else ""
            return f"{reading_when(message)}  =>  {reading_text(message)}  [segment]{split}"
        case "summary":
            return summary_text(message["summary"], message["speech_s"], message["duration_s"])
        case "error":
            goes_on = "" if message["fatal"] else " (the stream goes on)"
            return f"error: {message['code']}: {message['message']}{goes_on}"


def reading_text(message: Reading) -> str:
    return f"{message['emoji']} {message['emotion']} ({message['label_zh']}) {message['confidence']:.3f}"


def reading_when(message: Reading) -> str:
    return f"{message['start_s']:8.2f}-{message['end_s']:8.2f} s"
