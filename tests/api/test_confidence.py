"""How results read, over HTTP and the live stream: `labels` (query, form field, stream parameter)
renormalises over the subset and refuses unknown names with a 422 naming the valid ones; `min_confidence`
(request, setting) makes the top label `uncertain` with the scores unchanged, counted in the metrics; a
calibration from `emoserve calibrate` served with `--calibration` replaces the scores and says so."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.sync.client import connect

from emoserve.cli import main
from emoserve.inference.confidence import UNCERTAIN, load_calibration
from tests.support.labelled import write_labelled_set
from tests.support.paths import CLIP, MODEL
from tests.support.server import LIVE, Live, assert_error, live_server, streamed

FOUR = "angry,happy,neutral,sad"


def test_labels_on_recognize_timeline_and_stream(live: Live, tiny_recognizer: Any, speech: Path) -> None:
    data = CLIP.read_bytes()
    body = live.client.post("/v1/recognize", params={"labels": FOUR}, content=data).json()
    expected = tiny_recognizer.predict(CLIP, labels=FOUR)
    assert list(body["scores"]) == FOUR.split(",") and body["emotion"] == expected.emotion
    assert np.allclose(list(body["scores"].values()), list(expected.scores.values()), atol=1e-5)
    form = live.client.post("/v1/recognize", files={"file": ("c.wav", data)}, data={"labels": "iemocap4"})
    assert list(form.json()["scores"]) == FOUR.split(",")
    bad = live.client.post("/v1/recognize", params={"labels": "angry,joy"}, content=data)
    message = assert_error(bad, 422, "invalid_parameter")["error"]["message"]
    assert "'joy' is not a label" in message and "neutral" in message

    timeline = live.client.post("/v1/timeline", params={"labels": FOUR}, files={"file": speech.read_bytes()})
    segments = timeline.json()["segments"]
    assert segments and all(list(s["scores"]) == FOUR.split(",") for s in segments)
    assert set(timeline.json()["summary"]["distribution"]) == set(FOUR.split(","))
    bad = live.client.post(
        "/v1/timeline", params={"labels": "joy,anger"}, files={"file": speech.read_bytes()}
    )
    assert_error(bad, 422, "invalid_parameter")

    messages = streamed(live, speech, f"labels={FOUR}&min_confidence=1&hop_s=0.25")
    scored = [m for m in messages if m["type"] in ("segment", "interim")]
    assert scored and all(list(m["scores"]) == FOUR.split(",") for m in scored)
    assert all(m["emotion"] == UNCERTAIN for m in scored)  # no score reaches 1
    assert messages[0]["parameters"]["labels"] == FOUR and messages[0]["parameters"]["min_confidence"] == 1
    with connect(str(live.client.base_url).replace("http://", "ws://") + "/v1/stream?labels=joy,x") as ws:
        error = json.loads(ws.recv())
    assert error["code"] == "invalid_parameter" and "'joy'" in error["message"]


def test_min_confidence_per_request_is_uncertain_with_the_scores_unchanged(live: Live) -> None:
    data = CLIP.read_bytes()
    raw = live.client.post("/v1/recognize", content=data).json()
    before = live.client.get("/metrics").text
    body = live.client.post("/v1/recognize", params={"min_confidence": 1.0}, content=data).json()
    assert body["emotion"] == UNCERTAIN and body["scores"] == raw["scores"]
    assert body["confidence"] == raw["confidence"] and raw["emotion"] != UNCERTAIN
    form = live.client.post("/v1/recognize", files={"file": ("c.wav", data)}, data={"min_confidence": "1"})
    assert form.json()["emotion"] == UNCERTAIN
    assert (
        live.client.post("/v1/recognize", params={"min_confidence": 0.0}, content=data).json()["emotion"]
        == (raw["emotion"])
    )
    assert_error(
        live.client.post("/v1/recognize", params={"min_confidence": 2}, content=data),
        422,
        "invalid_parameter",
    )

    def counted(text: str) -> float:
        line = next(
            (
                x
                for x in text.splitlines()
                if x.startswith('emoserve_uncertain_results_total{output="emotion"}')
            ),
            None,
        )
        return float(line.split()[-1]) if line else 0.0

    assert counted(live.client.get("/metrics").text) == counted(before) + 2


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`emoserve calibrate` on the labelled set (the fixture model's random-weight scores)."""
    manifest = write_labelled_set(tmp_path_factory.mktemp("labelled"))
    out = tmp_path_factory.mktemp("calibrations") / "mine"
    argv = ["calibrate", str(manifest), "--map", "low=sad,high=happy,noise=neutral", "--out", str(out),
            "-m", str(MODEL), "--backend", "torch", "--no-cache"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_calibrate_writes_a_calibration_and_its_report(calibration: Path) -> None:
    assert sorted(p.name for p in calibration.iterdir()) == [
        "calibration.json",
        "reliability.png",
        "report.json",
    ]
    report = json.loads((calibration / "report.json").read_text())
    assert report["n"] == 60 and report["labels_seen"] == ["happy", "neutral", "sad"]
    assert set(report["before"]) == set(report["after"]) == {"ece", "log_loss", "accuracy"}
    assert report["method"] in report["candidates"] and report["ece"] == report["after"]["ece"]


def test_a_served_calibration_and_the_min_confidence_setting(
    calibration: Path, tmp_path: Path, tiny_recognizer: Any
) -> None:
    settings = dataclasses.replace(LIVE, calibration=str(calibration), min_confidence=1.0)
    fitted = load_calibration(calibration)
    with live_server(settings, tmp_path / "home") as live:
        assert live.client.get("/v1/model").json()["calibration"]["method"] == fitted.method
        body = live.client.post("/v1/recognize", content=CLIP.read_bytes()).json()
        raw = np.array(list(tiny_recognizer.predict(CLIP).scores.values()))
        assert body["calibrated"] is True
        assert np.allclose(list(body["scores"].values()), fitted.apply(raw), atol=1e-5)
        assert body["emotion"] == UNCERTAIN  # the setting: 1.0
        answered = live.client.post("/v1/recognize", params={"min_confidence": 0}, content=CLIP.read_bytes())
        assert answered.json()["emotion"] != UNCERTAIN  # the request's threshold wins
        spans = json.dumps([{"start_s": 0.0, "end_s": 1.5}])
        timeline = live.client.post(
            "/v1/timeline", files={"file": CLIP.read_bytes()}, data={"segments": spans}
        )
        assert [s["calibrated"] for s in timeline.json()["segments"]] == [True]
