"""How a result reads (inference/confidence.py): label subsets renormalise exactly and refuse unknown
names; min_confidence makes the top label `uncertain` and leaves the scores as they are (the nine emotions,
a head, a timeline's summary); a calibration's file, its numbers and its refusals. In the library, on the
fixture model; the served surfaces: tests/api/test_confidence.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emoserve.audio.segments import Span
from emoserve.errors import HeadError, OptionError
from emoserve.inference.confidence import (
    LABEL_SETS,
    UNCERTAIN,
    Calibration,
    load_calibration,
    read_out,
    restrict,
    save_calibration,
)
from emoserve.model.head import model_identity
from tests.support.paths import CLIP

FOUR = ("angry", "happy", "neutral", "sad")


def test_a_label_subset_is_the_scores_restricted_and_renormalised(tiny_recognizer: Any) -> None:
    raw = tiny_recognizer.predict(CLIP, "frame")
    sub = tiny_recognizer.predict(CLIP, "frame", labels=",".join(FOUR))
    total = sum(raw.scores[label] for label in FOUR)
    assert list(sub.scores) == list(FOUR)
    for label in FOUR:
        assert sub.scores[label] == pytest.approx(raw.scores[label] / total, abs=1e-12)
    assert sum(sub.scores.values()) == pytest.approx(1.0, abs=1e-12)
    best = max(FOUR, key=lambda label: raw.scores[label])
    assert (sub.emotion, sub.confidence) == (best, sub.scores[best])
    assert sub.emoji == next(x.emoji for x in tiny_recognizer.labels if x.en == best)
    for frame, raw_frame in zip(sub.frames or [], raw.frames or [], strict=True):  # each frame as well
        frame_total = sum(raw_frame.scores[label] for label in FOUR)
        assert frame.scores == pytest.approx({k: raw_frame.scores[k] / frame_total for k in FOUR}, abs=1e-12)
        assert frame.emotion == max(FOUR, key=lambda k: raw_frame.scores[k])
    listed = tiny_recognizer.predict(CLIP, labels=list(FOUR))  # a list, as the library takes it
    assert listed.scores == pytest.approx(tiny_recognizer.predict(CLIP, labels="iemocap4").scores, abs=1e-12)


def test_a_named_set_folds_its_labels() -> None:
    scores = {"angry": 0.1, "happy": 0.2, "excited": 0.3, "neutral": 0.15, "sad": 0.05, "other": 0.2}
    folded = restrict(scores, LABEL_SETS["iemocap4"])
    assert folded == pytest.approx({"angry": 0.125, "happy": 0.625, "neutral": 0.1875, "sad": 0.0625})


def test_unknown_labels_are_a_typed_error_naming_the_valid_ones(tiny_recognizer: Any) -> None:
    with pytest.raises(OptionError, match=r"'joy' is not a label of this model; its labels are angry, ") as e:
        tiny_recognizer.predict(CLIP, labels="angry,joy")
    assert e.value.code == "invalid_parameter" and "iemocap4" in str(e.value)
    with pytest.raises(OptionError, match="a subset needs two or more"):
        tiny_recognizer.predict(CLIP, labels="angry")
    with pytest.raises(OptionError, match=r"min_confidence is 1\.5; give a number from 0 to 1"):
        tiny_recognizer.predict(CLIP, min_confidence=1.5)


def test_under_min_confidence_the_top_label_is_uncertain_and_the_scores_stay(tiny_recognizer: Any) -> None:
    raw = tiny_recognizer.predict(CLIP)
    under = tiny_recognizer.predict(CLIP, min_confidence=raw.confidence + 1e-6)
    assert under.emotion == UNCERTAIN and under.scores == raw.scores and under.confidence == raw.confidence
    at = tiny_recognizer.predict(CLIP, min_confidence=raw.confidence)
    assert at.emotion == raw.emotion  # at the threshold: answered
    segments = tiny_recognizer.timeline(
        CLIP, spans=[Span(0.0, 1.5), Span(1.5, 3.0)], min_confidence=1.0
    ).summary  # every segment uncertain: the summary says so
    assert segments["dominant"] == UNCERTAIN and segments["seconds"][UNCERTAIN] == pytest.approx(
        3.0, abs=0.01
    )


def test_a_heads_own_threshold_and_the_requests(tiny_recognizer: Any, tmp_path: Path) -> None:
    import dataclasses

    from emoserve.inference.results import HeadResult

    head = HeadResult("mood", "calm", 0.6, {"calm": 0.6, "tense": 0.4}, None, None)
    result = dataclasses.replace(tiny_recognizer.predict(CLIP), head=head)
    labels = {label.en: label for label in tiny_recognizer.labels}
    assert read_out(result, None, labels, 0.7).head.label == UNCERTAIN  # the head's own threshold
    kept = read_out(result, None, labels, 0.5)
    assert kept.head.label == "calm" and kept.head.scores == head.scores


# ---------------------------------------------------------------------------------------- calibration


def test_a_calibration_keeps_argmax_with_a_temperature_and_sums_to_one() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4) * 0.3, size=50)
    t = Calibration("temperature", ("a", "b", "c", "d"), temperature=2.5)
    q = t.apply(p)
    z = np.log(p) / 2.5
    assert np.allclose(q, np.exp(z) / np.exp(z).sum(axis=1, keepdims=True), atol=1e-12)
    assert (q.argmax(axis=1) == p.argmax(axis=1)).all() and np.allclose(q.sum(axis=1), 1.0)
    assert q.max(axis=1).mean() < p.max(axis=1).mean()  # T > 1 softens


def test_a_calibration_directory_round_trips_and_refuses_what_it_must(
    tiny_recognizer: Any, tmp_path: Path
) -> None:
    labels = tuple(label.en for label in tiny_recognizer.labels)
    meta = {"model": model_identity(tiny_recognizer.info)}
    knots = tuple(((0.0, 1.0), (0.1, 0.9)) for _ in labels)
    saved = Calibration("isotonic", labels, knots=knots, meta=meta)
    save_calibration(tmp_path / "cal", saved, {"report.json": b"{}"})
    loaded = load_calibration(tmp_path / "cal")
    assert loaded == saved and loaded.model == meta["model"]
    tiny_recognizer.use_calibration(loaded)
    try:
        calibrated = tiny_recognizer.predict(CLIP)
    finally:
        tiny_recognizer.use_calibration(None)
    raw = tiny_recognizer.predict(CLIP)
    assert calibrated.calibrated and not raw.calibrated
    expected = loaded.apply(np.array(list(raw.scores.values())))
    assert np.allclose(list(calibrated.scores.values()), expected, atol=1e-6)
    other = Calibration("temperature", labels, meta={"model": {**meta["model"], "config_sha256": "x"}})
    with pytest.raises(HeadError, match="calibrate again on this model"):
        tiny_recognizer.use_calibration(other)
    body = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    body["temperature"] = -1
    (tmp_path / "cal" / "calibration.json").write_text(json.dumps(body))
    with pytest.raises(HeadError, match="is damaged"):
        load_calibration(tmp_path / "cal")
    with pytest.raises(HeadError, match="not a calibration directory"):
        load_calibration(tmp_path)
