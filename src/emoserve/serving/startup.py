"""The service's start-up steps, each a function of what it needs that returns what it made; `Service`
runs them in its start-up thread and keeps the phase and readiness:

    load(settings, metrics) -> Loaded (the recognizer, what GET /v1/model answers, the served heads,
    the limits for its device) -> start_engine(...) -> Engine -> warm_up_engine (serving/warmup.py)
    -> ready -> verify_files(path) in the background: the problems of files changed since conversion

Nothing heavy is imported at module level: the model, the engine and numpy load when a step runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emoserve.constants import EXAMPLES_DIR, segment_batch_seconds
from emoserve.errors import EmoserveError
from emoserve.serving.metrics import Metrics
from emoserve.serving.settings import Settings

if TYPE_CHECKING:
    from emoserve.inference.recognizer import Recognizer
    from emoserve.model.head import Head
    from emoserve.serving.engine import Engine

log = logging.getLogger(__name__)


def example_clips() -> tuple[Path, ...]:
    """The bundled clips: the warm-up's, the UI's example."""
    return tuple(sorted(p for p in EXAMPLES_DIR.iterdir() if p.is_file() and not p.name.startswith(".")))


@dataclass(frozen=True)
class Loaded:
    recognizer: Recognizer
    summary: dict[str, Any]  # what GET /v1/model answers
    heads: dict[str, Head]  # --head NAME=DIR (serving/heads.py)
    max_audio_s: float  # the settings, or the defaults for the device
    max_timeline_s: float
    seconds: float


def load(settings: Settings, metrics: Metrics) -> Loaded:
    """The model as the settings choose it, with its served heads; its load time in the metrics."""
    from emoserve.inference.recognizer import load_with
    from emoserve.serving.heads import served_heads

    started = time.monotonic()
    recognizer = load_with(settings.model_options(), progress=False)
    seconds = time.monotonic() - started
    metrics.model_load_seconds.set(seconds)
    metrics.watch_device(recognizer.device)
    max_audio_s = settings.effective_max_audio_s(recognizer.device_type)
    recognizer.max_seconds = max_audio_s
    summary = model_summary(recognizer, max_audio_s)
    heads = served_heads(settings, recognizer)
    summary["heads"] = [head.summary() for head in heads.values()]
    if settings.calibration:
        from emoserve.inference.confidence import load_calibration

        recognizer.use_calibration(load_calibration(settings.calibration))
    summary["calibration"] = recognizer.calibration.summary() if recognizer.calibration else None
    summary["min_confidence"] = settings.min_confidence
    log.info(
        "model loaded in %.2f s: %s on the %s backend, %s (%s)%s; %s",
        seconds,
        recognizer.info.name,
        recognizer.backend.name,
        recognizer.device,
        summary["dtype"],
        ", RANDOM weights" if recognizer.random_weights else "",
        recognizer.reason,
    )
    max_timeline_s = settings.effective_max_timeline_s(recognizer.device_type)
    return Loaded(recognizer, summary, heads, max_audio_s, max_timeline_s, seconds)


def model_summary(recognizer: Recognizer, max_audio_s: float) -> dict[str, Any]:
    info = recognizer.info
    return {
        "name": info.name,
        "random_weights": info.random_weights,
        "labels": [label.to_dict() for label in recognizer.labels],
        "config": info.config.to_dict(),
        "backend": recognizer.backend.name,
        "device": recognizer.device,
        "dtype": recognizer.dtype,
        "reason": recognizer.reason,  # why this backend and dtype (`--dtype auto`, `--backend auto`)
        "parameters": info.num_parameters,
        "max_audio_s": max_audio_s,
    }


def start_engine(settings: Settings, recognizer: Recognizer, metrics: Metrics) -> Engine:
    """The batching engine over the model, started (its batching choice: `engine.batching`)."""
    from emoserve.serving.engine import Engine, EngineConfig

    config = EngineConfig(
        max_batch_size=settings.max_batch_size,
        batching=settings.batching,
        max_wait_ms=settings.max_wait_ms,
        max_batch_seconds=settings.max_batch_seconds,
        max_queue=settings.max_queue,
        max_background_batch_seconds=segment_batch_seconds(recognizer.device_type),
    )
    engine = Engine(recognizer, config, observer=metrics)
    engine.start()
    return engine


def verify_files(path: Path) -> list[str] | None:
    """The model files' content hashes checked (at the lowest CPU priority, beside the first requests):
    the problems found, or None for an entry without hashes (converted by an older emoserve)."""
    from emoserve.model.entry import check_entry, read_manifest

    if not read_manifest(path).get("files"):
        return None
    with contextlib.suppress(OSError, AttributeError):  # Linux: per-thread niceness
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    return check_entry(path, full=True)


def failure_reason(error: Exception) -> str:
    """Why start-up failed, in one line, logged: the message of an error we expect (a bad model, a file
    that could not be read: its name included), the type and the traceback of anything else (a bug)."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in message:
        message = f"{message}: {error.filename}"
    if isinstance(error, EmoserveError | ValueError | OSError):
        reason = message or type(error).__name__
        log.error("start-up failed: %s", reason)
    else:
        reason = f"{type(error).__name__}: {message}" if message else type(error).__name__
        log.exception("start-up failed: %s", reason)
    return reason
