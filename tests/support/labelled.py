"""Labelled audio whose truth is known, for the tests of heads: synthetic sounds that differ acoustically
(a low voice-like harmonic tone, a high one, noise), by "speaker" (pitch and loudness vary by speaker),
with a manifest of labels; and the same clips with numeric targets (arousal, valence) that are a known
linear function of their embeddings' directions plus noise, for regression heads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

SR = 16_000
CLASSES = ("low", "high", "noise")
SPEAKERS = 4
PER_CLASS = 5  # clips per class and speaker
TARGETS = ("arousal", "valence")


def synthetic_clip(kind: str, speaker: int, take: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(SR) / SR  # 1 s
    if kind == "noise":
        x = rng.normal(0.0, 0.2, len(t))
    else:
        f0 = (120.0 if kind == "low" else 420.0) * (1 + 0.06 * speaker) * (1 + 0.01 * take)
        x = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 6)) * 0.3
        x = x * (1 + 0.3 * np.sin(2 * np.pi * (3 + speaker) * t)) + rng.normal(0.0, 0.01, len(t))  # rhythm
    return (x * (0.6 + 0.15 * speaker)).astype(np.float32)


def write_labelled_set(folder: Path, speakers: int = SPEAKERS, per_class: int = PER_CLASS) -> Path:
    """Wav files and manifest.csv (path, label, group, and a column that must be ignored)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["path,label,group,notes"]
    for speaker in range(speakers):
        for kind in CLASSES:
            for take in range(per_class):
                name = f"spk{speaker}_{kind}_{take}.wav"
                sf.write(folder / name, synthetic_clip(kind, speaker, take, rng), SR, subtype="PCM_16")
                rows.append(f"{name},{kind},spk{speaker},ignored")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def linear_targets(x: np.ndarray, noise: float, seed: int = 0) -> np.ndarray:
    """(n, 2) targets on MSP-Podcast's 1..7 scale: the projections of the standardised rows of `x` on its
    first two principal directions (a known linear function of the embedding), plus Gaussian noise of
    `noise` times each target's spread."""
    z = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-12)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    projected = z @ vt[:2].T  # (n, 2)
    projected /= projected.std(axis=0)
    rng = np.random.default_rng(seed)
    return 4.0 + projected + noise * rng.normal(size=projected.shape)


def write_regression_set(folder: Path, recognizer: Any, noise: float = 0.2) -> tuple[Path, np.ndarray]:
    """The labelled clips with `arousal` and `valence` columns (`linear_targets` of the clips' utterance
    embeddings by `recognizer`) beside label and group: regression.csv, and the targets (n, 2)."""
    labelled = write_labelled_set(folder)
    lines = labelled.read_text().splitlines()
    files = [str(folder / line.split(",")[0]) for line in lines[1:]]
    x = np.stack([r.embedding for r in recognizer.predict_many(files, embedding=True)]).astype(np.float64)
    targets = linear_targets(x, noise)
    rows = [lines[0].replace("notes", ",".join(TARGETS))]
    for line, (a, v) in zip(lines[1:], targets, strict=True):
        rows.append(line.replace("ignored", f"{a:.6f},{v:.6f}"))
    manifest = folder / "regression.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest, targets
