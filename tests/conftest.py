"""Fixtures for every test: an empty model cache per test, and the tiny model loaded once per session.
Plain helpers live in tests/support/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.paths import FIXTURE


@pytest.fixture(autouse=True)
def _cache_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets an empty model cache, never the user's; conversions skip the ONNX export
    (~20 s even for the tiny model) except where a test asks for it (tests/model/test_export.py). The
    commands and servers a test starts run float32 (EMOSERVE_DTYPE, the default, pinned against a
    developer's own variable): their results are compared with the reference's and the library's float32
    numbers, whatever this machine's CPU has (`--dtype auto` would take bfloat16 on one with native bf16;
    tests/inference/test_precision.py tests that choice)."""
    home = tmp_path_factory.mktemp("emoserve-home")
    monkeypatch.setenv("EMOSERVE_HOME", str(home))
    monkeypatch.setenv("EMOSERVE_EXPORT_ONNX", "0")
    monkeypatch.setenv("EMOSERVE_DTYPE", "float32")
    return home


@pytest.fixture(scope="session")
def tiny_recognizer(tmp_path_factory: pytest.TempPathFactory):
    from emoserve.inference.recognizer import load_model

    mp = pytest.MonkeyPatch()
    mp.setenv("EMOSERVE_HOME", str(tmp_path_factory.mktemp("tiny-home")))
    mp.setenv("EMOSERVE_EXPORT_ONNX", "0")
    try:
        # float32 explicitly: the reference's numbers (`auto` may take bfloat16 on this machine's CPU)
        yield load_model(FIXTURE / "model", backend="torch", device="cpu", dtype="float32", progress=False)
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

    return load_model(tiny_onnx_entry, backend="onnx", dtype="float32", threads=1, progress=False)


@pytest.fixture(scope="session")
def tiny_openvino(tiny_onnx_entry: Path):
    """The fixture model on OpenVINO at float32 (its compiled model cached in the entry)."""
    from emoserve.inference.recognizer import load_model

    return load_model(tiny_onnx_entry, backend="openvino", dtype="float32", threads=1, progress=False)


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Speech and pauses (the fixture's speech twice, 0.8 s apart) as a 16-bit WAV, as a client's
    microphone would send it: the live streams' input."""
    import soundfile as sf

    from tests.support.audio import RATE, SPEECH, joined

    x, _ = joined((*SPEECH, *SPEECH), gap_s=0.8)
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    sf.write(path, x, RATE, subtype="PCM_16")
    return path
