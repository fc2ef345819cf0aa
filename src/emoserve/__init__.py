"""emoserve: speech emotion recognition with emotion2vec+, ready the moment it starts.

The heavy parts (torch) load on first use of a name below, so `import emoserve` and
`emoserve --help` stay fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "inference.recognizer",
    "Recognizer": "inference.recognizer",
    "Result": "inference.results",
    "FrameResult": "inference.results",
    "ModelOutputError": "errors",
    "load_audio": "audio.decode",
    "Audio": "audio.decode",
    "AudioError": "errors",
    "WeightsError": "errors",
    "make_test_model": "model.testing",
    "Timeline": "inference.results",
    "TimelineSegment": "inference.results",
    "Span": "audio.segments",
    "VadSettings": "audio.vad",
    "Head": "model.head",
    "load_calibration": "inference.confidence",
    "OptionError": "errors",
}
__all__ = [  # noqa: RUF022 - grouped by module
    "__version__",
    "load_model",
    "Recognizer",
    "Result",
    "FrameResult",
    "ModelOutputError",
    "load_audio",
    "Audio",
    "AudioError",
    "WeightsError",
    "make_test_model",
    "Timeline",
    "TimelineSegment",
    "Span",
    "VadSettings",
    "Head",
    "load_calibration",
    "OptionError",
]

if TYPE_CHECKING:
    from emoserve.audio.decode import Audio, load_audio
    from emoserve.audio.segments import Span
    from emoserve.audio.vad import VadSettings
    from emoserve.errors import AudioError, ModelOutputError, OptionError, WeightsError
    from emoserve.inference.confidence import load_calibration
    from emoserve.inference.recognizer import Recognizer, load_model
    from emoserve.inference.results import FrameResult, Result, Timeline, TimelineSegment
    from emoserve.model.head import Head
    from emoserve.model.testing import make_test_model


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'emoserve' has no attribute {name!r}")
