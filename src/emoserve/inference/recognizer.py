"""The Python API: a loaded model that turns audio into emotion results, one clip or a batch.

Torch-free: the network runs in a backend (`torch_backend.py`, or `onnx_backend.py` on ONNX Runtime),
which returns the same float32 outputs; everything from there to a `Result` (label mask, softmax, frames,
embeddings) is done here once for both.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from emoserve.audio.decode import Audio, AudioInput, load_audio
from emoserve.constants import (
    BACKENDS,
    DEFAULT_MAX_SECONDS,
    DTYPES,
    GRANULARITIES,
    MAX_BATCH_SAMPLES,
    MAX_BATCH_SIZE,
    SAMPLE_RATE,
    Granularity,
    Hub,
)
from emoserve.errors import ModelOutputError
from emoserve.inference.backend import Backend, open_backend
from emoserve.inference.confidence import Readout, first_set, read_out, readout
from emoserve.inference.heads import head_result
from emoserve.inference.options import ModelOptions
from emoserve.inference.precision import choose_precision
from emoserve.inference.results import FrameResult, ModelTag, Result
from emoserve.model.cache import ensure_intact, resolve
from emoserve.model.entry import WEIGHTS_FILE, ModelInfo, read_entry
from emoserve.model.interface import finite, pad, softmax
from emoserve.model.labels import Label
from emoserve.system import physical_cores, return_freed_memory, trim

if TYPE_CHECKING:
    from emoserve.inference.confidence import Calibration
    from emoserve.inference.live import LiveSession
    from emoserve.inference.results import Timeline, TimelineSegment
    from emoserve.model.head import Head

log = logging.getLogger(__name__)

# On a CPU a batch saves little beyond per-call overhead (~6% for 4 equal 5 s clips of large on
# 2 cores, benchmarks/batching.py), while padded samples cost real work, quadratically in attention:
# clips join a batch only while padding stays under this fraction of the real samples. With 0.25,
# 8 mixed 1-15 s clips ran 11% slower batched than one at a time.
MAX_PADDING = 0.05


class Recognizer:
    """One loaded model. Not thread-safe: share it between threads through an engine."""

    def __init__(
        self,
        backend: Backend,
        info: ModelInfo,
        *,
        max_seconds: float | None = DEFAULT_MAX_SECONDS,
        reason: str = "",
    ):
        self.backend = backend
        self.info = info
        self.max_seconds = max_seconds
        self.reason = reason  # why this backend and dtype (`load_model`'s choice): the log, GET /v1/model
        self.labels: tuple[Label, ...] = tuple(label for label in info.labels if not label.masked)
        # labels named `unuse_*` get -inf logits: the same as a softmax over the others alone
        self._kept = np.array([i for i, label in enumerate(info.labels) if not label.masked])
        self._by_key = {label.en: label for label in self.labels}
        # `use_calibration` (`emoserve calibrate`): the utterance scores it maps to calibrated ones
        self.calibration: Calibration | None = None
        self._proj: tuple[np.ndarray, np.ndarray] | None = None  # the classifier, for `pooled_result`
        # each model call allocates its activations and frees them: give them back (system.py)
        return_freed_memory()

    @property
    def device(self) -> str:
        return self.backend.device

    def padded_width(self, samples: int) -> int:
        """The samples the model computes for a batch whose longest clip has `samples`: the backend's
        padding to a few widths included (model/interface.py)."""
        padded_width = getattr(self.backend, "padded_width", None)
        return int(padded_width(samples)) if padded_width is not None else samples

    @property
    def device_type(self) -> str:
        return self.backend.device.partition(":")[0]

    @property
    def dtype(self) -> str:
        return self.backend.dtype

    @property
    def random_weights(self) -> bool:
        return self.info.random_weights

    @property
    def tag(self) -> ModelTag:
        """What scores this recognizer's results, as each result names it."""
        return ModelTag(self.info.name, self.random_weights, self.backend.name, self.backend.dtype)

    def use_calibration(self, calibration: Calibration | None) -> None:
        """Serve `calibration`'s scores from now on (None: the raw ones); HeadError for a calibration
        fitted on another model's scores."""
        if calibration is not None:
            calibration.check_model(self.info, [label.en for label in self.labels])
        self.calibration = calibration

    def readout(self, labels: Any = None, min_confidence: Any = None) -> Readout:
        """A request's label subset and abstain threshold, checked against this model's labels."""
        return readout(labels, min_confidence, [label.en for label in self.labels])

    def load(self, audio: AudioInput | Audio, sample_rate: int | None = None) -> Audio:
        if isinstance(audio, Audio):
            return audio
        return load_audio(audio, sample_rate, max_seconds=self.max_seconds)

    def predict(
        self,
        audio: AudioInput | Audio,
        granularity: Granularity = "utterance",
        embedding: bool = False,
        *,
        sample_rate: int | None = None,
        head: Head | None = None,
        labels: str | Sequence[str] | None = None,
        min_confidence: float | None = None,
    ) -> Result:
        """`head` (`Head.load(DIR)`, from `emoserve train-head`): its labels on the clip as `result.head`.
        `labels` ("angry,happy,neutral,sad", a list, or a named set such as "iemocap4"): the scores
        restricted to those labels and renormalised. `min_confidence`: under it the top label is
        `uncertain` (inference/confidence.py)."""
        if head is not None:
            head.check_model(self.info)  # before any decoding
        chosen = self.readout(labels, min_confidence)
        clip = self.load(audio, sample_rate)
        return self.predict_batch([clip], granularity, embedding, head=head, readout=chosen)[0]

    def predict_many(
        self,
        audios: Sequence[AudioInput | Audio],
        granularity: Granularity = "utterance",
        embedding: bool = False,
        *,
        batch_size: int = MAX_BATCH_SIZE,
        max_batch_samples: int = MAX_BATCH_SAMPLES,
        max_padding: float | None = MAX_PADDING,
        head: Head | None = None,
        labels: str | Sequence[str] | None = None,
        min_confidence: float | None = None,
    ) -> list[Result]:
        """Results in input order; clips are batched by similar length to limit padding. `head`,
        `labels`, `min_confidence`: as `predict`'s."""
        if head is not None:
            head.check_model(self.info)
        chosen = self.readout(labels, min_confidence)
        clips = [self.load(a) for a in audios]
        results: list[Result | None] = [None] * len(clips)
        lengths = [len(c.samples) for c in clips]
        for batch in length_batches(lengths, batch_size, max_batch_samples, max_padding):
            for i, result in zip(
                batch,
                self.predict_batch(
                    [clips[i] for i in batch], granularity, embedding, head=head, readout=chosen
                ),
                strict=True,
            ):
                results[i] = result
        return [r for r in results if r is not None]

    def timeline(
        self,
        source: Any,
        *,
        head: Head | None = None,
        labels: str | Sequence[str] | None = None,
        min_confidence: float | None = None,
        **options: Any,
    ) -> Timeline:
        """The emotion timeline of a recording of any length: its speech segments (silero-vad, or the
        caller's `spans`), each scored as `predict()` scores that slice, and a time-weighted summary.
        Options are `Recording`'s: channels ("mix" | "separate"), vad (VadSettings), spans,
        max_seconds (None: no limit), name, progress (called with audio seconds done, total). A `head`
        scores each segment with your labels too; `labels` and `min_confidence` are `predict`'s."""
        from emoserve.audio.segments import Recording
        from emoserve.inference.timeline import build_timeline, score_segments

        scorer = self.scoring(head, self.readout(labels, min_confidence))
        job = Recording(source, **options)
        return build_timeline(job, score_segments(scorer, job), self.tag)

    def iter_timeline(
        self,
        source: Any,
        *,
        head: Head | None = None,
        labels: str | Sequence[str] | None = None,
        min_confidence: float | None = None,
        **options: Any,
    ) -> Iterator[TimelineSegment]:
        """`timeline()`'s segments, each yielded as soon as it is scored."""
        from emoserve.audio.segments import Recording
        from emoserve.inference.timeline import score_segments

        scorer = self.scoring(head, self.readout(labels, min_confidence))
        yield from score_segments(scorer, Recording(source, **options))

    def stream(self, *, head: Head | None = None, **options: Any) -> LiveSession:
        """A live stream scored here: `feed(pcm)` and `end()` return the messages of the stream protocol
        (docs/streaming.md; `first` is its `ready`): speech_start, interim readings, each utterance's
        segment (what `timeline()` gives for the same audio) and the summary. Options are StreamOptions'
        (sample_rate, encoding, channels, hop_s, window_s, vad, granularity, embedding, labels,
        min_confidence, use_vad, chunk_s)."""
        from emoserve.inference.live import LiveSession
        from emoserve.inference.protocol import StreamOptions

        chosen = StreamOptions(**options)
        asked = self.readout(chosen.labels, chosen.min_confidence)
        scorer = self.scoring(head, asked)

        def score(audio: Audio, interim: bool) -> Result:
            granularity = "utterance" if interim else chosen.granularity
            return scorer.predict_batch([audio], granularity, chosen.embedding and not interim)[0]

        def frames(audio: Audio) -> Result:  # a piece of a turn (chunk_s): its frame features
            return self.predict_batch([audio], "frame", True)[0]

        def pooled(embedding: np.ndarray, duration_s: float) -> Result:
            return scorer.pooled_result(embedding, duration_s, chosen.embedding)

        return LiveSession(
            score,
            chosen,
            tag=self.tag,
            labels=[label.to_dict() for label in self.labels],
            pieces=(frames, pooled, self.info.config.frame_hop),
        )

    def with_head(self, head: Head) -> Recognizer:
        """This recognizer, its results carrying `head`'s (for the code that scores through predict_many:
        timelines)."""
        return self.scoring(head, None)

    def scoring(self, head: Head | None, chosen: Readout | None) -> Recognizer:
        """This recognizer, its results carrying `head`'s and read out as `chosen` asks (itself when
        neither is given)."""
        if head is None and (chosen is None or chosen.empty):
            return self
        if head is not None:
            head.check_model(self.info)
        return WithHead(self, head, chosen)

    def interrupt(self) -> bool:
        """Stop the model call in progress from another thread (it raises), where the backend can: the
        onnx backend can; torch and openvino cannot. True: a call was asked to stop."""
        interrupt = getattr(self.backend, "interrupt", None)
        return bool(interrupt()) if interrupt is not None else False

    def predict_batch(
        self,
        clips: Sequence[Audio],
        granularity: Granularity,
        embedding: bool,
        *,
        head: Head | None = None,
        readout: Readout | None = None,
    ) -> list[Result]:
        """One padded forward pass over `clips`; each result equals the clip's one-at-a-time result. A
        `head` runs on each clip's utterance embedding (`result.head`); a calibration in use maps the
        utterance scores; `readout` (a label subset, a threshold) is applied last."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity is {granularity!r}; choose 'utterance' or 'frame'")
        if head is not None:
            head.check_model(self.info)
        if not clips:
            return []
        waves, lengths = pad([c.samples for c in clips])
        try:
            out = self.backend.run(waves, lengths, frames=granularity == "frame")
        finally:
            if self.device_type == "cpu":  # on a GPU the activations live in device memory: nothing to trim
                trim()  # the call's activations are freed: their pages go back to the system (system.py)
        if bad := [clip.source for i, clip in enumerate(clips) if not finite(out, i)]:
            raise ModelOutputError(bad)
        scores = softmax(out.logits[:, self._kept])
        if self.calibration is not None:
            scores = self.calibration.apply(scores)
        frame_scores = softmax(out.frame_logits[..., self._kept]) if out.frame_logits is not None else None
        results = []
        for i, clip in enumerate(clips):
            n = int(out.frame_lengths[i])
            emb = None
            if embedding:
                emb = out.frames[i, :n] if out.frames is not None else out.pooled[i]
            result = self._result(
                clip.duration_s,
                granularity,
                scores[i],
                frame_scores[i, :n] if frame_scores is not None else None,
                emb,
            )
            results.append(self._read_out(result, out.pooled[i], head, readout))
        return results

    def _read_out(
        self, result: Result, pooled: np.ndarray, head: Head | None, readout: Readout | None
    ) -> Result:
        """`result` with `head`'s result on `pooled`, read out as `readout` asks."""
        if head is not None:
            result = dataclasses.replace(result, head=head_result(head, pooled))
        head_threshold = first_set(
            readout.min_confidence if readout else None, head.min_confidence if head else None
        )
        return read_out(result, readout, self._by_key, head_threshold)

    def pooled_result(
        self,
        pooled: np.ndarray,
        duration_s: float,
        embedding: bool = False,
        *,
        head: Head | None = None,
        readout: Readout | None = None,
    ) -> Result:
        """The utterance result of a pooled embedding (dim,): the classifier (`proj`, read from the entry's
        weights in float32) and the label mask, softmax and calibration every result gets. A turn read in
        pieces (a live stream's `chunk_s`) pools its pieces' frames and is scored here; for one clip's own
        pooled embedding this is the clip's result (tests: within float32 rounding of the network's own
        classifier)."""
        weight, bias = self._classifier()
        logits = pooled.astype(np.float32) @ weight.T + bias
        scores = softmax(logits[None, self._kept])
        if self.calibration is not None:
            scores = self.calibration.apply(scores)
        result = self._result(duration_s, "utterance", scores[0], None, pooled if embedding else None)
        return self._read_out(result, pooled, head, readout)

    def _classifier(self) -> tuple[np.ndarray, np.ndarray]:
        if self._proj is None:
            from safetensors import safe_open

            with safe_open(self.info.path / WEIGHTS_FILE, framework="np") as weights:
                self._proj = (
                    weights.get_tensor("proj.weight").astype(np.float32),
                    weights.get_tensor("proj.bias").astype(np.float32),
                )
        return self._proj

    def _result(
        self,
        duration_s: float,
        granularity: Granularity,
        scores: np.ndarray,
        frame_scores: np.ndarray | None,
        emb: np.ndarray | None,
    ) -> Result:
        best = int(scores.argmax())
        label = self.labels[best]
        return Result(
            emotion=label.en,
            label_zh=label.zh,
            emoji=label.emoji,
            confidence=float(scores[best]),
            scores=self._named(scores),
            duration_s=round(duration_s, 6),
            granularity=granularity,
            model=self.tag.model,
            random_weights=self.tag.random_weights,
            backend=self.tag.backend,
            dtype=self.tag.dtype,
            frames=self._frames(frame_scores) if frame_scores is not None else None,
            embedding=np.ascontiguousarray(emb) if emb is not None else None,
            calibrated=self.calibration is not None,
        )

    def _named(self, scores: np.ndarray) -> dict[str, float]:
        return {label.en: float(p) for label, p in zip(self.labels, scores, strict=True)}

    def _frames(self, frame_scores: np.ndarray) -> list[FrameResult]:
        hop_s = self.info.config.frame_hop / SAMPLE_RATE
        out = []
        for i, row in enumerate(frame_scores):
            best = int(row.argmax())
            out.append(
                FrameResult(
                    round(i * hop_s, 6),
                    round((i + 1) * hop_s, 6),
                    self.labels[best].en,
                    float(row[best]),
                    self._named(row),
                )
            )
        return out


class WithHead(Recognizer):
    """A recognizer whose every result carries one head's and is read out as one request asks
    (`Recognizer.scoring`)."""

    def __init__(self, recognizer: Recognizer, head: Head | None, chosen: Readout | None) -> None:
        self.__dict__.update(recognizer.__dict__)
        self.head, self.chosen = head, chosen

    def _read_out(
        self, result: Result, pooled: np.ndarray, head: Head | None, readout: Readout | None
    ) -> Result:
        """Every result of this recognizer (a batch's, a pooled embedding's) with its head and readout, where
        the call names none of its own."""
        chosen = readout if readout is not None and not readout.empty else self.chosen
        return super()._read_out(result, pooled, head or self.head, chosen)


def length_batches(
    lengths: Sequence[int], batch_size: int, max_batch_samples: int, max_padding: float | None = MAX_PADDING
) -> list[list[int]]:
    """Indices grouped into batches of similar length: at most `batch_size` items, at most
    `max_batch_samples` padded samples once a batch holds more than one item, and padding at most
    `max_padding` x the real samples (None: no bound)."""
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; it must be at least 1")
    batches: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        current = batches[-1] if batches else None
        # sorted ascending, so lengths[i] is the longest so far: it sets the padded size
        padded = (len(current) + 1) * lengths[i] if current else 0
        if (
            current
            and len(current) < batch_size
            and padded <= max_batch_samples
            and (max_padding is None or padded <= (1 + max_padding) * (real + lengths[i]))
        ):
            current.append(i)
            real += lengths[i]
        else:
            batches.append([i])
            real = lengths[i]
    return batches


def load_model(
    model: str | os.PathLike[str] | None = None,
    *,
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    hub: Hub = "auto",
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    threads: int | None = None,
    progress: bool = True,
) -> Recognizer:
    """Resolve `model` (directory or name; default emotion2vec_plus_large) and load it ready to use.

    `dtype` "auto" (the default): the fastest precision this machine has natively whose agreement with
    float32 was measured and passed (bfloat16 on a CPU with native bf16 where a runtime runs it faster,
    half precision on a GPU, else float32; `inference/precision.py`); "float32" gives the reference's
    numbers; "bfloat16" on such a CPU (openvino, torch) or a GPU; "float16" on a GPU; "int8" (dynamically
    quantized matmuls, onnx) only when asked for.
    `backend`: "openvino" or "onnx" (CPU, no torch imported), "torch", or "auto": on a CPU the fastest
    runtime installed for the dtype (`backend.FASTEST`, measured) that can run the entry, torch on a GPU."""
    if backend not in BACKENDS:
        raise ValueError(f"backend is {backend!r}; choose from {', '.join(BACKENDS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype is {dtype!r}; choose from {', '.join(DTYPES)}")
    entry = ensure_intact(resolve(model, hub_name=hub, progress=progress))
    info = read_entry(entry)
    threads = threads or physical_cores()
    dtype, chosen, why = choose_precision(backend, device, dtype, info, threads)
    runner = open_backend(chosen, dtype, info, device, threads)
    how = "as asked" if backend == chosen else f"the fastest installed for {dtype} that runs this model"
    reason = f"dtype {why}; backend {chosen}: {how}"
    log.info(
        "%s runs on the %s backend (%s, %s): %s", info.name, runner.name, runner.device, runner.dtype, reason
    )
    if info.random_weights:
        log.warning("%s has RANDOM weights: its predictions are meaningless", info.name)
    return Recognizer(runner, info, max_seconds=max_seconds, reason=reason)


def load_with(options: ModelOptions, *, progress: bool = True) -> Recognizer:
    """`load_model` with the options as one value."""
    return load_model(**asdict(options), progress=progress)
