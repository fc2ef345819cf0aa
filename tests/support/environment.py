"""What a test needs from its surroundings: outside tools, and Gradio's event loops kept in bounds."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def skip_or_fail(reason: str) -> None:
    """Skip a test whose outside tool is missing - except where EMOSERVE_REQUIRE_TOOLS is set (CI):
    there a missing tool must not quietly turn a promise's test into a skip."""
    if os.environ.get("EMOSERVE_REQUIRE_TOOLS"):
        pytest.fail(f"{reason} (EMOSERVE_REQUIRE_TOOLS is set)")
    pytest.skip(reason)


@contextmanager
def gradio_loops_closed() -> Iterator[None]:
    """Build Gradio Blocks in this block: the event loops Gradio opens and never closes (one per lock it
    makes outside a running loop, gradio.utils.safe_get_lock, each a socketpair) are closed on leaving,
    rather than reported whenever a garbage collection finds them, in whatever later test that is."""
    loops: list[asyncio.AbstractEventLoop] = []
    new_event_loop = asyncio.new_event_loop

    def kept_loop() -> asyncio.AbstractEventLoop:
        loops.append(new_event_loop())
        return loops[-1]

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(asyncio, "new_event_loop", kept_loop)
            yield
    finally:
        asyncio.set_event_loop(None)
        for loop in loops:
            loop.close()
