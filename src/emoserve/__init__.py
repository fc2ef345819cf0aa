"""emoserve: speech emotion recognition with emotion2vec+, ready the moment it starts.

The heavy parts (torch) load on first use of a name below, so `import emoserve` and
`emoserve --help` stay fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "recognizer",
    "Recognizer": "recognizer",
    "Result": "recognizer",
    "FrameResult": "recognizer",
    "ModelOutputError": "recognizer",
    "load_audio": "audio",
    "Audio": "audio",
    "AudioError": "audio",
    "WeightsError": "entry",
    "make_test_model": "weights",
    "Timeline": "timeline",
    "TimelineSegment": "timeline",
    "Span": "timeline",
    "VadSettings": "vad",
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
]

if TYPE_CHECKING:
    from .audio import Audio, AudioError, load_audio
    from .entry import WeightsError
    from .recognizer import FrameResult, ModelOutputError, Recognizer, Result, load_model
    from .timeline import Span, Timeline, TimelineSegment
    from .vad import VadSettings
    from .weights import make_test_model


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'emoserve' has no attribute {name!r}")
