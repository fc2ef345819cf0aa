"""Engines on the tiny model for the web UI's tests, and headless Chromium to drive the real page."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from emoserve.inference.recognizer import Recognizer
from emoserve.serving.engine import Engine, EngineConfig
from tests.support.environment import skip_or_fail
from tests.support.webui import BROWSER_ARGS, CHROMIUM

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


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    """One Playwright per module: its sync API runs one at a time in a thread."""
    if not CHROMIUM.exists():
        skip_or_fail(f"{CHROMIUM} is missing: install Debian's chromium to drive the UI in a real browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="module")
def browser(playwright: Any) -> Iterator[Any]:
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=BROWSER_ARGS)
    yield browser
    browser.close()
