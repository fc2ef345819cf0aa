"""Facts shared by several modules, in one place. Import-free (the server imports it before anything)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

SAMPLE_RATE = 16_000  # Hz, what the model takes
MIN_SAMPLES = 400  # one model frame: the receptive field of the conv encoder at 16 kHz (spec §4 step 3)
DEFAULT_MAX_SECONDS = 600.0  # callers pass their own limit; attention cost grows with T² (spec §6)
EXAMPLES_DIR = Path(__file__).parent / "examples"  # the bundled clips: warm-up, the UI's example

Granularity = Literal["utterance", "frame"]
GRANULARITIES: tuple[Granularity, ...] = ("utterance", "frame")

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})  # flags, environment variables, form fields
FALSE_WORDS = frozenset({"0", "false", "no", "off"})

# The batching engine's defaults (EngineConfig and the server's settings)
MAX_BATCH_SIZE = 8  # clips per model call
MAX_WAIT_MS = 10.0  # how long the first request of a batch waits for company
MAX_BATCH_SECONDS = 120.0  # padded audio seconds per model call (bounds attention memory)
MAX_QUEUE = 64  # waiting requests; beyond it submit raises QueueFull


# The model options (`load_model`, `emoserve serve`/`predict`, Ray): one list each
BACKENDS = ("auto", "torch", "onnx")
DTYPES = ("float32", "float16", "bfloat16", "int8")  # half precision on GPUs (torch), int8 on CPUs (onnx)
# where a missing model is downloaded from: "auto" tries Hugging Face, then ModelScope
Hub = Literal["auto", "hf", "ms"]
HUBS: tuple[Hub, ...] = ("auto", "hf", "ms")
