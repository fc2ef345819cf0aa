"""The routes' warm-up (api/warmup.py): ready means every route has answered once over loopback."""

from __future__ import annotations

import dataclasses
import gc
import http.server
import logging
import re
import threading
from pathlib import Path

import pytest

from emoserve.api.warmup import API_ROUTES, UI_ROUTE, loopback_client
from tests.support.paths import CLIP
from tests.support.server import (
    LIVE,
    live_server,
)

WAV = CLIP.read_bytes()


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_server_that_cannot_answer_itself_fails_its_start_with_the_reason(tmp_path: Path) -> None:
    nowhere = "http://127.0.0.1:9"  # the discard port: nothing listens
    reason = re.escape(f"warm-up: the server could not answer itself at {nowhere}")
    with pytest.raises(AssertionError, match=reason), live_server(LIVE, tmp_path / "home", lambda _: nowhere):
        pass
    gc.collect()


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_ready_means_the_web_ui_is_mounted_and_every_route_has_answered_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The UI mounts beside the model's start; "ready" waits for it, and for the server's own requests
    over loopback to every route, the UI's recognise included. Those leave nothing behind: no saved
    folder, no count in the metrics."""
    caplog.set_level(logging.INFO, logger="emoserve.api.warmup")
    settings = dataclasses.replace(LIVE, ui=True, outputs_dir=tmp_path / "outputs")
    with live_server(settings, tmp_path / "home", warm_routes_at=lambda url: url) as server:
        page = server.client.get("/")
        assert page.status_code == 200, page.text[:200]
        assert "gradio" in page.text.lower() and server.service.ui_error is None
        (warmed,) = [r.getMessage() for r in caplog.records if "routes warmed up" in r.getMessage()]
        assert warmed.endswith("s: " + "; ".join([*API_ROUTES, UI_ROUTE])), warmed
        assert server.service.timings()["routes_warmup_s"] > 0
        metrics = server.client.get("/metrics").text
        assert 'emoserve_requests_total{route="/v1/recognize"' not in metrics
        assert 'emoserve_requests_total{route="/v1/timeline"' not in metrics
        assert "emoserve_streams_total{" not in metrics  # the warm-up's stream is not counted either
        assert not [p for p in settings.outputs_dir.iterdir() if not p.name.startswith(".")]
    gc.collect()  # Gradio's leaked loops are reported here, under this test's filter, not in a later test


class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"here")

    def log_message(self, *args: object) -> None:
        pass


def test_loopback_ignores_a_missing_ca_bundle_and_proxies(monkeypatch, tmp_path):
    # a host's variables leaking into a container: a CA bundle that is not there, a proxy that is not
    # either; before, the first stopped the server's start with "[Errno 2] No such file or directory"
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with loopback_client(f"http://127.0.0.1:{server.server_port}", {}) as client:
            assert client.get("/").text == "here"
    finally:
        server.shutdown()
        server.server_close()
