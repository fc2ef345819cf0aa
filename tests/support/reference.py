"""The fixture model's reference data (tests/fixtures/emotion2vec-tiny/README) and its tolerances."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .paths import FIXTURE, WAVES

CLIPS = sorted(p.name[: -len(".npz")] for p in WAVES.glob("*.npz"))
SCORE_TOL = 1e-5  # fixture README: what a correct float32 implementation meets
EMBEDDING_TOL = 1e-4


def copy_fixture(tmp_path: Path) -> Path:
    """A writable copy of the fixture model (the shared one is read-only in CI)."""
    model_dir = tmp_path / "model"
    shutil.copytree(FIXTURE / "model", model_dir)
    for f in model_dir.iterdir():
        f.chmod(0o644)
    return model_dir


def wave(clip: str) -> np.ndarray:
    return np.load(WAVES / f"{clip}.npz")["wave"]


def expected(clip: str, granularity: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURE / "expected" / f"{clip}.{granularity}.npz"))


def wave_meta(clip: str) -> dict[str, object]:
    return json.loads(str(np.load(WAVES / f"{clip}.npz")["meta"]))
