"""A live service for tests: uvicorn in a thread on the tiny model (the app, engine and model in this
process, so tests can look inside), `emoserve serve` as a process, a TestClient without a model, and the
checks every surface shares (the error shape, a result equal to the library's)."""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
import uvicorn
from fastapi.testclient import TestClient

from emoserve.api.app import H11_BUFFER_BYTES, DrainingServer, create_app
from emoserve.api.warmup import warm_routes
from emoserve.serving.service import Hooks, Service
from emoserve.serving.settings import Settings

from .paths import MODEL
from .reference import EMBEDDING_TOL, SCORE_TOL, wave

LIVE = Settings(
    model=str(MODEL),
    device="cpu",
    dtype="float32",  # the reference's numbers: results are compared with the library's at float32
    # the tiny model's ops take microseconds; a second thread mostly waits (tests/serving/test_engine.py)
    threads=1,
    ui=False,
    access_log=False,
    log_level="warning",
    max_upload_mb=1.0,
    max_audio_s=10.0,
    warmup_batch_sizes=(1, 2),
)


def wav_bytes(samples: np.ndarray, sample_rate: int = 16_000) -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, sample_rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    return body


def assert_same_result(body: dict[str, Any], expected: Any) -> None:
    """An HTTP result equals a Result (floats within the fixture's tolerances)."""
    want = expected.to_dict()
    for key in ("emotion", "label_zh", "emoji", "granularity", "model", "random_weights", "duration_s"):
        assert body[key] == want[key], key
    assert list(body["scores"]) == list(want["scores"])
    np.testing.assert_allclose(list(body["scores"].values()), list(want["scores"].values()), atol=SCORE_TOL)
    assert body["confidence"] == pytest.approx(want["confidence"], abs=SCORE_TOL)
    if want["frames"] is None:
        assert body["frames"] is None
    else:
        assert [f["emotion"] for f in body["frames"]] == [f["emotion"] for f in want["frames"]]
        got = [list(f["scores"].values()) for f in body["frames"]]
        np.testing.assert_allclose(got, [list(f["scores"].values()) for f in want["frames"]], atol=SCORE_TOL)
    if expected.embedding is None:
        assert body["embedding"] is None
    else:
        np.testing.assert_allclose(np.array(body["embedding"]), expected.embedding, atol=EMBEDDING_TOL)


def assert_same_segments(
    got: Sequence[Mapping[str, Any]],
    want: Sequence[Mapping[str, Any]],
    keys: Sequence[str] = ("start_s", "end_s", "emotion"),
) -> None:
    """Timeline segments (or a stream's `segment` messages) equal one for one: `keys` exactly, the scores
    label by label within the fixture's tolerance."""
    for one, other in zip(got, want, strict=True):
        for key in keys:
            assert one[key] == other[key], key
        assert list(one["scores"]) == list(other["scores"])
        np.testing.assert_allclose(
            list(one["scores"].values()), list(other["scores"].values()), atol=SCORE_TOL
        )


@dataclasses.dataclass
class Live:
    client: httpx.Client
    service: Service
    server: DrainingServer
    thread: threading.Thread


@contextmanager
def live_server(
    settings: Settings, home: Path, warm_routes_at: Callable[[str], str] | None = None
) -> Iterator[Live]:
    """uvicorn in a thread (the app, engine and model in this process, so tests can look inside),
    listening on a free port; yields once the service is ready. `warm_routes_at`: the routes' warm-up
    runs (as `serve` sets it up), at the URL it makes of the server's."""
    env = pytest.MonkeyPatch()
    env.setenv("EMOSERVE_HOME", str(home))
    torch_threads = _torch_threads()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    hooks = Hooks()
    if warm_routes_at is not None:
        hooks = Hooks(warm_routes=functools.partial(warm_routes, base_url=warm_routes_at(url)))
    service = Service(settings, hooks=hooks)
    config = uvicorn.Config(
        create_app(settings, service),
        log_level="warning",
        timeout_graceful_shutdown=10,
        h11_max_incomplete_event_size=H11_BUFFER_BYTES,  # as server.serve configures it
    )
    server = DrainingServer(config, service)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: service.phase in ("ready", "failed"), 60, "the service to be ready")
        assert service.ready, service.state
        with httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=32)) as client:
            yield Live(client, service, server, thread)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        env.undo()
        _set_torch_threads(torch_threads)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


@contextmanager
def gated_model(service: Service) -> Iterator[threading.Event]:
    """Model calls wait until the yielded event is set (at the latest when the block ends)."""
    assert service.engine is not None
    recognizer = service.engine.recognizer
    original = recognizer.predict_batch
    gate = threading.Event()

    def gated(*args: Any, **kwargs: Any) -> Any:
        gate.wait(30)
        return original(*args, **kwargs)

    recognizer.predict_batch = gated  # type: ignore[method-assign]
    try:
        yield gate
    finally:
        gate.set()
        recognizer.predict_batch = original  # type: ignore[method-assign]


def post_clip(client: httpx.Client, data: bytes, **params: Any) -> httpx.Response:
    return client.post("/v1/recognize", content=data, params=params)


def app_client(**changes: Any) -> TestClient:
    """A TestClient outside `with`: the lifespan does not run, so no model is ever loaded."""
    settings = dataclasses.replace(Settings(), **{"ui": False, "ready_wait_s": 0.0, **changes})
    return TestClient(create_app(settings), raise_server_exceptions=False)


def serve_command(*args: str, prelude: str | None = None, ui: bool = False) -> list[str]:
    """`emoserve serve ARGS`, without the web UI unless `ui`; `prelude`: Python the server's process runs
    first (a test's fault, such as a pause at a chosen point), then the CLI."""
    script = Path(sys.executable).with_name("emoserve")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "emoserve.cli"]
    if prelude is not None:
        base = [
            sys.executable,
            "-c",
            f"{prelude}\nimport sys\nfrom emoserve.cli import main\nsys.exit(main())",
        ]
    return [*base, "serve", *args, *([] if ui else ["--no-ui"]), "--no-access-log", "--device", "cpu",
            "--threads", "1"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_process(
    tmp_path: Path, *args: str, prelude: str | None = None, ui: bool = False
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`emoserve serve` on a free port with its home in tmp_path (the same home: the same jobs), without
    the web UI unless `ui`; `prelude` as serve_command's; killed on leaving. Yields the process and its
    URL."""
    port = free_port()
    env = {**os.environ, "EMOSERVE_HOME": str(tmp_path / "home")}
    process = subprocess.Popen(
        serve_command("--port", str(port), *args, prelude=prelude, ui=ui),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def first_answer(url: str, started: float, timeout_s: float) -> tuple[httpx.Response, float]:
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        try:
            return httpx.get(url, timeout=1), time.monotonic() - started
        except httpx.TransportError:
            time.sleep(0.01)
    raise AssertionError(f"no answer from {url} within {timeout_s} s")


def first_answer_with(url: str, status: int, timeout_s: float) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    while (reply := httpx.get(url, timeout=5)).status_code != status:
        assert time.monotonic() - started < timeout_s, f"{url} answers {reply.status_code}: {reply.text}"
        time.sleep(0.05)
    return reply, time.monotonic() - started


def windows(n: int, seconds: float = 2.0) -> list[np.ndarray]:
    """n different stretches of speech of the same length: they batch without padding."""
    speech = wave("en_31s_16k.wav")
    size = int(seconds * 16_000)
    return [speech[i * size : (i + 1) * size] for i in range(n)]


def streamed(
    live: Live, audio: Path, query: str, size: int = 3200, pause_s: float = 0.005
) -> list[dict[str, Any]]:
    """Every message of a /v1/stream session that sends `audio`'s 16-bit PCM in messages of `size` bytes
    (`pause_s` apart, so that interim readings come), then `end`; read on a thread of its own."""
    import json

    from websockets.sync.client import connect

    url = str(live.client.base_url).replace("http://", "ws://") + f"/v1/stream?{query}"
    pcm = sf.read(audio, dtype="int16")[0].tobytes()
    with connect(url) as ws:
        messages = [json.loads(ws.recv())]
        reader = threading.Thread(target=lambda: messages.extend(json.loads(raw) for raw in ws))
        reader.start()
        for at in range(0, len(pcm), size):
            ws.send(pcm[at : at + size])
            time.sleep(pause_s)
        ws.send(json.dumps({"type": "end"}))
        reader.join(60)
    return messages
