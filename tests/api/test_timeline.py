"""POST /v1/timeline against uvicorn in a thread with the real engine on the tiny model: JSON and NDJSON
(the CLI's jsonl lines), results equal to the library's, limits and the settings they name, bad input,
caller segments, a client that goes away, metrics, and single-clip requests served first while a long
recording's segments wait."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf

from emoserve.api.schemas import TimelineOut, TimelineSegmentOut
from emoserve.cli import main
from emoserve.serving.settings import Settings
from emoserve.serving.timeline import TIMELINE_IN_FLIGHT
from tests.support.audio import SPEECH, encode_with_pyav, joined
from tests.support.paths import CLIP, MODEL
from tests.support.server import (
    LIVE,
    Live,
    assert_error,
    assert_same_segments,
    gated_model,
    live_server,
    wait_for,
)

TIMELINE_LIVE = dataclasses.replace(LIVE, max_timeline_s=120.0, max_timeline_upload_mb=4.0)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_server(TIMELINE_LIVE, tmp_path_factory.mktemp("timeline-home")) as server:
        yield server


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x, _ = joined(SPEECH)
    path = tmp_path_factory.mktemp("recording") / "call.wav"
    sf.write(path, x, 16_000, subtype="PCM_16")
    return path


def timelines_in_progress(live: Live) -> float | None:
    return live.service.metrics.registry.get_sample_value("emoserve_timelines_in_progress")


def too_long_count(live: Live) -> float:
    counted = live.service.metrics.registry.get_sample_value(
        "emoserve_errors_total", {"kind": "audio_too_long"}
    )
    return counted or 0.0


def upload(path: Path) -> dict[str, Any]:
    return {"file": (path.name, path.read_bytes(), "audio/wav")}


def spooled_files() -> list[str]:
    return glob.glob(os.path.join(tempfile.gettempdir(), "emoserve-upload-*"))


def ndjson_lines(client: httpx.Client, path: Path) -> tuple[httpx.Response, list[dict[str, Any]]]:
    """A streamed timeline of `path` (uploaded as the raw body): the response and its lines."""
    with client.stream(
        "POST", "/v1/timeline", content=path.read_bytes(), headers={"Accept": "application/x-ndjson"}
    ) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    return response, lines


def nan_part_way(recording: Path, folder: Path) -> Path:
    """The recording as a float WAV with a NaN sample 12 s in: it fails part-way, after some segments."""
    x, _ = sf.read(recording, dtype="float32")
    x[12 * 16_000] = np.nan
    broken = folder / "broken.wav"
    sf.write(broken, x, 16_000, subtype="FLOAT")
    return broken


def test_json_timeline_equals_the_library(live: Live, recording: Path, tiny_recognizer: Any) -> None:
    response = live.client.post("/v1/timeline", files=upload(recording))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == set(TimelineOut.model_fields)  # what /docs promises, no more, no less
    TimelineOut.model_validate(body)
    want = tiny_recognizer.timeline(recording).to_dict()
    assert body["file"] == "call.wav" and body["duration_s"] == want["duration_s"]
    assert body["random_weights"] == want["random_weights"] and body["vad"] == want["vad"]
    assert (body["backend"], body["dtype"]) == (want["backend"], want["dtype"]) == ("torch", "float32")
    assert len(body["segments"]) == len(SPEECH) == len(want["segments"])
    assert_same_segments(body["segments"], want["segments"])
    assert body["summary"]["dominant"] == want["summary"]["dominant"]
    assert spooled_files() == []  # the upload's temporary file is gone


def test_ndjson_streams_segments_then_the_summary(live: Live, recording: Path) -> None:
    response, lines = ndjson_lines(live.client, recording)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert [line["type"] for line in lines] == ["segment"] * len(SPEECH) + ["summary"]
    summary = lines[-1]
    assert "segments" not in summary and summary["summary"]["segments"] == len(SPEECH)
    assert summary["file"] == "<request body>" and summary["random_weights"] is False
    for line in lines[:-1]:  # each segment line says which file it is of, and whether to trust it
        assert line["file"] == "<request body>" and line["random_weights"] is False
        TimelineSegmentOut.model_validate(line)
    starts = [line["start_s"] for line in lines[:-1]]
    assert starts == sorted(starts)


def test_silence_only_is_200_with_no_segments(live: Live, tmp_path: Path) -> None:
    path = tmp_path / "quiet.wav"
    sf.write(path, np.random.default_rng(0).normal(0, 1e-3, 3 * 16_000).astype(np.float32), 16_000)
    response = live.client.post("/v1/timeline", files=upload(path))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["segments"] == [] and body["speech_s"] == 0 and body["summary"]["dominant"] is None


def test_channels_separate_and_caller_segments(live: Live, recording: Path) -> None:
    stereo = recording.with_name("stereo.wav")
    x, _ = sf.read(recording, dtype="float32")
    sf.write(stereo, np.stack([x, np.zeros_like(x)], axis=1), 16_000)
    body = live.client.post("/v1/timeline", files=upload(stereo), params={"channels": "separate"}).json()
    assert {s["speaker"] for s in body["segments"]} == {"ch0"}
    assert set(body["summary"]["speakers"]) == {"ch0"}

    segments = json.dumps([{"start_s": 1.0, "end_s": 2.5, "speaker": "agent"}, {"start_s": 5, "end_s": 9}])
    body = live.client.post("/v1/timeline", files=upload(recording), data={"segments": segments}).json()
    assert [(s["start_s"], s["end_s"], s["speaker"]) for s in body["segments"]] == [
        (1.0, 2.5, "agent"),
        (5.0, 9.0, None),
    ]
    assert body["vad"] is None


def test_limits_are_413_and_bad_input_4xx(live: Live, recording: Path, tmp_path: Path) -> None:
    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(125 * 16_000, np.float32), 16_000, subtype="PCM_U8")  # 2 MB, 125 s
    body = assert_error(live.client.post("/v1/timeline", files=upload(long)), 413, "audio_too_long")
    assert_names_the_timeline_limit(body["error"]["message"])
    big = live.client.post("/v1/timeline", content=b"\0" * 5_000_000)
    assert_error(big, 413, "upload_too_large")
    assert_error(live.client.post("/v1/timeline", content=b"not audio" * 100), 415, "unsupported_audio")
    assert_error(
        live.client.post("/v1/timeline", files=upload(recording), params={"vad_threshold": 2}),
        422,
        "invalid_parameter",
    )
    assert_error(
        live.client.post("/v1/timeline", files=upload(recording), params={"channels": "left"}),
        422,
        "invalid_parameter",
    )
    assert_error(
        live.client.post("/v1/timeline", files=upload(recording), data={"segments": "[{]"}),
        422,
        "invalid_parameter",
    )
    # /v1/recognize keeps its meaning: one clip, its own limit
    clip = assert_error(
        live.client.post("/v1/recognize", content=recording.read_bytes()), 413, "audio_too_long"
    )
    assert_names_the_clip_limit(clip["error"]["message"])
    assert spooled_files() == []


def test_a_client_that_goes_away_cancels_the_rest(live: Live, tmp_path: Path) -> None:
    """With the model held, a client reads nothing and hangs up: its queued segments leave the queue,
    decoding stops, the temporary file goes, and the server serves the next request - which is then the
    only work left: no segment of the recording beyond those already in the model ever reaches it."""
    x, _ = joined(SPEECH * 4)
    path = tmp_path / "long.wav"
    sf.write(path, x, 16_000, subtype="PCM_16")
    engine = live.service.engine
    assert engine is not None
    recognizer = engine.recognizer
    body = path.read_bytes()
    head = (
        f"POST /v1/timeline HTTP/1.1\r\nHost: x\r\nAccept: application/x-ndjson\r\n"
        f"Content-Type: audio/wav\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    calls: list[list[str]] = []  # the sources of each model call, from the hang-up's test on
    original = recognizer.predict_batch

    def recorded(clips: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append([clip.source for clip in clips])
        return original(clips, *args, **kwargs)

    recognizer.predict_batch = recorded  # type: ignore[method-assign]
    try:
        with gated_model(live.service) as gate:
            sock = socket.create_connection((live.client.base_url.host, live.client.base_url.port))
            sock.sendall(head + body)
            # a call of segments is held in the model and more wait in the queue
            wait_for(lambda: engine.in_flight >= 1 and engine.queue_depth >= 1, 10, "segments in the engine")
            assert engine.queue_depth + engine.in_flight <= TIMELINE_IN_FLIGHT  # of one recording
            in_model = engine.in_flight  # held by the gate: the one worker starts nothing else meanwhile
            sock.close()  # hang up mid-request
            wait_for(lambda: engine.queue_depth == 0, 10, "the queued segments to be dropped")
            gate.set()
        wait_for(lambda: spooled_files() == [], 10, "the upload's temporary file to be removed")
        wait_for(lambda: timelines_in_progress(live) == 0, 10, "the timeline to be counted done")
        assert live.client.post("/v1/recognize", content=CLIP.read_bytes()).status_code == 200
    finally:
        recognizer.predict_batch = original  # type: ignore[method-assign]
    assert (engine.queue_depth, engine.in_flight) == (0, 0)  # nothing of it waits to run later
    assert calls[-1] == ["<request body>"], calls  # the next request ran alone, after the timeline ended
    segments = [source for call in calls for source in call if "@" in source]  # "<file>@<start>s"
    assert len(segments) <= in_model, (in_model, calls)  # nothing more of it ran


def test_single_clips_go_before_a_long_recordings_segments(live: Live, recording: Path) -> None:
    """While a timeline's segments wait in the engine, a /v1/recognize that arrives later is served by
    the next model call (the queue is first come, first served otherwise)."""
    engine = live.service.engine
    assert engine is not None
    recognizer = engine.recognizer
    calls: list[list[str]] = []
    with gated_model(live.service) as gate:
        gated = recognizer.predict_batch

        def recorded(clips: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append([clip.source for clip in clips])
            return gated(clips, *args, **kwargs)

        recognizer.predict_batch = recorded  # type: ignore[method-assign]
        timeline = threading.Thread(target=lambda: live.client.post("/v1/timeline", files=upload(recording)))
        timeline.start()
        # a call of segments runs (held by the gate) and more wait: only then does the person come
        wait_for(lambda: engine.in_flight >= 1 and engine.queue_depth >= 1, 30, "the timeline's segments")
        clip = CLIP.read_bytes()
        replies: list[httpx.Response] = []
        single = threading.Thread(
            target=lambda: replies.append(live.client.post("/v1/recognize", content=clip))
        )
        single.start()
        queued = engine.queue_depth
        wait_for(lambda: engine.queue_depth > queued or bool(replies), 30, "the single clip to queue")
        assert not replies, replies[0].text
        gate.set()
        single.join(30)
        timeline.join(30)
    assert calls[1] == ["<request body>"], calls  # the next call, alone: segments do not ride along
    assert all(source.startswith("call.wav@") for call in (calls[0], *calls[2:]) for source in call), calls


def test_timeline_metrics(live: Live, recording: Path) -> None:
    live.client.post("/v1/timeline", files=upload(recording))
    text = live.client.get("/metrics").text
    for name in (
        "emoserve_timeline_duration_seconds_bucket",
        "emoserve_timeline_audio_seconds_total",
        "emoserve_timeline_segments_total",
        "emoserve_timelines_in_progress",
    ):
        assert name in text, name
    segments = float(
        next(
            line.split()[-1]
            for line in text.splitlines()
            if line.startswith("emoserve_timeline_segments_total")
        )
    )
    assert segments >= len(SPEECH)
    assert 'route="/v1/timeline"' in text


def test_settings_default_timeline_limits_by_hardware() -> None:
    assert Settings().effective_max_timeline_s("cpu") == 1800.0
    assert Settings().effective_max_timeline_s("cuda") == 10800.0
    assert Settings(max_timeline_s=60.0).effective_max_timeline_s("cuda") == 60.0


def test_a_file_that_fails_part_way(live: Live, recording: Path, tmp_path: Path) -> None:
    """A NaN sample 12 s in (a float WAV): JSON gets the 400; NDJSON has sent segments already, so its
    last line is the error."""
    broken = nan_part_way(recording, tmp_path)
    before = set(spooled_files())
    assert_error(live.client.post("/v1/timeline", files=upload(broken)), 400, "invalid_audio")
    response, lines = ndjson_lines(live.client, broken)
    assert response.status_code == 200
    assert [line["type"] for line in lines][-1] == "error" and lines[-1]["error"]["code"] == "invalid_audio"
    assert lines[-1]["file"] == "<request body>" and set(lines[-1]["error"]) == {"code", "message"}
    assert all(line["end_s"] <= 12.0 for line in lines[:-1])
    # this test's uploads are removed (a streamed one by a background task after its last line)
    wait_for(lambda: set(spooled_files()) <= before, 10, "the uploads' temporary files to be removed")


# --------------------------------------------------------------- the limits a too-long recording names


def assert_names_the_timeline_limit(message: str) -> None:
    assert "max_timeline_s" in message and "EMOSERVE_MAX_TIMELINE_S" in message, message
    assert "max_audio_s" not in message and "EMOSERVE_MAX_AUDIO_S" not in message, message


def assert_names_the_clip_limit(message: str) -> None:
    assert "max_audio_s" in message and "EMOSERVE_MAX_AUDIO_S" in message, message
    assert "max_timeline_s" not in message and "EMOSERVE_MAX_TIMELINE_S" not in message, message


def too_long_error(client: httpx.Client, path: Path, ndjson: bool) -> dict[str, Any]:
    """The error of a /v1/timeline request for a recording over the limit: a 413 before any work (the
    length is in the header), or, once a stream has begun (found while decoding), its last line."""
    headers = {"Accept": "application/x-ndjson"} if ndjson else {}
    response = client.post("/v1/timeline", files=upload(path), headers=headers)
    if ndjson and response.headers["content-type"].startswith("application/x-ndjson"):
        assert response.status_code == 200
        last = json.loads(response.text.splitlines()[-1])
        assert last["type"] == "error" and last["file"] == path.name, last
        assert last["error"]["code"] == "audio_too_long", last
        return dict(last["error"])
    return dict(assert_error(response, 413, "audio_too_long")["error"])


def test_a_too_long_recording_names_the_timeline_limit_in_every_format(
    recording: Path, tmp_path: Path
) -> None:
    """/v1/timeline over max_timeline_s names that setting alone, whichever decoder finds the length: a
    WAV's header (before any work), an MP3 or an AAC file while it is decoded (part-way: for NDJSON the
    status has gone out, so the error is the last line). It once named max_audio_s, or both limits. And
    /v1/recognize names its own limit, max_audio_s, alone. Each error is counted once."""
    x, _ = sf.read(recording, dtype="float32")  # 17.5 s: over both limits below
    mp3, m4a = tmp_path / "call.mp3", tmp_path / "call.m4a"
    encode_with_pyav(mp3, "mp3", "libmp3lame", x[:, None], 16_000, 16_000)
    encode_with_pyav(m4a, "mp4", "aac", x[:, None], 16_000, 16_000)
    settings = dataclasses.replace(TIMELINE_LIVE, max_timeline_s=5.0, max_audio_s=10.0)
    with live_server(settings, tmp_path / "home") as server:
        for path in (recording, mp3, m4a):
            for ndjson in (False, True):
                before = too_long_count(server)
                error = too_long_error(server.client, path, ndjson)
                assert_names_the_timeline_limit(error["message"])
                assert too_long_count(server) == before + 1, (path.name, ndjson)
        clip = assert_error(
            server.client.post("/v1/recognize", files=upload(recording)), 413, "audio_too_long"
        )
        assert_names_the_clip_limit(clip["error"]["message"])
    assert spooled_files() == []


# ------------------------------------------------------------------- one set of lines: CLI and API


def test_ndjson_lines_have_the_keys_of_the_cli_jsonl_lines(
    live: Live, recording: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`emoserve predict --segments --format jsonl` and the API's NDJSON stream write the same lines
    (inference.formats): a segment, a summary and an error line have the same keys in both."""
    broken = nan_part_way(recording, tmp_path)
    code = main(
        ["predict", str(recording), str(broken), "--segments", "--model", str(MODEL), "--format", "jsonl"]
    )
    assert code == 1  # the broken file failed
    cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    _, api = ndjson_lines(live.client, recording)
    _, api_broken = ndjson_lines(live.client, broken)

    def keys(lines: list[dict[str, Any]], kind: str) -> set[str]:
        found = [line for line in lines if line["type"] == kind]
        assert found, kind
        assert all(set(line) == set(found[0]) for line in found), kind
        return set(found[0])

    for kind in ("segment", "summary"):
        assert keys(api, kind) == keys(cli, kind), kind
    assert keys(api_broken, "error") == keys(cli, "error") == {"type", "file", "error"}
    cli_error = next(line for line in cli if line["type"] == "error")
    assert set(api_broken[-1]["error"]) == set(cli_error["error"]) == {"code", "message"}
    assert cli_error["error"]["code"] == api_broken[-1]["error"]["code"] == "invalid_audio"
