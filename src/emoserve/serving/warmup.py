"""Warm-up: the real audio path through the engine before "ready", with checks that the outputs can be right.

warm_up_engine(engine, settings, clips): what the service runs (each length alone, or on onnx and
openvino one short length; then the batch sizes traffic uses) -> warm_up(engine, clips, batch_sizes):
the model calls, both granularities, outputs checked
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from emoserve.audio.decode import Audio
from emoserve.constants import GRANULARITIES, MIN_SAMPLES, SAMPLE_RATE, Granularity
from emoserve.errors import WarmupError
from emoserve.inference.results import Result
from emoserve.serving.engine import FRAME_MEAN_TOL, SCORE_SUM_TOL, Engine
from emoserve.serving.settings import Settings

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ warm-up


KEEP_WARM_SECONDS = 1.0  # audio length of a keep-warm inference: enough to touch every layer


def warm_up_engine(engine: Engine, settings: Settings, clips: Sequence[Audio]) -> Audio:
    """The decoded bundled clips through the engine: each length alone (on onnx and openvino one short
    length), then the batch sizes (both granularities, outputs checked by `warm_up`). Returns
    the keep-warm clip (the shortest one's first KEEP_WARM_SECONDS)."""
    started = time.monotonic()
    sizes = [
        size
        for size in settings.effective_warmup_batch_sizes(engine.recognizer.device_type)
        if size <= engine.config.max_batch_size  # batching off where it does not pay
    ]
    # Batches hold clips of similar length only (max_padding), as the engine groups requests: one
    # clip of each length group alone, then the batch sizes on the largest group.
    groups = length_groups(clips, engine.config.max_padding)
    shortest = min(clips, key=lambda clip: len(clip.samples))
    keep_warm = dataclasses.replace(
        shortest, samples=shortest.samples[: int(KEEP_WARM_SECONDS * SAMPLE_RATE)].copy()
    )
    # Both granularities (and the frame/utterance agreement check) on the shortest length; on torch
    # the longer lengths once, in "frame", which runs the whole model and both heads: on a CPU a
    # second pass there costs start-up seconds and warms nothing new.
    if engine.recognizer.backend.name in ("onnx", "openvino"):
        # ONNX Runtime (its memory pattern off, model/interface.py) costs the same for every length
        # from its first run: there one length warms them all, so the keep-warm clip's second is
        # enough (the other lengths were ~1.5 s of a 2-core start, docs/benchmarks.md section 13,
        # and the 3 s clip ~0.9 s more than this one, section 14.3). OpenVINO pays ~60 ms at the first
        # call of each new padded width, which the bundled clips' lengths do not cover for a user's
        # lengths either; warming them cost 0.6 s more of the start (section 17): one length too.
        reports = [warm_up(engine, [keep_warm], [1])]
    else:  # torch's kernels and allocator warm per size
        reports = [warm_up(engine, groups[0][:1], [1])]
        reports += [warm_up(engine, group[:1], [1], granularities=("frame",)) for group in groups[1:]]
    if batched := [size for size in sizes if size > 1]:
        reports.append(warm_up(engine, max(groups, key=len), batched))
    if engine.recognizer.device_type == "cuda":
        max_samples = int(settings.effective_max_audio_s("cuda") * SAMPLE_RATE)
        reports.append(warm_up_widths(engine, keep_warm, cuda_warmup_lengths(max_samples)))
    log.info(
        "warm-up finished in %.2f s: %d clips, %d model calls, (batch, samples) %s",
        time.monotonic() - started,
        len(clips),
        sum(report.calls for report in reports),
        sorted({shape for report in reports for shape in report.shapes}),
    )
    return keep_warm


def cuda_warmup_lengths(max_samples: int) -> list[int]:
    """One clip length per padded width the torch backend runs on CUDA (`CUDA_WIDTHS_PER_OCTAVE_LOG2`, ~40 up
    to 120 s) for clips of MIN_SAMPLES to `max_samples`: each width itself, the last one `max_samples`."""
    from emoserve.model.interface import CUDA_WIDTHS_PER_OCTAVE_LOG2, bucket_width, bucket_widths

    def longest(width: int) -> int:  # the longest clip padded to `width` (below it at an octave's top)
        samples = min(width, max_samples)
        if bucket_width(samples, CUDA_WIDTHS_PER_OCTAVE_LOG2) != width:
            samples = (1 << (width.bit_length() - 1)) - 1  # e.g. 2240: 1921-2047, the octave below 2048
        return samples

    first = bucket_width(MIN_SAMPLES, CUDA_WIDTHS_PER_OCTAVE_LOG2)
    widths = [w for w in bucket_widths(max_samples, CUDA_WIDTHS_PER_OCTAVE_LOG2) if w >= first]
    return [longest(width) for width in widths]


def warm_up_widths(engine: Engine, clip: Audio, lengths: Sequence[int]) -> WarmupReport:
    """On CUDA: one call (batch 1, "frame": the whole model and both heads) at each of `lengths`, `clip`
    repeated to fill it, outputs checked. A new width costs cuDNN plans and kernel loads on its first call;
    after this no request's first call does. Batched shapes are warmed at the bundled clips' widths only
    (the batch sizes above): widths times batch sizes would be hundreds of calls."""
    labels = [label.en for label in engine.recognizer.labels]
    calls_before, started = engine.model_calls, time.monotonic()
    shapes: set[tuple[int, int]] = set()
    for samples in lengths:
        audio = dataclasses.replace(
            clip, samples=np.resize(clip.samples, samples), source=f"{samples} samples"
        )
        (run,) = _run_warm_up_batch(engine, [audio], "frame", 1)
        _check_result(run.result, labels, f"warm-up at {samples} samples")
        shapes.add(run.shape)
    report = WarmupReport(
        time.monotonic() - started, engine.model_calls - calls_before, tuple(sorted(shapes))
    )
    log.info(
        "warm-up of %d widths on CUDA: %d model calls in %.2f s", len(lengths), report.calls, report.seconds
    )
    return report


def length_groups(clips: Sequence[Audio], max_padding: float) -> list[list[Audio]]:
    """Clips grouped as one padded batch may hold them (the engine's length rule), shortest first."""
    from emoserve.inference.recognizer import length_batches

    lengths = [len(clip.samples) for clip in clips]
    groups = length_batches(lengths, len(clips), max_batch_samples=sum(lengths), max_padding=max_padding)
    return [[clips[i] for i in group] for group in groups]


@dataclass(frozen=True)
class WarmupReport:
    seconds: float
    calls: int  # model calls made
    shapes: tuple[tuple[int, int], ...]  # (batch, samples) padded inputs the model ran, sorted


def warm_up(
    engine: Engine,
    clips: Sequence[Audio],
    batch_sizes: Sequence[int],
    granularities: Sequence[Granularity] = GRANULARITIES,
) -> WarmupReport:
    """Run the real path (engine -> model) at each batch size, cycling `clips`, in `granularities`,
    and check every output (with both granularities, also that the frame path agrees with the
    utterance path; "frame" alone already runs the whole model and both heads). Clips of similar
    length reach each batch size exactly; clips of different lengths are split as requests would be
    (max_padding), and `shapes` says what ran."""
    _check_warm_up_args(engine, clips, batch_sizes)
    labels = [label.en for label in engine.recognizer.labels]
    calls_before = engine.model_calls
    started = time.monotonic()
    shapes: set[tuple[int, int]] = set()
    for size in batch_sizes:
        batch = [clips[i % len(clips)] for i in range(size)]
        runs = {g: _run_warm_up_batch(engine, batch, g, size) for g in granularities}
        for i, clip in enumerate(batch):
            where = f"warm-up at batch size {size}, clip {clip.source!r}"
            for granularity, results in runs.items():
                _check_result(results[i].result, labels, f"{where}, {granularity}")
                shapes.add(results[i].shape)
            if len(runs) == len(GRANULARITIES):
                _check_frame_path(
                    runs["utterance"][i].result, runs["frame"][i].result, engine.recognizer.dtype, where
                )
        if size not in {batch for batch, _ in shapes}:
            log.warning("warm-up: batch size %d not reached (clips of different lengths were split)", size)
    report = WarmupReport(
        time.monotonic() - started, engine.model_calls - calls_before, tuple(sorted(shapes))
    )
    log.info(
        "warm-up passed: %d model calls in %.2f s, shapes %s", report.calls, report.seconds, report.shapes
    )
    return report


def _check_warm_up_args(engine: Engine, clips: Sequence[Audio], batch_sizes: Sequence[int]) -> None:
    if not clips:
        raise ValueError("warm_up needs at least one clip")
    if not batch_sizes:
        raise ValueError("warm_up needs at least one batch size")
    limit = min(engine.config.max_batch_size, engine.config.max_queue)
    for size in batch_sizes:
        if not 1 <= size <= limit:
            raise ValueError(
                f"warm-up batch size {size} is outside 1..{limit} (max_batch_size "
                f"{engine.config.max_batch_size}, max_queue {engine.config.max_queue})"
            )


@dataclass(frozen=True)
class _WarmupRun:
    result: Result
    shape: tuple[int, int]  # (batch, samples) of the model call that produced it


def _run_warm_up_batch(
    engine: Engine, clips: Sequence[Audio], granularity: Granularity, size: int
) -> list[_WarmupRun]:
    """Queue `clips` in one go, so that the worker batches them as it would a burst of requests."""
    runs = []
    for request in engine._enqueue(clips, granularity, embedding=True):
        try:
            result, timing = request.future.result()
        except Exception as error:
            raise WarmupError(
                f"warm-up at batch size {size}, {granularity}, clip {request.audio.source!r}: "
                f"the model call failed: {error}"
            ) from error
        runs.append(_WarmupRun(result, (timing.batch_size, request.padded_samples)))
    return runs


def _check_result(result: Result, labels: Sequence[str], where: str) -> None:
    check_scores(result.scores, labels, where)
    if result.granularity == "frame":
        if not result.frames:
            raise WarmupError(f"{where}: no frame results")
        for frame in result.frames:
            check_scores(frame.scores, labels, f"{where}, frame at {frame.start_s:g} s")
    if result.embedding is None or not np.isfinite(result.embedding).all():
        raise WarmupError(f"{where}: the embedding is missing or not finite")


def check_scores(scores: dict[str, float], labels: Sequence[str], where: str) -> None:
    if list(scores) != list(labels):
        raise WarmupError(f"{where}: scores are for {list(scores)}; expected one per label {list(labels)}")
    bad = [name for name, p in scores.items() if not math.isfinite(p)]
    if bad:
        raise WarmupError(
            f"{where}: non-finite scores for {', '.join(bad)} "
            "(NaN/inf from the model: check the weights and the dtype)"
        )
    total = math.fsum(scores.values())
    if abs(total - 1) > SCORE_SUM_TOL:
        raise WarmupError(f"{where}: scores sum to {total:.6f}, not 1")


def _check_frame_path(utterance: Result, frame: Result, dtype: str, where: str) -> None:
    """Spec §4 step 9: the utterance embedding is the mean of the frame embeddings."""
    assert utterance.embedding is not None and frame.embedding is not None  # _check_result ran
    if frame.embedding.ndim != 2 or frame.embedding.shape[1:] != utterance.embedding.shape:
        raise WarmupError(
            f"{where}: frame embedding shape {frame.embedding.shape} does not fit utterance embedding "
            f"shape {utterance.embedding.shape}"
        )
    mean = frame.embedding.mean(axis=0, dtype=np.float64)
    diff = float(np.abs(mean - utterance.embedding).max())
    tol = _frame_mean_tolerance(dtype, frame.embedding)
    if diff > tol:
        raise WarmupError(
            f"{where}: the mean of the frame embeddings differs from the utterance embedding by {diff:.3g} "
            f"(tolerance {tol:.3g}): the frame and utterance paths disagree"
        )
    if frame.emotion != utterance.emotion:
        raise WarmupError(
            f"{where}: the top emotion is {utterance.emotion!r} for utterance but {frame.emotion!r} for frame"
        )


# machine epsilon of the dtypes whose rounding reaches the pooled mean (int8 quantizes weights and
# activations inside the matmuls; the frames and their mean stay float32)
_HALF_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}


def _frame_mean_tolerance(dtype: str, frames: np.ndarray) -> float:
    if dtype not in _HALF_EPS:
        return FRAME_MEAN_TOL
    # float16/bfloat16: the pooled mean is rounded to the dtype, so allow a few units of its precision
    return max(FRAME_MEAN_TOL, 4 * _HALF_EPS[dtype] * float(np.abs(frames).max()))
