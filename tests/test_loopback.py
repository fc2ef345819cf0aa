"""The routes' warm-up talks to the server itself over loopback: nothing from the environment applies."""

from __future__ import annotations

import http.server
import threading

from emoserve.api.warmup import loopback_client


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
