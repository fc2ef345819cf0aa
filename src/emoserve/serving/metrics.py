"""Prometheus metrics of one service process, in their own CollectorRegistry. Names carry their units.

`Metrics` is also the engine's `EngineObserver` (batch sizes, queue depth, audio seconds). The server
observes what only it knows: per-route request stages, statuses and error kinds. Light on purpose: torch is
imported only by the GPU memory collector, which exists only once a model runs on CUDA.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from emoserve.serving.phase import PHASES
from emoserve.system import resident_memory_bytes

# Request stages in seconds: milliseconds for a tiny model up to a minute for a long clip of the large one
# on a CPU (the 60 s default audio limit).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# A timeline request runs from a second (a short file, a GPU) to most of an hour (3 h of audio on a CPU).
TIMELINE_BUCKETS_S = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
# A job waits from a moment (an idle server) to hours (a backlog), and runs as long as a timeline or longer
# (a resumed job's run time counts from its first claim).
JOB_WAIT_BUCKETS_S = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
STAGES = ("decode", "queue", "inference", "total")
ROUTE_UI = "ui"  # the route label of the web UI's recognitions (the API's are their paths)


class Metrics:
    """All collectors of one process; `registry` is what /metrics renders."""

    def __init__(
        self, max_queue: int, registry: CollectorRegistry | None = None, labels: dict[str, str] | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.labels = labels or {}  # added to every sample when rendered (a Ray Serve replica's id)
        r = self.registry
        # Start-up
        self.model_load_seconds = Gauge(
            "emoserve_model_load_seconds", "Seconds to import torch and load the model", registry=r
        )
        self.warmup_seconds = Gauge(
            "emoserve_warmup_seconds", "Seconds the warm-up took (decode, engine, model, checks)", registry=r
        )
        self.start_to_ready_seconds = Gauge(
            "emoserve_start_to_ready_seconds", "Seconds from process start to ready", registry=r
        )
        self.ready = Gauge("emoserve_ready", "1 when /readyz answers 200, else 0", registry=r)
        self.state = Enum("emoserve_state", "Lifecycle state", states=list(PHASES), registry=r)
        # Requests
        self.request_duration_seconds = Histogram(
            "emoserve_request_duration_seconds",
            "Seconds per request stage (decode, queue, inference, total), by route",
            ["stage", "route"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.requests_total = Counter(
            "emoserve_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=r,
        )
        self.in_flight_requests = Gauge(
            "emoserve_in_flight_requests",
            "Recognition requests being handled now (decode to answer)",
            registry=r,
        )
        self.errors_total = Counter(
            "emoserve_errors",
            "Failed requests by kind (the error code of the response)",
            ["kind"],
            registry=r,
        )
        self.head_results_total = Counter(
            "emoserve_head_results",
            "Results of a served head of your own (clips and timeline segments), by head and label "
            "(a regression head's: label `values`)",
            ["head", "label"],
            registry=r,
        )
        self.uncertain_results_total = Counter(
            "emoserve_uncertain_results",
            "Results whose top score was under their min_confidence (answered `uncertain`): output "
            "`emotion` for the nine emotions, else the head's name",
            ["output"],
            registry=r,
        )
        # Long recordings (/v1/timeline and the UI's tab)
        self.timeline_duration_seconds = Histogram(
            "emoserve_timeline_duration_seconds",
            "Seconds per timeline, first segment decoded to last scored (or the client gone)",
            buckets=TIMELINE_BUCKETS_S,
            registry=r,
        )
        self.timeline_audio_seconds_total = Counter(
            "emoserve_timeline_audio_seconds", "Seconds of recordings processed by timelines", registry=r
        )
        self.timeline_segments_total = Counter(
            "emoserve_timeline_segments", "Speech segments scored by timelines", registry=r
        )
        self.timelines_in_progress = Gauge(
            "emoserve_timelines_in_progress", "Timeline requests being processed now", registry=r
        )
        # Jobs (/v1/jobs); their segments count as timelines' too
        self.jobs = Gauge(
            "emoserve_jobs",
            "Jobs in the store by status (all replicas' when they share one)",
            ["status"],
            registry=r,
        )
        self.jobs_submitted_total = Counter(
            "emoserve_jobs_submitted", "Jobs accepted (an Idempotency-Key's repeats not counted)", registry=r
        )
        self.jobs_finished_total = Counter(
            "emoserve_jobs_finished",
            "Jobs ended by this process, by status (succeeded, failed, cancelled)",
            ["status"],
            registry=r,
        )
        self.jobs_resumed_total = Counter(
            "emoserve_jobs_resumed",
            "Jobs taken again after their worker stopped (a crash, a kill, a shutdown)",
            registry=r,
        )
        self.job_segments_kept_total = Counter(
            "emoserve_job_segments_kept",
            "Segments a resumed job did not score again (committed by an earlier attempt)",
            registry=r,
        )
        self.jobs_oldest_queued_age_seconds = Gauge(
            "emoserve_jobs_oldest_queued_age_seconds",
            "Seconds the oldest queued job has waited (0: none queued); the store is read every few seconds",
            registry=r,
        )
        self._oldest_queued_at: float | None = None
        self.jobs_oldest_queued_age_seconds.set_function(self._oldest_queued_age)
        self.job_queue_wait_seconds = Histogram(
            "emoserve_job_queue_wait_seconds",
            "Seconds from a job's acceptance to its first claim by a worker of this process",
            buckets=JOB_WAIT_BUCKETS_S,
            registry=r,
        )
        self.job_run_seconds = Histogram(
            "emoserve_job_run_seconds",
            "Seconds from a job's first claim to its end, for the jobs this process ended, by status",
            ["status"],
            buckets=TIMELINE_BUCKETS_S,
            registry=r,
        )
        self.webhook_deliveries_total = Counter(
            "emoserve_webhook_deliveries",
            "Webhook delivery attempts, by result (delivered, retry, gave_up, rejected, refused)",
            ["result"],
            registry=r,
        )
        # Live streams (GET /v1/stream)
        self.streams_active = Gauge("emoserve_streams_active", "Live streams open now", registry=r)
        self.streams_total = Counter(
            "emoserve_streams",
            "Live streams asked for, by outcome: opened, or refused_<why> (full, not_ready, draining)",
            ["outcome"],
            registry=r,
        )
        self.stream_audio_seconds_total = Counter(
            "emoserve_stream_audio_seconds", "Seconds of audio received by live streams", registry=r
        )
        self.stream_interims_total = Counter(
            "emoserve_stream_interims",
            "Interim readings of live streams, by outcome: sent or skipped",
            ["outcome"],
            registry=r,
        )
        self.stream_segment_latency_seconds = Histogram(
            "emoserve_stream_segment_latency_seconds",
            "Seconds from the audio that closed an utterance arriving to its `segment` being sent",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        # The engine
        self.batch_size = Histogram(
            "emoserve_batch_size", "Clips per model call", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_duration_seconds = Histogram(
            "emoserve_batch_duration_seconds", "Seconds per model call", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.queue_depth = Gauge("emoserve_queue_depth", "Requests waiting for a model call", registry=r)
        self.queue_capacity = Gauge(
            "emoserve_queue_capacity", "Most requests that may wait (max_queue); beyond it 503", registry=r
        )
        self.queue_capacity.set(max_queue)
        self.audio_seconds_total = Counter(
            "emoserve_audio_seconds", "Seconds of audio run through the model (warm-up included)", registry=r
        )
        self.padded_audio_seconds_total = Counter(
            "emoserve_padded_audio_seconds",
            "Seconds of audio the model computed, padding included (compare with emoserve_audio_seconds)",
            registry=r,
        )
        self.keep_warm_total = Counter("emoserve_keep_warm", "Keep-warm inferences run when idle", registry=r)
        # Memory: process_* from prometheus_client (Linux), plus ours, which has the service's prefix
        ProcessCollector(registry=r)
        r.register(_ResidentMemoryCollector())
        self._gpu_collector: Collector | None = None

    # --------------------------------------------------------------------------------- EngineObserver

    def batch_done(self, size: int, audio_seconds: float, padded_seconds: float, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_duration_seconds.observe(seconds)
        self.audio_seconds_total.inc(audio_seconds)
        self.padded_audio_seconds_total.inc(padded_seconds)

    def queue_changed(self, depth: int) -> None:
        self.queue_depth.set(depth)

    # -------------------------------------------------------------------------------------- the server

    def observe_request(
        self, route: str, *, decode_s: float, queue_s: float, inference_s: float, total_s: float
    ) -> None:
        """One answered recognition: each stage's seconds, labelled with the route ("/v1/recognize", "ui")."""
        for stage, seconds in zip(STAGES, (decode_s, queue_s, inference_s, total_s), strict=True):
            self.request_duration_seconds.labels(stage, route).observe(seconds)

    def observe_timeline(self, audio_s: float, segments: int, seconds: float) -> None:
        """One timeline request that ran to its end (or was stopped: what it did still counts)."""
        self.timeline_duration_seconds.observe(seconds)
        self.timeline_audio_seconds_total.inc(audio_s)
        self.timeline_segments_total.inc(segments)

    def oldest_queued(self, created_at: float | None) -> None:
        """The oldest queued job's acceptance time (Unix seconds; None: none queued): its age is read at
        each scrape."""
        self._oldest_queued_at = created_at

    def _oldest_queued_age(self) -> float:
        created_at = self._oldest_queued_at
        return 0.0 if created_at is None else max(0.0, time.time() - created_at)

    def count_response(self, route: str, status: int) -> None:
        self.requests_total.labels(route, str(status)).inc()

    def count_error(self, kind: str) -> None:
        self.errors_total.labels(kind).inc()

    def set_state(self, state: str) -> None:
        self.state.state(state)
        self.ready.set(1 if state == "ready" else 0)

    def watch_device(self, device: str) -> None:
        """Add GPU memory gauges when the model runs on CUDA (`device` as "cuda:0")."""
        if device.startswith("cuda") and self._gpu_collector is None:
            self._gpu_collector = _GpuMemoryCollector(device)
            self.registry.register(self._gpu_collector)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        registry = _Labelled(self.registry, self.labels) if self.labels else self.registry
        return generate_latest(registry), CONTENT_TYPE_LATEST


class _Labelled:
    """A registry's metrics with constant labels added to every sample (prometheus_client has no
    registry-wide labels): each replica renders the same names, told apart by these labels."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self.registry = registry
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            family.samples = [s._replace(labels={**self.labels, **s.labels}) for s in family.samples]
            yield family


class _ResidentMemoryCollector(Collector):
    def collect(self) -> Iterable[GaugeMetricFamily]:
        rss = resident_memory_bytes()
        if rss is not None:
            yield GaugeMetricFamily(
                "emoserve_process_resident_memory_bytes", "Resident memory of this process in bytes", rss
            )


class _GpuMemoryCollector(Collector):
    def __init__(self, device: str) -> None:
        self.device = device

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import torch  # loaded already: this collector exists only once a model is on the GPU

        yield GaugeMetricFamily(
            "emoserve_gpu_memory_allocated_bytes",
            "GPU memory held by tensors now (torch.cuda.memory_allocated)",
            torch.cuda.memory_allocated(self.device),
        )
        yield GaugeMetricFamily(
            "emoserve_gpu_max_memory_allocated_bytes",
            "Peak GPU memory held by tensors (torch.cuda.max_memory_allocated)",
            torch.cuda.max_memory_allocated(self.device),
        )
        # what the process holds from the driver: the caching allocator keeps freed blocks (it never gives
        # them back here), so this, not the allocated figure, is what stays after a long clip
        yield GaugeMetricFamily(
            "emoserve_gpu_memory_reserved_bytes",
            "GPU memory the caching allocator holds from the driver (torch.cuda.memory_reserved)",
            torch.cuda.memory_reserved(self.device),
        )
        # the whole device as the driver counts it: CUDA contexts, cuDNN/cuBLAS workspaces, other processes
        free, total = torch.cuda.mem_get_info(self.device)
        yield GaugeMetricFamily(
            "emoserve_gpu_device_free_bytes", "Free memory of the GPU, all processes (cudaMemGetInfo)", free
        )
        yield GaugeMetricFamily(
            "emoserve_gpu_device_total_bytes", "Total memory of the GPU (cudaMemGetInfo)", total
        )
