"""Engines on the tiny model for the web UI's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from emoserve.inference.recognizer import Recognizer
from emoserve.serving.engine import Engine, EngineConfig

# Long enough that two windows clicked one after the other share one model call (proof that the UI
# lets them run at once), short enough to keep the test quick.
BATCH_WAIT_MS = 1500.0


@pytest.fixture(scope="module")
def engine(tiny_recognizer: Recognizer) -> Iterator[Engine]:
    engine = Engine(tiny_recognizer, EngineConfig(max_batch_size=2, max_wait_ms=BATCH_WAIT_MS))
    engine.start()
    yield engine
    engine.stop(timeout_s=10)


@pytest.fixture
def fast_engine(tiny_recognizer: Recognizer) -> Iterator[Engine]:
    engine = Engine(tiny_recognizer, EngineConfig(max_wait_ms=0))
    engine.start()
    yield engine
    engine.stop(timeout_s=10)
