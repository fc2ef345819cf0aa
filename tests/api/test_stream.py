"""GET /v1/stream: live emotion over a WebSocket, against /v1/timeline's answer for the same audio."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import soundfile as sf
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.support.audio import RATE, SPEECH, clip
from tests.support.paths import MODEL
from tests.support.server import (
    LIVE,
    Live,
    app_client,
    assert_same_segments,
    first_answer,
    gated_model,
    live_server,
    serve_process,
    wait_for,
    wav_bytes,
)

SCORE_TOL = 1e-5  # the issue's: a stream's scores are the timeline's


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    settings = dataclasses.replace(LIVE, max_streams=2, max_audio_s=60.0)
    with live_server(settings, tmp_path_factory.mktemp("stream-home")) as live:
        yield live


def ws_url(live: Live, query: str = "") -> str:
    base = str(live.client.base_url).replace("http://", "ws://")
    return f"{base}/v1/stream" + (f"?{query}" if query else "")


def pcm(path: Path) -> bytes:
    return bytes(sf.read(path, dtype="int16")[0].tobytes())


def received_until_closed(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every message until the server closes, whatever its close code."""
    out = []
    with contextlib.suppress(ConnectionClosed):
        while True:
            out.append(json.loads(ws.recv()))
    return out


def run_stream(ws: ClientConnection, data: bytes, size: int, pause_s: float = 0.0) -> list[dict[str, Any]]:
    """Send `data` in messages of `size` bytes, then `end`; every message until the server closes."""
    received: list[dict[str, Any]] = []

    def read() -> None:
        for raw in ws:
            received.append(json.loads(raw))

    reader = threading.Thread(target=read)
    reader.start()
    for at in range(0, len(data), size):
        ws.send(data[at : at + size])
        if pause_s:
            time.sleep(pause_s)
    ws.send(json.dumps({"type": "end"}))
    reader.join(60)
    return received


def stream_messages(
    live: Live, data: bytes, size: int, query: str = "", pause_s: float = 0.0
) -> list[dict[str, Any]]:
    with connect(ws_url(live, query)) as ws:
        ready = json.loads(ws.recv())
        messages = [ready, *run_stream(ws, data, size, pause_s)]
        assert ws.close_code == 1000, (ws.close_code, messages[-1])
    return messages


@pytest.mark.parametrize("size", [320, 1002, 32_000])
def test_a_stream_gives_the_timelines_segments_and_scores(server: Live, speech: Path, size: int) -> None:
    """Whatever the message size, and sent as fast as the server takes it (back-pressure, not drops)."""
    timeline = server.client.post("/v1/timeline", files={"file": speech.read_bytes()}).json()
    messages = stream_messages(server, pcm(speech), size)
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    segments = [m for m in messages if m["type"] == "segment"]
    assert len(segments) == len(timeline["segments"]) == 2 * len(SPEECH)
    assert_same_segments(segments, timeline["segments"], ("start_s", "end_s", "speaker", "emotion", "split"))
    summary = messages[-1]
    assert summary["type"] == "summary" and summary["summary"]["dominant"] == timeline["summary"]["dominant"]
    assert summary["duration_s"] == pytest.approx(timeline["duration_s"], abs=1e-6)


def test_every_message_and_its_fields(server: Live, speech: Path) -> None:
    messages = stream_messages(server, pcm(speech), 3200, "hop_s=0.25", pause_s=0.005)
    ready = messages[0]
    assert set(ready) == {"type", "seq", "session_id", "model", "random_weights", "labels", "parameters"} | {
        "backend",
        "dtype",
    }
    about = server.client.get("/v1/model").json()
    assert (ready["backend"], ready["dtype"]) == (about["backend"], about["dtype"]) != ("auto", "auto")
    assert ready["parameters"]["hop_s"] == 0.25 and ready["parameters"]["sample_rate"] == 16_000
    assert ready["parameters"]["vad_threshold"] == 0.5  # named as the query parameter
    kinds = [m["type"] for m in messages]
    assert kinds.count("speech_start") == kinds.count("segment") and "interim" in kinds
    labels = [label["en"] for label in ready["labels"]]
    skipped = 0
    for m in messages[1:-1]:
        if m["type"] == "speech_start":
            assert set(m) == {"type", "seq", "start_s"}
        elif m["type"] in ("interim", "segment"):
            assert list(m["scores"]) == labels and sum(m["scores"].values()) == pytest.approx(1, abs=1e-4)
            assert m["skipped"] >= skipped  # interims skipped so far: it only grows
            skipped = m["skipped"]
            if m["type"] == "interim":
                assert set(m) == {
                    "type",
                    "seq",
                    "start_s",
                    "end_s",
                    "emotion",
                    "label_zh",
                    "emoji",
                    "confidence",
                    "scores",
                    "skipped",
                }
                assert m["end_s"] - m["start_s"] <= 10.0
    metrics = server.client.get("/metrics").text
    assert 'emoserve_streams_total{outcome="opened"}' in metrics
    assert 'emoserve_stream_interims_total{outcome="sent"}' in metrics
    assert "emoserve_stream_segment_latency_seconds_count" in metrics


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("sample_rate=5", "sample_rate is 5"),
        ("hop_s=0.1", "hop_s is 0.1"),
        ("encoding=mp3", "encoding is 'mp3'"),
        ("colour=blue", "unknown parameter 'colour'"),
        ("vad_threshold=2", "threshold is 2"),
        ("granularity=word", "granularity is 'word'"),
        ("head=nope", "head is 'nope'"),
        ("chunk_s=2", "chunk_s reads the client's turns in pieces: it needs vad=off"),
    ],
)
def test_a_bad_parameter_is_an_error_then_close_1008(server: Live, query: str, says: str) -> None:
    with connect(ws_url(server, query)) as ws:
        error = json.loads(ws.recv())
        with pytest.raises(ConnectionClosed):
            ws.recv()
        assert ws.close_code == 1008
    assert error["type"] == "error" and error["fatal"] is True and error["code"] == "invalid_parameter"
    assert says in error["message"]


def test_bad_messages_get_errors_and_the_stream_goes_on(server: Live, speech: Path) -> None:
    data = pcm(speech)
    before = errors_counted(server)
    with connect(ws_url(server)) as ws:
        json.loads(ws.recv())
        ws.send(data[:32_000])
        ws.send(b"\x01\x02\x03")  # not whole 16-bit samples
        ws.send("this is not JSON")
        ws.send(json.dumps({"type": "pause"}))
        messages = run_stream(ws, data[32_000:], 32_000)
        assert ws.close_code == 1000
    errors = [m for m in messages if m["type"] == "error"]
    assert [(e["code"], e["fatal"]) for e in errors] == [
        ("invalid_frame", False),
        ("invalid_message", False),
        ("invalid_message", False),
    ]
    assert "3 bytes" in errors[0]["message"] and "'pause'" in errors[2]["message"]
    assert len([m for m in messages if m["type"] == "segment"]) == 2 * len(SPEECH)
    assert messages[-1]["type"] == "summary"
    counted = errors_counted(server)
    assert counted["invalid_frame"] - before["invalid_frame"] == 1
    assert counted["invalid_message"] - before["invalid_message"] == 2


def test_messages_after_end_get_errors_before_the_summary(server: Live, speech: Path) -> None:
    """After `end` the server still reads until its summary is out: audio, or another message, sent then
    is left out with its (non-fatal) error, told before the summary; the stream still closes 1000."""
    first_utterance = pcm(speech)[: int(2.5 * RATE) * 2]  # 0.8 s of pause, then into the first clip
    before = errors_counted(server)
    with gated_model(server.service) as gate, connect(ws_url(server)) as ws:
        json.loads(ws.recv())
        ws.send(first_utterance)
        ws.send(json.dumps({"type": "end"}))  # the open utterance's segment waits for the gate
        ws.send(b"\x00\x00" * 1600)
        ws.send(json.dumps({"type": "end"}))
        wait_for(lambda: errors_counted(server)["invalid_message"] - before["invalid_message"] == 2, 10,
                 "the two late messages to be read")  # fmt: skip
        gate.set()
        messages = received_until_closed(ws)
        assert ws.close_code == 1000
    assert [m["type"] for m in messages] == ["speech_start", "segment", "error", "error", "summary"]
    errors = [m for m in messages if m["type"] == "error"]
    assert [e["message"] for e in errors] == [
        'audio after {"type": "end"} was left out',
        'a message after {"type": "end"} was left out',
    ]
    assert all(e["fatal"] is False for e in errors)
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))


def errors_counted(server: Live) -> dict[str, float]:
    """emoserve_errors_total by kind (the error code), from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    counted: dict[str, float] = {"invalid_frame": 0.0, "invalid_message": 0.0}
    for family in text_string_to_metric_families(server.client.get("/metrics").text):
        if family.name == "emoserve_errors":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counted[sample.labels["kind"]] = sample.value
    return counted


def test_a_message_over_1_mib_ends_the_stream_and_others_are_served(server: Live, speech: Path) -> None:
    with connect(ws_url(server), max_size=None) as ws:
        json.loads(ws.recv())
        ws.send(pcm(speech)[:64_000])
        ws.send(b"\x00" * (2 << 20))
        messages = received_until_closed(ws)
        assert ws.close_code == 1009
    assert messages[-1]["type"] == "error" and messages[-1]["fatal"] is True
    assert messages[-1]["code"] == "frame_too_large" and messages[-2]["type"] == "summary"
    assert server.client.post("/v1/recognize", content=speech.read_bytes()).status_code == 200


def test_max_streams_refuses_the_handshake_with_503(server: Live, speech: Path) -> None:
    with connect(ws_url(server)) as first, connect(ws_url(server)) as second:
        first.recv(), second.recv()
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url(server))
        response = refused.value.response
        assert response.status_code == 503 and response.headers["retry-after"]
        assert json.loads(response.body)["error"]["code"] == "too_many_streams"
    wait_for(lambda: server.service.open_streams == 0, 10, "the two streams to close")


def test_a_client_that_vanishes_mid_utterance_frees_what_it_held(server: Live, speech: Path) -> None:
    data = pcm(speech)
    with connect(ws_url(server)) as ws:
        ws.recv()
        for at in range(0, 96_000, 3200):  # three seconds: into the first utterance
            ws.send(data[at : at + 3200])
        ws.socket.close()  # no close handshake: gone
    wait_for(lambda: server.service.open_streams == 0, 10, "the stream to be freed")
    assert server.service.engine is not None
    wait_for(lambda: server.service.engine.queue_depth == 0, 10, "its queued work to go")  # type: ignore[union-attr]
    assert "emoserve_streams_active 0.0" in server.client.get("/metrics").text


def test_before_ready_the_handshake_gets_503() -> None:
    from starlette.testclient import WebSocketDenialResponse

    client = app_client()
    with pytest.raises(WebSocketDenialResponse) as refused, client.websocket_connect("/v1/stream"):
        pass
    assert refused.value.status_code == 503 and refused.value.json()["error"]["code"] == "not_ready"


def test_the_api_key_in_the_query_or_the_headers(tmp_path: Path, speech: Path) -> None:
    settings = dataclasses.replace(LIVE, api_key="sekret")
    with live_server(settings, tmp_path / "home") as live:
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url(live))
        assert refused.value.response.status_code == 401
        for url, headers in (
            (ws_url(live, "api_key=sekret"), None),
            (ws_url(live), {"X-API-Key": "sekret"}),
            (ws_url(live), {"Authorization": "Bearer sekret"}),
        ):
            with connect(url, additional_headers=headers) as ws:
                assert json.loads(ws.recv())["type"] == "ready"


def test_sigterm_ends_open_streams_with_their_summary_then_1001(tmp_path: Path, speech: Path) -> None:
    data = pcm(speech)
    started = time.monotonic()
    with serve_process(tmp_path, "--model", str(MODEL), "--drain-timeout-s", "20") as (process, url):
        first_answer(f"{url}/healthz", started, timeout_s=30)
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, 60, "ready")
        with connect(url.replace("http://", "ws://") + "/v1/stream") as ws:
            ws.recv()
            for at in range(0, len(data) // 2, 3200):
                ws.send(data[at : at + 3200])
            process.send_signal(signal.SIGTERM)
            messages = received_until_closed(ws)
            assert ws.close_code == 1001
        assert process.wait(30) == 0
    assert [m["type"] for m in messages[-2:]] == ["summary", "error"]
    assert messages[-1]["code"] == "draining" and messages[-1]["fatal"] is True
    assert any(m["type"] == "segment" for m in messages)


# ----------------------------------------------------------------------------- client-driven turns


def turn_audio(*names: str) -> list[bytes]:
    """Each clip as the 16-bit WAV a client would post to /v1/recognize."""
    return [wav_bytes(clip(name)) for name in names]


def wav_pcm(wav: bytes) -> bytes:
    return bytes(sf.read(io.BytesIO(wav), dtype="int16")[0].tobytes())


def test_vad_off_and_flush_give_recognize_scores_for_each_turn(server: Live) -> None:
    """The client decides the turns: each `flush` answers with the turn's segment, its audio exactly
    (no padding, no VAD), scored as /v1/recognize scores the same audio; the turn_id is echoed."""
    wavs = turn_audio("zh_3s_16k.wav", "en_1s_16k.wav", "en_3s_8k.wav")
    with connect(ws_url(server, "vad=off&hop_s=0.5")) as ws:
        ready = json.loads(ws.recv())
        assert ready["parameters"]["vad"] == "off"
        received: list[dict[str, Any]] = []
        reader = threading.Thread(target=lambda: received.extend(json.loads(raw) for raw in ws))
        reader.start()
        for turn_id, wav in zip(["first", 2, "3"], wavs, strict=True):
            data = wav_pcm(wav)
            for at in range(0, len(data), 3200):
                ws.send(data[at : at + 3200])
            ws.send(json.dumps({"type": "flush", "turn_id": turn_id}))
        ws.send(json.dumps({"type": "end"}))
        reader.join(60)
        assert ws.close_code == 1000
    segments = [m for m in received if m["type"] == "segment"]
    assert [s["turn_id"] for s in segments] == ["first", 2, "3"]
    assert [m["type"] for m in received].count("speech_start") == 3  # each turn opens with its audio
    at = 0.0
    for segment, wav in zip(segments, wavs, strict=True):
        seconds = len(wav_pcm(wav)) / 2 / RATE
        assert segment["start_s"] == pytest.approx(at, abs=1e-6)
        assert segment["end_s"] == pytest.approx(at + seconds, abs=1e-6)
        at += seconds
        recognized = server.client.post("/v1/recognize", content=wav).json()
        assert segment["emotion"] == recognized["emotion"]
        for label, score in recognized["scores"].items():
            assert segment["scores"][label] == pytest.approx(score, abs=SCORE_TOL)
    summary = received[-1]
    assert summary["type"] == "summary" and summary["summary"]["segments"] == 3 and summary["vad"] is None


def test_a_turn_read_in_pieces_gives_the_librarys_pooled_reading(server: Live, tiny_recognizer: Any) -> None:
    """vad=off&chunk_s: interim readings of the turn so far after each piece, and the flush's segment
    pooling every piece (`pieces`), as the library's stream reads the same audio (tests/inference/
    test_live.py checks that against the definition); a short turn is scored whole, as /v1/recognize."""
    long, short = (wav_pcm(w) for w in turn_audio("zh_3s_16k.wav", "en_3s_8k.wav"))
    long = long + short  # 6 s: 3 pieces of 2 s
    with connect(ws_url(server, "vad=off&chunk_s=2")) as ws:
        ready = json.loads(ws.recv())
        assert ready["parameters"]["chunk_s"] == 2.0
        for turn_id, data in (("long", long), ("short", short[: int(1.5 * RATE) * 2])):
            for at in range(0, len(data), 3200):
                ws.send(data[at : at + 3200])
            ws.send(json.dumps({"type": "flush", "turn_id": turn_id}))
        ws.send(json.dumps({"type": "end"}))
        received = received_until_closed(ws)
    library = tiny_recognizer.stream(use_vad=False, chunk_s=2.0)
    expected = [m for m in library.feed(long) + library.flush("long") if m["type"] in ("interim", "segment")]
    got = [m for m in received if m["type"] in ("interim", "segment")]
    assert [(m["type"], m["start_s"], m["end_s"]) for m in got[: len(expected)]] == [
        (m["type"], m["start_s"], m["end_s"]) for m in expected
    ]
    assert [m["type"] for m in expected] == ["interim", "interim", "segment"] and got[2]["pieces"] == 3
    for mine, theirs in zip(got, expected, strict=False):
        for label, score in theirs["scores"].items():
            assert mine["scores"][label] == pytest.approx(score, abs=SCORE_TOL)
    last = got[-1]
    assert last["turn_id"] == "short" and "pieces" not in last
    short_wav = wav_bytes(clip("en_3s_8k.wav")[: int(1.5 * RATE)])
    recognized = server.client.post("/v1/recognize", content=short_wav).json()
    for label, score in recognized["scores"].items():
        assert last["scores"][label] == pytest.approx(score, abs=SCORE_TOL)


def test_flush_with_the_vad_on_closes_the_open_utterance_early(server: Live, speech: Path) -> None:
    data = pcm(speech)
    timeline = server.client.post("/v1/timeline", files={"file": speech.read_bytes()}).json()
    first = timeline["segments"][0]
    cut_s = round(first["start_s"] + 1.0, 2)  # a second into the first utterance
    cut = int(cut_s * RATE) * 2
    with connect(ws_url(server)) as ws:
        json.loads(ws.recv())
        ws.send(data[:cut])
        ws.send(json.dumps({"type": "flush", "turn_id": 41}))
        messages = run_stream(ws, data[cut:], 32_000)
        assert ws.close_code == 1000
    segments = [m for m in messages if m["type"] == "segment"]
    flushed = segments[0]
    assert flushed["turn_id"] == 41 and flushed["start_s"] == pytest.approx(first["start_s"], abs=1e-6)
    assert flushed["end_s"] == pytest.approx(cut_s, abs=1e-6)
    assert all("turn_id" not in s for s in segments[1:])
    # the speech that went on is a new utterance from the flush on; the rest of the stream is the timeline's
    assert segments[1]["start_s"] >= cut_s and segments[1]["end_s"] == pytest.approx(first["end_s"], abs=1e-6)
    assert_same_segments(segments[2:], timeline["segments"][1:], ("start_s", "end_s", "emotion", "split"))


def test_bad_or_misplaced_flushes_get_errors_and_the_stream_goes_on(server: Live) -> None:
    (wav,) = turn_audio("zh_3s_16k.wav")
    with connect(ws_url(server, "vad=off")) as ws:
        json.loads(ws.recv())
        ws.send(json.dumps({"type": "flush", "turn_id": "nothing-yet"}))  # no audio: nothing to score
        ws.send(wav_pcm(wav))
        ws.send(json.dumps({"type": "flush", "turn_id": True}))
        ws.send(json.dumps({"type": "flush", "turn_id": "x" * 200}))
        ws.send(json.dumps({"type": "flush", "turn_id": ["a"]}))
        ws.send(json.dumps({"type": "fluhs"}))
        ws.send(json.dumps({"type": "flush"}))  # no turn_id: the segment carries none
        ws.send(json.dumps({"type": "flush", "turn_id": 9}))  # right after a flush: nothing to score
        messages = run_stream(ws, b"", 3200)
        assert ws.close_code == 1000
    errors = [m for m in messages if m["type"] == "error"]
    assert [(e["code"], e["fatal"], e.get("turn_id")) for e in errors] == [
        ("invalid_message", False, "nothing-yet"),
        ("invalid_message", False, None),
        ("invalid_message", False, None),
        ("invalid_message", False, None),
        ("invalid_message", False, None),
        ("invalid_message", False, 9),
    ]
    assert "no audio since the last flush" in errors[0]["message"]
    assert all("turn_id" in e["message"] for e in errors[1:4])
    assert "'fluhs'" in errors[4]["message"] and '"flush"' in errors[4]["message"]
    (segment,) = [m for m in messages if m["type"] == "segment"]
    assert "turn_id" not in segment and segment["end_s"] == pytest.approx(len(wav_pcm(wav)) / 2 / RATE)
    assert messages[-1]["type"] == "summary"
