"""Voice activity detection for long recordings: silero-vad's ONNX sequence model, run block by block.

    16 kHz samples -> SileroVad (speech probability per 32 ms frame; LSTM state and context carried
    from block to block) -> Segmenter (silero's own rules for turning probabilities into speech regions,
    streamed; regions padded; speech longer than max_segment_s cut at its quietest point) -> Segment

Only the open segment is buffered, so memory does not grow with the recording. The model file ships in
the `silero-vad` wheel; it is located without importing the package, whose import loads torch and sets
torch's thread count for the whole process to 1.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from emoserve.constants import MAX_SEGMENT_S, SAMPLE_RATE, VAD_THRESHOLD

FRAME = 512  # samples per VAD frame at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous frame that silero prefixes to each frame
STATE_SHAPE = (1, 1, 128)
MAX_FRAMES_PER_CALL = 512  # ~16 s of audio per ONNX call: few Python round trips, small buffers
SEQUENCE_MODEL = "silero_vad_16k_sequence.onnx"
RMS_HOP = 160  # 10 ms: the resolution at which a long segment is cut
RMS_SMOOTH = 5  # hops averaged (50 ms) so that a cut lands in a pause, not between two pitch periods


@dataclass(frozen=True)
class VadSettings:
    """silero-vad's parameters (its defaults for long-form audio) and our cut of long speech."""

    threshold: float = VAD_THRESHOLD
    min_speech_ms: float = 250.0
    min_silence_ms: float = 300.0
    pad_ms: float = 100.0
    max_segment_s: float = MAX_SEGMENT_S

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"vad threshold is {self.threshold}; it must be between 0 and 1")
        for name in ("min_speech_ms", "min_silence_ms", "pad_ms"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} is {getattr(self, name)}; it must be 0 or more")
        if not self.max_segment_s >= 1.0:
            raise ValueError(f"max_segment_s is {self.max_segment_s}; it must be at least 1 s")

    @property
    def neg_threshold(self) -> float:
        """Speech ends when the probability falls below this (silero's hysteresis)."""
        return max(self.threshold - 0.15, 0.01)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_VAD = VadSettings()
# The query parameters that set VadSettings' fields (GET /v1/timeline, GET /v1/stream): parameter -> field
VAD_PARAMETERS = {
    "vad_threshold": "threshold",
    "min_speech_ms": "min_speech_ms",
    "min_silence_ms": "min_silence_ms",
    "pad_ms": "pad_ms",
    "max_segment_s": "max_segment_s",
}


@dataclass(frozen=True)
class Segment:
    """A piece of one channel's 16 kHz audio, in samples from the start of the recording."""

    start: int
    end: int
    samples: np.ndarray = field(repr=False)
    split: bool = False  # a piece of speech longer than max_segment_s, cut at a quiet point
    speaker: str | None = None

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.end / SAMPLE_RATE


class Vad(Protocol):
    """A streaming VAD: speech probabilities for each complete 512-sample frame fed so far."""

    def probabilities(self, samples: np.ndarray) -> np.ndarray: ...

    def flush(self) -> np.ndarray:
        """The last, zero-padded frame's probability (empty when no samples are pending)."""
        ...


def silero_model_path() -> Path:
    """The sequence model inside the silero-vad wheel, found without importing the package."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or spec.origin is None:
        raise RuntimeError("the timeline needs silero-vad: pip install silero-vad")
    path = Path(spec.origin).parent / "data" / SEQUENCE_MODEL
    if not path.is_file():
        raise RuntimeError(f"silero-vad is installed but has no {SEQUENCE_MODEL}: pip install -U silero-vad")
    return path


class SileroVad:
    """silero-vad's sequence model on ONNX Runtime (one thread), fed any number of samples at a time.

    The probabilities equal silero's whole-file `SileroVADSequence.audio_forward` on the same samples:
    each frame is prefixed with the last 64 samples of the one before, and the LSTM state goes on."""

    def __init__(self, session: Any | None = None) -> None:
        self._session = session or new_session()
        self._h = np.zeros(STATE_SHAPE, np.float32)
        self._c = np.zeros(STATE_SHAPE, np.float32)
        self._context = np.zeros(CONTEXT, np.float32)
        self._pending = np.zeros(0, np.float32)

    def probabilities(self, samples: np.ndarray) -> np.ndarray:
        data = np.concatenate([self._pending, np.asarray(samples, np.float32)])
        whole = len(data) // FRAME * FRAME
        self._pending = data[whole:]
        return self._run(data[:whole].reshape(-1, FRAME))

    def flush(self) -> np.ndarray:
        if not len(self._pending):
            return np.zeros(0, np.float32)
        frame = np.zeros((1, FRAME), np.float32)
        frame[0, : len(self._pending)] = self._pending
        self._pending = np.zeros(0, np.float32)
        return self._run(frame)

    def _run(self, frames: np.ndarray) -> np.ndarray:
        out = []
        for at in range(0, len(frames), MAX_FRAMES_PER_CALL):
            block = frames[at : at + MAX_FRAMES_PER_CALL]
            contexts = np.empty((len(block), CONTEXT), np.float32)
            contexts[0] = self._context
            contexts[1:] = block[:-1, -CONTEXT:]
            self._context = block[-1, -CONTEXT:].copy()
            probs, self._h, self._c = self._session.run(
                ["speech_probs", "hn", "cn"],
                {"input": np.concatenate([contexts, block], axis=1), "h": self._h, "c": self._c},
            )
            out.append(np.asarray(probs, np.float32).reshape(-1))
        return np.concatenate(out) if out else np.zeros(0, np.float32)


@functools.cache
def new_session() -> Any:
    """One session for the process: its run() is thread-safe, and each SileroVad keeps its own state."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a small LSTM: more threads only add synchronisation
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(silero_model_path()), sess_options=options, providers=["CPUExecutionProvider"]
    )
