"""The warm-up's coverage of the widths a CUDA server runs (serving/warmup.py `warm_up_widths`), on a CPU: a
backend that answers "cuda:0" and pads as the torch backend does on CUDA, running the real CPU network."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import emoserve.inference.recognizer as recognizer_module
from emoserve.audio.decode import Audio
from emoserve.constants import MIN_SAMPLES, SAMPLE_RATE
from emoserve.inference.recognizer import Recognizer
from emoserve.model.interface import CUDA_WIDTHS_PER_OCTAVE_LOG2, Outputs, bucket_width, pad_to_bucket
from emoserve.serving.engine import Engine, EngineConfig
from emoserve.serving.settings import Settings
from emoserve.serving.warmup import cuda_warmup_lengths, warm_up_engine
from tests.support.reference import wave


class PaddedAsOnCuda:
    """The torch backend's CUDA padding (`TorchBackend.run`) in front of the CPU backend; records widths."""

    name = "torch"
    device = "cuda:0"
    dtype = "float32"

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.widths: set[int] = set()

    def run(self, waves: np.ndarray, lengths: np.ndarray, frames: bool) -> Outputs:
        waves = pad_to_bucket(waves, CUDA_WIDTHS_PER_OCTAVE_LOG2)
        self.widths.add(waves.shape[1])
        return self.inner.run(waves, lengths, frames)


def audio(samples: np.ndarray, source: str) -> Audio:
    return Audio(
        np.ascontiguousarray(samples, dtype=np.float32), source, SAMPLE_RATE, 1, "array", None, False
    )


def cuda_width(samples: int) -> int:
    return bucket_width(samples, CUDA_WIDTHS_PER_OCTAVE_LOG2)


def test_the_cuda_widths_up_to_two_minutes_are_few_and_cover_every_length() -> None:
    max_samples = 120 * SAMPLE_RATE
    lengths = cuda_warmup_lengths(max_samples)
    assert len(lengths) < 50  # ~4 per octave: a warm-up of seconds on a GPU, not ~380 widths
    covered = {cuda_width(n) for n in lengths}
    rng = np.random.default_rng(0)
    probes = [*range(MIN_SAMPLES, 20_000), *rng.integers(MIN_SAMPLES, max_samples + 1, 20_000).tolist()]
    probes += [edge + d for edge in covered for d in (-1, 0, 1) if MIN_SAMPLES <= edge + d <= max_samples]
    assert {cuda_width(n) for n in probes} <= covered
    assert max(lengths) == max_samples  # the longest request is run itself (the engine refuses longer)
    for n in probes[:20_000:97]:
        assert n <= cuda_width(n) < n * 1.25 + 320  # the padding a GPU pays for it: under a quarter


def test_the_warm_up_on_cuda_runs_every_width_a_request_can_have(tiny_recognizer: Recognizer) -> None:
    backend = PaddedAsOnCuda(tiny_recognizer.backend)
    recognizer = Recognizer(backend, tiny_recognizer.info)  # type: ignore[arg-type]
    max_audio_s = 3.0
    settings = Settings(max_audio_s=max_audio_s)
    speech = wave("zh_3s_16k.wav")
    clips = [audio(speech[:SAMPLE_RATE], "one second"), audio(speech, "three seconds")]
    engine = Engine(recognizer, EngineConfig(max_batch_size=1, max_wait_ms=0))
    engine.start()
    try:
        warm_up_engine(engine, settings, clips)
    finally:
        engine.stop(10)
    every_request = {cuda_width(n) for n in range(MIN_SAMPLES, int(max_audio_s * SAMPLE_RATE) + 1)}
    assert every_request <= backend.widths


def test_no_malloc_trim_after_a_gpu_call(
    tiny_recognizer: Recognizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """malloc_trim returns a CPU call's freed activations; a GPU call's are in device memory (review C4)."""
    trims: list[str] = []
    monkeypatch.setattr(recognizer_module, "trim", lambda: trims.append("trim"))
    clip = audio(wave("zh_3s_16k.wav"), "clip")
    Recognizer(PaddedAsOnCuda(tiny_recognizer.backend), tiny_recognizer.info).predict_batch(  # type: ignore[arg-type]
        [clip], "utterance", False
    )
    assert trims == []
    tiny_recognizer.predict_batch([clip], "utterance", False)
    assert trims == ["trim"]


class Recorded:
    """A CPU backend under another runtime's name; records the lengths of the clips it runs."""

    device = "cpu"
    dtype = "float32"

    def __init__(self, inner: Any, name: str) -> None:
        self.inner, self.name = inner, name
        self.lengths: list[int] = []

    def run(self, waves: np.ndarray, lengths: np.ndarray, frames: bool) -> Outputs:
        self.lengths += [int(n) for n in lengths]
        return self.inner.run(waves, lengths, frames)


@pytest.mark.parametrize(("name", "each_length"), [("onnx", False), ("openvino", False), ("torch", True)])
def test_the_graph_runtimes_warm_one_short_length_and_torch_each_length(
    tiny_recognizer: Recognizer, name: str, each_length: bool
) -> None:
    """ONNX Runtime warms every length with one; OpenVINO's first call per width is paid by whichever
    length comes (its bundled lengths would cost the start more than they save); torch warms each."""
    backend = Recorded(tiny_recognizer.backend, name)
    recognizer = Recognizer(backend, tiny_recognizer.info)  # type: ignore[arg-type]
    speech = wave("zh_3s_16k.wav")
    clips = [audio(speech[:SAMPLE_RATE], "one second"), audio(speech, "three seconds")]
    engine = Engine(recognizer, EngineConfig(max_batch_size=1, max_wait_ms=0))
    engine.start()
    try:
        warm_up_engine(engine, Settings(), clips)
    finally:
        engine.stop(10)
    assert set(backend.lengths) == ({SAMPLE_RATE, len(speech)} if each_length else {SAMPLE_RATE})
