"""POST /v1/recognize (api/recognize.py) against uvicorn in a thread running the real engine on the tiny
model: results equal to the library's, bad inputs, batching and push-back, nothing left for the collector."""

from __future__ import annotations

import dataclasses
import gc
import math
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from emoserve.api.schemas import RecognitionOut
from tests.support.paths import AUDIO, CLIP
from tests.support.server import (
    LIVE,
    Live,
    assert_error,
    assert_same_result,
    gated_model,
    live_server,
    post_clip,
    wait_for,
    wav_bytes,
    windows,
)


@pytest.fixture(scope="module")
def batching(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A server whose first request waits up to 1 s for company, so that a burst fills whole batches."""
    settings = dataclasses.replace(LIVE, max_batch_size=4, max_wait_ms=1000.0, max_queue=8)
    with live_server(settings, tmp_path_factory.mktemp("batching-home")) as server:
        yield server


# ------------------------------------------------------------------------------------ recognition results


def test_multipart_upload_equals_the_recognizer(live: Live, tiny_recognizer: Any) -> None:
    response = live.client.post("/v1/recognize", files={"file": ("clip.wav", CLIP.read_bytes(), "audio/wav")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert_same_result(body, tiny_recognizer.predict(CLIP))
    assert set(body) == set(RecognitionOut.model_fields)  # what /docs promises, no more, no less
    RecognitionOut.model_validate(body)
    assert body["random_weights"] is False
    about = live.client.get("/v1/model").json()  # what scored it, as chosen (never "auto")
    assert (body["backend"], body["dtype"]) == (about["backend"], about["dtype"]) == ("torch", "float32")
    timing = body["timing"]
    assert set(timing) == {"decode_s", "queue_s", "inference_s", "total_s"}
    assert all(v >= 0 for v in timing.values())
    assert timing["total_s"] >= timing["decode_s"] + timing["inference_s"]


@pytest.mark.parametrize("content_type", ["audio/wav", "application/octet-stream", None])
def test_raw_body_equals_the_recognizer(live: Live, tiny_recognizer: Any, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = live.client.post("/v1/recognize", content=CLIP.read_bytes(), headers=headers)
    assert response.status_code == 200, response.text
    assert_same_result(response.json(), tiny_recognizer.predict(CLIP))


def test_frame_granularity_as_a_query_parameter(live: Live, tiny_recognizer: Any) -> None:
    clip = AUDIO / "en_3s_44k.mp3"
    response = post_clip(live.client, clip.read_bytes(), granularity="frame")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["granularity"] == "frame" and len(body["frames"]) > 100
    assert_same_result(body, tiny_recognizer.predict(clip, granularity="frame"))


def test_frame_embedding_as_form_fields(live: Live, tiny_recognizer: Any) -> None:
    response = live.client.post(
        "/v1/recognize",
        files={"file": ("clip.wav", CLIP.read_bytes())},
        data={"granularity": "frame", "embedding": "true"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected = tiny_recognizer.predict(CLIP, granularity="frame", embedding=True)
    assert np.array(body["embedding"]).shape == expected.embedding.shape
    assert_same_result(body, expected)


def test_utterance_embedding(live: Live, tiny_recognizer: Any) -> None:
    response = post_clip(live.client, CLIP.read_bytes(), embedding="true")
    assert response.status_code == 200, response.text
    expected = tiny_recognizer.predict(CLIP, embedding=True)
    assert (
        np.array(response.json()["embedding"]).shape == expected.embedding.shape == (expected.embedding.size,)
    )
    assert_same_result(response.json(), expected)


# ------------------------------------------------------------------------------------------- bad inputs

WAV = CLIP.read_bytes()
BAD_INPUTS = {  # name: (request kwargs, status, code)
    "empty body": ({"content": b""}, 400, "empty_audio"),
    "empty file": ({"files": {"file": ("a.wav", b"")}}, 400, "empty_audio"),
    "not audio": ({"content": b"hello, this is not audio " * 40}, 415, "unsupported_audio"),
    "not audio, multipart": ({"files": {"file": ("a.txt", b"{}" * 500)}}, 415, "unsupported_audio"),
    "wav cut in its header": ({"content": WAV[:30]}, 415, "unsupported_audio"),
    "wav with a header only": ({"content": WAV[:44]}, 400, "truncated_audio"),
    "wav cut in its samples": ({"content": WAV[: len(WAV) // 2]}, 400, "truncated_audio"),
    "too short": ({"content": wav_bytes(np.zeros(100, np.float32))}, 400, "audio_too_short"),
    "too long": ({"content": (AUDIO / "en_31s_16k.wav").read_bytes()}, 413, "audio_too_long"),
    "too big": ({"content": WAV * 11}, 413, "upload_too_large"),  # 1.06 MB, the limit is 1 MB
    "too big, multipart": ({"files": {"file": ("a.wav", WAV * 11)}}, 413, "upload_too_large"),
    "wrong granularity": ({"content": WAV, "params": {"granularity": "word"}}, 422, "invalid_parameter"),
    "wrong granularity field": (
        {"files": {"file": ("a.wav", WAV)}, "data": {"granularity": "word"}},
        422,
        "invalid_parameter",
    ),
    "bad embedding value": ({"content": WAV, "params": {"embedding": "maybe"}}, 422, "invalid_parameter"),
    "bad embedding field": (
        {"files": {"file": ("a.wav", WAV)}, "data": {"embedding": "maybe"}},
        422,
        "invalid_parameter",
    ),
    "multipart without a file": ({"files": {"audio": ("a.wav", WAV)}}, 422, "missing_file"),
    "malformed multipart": (
        {"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
        400,
        "bad_request",
    ),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_gets_its_4xx_json_and_the_service_keeps_serving(live: Live, name: str) -> None:
    kwargs, status, code = BAD_INPUTS[name]
    body = assert_error(live.client.post("/v1/recognize", **kwargs), status, code)
    assert body["error"]["message"]
    assert post_clip(live.client, WAV).status_code == 200


def test_too_long_names_the_limit(live: Live) -> None:
    body = assert_error(
        post_clip(live.client, (AUDIO / "en_31s_16k.wav").read_bytes()), 413, "audio_too_long"
    )
    message = body["error"]["message"]
    assert "10 s" in message and "max_audio_s" in message and "EMOSERVE_MAX_AUDIO_S" in message
    assert "timeline" not in message  # /v1/timeline has its own limit, not this one


# -------------------------------------------------------------------------------------- model, metrics


# ------------------------------------------------------------------------------ batching and push-back


def test_concurrent_requests_share_model_calls(batching: Live, tiny_recognizer: Any) -> None:
    n = 8
    clips = [wav_bytes(w) for w in windows(n)]
    engine = batching.service.engine
    assert engine is not None
    calls_before = engine.model_calls
    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(lambda data: post_clip(batching.client, data), clips))
    calls = engine.model_calls - calls_before
    assert [r.status_code for r in responses] == [200] * n
    assert calls <= math.ceil(n / engine.config.max_batch_size), calls
    for response, data in zip(responses, clips, strict=True):
        assert_same_result(response.json(), tiny_recognizer.predict(data))


def test_a_full_queue_answers_503_with_retry_after(batching: Live) -> None:
    engine = batching.service.engine
    assert engine is not None
    data = wav_bytes(windows(1)[0])
    with gated_model(batching.service) as gate, ThreadPoolExecutor(12) as pool:
        running = [pool.submit(post_clip, batching.client, data) for _ in range(4)]
        wait_for(lambda: engine.in_flight == 4, 10, "a full batch in the model")
        queued = [pool.submit(post_clip, batching.client, data) for _ in range(8)]
        wait_for(lambda: engine.queue_depth == 8, 10, "a full queue")
        refused = post_clip(batching.client, data)
        assert_error(refused, 503, "queue_full")
        assert int(refused.headers["retry-after"]) >= 1
        gate.set()
        assert [f.result().status_code for f in running + queued] == [200] * 12
    assert post_clip(batching.client, data).status_code == 200


def test_a_client_that_disconnects_frees_its_place(batching: Live) -> None:
    engine = batching.service.engine
    assert engine is not None
    data = wav_bytes(windows(1)[0])
    with gated_model(batching.service) as gate, ThreadPoolExecutor(4) as pool:
        running = [pool.submit(post_clip, batching.client, data) for _ in range(4)]
        wait_for(lambda: engine.in_flight == 4, 10, "a full batch in the model")
        with pytest.raises(httpx.ReadTimeout):
            batching.client.post("/v1/recognize", content=data, timeout=httpx.Timeout(30, read=0.5))
        wait_for(lambda: engine.queue_depth == 0, 10, "the abandoned request to leave the queue")
        gate.set()
        assert [f.result().status_code for f in running] == [200] * 4


def test_a_client_that_hangs_up_mid_upload_is_counted_not_a_traceback(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    def disconnects() -> float:
        text = live.client.get("/metrics").text
        line = next((x for x in text.splitlines() if 'kind="client_disconnected"' in x), "x 0")
        return float(line.split()[-1])

    def in_progress() -> float | None:
        return live.service.metrics.registry.get_sample_value("emoserve_in_flight_requests")

    before, idle = disconnects(), in_progress()
    url = live.client.base_url
    with socket.create_connection((url.host, url.port)) as sock:
        sock.sendall(b"POST /v1/recognize HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"\0" * 10)
        wait_for(lambda: in_progress() == idle + 1, 10, "the route to be reading the upload")
    wait_for(lambda: disconnects() == before + 1, 10, "the hang-up to be counted")
    assert "Exception in ASGI application" not in caplog.text


# ------------------------------------------------------------------- without a model: key, states, errors


# a start that fails part-way leaves an event loop's socketpair to the garbage collector: collected here

# Gradio's start-up events open event loops (socketpairs) of their own and never close them

# --------------------------------------------------------------------------- the process: emoserve serve


def test_requests_leave_nothing_for_the_garbage_collector(live: Live) -> None:
    """A request's decoded audio and upload are freed when it ends, not at the next full collection: a
    reference cycle (request -> future -> callback -> request; an error's traceback -> frames -> error)
    kept them for minutes under the soak."""
    good = CLIP.read_bytes()
    for body in (good, good[: len(good) // 2], b"not audio" * 100):  # warm: first-use caches, imports
        live.client.post("/v1/recognize", content=body)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for body in (good, good[: len(good) // 2], b"not audio" * 100) * 3:
            assert live.client.post("/v1/recognize", content=body).status_code in (200, 400, 415)
        gc.collect()
        ours = [
            type(o).__name__ if type(o).__name__ != "frame" else o.f_code.co_name
            for o in gc.garbage
            if type(o).__module__.startswith("emoserve")
            or (type(o).__name__ == "frame" and "emoserve" in o.f_code.co_filename)
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert ours == []
