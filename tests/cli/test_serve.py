"""`emoserve serve` as a process: live at once, ready after warm-up, exit codes, --stay-up."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import httpx

from emoserve.api.warmup import API_ROUTES
from tests.support.paths import CLIP, MODEL
from tests.support.server import (
    assert_error,
    first_answer,
    first_answer_with,
    serve_process,
    wait_for,
)

WAV = CLIP.read_bytes()


def test_serve_answers_healthz_at_once_is_ready_after_warm_up_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    started = time.monotonic()
    with serve_process(tmp_path, "--model", str(MODEL), "--ready-wait-s", "60") as (process, url):
        health, seconds = first_answer(f"{url}/healthz", started, timeout_s=10)
        assert health.status_code == 200
        # the promise (live within 2 s) is measured by benchmarks/serve_start.py; on a loaded 2-core runner
        # a wall-clock bound flakes, so this asserts the order (live before ready) with a generous bound
        assert seconds < 10.0, f"/healthz answered {seconds:.2f} s after process start"
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503
        assert ready.json()["state"] in ("starting", "loading", "warming")
        # a request now waits (up to --ready-wait-s) instead of failing: it is served once the engine is
        # warm, while the server may still be answering its own warm-up requests before "ready"
        early = httpx.post(f"{url}/v1/recognize", content=WAV, timeout=90)
        assert early.status_code == 200, early.text
        ready, _ = first_answer_with(f"{url}/readyz", 200, timeout_s=60)
        assert ready.json()["timings"]["routes_warmup_s"] > 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        log = process.stderr.read() if process.stderr else ""
    assert "model loaded in" in log and "warm-up finished in" in log
    # the server's own requests, one per route, each answered and checked (no UI here: --no-ui)
    (warmed,) = [line for line in log.splitlines() if "routes warmed up over loopback" in line]
    assert warmed.endswith("s: " + "; ".join(API_ROUTES)), warmed


def broken_model(tmp_path: Path) -> Path:
    model = tmp_path / "broken-model"
    shutil.copytree(MODEL, model)
    (model / "config.yaml").write_text("model_conf: [unclosed", encoding="utf-8")
    return model


def test_serve_exits_non_zero_when_the_model_cannot_load(tmp_path: Path) -> None:
    with serve_process(tmp_path, "--model", str(broken_model(tmp_path))) as (process, _):
        code = process.wait(60)
        log = process.stderr.read() if process.stderr else ""
    assert code != 0
    assert "start-up failed" in log and "config.yaml" in log


def test_serve_stays_up_failed_when_asked(tmp_path: Path) -> None:
    with serve_process(tmp_path, "--model", str(broken_model(tmp_path)), "--stay-up") as (process, url):
        started = time.monotonic()
        first_answer(f"{url}/healthz", started, timeout_s=10)
        wait_for(lambda: httpx.get(f"{url}/readyz").json()["state"].startswith("failed"), 60, "failed state")
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and "cannot read config.yaml" in ready.json()["state"]
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert_error(httpx.post(f"{url}/v1/recognize", content=WAV), 503, "start_up_failed")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 1  # it never served
