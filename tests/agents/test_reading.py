"""A turn's reading (agents/reading.py): the compact line an LLM reads, and the structured data."""

from __future__ import annotations

from typing import Any

from emoserve.agents.reading import EmotionReading

SCORES = {
    "angry": 0.71, "disgusted": 0.01, "fearful": 0.02, "happy": 0.03, "neutral": 0.18,
    "other": 0.0, "sad": 0.04, "surprised": 0.01, "unknown": 0.0,
}  # fmt: skip


def reading(**changes: Any) -> EmotionReading:
    fields: dict[str, Any] = {
        "emotion": "angry", "confidence": 0.71, "scores": SCORES, "start_s": 1.0, "end_s": 3.5,
        "latency_s": 0.12, "interim": False, "random_weights": False, "model": "emotion2vec_plus_base",
        "turn": 3,
    }  # fmt: skip
    return EmotionReading(**{**fields, **changes})


def test_the_llm_line_names_the_top_k_scores_above_the_floor() -> None:
    assert reading().for_llm() == "[emotion angry=0.71 neutral=0.18]"
    assert reading().for_llm(top_k=3) == "[emotion angry=0.71 neutral=0.18]"  # sad 0.04 is under the floor
    assert reading().for_llm(top_k=3, floor=0.03) == "[emotion angry=0.71 neutral=0.18 sad=0.04]"
    assert reading().for_llm(top_k=1) == "[emotion angry=0.71]"
    assert reading().for_llm(floor=0.9) == "[emotion angry=0.71]"  # the top emotion is always named


def test_the_llm_line_carries_a_head_and_the_random_weights_mark() -> None:
    head = {"name": "escalate", "label": "yes", "confidence": 0.83, "scores": {"yes": 0.83, "no": 0.17}}
    assert reading(head=head).for_llm() == "[emotion angry=0.71 neutral=0.18 escalate=yes:0.83]"
    assert reading(random_weights=True).for_llm() == "[emotion angry=0.71 neutral=0.18 random-test-weights]"


def test_the_structured_reading_has_every_field() -> None:
    data = reading(interim=True).to_dict()
    assert data["scores"] == SCORES and data["interim"] is True and data["latency_s"] == 0.12
    assert set(data) == {
        "emotion", "confidence", "scores", "start_s", "end_s", "latency_s", "interim", "random_weights",
        "model", "turn", "head",
    }  # fmt: skip


def test_a_reading_from_a_stream_message() -> None:
    message = {
        "type": "segment", "seq": 4, "start_s": 0.0, "end_s": 2.5, "speaker": None, "emotion": "angry",
        "label_zh": "生气", "emoji": "😠", "confidence": 0.71, "scores": SCORES, "split": False,
        "head": None, "skipped": 0, "turn_id": "turn-3",
    }  # fmt: skip
    made = EmotionReading.from_message(
        message,  # type: ignore[arg-type]
        start_s=1.0, end_s=3.5, latency_s=0.12, interim=False, random_weights=False,
        model="emotion2vec_plus_base", turn=3,
    )  # fmt: skip
    assert made == reading()
