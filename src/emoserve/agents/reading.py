"""One user turn's emotion reading, as a voice agent uses it: structured data for tools and escalation
logic, and a compact line for the LLM's context.

    [emotion angry=0.71 neutral=0.18]                        top-k scores above a floor (tokens are cost)
    [emotion angry=0.71 neutral=0.18 random-test-weights]    a test model's reading says so

A reading is a cue, not a verdict: the model hears how something is said, in the languages it was
trained on (docs/guides/voice-agents.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from emoserve.inference.protocol import Reading

LLM_TOP_K = 2  # the scores an LLM line names: the top emotion and the runner-up
LLM_FLOOR = 0.1  # scores below this are left out of the LLM line (the top emotion never is)
RANDOM_MARK = "random-test-weights"  # in the LLM line of a test model's reading


@dataclass(frozen=True)
class EmotionReading:
    """The emotion of one user turn (`TurnReader`): the nine emotions' scores, the top one and its
    confidence, the turn's audio span and how long after "user stopped" the reading was in hand."""

    emotion: str  # the top emotion, English
    confidence: float
    scores: dict[str, float]  # label -> probability, in the model's label order
    start_s: float  # the turn's audio: seconds of the reader's audio from its first sample
    end_s: float
    latency_s: float  # from "user stopped" to this reading in hand
    interim: bool  # true: the newest interim reading, the turn's own did not come within the timeout
    random_weights: bool  # a test model: the reading is meaningless
    model: str
    turn: int  # 1, 2, 3, ... per reader
    head: dict[str, Any] | None = None  # a served head's result (name, label, confidence, scores), if asked

    @classmethod
    def from_message(
        cls,
        message: Reading,
        *,
        start_s: float,
        end_s: float,
        latency_s: float,
        interim: bool,
        random_weights: bool,
        model: str,
        turn: int,
    ) -> EmotionReading:
        """From the stream's `segment` (the turn's own) or `interim` message."""
        return cls(
            emotion=message["emotion"],
            confidence=message["confidence"],
            scores=dict(message["scores"]),
            start_s=round(start_s, 6),
            end_s=round(end_s, 6),
            latency_s=latency_s,
            interim=interim,
            random_weights=random_weights,
            model=model,
            turn=turn,
            head=message.get("head"),
        )

    def for_llm(self, top_k: int = LLM_TOP_K, floor: float = LLM_FLOOR) -> str:
        """`[emotion angry=0.71 neutral=0.18]`: the `top_k` best scores at or above `floor` (the top one
        always), then a served head's label and score, and the random-weights mark of a test model."""
        ranked = sorted(self.scores.items(), key=lambda item: -item[1])
        kept = [ranked[0], *(item for item in ranked[1:top_k] if item[1] >= floor)]
        parts = ["emotion", *(f"{label}={score:.2f}" for label, score in kept)]
        if self.head is not None:
            parts.append(f"{self.head['name']}={self.head['label']}:{self.head['confidence']:.2f}")
        if self.random_weights:
            parts.append(RANDOM_MARK)
        return f"[{' '.join(parts)}]"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
