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

Channels = Literal["mix", "separate"]  # a recording's channels: mixed down, or a timeline per channel
CHANNEL_MODES: tuple[Channels, ...] = ("mix", "separate")
MAX_SEGMENT_S = 15.0  # a recording's longer speech is cut at a quiet point (VadSettings)
VAD_THRESHOLD = 0.5  # silero-vad's speech probability (VadSettings)
MAX_SPANS_BYTES = 1 << 20  # a segments file (JSON or RTTM): ~20k RTTM lines

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})  # flags, environment variables, form fields
FALSE_WORDS = frozenset({"0", "false", "no", "off"})

# The batching engine's defaults (EngineConfig and the server's settings)
# Padded batch cost bound for predict_many: 8 clips of 15 s. Attention memory grows with
# batch x tokens^2, so long clips are batched fewer at a time.
MAX_BATCH_SAMPLES = 8 * 15 * SAMPLE_RATE
# A CPU model call of a recording's segments holds at most this much audio (a longer segment goes alone):
# the peak memory of a timeline then does not depend on the recording's length (batches of 8 long segments
# made it grow with the file, docs/benchmarks.md section 13), an interactive request waits for at most one
# such call, and on a CPU a batch gains little (section 3). A GPU batches segments freely.
CPU_SEGMENT_BATCH_S = 8.0
STREAM_PATH = "/v1/stream"  # the live stream's route: the server's, and where its clients connect
STREAM_ENCODINGS = ("pcm_s16le", "pcm_f32le")  # a live stream's PCM (GET /v1/stream, audio/live.py)
STREAM_HOP_S = 1.0  # a live stream's defaults: an interim reading every this many seconds of speech,
STREAM_WINDOW_S = 10.0  # over the utterance's last this many seconds
# and its limits (inference/protocol.py's StreamOptions checks them; the CLI's help names them)
STREAM_SAMPLE_RATES = (8_000, 192_000)  # Hz: what a stream may send (anything but 16 kHz is resampled)
STREAM_HOP_S_RANGE = (0.25, 10.0)  # seconds of speech between interim readings
STREAM_MAX_WINDOW_S = 30.0  # an interim reading's window, at most (an utterance is at most max_segment_s)
STREAM_MAX_CHANNELS = 32  # interleaved channels a stream may send, mixed to mono
# vad=off with chunk_s: a turn is scored in pieces of chunk_s as it arrives (its reading pools their frames),
# each piece's window reaching this far back into the turn, so its first frames see what came before
STREAM_CHUNK_S_RANGE = (1.0, 30.0)
STREAM_CHUNK_CONTEXT_S = 1.0
BATCHING_CHOICES = ("auto", "on", "off")  # the engine's `batching` (serving/engine.py: choose_batching)
MAX_BATCH_SIZE = 8  # clips per model call (also predict_many's and `emoserve predict`'s default)
MAX_WAIT_MS = 10.0  # how long the first request of a batch waits for company
MAX_BATCH_SECONDS = 120.0  # padded audio seconds per model call (bounds attention memory)
MAX_QUEUE = 64  # waiting requests; beyond it submit raises QueueFull


# The model options (`load_model`, `emoserve serve`/`predict`, Ray): one list each
Backend = Literal["auto", "torch", "onnx", "openvino"]
BACKENDS: tuple[Backend, ...] = ("auto", "torch", "onnx", "openvino")
# auto: the fastest precision the machine has natively whose agreement with float32 was measured and
# passed (inference/precision.py); bfloat16 on CPUs with native bf16 (openvino, torch) and on GPUs,
# float16 on GPUs (torch), int8 on CPUs (onnx, opt-in only)
Dtype = Literal["auto", "float32", "float16", "bfloat16", "int8"]
DTYPES: tuple[Dtype, ...] = ("auto", "float32", "float16", "bfloat16", "int8")
# where a missing model is downloaded from: "auto" tries Hugging Face, then ModelScope
Hub = Literal["auto", "hf", "ms"]
HUBS: tuple[Hub, ...] = ("auto", "hf", "ms")
DEFAULT_MODEL = "emotion2vec_plus_large"

# A head's classifier (`emoserve train-head --classifier`, a head's `kind`): here, not in model/head.py,
# so that the command line offers the choices without importing numpy
Classifier = Literal["logistic", "mlp"]
CLASSIFIERS: tuple[Classifier, ...] = ("logistic", "mlp")
# A regression head's learner (`train-head --targets ... --regressor`): ridge with its strength chosen
# inside each training fold earned the default on synthetic data (docs/benchmarks.md, regression heads)
Regressor = Literal["ridge", "mlp"]
REGRESSORS: tuple[Regressor, ...] = ("ridge", "mlp")
HeadTask = Literal["classification", "regression"]  # what a head's result holds (`head.kind`)
# `evaluate` suggests the min_confidence (abstain threshold) that reaches this accuracy on your data
DEFAULT_TARGET_ACCURACY = 0.9


def segment_batch_seconds(device_type: str) -> float | None:
    """The most audio in one model call of a recording's segments on `device_type` (None: no bound)."""
    return None if device_type == "cuda" else CPU_SEGMENT_BATCH_S
