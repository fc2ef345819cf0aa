"""End to end against the reference outputs, one clip at a time and as one padded batch."""

from __future__ import annotations

import numpy as np
import pytest

from emoserve.inference.recognizer import Recognizer, length_batches
from emoserve.inference.results import Result
from tests.support.paths import FIXTURE
from tests.support.reference import CLIPS, EMBEDDING_TOL, SCORE_TOL, expected, wave

LABELS = ["angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised", "unknown"]


def assert_matches_reference(result: Result, clip: str, granularity: str) -> None:
    ref = expected(clip, granularity)
    assert list(result.scores) == LABELS
    np.testing.assert_allclose(
        list(result.scores.values()), ref["scores"], atol=SCORE_TOL, rtol=0, err_msg=clip
    )
    assert result.embedding is not None and result.embedding.shape == ref["feats"].shape
    np.testing.assert_allclose(result.embedding, ref["feats"], atol=EMBEDDING_TOL, rtol=0, err_msg=clip)


@pytest.fixture(params=["torch", "onnx", "openvino"])
def backend(request: pytest.FixtureRequest) -> Recognizer:
    """The fixture model on each backend at float32: all are held to the reference's tolerances."""
    fixture = {"torch": "tiny_recognizer", "onnx": "tiny_onnx", "openvino": "tiny_openvino"}[request.param]
    recognizer: Recognizer = request.getfixturevalue(fixture)
    assert (recognizer.backend.name, recognizer.dtype) == (request.param, "float32")
    return recognizer


@pytest.mark.parametrize("granularity", ["utterance", "frame"])
@pytest.mark.parametrize("clip", CLIPS)
def test_one_clip_matches_reference(backend: Recognizer, clip: str, granularity: str) -> None:
    assert_matches_reference(
        backend.predict((wave(clip), 16000), granularity, embedding=True), clip, granularity
    )


@pytest.mark.parametrize("granularity", ["utterance", "frame"])
def test_one_padded_batch_of_all_clips_matches_reference(backend: Recognizer, granularity: str) -> None:
    lengths = [len(wave(c)) for c in CLIPS]
    assert min(lengths) < 16000 * 0.5 and max(lengths) > 16000 * 30  # 0.3 s next to 31 s
    results = backend.predict_many(
        [(wave(c), 16000) for c in CLIPS],
        granularity,
        embedding=True,
        batch_size=len(CLIPS),
        max_batch_samples=10**9,
        max_padding=None,
    )
    for clip, result in zip(CLIPS, results, strict=True):
        assert_matches_reference(result, clip, granularity)
        assert result.duration_s == pytest.approx(len(wave(clip)) / 16000)


@pytest.mark.parametrize("clip", [c for c in CLIPS if not c.endswith(".mp3")])
def test_decoded_from_file_matches_reference(backend: Recognizer, clip: str) -> None:
    assert_matches_reference(backend.predict(FIXTURE / "audio" / clip, embedding=True), clip, "utterance")


def test_mp3_is_close_to_reference(tiny_recognizer: Recognizer) -> None:
    """mp3 decoders disagree on encoder delay (fixture README), so this check is looser."""
    clip = "en_3s_44k.mp3"
    result = tiny_recognizer.predict(FIXTURE / "audio" / clip)
    assert result.emotion == LABELS[int(expected(clip, "utterance")["scores"].argmax())]
    np.testing.assert_allclose(list(result.scores.values()), expected(clip, "utterance")["scores"], atol=0.02)


def test_result_fields(tiny_recognizer: Recognizer) -> None:
    result = tiny_recognizer.predict((wave("en_1s_16k.wav"), 16000), "frame")
    assert result.emotion == max(result.scores, key=result.scores.__getitem__)
    assert result.confidence == result.scores[result.emotion]
    assert (result.label_zh, result.emoji) == {
        "angry": ("生气", "😠"),
        "sad": ("难过", "😢"),
        "fearful": ("恐惧", "😨"),
        "disgusted": ("厌恶", "🤢"),
        "happy": ("开心", "😊"),
        "neutral": ("中立", "😐"),
        "other": ("其他", "🤔"),
        "surprised": ("吃惊", "😲"),
        "unknown": ("未知", "❓"),
    }[result.emotion]
    assert sum(result.scores.values()) == pytest.approx(1.0, abs=1e-6)
    assert result.random_weights is False and result.model == "model" and result.embedding is None
    assert result.frames is not None and len(result.frames) == 49  # 1 s -> 49 frames of 20 ms
    assert [(f.start_s, f.end_s) for f in result.frames[:2]] == [(0.0, 0.02), (0.02, 0.04)]
    for frame in result.frames:
        assert frame.emotion == max(frame.scores, key=frame.scores.__getitem__)
        assert sum(frame.scores.values()) == pytest.approx(1.0, abs=1e-6)
    assert (
        "embedding" not in result.to_dict()
        and result.to_dict()["frames"][0]["scores"] == result.frames[0].scores
    )


def test_frame_scores_are_the_head_on_each_frame(tiny_recognizer: Recognizer) -> None:
    """Our addition to upstream: per-frame scores are softmax(proj(frame embedding))."""
    import torch

    result = tiny_recognizer.predict((wave("zh_1s_16k.ogg"), 16000), "frame", embedding=True)
    head = tiny_recognizer.backend.model.proj  # type: ignore[attr-defined]
    with torch.inference_mode():
        direct = head(torch.from_numpy(result.embedding)).softmax(dim=-1).numpy()
    got = np.array([list(f.scores.values()) for f in result.frames or []])
    np.testing.assert_allclose(got, direct, atol=1e-6)


@pytest.mark.parametrize("clip", CLIPS)
def test_a_pooled_embedding_is_scored_as_its_clip(backend: Recognizer, clip: str) -> None:
    """`pooled_result` (a turn read in pieces) runs the classifier on an embedding: on a clip's own pooled
    embedding it gives the clip's scores, the reference's, read out as the scorer asks."""
    result = backend.predict((wave(clip), 16000), embedding=True)
    assert result.embedding is not None
    pooled = backend.pooled_result(result.embedding, result.duration_s)
    assert (pooled.emotion, pooled.duration_s, pooled.embedding) == (result.emotion, result.duration_s, None)
    np.testing.assert_allclose(
        list(pooled.scores.values()), expected(clip, "utterance")["scores"], atol=SCORE_TOL
    )
    subset = backend.scoring(None, backend.readout("angry,happy,neutral,sad", None))
    restricted = subset.pooled_result(result.embedding, result.duration_s)
    asked = backend.predict((wave(clip), 16000), labels="angry,happy,neutral,sad")
    assert restricted.scores == pytest.approx(asked.scores, abs=1e-6) and restricted.emotion == asked.emotion


def test_bad_granularity_is_refused(tiny_recognizer: Recognizer) -> None:
    with pytest.raises(ValueError, match="granularity is 'word'"):
        tiny_recognizer.predict((wave("en_1s_16k.wav"), 16000), "word")  # type: ignore[arg-type]


def test_length_batches_groups_similar_lengths_within_bounds() -> None:
    lengths = [100, 5, 90, 6, 7, 95]
    batches = length_batches(lengths, batch_size=3, max_batch_samples=10**6, max_padding=None)
    assert batches == [[1, 3, 4], [2, 5, 0]]
    # 5, 6, 7 pad to 21 (17% more than 18 real samples); 90 would pad 5 to 90
    assert length_batches(lengths, 8, 10**6, max_padding=0.2) == [[1, 3, 4], [2, 5, 0]]
    assert length_batches(lengths, 8, 10**6, max_padding=0.1) == [[1, 3], [4], [2, 5, 0]]
    assert sorted(i for b in length_batches(lengths, 2, 200) for i in b) == list(range(6))
    for batch in length_batches(lengths, 8, 200):  # padded size bound, a single item may exceed it
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 200
    with pytest.raises(ValueError, match="batch_size is 0"):
        length_batches(lengths, 0, 100)
