"""The middlewares (api/middleware.py): the API key and oversized headers."""

from __future__ import annotations

from emoserve.api.middleware import MAX_HEADER_BYTES
from tests.support.paths import CLIP
from tests.support.server import (
    Live,
    app_client,
    assert_error,
)

WAV = CLIP.read_bytes()


def test_oversized_request_headers_get_431_and_the_service_keeps_serving(live: Live) -> None:
    for size in (MAX_HEADER_BYTES + 1, 64 * 1024):
        response = live.client.post("/v1/recognize", content=WAV, headers={"X-Padding": "a" * size})
        assert_error(response, 431, "headers_too_large")
    ok = live.client.post("/v1/recognize", content=WAV, headers={"X-Padding": "a" * 1000})
    assert ok.status_code == 200


def test_api_key_protects_the_api_but_never_the_probes() -> None:
    client = app_client(api_key="sekret")
    for path in ("/healthz", "/metrics"):
        assert client.get(path).status_code == 200
    assert client.get("/readyz").status_code == 503  # not loading: this client skips the lifespan
    refused = client.get("/v1/model")
    assert_error(refused, 401, "unauthorized")  # type: ignore[arg-type]
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/v1/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/v1/recognize", content=WAV, headers={"X-API-Key": "nope"}).status_code == 401
    for headers in ({"Authorization": "Bearer sekret"}, {"X-API-Key": "sekret"}):
        assert_error(client.get("/v1/model", headers=headers), 503, "not_ready")  # type: ignore[arg-type]
    # browsers: the UI and the docs ask for basic auth, with the key as the password
    docs = client.get("/docs")
    assert docs.status_code == 401 and docs.headers["www-authenticate"].startswith("Basic")
    assert client.get("/docs", auth=("anyone", "sekret")).status_code == 200
    assert client.get("/docs", auth=("anyone", "wrong")).status_code == 401


def test_without_a_key_everything_is_open() -> None:
    client = app_client()
    assert_error(client.get("/v1/model"), 503, "not_ready")  # type: ignore[arg-type]
