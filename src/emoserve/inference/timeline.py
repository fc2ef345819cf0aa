"""Long recordings: an emotion timeline (calls, meetings, podcasts).

    Recording(source) -> AudioStream blocks -> per channel: SileroVad + Segmenter (or the caller's
    segments) -> Segment ... -> scored a few at a time (`score_segments` with predict_many here, the
    engine in the server) -> TimelineSegment ... -> build_timeline -> Timeline (segments + summary)

emotion2vec gives one label per input and was trained on utterances of a few seconds, so a recording is
scored as its speech segments, each exactly as `predict()` scores that slice of the 16 kHz audio. The
cutting is `audio/segments.py`'s; this module scores and assembles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from emoserve.audio.decode import Audio
from emoserve.audio.segments import Progress, Recording
from emoserve.audio.vad import Segment
from emoserve.constants import MAX_BATCH_SAMPLES, SAMPLE_RATE, Channels, segment_batch_seconds
from emoserve.errors import EmoserveError
from emoserve.inference.formats import TimelineWriter
from emoserve.inference.results import ModelTag, Result, Timeline, TimelineSegment, scored, summarise
from emoserve.model.entry import ModelInfo


class Scorer(Protocol):
    """What scoring a recording needs of a model (a `Recognizer`)."""

    @property
    def info(self) -> ModelInfo: ...
    @property
    def random_weights(self) -> bool: ...
    @property
    def tag(self) -> ModelTag: ...

    @property
    def device_type(self) -> str: ...

    def predict_many(
        self, clips: Sequence[Audio], *, batch_size: int, max_batch_samples: int
    ) -> list[Result]: ...


TIMELINE_BATCH_SIZE = 8  # segments scored together by the library (predict_many groups them by length)


def score_segments(
    recognizer: Scorer, job: Recording, *, batch_size: int = TIMELINE_BATCH_SIZE
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


def _score(recognizer: Scorer, job: Recording, segments: list[Segment]) -> Iterator[TimelineSegment]:
    seconds = segment_batch_seconds(recognizer.device_type)
    results = recognizer.predict_many(
        [job.clip(s) for s in segments],
        batch_size=len(segments) or 1,
        max_batch_samples=MAX_BATCH_SAMPLES if seconds is None else int(seconds * SAMPLE_RATE),
    )
    for segment, result in zip(segments, results, strict=True):
        yield scored(segment, result)


def build_timeline(recording: Recording, scored: Iterable[TimelineSegment], tag: ModelTag) -> Timeline:
    """The recording's timeline once all its segments are scored (in any order): sorted, summarised.
    `scored` may be the generator that reads the recording: its duration is known once it is done."""
    segments = list(scored)
    vad = None if recording.spans is not None else recording.vad.to_dict()
    return timeline_of(recording.file, recording.duration_s, recording.channels, vad, segments, tag)


def timeline_of(
    file: str,
    duration_s: float,
    channels: Channels,
    vad: dict[str, Any] | None,
    scored: Iterable[TimelineSegment],
    tag: ModelTag,
) -> Timeline:
    """A timeline of `scored` segments (in any order: sorted, summarised), for whatever cut them: a
    recording, a job's stored plan, a live stream. `vad`: the VAD's parameters, None where none cut."""
    segments = sorted(scored, key=lambda s: (s.start_s, s.speaker or ""))
    return Timeline(
        file=file,
        duration_s=round(duration_s, 6),
        speech_s=round(sum(s.duration_s for s in segments), 6),
        model=tag.model,
        random_weights=tag.random_weights,
        backend=tag.backend,
        dtype=tag.dtype,
        channels=channels,
        vad=vad,
        segments=segments,
        summary=summarise(segments),
    )


def file_timelines(
    recognizer: Scorer,
    files: Sequence[str],
    *,
    batch_size: int = TIMELINE_BATCH_SIZE,
    progress: Callable[[int, str], Progress | None] = lambda n, file: None,
    **options: Any,
) -> Iterator[tuple[str, TimelineSegment | Timeline | EmoserveError]]:
    """Many recordings, one after the other (`emoserve predict --segments`): for each file its segments
    as they are scored, then its `Timeline`; a file that fails (its audio, or the model's output) is one
    error and the others go on. `progress(n, file)` gives the n-th file's progress callback; `options`
    go to each `Recording`."""
    for n, file in enumerate(files, 1):
        try:
            job = Recording(file, progress=progress(n, file), **options)
            scored = []
            for segment in score_segments(recognizer, job, batch_size=batch_size):
                scored.append(segment)
                yield job.file, segment
            yield job.file, build_timeline(job, scored, recognizer.tag)
        except EmoserveError as error:
            yield file, error


def write_timelines(
    recognizer: Scorer,
    files: Sequence[str],
    writer: TimelineWriter,
    *,
    batch_size: int = TIMELINE_BATCH_SIZE,
    progress: Callable[[int, str], Progress | None] = lambda n, file: None,
    on_error: Callable[[str, EmoserveError], None] = lambda file, error: None,
    **options: Any,
) -> int:
    """`file_timelines` written out as they come (`emoserve predict --segments`): a line per segment, then
    the file's summary, or its error (also given to `on_error`); the number of files that failed."""
    failed = 0
    for file, item in file_timelines(recognizer, files, batch_size=batch_size, progress=progress, **options):
        if isinstance(item, EmoserveError):
            failed += 1
            writer.error(file, item)
            on_error(file, item)
        elif isinstance(item, Timeline):
            writer.summary(item)
        else:
            writer.segment(file, item, recognizer.random_weights)
    return failed
