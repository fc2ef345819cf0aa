"""Errors as JSON (api/errors.py): unknown routes and methods, and each error counted once."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from emoserve.serving.service import Service
from tests.support.paths import CLIP
from tests.support.server import (
    Live,
    app_client,
    assert_error,
)

WAV = CLIP.read_bytes()


def test_unknown_route_and_method_are_json(live: Live) -> None:
    assert_error(live.client.get("/v2/nothing"), 404, "not_found")
    assert_error(live.client.get("/v1/recognize"), 405, "method_not_allowed")


def errors_counted(client: TestClient) -> dict[str, float]:
    text = client.get("/metrics").text
    found = re.finditer(r'^emoserve_errors_total\{kind="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return {kind: float(value) for kind, value in (m.groups() for m in found)}


def test_every_error_is_counted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each way an error is answered (a route's domain error, FastAPI's validation, Starlette's 404, a bug,
    the middlewares' 401 and 431) counts it once in emoserve_errors_total under its code, and only there."""
    client = app_client(api_key="sekret", max_upload_mb=0.001)
    service: Service = client.app.state.service  # type: ignore[attr-defined]

    async def bug(timeout_s: float) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(service, "wait_ready", bug)
    key = {"X-API-Key": "sekret"}
    requests: list[tuple[str, Callable[[], Any]]] = [
        ("unauthorized", lambda: client.get("/v1/model")),
        ("headers_too_large", lambda: client.get("/v1/model", headers={**key, "X-Pad": "a" * 20_000})),
        ("not_ready", lambda: client.get("/v1/model", headers=key)),
        ("not_found", lambda: client.get("/v2/nothing", headers=key)),
        ("invalid_parameter", lambda: client.post("/v1/recognize", params={"granularity": "x"}, headers=key)),
        ("upload_too_large", lambda: client.post("/v1/recognize", content=b"\0" * 2000, headers=key)),
        ("missing_file", lambda: client.post("/v1/timeline", files={"audio": ("a.wav", WAV)}, headers=key)),
        ("internal_error", lambda: client.post("/v1/recognize", content=WAV[:500], headers=key)),
    ]
    for code, request in requests:
        before = errors_counted(client)
        response = request()
        assert response.json()["error"]["code"] == code, response.text
        after = errors_counted(client)
        changed = {kind: n - before.get(kind, 0.0) for kind, n in after.items() if n != before.get(kind)}
        assert changed == {code: 1.0}, (code, changed)
