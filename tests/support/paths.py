"""Where things are, computed once from this file so that a test module's own place does not matter."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
SRC = ROOT / "src" / "emoserve"
TESTS = ROOT / "tests"
FIXTURE = TESTS / "fixtures" / "emotion2vec-tiny"  # the tiny model and its reference outputs (its README)
MODEL = FIXTURE / "model"
AUDIO = FIXTURE / "audio"
WAVES = FIXTURE / "waves"
CLIP = AUDIO / "zh_3s_16k.wav"
