"""The service's lifecycle phases, one type for the service, the metrics, the probes and the web UI.

    starting -> loading -> warming -> ready -> draining
                   \\__________\\________\\-> failed      (loading again: a damaged model being rebuilt)

`unavailable` is the 503 each phase gives a request that cannot be served.
"""

from __future__ import annotations

from typing import Literal, get_args

from emoserve.errors import (
    DRAINING_RETRY_AFTER_S,
    FAILED_RETRY_AFTER_S,
    LOADING_RETRY_AFTER_S,
    ServiceUnavailable,
)

Phase = Literal["starting", "loading", "warming", "ready", "failed", "draining"]
PHASES: tuple[Phase, ...] = get_args(Phase)
SETTLED: tuple[Phase, ...] = ("failed", "draining")  # phases a waiting request gives up on at once


def unavailable(phase: Phase, reason: str | None, since_start_s: float) -> ServiceUnavailable:
    """The 503 that fits `phase` (anything but ready)."""
    if phase == "draining":
        return ServiceUnavailable(
            "draining", "the service is shutting down and accepts no new requests", DRAINING_RETRY_AFTER_S
        )
    if phase == "failed":
        return ServiceUnavailable(
            "start_up_failed", f"the model could not be loaded: {reason}", FAILED_RETRY_AFTER_S
        )
    return ServiceUnavailable(
        "not_ready",
        f"the model is not ready yet (state {phase}, {since_start_s:.1f} s after start)",
        LOADING_RETRY_AFTER_S,
    )
