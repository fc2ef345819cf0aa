"""Long recordings: an emotion timeline (calls, meetings, podcasts).

    Recording(source) -> AudioStream blocks -> per channel: SileroVad + Segmenter (or the caller's
    segments) -> Segment ... -> scored a few at a time (`score_segments` with predict_many here, the
    engine in the server) -> TimelineSegment ... -> build_timeline -> Timeline (segments + summary)

emotion2vec gives one label per input and was trained on utterances of a few seconds, so a recording is
scored as its speech segments, each exactly as `predict()` scores that slice of the 16 kHz audio. The
cutting is `audio/segments.py`'s; this module scores and assembles.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from emoserve.audio.segments import Recording
from emoserve.audio.vad import Segment
from emoserve.inference.results import Timeline, TimelineSegment, scored, summarise

if TYPE_CHECKING:
    from emoserve.inference.recognizer import Recognizer

TIMELINE_BATCH_SIZE = 8  # segments scored together by the library (predict_many groups them by length)


def score_segments(
    recognizer: Recognizer, job: Recording, *, batch_size: int = TIMELINE_BATCH_SIZE
) -> Iterator[TimelineSegment]:
    """The library's scoring: segments in groups of `batch_size` through `predict_many` (batched by
    length), yielded in the order they were found."""
    pending: list[Segment] = []
    for segment in job.segments():
        pending.append(segment)
        if len(pending) >= batch_size:
            yield from _score(recognizer, job, pending)
            pending = []
    yield from _score(recognizer, job, pending)


def _score(recognizer: Recognizer, job: Recording, segments: list[Segment]) -> Iterator[TimelineSegment]:
    results = recognizer.predict_many([job.clip(s) for s in segments], batch_size=len(segments) or 1)
    for segment, result in zip(segments, results, strict=True):
        yield scored(segment, result)


def build_timeline(
    recording: Recording, scored: Iterable[TimelineSegment], model: str, random_weights: bool
) -> Timeline:
    """The recording's timeline once all its segments are scored (in any order): sorted, summarised."""
    segments = sorted(scored, key=lambda s: (s.start_s, s.speaker or ""))
    return Timeline(
        file=recording.file,
        duration_s=round(recording.duration_s, 6),
        speech_s=round(sum(s.duration_s for s in segments), 6),
        model=model,
        random_weights=random_weights,
        channels=recording.channels,
        vad=None if recording.spans is not None else recording.vad.to_dict(),
        segments=segments,
        summary=summarise(segments),
    )
