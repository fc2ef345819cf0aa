"""The live server the api package's tests share (uvicorn in a thread, the tiny model)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.server import (
    LIVE,
    Live,
    live_server,
)


@pytest.fixture(scope="package")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_server(LIVE, tmp_path_factory.mktemp("live-home")) as server:
        yield server
