"""What the web UI needs of a service: `UIService` and `UIMetrics`; of the server's jobs: `UIJobs`.

The UI reads the service through these protocols only, so that it runs on any object with those members:
the server's Service, the Ray UI replica's RemoteService, or a small fake in the tests. Nothing in the UI
touches the model directly.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from emoserve.audio.decode import Audio
    from emoserve.audio.segments import Recording, Span
    from emoserve.audio.vad import VadSettings
    from emoserve.constants import Channels, Granularity
    from emoserve.inference.protocol import StreamOptions
    from emoserve.inference.results import ModelTag, Result, TimelineSegment
    from emoserve.serving.engine import RequestTiming
    from emoserve.serving.jobs.store import Job
    from emoserve.serving.jobs.worker import JobOptions
    from emoserve.serving.live import LiveStream
    from emoserve.serving.phase import Phase
    from emoserve.serving.settings import Settings


class UIMetrics(Protocol):
    """What the UI reports to the metrics (serving.metrics.Metrics has these members)."""

    def observe_request(
        self, route: str, *, decode_s: float, queue_s: float, inference_s: float, total_s: float
    ) -> None: ...

    def count_error(self, kind: str) -> None: ...


class UIService(Protocol):
    """Everything the UI reads from the service; all of it may change while the UI runs.

    phase: "starting" | "loading" | "warming" | "ready" | "failed" | "draining"; recognitions are
        accepted only when "ready". reason: why (a failure, a model being converted again), or None.
    settings: the UI makes its output store from them (save_outputs, outputs_dir, outputs_max_count,
        outputs_max_age_h), once per UI.
    require_ready: raises ServiceUnavailable (an EmoserveError) unless the service is ready.
    decode: a clip (the uploaded file's path) within this server's max_audio_s (blocking; the UI runs
        it in a thread); its errors are EmoserveErrors whose messages name the setting.
    recognize: the service's recognition (decoded audio -> the shared batching engine), as the API's;
        it raises ServiceUnavailable when not ready. `head`: a served head's name (settings.heads).
    model_name: shown in the banner; None until the model is loaded.
    random_weights: the model's predictions are meaningless: the UI warns loudly. None until loaded.
    model_tag: what scores the results (model, random weights, backend, dtype); None until loaded.
    open_timeline: opens a long recording (blocking; the UI runs it in a thread); the file's errors and
        max_timeline_s are raised here, as EmoserveErrors.
    timeline: the job's scored segments as they come, through the shared engine; leaving the iteration
        early stops the decoding.
    live_stream: a live stream of the microphone (the /v1/stream route's session, scored through the
        shared engine), closed on leaving; it raises ServiceUnavailable when not ready or full.
    metrics: UI recognitions are observed under the route ROUTE_UI (timelines by the service itself);
        None: not reported.
    """

    @property
    def phase(self) -> Phase: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def settings(self) -> Settings: ...
    def require_ready(self) -> None: ...
    def decode(self, source: str | os.PathLike[str] | bytes, name: str | None = ...) -> Audio: ...
    async def recognize(
        self,
        audio: Audio,
        granularity: Granularity = "utterance",
        embedding: bool = False,
        head: str | None = None,
    ) -> tuple[Result, RequestTiming]: ...

    @property
    def model_name(self) -> str | None: ...
    @property
    def random_weights(self) -> bool | None: ...
    @property
    def model_tag(self) -> ModelTag | None: ...
    def open_timeline(
        self,
        source: Any,
        *,
        name: str | None = ...,
        channels: Channels = ...,
        vad: VadSettings = ...,
        spans: Sequence[Span] | None = ...,
    ) -> Recording: ...

    def timeline(self, job: Recording, head: str | None = None) -> AsyncIterator[TimelineSegment]: ...
    def live_stream(self, options: StreamOptions) -> AbstractAsyncContextManager[LiveStream]: ...
    @property
    def metrics(self) -> UIMetrics | None: ...


class UIJobs(Protocol):
    """What the Long-recording tab needs of the server's jobs (serving.jobs.worker.Jobs has these
    members; blocking ones run in a thread). A UI without them runs a long recording in the request.

    spool_dir: where an upload is copied before `accept` renames it (the jobs' file system).
    accept: the copied upload checked, fsync'd and committed as a job; the job and whether it is new.
    get: the job's row; EmoserveError job_not_found when there is none.
    follow: its scored segments after index `after` as they are committed (index, segment dict), then
        the job once it has ended.
    cancel: a queued job ends at once, a running one at its next segment; job_finished if it ended.
    """

    def spool_dir(self) -> Path: ...
    def accept(
        self, spooled: str, name: str, options: JobOptions, *, metadata: dict[str, str] | None = ...
    ) -> tuple[Job, bool]: ...
    def get(self, job_id: str) -> Job: ...
    def follow(self, job_id: str, after: int) -> AsyncIterator[tuple[int, dict[str, Any]] | Job]: ...
    def cancel(self, job_id: str) -> Job: ...
