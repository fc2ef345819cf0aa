from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "emotion2vec-tiny"
CLIPS = sorted(p.name[: -len(".npz")] for p in (FIXTURE / "waves").glob("*.npz"))
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
    return np.load(FIXTURE / "waves" / f"{clip}.npz")["wave"]


def expected(clip: str, granularity: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURE / "expected" / f"{clip}.{granularity}.npz"))


def wave_meta(clip: str) -> dict[str, object]:
    return json.loads(str(np.load(FIXTURE / "waves" / f"{clip}.npz")["meta"]))


@pytest.fixture(autouse=True)
def _cache_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets an empty model cache, never the user's; conversions skip the ONNX export
    (~20 s even for the tiny model) except where a test asks for it (test_onnx.py)."""
    home = tmp_path_factory.mktemp("emoserve-home")
    monkeypatch.setenv("EMOSERVE_HOME", str(home))
    monkeypatch.setenv("EMOSERVE_EXPORT_ONNX", "0")
    return home


@pytest.fixture(scope="session")
def tiny_recognizer(tmp_path_factory: pytest.TempPathFactory):
    from emoserve.inference.recognizer import load_model

    mp = pytest.MonkeyPatch()
    mp.setenv("EMOSERVE_HOME", str(tmp_path_factory.mktemp("tiny-home")))
    mp.setenv("EMOSERVE_EXPORT_ONNX", "0")
    try:
        yield load_model(FIXTURE / "model", backend="torch", device="cpu", progress=False)
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def tiny_onnx_entry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture model converted once with its float32 and int8 ONNX graphs (~30 s)."""
    from emoserve.model.convert import convert

    return convert(FIXTURE / "model", tmp_path_factory.mktemp("onnx") / "entry", onnx=True, int8=True)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_onnx_entry: Path):
    from emoserve.inference.recognizer import load_model

    return load_model(tiny_onnx_entry, backend="onnx", threads=1, progress=False)


def skip_or_fail(reason: str) -> None:
    """Skip a test whose outside tool is missing - except where EMOSERVE_REQUIRE_TOOLS is set (CI):
    there a missing tool must not quietly turn a promise's test into a skip."""
    if os.environ.get("EMOSERVE_REQUIRE_TOOLS"):
        pytest.fail(f"{reason} (EMOSERVE_REQUIRE_TOOLS is set)")
    pytest.skip(reason)


@contextmanager
def gradio_loops_closed() -> Iterator[None]:
    """Build Gradio Blocks in this block: the event loops Gradio opens and never closes (one per lock it
    makes outside a running loop, gradio.utils.safe_get_lock, each a socketpair) are closed on leaving,
    rather than reported whenever a garbage collection finds them, in whatever later test that is."""
    loops: list[asyncio.AbstractEventLoop] = []
    new_event_loop = asyncio.new_event_loop

    def kept_loop() -> asyncio.AbstractEventLoop:
        loops.append(new_event_loop())
        return loops[-1]

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(asyncio, "new_event_loop", kept_loop)
            yield
    finally:
        asyncio.set_event_loop(None)
        for loop in loops:
            loop.close()
