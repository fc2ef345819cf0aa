"""The app (api/app.py): probes, model info, metrics, the OpenAPI page, the lifespan's states (before
ready, draining, SIGTERM), keep-warm, and what importing the API loads."""

from __future__ import annotations

import dataclasses
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from emoserve.serving.service import Service
from tests.support.paths import CLIP
from tests.support.server import (
    LIVE,
    Live,
    app_client,
    assert_error,
    gated_model,
    live_server,
    post_clip,
    wait_for,
    wav_bytes,
    windows,
)

WAV = CLIP.read_bytes()

METRIC_NAMES = (
    "emoserve_model_load_seconds",
    "emoserve_warmup_seconds",
    "emoserve_start_to_ready_seconds",
    "emoserve_ready",
    "emoserve_request_duration_seconds_bucket",
    "emoserve_batch_size_bucket",
    "emoserve_queue_depth",
    "emoserve_in_flight_requests",
    "emoserve_requests_total",
    "emoserve_audio_seconds_total",
    "emoserve_errors_total",
    "emoserve_process_resident_memory_bytes",
    "process_resident_memory_bytes",
)


def test_model_info(live: Live) -> None:
    response = live.client.get("/v1/model")
    assert response.status_code == 200
    info = response.json()
    assert info["random_weights"] is False and info["name"]
    assert [label["en"] for label in info["labels"]][:3] == ["angry", "disgusted", "fearful"]
    assert len(info["labels"]) == 9 and all(label["emoji"] for label in info["labels"])
    assert (info["backend"], info["device"], info["dtype"]) == ("torch", "cpu", "float32")
    assert info["parameters"] > 0 and info["config"]["embed_dim"] > 0
    assert info["max_audio_s"] == 10.0


def test_probes_when_ready(live: Live) -> None:
    assert live.client.get("/healthz").json() == {"status": "ok", "state": "ready"}
    ready = live.client.get("/readyz")
    assert ready.status_code == 200
    timings = ready.json()["timings"]
    assert {"model_load_s", "warmup_s", "start_to_ready_s"} <= set(timings)
    assert timings["start_to_ready_s"] >= timings["model_load_s"] + timings["warmup_s"]


def test_metrics_expose_the_promised_names(live: Live) -> None:
    assert post_clip(live.client, WAV).status_code == 200
    assert_error(post_clip(live.client, b""), 400, "empty_audio")
    response = live.client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    missing = [name for name in METRIC_NAMES if f"\n{name}" not in text]
    assert not missing
    assert 'emoserve_requests_total{route="/v1/recognize",status="200"}' in text
    assert 'emoserve_errors_total{kind="empty_audio"}' in text
    assert 'emoserve_request_duration_seconds_count{route="/v1/recognize",stage="inference"}' in text
    assert "emoserve_ready 1.0" in text


def test_openapi_docs(live: Live) -> None:
    assert live.client.get("/docs").status_code == 200
    spec = live.client.get("/openapi.json").json()
    recognize = spec["paths"]["/v1/recognize"]["post"]
    assert "multipart/form-data" in recognize["requestBody"]["content"]
    assert {p["name"] for p in recognize["parameters"]} == {
        "granularity", "embedding", "head", "labels", "min_confidence"
    }  # fmt: skip
    form = recognize["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert {"labels", "min_confidence"} <= set(form)  # the same options as form fields


def refuses_connections(server: Live) -> bool:
    url = server.client.base_url
    try:
        socket.create_connection((url.host, url.port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_drains_requests_in_flight(tmp_path: Path) -> None:
    with live_server(LIVE, tmp_path) as server, ThreadPoolExecutor(2) as pool:
        data = wav_bytes(windows(1)[0])
        with gated_model(server.service) as gate:
            in_flight = [pool.submit(post_clip, server.client, data) for _ in range(2)]
            engine = server.service.engine
            assert engine is not None
            wait_for(lambda: engine.in_flight + engine.queue_depth == 2, 10, "two requests in the engine")
            server.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
            assert server.service.state == "draining"
            # uvicorn's shutdown under way: it has closed its listener, and asked every connection to end
            # once its response is sent; the requests held in the model are still waiting for theirs
            wait_for(lambda: refuses_connections(server), 10, "the server to stop accepting connections")
            assert not any(f.done() for f in in_flight)
            gate.set()
            assert [f.result().status_code for f in in_flight] == [200, 200]
        server.thread.join(30)
        assert not server.thread.is_alive()
        assert not engine.accepting


def test_keep_warm_runs_a_tiny_inference_when_idle(tmp_path: Path) -> None:
    with live_server(dataclasses.replace(LIVE, keep_warm_s=0.2), tmp_path) as server:
        engine = server.service.engine
        assert engine is not None
        calls = engine.model_calls

        def keep_warm_count() -> float:
            text = server.client.get("/metrics").text
            counted = re.search(r"^emoserve_keep_warm_total (\S+)$", text, re.MULTILINE)
            return float(counted.group(1)) if counted else 0.0

        wait_for(lambda: keep_warm_count() >= 2, 10, "two keep-warm inferences")
        assert engine.model_calls >= calls + 2


def test_a_request_before_ready_waits_then_gets_503_with_retry_after() -> None:
    client = app_client(ready_wait_s=0.3)
    started = time.monotonic()
    response = client.post("/v1/recognize", content=WAV)
    assert time.monotonic() - started >= 0.3
    assert_error(response, 503, "not_ready")  # type: ignore[arg-type]
    assert int(response.headers["retry-after"]) >= 1
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["state"] == "starting"
    assert "since_start_s" in ready.json()["timings"]


def test_draining_refuses_new_work() -> None:
    client = app_client(ready_wait_s=5.0)
    service: Service = client.app.state.service  # type: ignore[attr-defined]
    service.begin_drain()
    assert client.get("/readyz").json()["state"] == "draining"
    started = time.monotonic()
    response = client.post("/v1/recognize", content=WAV)
    assert time.monotonic() - started < 1  # no waiting for a ready that will not come
    assert_error(response, 503, "draining")  # type: ignore[arg-type]
    assert "retry-after" in response.headers


def test_importing_the_api_imports_neither_gradio_nor_torch() -> None:
    """The server answers /healthz at once: the web UI's mount (webui/mount.py) brings Gradio only when
    it mounts, the model torch only behind the running server, and the audio path numpy and the
    decoders only when the model loads or a request comes."""
    heavy = ("gradio", "torch", "numpy", "soundfile", "soxr", "av", "onnxruntime")
    code = (
        f"import sys, emoserve.api.app\nheavy = {heavy!r}\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & set(heavy))\n"
        "assert not loaded, loaded"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_ui_path_says_it_is_starting() -> None:
    client = app_client(ui=True)
    page = client.get("/")
    assert page.status_code == 503 and "starting" in page.text
    assert page.headers["content-type"].startswith("text/html")
