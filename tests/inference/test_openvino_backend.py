"""The OpenVINO backend: the entry's ONNX graph on OpenVINO, its parity with onnx at float32, its compiled
model cached beside the entry, and the service, a live stream and a timeline on it.

Its parity with the reference (one clip at a time and padded batches, both granularities) is in
test_recognizer.py; bfloat16 and `--dtype auto` in test_precision.py."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from websockets.sync.client import connect

from emoserve.inference.openvino_backend import (
    CACHE_DIR,
    RUNTIME_CACHE_ENTRIES,
    OpenVinoBackend,
    compile_config,
)
from emoserve.inference.recognizer import Recognizer, load_model
from tests.support.audio import SPEECH
from tests.support.paths import FIXTURE
from tests.support.reference import CLIPS, SCORE_TOL, wave

CLIP = FIXTURE / "audio" / "zh_3s_16k.wav"


def graph_copy(entry: Path, dest: Path) -> Path:
    """The entry's files (not its compiled-model cache) in a folder of the test's own."""
    shutil.copytree(entry, dest, ignore=shutil.ignore_patterns(CACHE_DIR))
    return dest


@pytest.mark.parametrize("granularity", ["utterance", "frame"])
def test_float32_gives_the_onnx_backends_numbers(
    tiny_openvino: Recognizer, tiny_onnx: Recognizer, granularity: str
) -> None:
    assert (tiny_openvino.backend.name, tiny_openvino.dtype) == ("openvino", "float32")
    for clip in CLIPS:
        got = tiny_openvino.predict((wave(clip), 16000), granularity, embedding=True)
        want = tiny_onnx.predict((wave(clip), 16000), granularity, embedding=True)
        np.testing.assert_allclose(list(got.scores.values()), list(want.scores.values()), atol=SCORE_TOL)
        assert got.embedding is not None and want.embedding is not None
        np.testing.assert_allclose(got.embedding, want.embedding, atol=1e-4)
        assert [f.emotion for f in got.frames or []] == [f.emotion for f in want.frames or []]


def test_the_per_shape_runtime_cache_is_bounded(tiny_openvino: Recognizer) -> None:
    """OpenVINO's default (5000 shapes) grew a server ~250 MB a minute under many shapes (the soak,
    which measures the effect); the compiled model reports no such property, so its config is checked,
    and the compile that took it (the fixture's) ran."""
    config = compile_config("bfloat16", 2, None)
    assert config["CPU_RUNTIME_CACHE_CAPACITY"] == RUNTIME_CACHE_ENTRIES < 5000
    assert tiny_openvino.backend.name == "openvino"


def test_the_compiled_model_is_cached_beside_the_entry_and_reused(
    tiny_onnx_entry: Path, tmp_path: Path
) -> None:
    """The first load compiles and writes the cache; a restart loads from it and writes nothing."""
    entry = graph_copy(tiny_onnx_entry, tmp_path / "entry")
    first = OpenVinoBackend(entry / "model.onnx", "float32", 1)
    cached = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in (entry / CACHE_DIR).iterdir()}
    assert first.cache_dir == entry / CACHE_DIR and cached
    assert first.compiled.get_property("LOADED_FROM_CACHE") is False
    second = OpenVinoBackend(entry / "model.onnx", "float32", 1)
    assert second.compiled.get_property("LOADED_FROM_CACHE") is True
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in (entry / CACHE_DIR).iterdir()} == cached
    waves = wave("en_1s_16k.wav")[None]
    lengths = np.array([waves.shape[1]])
    np.testing.assert_array_equal(
        first.run(waves, lengths, frames=False).logits, second.run(waves, lengths, frames=False).logits
    )


def test_an_entry_that_cannot_be_written_compiles_without_a_cache(
    tiny_onnx_entry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = graph_copy(tiny_onnx_entry, tmp_path / "entry")
    monkeypatch.setattr("emoserve.inference.openvino_backend._writable", lambda folder: False)
    backend = OpenVinoBackend(entry / "model.onnx", "float32", 1)
    assert backend.cache_dir is None and not (entry / CACHE_DIR).exists()


def test_a_call_in_progress_is_not_interrupted(tiny_openvino: Recognizer) -> None:
    """OpenVINO's cancel is not safe to use (openvino_backend.py): the recognizer says it cannot stop a
    call, as on torch, and the engine lets an interim reading finish."""
    assert not hasattr(tiny_openvino.backend, "interrupt")
    assert tiny_openvino.interrupt() is False


def test_the_service_a_stream_and_a_timeline_run_on_openvino(
    tiny_onnx_entry: Path, tiny_recognizer: Recognizer, tmp_path: Path, speech: Path
) -> None:
    """Warm-up (with its output checks), the engine, the API and /v1/model, a live stream whose segments
    are the timeline's, and the timeline equal to the library's at float32."""
    import soundfile as sf

    from tests.support.server import LIVE, assert_same_result, assert_same_segments, live_server

    settings = dataclasses.replace(LIVE, model=str(tiny_onnx_entry), backend="openvino", max_audio_s=60.0)
    with live_server(settings, tmp_path / "home") as live:
        info = live.client.get("/v1/model").json()
        assert (info["backend"], info["device"], info["dtype"]) == ("openvino", "cpu", "float32")
        assert "float32 as asked" in info["reason"]
        response = live.client.post(
            "/v1/recognize", files={"file": CLIP.read_bytes()}, params={"granularity": "frame"}
        )
        assert response.status_code == 200, response.text
        assert_same_result(response.json(), tiny_recognizer.predict(CLIP, "frame"))

        timeline = live.client.post("/v1/timeline", files={"file": speech.read_bytes()}).json()
        want = tiny_recognizer.timeline(speech).to_dict()
        assert len(timeline["segments"]) == len(want["segments"]) == 2 * len(SPEECH)
        assert_same_segments(timeline["segments"], want["segments"])

        url = str(live.client.base_url).replace("http://", "ws://") + "/v1/stream"
        pcm = bytes(sf.read(speech, dtype="int16")[0].tobytes())
        with connect(url) as ws:
            assert json.loads(ws.recv())["type"] == "ready"
            for at in range(0, len(pcm), 32_000):
                ws.send(pcm[at : at + 32_000])
            ws.send(json.dumps({"type": "end"}))
            messages = [json.loads(raw) for raw in ws]
        segments = [m for m in messages if m["type"] == "segment"]
        assert [(s["start_s"], s["end_s"]) for s in segments] == [
            (s["start_s"], s["end_s"]) for s in timeline["segments"]
        ]
        for got, expected in zip(segments, timeline["segments"], strict=True):
            np.testing.assert_allclose(
                list(got["scores"].values()), list(expected["scores"].values()), atol=SCORE_TOL
            )
        assert messages[-1]["type"] == "summary"


def test_load_model_names_openvino_when_asked(tiny_onnx_entry: Path) -> None:
    rec = load_model(tiny_onnx_entry, backend="openvino", dtype="float32", threads=1, progress=False)
    assert (rec.backend.name, rec.device, rec.dtype) == ("openvino", "cpu", "float32")
    assert "openvino: as asked" in rec.reason
