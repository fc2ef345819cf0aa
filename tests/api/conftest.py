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
    """Made before any test's own fixtures (the autouse _cache_home among them), so it says itself that
    its model is converted without the ONNX graph: the torch backend, whichever test comes first."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EMOSERVE_EXPORT_ONNX", "0")
        with live_server(LIVE, tmp_path_factory.mktemp("live-home")) as server:
            yield server
