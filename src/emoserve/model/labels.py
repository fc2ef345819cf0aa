"""Emotion labels: parsing `tokens.txt`, English keys, Chinese names, emoji, colours, `unuse` masking."""

from __future__ import annotations

from dataclasses import dataclass

# The 9 published classes in logit order (spec section 1); `<unk>` is reported as "unknown".
EMOJI = {
    "angry": "😠",
    "disgusted": "🤢",
    "fearful": "😨",
    "happy": "😊",
    "neutral": "😐",
    "other": "🤔",
    "sad": "😢",
    "surprised": "😲",
    "unknown": "❓",
}
# One colour per label wherever a chart colours emotions (the web UI's clip timeline, long-recording plot
# and distribution): Tableau 10 (matplotlib's default cycle), with neutral grey and happy a warmer orange.
EMOTION_COLOURS = {
    "angry": "#d62728",
    "disgusted": "#8c564b",
    "fearful": "#9467bd",
    "happy": "#ff9f1c",
    "neutral": "#9ca3af",
    "other": "#17becf",
    "sad": "#1f77b4",
    "surprised": "#e377c2",
    "unknown": "#4b5563",
}
OTHER_COLOUR = "#6b7280"  # a label outside the 9 published ones (a custom tokens.txt)
_UNKNOWN_ZH = "未知"


@dataclass(frozen=True)
class Label:
    token: str  # the line of tokens.txt, e.g. "生气/angry"
    en: str  # English key used in results, e.g. "angry"
    zh: str  # Chinese name, e.g. "生气"

    @property
    def emoji(self) -> str:
        return EMOJI.get(self.en, "❔")

    def to_dict(self) -> dict[str, str]:
        """As GET /v1/model and a live stream's `ready` list it."""
        return {"en": self.en, "zh": self.zh, "emoji": self.emoji}

    @property
    def masked(self) -> bool:
        """Older revisions name unusable classes `unuse_N`; their logits are set to -inf."""
        return self.en.startswith("unuse") or self.token.startswith("unuse")


def parse_label(token: str) -> Label:
    token = token.strip()
    if token == "<unk>":
        return Label(token, "unknown", _UNKNOWN_ZH)
    zh, sep, en = token.partition("/")
    return Label(token, en if sep else zh, zh if sep else "")


def parse_tokens(text: str) -> tuple[Label, ...]:
    """One label per line (the published file has no trailing newline); blank lines are ignored."""
    return tuple(parse_label(line) for line in text.splitlines() if line.strip())


PUBLISHED_LABELS = (
    "生气/angry",
    "厌恶/disgusted",
    "恐惧/fearful",
    "开心/happy",
    "中立/neutral",
    "其他/other",
    "难过/sad",
    "吃惊/surprised",
    "<unk>",
)


# ---------------------------------------------------------------------------------------------
# Published key names <-> ours: one table, from our names to upstream's.
